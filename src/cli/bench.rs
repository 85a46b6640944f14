//! `beitv2 bench`: forward-pass throughput and peak memory with random weights.
//! `tools/bench_timm.py` is the PyTorch counterpart (same options, same output).

use crate::checkpoint::build_model;
use crate::kernels::{self, Precision, profile};
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
    /// Precision of the blocks' linear layers.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// Run candle's composite ops instead of the fused inference kernels (fp32 only).
    #[arg(long)]
    pub no_fused: bool,
    /// Also time every operation kind over the timed passes and print the breakdown.
    #[arg(long)]
    pub profile: bool,
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
    let mut model = build_model(&cfg, random_weights(&cfg)?)?;
    if args.no_fused && args.dtype != Precision::F32 {
        anyhow::bail!("--no-fused runs candle's fp32 ops; it cannot be combined with --dtype");
    }
    kernels::set_fused(!args.no_fused);
    model.set_precision(args.dtype)?;
    let system = match (args.dtype, args.no_fused) {
        (_, true) => "beitv2-candle".to_string(),
        (p, false) => format!("beitv2-{}", format!("{p:?}").to_lowercase()),
    };
    let [h, w] = cfg.img_size;
    if !args.json {
        println!(
            "system          arch                      batch  images/s  median s/batch  peak RSS MiB"
        );
    }
    for &b in &args.batch_size {
        let x = Tensor::randn(0f32, 1.0, (b, cfg.in_chans, h, w), &Device::Cpu)?;
        for _ in 0..args.warmup {
            model.forward(&x)?;
        }
        let mut times = Vec::with_capacity(args.iters);
        profile::enable(args.profile);
        for _ in 0..args.iters.max(1) {
            let t = Instant::now();
            model.forward(&x)?;
            times.push(t.elapsed().as_secs_f64());
        }
        let ops = profile::snapshot();
        profile::enable(false);
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let ips = b as f64 / median;
        let rss = peak_rss_mb().unwrap_or(f64::NAN);
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "system": system, "arch": args.arch, "batch_size": b,
                    "images_per_s": ips, "median_s": median, "peak_rss_mb": rss,
                    "profile": profile_json(&ops, times.len()),
                })
            );
        } else {
            println!(
                "{system:<14}  {:<24}  {:>5}  {:>8.2}  {:>14.3}  {:>12.0}",
                args.arch, b, ips, median, rss
            );
            if args.profile {
                print_profile(&ops, times.iter().sum(), times.len());
            }
        }
    }
    Ok(())
}

fn profile_json(
    ops: &std::collections::BTreeMap<&'static str, profile::OpTotal>,
    passes: usize,
) -> serde_json::Value {
    ops.iter()
        .map(|(name, t)| {
            let v = serde_json::json!({
                "ms_per_pass": 1e3 * t.seconds / passes as f64,
                "calls_per_pass": t.calls as f64 / passes as f64,
                "gflop_per_s": (t.flops > 0.0).then(|| t.flops / t.seconds / 1e9),
            });
            (name.to_string(), v)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Per-operation wall time per forward pass, largest first; "(untimed)" is
/// the rest of the pass (allocation, copies between ops, pooling).
fn print_profile(
    ops: &std::collections::BTreeMap<&'static str, profile::OpTotal>,
    total_s: f64,
    passes: usize,
) {
    let mut rows: Vec<_> = ops.iter().collect();
    rows.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
    let timed: f64 = rows.iter().map(|(_, t)| t.seconds).sum();
    println!(
        "    {:<14} {:>10} {:>7} {:>8} {:>10}",
        "op", "ms/pass", "share", "calls", "GFLOP/s"
    );
    let per = |s: f64| 1e3 * s / passes as f64;
    for (name, t) in rows {
        let gflops = if t.flops > 0.0 {
            format!("{:.1}", t.flops / t.seconds / 1e9)
        } else {
            "-".into()
        };
        println!(
            "    {:<14} {:>10.2} {:>6.1}% {:>8} {:>10}",
            name,
            per(t.seconds),
            100.0 * t.seconds / total_s,
            t.calls / passes as u64,
            gflops
        );
    }
    let rest = total_s - timed;
    println!(
        "    {:<14} {:>10.2} {:>6.1}%",
        "(untimed)",
        per(rest),
        100.0 * rest / total_s
    );
}
