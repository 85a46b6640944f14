//! The two things the engine trains: a whole BEiT (fine-tuning) and a linear
//! head on frozen BEiT features (linear probing).

use super::engine::Task;
use crate::checkpoint::{self, LoadOptions};
use crate::model::{Beit, BeitConfig, expected_weights};
use anyhow::{Context, Result};
use candle_core::{D, DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Truncated normal (cut at ±2σ), as timm's `trunc_normal_(std=0.02)` is used.
fn trunc_normal(shape: &[usize], std: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    trunc_normal_within(shape, std, 2.0, rng)
}

/// Normal(0, std²) truncated to ±`cut`·std (redrawn outside).
pub fn trunc_normal_within(
    shape: &[usize],
    std: f64,
    cut: f64,
    rng: &mut ChaCha8Rng,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let dist = Normal::new(0.0, std)?;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            loop {
                let v: f64 = dist.sample(rng);
                if v.abs() <= cut * std {
                    break v as f32;
                }
            }
        })
        .collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// Fresh weights for training from scratch (spec A.7): trunc-normal 0.02 for
/// matrices, tokens and the patch embedding; zero biases and tables; unit
/// LayerNorm; layer scale 0.1; `attn.proj` and `mlp.fc2` of block i divided
/// by sqrt(2·(i+1)); the head additionally scaled by 0.001.
pub fn init_weights(cfg: &BeitConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for (name, shape) in expected_weights(cfg)? {
        let t = if name.ends_with("gamma_1") || name.ends_with("gamma_2") {
            Tensor::full(0.1f32, shape.as_slice(), &Device::Cpu)?
        } else if name.contains("norm") && name.ends_with(".weight") {
            Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu)?
        } else if shape.len() == 1 || name.ends_with("relative_position_bias_table") {
            Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu)?
        } else {
            let mut w = trunc_normal(&shape, 0.02, &mut rng)?;
            if let Some(i) = name
                .strip_prefix("blocks.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
                && (name.ends_with("attn.proj.weight") || name.ends_with("mlp.fc2.weight"))
            {
                w = (w / (2.0 * (i + 1) as f64).sqrt())?;
            }
            if name == "head.weight" {
                w = (w * 0.001)?;
            }
            w
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Weights for fine-tuning: from a checkpoint (with a fresh head when the
/// checkpoint has none or another class count) or from scratch.
pub fn finetune_weights(
    weights: Option<&Path>,
    cfg: &BeitConfig,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    let fresh = init_weights(cfg, seed)?;
    let Some(path) = weights else {
        return Ok(fresh);
    };
    let mut sd = checkpoint::read_state_dict(path)?;
    let head_fits = sd
        .tensors
        .get("head.weight")
        .is_some_and(|h| h.dims() == [cfg.num_classes, cfg.embed_dim]);
    if !head_fits {
        sd.tensors.retain(|k, _| !k.starts_with("head."));
        for k in ["head.weight", "head.bias"] {
            if let Some(t) = fresh.get(k) {
                sd.tensors.insert(k.to_string(), t.clone());
            }
        }
        tracing::info!("{}: new {}-class head", path.display(), cfg.num_classes);
    }
    // A pretraining backbone has no fc_norm: start it at identity.
    for k in ["fc_norm.weight", "fc_norm.bias"] {
        if let (false, Some(t)) = (sd.tensors.contains_key(k), fresh.get(k)) {
            sd.tensors.insert(k.to_string(), t.clone());
        }
    }
    checkpoint::adapt_to_config(&sd, cfg, Default::default())
}

/// Fine-tuning: every weight is trainable.
pub struct Finetune {
    pub model: Beit,
    vars: Vec<(String, Var)>,
}

impl Finetune {
    pub fn new(cfg: &BeitConfig, weights: HashMap<String, Tensor>) -> Result<Self> {
        let (vars, vb) = trainable_vars(weights)?;
        Ok(Self {
            model: Beit::new(cfg, vb)?,
            vars,
        })
    }
}

/// Weights as trainable variables sorted by name, and a VarBuilder that
/// hands the model those same variables (so gradients reach them).
pub fn trainable_vars(
    weights: HashMap<String, Tensor>,
) -> Result<(Vec<(String, Var)>, VarBuilder<'static>)> {
    let mut vars: Vec<(String, Var)> = weights
        .into_iter()
        .map(|(k, t)| Ok((k, Var::from_tensor(&t)?)))
        .collect::<Result<_>>()?;
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    Ok((vars, vb))
}

impl Task for Finetune {
    fn logits(&self, x: &Tensor, train_rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        Ok(match train_rng {
            Some(rng) => self.model.forward_train(x, rng)?,
            None => self.model.forward(&x.detach())?,
        })
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }
    fn export(&self, path: &Path) -> Result<()> {
        let t: HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let mut cfg = self.model.cfg.clone();
        cfg.drop_path_rate = 0.0;
        checkpoint::save_safetensors(path, &t, &cfg)
    }
    fn input_hw(&self) -> (usize, usize) {
        (self.model.cfg.img_size[0], self.model.cfg.img_size[1])
    }
    fn num_classes(&self) -> usize {
        self.model.cfg.num_classes
    }
    fn depth(&self) -> usize {
        self.model.cfg.depth
    }
}

/// Linear probing: a linear head on `[CLS ; mean of patch tokens]` of one
/// block's output (raw tokens) of a frozen backbone — the BEiT v1
/// `run_linear_eval.py` feature, since no reference ships a v2 protocol.
pub struct LinearProbe {
    pub backbone: Beit,
    pub layer: i64,
    weight: Var,
    bias: Var,
    num_classes: usize,
}

impl LinearProbe {
    pub fn new(
        weights: &Path,
        opts: &LoadOptions,
        layer: i64,
        num_classes: usize,
        seed: u64,
    ) -> Result<Self> {
        let (mut cfg, w) = checkpoint::load_weights(weights, opts)?;
        let w: HashMap<String, Tensor> = w
            .into_iter()
            .filter(|(k, _)| !k.starts_with("head."))
            .collect();
        cfg.num_classes = 0;
        let backbone = checkpoint::build_model(&cfg, w)
            .with_context(|| format!("building the frozen backbone from {}", weights.display()))?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let feat = 2 * cfg.embed_dim;
        // BEiT's linear eval initialises the head with N(0, 0.01²) and zero bias.
        let weight = Var::from_tensor(&(trunc_normal(&[num_classes, feat], 0.01, &mut rng)?))?;
        let bias = Var::zeros(num_classes, DType::F32, &Device::Cpu)?;
        Ok(Self {
            backbone,
            layer,
            weight,
            bias,
            num_classes,
        })
    }

    fn features(&self, x: &Tensor) -> Result<Tensor> {
        let inter = self
            .backbone
            .forward_intermediates(&x.detach(), &[self.layer])?;
        let tokens = &inter.first().context("no intermediate output")?.tokens;
        let n = tokens.dim(1)?;
        let cls = tokens.i((.., 0))?;
        let mean = tokens.i((.., 1..n))?.mean(1)?;
        Ok(Tensor::cat(&[&cls, &mean], D::Minus1)?.detach())
    }
}

impl Task for LinearProbe {
    fn logits(&self, x: &Tensor, _: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let f = self.features(x)?;
        Ok(crate::model::layers::linear(
            &f,
            self.weight.as_tensor(),
            Some(self.bias.as_tensor()),
        )?)
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        vec![
            ("head.weight".into(), self.weight.clone()),
            ("head.bias".into(), self.bias.clone()),
        ]
    }
    fn export(&self, path: &Path) -> Result<()> {
        let mut t = BTreeMap::new();
        t.insert("head.weight".to_string(), self.weight.as_tensor().detach());
        t.insert("head.bias".to_string(), self.bias.as_tensor().detach());
        let mut meta = HashMap::new();
        meta.insert("beitv2_linprobe_layer".to_string(), self.layer.to_string());
        meta.insert(
            checkpoint::CONFIG_METADATA_KEY.to_string(),
            serde_json::to_string(&self.backbone.cfg)?,
        );
        let bytes = safetensors::serialize(t.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
            .map_err(|e| anyhow::anyhow!("serialising {}: {e}", path.display()))?;
        crate::util::write_atomic(path, &bytes)
    }
    fn input_hw(&self) -> (usize, usize) {
        (self.backbone.cfg.img_size[0], self.backbone.cfg.img_size[1])
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn depth(&self) -> usize {
        0
    }
}
