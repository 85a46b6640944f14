//! Model configuration and the named presets (timm's model names).

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub use crate::data::transforms::{
    IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD,
    IMAGENET_INCEPTION_MEAN as INCEPTION_MEAN, IMAGENET_INCEPTION_STD as INCEPTION_STD,
};

/// Where the relative position bias lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelPosBias {
    /// Every block owns a table (fine-tuned classifiers).
    PerBlock,
    /// One table shared by all blocks (MIM pretraining checkpoints).
    Shared,
    /// No relative position bias.
    None,
}

/// How the classifier turns tokens into one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GlobalPool {
    /// Mean of the patch tokens followed by `fc_norm` (all released v2 classifiers).
    Avg,
    /// The CLS token after the final `norm`.
    Token,
}

fn default_in_chans() -> usize {
    3
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_true() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-6
}
fn default_mean() -> [f32; 3] {
    IMAGENET_MEAN
}
fn default_std() -> [f32; 3] {
    IMAGENET_STD
}
fn default_crop_pct() -> f64 {
    0.875
}

/// Everything that fixes the shapes and the arithmetic of a BEiT model, plus the
/// preprocessing it expects. Serialised as JSON into converted checkpoints and
/// accepted from `--config FILE` (JSON or TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeitConfig {
    /// Input size (height, width); both divisible by `patch_size`.
    pub img_size: [usize; 2],
    pub patch_size: usize,
    #[serde(default = "default_in_chans")]
    pub in_chans: usize,
    /// 0 means no classifier head (`forward_head` returns the pooled features).
    pub num_classes: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// q and v biases (k has none), as in every BEiT checkpoint.
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub use_abs_pos_emb: bool,
    pub rel_pos_bias: RelPosBias,
    /// Per-block layer-scale vectors `gamma_1`, `gamma_2`.
    pub layer_scale: bool,
    pub global_pool: GlobalPool,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_mean")]
    pub mean: [f32; 3],
    #[serde(default = "default_std")]
    pub std: [f32; 3],
    /// Eval crop ratio: the short side is resized to `floor(crop / crop_pct)`.
    #[serde(default = "default_crop_pct")]
    pub crop_pct: f64,
    /// Stochastic depth of the last block; block `i` gets `rate · i / (depth − 1)`
    /// (training only).
    #[serde(default)]
    pub drop_path_rate: f64,
}

/// The named architectures, in timm's naming.
pub const PRESET_NAMES: &[&str] = &[
    "beitv2_base_patch16_224",
    "beitv2_large_patch16_224",
    "beit_base_patch16_224",
    "beit_large_patch16_224",
    "beit_base_patch16_384",
    "beit_large_patch16_384",
    "beit_large_patch16_512",
];

impl BeitConfig {
    fn base(img: usize) -> Self {
        BeitConfig {
            img_size: [img, img],
            patch_size: 16,
            in_chans: 3,
            num_classes: 1000,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_ratio: 4.0,
            qkv_bias: true,
            use_abs_pos_emb: false,
            rel_pos_bias: RelPosBias::PerBlock,
            layer_scale: true,
            global_pool: GlobalPool::Avg,
            norm_eps: 1e-6,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            // UNILM/mmpretrain evaluate with crop 224 from 256 below 384 px, no crop above.
            crop_pct: if img >= 384 { 1.0 } else { 0.875 },
            drop_path_rate: 0.0,
        }
    }

    fn large(img: usize) -> Self {
        BeitConfig {
            embed_dim: 1024,
            depth: 24,
            num_heads: 16,
            ..Self::base(img)
        }
    }

    fn v1(self) -> Self {
        BeitConfig {
            mean: INCEPTION_MEAN,
            std: INCEPTION_STD,
            ..self
        }
    }

    /// A named preset (timm's names; an optional `.tag` suffix such as
    /// `.in1k_ft_in22k_in1k` is accepted and ignored). The 21k-class tags get a
    /// 21841-way head.
    pub fn preset(name: &str) -> Result<Self> {
        let (arch, tag) = match name.split_once('.') {
            Some((a, t)) => (a, Some(t)),
            None => (name, None),
        };
        let mut cfg = match arch {
            "beitv2_base_patch16_224" => Self::base(224),
            "beitv2_large_patch16_224" => Self::large(224),
            "beit_base_patch16_224" => Self::base(224).v1(),
            "beit_large_patch16_224" => Self::large(224).v1(),
            "beit_base_patch16_384" => Self::base(384).v1(),
            "beit_large_patch16_384" => Self::large(384).v1(),
            "beit_large_patch16_512" => Self::large(512).v1(),
            other => bail!(
                "unknown architecture '{other}'; known: {}",
                PRESET_NAMES.join(", ")
            ),
        };
        if tag.is_some_and(|t| t.ends_with("in22k")) {
            cfg.num_classes = 21841;
        }
        Ok(cfg)
    }

