//! The BEiT vision transformer with timm's API: `forward_features`,
//! `forward_head`, `forward_intermediates`.

use super::attention::Block;
use super::config::{BeitConfig, GlobalPool, RelPosBias};
use super::layers::{LayerNorm, Linear, linear};
use super::rel_pos::{gather_bias, relative_position_index_tensor, table_len};
use crate::kernels::{self, Epilogue, Precision, profile};
use candle_core::{D, Device, IndexOp, Result, Tensor};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;

/// Conv2d with kernel = stride = patch, computed as one GEMM over unfolded patches.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    /// `(C, in_chans, p, p)` as stored by PyTorch.
    pub weight: Tensor,
    pub bias: Tensor,
    patch: usize,
    /// The projection as a `(C, in_chans·p·p)` linear layer in fp32 panels
    /// for inference, when packed ([`Beit::set_precision`]).
    packed: Option<Linear>,
}

impl PatchEmbed {
    fn new(cfg: &BeitConfig, vb: VarBuilder) -> Result<Self> {
        let p = cfg.patch_size;
        Ok(Self {
            weight: vb.get((cfg.embed_dim, cfg.in_chans, p, p), "weight")?,
            bias: vb.get(cfg.embed_dim, "bias")?,
            patch: p,
            packed: None,
        })
    }

    /// Packs the weight into fp32 panels where their kernel runs (AVX2 or
    /// AVX-512): the projection is a `(patches, in·p·p) × (in·p·p, C)`
    /// GEMM, which the `gemm` crate runs at about half their speed for one
    /// image. It stays fp32 at every precision.
    fn pack(&mut self) -> Result<()> {
        self.packed = None;
        if kernels::gemm::f32_panels_available() {
            let c = self.weight.dim(0)?;
            let w = self.weight.reshape((c, self.weight.elem_count() / c))?;
            let mut proj = Linear::from_parts(w, Some(self.bias.clone()));
            proj.set_precision(Precision::F32)?;
            self.packed = Some(proj);
        }
        Ok(())
    }

    /// (B, in, H, W) → (B, H/p · W/p, C), patches row-major.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, cin, h, w) = x.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let patches = x
            .reshape((b, cin, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, cin * p * p))?;
        let c = self.weight.dim(0)?;
        let constant = |t: &Tensor| kernels::is_plain_cpu_f32(t) && !t.is_variable();
        if let Some(proj) = &self.packed
            && kernels::fused_enabled()
            && kernels::is_plain_cpu_f32(x)
            && constant(&self.weight)
            && constant(&self.bias)
        {
            let rows = b * gh * gw;
            let mut out = vec![0f32; rows * c];
            kernels::with_f32(&patches, |x| {
                proj.apply_into(x, rows, Epilogue::Store, &mut out)
            })?;
            return Tensor::from_vec(out, (b, gh * gw, c), x.device());
        }
        let w2 = self.weight.reshape((c, cin * p * p))?;
        linear(&patches, &w2, Some(&self.bias))
    }
}

/// Output of [`Beit::forward_intermediates`] for one chosen block.
#[derive(Debug, Clone)]
pub struct Intermediate {
    /// Index of the block whose output this is.
    pub block: usize,
    /// All tokens (B, N, C), CLS first, as the block returned them (no norm).
    pub tokens: Tensor,
}

impl Intermediate {
    /// The CLS token (B, C).
    pub fn cls(&self) -> Result<Tensor> {
        self.tokens.i((.., 0))
    }
    /// The patch tokens (B, N−1, C), row-major over the grid.
    pub fn patches(&self) -> Result<Tensor> {
        let n = self.tokens.dim(1)?;
        self.tokens.i((.., 1..n))
    }
}

#[derive(Debug, Clone)]
pub struct Beit {
    pub cfg: BeitConfig,
    pub patch_embed: PatchEmbed,
    pub cls_token: Tensor,
    pub pos_embed: Option<Tensor>,
    /// The single `(L, heads)` table of [`RelPosBias::Shared`] models.
    pub shared_rel_pos_table: Option<Tensor>,
    pub blocks: Vec<Block>,
    /// Final LayerNorm over all tokens (CLS pooling only).
    pub norm: Option<LayerNorm>,
    /// LayerNorm of the mean-pooled patch tokens (average pooling only).
    pub fc_norm: Option<LayerNorm>,
    pub head: Option<Linear>,
    /// Flat (N·N) relative-position index for this input size.
    rel_pos_index: Tensor,
    /// The shared table gathered once when it is a constant (inference).
    frozen_shared_bias: Option<Tensor>,
}

