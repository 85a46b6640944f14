//! `beitv2 bench`: forward-pass throughput and peak memory with random weights
//! (with `--profile`, time per operation; with `--dtype`, agreement with fp32),
//! preprocessing throughput (`--preprocess`) and the training step
//! (`--train-step`). `tools/bench_timm.py` and `tools/bench_torch_extra.py`
//! are the PyTorch / Pillow counterparts (same options, same output).

use crate::checkpoint::build_model;
use crate::data::{
    EvalTransform, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, center_crop, load_rgb,
};
use crate::kernels::{self, Precision, profile};
use crate::model::{Beit, BeitConfig, expected_weights};
use crate::train::engine::Task;
use crate::train::loss::{smoothed_targets, soft_target_cross_entropy};
use crate::train::optim::{AdamW, OptimConfig};
use crate::train::tasks::{Finetune, init_weights};
use anyhow::Result;
use candle_core::{Device, Tensor};
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A named architecture, or a model config JSON file (e.g.
    /// recipes/fashion-mnist-beit-tiny.json).
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
    /// Run --dtype bf16/int8 on the fallback that CPUs without AMX or
    /// AVX-512 VNNI/BF16 get (fp32 GEMM on the rounded values), even where
    /// those are present.
    #[arg(long)]
    pub no_amx: bool,
    /// Cap the hand-written kernels at this ISA level (as BEITV2_ISA does),
    /// to measure a lower level's paths on this machine. A level the CPU
    /// lacks is refused.
    #[arg(long, value_enum)]
    pub isa: Option<kernels::isa::Isa>,
    /// Also time every operation kind over the timed passes and print the breakdown.
    #[arg(long)]
    pub profile: bool,
    /// With a reduced --dtype: random images on which top-1 and logits are
    /// compared with the fp32 model (0 skips the comparison).
    #[arg(long, default_value_t = 32)]
    pub agreement_images: usize,
    /// Measure decode + resize + crop + normalise of these images instead of the model.
    #[arg(long, num_args = 1.., value_name = "IMAGE")]
    pub preprocess: Vec<PathBuf>,
    /// Passes over the --preprocess images.
    #[arg(long, default_value_t = 20)]
    pub repeat: usize,
    /// Threads for --preprocess (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Crop fraction of the --preprocess eval transform (224 px crop).
    #[arg(long, default_value_t = 0.9)]
    pub crop_pct: f64,
    /// Measure forward + loss + backward + AdamW step instead of inference.
    #[arg(long, conflicts_with = "preprocess")]
    pub train_step: bool,
    /// Measure one MIM pretraining step: tokenizer forward (targets) +
    /// student forward and backward + clipping + AdamW.
    #[arg(long, conflicts_with_all = ["preprocess", "train_step"])]
    pub pretrain_step: bool,
    /// Time the linear-layer kernels alone on the model's four linear shapes
    /// (qkv, proj, fc1, fc2) at batch × tokens rows: GFLOP/s of each kernel
    /// this CPU can run, the weights cycling through `depth` copies as in a
    /// forward pass.
    #[arg(long, conflicts_with_all = ["preprocess", "train_step", "pretrain_step"])]
    pub gemm: bool,
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The median of each timed phase over the passes after `warmup`.
fn phase_medians<const N: usize>(phases: &[[f64; N]], warmup: usize) -> [f64; N] {
    let timed = &phases[warmup.min(phases.len() - 1)..];
    std::array::from_fn(|i| {
        let mut v: Vec<f64> = timed.iter().map(|p| p[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    })
}

fn random_weights(cfg: &BeitConfig) -> Result<HashMap<String, Tensor>> {
    random_tensors(expected_weights(cfg)?)
}

/// N(0, 0.02²) values for every (name, shape).
fn random_tensors(shapes: Vec<(String, Vec<usize>)>) -> Result<HashMap<String, Tensor>> {
    shapes
        .into_iter()
        .map(|(name, shape)| Ok((name, Tensor::randn(0f32, 0.02, shape, &Device::Cpu)?)))
        .collect()
}

/// The CPU's model name (`/proc/cpuinfo`), for the record beside each figure.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// `--arch`: a preset name, or the path of a config JSON.
fn arch_config(arch: &str) -> Result<BeitConfig> {
    let path = std::path::Path::new(arch);
    if arch.ends_with(".json") || path.is_file() {
        return BeitConfig::from_file(path);
    }
    BeitConfig::preset(arch)
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(level) = args.isa {
        kernels::isa::set_cap(Some(level)).map_err(anyhow::Error::msg)?;
    }
    eprintln!(
        "CPU: {}; kernels at ISA level {} (highest here: {})",
        cpu_model(),
        kernels::isa::active(),
        kernels::isa::detected()
    );
    if !args.preprocess.is_empty() {
        return bench_preprocess(&args);
    }
    if args.train_step {
        return bench_train_step(&args);
    }
    if args.pretrain_step {
        return bench_pretrain_step(&args);
    }
    if args.gemm {
        return bench_gemm(&args);
    }
    let cfg = arch_config(&args.arch)?;
    let weights = random_weights(&cfg)?;
    let mut model = build_model(&cfg, weights.clone())?;
    if args.no_fused && args.dtype != Precision::F32 {
        anyhow::bail!("--no-fused runs candle's fp32 ops; it cannot be combined with --dtype");
    }
    kernels::set_fused(!args.no_fused);
    if args.no_amx {
        kernels::gemm::force_kernel(Some(kernels::gemm::Kernel::Fp32Gemm));
    }
    if !args.no_fused {
        model.set_precision(args.dtype)?;
    }
    let system = match (args.dtype, args.no_fused) {
        (_, true) => "beitv2-candle".to_string(),
        (p, false) => format!(
            "beitv2-{}{}@{}",
            format!("{p:?}").to_lowercase(),
            if args.no_amx { "-noamx" } else { "" },
            kernels::isa::active()
        ),
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
    if args.dtype != Precision::F32 && args.agreement_images > 0 {
        let reference = build_model(&cfg, weights)?;
        let a = agreement(&reference, &model, args.agreement_images)?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "system": system, "arch": args.arch, "what": "agreement_with_f32",
                    "images": args.agreement_images, "top1_agreement": a.top1,
                    "max_abs_logit_diff": a.max_diff, "max_abs_logit": a.max_logit,
                })
            );
        } else {
            println!(
                "agreement with fp32 on {} random images: top-1 {:.1}%, max |logit diff| {:.3e} (max |logit| {:.3e})",
                args.agreement_images,
                100.0 * a.top1,
                a.max_diff,
                a.max_logit
            );
        }
    }
    Ok(())
}

