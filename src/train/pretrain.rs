//! BEiT v2 masked image modeling (spec F): a frozen VQ-KD tokenizer turns
//! the second view of each crop into token ids, and the student learns to
//! predict the ids of its masked patches from the last block and from the
//! patch-aggregation neck; loss = CE(main) + CE(aggregated).

use super::engine::{
    ChartSpec, EpochRecord, LoopConfig, Metrics, Objective, counts_from, counts_tensor,
    open_dataset, train_loader_with,
};
use super::optim::{DecayRule, OptimConfig};
use super::recipe::{RunSection, ScheduleSection, load_checked};
use super::tasks::{trainable_vars, trunc_normal_within};
use crate::checkpoint::{self, CONFIG_METADATA_KEY};
use crate::data::RgbImage;
use crate::data::augment::{ColorJitter, TwoViewTransform};
use crate::data::loader::{Batch, SampleTransform};
use crate::data::masking::MaskingGenerator;
use crate::model::mim::{BeitForMim, MIM_CONFIG_METADATA_KEY, MimConfig};
use crate::model::vqkd::{CodeUsage, Vqkd, VqkdConfig, code_counts};
use crate::model::{BeitConfig, record_weights};
use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainModel {
    /// Backbone preset (`beitv2_base_patch16_224`, ...).
    pub arch: Option<String>,
    /// Backbone config file (JSON/TOML, the fields of `BeitConfig`), instead of `arch`.
    pub config: Option<PathBuf>,
    /// Start from these weights (continued pretraining): ours, unilm's
    /// `beitv2_*_pt1k*.pth` or mmpretrain's layout.
    pub weights: Option<PathBuf>,
    pub early_layers: usize,
    pub head_layers: usize,
    pub layer_scale_init: f64,
    pub drop_path_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSource {
    /// unilm `vqkd_encoder_*.pth`, mmpretrain `vqkd_encoder.pth` or ours.
    pub weights: PathBuf,
    /// Tokenizer preset (else stored in the file or inferred from shapes).
    pub arch: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainData {
    /// Image folder (labels unused) or `fashion-mnist:train`.
    pub train: String,
    pub batch_size: usize,
    pub workers: usize,
    pub min_crop_scale: f64,
    /// Brightness, contrast and saturation strength (0 = no jitter).
    pub color_jitter: f64,
    /// Use only the first N samples (0 = all).
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskSection {
    /// Patches masked per image (exactly).
    pub num_patches: usize,
    /// Smallest block a masking attempt aims for.
    pub min_patches: usize,
    pub min_aspect: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainRecipe {
    pub model: PretrainModel,
    pub tokenizer: TokenizerSource,
    pub data: PretrainData,
    pub mask: MaskSection,
    pub optim: OptimConfig,
    pub schedule: ScheduleSection,
    pub run: RunSection,
}

const OPTIONAL_KEYS: &[&str] = &[
    "model.arch",
    "model.config",
    "model.weights",
    "tokenizer.arch",
    "schedule.max_steps",
];

impl PretrainRecipe {
    /// unilm's base recipe, 300 epochs (PRETRAINING.md, spec F.5).
    pub const BASE_300E: &'static str =
        include_str!("../../recipes/beitv2_base_patch16_224_pt1k_300e.toml");

    /// Loads a recipe (default: the shipped base 300-epoch recipe) with
    /// `section.key=value` overrides; paths in a recipe file are relative to it.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let (table, origin) = load_checked(path, overrides, Self::BASE_300E, OPTIONAL_KEYS)?;
        let mut r: Self = toml::Value::Table(table)
            .try_into()
            .with_context(|| format!("invalid pretraining recipe {origin}"))?;
        if let Some(dir) = path.and_then(Path::parent) {
            for p in [&mut r.tokenizer.weights]
                .into_iter()
                .chain(r.model.config.as_mut())
                .chain(r.model.weights.as_mut())
            {
                if p.is_relative() && !p.exists() && dir.join(&*p).exists() {
                    *p = dir.join(&*p);
                }
            }
        }
        r.validate()?;
        Ok(r)
    }

    fn validate(&self) -> Result<()> {
        if self.data.batch_size == 0 || self.schedule.epochs == 0 || self.schedule.accum_steps == 0
        {
            bail!("data.batch_size, schedule.epochs and schedule.accum_steps must be at least 1");
        }
        if self.optim.lr.is_nan() || self.optim.lr <= 0.0 || self.optim.min_lr < 0.0 {
            bail!("optim.lr must be positive and optim.min_lr non-negative");
        }
        if !(0.0..=1.0).contains(&self.data.min_crop_scale) || self.data.min_crop_scale == 0.0 {
            bail!("data.min_crop_scale must be in (0, 1]");
        }
        Ok(())
    }

    /// The student's config.
    pub fn model_config(&self, vocab_size: usize) -> Result<MimConfig> {
        let m = &self.model;
        let mut b = match (&m.config, &m.arch) {
            (Some(p), _) => BeitConfig::from_file(p)?,
            (None, Some(a)) => BeitConfig::preset(a)?,
            (None, None) => bail!("the recipe needs model.arch or model.config"),
        };
        b.drop_path_rate = m.drop_path_rate;
        b.layer_scale = m.layer_scale_init > 0.0;
        MimConfig::for_backbone(
            b,
            m.early_layers,
            m.head_layers,
            vocab_size,
            m.layer_scale_init,
        )
    }

    /// The masking generator for the student's grid; a count the grid cannot
    /// hold is an error naming the key.
    pub fn mask_generator(&self, grid: (usize, usize)) -> Result<MaskingGenerator> {
        let m = &self.mask;
        MaskingGenerator::new(grid, m.num_patches, m.min_patches, None, m.min_aspect, None)
            .context("invalid [mask] section")
    }
}

/// Refuses a tokenizer that cannot label the student's patches: its patch
/// grid must be the student's and its codebook the MIM head's size.
pub fn check_tokenizer_fits(tok: &VqkdConfig, student: &MimConfig) -> Result<()> {
    let s = &student.backbone;
    let (g, tg) = (s.grid(), (tok.grid(), tok.grid()));
    if g != tg {
        bail!(
            "the tokenizer labels a {}x{} grid ({} px images, patch {}), the student has {}x{} \
             ({}x{} px, patch {}): they must match",
            tg.0,
            tg.1,
            tok.img_size,
            tok.patch_size,
            g.0,
            g.1,
            s.img_size[0],
            s.img_size[1],
            s.patch_size
        );
    }
    if tok.n_codes != student.vocab_size {
        bail!(
            "the tokenizer has {} codes but the MIM head predicts {}",
            tok.n_codes,
            student.vocab_size
        );
    }
    Ok(())
}

/// Fresh student weights as unilm's `VisionTransformerForMaskedImageModelingCLS`
/// initialises them (spec A.7): trunc-normal 0.02 cut at ±1σ for the tokens,
/// every linear and conv weight and the MIM head; zero biases, q/v biases and
/// shared table; unit LayerNorm; layer scale at its init value; block i's
/// `attn.proj` and `mlp.fc2` divided by sqrt(2(i+1)). The neck blocks are
/// created after that init in unilm, so they keep PyTorch's default Linear
/// init (uniform ±1/sqrt(fan_in) for weight and bias) and are rescaled with
/// layer id `early_layers + k + 1`.
pub fn init_mim_weights(cfg: &MimConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let expected = record_weights(|vb| BeitForMim::new(cfg, vb).map(|_| ()))?;
    let mut out = HashMap::new();
    for (name, shape) in expected {
        let last = name.rsplit('.').next().unwrap_or(&name);
        let neck = name
            .strip_prefix("cls_pt_layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|k| k.parse::<usize>().ok());
        let block = name
            .strip_prefix("blocks.")
            .and_then(|r| r.split('.').next())
            .and_then(|k| k.parse::<usize>().ok());
        let zeros = || Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu);
        let t = if matches!(last, "gamma_1" | "gamma_2") {
            Tensor::full(cfg.layer_scale_init as f32, shape.as_slice(), &Device::Cpu)?
        } else if name.contains("norm") && shape.len() == 1 {
            if last == "weight" {
                Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu)?
            } else {
                zeros()?
            }
        } else if matches!(last, "q_bias" | "v_bias")
            || name.ends_with("relative_position_bias_table")
        {
            zeros()?
        } else if let Some(k) = neck {
            // PyTorch's nn.Linear default: kaiming_uniform(a=√5) = U(±1/√fan_in), bias too.
            let fan_in = match shape.as_slice() {
                [_, i] => *i,
                _ => cfg.backbone.embed_dim,
            };
            let bound = 1.0 / (fan_in as f64).sqrt();
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            let mut w = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?;
            if name.ends_with("attn.proj.weight") || name.ends_with("mlp.fc2.weight") {
                w = (w / (2.0 * (cfg.early_layers + k + 1) as f64).sqrt())?;
            }
            w
        } else if shape.len() == 1 {
            zeros()?
        } else {
            let mut w = trunc_normal_within(&shape, 0.02, 1.0, &mut rng)?;
            if let Some(i) = block
                && (name.ends_with("attn.proj.weight") || name.ends_with("mlp.fc2.weight"))
            {
                w = (w / (2.0 * (i + 1) as f64).sqrt())?;
            }
            w
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Maps a pretraining checkpoint's keys to ours (unilm's names): mmpretrain's
/// `backbone.*` / `neck.patch_aggregation.*` / `neck.norm.*` /
/// `head.cls_head.*` layout is renamed; unilm and our files pass through.
/// Index buffers are dropped.
pub fn pretraining_state(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let sd = checkpoint::read_state_dict(path)?;
    let mut out = BTreeMap::new();
    for (k, v) in sd.tensors {
        if k.ends_with("relative_position_index") || k.starts_with("target_generator.") {
            continue;
        }
        let k = if let Some(rest) = k.strip_prefix("neck.patch_aggregation.") {
            // Block keys inside the neck use mmpretrain's per-layer names.
            let timm = checkpoint::keymap::mmpretrain_to_timm(&format!("layers.{rest}"));
            format!("cls_pt_layers.{}", &timm["blocks.".len()..])
        } else if let Some(rest) = k.strip_prefix("neck.norm.") {
            format!("norm.{rest}")
        } else if let Some(rest) = k.strip_prefix("head.cls_head.") {
            format!("lm_head.{rest}")
        } else {
            k
        };
        out.insert(k, v);
    }
    Ok(out)
}

/// The student with its weights as trainable variables.
pub struct Student {
    pub model: BeitForMim,
    pub vars: Vec<(String, Var)>,
}

impl Student {
    pub fn new(cfg: &MimConfig, weights: HashMap<String, Tensor>) -> Result<Self> {
        let (vars, vb) = trainable_vars(weights)?;
        Ok(Self {
            model: BeitForMim::new(cfg, vb)?,
            vars,
        })
    }

    /// Writes the student in unilm's key layout with its configs in the
    /// metadata (the backbone's too, so classify/features/linprobe load it).
    pub fn export(&self, path: &Path) -> Result<()> {
        let t: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let mut cfg = self.model.cfg.clone();
        cfg.backbone.drop_path_rate = 0.0;
        let mut meta = HashMap::new();
        meta.insert(
            MIM_CONFIG_METADATA_KEY.to_string(),
            serde_json::to_string(&cfg)?,
        );
        meta.insert(
            CONFIG_METADATA_KEY.to_string(),
            serde_json::to_string(&cfg.backbone)?,
        );
        let bytes = safetensors::serialize(t.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
            .map_err(|e| anyhow::anyhow!("serialising {}: {e}", path.display()))?;
        crate::util::write_atomic(path, &bytes)
    }
}

/// Loads the student's starting weights: `weights` (strictly checked,
/// pretraining layouts mapped) or a fresh init.
pub fn student_weights(
    cfg: &MimConfig,
    weights: Option<&Path>,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    let Some(path) = weights else {
        return init_mim_weights(cfg, seed);
    };
    let t = pretraining_state(path)?;
    let expected = record_weights(|vb| BeitForMim::new(cfg, vb).map(|_| ()))?;
    checkpoint::strict_check(&path.display().to_string(), &t, &expected)?;
    checkpoint::to_f32(t)
}

impl SampleTransform for TwoViewTransform {
    fn apply(&self, img: &RgbImage, rng: &mut ChaCha8Rng) -> Result<Vec<f32>> {
        TwoViewTransform::apply(self, img, rng)
    }
    fn output_hw(&self) -> (usize, usize) {
        self.crop.size
    }
    fn output_len(&self) -> usize {
        self.record_len()
    }
}

/// One batch of pretraining inputs as tensors.
pub struct MimBatch {
    /// Student view (B, 3, H, W).
    pub images: Tensor,
    /// Tokenizer view in [0, 1] (B, 3, H2, W2).
    pub second: Tensor,
    /// (B, P) with 1 at masked patches.
    pub mask: Tensor,
    /// Flat indices `b·P + p` of the masked patches, ascending.
    pub masked: Vec<u32>,
}

impl MimBatch {
    /// Splits the loader's records (see [`TwoViewTransform`]).
    pub fn from_records(b: &Batch, t: &TwoViewTransform) -> Result<Self> {
        let n = b.len();
        let (h, w) = t.crop.size;
        let (h2, w2) = t.second_size;
        let p = t.mask.height * t.mask.width;
        let len = t.record_len();
        let (l1, l2) = (3 * h * w, 3 * h2 * w2);
        let (mut v1, mut v2, mut m) = (
            Vec::with_capacity(n * l1),
            Vec::with_capacity(n * l2),
            Vec::with_capacity(n * p),
        );
        for rec in b.images.chunks_exact(len) {
            v1.extend_from_slice(&rec[..l1]);
            v2.extend_from_slice(&rec[l1..l1 + l2]);
            m.extend_from_slice(&rec[l1 + l2..]);
        }
        let masked = m
            .iter()
            .enumerate()
            .filter(|(_, v)| **v > 0.5)
            .map(|(i, _)| i as u32)
            .collect();
        Ok(Self {
            images: Tensor::from_vec(v1, (n, 3, h, w), &Device::Cpu)?,
            second: Tensor::from_vec(v2, (n, 3, h2, w2), &Device::Cpu)?,
            mask: Tensor::from_vec(m, (n, p), &Device::Cpu)?,
            masked,
        })
    }
}

/// The two losses and accuracies of one batch.
pub struct MimLoss {
    pub loss: Tensor,
    pub loss_main: f32,
    pub loss_agg: f32,
    /// Percent of masked patches whose token the branch predicts (argmax).
    pub acc_main: f64,
    pub acc_agg: f64,
    /// Every token id of the batch's tokenizer view (usage statistics).
    pub ids: Vec<u32>,
}

/// Token ids (B, P) of the tokenizer view (in [0, 1]), no gradient.
pub fn targets(tokenizer: &Vqkd, second: &Tensor) -> Result<Vec<u32>> {
    let ids = tokenizer.tokens(&Vqkd::preprocess(&second.detach())?)?;
    Ok(ids.flatten_all()?.to_vec1::<u32>()?)
}

fn accuracy(logits: &Tensor, labels: &[u32]) -> Result<f64> {
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let hits = pred.iter().zip(labels).filter(|(a, b)| a == b).count();
    Ok(100.0 * hits as f64 / labels.len().max(1) as f64)
}

/// Forward, both cross-entropies (mean over masked patches) and accuracies.
pub fn mim_loss(
    model: &BeitForMim,
    batch: &MimBatch,
    ids: Vec<u32>,
    rng: Option<&mut ChaCha8Rng>,
) -> Result<MimLoss> {
    if batch.masked.is_empty() {
        bail!("no patch is masked: set mask.num_patches ≥ 1");
    }
    let labels: Vec<u32> = batch.masked.iter().map(|&i| ids[i as usize]).collect();
    let masked = Tensor::new(batch.masked.as_slice(), &Device::Cpu)?;
    let logits = model.forward(&batch.images, &batch.mask, &masked, rng)?;
    let y = Tensor::new(labels.as_slice(), &Device::Cpu)?;
    let l1 = candle_nn::loss::cross_entropy(&logits.main, &y)?;
    let l2 = candle_nn::loss::cross_entropy(&logits.aggregated, &y)?;
    Ok(MimLoss {
        loss_main: l1.to_scalar::<f32>()?,
        loss_agg: l2.to_scalar::<f32>()?,
        acc_main: accuracy(&logits.main, &labels)?,
        acc_agg: accuracy(&logits.aggregated, &labels)?,
        loss: (l1 + l2)?,
        ids,
    })
}

/// Pretraining as an [`Objective`].
struct MimObjective<'a> {
    student: Student,
    tokenizer: &'a Vqkd,
    transform: TwoViewTransform,
    /// Target-token counts over the current epoch.
    counts: Vec<u64>,
}

impl Objective for MimObjective<'_> {
    fn trainable(&self) -> Vec<(String, Var)> {
        self.student.vars.clone()
    }
    fn param_groups(&self) -> (usize, DecayRule) {
        // No layer decay in pretraining (layer_decay = 1 in the recipes).
        (self.student.model.cfg.backbone.depth, DecayRule::Pretrain)
    }
    fn loss(&mut self, b: &Batch, rng: &mut ChaCha8Rng) -> Result<Option<(Tensor, Metrics)>> {
        if b.is_empty() {
            return Ok(None);
        }
        let batch = MimBatch::from_records(b, &self.transform)?;
        let ids = targets(self.tokenizer, &batch.second)?;
        let l = mim_loss(&self.student.model, &batch, ids, Some(rng))?;
        for &i in &l.ids {
            self.counts[i as usize] += 1;
        }
        let usage = CodeUsage {
            counts: code_counts(&l.ids, self.counts.len()),
        };
        let m = serde_json::json!({
            "loss_main": l.loss_main, "loss_agg": l.loss_agg,
            "mim_acc_main": l.acc_main, "mim_acc_agg": l.acc_agg,
            "target_codes": self.counts.len() - usage.unused(),
        });
        Ok(Some((l.loss, m.as_object().cloned().unwrap_or_default())))
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![("target_counts".into(), counts_tensor(&self.counts)?)])
    }
    fn restore(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.counts = counts_from(state, "target_counts", self.counts.len())?;
        Ok(())
    }
    fn end_epoch(&mut self, _epoch: usize) -> Result<Option<EpochRecord>> {
        let n = self.counts.len();
        let usage = CodeUsage {
            counts: std::mem::replace(&mut self.counts, vec![0; n]),
        };
        let values = serde_json::json!({
            "target_used_codes": n - usage.unused(), "target_perplexity": usage.perplexity(),
        });
        Ok(Some(EpochRecord {
            kind: "epoch",
            values: values.as_object().cloned().unwrap_or_default(),
            score: None,
            summary: format!(
                "targets used {} of {n} codes, perplexity {:.1}",
                n - usage.unused(),
                usage.perplexity()
            ),
        }))
    }
    fn export(&self, out: &Path, _best: bool) -> Result<()> {
        self.student.export(&out.join("pretrain-last.safetensors"))
    }
    fn charts(&self) -> Vec<ChartSpec> {
        vec![
            ChartSpec {
                title: "MIM loss",
                y_label: "cross-entropy",
                series: vec![
                    ("total", "train", "loss"),
                    ("last block", "train", "loss_main"),
                    ("aggregation", "train", "loss_agg"),
                ],
            },
            ChartSpec {
                title: "MIM accuracy (masked patches)",
                y_label: "%",
                series: vec![
                    ("last block", "train", "mim_acc_main"),
                    ("aggregation", "train", "mim_acc_agg"),
                ],
            },
            ChartSpec {
                title: "learning rate",
                y_label: "lr",
                series: vec![("lr", "train", "lr")],
            },
        ]
    }
}

/// Loads the frozen tokenizer of a recipe.
pub fn load_tokenizer(src: &TokenizerSource) -> Result<Vqkd> {
    // Only the encoder labels patches: a decoder in the file is ignored.
    let cfg = src
        .arch
        .as_deref()
        .map(|a| {
            VqkdConfig::preset(a).map(|c| VqkdConfig {
                decoder_depth: 0,
                ..c
            })
        })
        .transpose()?;
    checkpoint::load_vqkd(&src.weights, cfg)
        .with_context(|| format!("loading the tokenizer {}", src.weights.display()))
}

/// Runs MIM pretraining; returns the exported student's path.
pub fn pretrain(recipe: &PretrainRecipe, resume: bool) -> Result<PathBuf> {
    let tokenizer = load_tokenizer(&recipe.tokenizer)?;
    let cfg = recipe.model_config(tokenizer.cfg.n_codes)?;
    check_tokenizer_fits(&tokenizer.cfg, &cfg)?;
    let mask = recipe.mask_generator(cfg.backbone.grid())?;
    let b = &cfg.backbone;
    let mut transform = TwoViewTransform::beitv2(
        (b.img_size[0], b.img_size[1]),
        (tokenizer.cfg.img_size, tokenizer.cfg.img_size),
        b.mean,
        b.std,
        mask,
    );
    transform.crop.scale = (recipe.data.min_crop_scale, 1.0);
    let j = recipe.data.color_jitter;
    transform.jitter = (j > 0.0).then_some(ColorJitter {
        brightness: j,
        contrast: j,
        saturation: j,
    });
    let d = &recipe.data;
    let mut data = open_dataset(&d.train)?;
    if d.limit > 0 && d.limit < data.len() {
        data = data.subset(&(0..d.limit).collect::<Vec<_>>());
    }
    let (loader, _) = train_loader_with(
        Arc::new(data),
        transform.clone(),
        d.batch_size,
        d.workers,
        recipe.run.seed,
    )?;
    let weights = student_weights(&cfg, recipe.model.weights.as_deref(), recipe.run.seed)?;
    let mut obj = MimObjective {
        student: Student::new(&cfg, weights)?,
        tokenizer: &tokenizer,
        transform,
        counts: vec![0; cfg.vocab_size],
    };
    let loop_cfg = LoopConfig {
        schedule: &recipe.schedule,
        optim: &recipe.optim,
        run: &recipe.run,
    };
    super::engine::run(&mut obj, &loader, &loop_cfg, recipe, resume)?;
    Ok(recipe.run.output.join("pretrain-last.safetensors"))
}