impl Beit {
    /// Builds the model from weights addressed by timm's names
    /// (`blocks.3.attn.qkv.weight`, ...). See `checkpoint` for other layouts.
    pub fn new(cfg: &BeitConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let c = cfg.embed_dim;
        let shared_rel_pos_table = match cfg.rel_pos_bias {
            RelPosBias::Shared => Some(vb.pp("rel_pos_bias").get(
                (table_len(cfg.grid()), cfg.num_heads),
                "relative_position_bias_table",
            )?),
            _ => None,
        };
        let pos_embed = if cfg.use_abs_pos_emb {
            Some(vb.get((1, cfg.num_tokens(), c), "pos_embed")?)
        } else {
            None
        };
        let rel_pos_index = relative_position_index_tensor(cfg.grid(), vb.device())?;
        let blocks = (0..cfg.depth)
            .map(|i| {
                Block::new(
                    cfg,
                    &rel_pos_index,
                    cfg.drop_path_rate_of(i),
                    vb.pp("blocks").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let (norm, fc_norm) = match cfg.global_pool {
            GlobalPool::Avg => (
                None,
                Some(LayerNorm::new(c, cfg.norm_eps, vb.pp("fc_norm"))?),
            ),
            GlobalPool::Token => (Some(LayerNorm::new(c, cfg.norm_eps, vb.pp("norm"))?), None),
        };
        let head = if cfg.num_classes > 0 {
            Some(Linear::new(c, cfg.num_classes, true, vb.pp("head"))?)
        } else {
            None
        };
        let frozen_shared_bias = match &shared_rel_pos_table {
            Some(t) if !t.is_variable() => Some(gather_bias(t, &rel_pos_index, cfg.num_tokens())?),
            _ => None,
        };
        Ok(Self {
            frozen_shared_bias,
            cfg: cfg.clone(),
            patch_embed: PatchEmbed::new(cfg, vb.pp("patch_embed").pp("proj"))?,
            cls_token: vb.get((1, 1, c), "cls_token")?,
            pos_embed,
            shared_rel_pos_table,
            blocks,
            norm,
            fc_norm,
            head,
            rel_pos_index,
        })
    }

    /// Precision of the blocks' linear layers at inference. The weights are
    /// packed once: bf16/int8 into AMX tiles (an fp32 GEMM on the rounded values without AMX),
    /// fp32 into panels for the small-batch kernel (AVX2 or AVX-512); the patch
    /// embedding stays fp32, in panels, at every precision. Without this call
    /// fp32 inference runs the `gemm` crate on the weights as loaded.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.patch_embed.pack()?;
        for blk in &mut self.blocks {
            blk.set_precision(precision)?;
        }
        Ok(())
    }

    /// Flat (N·N) relative-position index for this input size.
    pub fn rel_pos_index(&self) -> &Tensor {
        &self.rel_pos_index
    }

    pub fn device(&self) -> &Device {
        self.cls_token.device()
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let (_, c, h, w) = x.dims4()?;
        let [eh, ew] = self.cfg.img_size;
        if c != self.cfg.in_chans || h != eh || w != ew {
            candle_core::bail!(
                "input is {c}×{h}×{w}, the model expects {}×{eh}×{ew} (build it with that img_size)",
                self.cfg.in_chans
            );
        }
        Ok(())
    }

    /// Patch embedding, CLS token and absolute position embedding: (B, N, C).
    fn embed(&self, x: &Tensor) -> Result<Tensor> {
        self.embed_masked(x, None)
    }

    /// [`Self::embed`] with the patches where `mask` (B, N−1; 1 = masked) is
    /// set replaced by `mask_token` (1, 1, C): the masked-image-modeling
    /// input `x·(1 − w) + token·w`.
    pub fn embed_masked(&self, x: &Tensor, mask: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        self.check_input(x)?;
        let _t = profile::scope("patch_embed", 0.0);
        let mut patches = self.patch_embed.forward(x)?;
        let b = patches.dim(0)?;
        if let Some((mask, token)) = mask {
            let w = mask.unsqueeze(2)?;
            patches = (patches.broadcast_mul(&(1.0 - &w)?)? + w.broadcast_mul(token)?)?;
        }
        let cls = self.cls_token.broadcast_as((b, 1, self.cfg.embed_dim))?;
        let mut t = Tensor::cat(&[&cls, &patches], 1)?;
        if let Some(pe) = &self.pos_embed {
            t = t.broadcast_add(pe)?;
        }
        Ok(t)
    }

    /// The (heads, N, N) bias of the shared relative-position table, if the
    /// model has one (gathered differentiably when the table is trainable).
    pub fn shared_bias(&self) -> Result<Option<Tensor>> {
        if let Some(b) = &self.frozen_shared_bias {
            return Ok(Some(b.clone()));
        }
        self.shared_rel_pos_table
            .as_ref()
            .map(|t| gather_bias(t, &self.rel_pos_index, self.cfg.num_tokens()))
            .transpose()
    }

    /// All tokens after the last block and the final `norm` (if the model has one): (B, N, C).
    pub fn forward_features(&self, x: &Tensor) -> Result<Tensor> {
        self.features(x, None)
    }

    fn features(&self, x: &Tensor, train_rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        kernels::on_pool(|| self.features_here(x, train_rng))
    }

    fn features_here(&self, x: &Tensor, mut train_rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let mut t = self.embed(x)?;
        let shared = self.shared_bias()?;
        for blk in &self.blocks {
            t = blk.forward(
                &t,
                &self.rel_pos_index,
                shared.as_ref(),
                train_rng.as_deref_mut(),
            )?;
        }
        let _t = profile::scope("head", 0.0);
        match &self.norm {
            Some(n) => n.forward(&t),
            None => Ok(t),
        }
    }

    /// Pooling, `fc_norm` and the classifier. With `pre_logits` the pooled,
    /// normalised features (B, C) are returned instead of the logits.
    pub fn forward_head(&self, tokens: &Tensor, pre_logits: bool) -> Result<Tensor> {
        let _t = profile::scope("head", 0.0);
        let pooled = match self.cfg.global_pool {
            GlobalPool::Avg => mean_patch_tokens(tokens)?,
            GlobalPool::Token => tokens.i((.., 0))?,
        };
        let pooled = match &self.fc_norm {
            Some(n) => n.forward(&pooled)?,
            None => pooled,
        };
        match (&self.head, pre_logits) {
            (Some(h), false) => h.forward(&pooled),
            _ => Ok(pooled),
        }
    }

    /// Logits (B, num_classes), or pooled features when the model has no head.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_head(&self.forward_features(x)?, false)
    }

    /// The training forward: like [`Beit::forward`] with stochastic depth
    /// drawn from `rng` (the only source of randomness in the model).
    pub fn forward_train(&self, x: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        self.forward_head(&self.features(x, Some(rng))?, false)
    }

    /// Runs the blocks up to the last requested index and returns the raw
    /// tokens after each requested block (no norm), like timm's
    /// `forward_intermediates(..., intermediates_only=True)`. Negative indices
    /// count from the end (−1 is the last block).
    pub fn forward_intermediates(&self, x: &Tensor, indices: &[i64]) -> Result<Vec<Intermediate>> {
        let depth = self.blocks.len() as i64;
        let mut wanted = indices
            .iter()
            .map(|&i| {
                let j = if i < 0 { depth + i } else { i };
                if (0..depth).contains(&j) {
                    Ok(j as usize)
                } else {
                    candle_core::bail!(
                        "block index {i} is out of range for a model with {depth} blocks"
                    )
                }
            })
            .collect::<Result<Vec<_>>>()?;
        wanted.sort_unstable();
        wanted.dedup();
        let Some(&last) = wanted.last() else {
            return Ok(Vec::new());
        };
        kernels::on_pool(|| self.intermediates_here(x, &wanted, last))
    }

    fn intermediates_here(
        &self,
        x: &Tensor,
        wanted: &[usize],
        last: usize,
    ) -> Result<Vec<Intermediate>> {
        let mut t = self.embed(x)?;
        let shared = self.shared_bias()?;
        let mut out = Vec::with_capacity(wanted.len());
        for (i, blk) in self.blocks.iter().enumerate().take(last + 1) {
            t = blk.forward(&t, &self.rel_pos_index, shared.as_ref(), None)?;
            if wanted.contains(&i) {
                out.push(Intermediate {
                    block: i,
                    tokens: t.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Softmax class probabilities (B, num_classes).
    pub fn predict_proba(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::softmax_last_dim(&self.forward(x)?.contiguous()?)
    }
}

/// Mean over the patch tokens (B, C) of a (B, N, C) token tensor.
pub fn mean_patch_tokens(tokens: &Tensor) -> Result<Tensor> {
    let n = tokens.dim(1)?;
    tokens.i((.., 1..n))?.mean(D::Minus2)
}
