//! The one training loop of every training command (fine-tuning, linear
//! probing, tokenizer training, MIM pretraining), readable top to bottom in
//! [`run`]: data → forward → loss → backward → clip → AdamW → log →
//! checkpoint, with atomic checkpoints, exact resume, a JSONL metrics log and
//! PNG curves. What differs between the commands sits behind [`Objective`].
//!
//! Exact resume needs no saved RNG state: the data order comes from
//! (seed, epoch), each sample's augmentation from (seed, epoch, index), and
//! the batch-level randomness (mixup, drop path) from (seed, step).

use super::charts::{Chart, Series, save_panels};
use super::loss::{correct_top_k, smoothed_targets, soft_target_cross_entropy};
use super::optim::{AdamW, DecayRule, OptimConfig, cosine_lr, grad_clip};
use super::recipe::{Recipe, RunSection, ScheduleSection};
use crate::data::augment::{Mixup, TrainTransform};
use crate::data::dataset::Dataset;
use crate::data::loader::{Batch, Loader, LoaderConfig, SampleTransform};
use crate::data::{EvalTransform, RgbImage};
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What is being trained: logits from images, the trainable tensors by name,
/// and how to export the result as a model checkpoint.
pub trait Task {
    /// Logits (B, K); `train_rng` is given for training forwards (drop path).
    fn logits(&self, x: &Tensor, train_rng: Option<&mut ChaCha8Rng>) -> Result<Tensor>;
    /// The trainable variables, by canonical name.
    fn trainable(&self) -> Vec<(String, Var)>;
    /// Writes the trained weights: a full model checkpoint that `beitv2
    /// classify` loads (fine-tuning), or the linear head alone (probing).
    fn export(&self, path: &Path) -> Result<()>;
    /// Input (height, width).
    fn input_hw(&self) -> (usize, usize);
    fn num_classes(&self) -> usize;
    /// Model depth, for layer-wise lr decay (0 when it does not apply).
    fn depth(&self) -> usize;
}

impl SampleTransform for TrainTransform {
    fn apply(&self, img: &RgbImage, rng: &mut ChaCha8Rng) -> Result<Vec<f32>> {
        TrainTransform::apply(self, img, rng)
    }
    fn output_hw(&self) -> (usize, usize) {
        self.rrc.size
    }
}

/// Where training stands; stored in every checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub epoch: usize,
    /// Next batch to run within `epoch`.
    pub batch: usize,
    /// Optimiser steps taken.
    pub step: u64,
    /// Best end-of-epoch score so far (validation top-1).
    pub best_top1: f64,
    /// Whether a `best` export has been written.
    #[serde(default)]
    pub has_best: bool,
    /// Seconds of training so far, over every run that led here (the
    /// metrics' `elapsed_s` carries on from it after a resume).
    #[serde(default)]
    pub elapsed_s: f64,
}

/// Evaluation summary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    pub n: usize,
    pub skipped: usize,
}

/// Parses a data spec: `fashion-mnist:train|test[:DIR]`,
/// `sklearn-digits:train|test[:CSV_GZ]`, `ROOT@LIST` (a flat
/// folder plus a `name index` list, mmpretrain's `meta/val.txt` layout) or an
/// image folder with one subfolder per class.
pub fn open_dataset(spec: &str) -> Result<Dataset> {
    use crate::data::dataset::Split;
    if let Some(rest) = spec.strip_prefix("fashion-mnist:") {
        let (split, dir) = match rest.split_once(':') {
            Some((s, d)) => (s, PathBuf::from(d)),
            None => (rest, Dataset::default_fashion_mnist_dir()),
        };
        let split = match split {
            "train" => Split::Train,
            "test" => Split::Test,
            other => bail!("unknown Fashion-MNIST split '{other}' (train or test)"),
        };
        return Dataset::fashion_mnist(&dir, split);
    }
    if let Some(rest) = spec.strip_prefix("sklearn-digits:") {
        let (split, path) = match rest.split_once(':') {
            Some((s, p)) => (s, PathBuf::from(p)),
            None => (rest, Dataset::default_sklearn_digits_path()),
        };
        let split = match split {
            "train" => Split::Train,
            "test" => Split::Test,
            other => bail!("unknown digits split '{other}' (train or test)"),
        };
        return Dataset::sklearn_digits(&path, split);
    }
    if let Some((root, list)) = spec.split_once('@') {
        return Dataset::labelled_list(Path::new(root), Path::new(list), None);
    }
    Dataset::image_folder(Path::new(spec))
}