/// How closely a reduced-precision model follows the fp32 one.
pub struct Agreement {
    /// Fraction of images with the same top-1 class.
    pub top1: f64,
    pub max_diff: f32,
    /// Largest fp32 logit magnitude, for scale.
    pub max_logit: f32,
}

/// Compares logits of `reduced` with `reference` on `n` random images
/// (normal noise, seed 0), in batches of 8.
pub fn agreement(reference: &Beit, reduced: &Beit, n: usize) -> Result<Agreement> {
    let cfg = &reference.cfg;
    let [h, w] = cfg.img_size;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (mut same, mut max_diff, mut max_logit) = (0usize, 0f32, 0f32);
    for start in (0..n).step_by(8) {
        let b = 8.min(n - start);
        let data: Vec<f32> = (0..b * cfg.in_chans * h * w)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect();
        let x = Tensor::from_vec(data, (b, cfg.in_chans, h, w), &Device::Cpu)?;
        let want = reference.forward(&x)?;
        let got = reduced.forward(&x)?;
        let top = |t: &Tensor| t.argmax(candle_core::D::Minus1)?.to_vec1::<u32>();
        same += top(&want)?
            .iter()
            .zip(top(&got)?)
            .filter(|(a, b)| **a == *b)
            .count();
        let scalar =
            |t: Tensor| -> Result<f32> { Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?) };
        max_diff = max_diff.max(scalar((&got - &want)?)?);
        max_logit = max_logit.max(scalar(want)?);
    }
    Ok(Agreement {
        top1: same as f64 / n.max(1) as f64,
        max_diff,
        max_logit,
    })
}

