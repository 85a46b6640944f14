//! VQ-KD tokenizer training (spec E.4–E.7): the encoder's codes are quantised
//! against a unit-norm codebook, the decoder reconstructs a frozen teacher's
//! patch features (cosine loss) and the codebook follows the encoder outputs
//! by EMA, initialised by k-means on the first batch. An optional dead-code
//! restart re-seeds codes unused for a while from recent encoder outputs.

use super::engine::{
    ChartSpec, EpochRecord, LoopConfig, Metrics, Objective, counts_from, counts_tensor,
    open_dataset, step_rng,
};
use super::optim::{DecayRule, OptimConfig};
use super::recipe::{RunSection, ScheduleSection};
use crate::checkpoint::{self, VQKD_CONFIG_METADATA_KEY};
use crate::data::augment::TrainTransform;
use crate::data::loader::Batch;
use crate::model::Beit;
use crate::model::clip::{ClipVision, ClipVisionConfig};
use crate::model::vqkd::{
    CodeUsage, Vqkd, VqkdConfig, code_counts, ema_update, kmeans, l2_normalize, scale_for_teacher,
};
use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarBuilder;
use rand::Rng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSection {
    /// `clip` (an OpenAI/open_clip ViT vision tower) or `beit` (any BEiT this
    /// project loads; its last-layer patch tokens are the targets).
    pub kind: String,
    pub weights: PathBuf,
    /// CLIP tower shapes (JSON); default ViT-B/16. For `beit`: an optional model config.
    pub config: Option<PathBuf>,
    /// BEiT preset for `kind = "beit"` (else the stored or inferred config).
    pub arch: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerData {
    pub train: String,
    pub batch_size: usize,
    pub workers: usize,
    pub min_crop_scale: f64,
    /// Use only the first N samples (0 = all).
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizerSection {
    pub decay: f64,
    pub kmeans_iters: usize,
    /// Every N steps, codes unused during those steps are re-seeded from the
    /// current batch's encoder outputs (0 = off, the reference behaviour).
    pub restart_every: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSchedule {
    pub epochs: usize,
    pub warmup_epochs: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerRecipe {
    /// Tokenizer preset name, or shapes given inline in `[shapes]`.
    pub arch: Option<String>,
    pub shapes: Option<VqkdConfig>,
    pub teacher: TeacherSection,
    pub data: TokenizerData,
    pub optim: OptimConfig,
    pub schedule: TokenizerSchedule,
    pub quantizer: QuantizerSection,
    pub run: RunSection,
}

impl TokenizerRecipe {
    pub const VQKD_BASE: &'static str =
        include_str!("../../recipes/vqkd_encoder_base_decoder_3x768x12_clip.toml");

    /// Loads a recipe (default: the shipped unilm recipe) with `section.key=value` overrides.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("cannot read recipe {}", p.display()))?,
            None => Self::VQKD_BASE.to_string(),
        };
        let mut table: toml::Table =
            toml::from_str(&text).context("parsing the tokenizer recipe")?;
        super::recipe::apply_overrides(&mut table, overrides)?;
        let mut r: Self = toml::Value::Table(table)
            .try_into()
            .context("invalid tokenizer recipe")?;
        r.validate()?;
        if let Some(dir) = path.and_then(Path::parent) {
            for p in [&mut r.teacher.weights]
                .into_iter()
                .chain(r.teacher.config.as_mut())
            {
                if p.is_relative() && !p.exists() && dir.join(&*p).exists() {
                    *p = dir.join(&*p);
                }
            }
        }
        Ok(r)
    }

    pub fn shapes(&self) -> Result<VqkdConfig> {
        let s = match (&self.shapes, &self.arch) {
            (Some(s), _) => s.clone(),
            (None, Some(a)) => VqkdConfig::preset(a)?,
            (None, None) => bail!("the recipe needs `arch` or a [shapes] table"),
        };
        s.validate().context("invalid tokenizer shapes")?;
        Ok(s)
    }

    fn validate(&self) -> Result<()> {
        if self.data.batch_size == 0 || self.schedule.epochs == 0 {
            bail!("data.batch_size and schedule.epochs must be at least 1");
        }
        if !(0.0..1.0).contains(&self.quantizer.decay) {
            bail!("quantizer.decay {} must be in [0, 1)", self.quantizer.decay);
        }
        if self.optim.lr.is_nan() || self.optim.lr <= 0.0 {
            bail!("optim.lr must be positive");
        }
        Ok(())
    }
}

/// The frozen network whose features the decoder learns to reproduce.
pub enum Teacher {
    Clip(ClipVision),
    Beit(Beit),
}

impl Teacher {
    pub fn load(t: &TeacherSection) -> Result<Self> {
        match t.kind.as_str() {
            "clip" => {
                let cfg = match &t.config {
                    Some(p) => serde_json::from_str(
                        &std::fs::read_to_string(p)
                            .with_context(|| format!("cannot read {}", p.display()))?,
                    )
                    .with_context(|| format!("parsing {}", p.display()))?,
                    None => ClipVisionConfig::vit_b16(),
                };
                let sd = checkpoint::read_state_dict(&t.weights)?;
                // OpenAI and open_clip state dicts hold the vision tower under `visual.`.
                let visual: std::collections::BTreeMap<String, Tensor> = sd
                    .tensors
                    .iter()
                    .filter_map(|(k, v)| Some((k.strip_prefix("visual.")?.to_string(), v.clone())))
                    .collect();
                let expected =
                    crate::model::record_weights(|vb| ClipVision::new(&cfg, vb).map(|_| ()))?;
                checkpoint::strict_check(&t.weights.display().to_string(), &visual, &expected)?;
                let vb =
                    VarBuilder::from_tensors(checkpoint::to_f32(visual)?, DType::F32, &Device::Cpu);
                Ok(Teacher::Clip(ClipVision::new(&cfg, vb)?))
            }
            "beit" => {
                let opts = checkpoint::LoadOptions {
                    arch: t.arch.clone(),
                    config: t
                        .config
                        .as_deref()
                        .map(crate::model::BeitConfig::from_file)
                        .transpose()?,
                    ..Default::default()
                };
                Ok(Teacher::Beit(checkpoint::load_model(&t.weights, &opts)?))
            }
            other => bail!("unknown teacher kind '{other}' (clip or beit)"),
        }
    }

    /// Feature size of the targets.
    pub fn dim(&self) -> usize {
        match self {
            Teacher::Clip(c) => c.cfg.output_dim,
            Teacher::Beit(b) => b.cfg.embed_dim,
        }
    }

    /// Input size (height, width) the teacher expects.
    pub fn img_size(&self) -> [usize; 2] {
        match self {
            Teacher::Clip(c) => [c.cfg.img_size; 2],
            Teacher::Beit(b) => b.cfg.img_size,
        }
    }

    /// Targets (B, N, dim) for a VQ-KD input in [−1, 1], mapped to the
    /// teacher's own normalisation first (unilm's scaling layers).
    pub fn targets(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Teacher::Clip(c) => c.patch_features(&ClipVision::scale_input(x)?)?,
            Teacher::Beit(b) => {
                let xn = scale_for_teacher(x, b.cfg.mean, b.cfg.std)?;
                let t = b.forward_features(&xn)?;
                let n = t.dim(1)?;
                let p = t.i((.., 1..n))?;
                // Average-pooling models normalise with fc_norm: apply it per token.
                match &b.fc_norm {
                    Some(ln) => ln.forward(&p)?,
                    None => p,
                }
            }
        })
    }
}

