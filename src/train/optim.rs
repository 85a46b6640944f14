//! AdamW with BEiT's parameter groups (layer-wise lr decay, no weight decay
//! for biases, norms, layer scale, tokens, position embeddings and
//! relative-position tables), the unilm cosine schedule, and gradient clipping
//! by global norm — each with PyTorch's arithmetic (spec F.5, G.2, M).

use crate::kernels::with_f32;
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Where a parameter sits for layer-wise lr decay: tokens and the patch
/// embedding are layer 0, block `i` is layer `i + 1`, everything else (final
/// norms, head, a shared relative-position table) is layer `depth + 1`.
pub fn layer_id(name: &str, depth: usize) -> usize {
    if matches!(name, "cls_token" | "mask_token" | "pos_embed") || name.starts_with("patch_embed.")
    {
        return 0;
    }
    if let Some(rest) = name.strip_prefix("blocks.")
        && let Some(i) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok())
    {
        return i + 1;
    }
    depth + 1
}

/// No weight decay for 1-D parameters (biases, norms, layer-scale γ, q/v
/// biases), tokens, position embeddings and relative-position tables (also
/// inside a sub-model, e.g. `encoder.pos_embed` of a tokenizer).
pub fn decays(name: &str, rank: usize) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    !(rank <= 1
        || name.ends_with(".bias")
        || matches!(last, "cls_token" | "mask_token" | "pos_embed")
        || name.ends_with("relative_position_bias_table"))
}

/// Which parameters are exempt from weight decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecayRule {
    /// Fine-tuning and tokenizer training: [`decays`] (no decay for 1-D
    /// tensors, biases, tokens, position embeddings and relative-position
    /// tables).
    Finetune,
    /// unilm's MIM pretraining (`get_parameter_groups` with
    /// `no_weight_decay() = {pos_embed, cls_token}`): 1-D tensors, biases,
    /// `pos_embed` and `cls_token` only — the mask token and the shared
    /// relative-position table *are* decayed.
    Pretrain,
}

impl DecayRule {
    pub fn decays(self, name: &str, rank: usize) -> bool {
        match self {
            DecayRule::Finetune => decays(name, rank),
            DecayRule::Pretrain => {
                !(rank <= 1 || name.ends_with(".bias") || matches!(name, "pos_embed" | "cls_token"))
            }
        }
    }
}

/// Optimisation hyper-parameters (the `optim` section of a recipe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Layer-wise lr decay; 1.0 disables it.
    pub layer_decay: f64,
    /// Max global gradient norm; 0 disables clipping.
    pub clip_grad: f64,
}

/// Per-parameter settings derived from its name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupInfo {
    pub layer_id: usize,
    pub lr_scale: f64,
    pub weight_decay: f64,
}

pub fn group_info(name: &str, rank: usize, depth: usize, cfg: &OptimConfig) -> GroupInfo {
    group_info_with(name, rank, depth, cfg, DecayRule::Finetune)
}

/// [`group_info`] under another weight-decay rule.
pub fn group_info_with(
    name: &str,
    rank: usize,
    depth: usize,
    cfg: &OptimConfig,
    rule: DecayRule,
) -> GroupInfo {
    let id = layer_id(name, depth);
    GroupInfo {
        layer_id: id,
        lr_scale: cfg.layer_decay.powi((depth + 1).saturating_sub(id) as i32),
        weight_decay: if rule.decays(name, rank) {
            cfg.weight_decay
        } else {
            0.0
        },
    }
}

/// One trainable tensor with its Adam moments.
pub struct Param {
    pub name: String,
    pub var: Var,
    pub group: GroupInfo,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

pub struct AdamW {
    pub params: Vec<Param>,
    pub cfg: OptimConfig,
    /// Steps taken (PyTorch keeps one count per parameter; all move together here).
    pub step: u64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, depth: usize, cfg: OptimConfig) -> Result<Self> {
        Self::with_rule(vars, depth, cfg, DecayRule::Finetune)
    }

