//! `beitv2 classify`: top-k ImageNet (or custom) classes per image.

use super::batch::{self, Done, TextSink};
use super::{ModelArgs, PreprocessArgs, finish_batch, inputs, progress, stack_batch};
use crate::data::load_batch;
use anyhow::Result;
use clap::{Args, ValueEnum};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Precision of the transformer blocks' linear layers (bf16/int8 use Intel AMX where present).
    #[arg(long, value_enum, default_value_t = crate::kernels::Precision::F32)]
    pub dtype: crate::kernels::Precision,
    #[command(flatten)]
    pub pre: PreprocessArgs,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Class names, one per line (default: bundled ImageNet-1k names).
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// Also write the images that could not be read or processed to FILE, one
    /// JSON object per line: {"path": …, "error": …} (empty when none failed).
    #[arg(long, value_name = "FILE")]
    pub failures: Option<PathBuf>,
    /// Write the results to FILE (synced after every batch) instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Continue an interrupted run: keep the complete results in --output
    /// (json or csv) and classify only the images not in it.
    #[arg(long, requires = "output")]
    pub resume: bool,
    /// Image files, folders or globs.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

const CSV_HEADER: &str = "path,rank,class_index,label,score";

#[derive(Serialize)]
struct Prediction<'a> {
    class_index: usize,
    label: &'a str,
    score: f32,
}

#[derive(Serialize)]
struct ImageResult<'a> {
    path: String,
    top_k: Vec<Prediction<'a>>,
}

/// Indices of the `k` largest values, best first (ties: lower index first).
pub fn top_k(scores: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.into_iter().take(k).map(|i| (i, scores[i])).collect()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn write_result(out: &mut impl Write, format: Format, r: &ImageResult) -> Result<()> {
    match format {
        Format::Json => writeln!(out, "{}", serde_json::to_string(r)?)?,
        Format::Csv => {
            for (rank, p) in r.top_k.iter().enumerate() {
                writeln!(
                    out,
                    "{},{},{},{},{:.6}",
                    csv_field(&r.path),
                    rank + 1,
                    p.class_index,
                    csv_field(p.label),
                    p.score
                )?;
            }
        }
        Format::Table => {
            writeln!(out, "{}", crate::util::escape_controls(&r.path))?;
            for (rank, p) in r.top_k.iter().enumerate() {
                writeln!(
                    out,
                    "  {:>2}. {:>6.2}%  {:>5}  {}",
                    rank + 1,
                    p.score * 100.0,
                    p.class_index,
                    p.label
                )?;
            }
        }
    }
    Ok(())
}

pub fn run(args: ClassifyArgs) -> Result<()> {
    let paths = inputs::expand_paths(&args.paths)?;
    let mut model = args.model.load(args.dtype)?;
    let cfg = model.cfg.clone();
    let cfg = &cfg;
    if cfg.num_classes == 0 {
        anyhow::bail!("the model has no classifier head; use `beitv2 features` instead");
    }
    let labels = inputs::labels(args.labels.as_deref(), cfg.num_classes)?;
    let transform = args.pre.transform(cfg)?;
    let k = args.top_k.clamp(1, cfg.num_classes);
    let (mut sink, done) = match &args.output {
        None => (TextSink::Stdout(std::io::stdout()), Done::default()),
        Some(path) => {
            let done = match (args.resume, args.format) {
                (false, _) => Done::default(),
                (true, Format::Json) => batch::json_lines_done(path, |v| {
                    let n = v["top_k"].as_array().map_or(0, |a| a.len());
                    if n != k {
                        anyhow::bail!("{n} classes per image, not --top-k {k}");
                    }
                    Ok(())
                })?,
                (true, Format::Csv) => batch::csv_done(path, CSV_HEADER, k)?,
                (true, Format::Table) => {
                    anyhow::bail!("--resume reads --format json or csv, not the table")
                }
            };
            (TextSink::file(path, done.len)?, done)
        }
    };
    let todo = match &args.output {
        Some(path) => batch::remaining(&paths, &done, path),
        None => paths.iter().collect(),
    };
    super::pack_f32_for_run(&mut model, args.dtype, paths.len())?;
    if matches!(args.format, Format::Csv) && done.len == 0 {
        sink.write(&format!("{CSV_HEADER}\n"))?;
    }
    let pb = progress(todo.len(), "classifying");
    let mut failures = Vec::new();
    for chunk in todo.chunks(args.pre.batch_size) {
        let chunk: Vec<PathBuf> = chunk.iter().map(|p| (*p).clone()).collect();
        let mut ok_paths = Vec::new();
        let mut items = Vec::new();
        for (p, r) in chunk.iter().zip(load_batch(&chunk, &transform)) {
            match r {
                Ok(v) => {
                    ok_paths.push(p);
                    items.push(v);
                }
                Err(e) => {
                    pb.suspend(|| tracing::error!("{e:#}"));
                    failures.push((p.clone(), e));
                }
            }
        }
        if !items.is_empty() {
            let x = stack_batch(items, cfg)?;
            let probs = model.predict_proba(&x)?.to_vec2::<f32>()?;
            let mut text = Vec::new();
            for (p, row) in ok_paths.iter().zip(&probs) {
                let r = ImageResult {
                    path: batch::key(p),
                    top_k: top_k(row, k)
                        .into_iter()
                        .map(|(i, s)| Prediction {
                            class_index: i,
                            label: &labels[i],
                            score: s,
                        })
                        .collect(),
                };
                write_result(&mut text, args.format, &r)?;
            }
            pb.suspend(|| sink.write(&String::from_utf8_lossy(&text)))?;
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    finish_batch(&failures, todo.len(), args.failures.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_and_stable() {
        let s = [0.1, 0.4, 0.4, 0.05, 0.05];
        assert_eq!(top_k(&s, 3), vec![(1, 0.4), (2, 0.4), (0, 0.1)]);
        assert_eq!(top_k(&s, 10).len(), 5);
    }

    #[test]
    fn csv_quotes_commas() {
        assert_eq!(csv_field("tabby, tabby cat"), "\"tabby, tabby cat\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