/// `mean over tokens of (1 − cos(rec, target))`.
pub fn cosine_rec_loss(rec: &Tensor, target: &Tensor) -> Result<Tensor> {
    let cos = (l2_normalize(rec)? * l2_normalize(target)?)?.sum(D::Minus1)?;
    Ok((1.0 - cos)?.mean_all()?)
}

/// A tokenizer whose encoder, decoder and task layers are trainable; the
/// codebook is a state tensor moved by EMA, not by gradients.
struct Trainable {
    model: Vqkd,
    vars: Vec<(String, Var)>,
    codebook: Var,
}

const CODEBOOK: &str = "quantize.embedding.weight";

impl Trainable {
    fn new(cfg: &VqkdConfig, weights: HashMap<String, Tensor>) -> Result<Self> {
        let mut vars = Vec::new();
        let mut tensors = HashMap::new();
        let mut codebook = None;
        for (k, t) in weights {
            let v = Var::from_tensor(&t)?;
            tensors.insert(k.clone(), v.as_tensor().clone());
            if k == CODEBOOK {
                codebook = Some(v);
            } else {
                vars.push((k, v));
            }
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let model = Vqkd::new(
            cfg,
            VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        )?;
        Ok(Self {
            model,
            vars,
            codebook: codebook.context("no codebook among the tokenizer weights")?,
        })
    }

    /// Writes the tokenizer in unilm's layout with its shapes in the metadata.
    fn export(&self, path: &Path) -> Result<()> {
        let mut t: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        t.push((CODEBOOK.to_string(), self.codebook.as_tensor().detach()));
        t.sort_by(|a, b| a.0.cmp(&b.0));
        let mut meta = HashMap::new();
        meta.insert(
            VQKD_CONFIG_METADATA_KEY.to_string(),
            serde_json::to_string(&self.model.cfg)?,
        );
        let bytes = safetensors::serialize(t.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
            .map_err(|e| anyhow::anyhow!("serialising {}: {e}", path.display()))?;
        crate::util::write_atomic(path, &bytes)
    }
}

/// Fresh tokenizer weights: every tensor drawn like a BEiT trained from
/// scratch, the codebook random unit vectors (replaced by k-means at step 0).
fn init_tokenizer(cfg: &VqkdConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (prefix, beit) in [("encoder.", cfg.encoder())]
        .into_iter()
        .chain((cfg.decoder_depth > 0).then(|| ("decoder.", cfg.decoder())))
    {
        for (k, v) in super::tasks::init_weights(&beit, seed ^ prefix.len() as u64)? {
            out.insert(format!("{prefix}{k}"), v);
        }
    }
    let expected = crate::model::record_weights(|vb| Vqkd::new(cfg, vb).map(|_| ()))?;
    let mut rng = step_rng(seed, u64::MAX - 1);
    for (k, shape) in expected {
        if out.contains_key(&k) {
            continue;
        }
        let t = if k.ends_with(".bias") {
            Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu)?
        } else {
            let n: usize = shape.iter().product();
            let dist = rand_distr::Normal::new(0.0f32, 0.02).context("normal")?;
            let v: Vec<f32> = (0..n).map(|_| rng.sample(dist)).collect();
            let t = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?;
            if k == CODEBOOK { l2_normalize(&t)? } else { t }
        };
        out.insert(k, t);
    }
    Ok(out)
}

/// Tokenizer training as an [`Objective`]: reconstruction + commitment loss
/// through the gradients, the codebook by EMA after each step (k-means on
/// the first batch), optional dead-code restarts.
struct TokenizerObjective<'a> {
    tok: Trainable,
    teacher: &'a Teacher,
    quantizer: &'a QuantizerSection,
    initted: bool,
    /// Usage since the last dead-code restart, and over the current epoch.
    window: Vec<u64>,
    epoch_counts: Vec<u64>,
    /// Normalised codes and their ids from the last forward, for the EMA.
    pending: Option<(Tensor, Vec<u32>)>,
}