/// Runs the model over a labelled dataset: top-1, top-5 and mean loss.
pub fn evaluate(
    task: &dyn Task,
    data: Arc<Dataset>,
    t: EvalTransform,
    batch: usize,
    workers: usize,
) -> Result<EvalResult> {
    data.check_labels(task.num_classes())?;
    let loader = Loader::new(
        data,
        Arc::new(t),
        LoaderConfig {
            batch_size: batch,
            shuffle: false,
            drop_last: false,
            seed: 0,
            workers,
            prefetch: 2,
        },
    )?;
    let pb = crate::report::progress(loader.batches_per_epoch(), "evaluating");
    let (mut c1, mut c5, mut n, mut skipped, mut loss_sum) = (0usize, 0usize, 0usize, 0usize, 0f64);
    for b in loader.iter_epoch(0, 0) {
        skipped += report_failures(&b);
        if !b.labels.is_empty() {
            let x = b.images_tensor(&Device::Cpu)?;
            let logits = task.logits(&x, None)?;
            let t = smoothed_targets(&b.labels, task.num_classes(), 0.0)?;
            let l = soft_target_cross_entropy(&logits, &t)?.to_scalar::<f32>()? as f64;
            let rows = logits.to_vec2::<f32>()?;
            c1 += correct_top_k(&rows, &b.labels, 1);
            c5 += correct_top_k(&rows, &b.labels, 5.min(task.num_classes()));
            loss_sum += l * b.labels.len() as f64;
            n += b.labels.len();
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    if n == 0 {
        bail!("evaluation saw no readable labelled images");
    }
    Ok(EvalResult {
        top1: 100.0 * c1 as f64 / n as f64,
        top5: 100.0 * c5 as f64 / n as f64,
        loss: loss_sum / n as f64,
        n,
        skipped,
    })
}

/// The shuffled, drop-last loader of a training run and its batches per epoch.
pub(crate) fn train_loader(
    data: Arc<Dataset>,
    transform: TrainTransform,
    batch_size: usize,
    workers: usize,
    seed: u64,
) -> Result<(Loader<TrainTransform>, usize)> {
    train_loader_with(data, transform, batch_size, workers, seed)
}

/// [`train_loader`] for any per-sample transform.
pub(crate) fn train_loader_with<T: SampleTransform + 'static>(
    data: Arc<Dataset>,
    transform: T,
    batch_size: usize,
    workers: usize,
    seed: u64,
) -> Result<(Loader<T>, usize)> {
    let loader = Loader::new(
        data,
        Arc::new(transform),
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last: true,
            seed,
            workers: workers.max(1),
            prefetch: 2,
        },
    )?;
    let per_epoch = loader.batches_per_epoch();
    if per_epoch == 0 {
        bail!("the training set is smaller than one batch of {batch_size}");
    }
    Ok((loader, per_epoch))
}

/// Stops training on a NaN or infinite loss, before it reaches the weights;
/// the checkpoints in `ckpt_dir` are left as they were.
pub(crate) fn ensure_finite(loss: f64, step: u64, ckpt_dir: &Path) -> Result<()> {
    if !loss.is_finite() {
        bail!(
            "loss is {loss} at step {step}: stopping; the last good checkpoint is in {}",
            ckpt_dir.display()
        );
    }
    Ok(())
}

pub(crate) fn report_failures(b: &Batch) -> usize {
    for (name, e) in &b.failures {
        tracing::warn!("skipped {name}: {e:#}");
    }
    b.failures.len()
}

/// Prints the samples a run skipped (each once, however many epochs).
fn summarise_skipped(skipped: &std::collections::BTreeSet<String>) {
    if skipped.is_empty() {
        return;
    }
    eprintln!(
        "{} samples could not be read and were skipped:",
        skipped.len()
    );
    for name in skipped.iter().take(50) {
        eprintln!("  {name}");
    }
    if skipped.len() > 50 {
        eprintln!(
            "  ... and {} more (see the warnings above)",
            skipped.len() - 50
        );
    }
}

