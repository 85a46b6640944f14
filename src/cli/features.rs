//! `beitv2 features`: embeddings per image, written to safetensors (one tensor
//! per image, keyed by path) or `.npy` (one stacked array, paths beside it).

use super::{ModelArgs, PreprocessArgs, finish_batch, inputs, progress, stack_batch};
use crate::data::load_batch;
use crate::model::Beit;
use anyhow::{Context, Result, bail};
use candle_core::{IndexOp, Tensor};
use clap::{Args, ValueEnum};
use std::collections::HashMap;
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
    /// Output file: .safetensors or .npy.
    #[arg(long, short)]
    pub output: PathBuf,
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

/// A NumPy `.npy` v1.0 file holding `t` (f32 or i64, little-endian).
fn npy_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let (descr, data): (&str, Vec<u8>) = match t.dtype() {
        candle_core::DType::F32 => (
            "<f4",
            t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        candle_core::DType::I64 => (
            "<i8",
            t.flatten_all()?
                .to_vec1::<i64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        other => bail!("cannot write {other:?} tensors as .npy"),
    };
    let dims: Vec<String> = t.dims().iter().map(|d| d.to_string()).collect();
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
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
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

/// Writes one tensor per image: safetensors keyed by path, or one stacked
/// `.npy` array with the paths in `<name>.paths.txt` beside it.
pub(super) fn write_output(path: &Path, names: &[String], feats: &[Tensor]) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "safetensors" => {
            let map: HashMap<String, Tensor> =
                names.iter().cloned().zip(feats.iter().cloned()).collect();
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let bytes =
                safetensors::serialize(keys.into_iter().map(|k| (k.as_str(), &map[k])), None)
                    .map_err(|e| anyhow::anyhow!("serialising {}: {e}", path.display()))?;
            crate::util::write_atomic(path, &bytes)
        }
        "npy" => {
            let stacked = Tensor::stack(feats, 0)?;
            crate::util::write_atomic(path, &npy_bytes(&stacked)?)?;
            let list = path.with_extension("paths.txt");
            crate::util::write_atomic(&list, (names.join("\n") + "\n").as_bytes())
                .with_context(|| format!("writing the path list {}", list.display()))
        }
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
    let model = args.model.load(args.dtype)?;
    let transform = args.pre.transform(&model.cfg)?;
    let pb = progress(paths.len(), "embedding");
    let mut names = Vec::new();
    let mut feats = Vec::new();
    let mut failures = Vec::new();
    for chunk in paths.chunks(args.pre.batch_size) {
        let mut items = Vec::new();
        for (p, r) in chunk.iter().zip(load_batch(chunk, &transform)) {
            match r {
                Ok(v) => {
                    names.push(crate::util::path_text(p));
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
            feats.extend(extract(&model, &x, args.kind, &args.layers)?);
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    if !feats.is_empty() {
        write_output(&args.output, &names, &feats)?;
        eprintln!(
            "wrote {} features of shape {:?} to {}",
            feats.len(),
            feats[0].dims(),
            args.output.display()
        );
    }
    finish_batch(&failures, paths.len(), args.failures.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_parsable() {
        let t = Tensor::new(
            &[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let b = npy_bytes(&t).unwrap();
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)") && header.ends_with('\n'));
        assert_eq!(b.len(), 10 + hlen + 24);
        assert_eq!(&b[10 + hlen..10 + hlen + 4], &1.0f32.to_le_bytes());
        let ids = Tensor::new(&[0i64, 1, 2, 3], &candle_core::Device::Cpu).unwrap();
        let one = npy_bytes(&ids).unwrap();
        let hlen = u16::from_le_bytes([one[8], one[9]]) as usize;
        let h = std::str::from_utf8(&one[10..10 + hlen]).unwrap();
        assert!(h.contains("(4,)") && h.contains("<i8"), "{h}");
        assert_eq!(one.len(), 10 + hlen + 32);
        assert_eq!(&one[10 + hlen + 8..10 + hlen + 16], &1i64.to_le_bytes());
    }
}
