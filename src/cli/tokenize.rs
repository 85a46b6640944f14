//! `beitv2 tokenize`: images → VQ-KD visual-token grids, with optional
//! codebook-usage statistics.

use super::batch::{self, Done, RowSink, TextSink};
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
    /// One JSON object per image per line: {"path", "tokens": [[row], ...]}
    /// (to stdout, or to --output).
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
    /// Output file (json: JSON lines, default stdout; safetensors / npy:
    /// streamed to OUTPUT.partial, the file built at the end).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Continue an interrupted run: keep the images already in --output and
    /// tokenize only the rest (--stats counts both).
    #[arg(long, requires = "output")]
    pub resume: bool,
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
    if let (Some(p), f @ (TokenFormat::Safetensors | TokenFormat::Npy)) =
        (&args.output, args.format)
    {
        let kind = super::features::output_kind(p)?;
        if kind != format!("{f:?}").to_lowercase() {
            bail!(
                "--format {f:?} does not match the output file {}",
                p.display()
            );
        }
    } else if let Some(p) = args
        .output
        .as_ref()
        .filter(|p| super::features::output_kind(p).is_ok())
    {
        bail!(
            "--format json writes JSON lines; for {} use --format safetensors or npy",
            p.display()
        );
    } else if args.output.is_none() && args.format != TokenFormat::Json {
        bail!("--format {:?} needs --output FILE", args.format);
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
    let n_codes = model.cfg.n_codes;
    let mut usage = Usage {
        counts: vec![0; n_codes],
    };
    // Tokens already written by an interrupted run count in --stats too.
    let mut count = |ids: &mut dyn Iterator<Item = i64>| -> Result<()> {
        let ids: Vec<i64> = ids.collect();
        if let Some(id) = ids.iter().find(|&&i| !(0..n_codes as i64).contains(&i)) {
            bail!("token id {id} is outside this tokenizer's {n_codes} codes");
        }
        for id in ids {
            usage.counts[id as usize] += 1;
        }
        Ok(())
    };
    let mut text_sink = None;
    let mut rows = None;
    let done = match (&args.output, args.format) {
        (None, _) => {
            text_sink = Some(TextSink::Stdout(std::io::stdout()));
            Done::default()
        }
        (Some(path), TokenFormat::Json) => {
            let done = if args.resume {
                batch::json_lines_done(path, |v| {
                    let grid: Vec<Vec<i64>> = serde_json::from_value(v["tokens"].clone())?;
                    if grid.len() != g || grid.iter().any(|r| r.len() != g) {
                        bail!("its token grid is not {g}x{g}");
                    }
                    count(&mut grid.into_iter().flatten())
                })?
            } else {
                Done::default()
            };
            text_sink = Some(TextSink::file(path, done.len)?);
            done
        }
        (Some(path), _) => {
            let settings = serde_json::json!({
                "tokenizer": crate::util::path_text(&args.tokenizer),
                "arch": args.arch,
                "config": args.config.as_deref().map(crate::util::path_text),
            });
            let opened = RowSink::open(path, args.resume, settings)?;
            match opened.sink {
                Some(mut sink) => {
                    let mut bad = Ok(());
                    sink.for_each_row(|row| {
                        let mut ids = row
                            .chunks_exact(8)
                            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or_default()));
                        if bad.is_ok() {
                            bad = count(&mut ids);
                        }
                    })?;
                    bad.with_context(|| format!("resuming {}", path.display()))?;
                    rows = Some(sink);
                }
                None => {
                    if args.stats || args.stats_plot.is_some() {
                        bail!(
                            "{} is finished: --stats counts the tokens of a run it takes \
                             part in; run without --resume to count them anew",
                            path.display()
                        );
                    }
                    let todo = batch::remaining(&paths, &opened.done, path);
                    return batch::finished_output(path, &opened.done, todo.len());
                }
            }
            opened.done
        }
    };
    let todo = match &args.output {
        Some(path) => batch::remaining(&paths, &done, path),
        None => paths.iter().collect(),
    };
    let pb = progress(todo.len(), "tokenizing");
    let mut failures = Vec::new();
    for chunk in todo.chunks(args.batch_size) {
        let chunk: Vec<PathBuf> = chunk.iter().map(|p| (*p).clone()).collect();
        let mut ok = Vec::new();
        let mut data = Vec::new();
        for (p, r) in chunk.iter().zip(load_batch(&chunk, &transform)) {
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
            count(&mut ids.flatten_all()?.to_vec1::<i64>()?.into_iter())?;
            let mut lines = String::new();
            let mut grids = Vec::new();
            for (i, p) in ok.iter().enumerate() {
                let grid = ids.i(i)?.reshape((g, g))?;
                match &rows {
                    None => {
                        let v = serde_json::json!({
                            "path": batch::key(p),
                            "tokens": grid.to_vec2::<i64>()?,
                        });
                        lines.push_str(&format!("{v}\n"));
                    }
                    Some(_) => grids.push((batch::key(p), grid)),
                }
            }
            match (&mut rows, &mut text_sink) {
                (Some(sink), _) => sink.push(&grids)?,
                (None, Some(sink)) => pb.suspend(|| sink.write(&lines))?,
                (None, None) => {}
            }
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    if let Some(sink) = rows {
        sink.finish()?;
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.stats {
        let v = serde_json::json!({
            "images": usage.total() / (g * g).max(1) as u64,
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
    finish_batch(&failures, todo.len(), args.failures.as_deref())
}