impl TokenizerObjective<'_> {
    fn n_codes(&self) -> usize {
        self.tok.model.cfg.n_codes
    }
}

impl Objective for TokenizerObjective<'_> {
    fn trainable(&self) -> Vec<(String, Var)> {
        self.tok.vars.clone()
    }
    fn param_groups(&self) -> (usize, DecayRule) {
        (0, DecayRule::Finetune)
    }
    fn loss(&mut self, b: &Batch, rng: &mut ChaCha8Rng) -> Result<Option<(Tensor, Metrics)>> {
        if b.is_empty() {
            return Ok(None);
        }
        let n_codes = self.n_codes();
        let x = Vqkd::preprocess(&b.images_tensor(&Device::Cpu)?)?;
        let target = self.teacher.targets(&x)?.detach();
        let code = self.tok.model.encode(&x)?;
        if !self.initted {
            // k-means on the first batch's normalised codes (spec E.5).
            let z = l2_normalize(&code.detach())?.flatten_to(1)?;
            let m = z.dim(0)?;
            let init: Vec<usize> = if m >= n_codes {
                sample(rng, m, n_codes).into_vec()
            } else {
                (0..n_codes).map(|_| rng.random_range(0..m)).collect()
            };
            let (means, _) = kmeans(&z, &init, self.quantizer.kmeans_iters)?;
            self.tok.codebook.set(&means)?;
            self.initted = true;
        }
        let q = self.tok.model.quantize(&code)?;
        let rec = self.tok.model.decode(&q.z_q)?;
        let rec_loss = cosine_rec_loss(&rec, &target)?;
        let loss = (&rec_loss + &q.commit_loss)?;
        let ids = q.ids.flatten_all()?.to_vec1::<u32>()?;
        let usage = CodeUsage {
            counts: code_counts(&ids, n_codes),
        };
        let metrics = serde_json::json!({
            "rec_loss": rec_loss.to_scalar::<f32>()?,
            "commit_loss": q.commit_loss.to_scalar::<f32>()?,
            "used_codes": n_codes - usage.unused(),
            "perplexity": usage.perplexity(),
        });
        self.pending = Some((q.z.detach().flatten_to(1)?, ids));
        Ok(Some((
            loss,
            metrics.as_object().cloned().unwrap_or_default(),
        )))
    }
    fn after_step(&mut self, step: u64, rng: &mut ChaCha8Rng) -> Result<Metrics> {
        let n_codes = self.n_codes();
        let Some((z, ids)) = self.pending.take() else {
            return Ok(Metrics::new());
        };
        // Codebook EMA on this batch's assignments.
        let (book, bins) = ema_update(
            self.tok.codebook.as_tensor(),
            &z,
            &ids,
            self.quantizer.decay,
        )?;
        self.tok.codebook.set(&book)?;
        for (i, c) in bins.iter().enumerate() {
            self.window[i] += c;
            self.epoch_counts[i] += c;
        }
        let mut restarted = 0;
        let every = self.quantizer.restart_every as u64;
        if every > 0 && step.is_multiple_of(every) {
            let dead: Vec<usize> = (0..n_codes).filter(|&i| self.window[i] == 0).collect();
            if !dead.is_empty() {
                let m = z.dim(0)?;
                let picks: Vec<u32> = dead.iter().map(|_| rng.random_range(0..m) as u32).collect();
                let fresh = z.index_select(&Tensor::new(picks.as_slice(), &Device::Cpu)?, 0)?;
                let mut rows: Vec<Tensor> = (0..n_codes)
                    .map(|i| self.tok.codebook.as_tensor().i(i))
                    .collect::<candle_core::Result<_>>()?;
                for (j, &i) in dead.iter().enumerate() {
                    rows[i] = fresh.i(j)?;
                }
                self.tok.codebook.set(&Tensor::stack(&rows, 0)?)?;
                restarted = dead.len();
            }
            self.window = vec![0; n_codes];
        }
        let mut m = Metrics::new();
        m.insert("restarted".into(), restarted.into());
        Ok(m)
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            (
                "codebook".to_string(),
                self.tok.codebook.as_tensor().detach(),
            ),
            ("usage_window".to_string(), counts_tensor(&self.window)?),
            (
                "usage_epoch".to_string(),
                counts_tensor(&self.epoch_counts)?,
            ),
        ])
    }
    fn restore(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let n = self.n_codes();
        let book = state
            .get("codebook")
            .context("no codebook in the checkpoint")?;
        self.tok.codebook.set(book)?;
        self.window = counts_from(state, "usage_window", n)?;
        self.epoch_counts = counts_from(state, "usage_epoch", n)?;
        self.initted = true;
        Ok(())
    }
    fn end_epoch(&mut self, _epoch: usize) -> Result<Option<EpochRecord>> {
        let n_codes = self.n_codes();
        let usage = CodeUsage {
            counts: std::mem::replace(&mut self.epoch_counts, vec![0; n_codes]),
        };
        let values = serde_json::json!({
            "used_codes": n_codes - usage.unused(), "unused_codes": usage.unused(),
            "perplexity": usage.perplexity(),
        });
        Ok(Some(EpochRecord {
            kind: "epoch",
            values: values.as_object().cloned().unwrap_or_default(),
            score: None,
            summary: format!(
                "{} of {n_codes} codes used, perplexity {:.1}",
                n_codes - usage.unused(),
                usage.perplexity()
            ),
        }))
    }
    fn export(&self, out: &Path, _best: bool) -> Result<()> {
        self.tok.export(&out.join("tokenizer-last.safetensors"))
    }
    fn charts(&self) -> Vec<ChartSpec> {
        vec![
            ChartSpec {
                title: "tokenizer losses",
                y_label: "loss",
                series: vec![
                    ("total", "train", "loss"),
                    ("reconstruction", "train", "rec_loss"),
                    ("commitment", "train", "commit_loss"),
                ],
            },
            ChartSpec {
                title: "codebook usage per step",
                y_label: "codes",
                series: vec![
                    ("used codes", "train", "used_codes"),
                    ("perplexity", "train", "perplexity"),
                ],
            },
        ]
    }
}

