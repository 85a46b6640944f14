//! The BEiT v2 pretraining student (spec F.3; unilm's
//! `VisionTransformerForMaskedImageModelingCLS`): the same backbone as the
//! classifier with a learnable mask token and one shared relative-position
//! table, a patch-aggregation neck fed with the final CLS token and the
//! early-layer patch tokens, and one final norm and MIM head shared by both
//! branches.

use super::Beit;
use super::attention::Block;
use super::config::{BeitConfig, GlobalPool, RelPosBias};
use super::layers::Linear;
use anyhow::{Context, bail};
use candle_core::{IndexOp, Result, Tensor};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Metadata key under which pretraining checkpoints carry their config (JSON).
pub const MIM_CONFIG_METADATA_KEY: &str = "beitv2_mim_config";

/// Shapes of a pretraining model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MimConfig {
    /// The backbone: a shared relative-position table, CLS pooling (its
    /// `norm` is the final norm of both branches) and no classifier head.
    pub backbone: BeitConfig,
    /// The aggregation branch takes the patch tokens after this many blocks.
    pub early_layers: usize,
    /// Blocks of the patch-aggregation neck.
    pub head_layers: usize,
    /// Codebook size of the tokenizer: the MIM head's outputs.
    pub vocab_size: usize,
    /// Initial layer-scale value (0.1 base, 1e-5 large).
    pub layer_scale_init: f64,
}

impl MimConfig {
    /// The pretraining model of a backbone preset (`beitv2_base_patch16_224`:
    /// early layer 9, layer scale 0.1; `beitv2_large_patch16_224`: 21, 1e-5),
    /// with unilm's 8192-code vocabulary.
    pub fn preset(name: &str) -> anyhow::Result<Self> {
        let backbone = BeitConfig::preset(name)?;
        let large = backbone.embed_dim >= 1024;
        Self::for_backbone(
            backbone,
            if large { 21 } else { 9 },
            2,
            8192,
            if large { 1e-5 } else { 0.1 },
        )
    }

    /// A config around any backbone, made fit for pretraining (shared table,
    /// CLS pooling, no head) and validated.
    pub fn for_backbone(
        mut backbone: BeitConfig,
        early_layers: usize,
        head_layers: usize,
        vocab_size: usize,
        layer_scale_init: f64,
    ) -> anyhow::Result<Self> {
        backbone.rel_pos_bias = RelPosBias::Shared;
        backbone.global_pool = GlobalPool::Token;
        backbone.num_classes = 0;
        let cfg = Self {
            backbone,
            early_layers,
            head_layers,
            vocab_size,
            layer_scale_init,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let b = &self.backbone;
        b.validate().context("invalid pretraining backbone")?;
        if b.global_pool != GlobalPool::Token || b.num_classes != 0 {
            bail!("a pretraining backbone has CLS pooling (its final norm) and no head");
        }
        if !(1..=b.depth).contains(&self.early_layers) {
            bail!(
                "early_layers = {} must be in 1..={} (the backbone depth)",
                self.early_layers,
                b.depth
            );
        }
        if self.vocab_size == 0 {
            bail!("vocab_size must be positive");
        }
        Ok(())
    }

    /// Drop-path rate of neck block `k`: unilm's
    /// `linspace(0, rate, max(depth, early + head))[early + k]`.
    pub fn neck_drop_path_rate(&self, k: usize) -> f64 {
        let n = self
            .backbone
            .depth
            .max(self.early_layers + self.head_layers);
        if n <= 1 {
            return 0.0;
        }
        self.backbone.drop_path_rate * (self.early_layers + k) as f64 / (n - 1) as f64
    }
}

/// The MIM logits of one batch: one row per masked patch, in (image, patch)
/// row-major order.
#[derive(Debug, Clone)]
pub struct MimLogits {
    /// From the last block (M, vocab).
    pub main: Tensor,
    /// From the patch-aggregation neck (M, vocab).
    pub aggregated: Tensor,
}

#[derive(Debug, Clone)]
pub struct BeitForMim {
    pub cfg: MimConfig,
    pub backbone: Beit,
    pub mask_token: Tensor,
    /// The patch-aggregation blocks (`cls_pt_layers`).
    pub neck: Vec<Block>,
    pub lm_head: Linear,
}

impl BeitForMim {
    /// Weights under unilm's names: the backbone's (`cls_token`,
    /// `patch_embed.*`, `rel_pos_bias.*`, `blocks.*`, `norm.*`), `mask_token`,
    /// `cls_pt_layers.*` and `lm_head.*`.
    pub fn new(cfg: &MimConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let backbone = Beit::new(&cfg.backbone, vb.clone())?;
        let c = cfg.backbone.embed_dim;
        let neck = (0..cfg.head_layers)
            .map(|k| {
                Block::new(
                    &cfg.backbone,
                    backbone.rel_pos_index(),
                    cfg.neck_drop_path_rate(k),
                    vb.pp("cls_pt_layers").pp(k),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            mask_token: vb.get((1, 1, c), "mask_token")?,
            lm_head: Linear::new(c, cfg.vocab_size, true, vb.pp("lm_head"))?,
            backbone,
            neck,
            cfg: cfg.clone(),
        })
    }

    /// Both branches' logits at the masked patches. `x`: (B, 3, H, W);
    /// `mask`: (B, P) with 1 at masked patches; `masked`: the flat indices
    /// `b·P + p` of those patches (u32, ascending). `rng` enables drop path.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        masked: &Tensor,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<MimLogits> {
        let bb = &self.backbone;
        let index = bb.rel_pos_index();
        let mut t = bb.embed_masked(x, Some((mask, &self.mask_token)))?;
        let shared = bb.shared_bias()?;
        let mut early = None;
        for (i, blk) in bb.blocks.iter().enumerate() {
            t = blk.forward(&t, index, shared.as_ref(), rng.as_deref_mut())?;
            if i + 1 == self.cfg.early_layers {
                early = Some(t.i((.., 1..))?);
            }
        }
        let early = early.ok_or_else(|| candle_core::Error::Msg("no early layer".into()))?;
        let mut agg = Tensor::cat(&[&t.i((.., 0..1))?, &early], 1)?;
        for blk in &self.neck {
            agg = blk.forward(&agg, index, shared.as_ref(), rng.as_deref_mut())?;
        }
        let norm = bb
            .norm
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("the backbone has no final norm".into()))?;
        let head = |tokens: &Tensor| -> Result<Tensor> {
            let (b, n, c) = tokens.dims3()?;
            // The norm is per token: normalising only the masked rows is the same.
            let rows = tokens
                .i((.., 1..))?
                .contiguous()?
                .reshape((b * (n - 1), c))?;
            self.lm_head
                .forward(&norm.forward(&rows.index_select(masked, 0)?)?)
        };
        Ok(MimLogits {
            main: head(&t)?,
            aggregated: head(&agg)?,
        })
    }
}