/// Per-code counts as a state tensor (u32, saturating) for a checkpoint.
pub(crate) fn counts_tensor(c: &[u64]) -> Result<Tensor> {
    let v: Vec<u32> = c.iter().map(|&x| x.min(u32::MAX as u64) as u32).collect();
    Ok(Tensor::from_vec(v, c.len(), &Device::Cpu)?)
}

/// The counts saved under `key` by [`counts_tensor`], or `n` zeros.
pub(crate) fn counts_from(
    state: &HashMap<String, Tensor>,
    key: &str,
    n: usize,
) -> Result<Vec<u64>> {
    match state.get(key) {
        Some(t) => Ok(t.to_vec1::<u32>()?.into_iter().map(u64::from).collect()),
        None => Ok(vec![0; n]),
    }
}

/// Seeds derived from the run seed, independent of scheduling.
pub(crate) fn step_rng(seed: u64, step: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(step + 1))
}

const STATE_KEY: &str = "beitv2_train_state";

/// Writes the full training state (trainable tensors, Adam moments, other
/// state tensors such as a codebook, progress) atomically.
pub(crate) fn save_state(
    path: &Path,
    opt: &AdamW,
    progress: &Progress,
    buffers: &[(String, Tensor)],
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = buffers
        .iter()
        .map(|(k, t)| (format!("buffer.{k}"), t.clone()))
        .collect();
    for p in &opt.params {
        tensors.push((format!("param.{}", p.name), p.var.as_tensor().detach()));
        tensors.push((format!("exp_avg.{}", p.name), p.exp_avg.clone()));
        tensors.push((format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.clone()));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta = HashMap::new();
    meta.insert(STATE_KEY.to_string(), serde_json::to_string(progress)?);
    meta.insert("optim_step".to_string(), opt.step.to_string());
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| anyhow::anyhow!("serialising {}: {e}", path.display()))?;
    crate::util::write_atomic(path, &bytes)
}

/// Restores a state written by [`save_state`] into `opt`; returns the
/// progress and the other state tensors by name.
pub(crate) fn load_state(
    path: &Path,
    opt: &mut AdamW,
) -> Result<(Progress, HashMap<String, Tensor>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a training checkpoint", path.display()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let progress: Progress = serde_json::from_str(
        meta.get(STATE_KEY)
            .with_context(|| format!("{} holds no training state", path.display()))?,
    )?;
    opt.step = meta
        .get("optim_step")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{} holds no optimiser step", path.display()))?;
    let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    for p in &mut opt.params {
        let get = |prefix: &str| {
            t.get(&format!("{prefix}.{}", p.name))
                .cloned()
                .with_context(|| {
                    format!(
                        "{}: no '{prefix}.{}' (checkpoint of another model?)",
                        path.display(),
                        p.name
                    )
                })
        };
        let w = get("param")?;
        if w.dims() != p.var.as_tensor().dims() {
            bail!(
                "{}: '{}' is {:?} in the checkpoint but {:?} in the model",
                path.display(),
                p.name,
                w.dims(),
                p.var.as_tensor().dims()
            );
        }
        p.var.set(&w)?;
        p.exp_avg = get("exp_avg")?;
        p.exp_avg_sq = get("exp_avg_sq")?;
    }
    let buffers = t
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("buffer.")?.to_string(), v.clone())))
        .collect();
    Ok((progress, buffers))
}

fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}.safetensors")
}

/// Saves the state as `step-N` in `dir` and removes all but the newest `keep`.
pub(crate) fn checkpoint(
    dir: &Path,
    opt: &AdamW,
    progress: &Progress,
    buffers: &[(String, Tensor)],
    keep: usize,
) -> Result<()> {
    save_state(
        &dir.join(checkpoint_name(progress.step)),
        opt,
        progress,
        buffers,
    )?;
    prune_checkpoints(dir, keep)
}

/// The newest `step-*.safetensors` in `dir`.
pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("checkpoints"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-") && n.ends_with(".safetensors"))
        })
        .collect();
    v.sort();
    v.pop()
}

fn prune_checkpoints(dir: &Path, keep: usize) -> Result<()> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    v.sort();
    while v.len() > keep.max(1) {
        std::fs::remove_file(v.remove(0))?;
    }
    Ok(())
}

