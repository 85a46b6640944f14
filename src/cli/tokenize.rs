//! `beitv2 tokenize`: images → VQ-KD visual-token grids, with optional
//! codebook-usage statistics.

use super::{finish_batch, inputs, progress};
use crate::checkpoint::load_vqkd;
use crate::data::{EvalTransform, load_batch};
use crate::model::vqkd::{CodeUsage as Usage, Vqkd, VqkdConfig};
use crate::train::charts::{Chart, Series, save_png};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, IndexOp, Tensor};
use clap::{Args, ValueEnum};
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenFormat {
    /// One JSON object per image per line: {"path", "tokens": [[row], ...]}.
    Json,
    /// One int64 grid per image keyed by path (needs --output).
    Safetensors,
    /// One stacked int64 array (needs --output; paths in <output>.paths.txt).
    Npy,
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// Tokenizer checkpoint (unilm vqkd_encoder_*.pth or mmpretrain vqkd_encoder.pth).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: PathBuf,
    /// Tokenizer preset (e.g. vqkd_encoder_base_decoder_3x768x12_clip); inferred when omitted.
    #[arg(long)]
    pub arch: Option<String>,
    /// Custom tokenizer shapes (JSON), instead of --arch.
    #[arg(long, value_name = "FILE", conflicts_with = "arch")]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = TokenFormat::Json)]
    pub format: TokenFormat,
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Print codebook usage (histogram, perplexity, unused codes) as a final JSON line.
    #[arg(long)]
    pub stats: bool,
    /// Also plot the usage histogram (codes sorted by count) to this PNG.
    #[arg(long, value_name = "FILE.png")]
    pub stats_plot: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Also write the images that could not be read or processed to FILE, one
    /// JSON object per line: {"path": …, "error": …} (empty when none failed).
    #[arg(long, value_name = "FILE")]
    pub failures: Option<PathBuf>,
    /// Image files, folders or globs.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

fn load(args: &TokenizeArgs) -> Result<Vqkd> {
    let cfg = match (&args.config, &args.arch) {
        (Some(p), _) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read tokenizer config {}", p.display()))?;
            Some(
                serde_json::from_str::<VqkdConfig>(&text)
                    .with_context(|| format!("parsing tokenizer config {}", p.display()))?,
            )
        }
        (None, Some(a)) => Some(VqkdConfig::preset(a)?),
        (None, None) => None,
    };
    load_vqkd(&args.tokenizer, cfg)
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    match (&args.output, args.format) {
        (None, TokenFormat::Json) => {}
        (None, f) => bail!("--format {f:?} needs --output FILE"),
        (Some(_), TokenFormat::Json) => {
            bail!("--format json prints to stdout; use --format safetensors|npy with --output")
        }
        (Some(p), f) => {
            let kind = super::features::output_kind(p)?;
            if kind != format!("{f:?}").to_lowercase() {
                bail!(
                    "--format {f:?} does not match the output file {}",
                    p.display()
                );
            }
        }
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let paths = inputs::expand_paths(&args.paths)?;
    let model = load(&args)?;
    let s = model.cfg.img_size;
    // unilm test_get_code.py: Resize(256) → CenterCrop(224) → ToTensor (no mean/std).
    let transform = EvalTransform {
        resize_short: (s as f64 / 0.875).floor() as usize,
        crop: (s, s),
        mean: [0.0; 3],
        std: [1.0; 3],
    };
    let g = model.cfg.grid();
    let mut usage = Usage {
        counts: vec![0; model.cfg.n_codes],
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let pb = progress(paths.len(), "tokenizing");
    let (mut names, mut grids, mut failures) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in paths.chunks(args.batch_size) {
        let mut ok = Vec::new();
        let mut data = Vec::new();
        for (p, r) in chunk.iter().zip(load_batch(chunk, &transform)) {
            match r {
                Ok(v) => {
                    ok.push(p);
                    data.extend(v);
                }
                Err(e) => {
                    pb.suspend(|| tracing::error!("{e:#}"));
                    failures.push((p.clone(), e));
                }
            }
        }
        if !ok.is_empty() {
            let x = Tensor::from_vec(data, (ok.len(), 3, s, s), &Device::Cpu)?;
            let ids = model.tokens(&Vqkd::preprocess(&x)?)?.to_dtype(DType::I64)?;
            for (i, p) in ok.iter().enumerate() {
                let row = ids.i(i)?;
                for &id in &row.to_vec1::<i64>()? {
                    usage.counts[id as usize] += 1;
                }
                let grid = row.reshape((g, g))?;
                match args.format {
                    TokenFormat::Json => {
                        let v = serde_json::json!({
                            "path": crate::util::path_text(p),
                            "tokens": grid.to_vec2::<i64>()?,
                        });
                        pb.suspend(|| writeln!(out, "{v}"))?;
                    }
                    _ => {
                        names.push(crate::util::path_text(p));
                        grids.push(grid);
                    }
                }
            }
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    if let (Some(path), false) = (&args.output, grids.is_empty()) {
        super::features::write_output(path, &names, &grids)?;
    }
    if args.stats {
        let v = serde_json::json!({
            "images": paths.len() - failures.len(),
            "tokens": usage.total(),
            "codebook_size": usage.counts.len(),
            "used_codes": usage.counts.len() - usage.unused(),
            "unused_codes": usage.unused(),
            "perplexity": usage.perplexity(),
            "histogram": usage.counts,
        });
        writeln!(out, "{v}")?;
    }
    if let Some(plot) = &args.stats_plot {
        let mut sorted = usage.counts.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let chart = Chart {
            title: format!(
                "codebook usage: {} of {} codes used, perplexity {:.1}",
                usage.counts.len() - usage.unused(),
                usage.counts.len(),
                usage.perplexity()
            ),
            x_label: "code rank".into(),
            y_label: "tokens".into(),
            series: vec![Series {
                name: "count".into(),
                points: sorted
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| (i as f64, c as f64))
                    .collect(),
            }],
            log_y: false,
        };
        save_png(&chart, plot)?;
    }
    out.flush()?;
    finish_batch(&failures, paths.len(), args.failures.as_deref())
}