    /// [`AdamW::new`] with the parameter groups of `rule`.
    pub fn with_rule(
        vars: Vec<(String, Var)>,
        depth: usize,
        cfg: OptimConfig,
        rule: DecayRule,
    ) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let t = var.as_tensor();
                Ok(Param {
                    group: group_info_with(&name, t.rank(), depth, &cfg, rule),
                    exp_avg: t.zeros_like()?,
                    exp_avg_sq: t.zeros_like()?,
                    name,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            cfg,
            step: 0,
        })
    }

    /// One AdamW step at base learning rate `lr` (each parameter uses
    /// `lr · lr_scale`), as `torch.optim.AdamW`: decoupled decay first, then
    /// `p −= lr/bc1 · m / (sqrt(v)/sqrt(bc2) + eps)`. Parameters without a
    /// gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let [b1, b2] = self.cfg.betas;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - b2.powi(self.step as i32)).sqrt();
        let cfg = &self.cfg;
        self.params.par_iter_mut().try_for_each(|p| -> Result<()> {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                return Ok(());
            };
            let plr = lr * p.group.lr_scale;
            let consts = AdamConsts {
                decay: (1.0 - plr * p.group.weight_decay) as f32,
                b1: b1 as f32,
                one_minus_b1: (1.0 - b1) as f32,
                b2: b2 as f32,
                one_minus_b2: (1.0 - b2) as f32,
                inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
                eps: cfg.eps as f32,
                step_size: (plr / bc1) as f32,
            };
            let w = p.var.as_tensor().detach();
            let (w, m, v) = with_f32(&w, |w| {
                with_f32(g, |g| {
                    with_f32(&p.exp_avg, |m| {
                        with_f32(&p.exp_avg_sq, |v| Ok(adamw_update(w, g, m, v, &consts)))
                    })
                })
            })?;
            let (shape, dev) = (p.var.as_tensor().shape().clone(), p.var.device().clone());
            p.exp_avg = Tensor::from_vec(m, shape.clone(), &dev)?;
            p.exp_avg_sq = Tensor::from_vec(v, shape.clone(), &dev)?;
            p.var
                .set(&Tensor::from_vec(w, shape, &dev)?)
                .with_context(|| format!("updating {}", p.name))?;
            Ok(())
        })?;
        Ok(())
    }
}

/// Per-parameter scalars of one AdamW step, as f32.
struct AdamConsts {
    decay: f32,
    b1: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    inv_bc2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

/// One fused AdamW update of a parameter: new (weight, exp_avg, exp_avg_sq),
/// with the operation order of `torch.optim.AdamW` (decay first; candle's
/// scalar division is a multiplication by the reciprocal).
fn adamw_update(
    w: &[f32],
    g: &[f32],
    m: &[f32],
    v: &[f32],
    c: &AdamConsts,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut nw = Vec::with_capacity(w.len());
    let mut nm = Vec::with_capacity(w.len());
    let mut nv = Vec::with_capacity(w.len());
    for i in 0..w.len() {
        let mi = m[i] * c.b1 + g[i] * c.one_minus_b1;
        let vi = v[i] * c.b2 + (g[i] * g[i]) * c.one_minus_b2;
        let denom = vi.sqrt() * c.inv_bc2_sqrt + c.eps;
        nw.push(w[i] * c.decay - (mi / denom) * c.step_size);
        nm.push(mi);
        nv.push(vi);
    }
    (nw, nm, nv)
}

/// Global L2 norm of all gradients; when above `max_norm` every gradient is
/// scaled by `max_norm / (norm + 1e-6)` (`torch.nn.utils.clip_grad_norm_`).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[Param], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            let n = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
            sq += n * n;
        }
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for p in params {
                if let Some(g) = grads.remove(p.var.as_tensor()) {
                    grads.insert(p.var.as_tensor(), (g * coef)?);
                }
            }
        }
    }
    Ok(norm)
}

/// unilm's `cosine_scheduler`: `linspace(0, base, warmup)` for the first
/// `warmup` iterations, then cosine from `base` to `min` over the rest.
pub fn cosine_lr(base: f64, min: f64, warmup: usize, total: usize, t: usize) -> f64 {
    if t < warmup {
        if warmup == 1 {
            return 0.0;
        }
        return base * t as f64 / (warmup - 1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((t - warmup) as f64 / span).min(1.0);
    min + 0.5 * (base - min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ids_follow_unilm() {
        assert_eq!(layer_id("cls_token", 12), 0);
        assert_eq!(layer_id("patch_embed.proj.weight", 12), 0);
        assert_eq!(layer_id("blocks.0.norm1.weight", 12), 1);
        assert_eq!(layer_id("blocks.11.attn.qkv.weight", 12), 12);
        assert_eq!(layer_id("fc_norm.weight", 12), 13);
        assert_eq!(layer_id("head.bias", 12), 13);
        assert_eq!(
            layer_id("rel_pos_bias.relative_position_bias_table", 12),
            13
        );
    }

    #[test]
    fn weight_decay_groups() {
        assert!(decays("blocks.0.attn.qkv.weight", 2));
        assert!(decays("head.weight", 2));
        assert!(!decays("blocks.0.attn.q_bias", 1));
        assert!(!decays("blocks.0.gamma_1", 1));
        assert!(!decays("cls_token", 3));
        assert!(!decays("blocks.3.attn.relative_position_bias_table", 2));
        assert!(!decays("fc_norm.weight", 1));
        assert!(!decays("encoder.pos_embed", 3));
        assert!(decays("encoder.blocks.0.mlp.fc1.weight", 2));
    }

    #[test]
    fn schedule_shape() {
        // warmup linspace(0, 1, 3) = 0, 0.5, 1; then cosine from 1 to 0 over 4 steps.
        let lr: Vec<f64> = (0..7).map(|t| cosine_lr(1.0, 0.0, 3, 7, t)).collect();
        assert_eq!(&lr[..3], &[0.0, 0.5, 1.0]);
        assert!((lr[3] - 1.0).abs() < 1e-12);
        assert!((lr[5] - 0.5).abs() < 1e-12);
        assert!(lr[6] < 0.2);
    }
}