/// Prepares `out/checkpoints`: a fresh run (`resume == false`) removes the
/// step checkpoints of an earlier run there, so pruning and a later resume
/// only ever see this run's files.
pub(crate) fn prepare_checkpoint_dir(out: &Path, resume: bool) -> Result<PathBuf> {
    let dir = out.join("checkpoints");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if !resume {
        for e in std::fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
            {
                std::fs::remove_file(&p)
                    .with_context(|| format!("cannot remove {}", p.display()))?;
            }
        }
    }
    Ok(dir)
}

/// Opens the run's metrics log (continued from `resume`, see
/// [`MetricsLog::open`]) and writes the recipe beside it.
pub(crate) fn start_run_log(
    out: &Path,
    recipe: &impl Serialize,
    resume: Option<&Progress>,
) -> Result<MetricsLog> {
    let log = MetricsLog::open(out.join("metrics.jsonl"), resume)?;
    crate::util::write_atomic(
        &out.join("recipe.toml"),
        toml::to_string(recipe)?.as_bytes(),
    )?;
    Ok(log)
}

/// The progress bar of the current epoch, at the batch a resumed run starts from.
pub(crate) fn epoch_bar(
    per_epoch: usize,
    progress: &Progress,
    epochs: usize,
) -> indicatif::ProgressBar {
    let pb = crate::report::progress(
        per_epoch,
        &format!("epoch {}/{}", progress.epoch + 1, epochs),
    );
    pb.set_position(progress.batch as u64);
    pb
}

/// Appends JSON lines to `metrics.jsonl`; on resume, records the resumed run
/// will write again are dropped so the log matches an uninterrupted run.
pub(crate) struct MetricsLog {
    path: PathBuf,
    records: Vec<serde_json::Value>,
}

impl MetricsLog {
    /// `resume`: the resumed progress; training records up to its step are
    /// kept, end-of-epoch records (evaluation, usage) at that step only when
    /// the checkpoint was taken after them (at an epoch boundary).
    pub(crate) fn open(path: PathBuf, resume: Option<&Progress>) -> Result<Self> {
        let mut records = Vec::new();
        if let (Some(p), Ok(text)) = (resume, std::fs::read_to_string(&path)) {
            records = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| {
                    v["step"].as_u64().is_some_and(|s| {
                        s < p.step || (s == p.step && (v["kind"] == "train" || p.batch == 0))
                    })
                })
                .collect();
        }
        let log = Self { path, records };
        log.rewrite()?;
        Ok(log)
    }

    fn rewrite(&self) -> Result<()> {
        let text: String = self.records.iter().map(|r| format!("{r}\n")).collect();
        crate::util::write_atomic(&self.path, text.as_bytes())
    }

    pub(crate) fn push(&mut self, v: serde_json::Value) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)?;
        writeln!(f, "{v}")?;
        self.records.push(v);
        Ok(())
    }

    pub(crate) fn series(&self, kind: &str, key: &str) -> Vec<(f64, f64)> {
        self.records
            .iter()
            .filter(|r| r["kind"] == kind)
            .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
            .collect()
    }

    /// Draws `charts` from the logged records into one PNG.
    pub(crate) fn plot(&self, charts: &[ChartSpec], path: &Path) -> Result<()> {
        let charts: Vec<Chart> = charts
            .iter()
            .map(|c| Chart {
                title: c.title.into(),
                x_label: "step".into(),
                y_label: c.y_label.into(),
                series: c
                    .series
                    .iter()
                    .map(|(name, kind, key)| Series {
                        name: name.to_string(),
                        points: self.series(kind, key),
                    })
                    .collect(),
                log_y: false,
            })
            .collect();
        save_panels(&charts, path)
    }
}

/// Values logged with a step or an epoch record.
pub type Metrics = serde_json::Map<String, serde_json::Value>;

/// What an objective reports at the end of an epoch.
pub struct EpochRecord {
    /// The record's `kind` in `metrics.jsonl` (`val`, `epoch`, ...).
    pub kind: &'static str,
    pub values: Metrics,
    /// Higher is better; a new best writes the `best` export.
    pub score: Option<f64>,
    /// One line for the terminal.
    pub summary: String,
}

