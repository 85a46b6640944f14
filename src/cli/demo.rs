//! `beitv2 demo`: the whole BEiT v2 pipeline on Fashion-MNIST, offline.
//!
//! 1. **teacher**: a small BEiT trained on scikit-learn's digits (it never
//!    sees a Fashion-MNIST label);
//! 2. **tokenizer**: VQ-KD distilled from the teacher on Fashion-MNIST
//!    train images, no labels;
//! 3. **pretrain**: masked image modeling on the same images, no labels;
//! 4. **fine-tuning** with a fraction of the labels, from the pretrained
//!    backbone and from scratch with the same budget, and **linear probes**
//!    on the pretrained, the untrained and the teacher's features.
//!
//! Every stage calls the same library code as its subcommand, with the
//! shipped recipes (written to `OUT/recipes/`) and overrides per profile.
//! A finished stage leaves `stage.json` and is skipped on a re-run; an
//! interrupted one resumes from its checkpoints. `report.md`/`report.json`
//! gather the results; figures are PNG files beside them.

use super::train::{run_finetune, run_linprobe};
use crate::checkpoint::{LoadOptions, save_safetensors};
use crate::data::EvalTransform;
use crate::data::dataset::{Dataset, Split};
use crate::model::BeitConfig;
use crate::model::vqkd::{CodeUsage, Vqkd};
use crate::train::charts::{Chart, Series, save_png};
use crate::train::pretrain::{PretrainRecipe, pretrain};
use crate::train::recipe::Recipe;
use crate::train::tokenizer::{TokenizerRecipe, train_tokenizer};
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// A few steps per stage on whatever data is given (tests).
    Smoke,
    /// The default: every stage shortened to fit about 10 minutes on 2 cores.
    Quick,
    /// Longer schedules: 30 epochs with 100% of the labels (about two hours on 2 cores).
    Full,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder with Fashion-MNIST's IDX files (default: Debian's
    /// dataset-fashion-mnist, /usr/share/datasets/fashion-mnist).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// scikit-learn's digits.csv.gz (default: Debian's python3-sklearn).
    #[arg(long, value_name = "FILE")]
    pub digits: Option<PathBuf>,
    /// Output folder.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Longer schedules: 30 epochs with 100% of the labels (about two hours on 2 cores).
    #[arg(long)]
    pub full: bool,
    /// Stage sizes (`--full` is `--profile full`).
    #[arg(long, value_enum, default_value_t = Profile::Quick, hide = true)]
    pub profile: Profile,
    /// Start over: remove the output folder first.
    #[arg(long)]
    pub fresh: bool,
    /// Do not install missing Debian data packages (root only) before running.
    #[arg(long)]
    pub no_install: bool,
}