/// Decode + Pillow-exact resize + centre crop + normalise, per image, over a
/// pool of `--threads` threads; a single-threaded pass gives the split by stage.
fn bench_preprocess(args: &BenchArgs) -> Result<()> {
    let threads = args
        .threads
        .unwrap_or_else(rayon::current_num_threads)
        .max(1);
    let t = EvalTransform::from_crop_pct(
        (224, 224),
        args.crop_pct,
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
    );
    let one = |path: &PathBuf| -> Result<Vec<f32>> { t.preprocess(&load_rgb(path)?) };
    for p in &args.preprocess {
        one(p)?; // warm the page cache; fail early on a bad file
    }
    let (mut decode, mut resize, mut crop_norm) = (0f64, 0f64, 0f64);
    for _ in 0..args.repeat {
        for p in &args.preprocess {
            let t0 = Instant::now();
            let img = load_rgb(p)?;
            let t1 = Instant::now();
            let resized = t.resize_short_side(&img);
            let t2 = Instant::now();
            let data = t.to_tensor_data(&center_crop(&resized, t.crop.0, t.crop.1));
            std::hint::black_box(data);
            decode += (t1 - t0).as_secs_f64();
            resize += (t2 - t1).as_secs_f64();
            crop_norm += t2.elapsed().as_secs_f64();
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let work: Vec<&PathBuf> = (0..args.repeat).flat_map(|_| &args.preprocess).collect();
    let start = Instant::now();
    pool.install(|| {
        work.par_iter()
            .try_for_each(|p| one(p).map(std::hint::black_box).map(|_| ()))
    })?;
    let secs = start.elapsed().as_secs_f64();
    let ips = work.len() as f64 / secs;
    let n = work.len() as f64;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "system": "beitv2", "what": "preprocess", "threads": threads,
                "images": args.preprocess.len(), "repeat": args.repeat, "images_per_s": ips,
                "decode_s": decode, "resize_s": resize, "crop_norm_s": crop_norm,
            })
        );
    } else {
        println!(
            "preprocess: {ips:.1} images/s on {threads} thread(s); one thread per image: \
             decode {:.2} ms, resize {:.2} ms, crop+normalise {:.2} ms",
            1e3 * decode / n,
            1e3 * resize / n,
            1e3 * crop_norm / n
        );
    }
    Ok(())
}

/// One optimisation step of fine-tuning: forward with drop path 0.1,
/// cross-entropy, backward, AdamW (lr 1e-3, weight decay 0.05), on random
/// images and labels.
fn bench_train_step(args: &BenchArgs) -> Result<()> {
    let mut cfg = arch_config(&args.arch)?;
    cfg.drop_path_rate = 0.1;
    let b = *args.batch_size.first().unwrap_or(&8);
    let task = Finetune::new(&cfg, init_weights(&cfg, 0)?)?;
    let optim = OptimConfig {
        lr: 1e-3,
        min_lr: 0.0,
        weight_decay: 0.05,
        betas: [0.9, 0.999],
        eps: 1e-8,
        layer_decay: 1.0,
        clip_grad: 0.0,
    };
    let lr = optim.lr;
    let mut opt = AdamW::new(task.trainable(), cfg.depth, optim)?;
    let [h, w] = cfg.img_size;
    let x = Tensor::randn(0f32, 1.0, (b, cfg.in_chans, h, w), &Device::Cpu)?;
    let labels: Vec<usize> = (0..b).map(|i| (i * 7919) % cfg.num_classes).collect();
    let targets = smoothed_targets(&labels, cfg.num_classes, 0.0)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut phases = Vec::new();
    for _ in 0..args.warmup + args.iters.max(1) {
        let t0 = Instant::now();
        let loss = soft_target_cross_entropy(&task.logits(&x, Some(&mut rng))?, &targets)?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads, lr, 1.0)?;
        let t3 = Instant::now();
        phases.push([t1 - t0, t2 - t1, t3 - t2, t3 - t0].map(|d| d.as_secs_f64()));
    }
    let [fwd, bwd, step, total] = phase_medians(&phases, args.warmup);
    let rss = peak_rss_mb().unwrap_or(f64::NAN);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "system": "beitv2", "what": "train_step", "arch": args.arch, "batch_size": b,
                "median_s": total, "images_per_s": b as f64 / total, "forward_s": fwd,
                "backward_s": bwd, "optimizer_s": step, "peak_rss_mb": rss,
            })
        );
    } else {
        println!(
            "train step {} batch {b}: {total:.3} s ({:.2} images/s): forward {fwd:.3} s, \
             backward {bwd:.3} s, AdamW {step:.3} s; peak RSS {rss:.0} MiB",
            args.arch,
            b as f64 / total
        );
    }
    Ok(())
}