/// One panel of `curves.png`: series are `(legend, record kind, key)`.
pub struct ChartSpec {
    pub title: &'static str,
    pub y_label: &'static str,
    pub series: Vec<(&'static str, &'static str, &'static str)>,
}

/// What differs between the training commands; the loop in [`run`] does
/// the rest (data, accumulation, clipping, AdamW, schedule, logging,
/// checkpoints, resume).
pub trait Objective {
    /// The trainable variables, by canonical name.
    fn trainable(&self) -> Vec<(String, Var)>;
    /// Depth for layer-wise lr decay (0: none) and which parameters skip
    /// weight decay.
    fn param_groups(&self) -> (usize, DecayRule);
    /// Forward pass and loss of one micro-batch, with values to log
    /// (averaged over an accumulation group); `None` when the batch has
    /// nothing to learn from. `rng` is this micro-batch's (drop path, mixup).
    fn loss(&mut self, batch: &Batch, rng: &mut ChaCha8Rng) -> Result<Option<(Tensor, Metrics)>>;
    /// Runs after every optimiser step (state moved without gradients, such
    /// as a codebook EMA); values to add to the step's record.
    fn after_step(&mut self, _step: u64, _rng: &mut ChaCha8Rng) -> Result<Metrics> {
        Ok(Metrics::new())
    }
    /// Non-gradient state an exact resume needs, saved in every checkpoint.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
    /// Restores [`Objective::state`] from a checkpoint.
    fn restore(&mut self, _state: &HashMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
    /// After epoch `epoch` (1-based) ends: evaluation or statistics to log.
    fn end_epoch(&mut self, epoch: usize) -> Result<Option<EpochRecord>>;
    /// Writes the trained model into `out`: the `best` copy or the last.
    fn export(&self, out: &Path, best: bool) -> Result<()>;
    /// The panels of `curves.png`.
    fn charts(&self) -> Vec<ChartSpec>;
}

/// The loop's settings, from a recipe.
pub struct LoopConfig<'a> {
    pub schedule: &'a ScheduleSection,
    pub optim: &'a OptimConfig,
    pub run: &'a RunSection,
}

/// Trains `obj` on the batches of `loader`: data → forward → loss →
/// backward (accumulated over `schedule.accum_steps` micro-batches) → clip →
/// AdamW at the warmup + cosine lr → log → checkpoint, with end-of-epoch
/// evaluation and exports. Resumes from the newest checkpoint in the output
/// folder when `resume`; `recipe` is written beside the log.
pub fn run<T: SampleTransform + 'static>(
    obj: &mut dyn Objective,
    loader: &Loader<T>,
    cfg: &LoopConfig,
    recipe: &impl Serialize,
    resume: bool,
) -> Result<()> {
    run_steps(obj, loader, cfg, recipe, resume).map_err(|e| disk_full_hint(e, &cfg.run.output))
}

/// A full disk stops the run with the write that failed (checkpoints and
/// exports go through a temporary file, so nothing complete is damaged);
/// this adds what is still intact and how to continue.
fn disk_full_hint(e: anyhow::Error, out: &Path) -> anyhow::Error {
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull)
    });
    if !full {
        return e;
    }
    match latest_checkpoint(out) {
        Some(ck) => e.context(format!(
            "the disk is full; the newest complete checkpoint, {}, is intact: free some space \
             and run the same command again to resume from it",
            ck.display()
        )),
        None => e.context(format!(
            "the disk is full before the first checkpoint of {} was written: free some space and \
             run the command again",
            out.display()
        )),
    }
}