/// Whether this process runs as root (`Uid:` in /proc/self/status).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Installs Debian's data packages with apt-get (the demo's documented set-up
/// step), when they are missing from their default paths.
fn install_packages(packages: &[&str]) -> Result<()> {
    eprintln!("installing Debian's {} (apt-get)", packages.join(" and "));
    let run = |args: &[&str]| -> Result<()> {
        let st = std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get")?;
        if !st.success() {
            bail!("apt-get {} failed ({st})", args.join(" "));
        }
        Ok(())
    };
    run(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq"];
    args.extend_from_slice(packages);
    run(&args)
}

const RECIPES: &[(&str, &str)] = &[
    (
        "fashion-mnist-beit-tiny.json",
        include_str!("../../recipes/fashion-mnist-beit-tiny.json"),
    ),
    (
        "digits-teacher.toml",
        include_str!("../../recipes/digits-teacher.toml"),
    ),
    (
        "fashion-mnist-tokenizer.toml",
        include_str!("../../recipes/fashion-mnist-tokenizer.toml"),
    ),
    (
        "fashion-mnist-pretrain.toml",
        include_str!("../../recipes/fashion-mnist-pretrain.toml"),
    ),
    (
        "fashion-mnist.toml",
        include_str!("../../recipes/fashion-mnist.toml"),
    ),
];

/// Per-profile sizes of every stage.
struct Sizes {
    teacher_epochs: usize,
    /// Digits used to train the teacher (0 = all 1,500).
    teacher_limit: usize,
    tokenizer_limit: usize,
    tokenizer_epochs: usize,
    pretrain_limit: usize,
    pretrain_epochs: usize,
    /// (label fraction in percent, fine-tuning epochs, warmup epochs, step
    /// budget or 0, evaluation every N epochs).
    finetune: &'static [(usize, usize, usize, usize, usize)],
    probe_percent: usize,
    probe_epochs: usize,
    batch_size: usize,
}

impl Sizes {
    fn of(p: Profile) -> Self {
        match p {
            Profile::Smoke => Sizes {
                teacher_epochs: 1,
                teacher_limit: 160,
                tokenizer_limit: 0,
                tokenizer_epochs: 1,
                pretrain_limit: 0,
                pretrain_epochs: 1,
                finetune: &[(10, 1, 0, 0, 1), (100, 1, 0, 3, 1)],
                probe_percent: 100,
                probe_epochs: 1,
                batch_size: 16,
            },
            Profile::Quick => Sizes {
                teacher_epochs: 10,
                teacher_limit: 0,
                tokenizer_limit: 20_000,
                tokenizer_epochs: 1,
                pretrain_limit: 15_000,
                pretrain_epochs: 3,
                finetune: &[(1, 5, 1, 0, 1), (10, 2, 0, 0, 1), (100, 1, 0, 150, 1)],
                probe_percent: 10,
                probe_epochs: 2,
                batch_size: 128,
            },
            // 30 epochs with all labels: `recipes/fashion-mnist.toml` from
            // scratch for 20 epochs (1 of warmup) reached 89.85% (README,
            // `--full`). With 5 steps an epoch, 1% of the labels warms up
            // for 10 epochs (50 steps). Evaluating the 10,000 test images
            // costs more than an epoch of 600 or 6,000 training images, so the
            // small runs evaluate every 10 / 5 epochs (and after the last).
            Profile::Full => Sizes {
                teacher_epochs: 40,
                teacher_limit: 0,
                tokenizer_limit: 0,
                tokenizer_epochs: 2,
                pretrain_limit: 0,
                pretrain_epochs: 10,
                finetune: &[(1, 50, 10, 0, 10), (10, 30, 3, 0, 5), (100, 30, 2, 0, 3)],
                probe_percent: 100,
                probe_epochs: 5,
                batch_size: 128,
            },
        }
    }
}

/// Where the data lives; a clear error naming the package and the flags
/// when it is not there.
fn has_fashion_mnist(dir: &Path) -> bool {
    ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"]
        .iter()
        .all(|f| dir.join(f).exists() || dir.join(format!("{f}.gz")).exists())
}

fn check_data(fm: &Path, digits: &Path) -> Result<()> {
    if !has_fashion_mnist(fm) {
        bail!(
            "Fashion-MNIST is not in {}: install Debian's package (`apt-get install \
             dataset-fashion-mnist`) or pass --data DIR with train-images-idx3-ubyte, \
             train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte \
             (each raw or .gz)",
            fm.display()
        );
    }
    if !digits.exists() {
        bail!(
            "scikit-learn's digits are not at {}: install Debian's python3-sklearn \
             (`apt-get install python3-sklearn`) or pass --digits FILE (digits.csv.gz)",
            digits.display()
        );
    }
    Ok(())
}

/// Runs `f` as stage `name` unless its `stage.json` exists; records the wall
/// time and `f`'s summary there. A failure names the stage.
fn stage(out: &Path, name: &str, f: impl FnOnce(&Path) -> Result<Value>) -> Result<Value> {
    let dir = out.join(name);
    let done = dir.join("stage.json");
    if let Ok(text) = std::fs::read_to_string(&done)
        && let Ok(v) = serde_json::from_str::<Value>(&text)
    {
        eprintln!("[{name}] done earlier: skipped");
        return Ok(v);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    eprintln!("[{name}] running");
    let t0 = Instant::now();
    let mut v = f(&dir).with_context(|| {
        format!(
            "demo stage '{name}' failed (earlier stages are kept in {})",
            out.display()
        )
    })?;
    // A stage resumed by a later demo run: its training time so far, from
    // the metrics (cumulative over resumes), counts as well.
    let trained = records(&dir, "train")
        .ok()
        .and_then(|r| r.last()?["elapsed_s"].as_f64())
        .unwrap_or(0.0);
    let wall = t0.elapsed().as_secs_f64().max(trained);
    if let Some(o) = v.as_object_mut() {
        o.insert("wall_s".into(), json!(wall));
        o.insert("stage".into(), json!(name));
    }
    crate::util::write_atomic(&done, serde_json::to_string_pretty(&v)?.as_bytes())?;
    eprintln!("[{name}] {:.0} s: {}", wall, one_line(&v));
    Ok(v)
}

fn one_line(v: &Value) -> String {
    let keys = [
        "top1",
        "used_codes",
        "perplexity",
        "mim_acc_main",
        "mim_acc_agg",
        "images_per_s",
    ];
    keys.iter()
        .filter_map(|k| Some(format!("{k} {:.2}", v.get(*k)?.as_f64()?)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Records of kind `kind` in a run's `metrics.jsonl`.
fn records(dir: &Path, kind: &str) -> Result<Vec<Value>> {
    let path = dir.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == kind)
        .collect())
}

/// Training images per second of a run: steps × batch × accumulation over
/// the logged training time.
fn images_per_s(dir: &Path, batch: usize) -> Result<f64> {
    let train = records(dir, "train")?;
    let last = train.last().context("no training step was logged")?;
    let steps = last["step"].as_f64().unwrap_or(0.0);
    let secs = last["elapsed_s"].as_f64().unwrap_or(f64::NAN);
    Ok(steps * batch as f64 / secs)
}

/// The final test top-1 of a fine-tuning or probing run: this call's last
/// evaluation, or, when the run had already finished (killed after its last
/// checkpoint, before the demo recorded the stage), the last one it logged.
fn final_top1(dir: &Path, ran: Option<crate::train::engine::EvalResult>) -> Result<f64> {
    if let Some(r) = ran {
        return Ok(r.top1);
    }
    records(dir, "val")?
        .last()
        .and_then(|r| r["top1"].as_f64())
        .with_context(|| {
            format!(
                "{} holds no evaluation",
                dir.join("metrics.jsonl").display()
            )
        })
}

/// Mean of `key` over the last `n` training records.
fn tail_mean(dir: &Path, key: &str, n: usize) -> Result<f64> {
    let train = records(dir, "train")?;
    let tail: Vec<f64> = train
        .iter()
        .rev()
        .take(n)
        .filter_map(|r| r[key].as_f64())
        .collect();
    Ok(tail.iter().sum::<f64>() / tail.len().max(1) as f64)
}

fn load_recipe(path: &Path, sets: &[String]) -> Result<Recipe> {
    Recipe::load(Some(path), sets)
}

fn q(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

pub fn run(args: DemoArgs) -> Result<()> {
    let profile = if args.full {
        Profile::Full
    } else {
        args.profile
    };
    let sz = Sizes::of(profile);
    let fm_dir = args
        .data
        .clone()
        .unwrap_or_else(Dataset::default_fashion_mnist_dir);
    let digits = args
        .digits
        .clone()
        .unwrap_or_else(Dataset::default_sklearn_digits_path);
    let mut missing = Vec::new();
    if args.data.is_none() && !has_fashion_mnist(&fm_dir) {
        missing.push("dataset-fashion-mnist");
    }
    if args.digits.is_none() && !digits.exists() {
        missing.push("python3-sklearn");
    }
    if !missing.is_empty()
        && !args.no_install
        && is_root()
        && let Err(e) = install_packages(&missing)
    {
        // The check below says what is missing and how else to provide it.
        eprintln!("could not install the data packages: {e:#}");
    }
    check_data(&fm_dir, &digits)?;
    let out = args.out.clone();
    let _lock = crate::util::OutputLock::acquire(&out)?;
    if args.fresh {
        // Everything but the lock file, which must stay the one this run holds.
        for e in std::fs::read_dir(&out)?.filter_map(|e| e.ok()) {
            let p = e.path();
            if e.file_name() == crate::util::OutputLock::FILE {
                continue;
            }
            let removed = match e.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
                _ => std::fs::remove_file(&p),
            };
            removed.with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    let recipes = out.join("recipes");
    std::fs::create_dir_all(&recipes)?;
    for (name, text) in RECIPES {
        crate::util::write_atomic(&recipes.join(name), text.as_bytes())?;
    }
    let fm = |split: &str| format!("\"fashion-mnist:{split}:{}\"", fm_dir.display());
    let dg = |split: &str| format!("\"sklearn-digits:{split}:{}\"", digits.display());
    let n_train = Dataset::fashion_mnist(&fm_dir, Split::Train)?.len();
    let bs = sz.batch_size;
    let common = |dir: &Path| {
        vec![
            format!("run.output={}", q(dir)),
            format!("data.batch_size={bs}"),
        ]
    };
    let t_all = Instant::now();

    let teacher = stage(&out, "teacher", |dir| {
        let mut sets = common(dir);
        sets.extend([
            format!("data.train={}", dg("train")),
            format!("data.val={}", dg("test")),
            format!("data.batch_size={}", bs.min(50)),
            format!("data.limit={}", sz.teacher_limit),
            format!("schedule.epochs={}", sz.teacher_epochs),
            format!("schedule.warmup_epochs={}", (sz.teacher_epochs / 5).min(2)),
        ]);
        let r = run_finetune(
            &load_recipe(&recipes.join("digits-teacher.toml"), &sets)?,
            true,
        )?
        .context("the teacher was not evaluated")?;
        Ok(
            json!({"top1": r.top1, "images_per_s": images_per_s(dir, bs.min(50))?,
                  "data": "sklearn-digits (1,500 train / 297 test)"}),
        )
    })?;
    let teacher_w = out.join("teacher/model-best.safetensors");

    let tokenizer = stage(&out, "tokenizer", |dir| {
        let mut sets = common(dir);
        sets.extend([
            format!("teacher.weights={}", q(&teacher_w)),
            format!("data.train={}", fm("train")),
            format!("data.limit={}", sz.tokenizer_limit),
            format!("schedule.epochs={}", sz.tokenizer_epochs),
        ]);
        let r = TokenizerRecipe::load(Some(&recipes.join("fashion-mnist-tokenizer.toml")), &sets)?;
        train_tokenizer(&r, true)?;
        let last = records(dir, "epoch")?.pop().context("no epoch record")?;
        Ok(
            json!({"used_codes": last["used_codes"], "perplexity": last["perplexity"],
                  "n_codes": last["used_codes"].as_u64().unwrap_or(0) + last["unused_codes"].as_u64().unwrap_or(0),
                  "images_per_s": images_per_s(dir, bs)?}),
        )
    })?;
    let tokenizer_w = out.join("tokenizer/tokenizer-last.safetensors");

    let pre = stage(&out, "pretrain", |dir| {
        let mut sets = common(dir);
        sets.extend([
            format!("tokenizer.weights={}", q(&tokenizer_w)),
            format!("data.train={}", fm("train")),
            format!("data.limit={}", sz.pretrain_limit),
            format!("schedule.epochs={}", sz.pretrain_epochs),
            format!(
                "schedule.warmup_epochs={}",
                sz.pretrain_epochs.div_ceil(10).min(sz.pretrain_epochs - 1)
            ),
        ]);
        let r = PretrainRecipe::load(Some(&recipes.join("fashion-mnist-pretrain.toml")), &sets)?;
        pretrain(&r, true)?;
        let epoch = records(dir, "epoch")?.pop().context("no epoch record")?;
        Ok(json!({"mim_acc_main": tail_mean(dir, "mim_acc_main", 20)?,
                  "mim_acc_agg": tail_mean(dir, "mim_acc_agg", 20)?,
                  "target_used_codes": epoch["target_used_codes"],
                  "target_perplexity": epoch["target_perplexity"],
                  "images_per_s": images_per_s(dir, bs)?}))
    })?;
    let pre_w = out.join("pretrain/pretrain-last.safetensors");

    // The untrained backbone of the same architecture: the "scratch" probe.
    let tiny = BeitConfig::from_file(&recipes.join("fashion-mnist-beit-tiny.json"))?;
    let scratch_w = out.join("scratch-init.safetensors");
    if !scratch_w.exists() {
        let mut cfg = tiny.clone();
        cfg.num_classes = 0;
        save_safetensors(
            &scratch_w,
            &crate::train::tasks::init_weights(&cfg, 0)?,
            &cfg,
        )?;
    }

    let mut rows = Vec::new();
    let limit = |pct: usize| ((n_train * pct).div_ceil(100)).max(bs);
    for &(pct, epochs, warmup, max_steps, eval_every) in sz.finetune {
        for (init, weights) in [("pretrained", Some(&pre_w)), ("scratch", None)] {
            let name = format!("finetune-{init}-{pct}pct");
            let v = stage(&out, &name, |dir| {
                let mut sets = common(dir);
                sets.extend([
                    format!("data.train={}", fm("train")),
                    format!("data.val={}", fm("test")),
                    format!("data.limit={}", limit(pct)),
                    format!("schedule.epochs={epochs}"),
                    format!("schedule.warmup_epochs={warmup}"),
                    format!("schedule.max_steps={max_steps}"),
                    format!("schedule.eval_every={eval_every}"),
                ]);
                if let Some(w) = weights {
                    sets.push(format!("model.weights={}", q(w)));
                }
                let r = run_finetune(
                    &load_recipe(&recipes.join("fashion-mnist.toml"), &sets)?,
                    true,
                )?;
                Ok(
                    json!({"top1": final_top1(dir, r)?, "labels": limit(pct), "epochs": epochs,
                          "images_per_s": images_per_s(dir, bs)?}),
                )
            })?;
            rows.push(
                json!({"what": format!("fine-tune, {pct}% labels"), "init": init, "result": v}),
            );
        }
    }
    let probe_limit = limit(sz.probe_percent);
    for (init, weights) in [
        ("pretrained", &pre_w),
        ("scratch", &scratch_w),
        ("teacher", &teacher_w),
    ] {
        let name = format!("linprobe-{init}");
        let v = stage(&out, &name, |dir| {
            let mut sets = common(dir);
            sets.extend([
                format!("data.train={}", fm("train")),
                format!("data.val={}", fm("test")),
                format!("data.limit={probe_limit}"),
                format!("schedule.epochs={}", sz.probe_epochs),
                "schedule.warmup_epochs=0".to_string(),
                "optim.lr=1e-2".to_string(),
                "optim.weight_decay=1e-4".to_string(),
                "model.drop_path_rate=0.0".to_string(),
            ]);
            // Every file here carries its config (a pretraining file the backbone's).
            let r = run_linprobe(
                &load_recipe(&recipes.join("fashion-mnist.toml"), &sets)?,
                weights,
                &LoadOptions::default(),
                -1,
                true,
            )?;
            Ok(
                json!({"top1": final_top1(dir, r)?, "labels": probe_limit, "epochs": sz.probe_epochs,
                      "images_per_s": images_per_s(dir, bs)?}),
            )
        })?;
        rows.push(json!({"what": format!("linear probe, {}% labels", sz.probe_percent), "init": init, "result": v}));
    }

    // Optimiser steps of every fine-tuning and probe, from its metrics log.
    for row in &mut rows {
        let stage = row["result"]["stage"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let steps = records(&out.join(&stage), "train")?.len();
        row["result"]["steps"] = json!(steps);
    }
    let tok = crate::checkpoint::load_vqkd(&tokenizer_w, None)?;
    let usage = figures(&out, &tok, &fm_dir)?;
    // Every stage's own time, also when earlier runs did some of them.
    let wall_total: f64 = [&teacher, &tokenizer, &pre]
        .into_iter()
        .chain(rows.iter().map(|r| &r["result"]))
        .filter_map(|v| v["wall_s"].as_f64())
        .sum();
    let report = json!({
        "profile": format!("{profile:?}").to_lowercase(),
        "wall_s_total": wall_total,
        "wall_s_this_run": t_all.elapsed().as_secs_f64(),
        "teacher": teacher, "tokenizer": tokenizer, "pretrain": pre,
        "test_codebook_usage": usage, "results": rows,
    });
    crate::util::write_atomic(
        &out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    let md = report_md(&report);
    crate::util::write_atomic(&out.join("report.md"), md.as_bytes())?;
    println!("{md}");
    eprintln!("report: {}", out.join("report.md").display());
    Ok(())
}

/// Codebook usage over the test set (plot, sorted counts) and a grid of test
/// images beside their token maps. Returns the usage summary.
fn figures(out: &Path, tok: &Vqkd, fm_dir: &Path) -> Result<Value> {
    let test = Dataset::fashion_mnist(fm_dir, Split::Test)?;
    let s = tok.cfg.img_size;
    let t = EvalTransform::from_crop_pct((s, s), 1.0, [0.0; 3], [1.0; 3]);
    let n = test.len().min(2000);
    let mut counts = vec![0u64; tok.cfg.n_codes];
    let mut grids: Vec<(crate::data::RgbImage, Vec<u32>)> = Vec::new();
    for start in (0..n).step_by(250) {
        let idx: Vec<usize> = (start..(start + 250).min(n)).collect();
        let mut data = Vec::new();
        let mut imgs = Vec::new();
        for &i in &idx {
            let img = test.load_rgb(i)?;
            data.extend(t.preprocess(&img)?);
            imgs.push(img);
        }
        let x = Tensor::from_vec(data, (idx.len(), 3, s, s), &Device::Cpu)?;
        let ids = tok.tokens(&Vqkd::preprocess(&x)?)?;
        let g = tok.cfg.grid();
        let flat = ids.flatten_all()?.to_vec1::<u32>()?;
        for &id in &flat {
            counts[id as usize] += 1;
        }
        for (k, img) in imgs.into_iter().enumerate() {
            if grids.len() < 8 {
                grids.push((img, flat[k * g * g..(k + 1) * g * g].to_vec()));
            }
        }
    }
    let usage = CodeUsage {
        counts: counts.clone(),
    };
    let mut sorted = counts;
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    save_png(
        &Chart {
            title: format!("codebook usage on {n} test images (codes by frequency)"),
            x_label: "code rank".into(),
            y_label: "patches".into(),
            series: vec![Series::new(
                "patches per code",
                sorted
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| (i as f64, c as f64))
                    .collect(),
            )],
            log_y: true,
        },
        &out.join("codebook-usage.png"),
    )?;
    token_grid(&grids, tok.cfg.grid(), &out.join("token-maps.png"))?;
    Ok(
        json!({"images": n, "used_codes": tok.cfg.n_codes - usage.unused(),
              "perplexity": usage.perplexity(), "n_codes": tok.cfg.n_codes}),
    )
}

/// A stable colour per token id (golden-ratio hues).
fn id_colour(id: u32) -> [u8; 3] {
    let h = (f64::from(id) * 0.618_033_988_75).fract() * 6.0;
    let (s, v) = (0.65, 0.95);
    let c = v * s;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [r, g, b].map(|u| ((u + m) * 255.0).round() as u8)
}

/// Rows of (image ×8, its token map with one colour per id).
fn token_grid(items: &[(crate::data::RgbImage, Vec<u32>)], g: usize, path: &Path) -> Result<()> {
    let cell = 224u32;
    let gap = 8u32;
    let rows = items.len() as u32;
    let (w, h) = (2 * cell + 3 * gap, rows * (cell + gap) + gap);
    let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    for (r, (src, ids)) in items.iter().enumerate() {
        let y0 = gap + r as u32 * (cell + gap);
        for y in 0..cell {
            for x in 0..cell {
                let sx = (x as usize * src.width) / cell as usize;
                let sy = (y as usize * src.height) / cell as usize;
                let p = &src.data[(sy * src.width + sx) * 3..][..3];
                img.put_pixel(gap + x, y0 + y, image::Rgb([p[0], p[1], p[2]]));
                let (cx, cy) = (
                    x as usize * g / cell as usize,
                    y as usize * g / cell as usize,
                );
                img.put_pixel(
                    2 * gap + cell + x,
                    y0 + y,
                    image::Rgb(id_colour(ids[cy * g + cx])),
                );
            }
        }
    }
    crate::train::charts::write_png(&img, path)
}

fn f(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_f64)
        .map_or("–".into(), |x| format!("{x:.2}"))
}

/// The report as Markdown: the results table and the per-stage figures.
fn report_md(r: &Value) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "# BEiT v2 on Fashion-MNIST (profile `{}`, {:.1} min)\n\n",
        r["profile"].as_str().unwrap_or("?"),
        r["wall_s_total"].as_f64().unwrap_or(0.0) / 60.0
    ));
    s.push_str(
        "| evaluation | pretrained (MIM) | scratch | teacher (digits) |\n|---|---|---|---|\n",
    );
    let mut by_what: Vec<(String, [String; 3])> = Vec::new();
    for row in r["results"].as_array().into_iter().flatten() {
        let what = row["what"].as_str().unwrap_or("").to_string();
        let col = match row["init"].as_str() {
            Some("pretrained") => 0,
            Some("scratch") => 1,
            _ => 2,
        };
        let pos = match by_what.iter().position(|(w, _)| *w == what) {
            Some(p) => p,
            None => {
                by_what.push((what, ["–".into(), "–".into(), "–".into()]));
                by_what.len() - 1
            }
        };
        by_what[pos].1[col] = format!("{}%", f(&row["result"], "top1"));
    }
    for (what, cols) in &by_what {
        s.push_str(&format!(
            "| test top-1, {what} | {} | {} | {} |\n",
            cols[0], cols[1], cols[2]
        ));
    }
    // Plain words on what pretraining wins and loses.
    let pct = |c: &str| c.trim_end_matches('%').parse::<f64>().ok();
    s.push('\n');
    for (what, cols) in &by_what {
        let (p, sc, te) = (pct(&cols[0]), pct(&cols[1]), pct(&cols[2]));
        if let (Some(p), Some(sc)) = (p, sc) {
            let verdict = if p > sc { "wins" } else { "loses" };
            s.push_str(&format!(
                "- {what}: pretraining {verdict} against scratch ({:+.2} points)",
                p - sc
            ));
            if let Some(te) = te {
                let v = if p > te { "beats" } else { "trails" };
                s.push_str(&format!(" and {v} the teacher's features ({:+.2})", p - te));
            }
            s.push_str(".\n");
        }
    }
    let (t, k, p, u) = (
        &r["teacher"],
        &r["tokenizer"],
        &r["pretrain"],
        &r["test_codebook_usage"],
    );
    s.push_str(&format!(
        "\n| stage | result | images/s | wall time |\n|---|---|---|---|\n\
         | teacher (digits) | top-1 {}% on 297 held-out digits | {} | {} s |\n\
         | tokenizer | {} of {} codes used, perplexity {} (test set: {} used, perplexity {}) | {} | {} s |\n\
         | MIM pretraining | MIM accuracy {}% (last block), {}% (aggregation); targets use {} codes, perplexity {} | {} | {} s |\n",
        f(t, "top1"), f(t, "images_per_s"), f(t, "wall_s"),
        k["used_codes"], k["n_codes"], f(k, "perplexity"), u["used_codes"], f(u, "perplexity"),
        f(k, "images_per_s"), f(k, "wall_s"),
        f(p, "mim_acc_main"), f(p, "mim_acc_agg"), p["target_used_codes"], f(p, "target_perplexity"),
        f(p, "images_per_s"), f(p, "wall_s"),
    ));
    for row in r["results"].as_array().into_iter().flatten() {
        let v = &row["result"];
        s.push_str(&format!(
            "| {} ({}) | top-1 {}% ({} labels, {} steps) | {} | {} s |\n",
            row["what"].as_str().unwrap_or(""),
            row["init"].as_str().unwrap_or(""),
            f(v, "top1"),
            v["labels"],
            v["steps"],
            f(v, "images_per_s"),
            f(v, "wall_s")
        ));
    }
    s.push_str(
        "\nFigures: `*/curves.png` (loss and accuracy per stage), `codebook-usage.png`, \
         `token-maps.png` (test images beside their token maps, one colour per code).\n",
    );
    s
}
