//! The OpenAI CLIP ViT vision tower, used as the VQ-KD teacher (spec E.6):
//! conv patch embedding without bias, class embedding, position embedding,
//! `ln_pre`, pre-norm residual blocks with QuickGELU, `ln_post` and `proj`.
//! LayerNorm eps 1e-5. Weights under OpenAI's names (`visual.` prefix in a
//! full CLIP state dict, which open_clip's ViT towers share).

use super::layers::{LayerNorm, Linear, linear, softmax_last};
use candle_core::{D, IndexOp, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// CLIP's normalisation of its input images.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipVisionConfig {
    pub img_size: usize,
    pub patch_size: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub output_dim: usize,
}

impl ClipVisionConfig {
    /// OpenAI CLIP ViT-B/16, the teacher of the released tokenizers.
    pub fn vit_b16() -> Self {
        Self {
            img_size: 224,
            patch_size: 16,
            width: 768,
            layers: 12,
            heads: 12,
            output_dim: 512,
        }
    }
}

#[derive(Debug, Clone)]
struct ResidualBlock {
    ln_1: LayerNorm,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    heads: usize,
}

/// `x·σ(1.702·x)`.
fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

impl ResidualBlock {
    fn new(w: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let attn = vb.pp("attn");
        Ok(Self {
            ln_1: LayerNorm::new(w, 1e-5, vb.pp("ln_1"))?,
            in_proj_weight: attn.get((3 * w, w), "in_proj_weight")?,
            in_proj_bias: attn.get(3 * w, "in_proj_bias")?,
            out_proj: Linear::new(w, w, true, attn.pp("out_proj"))?,
            ln_2: LayerNorm::new(w, 1e-5, vb.pp("ln_2"))?,
            c_fc: Linear::new(w, 4 * w, true, vb.pp("mlp").pp("c_fc"))?,
            c_proj: Linear::new(4 * w, w, true, vb.pp("mlp").pp("c_proj"))?,
            heads,
        })
    }

    fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let (h, d) = (self.heads, c / self.heads);
        let qkv = linear(x, &self.in_proj_weight, Some(&self.in_proj_bias))?
            .reshape((b, n, 3, h, d))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)? * (d as f64).powf(-0.5))?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let attn = softmax_last(&q.matmul(&k.transpose(D::Minus2, D::Minus1)?)?)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.out_proj.forward(&out)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention(&self.ln_1.forward(x)?)?)?;
        let m = self
            .c_proj
            .forward(&quick_gelu(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?)?;
        &x + m
    }
}

#[derive(Debug, Clone)]
pub struct ClipVision {
    pub cfg: ClipVisionConfig,
    conv1: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    blocks: Vec<ResidualBlock>,
    ln_post: LayerNorm,
    proj: Tensor,
}

impl ClipVision {
    /// `vb` addresses the tower itself (pass `vb.pp("visual")` for a full CLIP state dict).
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let w = cfg.width;
        let p = cfg.patch_size;
        let g = cfg.img_size / p;
        let blocks = (0..cfg.layers)
            .map(|i| ResidualBlock::new(w, cfg.heads, vb.pp("transformer").pp("resblocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            conv1: vb.get((w, 3, p, p), "conv1.weight")?,
            class_embedding: vb.get(w, "class_embedding")?,
            positional_embedding: vb.get((g * g + 1, w), "positional_embedding")?,
            ln_pre: LayerNorm::new(w, 1e-5, vb.pp("ln_pre"))?,
            blocks,
            ln_post: LayerNorm::new(w, 1e-5, vb.pp("ln_post"))?,
            proj: vb.get((w, cfg.output_dim), "proj")?,
        })
    }

    /// Maps a VQ-KD input in [−1, 1] to CLIP's normalisation (unilm
    /// `ScalingLayerForClip`).
    pub fn scale_input(x: &Tensor) -> Result<Tensor> {
        super::vqkd::scale_for_teacher(x, CLIP_MEAN, CLIP_STD)
    }

    /// The distillation target: `ln_post` over all final tokens, CLS dropped,
    /// projected — (B, N−1, output_dim) — for a CLIP-normalised input.
    pub fn patch_features(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, hh, ww) = x.dims4()?;
        let p = self.cfg.patch_size;
        let (gh, gw) = (hh / p, ww / p);
        let w = self.cfg.width;
        let patches = x
            .reshape((b, 3, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, 3 * p * p))?;
        let tokens = linear(&patches, &self.conv1.reshape((w, 3 * p * p))?, None)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, w))?
            .broadcast_as((b, 1, w))?;
        let mut t = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.positional_embedding)?;
        t = self.ln_pre.forward(&t)?;
        for blk in &self.blocks {
            t = blk.forward(&t)?;
        }
        let t = self.ln_post.forward(&t)?;
        let n = t.dim(1)?;
        let patches = t.i((.., 1..n))?;
        let (bb, m, _) = patches.dims3()?;
        patches
            .reshape((bb * m, w))?
            .matmul(&self.proj)?
            .reshape((bb, m, self.cfg.output_dim))
    }
}