fn run_steps<T: SampleTransform + 'static>(
    obj: &mut dyn Objective,
    loader: &Loader<T>,
    cfg: &LoopConfig,
    recipe: &impl Serialize,
    resume: bool,
) -> Result<()> {
    let (schedule, run) = (cfg.schedule, cfg.run);
    let out = &run.output;
    let per_epoch = loader.batches_per_epoch();
    let accum = schedule.accum_steps.max(1);
    let steps_per_epoch = per_epoch / accum;
    if steps_per_epoch == 0 {
        bail!("an epoch has {per_epoch} batches, fewer than schedule.accum_steps = {accum}");
    }
    let epoch_steps = |epochs: usize, key: &str| {
        steps_per_epoch.checked_mul(epochs).with_context(|| {
            format!("{key} = {epochs} at {steps_per_epoch} steps an epoch is more steps than can be counted")
        })
    };
    let mut total = epoch_steps(schedule.epochs, "schedule.epochs")?;
    if schedule.max_steps > 0 {
        total = total.min(schedule.max_steps);
    }
    let done = |p: &Progress| p.step as usize >= total;
    let warmup = epoch_steps(schedule.warmup_epochs, "schedule.warmup_epochs")?;
    if warmup >= total {
        eprintln!(
            "note: schedule.warmup_epochs = {} covers the whole run of {} epochs: the learning \
             rate only rises (set schedule.warmup_epochs below schedule.epochs)",
            schedule.warmup_epochs, schedule.epochs
        );
    }
    let _lock = crate::util::OutputLock::acquire(out)?;
    let ckpt_dir = prepare_checkpoint_dir(out, resume)?;
    let (depth, rule) = obj.param_groups();
    let mut opt = AdamW::with_rule(obj.trainable(), depth, cfg.optim.clone(), rule)?;
    let mut progress = Progress::default();
    if resume && let Some(ck) = latest_checkpoint(out) {
        let (p, state) = load_state(&ck, &mut opt)?;
        obj.restore(&state)
            .with_context(|| format!("restoring the state saved in {}", ck.display()))?;
        progress = p;
        tracing::info!("resumed from {} at step {}", ck.display(), progress.step);
    }
    let mut log = start_run_log(out, recipe, resume.then_some(&progress))?;
    let abort_after: Option<u64> = std::env::var("BEITV2_ABORT_AFTER_STEP")
        .ok()
        .and_then(|v| v.parse().ok());
    let start = std::time::Instant::now();
    let elapsed_before = progress.elapsed_s;
    let elapsed = || elapsed_before + start.elapsed().as_secs_f64();
    let mut skipped = std::collections::BTreeSet::new();
    let mut exported = false;
    // A checkpoint taken at the last step but before its epoch's end
    // (`batch > 0`) still owes that end: evaluation, logs, the final export.
    while progress.epoch < schedule.epochs && (!done(&progress) || progress.batch > 0) {
        let epoch = progress.epoch;
        let pb = epoch_bar(per_epoch, &progress, schedule.epochs);
        // Whole optimiser steps only: a trailing partial accumulation group is dropped.
        let usable = steps_per_epoch * accum;
        let mut micro = 0usize;
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut loss_acc = 0f64;
        let mut metrics = Metrics::new();
        let mut step_start = std::time::Instant::now();
        let mut images_in_step = 0usize;
        for b in loader
            .iter_epoch(epoch as u64, progress.batch)
            .take(usable.saturating_sub(progress.batch))
        {
            if done(&progress) {
                break;
            }
            report_failures(&b);
            skipped.extend(b.failures.iter().map(|(name, _)| name.clone()));
            let mut rng = step_rng(run.seed, progress.step * accum as u64 + micro as u64);
            if let Some((loss, m)) = obj.loss(&b, &mut rng)? {
                let lv = loss.to_scalar::<f32>()? as f64;
                ensure_finite(lv, progress.step, &ckpt_dir)?;
                loss_acc += lv / accum as f64;
                for (k, v) in m {
                    if let Some(x) = v.as_f64() {
                        let sum = metrics.get(&k).and_then(|s| s.as_f64()).unwrap_or(0.0);
                        metrics.insert(k, serde_json::json!(sum + x / accum as f64));
                    }
                }
                images_in_step += b.len();
                let g = (loss / accum as f64)?.backward()?;
                grads = Some(match grads.take() {
                    None => g,
                    Some(acc) => add_grads(acc, g, &opt)?,
                });
            }
            micro += 1;
            progress.batch += 1;
            pb.inc(1);
            if micro < accum {
                continue;
            }
            micro = 0;
            let lr = cosine_lr(
                cfg.optim.lr,
                cfg.optim.min_lr,
                warmup,
                total,
                progress.step as usize,
            );
            let g = grads.take().unwrap_or_default();
            let clip = grad_clip(&g, &opt.params, cfg.optim.clip_grad)?;
            let grad_norm = clip.norm;
            opt.step(&g, lr, clip.scale)?;
            drop(g);
            progress.step += 1;
            metrics.extend(obj.after_step(progress.step, &mut rng)?);
            let mut record = serde_json::json!({
                "kind": "train", "step": progress.step, "epoch": epoch, "loss": loss_acc,
                "lr": lr, "grad_norm": grad_norm, "elapsed_s": elapsed(),
            });
            if let Some(o) = record.as_object_mut() {
                o.extend(std::mem::take(&mut metrics));
            }
            log.push(record)?;
            if abort_after == Some(progress.step) {
                // Simulated kill (tests of exact resume): no checkpoint for this step.
                std::process::abort();
            }
            let ips = images_in_step as f64 / step_start.elapsed().as_secs_f64().max(1e-9);
            pb.set_message(format!(
                "epoch {} loss {loss_acc:.4} {ips:.1} img/s",
                epoch + 1
            ));
            loss_acc = 0.0;
            images_in_step = 0;
            step_start = std::time::Instant::now();
            if run.ckpt_every > 0 && progress.step % run.ckpt_every as u64 == 0 {
                progress.elapsed_s = elapsed();
                checkpoint(&ckpt_dir, &opt, &progress, &obj.state()?, run.keep_last)?;
            }
            if done(&progress) {
                // A step budget shorter than the epochs: end here as an epoch would.
                break;
            }
        }
        pb.finish_and_clear();
        progress.epoch += 1;
        progress.batch = 0;
        let last = progress.epoch >= schedule.epochs || done(&progress);
        let due = progress.epoch % schedule.eval_every.max(1) == 0 || last;
        if due && let Some(r) = obj.end_epoch(progress.epoch)? {
            eprintln!("epoch {}: {}", progress.epoch, r.summary);
            let mut record = serde_json::json!({
                "kind": r.kind, "step": progress.step, "epoch": progress.epoch,
            });
            if let Some(o) = record.as_object_mut() {
                o.extend(r.values);
            }
            log.push(record)?;
            if let Some(score) = r.score
                && (score > progress.best_top1 || !progress.has_best)
            {
                progress.best_top1 = score;
                progress.has_best = true;
                obj.export(out, true)?;
            }
        }
        progress.elapsed_s = elapsed();
        checkpoint(&ckpt_dir, &opt, &progress, &obj.state()?, run.keep_last)?;
        obj.export(out, false)?;
        exported = true;
    }
    if !exported {
        // Resumed from the final checkpoint: the run that wrote it may have
        // been killed before its export, leaving an older model-last.
        obj.export(out, false)?;
    }
    log.plot(&obj.charts(), &out.join("curves.png"))?;
    summarise_skipped(&skipped);
    Ok(())
}

