//! AdamW with BEiT's parameter groups (layer-wise lr decay, no weight decay
//! for biases, norms, layer scale, tokens, position embeddings and
//! relative-position tables), the unilm cosine schedule, and gradient clipping
//! by global norm — each with PyTorch's arithmetic (spec F.5, G.2, M).

use crate::kernels::{with_f32, with_f32_mut};
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
    /// `p −= lr/bc1 · m / (sqrt(v)/sqrt(bc2) + eps)`. Every gradient is first
    /// multiplied by `grad_scale` ([`GradClip::scale`], 1 for none), as
    /// `clip_grad_norm_` does before the step. Parameters without a gradient
    /// are left alone. Weights and moments are updated in place, in one pass.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f32) -> Result<()> {
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
                grad_scale,
                decay: (1.0 - plr * p.group.weight_decay) as f32,
                b1: b1 as f32,
                one_minus_b1: (1.0 - b1) as f32,
                b2: b2 as f32,
                one_minus_b2: (1.0 - b2) as f32,
                inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
                eps: cfg.eps as f32,
                step_size: (plr / bc1) as f32,
            };
            with_f32(g, |g| {
                with_f32_mut(p.var.as_tensor(), |w| {
                    with_f32_mut(&p.exp_avg, |m| {
                        with_f32_mut(&p.exp_avg_sq, |v| {
                            if g.len() != w.len() || m.len() != w.len() || v.len() != w.len() {
                                candle_core::bail!(
                                    "AdamW: {} has {} values, its gradient {} and moments {} / {}",
                                    p.name,
                                    w.len(),
                                    g.len(),
                                    m.len(),
                                    v.len()
                                );
                            }
                            adamw_update(w, g, m, v, &consts);
                            Ok(())
                        })
                    })
                })
            })
            .with_context(|| format!("updating {}", p.name))
        })?;
        Ok(())
    }
}

/// Per-parameter scalars of one AdamW step, as f32.
struct AdamConsts {
    grad_scale: f32,
    decay: f32,
    b1: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    inv_bc2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

/// One fused AdamW update of a parameter, in place, with the operation order
/// of `torch.optim.AdamW` (decay first; candle's ops would round differently
/// only in the last bit).
fn adamw_update(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &AdamConsts) {
    for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * c.grad_scale;
        let mi = *m * c.b1 + g * c.one_minus_b1;
        let vi = *v * c.b2 + (g * g) * c.one_minus_b2;
        let denom = vi.sqrt() * c.inv_bc2_sqrt + c.eps;
        *w = *w * c.decay - (mi / denom) * c.step_size;
        *m = mi;
        *v = vi;
    }
}

/// The global L2 norm of all gradients and the factor that clips it to
/// `max_norm`, as `torch.nn.utils.clip_grad_norm_` computes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradClip {
    /// The norm before clipping.
    pub norm: f64,
    /// `max_norm / (norm + 1e-6)` when that is below 1 (and `max_norm > 0`),
    /// else 1: what [`AdamW::step`] multiplies every gradient by.
    pub scale: f32,
}

/// [`GradClip`] of `grads` over `params`. The sums of squares are taken in
/// f64 in a fixed order, so the result does not depend on thread scheduling.
pub fn grad_clip(grads: &GradStore, params: &[Param], max_norm: f64) -> Result<GradClip> {
    let sums = params
        .par_iter()
        .map(|p| match grads.get(p.var.as_tensor()) {
            Some(g) => with_f32(g, |g| Ok(sum_of_squares(g))),
            None => Ok(0.0),
        })
        .collect::<candle_core::Result<Vec<f64>>>()?;
    let norm = sums.iter().sum::<f64>().sqrt();
    let coef = max_norm / (norm + 1e-6);
    let scale = if max_norm > 0.0 && coef < 1.0 {
        coef as f32
    } else {
        1.0
    };
    Ok(GradClip { norm, scale })
}