/// Trains a tokenizer; returns the path of the exported tokenizer.
pub fn train_tokenizer(recipe: &TokenizerRecipe, resume: bool) -> Result<PathBuf> {
    let cfg = recipe.shapes()?;
    let teacher = Teacher::load(&recipe.teacher)?;
    if cfg.decoder_depth == 0 {
        bail!("training needs a decoder: set decoder_depth ≥ 1");
    }
    if teacher.dim() != cfg.decoder_out_dim {
        bail!(
            "the teacher produces {}-d features but the decoder reconstructs {}-d (decoder_out_dim)",
            teacher.dim(),
            cfg.decoder_out_dim
        );
    }
    if teacher.img_size() != [cfg.img_size; 2] {
        bail!(
            "the teacher takes {:?} px images, the tokenizer {} px",
            teacher.img_size(),
            cfg.img_size
        );
    }
    let d = &recipe.data;
    let mut data = open_dataset(&d.train)?;
    if d.limit > 0 && d.limit < data.len() {
        data = data.subset(&(0..d.limit).collect::<Vec<_>>());
    }
    let mut transform = TrainTransform::simple(cfg.img_size, [0.0; 3], [1.0; 3]);
    transform.rrc.scale = (d.min_crop_scale, 1.0);
    let (loader, _) = super::engine::train_loader(
        Arc::new(data),
        transform,
        d.batch_size,
        d.workers,
        recipe.run.seed,
    )?;
    let n_codes = cfg.n_codes;
    let mut obj = TokenizerObjective {
        tok: Trainable::new(&cfg, init_tokenizer(&cfg, recipe.run.seed)?)?,
        teacher: &teacher,
        quantizer: &recipe.quantizer,
        initted: false,
        window: vec![0; n_codes],
        epoch_counts: vec![0; n_codes],
        pending: None,
    };
    let schedule = ScheduleSection {
        epochs: recipe.schedule.epochs,
        warmup_epochs: recipe.schedule.warmup_epochs,
        accum_steps: 1,
        max_steps: 0,
        // The codebook statistics of every epoch (`end_epoch`).
        eval_every: 1,
    };
    let loop_cfg = LoopConfig {
        schedule: &schedule,
        optim: &recipe.optim,
        run: &recipe.run,
    };
    super::engine::run(&mut obj, &loader, &loop_cfg, recipe, resume)?;
    Ok(recipe.run.output.join("tokenizer-last.safetensors"))
}