/// `acc + g` for every trainable parameter (gradient accumulation).
fn add_grads(
    mut acc: candle_core::backprop::GradStore,
    g: candle_core::backprop::GradStore,
    opt: &AdamW,
) -> Result<candle_core::backprop::GradStore> {
    for p in &opt.params {
        if let Some(gi) = g.get(p.var.as_tensor()) {
            let sum = match acc.get(p.var.as_tensor()) {
                Some(a) => (a + gi)?,
                None => gi.clone(),
            };
            acc.insert(p.var.as_tensor(), sum);
        }
    }
    Ok(acc)
}

/// Fine-tuning and linear probing: soft-target cross-entropy on the task's
/// logits (mixup/cutmix and label smoothing as the recipe says), top-1 on
/// the validation set after each epoch.
pub struct Supervised<'a> {
    task: &'a dyn Task,
    mixup: Option<Mixup>,
    smoothing: f64,
    val: Option<(Arc<Dataset>, EvalTransform, usize, usize)>,
    /// The last validation result.
    pub last_eval: Option<EvalResult>,
}

impl Objective for Supervised<'_> {
    fn trainable(&self) -> Vec<(String, Var)> {
        self.task.trainable()
    }
    fn param_groups(&self) -> (usize, DecayRule) {
        (self.task.depth(), DecayRule::Finetune)
    }
    fn loss(&mut self, b: &Batch, rng: &mut ChaCha8Rng) -> Result<Option<(Tensor, Metrics)>> {
        if b.labels.is_empty() {
            return Ok(None);
        }
        let (k, (h, w), n) = (
            self.task.num_classes(),
            self.task.input_hw(),
            b.labels.len(),
        );
        let mut x = b.images.clone();
        let targets = match &self.mixup {
            Some(m) if n % 2 == 0 => {
                let t = m.apply(&mut x, (n, 3, h, w), &b.labels, rng)?;
                Tensor::from_vec(t, (n, k), &Device::Cpu)?
            }
            _ => smoothed_targets(&b.labels, k, self.smoothing)?,
        };
        let x = Tensor::from_vec(x, (n, 3, h, w), &Device::Cpu)?;
        let logits = self.task.logits(&x, Some(rng))?;
        Ok(Some((
            soft_target_cross_entropy(&logits, &targets)?,
            Metrics::new(),
        )))
    }
    fn end_epoch(&mut self, _epoch: usize) -> Result<Option<EpochRecord>> {
        let Some((data, t, batch, workers)) = &self.val else {
            return Ok(None);
        };
        let r = evaluate(self.task, data.clone(), t.clone(), *batch, *workers)?;
        let rec = EpochRecord {
            kind: "val",
            values: serde_json::json!({"top1": r.top1, "top5": r.top5, "loss": r.loss, "n": r.n})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            score: Some(r.top1),
            summary: format!(
                "val top-1 {:.2}%  top-5 {:.2}%  loss {:.4}",
                r.top1, r.top5, r.loss
            ),
        };
        self.last_eval = Some(r);
        Ok(Some(rec))
    }
    fn export(&self, out: &Path, best: bool) -> Result<()> {
        let name = if best { "model-best" } else { "model-last" };
        self.task.export(&out.join(format!("{name}.safetensors")))
    }
    fn charts(&self) -> Vec<ChartSpec> {
        vec![
            ChartSpec {
                title: "training loss",
                y_label: "loss",
                series: vec![("train loss", "train", "loss"), ("val loss", "val", "loss")],
            },
            ChartSpec {
                title: "validation accuracy",
                y_label: "%",
                series: vec![("top-1", "val", "top1"), ("top-5", "val", "top5")],
            },
            ChartSpec {
                title: "learning rate",
                y_label: "lr",
                series: vec![("lr", "train", "lr")],
            },
        ]
    }
}

