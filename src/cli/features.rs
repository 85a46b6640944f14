//! `beitv2 features`: embeddings per image, written to safetensors (one tensor
//! per image, keyed by path) or `.npy` (one stacked array, paths beside it),
//! streamed batch by batch (`batch.rs`).

use super::batch::{self, RowSink};
use super::{ModelArgs, PreprocessArgs, finish_batch, inputs, progress, stack_batch};
use crate::data::load_batch;
use crate::model::Beit;
use anyhow::{Result, bail};
use candle_core::{IndexOp, Tensor};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// The CLS token after the last block (and the final norm, if the model has one): (C).
    Cls,
    /// The classifier's input (C): mean of the patch tokens + fc_norm, or the
    /// normed CLS token for CLS-pooling models.
    Mean,
    /// All patch tokens after the last block: (N−1, C).
    Patch,
    /// Raw tokens (CLS first) after the blocks given by --layers, in block
    /// order with duplicates removed: (layers, N, C).
    Intermediate,
}

#[derive(Args, Debug)]
pub struct FeaturesArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Precision of the transformer blocks' linear layers (bf16/int8 use Intel AMX where present).
    #[arg(long, value_enum, default_value_t = crate::kernels::Precision::F32)]
    pub dtype: crate::kernels::Precision,
    #[command(flatten)]
    pub pre: PreprocessArgs,
    #[arg(long, value_enum, default_value_t = Kind::Mean)]
    pub kind: Kind,
    /// Block indices for --kind intermediate (0-based; negative counts from the end).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub layers: Vec<i64>,
    /// Output file: .safetensors or .npy. Rows are streamed to
    /// OUTPUT.partial (+ .partial.paths) and the file is built at the end.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Continue an interrupted run: keep the images already in
    /// OUTPUT.partial and do only the rest.
    #[arg(long)]
    pub resume: bool,
    /// Also write the images that could not be read or processed to FILE, one
    /// JSON object per line: {"path": …, "error": …} (empty when none failed).
    #[arg(long, value_name = "FILE")]
    pub failures: Option<PathBuf>,
    /// Image files, folders or globs.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

/// Features of one batch, one tensor per image.
fn extract(model: &Beit, x: &Tensor, kind: Kind, layers: &[i64]) -> Result<Vec<Tensor>> {
    let per_batch = match kind {
        Kind::Cls => model.forward_features(x)?.i((.., 0))?,
        Kind::Mean => model.forward_head(&model.forward_features(x)?, true)?,
        Kind::Patch => {
            let t = model.forward_features(x)?;
            let n = t.dim(1)?;
            t.i((.., 1..n))?
        }
        Kind::Intermediate => {
            let inter = model.forward_intermediates(x, layers)?;
            let ts: Vec<Tensor> = inter.into_iter().map(|i| i.tokens).collect();
            Tensor::stack(&ts, 1)?
        }
    };
    let b = per_batch.dim(0)?;
    (0..b).map(|i| Ok(per_batch.i(i)?.contiguous()?)).collect()
}

/// The header of a NumPy `.npy` v1.0 file of `dims` (f32 or i64,
/// little-endian); the data follows it, row-major.
pub(super) fn npy_header(dtype: candle_core::DType, dims: &[usize]) -> Result<Vec<u8>> {
    let descr = match dtype {
        candle_core::DType::F32 => "<f4",
        candle_core::DType::I64 => "<i8",
        other => bail!("cannot write {other:?} tensors as .npy"),
    };
    let dims: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    let shape_str = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_str}, }}");
    // Magic (6) + version (2) + header length (2) + header, padded to 64 bytes with '\n' last.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    Ok(out)
}

/// The output format named by a file's extension (`safetensors` or `npy`).
pub(super) fn output_kind(path: &Path) -> Result<&'static str> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Ok("safetensors"),
        Some("npy") => Ok("npy"),
        _ => bail!(
            "{}: output must end in .safetensors or .npy",
            path.display()
        ),
    }
}

pub fn run(args: FeaturesArgs) -> Result<()> {
    if args.kind == Kind::Intermediate && args.layers.is_empty() {
        bail!("--kind intermediate needs --layers, e.g. --layers 3,7,11");
    }
    output_kind(&args.output)?;
    let paths = inputs::expand_paths(&args.paths)?;
    let settings = serde_json::json!({
        "model": format!("{:?}", args.model),
        "dtype": format!("{:?}", args.dtype),
        "kind": format!("{:?}", args.kind),
        "layers": args.layers,
        "crop_pct": args.pre.crop_pct,
    });
    let opened = RowSink::open(&args.output, args.resume, settings)?;
    let todo = batch::remaining(&paths, &opened.done, &args.output);
    let Some(mut sink) = opened.sink else {
        return batch::finished_output(&args.output, &opened.done, todo.len());
    };
    let mut model = args.model.load(args.dtype)?;
    super::pack_f32_for_run(&mut model, args.dtype, paths.len())?;
    let transform = args.pre.transform(&model.cfg)?;
    let pb = progress(todo.len(), "embedding");
    let mut failures = Vec::new();
    for chunk in todo.chunks(args.pre.batch_size) {
        let chunk: Vec<PathBuf> = chunk.iter().map(|p| (*p).clone()).collect();
        let mut names = Vec::new();
        let mut items = Vec::new();
        for (p, r) in chunk.iter().zip(load_batch(&chunk, &transform)) {
            match r {
                Ok(v) => {
                    names.push(batch::key(p));
                    items.push(v);
                }
                Err(e) => {
                    pb.suspend(|| tracing::error!("{e:#}"));
                    failures.push((p.clone(), e));
                }
            }
        }
        if !items.is_empty() {
            let x = stack_batch(items, &model.cfg)?;
            let feats = extract(&model, &x, args.kind, &args.layers)?;
            sink.push(&names.into_iter().zip(feats).collect::<Vec<_>>())?;
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    if let Some((rows, shape)) = sink.finish()? {
        eprintln!(
            "wrote {rows} features of shape {shape:?} to {}",
            args.output.display()
        );
    }
    finish_batch(&failures, todo.len(), args.failures.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_parsable() {
        let b = npy_header(candle_core::DType::F32, &[2, 3]).unwrap();
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!(b.len(), 10 + hlen);
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)") && header.ends_with('\n'));
        let one = npy_header(candle_core::DType::I64, &[4]).unwrap();
        let h = std::str::from_utf8(&one[10..]).unwrap();
        assert!(h.contains("(4,)") && h.contains("<i8"), "{h}");
    }
}