/// One timed call of a `--gemm` kernel: (input rows, weight copy, output).
type GemmRun<'a> = dyn Fn(&[f32], usize, &mut [f32]) + 'a;

/// `--gemm`: each linear kernel alone on the model's shapes. Every kernel
/// sees the same `depth` weight copies in turn, so that, as in a forward
/// pass, a layer's weights are not left in cache by the previous call.
fn bench_gemm(args: &BenchArgs) -> Result<()> {
    use kernels::gemm::{Epilogue, PackedF32, PackedWeight, Quant, WeightRef, linear};
    let cfg = arch_config(&args.arch)?;
    let (c, hidden) = (cfg.embed_dim, cfg.mlp_hidden());
    let shapes = [
        ("qkv", 3 * c, c),
        ("proj", c, c),
        ("fc1", hidden, c),
        ("fc2", c, hidden),
    ];
    let copies = cfg.depth.max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut randn = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| 0.02 * rng.sample::<f32, _>(StandardNormal))
            .collect()
    };
    if !args.json {
        println!("shape  rows × out × in          kernel        GFLOP/s (best, median)");
    }
    for &b in &args.batch_size {
        let rows = b * cfg.num_tokens();
        for (name, n, k) in shapes {
            let weights: Vec<Vec<f32>> = (0..copies).map(|_| randn(n * k)).collect();
            let x = randn(rows * k);
            let bias_values = randn(n);
            let bias: &[f32] = &bias_values;
            let mut out = vec![0f32; rows * n];
            let mut kernels: Vec<(&str, Box<GemmRun>)> = Vec::new();
            kernels.push((
                "gemm-crate",
                Box::new(|x, i, out| {
                    let w = WeightRef::F32 {
                        data: &weights[i],
                        out_dim: n,
                        in_dim: k,
                        panels: None,
                    };
                    linear(x, rows, w, Some(bias), Epilogue::Store, out)
                }),
            ));
            if kernels::gemm::f32_panels_available() {
                let panels: Vec<PackedF32> =
                    weights.iter().map(|w| PackedF32::pack(w, n, k)).collect();
                kernels.push((
                    "f32-panels",
                    Box::new(move |x, i, out| {
                        panels[i].matmul(x, rows, Some(bias), Epilogue::Store, out)
                    }),
                ));
            }
            for quant in [Quant::Bf16, Quant::Int8] {
                if kernels::gemm::not_accelerated_because(quant).is_some() {
                    continue;
                }
                let packed: Vec<PackedWeight> = weights
                    .iter()
                    .map(|w| PackedWeight::pack(w, n, k, quant))
                    .collect();
                let label = if quant == Quant::Bf16 { "bf16" } else { "int8" };
                kernels.push((
                    label,
                    Box::new(move |x, i, out| {
                        packed[i].matmul(x, rows, Some(bias), Epilogue::Store, out)
                    }),
                ));
            }
            let flop = 2.0 * (rows * n * k) as f64;
            for (label, run) in &kernels {
                for i in 0..args.warmup.min(copies) {
                    run(&x, i, &mut out);
                }
                let mut rates: Vec<f64> = (0..args.iters.max(1) * copies)
                    .map(|i| {
                        let t = Instant::now();
                        run(&x, i % copies, &mut out);
                        flop / t.elapsed().as_secs_f64() / 1e9
                    })
                    .collect();
                rates.sort_by(f64::total_cmp);
                let (best, median) = (rates[rates.len() - 1], rates[rates.len() / 2]);
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "what": "gemm", "arch": args.arch, "isa": kernels::isa::active().to_string(),
                            "shape": name, "rows": rows, "out": n, "in": k, "kernel": label,
                            "best_gflops": best, "median_gflops": median,
                        })
                    );
                } else {
                    println!(
                        "{name:<5}  {:<22}  {label:<12}  {best:>6.1}, {median:>6.1}",
                        format!("{rows} × {n} × {k}")
                    );
                }
            }
        }
    }
    Ok(())
}

