//! `beitv2 bench`: forward-pass throughput and peak memory with random weights.
//! `tools/bench_timm.py` is the PyTorch counterpart (same options, same output).

use crate::checkpoint::build_model;
use crate::model::{BeitConfig, expected_weights};
use anyhow::Result;
use candle_core::{Device, Tensor};
use clap::Args;
use std::collections::HashMap;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value = "beitv2_base_patch16_224")]
    pub arch: String,
    /// Batch sizes to measure (e.g. --batch-size 1 8 32).
    #[arg(long, num_args = 1.., default_values_t = [1usize, 8])]
    pub batch_size: Vec<usize>,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// One JSON object per batch size instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn random_weights(cfg: &BeitConfig) -> Result<HashMap<String, Tensor>> {
    expected_weights(cfg)?
        .into_iter()
        .map(|(name, shape)| Ok((name, Tensor::randn(0f32, 0.02, shape, &Device::Cpu)?)))
        .collect()
}

pub fn run(args: BenchArgs) -> Result<()> {
    let cfg = BeitConfig::preset(&args.arch)?;
    let model = build_model(&cfg, random_weights(&cfg)?)?;
    let [h, w] = cfg.img_size;
    if !args.json {
        println!("system  arch                      batch  images/s  median s/batch  peak RSS MiB");
    }
    for &b in &args.batch_size {
        let x = Tensor::randn(0f32, 1.0, (b, cfg.in_chans, h, w), &Device::Cpu)?;
        for _ in 0..args.warmup {
            model.forward(&x)?;
        }
        let mut times = Vec::with_capacity(args.iters);
        for _ in 0..args.iters.max(1) {
            let t = Instant::now();
            model.forward(&x)?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let ips = b as f64 / median;
        let rss = peak_rss_mb().unwrap_or(f64::NAN);
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "system": "beitv2", "arch": args.arch, "batch_size": b,
                    "images_per_s": ips, "median_s": median, "peak_rss_mb": rss,
                })
            );
        } else {
            println!(
                "beitv2  {:<24}  {:>5}  {:>8.2}  {:>14.3}  {:>12.0}",
                args.arch, b, ips, median, rss
            );
        }
    }
    Ok(())
}