    /// Reads a custom configuration from a JSON or TOML file (by extension).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model config {}", path.display()))?;
        let cfg: Self = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        } else {
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        };
        cfg.validate()
            .with_context(|| format!("invalid model config {}", path.display()))?;
        Ok(cfg)
    }

    /// Checks the invariants the model relies on.
    pub fn validate(&self) -> Result<()> {
        if self.patch_size == 0 || self.embed_dim == 0 || self.num_heads == 0 || self.depth == 0 {
            bail!("patch_size, embed_dim, num_heads and depth must be positive");
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            bail!(
                "embed_dim {} is not divisible by num_heads {}",
                self.embed_dim,
                self.num_heads
            );
        }
        for (axis, s) in ["height", "width"].iter().zip(self.img_size) {
            if s == 0 || !s.is_multiple_of(self.patch_size) {
                bail!(
                    "image {axis} {s} is not a positive multiple of the patch size {}",
                    self.patch_size
                );
            }
        }
        if !(self.crop_pct > 0.0 && self.crop_pct <= 1.0) {
            bail!("crop_pct {} must be in (0, 1]", self.crop_pct);
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            bail!("drop_path_rate {} must be in [0, 1)", self.drop_path_rate);
        }
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 {
            bail!("mlp_ratio {} must be positive", self.mlp_ratio);
        }
        // Far beyond any published model, and small enough that no size
        // computed from them overflows: a hostile config is refused here,
        // before anything is allocated for it.
        let (h, w) = (
            self.img_size[0] / self.patch_size,
            self.img_size[1] / self.patch_size,
        );
        let limits = [
            ("embed_dim", self.embed_dim, 1 << 16),
            ("depth", self.depth, 1 << 12),
            ("in_chans", self.in_chans, 1 << 12),
            ("num_classes", self.num_classes, 1 << 24),
            (
                "image side",
                self.img_size[0].max(self.img_size[1]),
                1 << 16,
            ),
            ("patch tokens", h.saturating_mul(w), 1 << 20),
        ];
        for (what, v, max) in limits {
            if v > max {
                bail!("{what} {v} is over the supported maximum of {max}");
            }
        }
        if self.mlp_ratio > 64.0 {
            bail!(
                "mlp_ratio {} is over the supported maximum of 64",
                self.mlp_ratio
            );
        }
        Ok(())
    }

    /// The same model at another input size (the relative-position tables are
    /// resized when the weights are loaded).
    pub fn with_img_size(mut self, h: usize, w: usize) -> Result<Self> {
        self.img_size = [h, w];
        self.validate()?;
        Ok(self)
    }

    /// Drop-path rate of block `i`: `linspace(0, drop_path_rate, depth)[i]`.
    pub fn drop_path_rate_of(&self, i: usize) -> f64 {
        if self.depth <= 1 {
            0.0
        } else {
            self.drop_path_rate * i as f64 / (self.depth - 1) as f64
        }
    }

    /// Patch grid (rows, columns).
    pub fn grid(&self) -> (usize, usize) {
        (
            self.img_size[0] / self.patch_size,
            self.img_size[1] / self.patch_size,
        )
    }

    /// Tokens per image: CLS plus one per patch.
    pub fn num_tokens(&self) -> usize {
        let (h, w) = self.grid();
        1 + h * w
    }

    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Multiply-accumulates of one forward pass of the backbone, in the
    /// fvcore/mmengine convention of spec A.8 (head excluded).
    pub fn macs(&self) -> u64 {
        let (h, w) = self.grid();
        let n = (h as u64).saturating_mul(w as u64).saturating_add(1);
        let c = self.embed_dim as u64;
        let hidden = self.mlp_hidden() as u64;
        let patches = n - 1;
        let patch_in = (self.in_chans as u64)
            .saturating_mul(self.patch_size as u64)
            .saturating_mul(self.patch_size as u64);
        // Saturating: a config read from a hostile file may be absurdly large.
        let m = |terms: &[u64]| terms.iter().fold(1u64, |a, &b| a.saturating_mul(b));
        let per_block = [
            m(&[n, c, 3, c]),
            m(&[2, n, n, c]),
            m(&[n, c, c]),
            m(&[2, n, c, hidden]),
            m(&[10, n, c]),
        ]
        .iter()
        .fold(0u64, |a, &b| a.saturating_add(b));
        let final_norm = match self.global_pool {
            GlobalPool::Avg => m(&[5, c]),
            GlobalPool::Token => m(&[5, n, c]),
        };
        m(&[patches, c, patch_in])
            .saturating_add(m(&[self.depth as u64, per_block]))
            .saturating_add(final_norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_match_published_base_figure() {
        // mmpretrain metafile: FLOPs 17581219584 for the base classifier backbone.
        let cfg = BeitConfig::preset("beitv2_base_patch16_224").unwrap();
        assert_eq!(cfg.macs(), 17_581_219_584);
        let large = BeitConfig::preset("beitv2_large_patch16_224").unwrap();
        assert_eq!(large.macs(), 61_602_108_416);
    }

    #[test]
    fn presets_and_tags() {
        let c = BeitConfig::preset("beitv2_base_patch16_224.in1k_ft_in22k").unwrap();
        assert_eq!(c.num_classes, 21841);
        let c = BeitConfig::preset("beitv2_base_patch16_224.in1k_ft_in22k_in1k").unwrap();
        assert_eq!(c.num_classes, 1000);
        let v1 = BeitConfig::preset("beit_large_patch16_512").unwrap();
        assert_eq!(v1.grid(), (32, 32));
        assert_eq!(v1.mean, INCEPTION_MEAN);
        assert_eq!(v1.crop_pct, 1.0);
        let err = BeitConfig::preset("vit_tiny").unwrap_err().to_string();
        assert!(err.contains("vit_tiny") && err.contains("beitv2_base_patch16_224"));
    }

    #[test]
    fn validation_names_the_problem() {
        let cfg = BeitConfig::preset("beitv2_base_patch16_224").unwrap();
        let err = cfg.clone().with_img_size(224, 230).unwrap_err().to_string();
        assert!(err.contains("230"), "{err}");
        let mut bad = cfg;
        bad.num_heads = 7;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("num_heads")
        );
    }
}