/// Σ x² in f64, over 8 lanes (which the compiler keeps in vector registers).
fn sum_of_squares(x: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| v as f64 * v as f64)
        .sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v as f64 * v as f64;
        }
    }
    lanes.iter().sum::<f64>() + tail
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

    /// Two parameters, one used twice in the loss (its gradient is a sum of
    /// two contributions), with gradients of norm well above `max_norm`.
    fn tiny_problem() -> (Vec<(String, Var)>, Tensor) {
        let dev = candle_core::Device::Cpu;
        let w = Var::from_vec(vec![1.0f32, -2.0, 3.0, 0.5], (2, 2), &dev).unwrap();
        let b = Var::from_vec(vec![0.25f32, -0.75], 2, &dev).unwrap();
        let x = Tensor::from_vec(vec![2.0f32, -1.0, 4.0, 3.0], (2, 2), &dev).unwrap();
        let y = x.matmul(&w.as_tensor().t().unwrap()).unwrap();
        let y = y.broadcast_add(b.as_tensor()).unwrap();
        let loss = ((&y * &y).unwrap().sum_all().unwrap()
            + w.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        let vars = vec![("head.weight".to_string(), w), ("head.bias".to_string(), b)];
        (vars, loss)
    }

    fn cfg(clip_grad: f64) -> OptimConfig {
        OptimConfig {
            lr: 0.1,
            min_lr: 0.0,
            weight_decay: 0.05,
            betas: [0.9, 0.999],
            eps: 1e-8,
            layer_decay: 1.0,
            clip_grad,
        }
    }

    fn values(vars: &[(String, Var)]) -> Vec<Vec<f32>> {
        vars.iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }

    /// The clipping factor folded into the in-place update gives the weights
    /// that clipping the gradients first and stepping on them gives.
    #[test]
    fn clipped_in_place_step_equals_a_step_on_clipped_gradients() {
        let (vars, loss) = tiny_problem();
        let grads = loss.backward().unwrap();
        let clip = grad_clip(&grads, &[], 1.0).unwrap();
        assert_eq!(clip.norm, 0.0, "no parameters, no norm");
        let mut opt = AdamW::new(vars.clone(), 0, cfg(1.0)).unwrap();
        let clip = grad_clip(&grads, &opt.params, 1.0).unwrap();
        // The norm by hand, from the gradients candle computed.
        let want: f64 = vars
            .iter()
            .flat_map(|(_, v)| {
                let g = grads.get(v.as_tensor()).unwrap();
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .map(|g| g as f64 * g as f64)
            .sum::<f64>()
            .sqrt();
        assert!(
            (clip.norm - want).abs() <= 1e-9 * want,
            "{} vs {want}",
            clip.norm
        );
        assert!(clip.norm > 10.0, "the test needs clipping to act");
        assert_eq!(clip.scale, (1.0 / (want + 1e-6)) as f32);

        // The same problem again, stepped on gradients scaled beforehand.
        let (vars_b, loss_b) = tiny_problem();
        let grads_b = loss_b.backward().unwrap();
        let mut scaled = GradStore::default();
        for (_, v) in &vars_b {
            let g = grads_b.get(v.as_tensor()).unwrap();
            scaled.insert(v.as_tensor(), (g * clip.scale as f64).unwrap());
        }
        let mut opt_b = AdamW::new(vars_b.clone(), 0, cfg(1.0)).unwrap();
        opt.step(&grads, 0.1, clip.scale).unwrap();
        opt_b.step(&scaled, 0.1, 1.0).unwrap();
        assert_eq!(values(&vars), values(&vars_b));
        // And the update moved every weight (the Vars' own storage).
        let before = values(&tiny_problem().0);
        for (a, b) in values(&vars).iter().flatten().zip(before.iter().flatten()) {
            assert_ne!(a, b);
        }
        // No clipping below the bound.
        let loose = grad_clip(&grads, &opt.params, 1e6).unwrap();
        assert_eq!(loose.scale, 1.0);
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