/// One BEiT v2 pretraining step (spec F): a random-weight VQ-KD encoder of
/// unilm's `vqkd_encoder_base_decoder_3x768x12_clip` shapes labels the
/// tokenizer view; the student (`MimConfig::preset(arch)`) runs on masked
/// images (75 of 196 patches, block-wise), both CE losses, backward,
/// clipping at 3.0 and AdamW with unilm's pretraining groups.
fn bench_pretrain_step(args: &BenchArgs) -> Result<()> {
    use crate::data::masking::MaskingGenerator;
    use crate::model::mim::MimConfig;
    use crate::model::vqkd::{Vqkd, VqkdConfig};
    use crate::train::optim::{DecayRule, grad_clip};
    use crate::train::pretrain::{MimBatch, Student, init_mim_weights, mim_loss, targets};
    let cfg = MimConfig::preset(&args.arch)?;
    let mut tcfg = VqkdConfig::preset("vqkd_encoder_base_decoder_3x768x12_clip")?;
    tcfg.decoder_depth = 0;
    let tok_weights = random_tensors(crate::model::record_weights(|vb| {
        Vqkd::new(&tcfg, vb).map(|_| ())
    })?)?;
    let tokenizer = Vqkd::new(
        &tcfg,
        candle_nn::VarBuilder::from_tensors(tok_weights, candle_core::DType::F32, &Device::Cpu),
    )?;
    let b = *args.batch_size.first().unwrap_or(&8);
    let student = Student::new(&cfg, init_mim_weights(&cfg, 0)?)?;
    let optim = OptimConfig {
        lr: 1.5e-3,
        min_lr: 1e-5,
        weight_decay: 0.05,
        betas: [0.9, 0.98],
        eps: 1e-8,
        layer_decay: 1.0,
        clip_grad: 3.0,
    };
    let mut opt = AdamW::with_rule(
        student.vars.clone(),
        cfg.backbone.depth,
        optim.clone(),
        DecayRule::Pretrain,
    )?;
    let [h, w] = cfg.backbone.img_size;
    let grid = cfg.backbone.grid();
    let masks = MaskingGenerator::beitv2(grid)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mask: Vec<f32> = (0..b)
        .flat_map(|_| masks.generate(&mut rng))
        .map(|m| if m { 1.0 } else { 0.0 })
        .collect();
    let masked = (0..mask.len())
        .filter(|&i| mask[i] > 0.5)
        .map(|i| i as u32)
        .collect();
    let batch = MimBatch {
        images: Tensor::randn(0f32, 1.0, (b, 3, h, w), &Device::Cpu)?,
        second: Tensor::rand(
            0f32,
            1.0,
            (b, 3, tcfg.img_size, tcfg.img_size),
            &Device::Cpu,
        )?,
        mask: Tensor::from_vec(mask, (b, grid.0 * grid.1), &Device::Cpu)?,
        masked,
    };
    let mut phases = Vec::new();
    for _ in 0..args.warmup + args.iters.max(1) {
        let t0 = Instant::now();
        let ids = targets(&tokenizer, &batch.second)?;
        let t1 = Instant::now();
        let l = mim_loss(&student.model, &batch, ids, Some(&mut rng))?;
        let t2 = Instant::now();
        let grads = l.loss.backward()?;
        let t3 = Instant::now();
        let clip = grad_clip(&grads, &opt.params, optim.clip_grad)?;
        opt.step(&grads, optim.lr, clip.scale)?;
        let t4 = Instant::now();
        phases.push([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0].map(|d| d.as_secs_f64()));
    }
    let [tok, fwd, bwd, step, total] = phase_medians(&phases, args.warmup);
    let rss = peak_rss_mb().unwrap_or(f64::NAN);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "system": "beitv2", "what": "pretrain_step", "arch": args.arch, "batch_size": b,
                "median_s": total, "images_per_s": b as f64 / total, "tokenizer_s": tok,
                "forward_s": fwd, "backward_s": bwd, "optimizer_s": step, "peak_rss_mb": rss,
            })
        );
    } else {
        println!(
            "pretrain step {} batch {b}: {total:.3} s ({:.2} images/s): tokenizer {tok:.3} s, \
             forward {fwd:.3} s, backward {bwd:.3} s, clip + AdamW {step:.3} s; peak RSS {rss:.0} MiB",
            args.arch,
            b as f64 / total
        );
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