/// Trains `task` with `recipe` on `train`, evaluating on `val` each epoch.
/// Resumes from the newest checkpoint in the output folder when `resume`.
pub fn train(
    task: &dyn Task,
    recipe: &Recipe,
    train: Arc<Dataset>,
    val: Option<Arc<Dataset>>,
    transform: TrainTransform,
    eval_transform: EvalTransform,
    resume: bool,
) -> Result<Option<EvalResult>> {
    let k = task.num_classes();
    train.check_labels(k)?;
    if let Some(v) = &val {
        v.check_labels(k)?;
    }
    let d = &recipe.data;
    let (loader, _) = train_loader(train, transform, d.batch_size, d.workers, recipe.run.seed)?;
    let mixup = (d.mixup > 0.0 || d.cutmix > 0.0).then_some(Mixup {
        mixup_alpha: d.mixup,
        cutmix_alpha: d.cutmix,
        prob: 1.0,
        switch_prob: 0.5,
        label_smoothing: d.smoothing,
        num_classes: k,
    });
    let mut obj = Supervised {
        task,
        mixup,
        smoothing: d.smoothing,
        val: val.map(|v| (v, eval_transform, d.batch_size, d.workers.max(1))),
        last_eval: None,
    };
    let cfg = LoopConfig {
        schedule: &recipe.schedule,
        optim: &recipe.optim,
        run: &recipe.run,
    };
    run(&mut obj, &loader, &cfg, recipe, resume)?;
    Ok(obj.last_eval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_finite_loss_stops_training_naming_the_checkpoints() {
        let dir = Path::new("runs/x/checkpoints");
        assert!(ensure_finite(0.7, 3, dir).is_ok());
        for bad in [f64::NAN, f64::INFINITY] {
            let e = ensure_finite(bad, 12, dir).unwrap_err().to_string();
            assert!(
                e.contains("step 12") && e.contains("runs/x/checkpoints"),
                "{e}"
            );
        }
    }
}
