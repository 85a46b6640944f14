//! The per-image training pipeline.

use anyhow::ensure;
use rand::Rng;

use super::crop::{RandomResizedCrop, hflip};
use super::erasing::RandomErasing;
use super::rand_augment::RandAugment;
use crate::data::decode::RgbImage;

/// RandAugment string of BEiT fine-tuning (`--aa`).
const BEIT_RAND_AUGMENT: &str = "rand-m9-mstd0.5-inc1";

/// Random resized crop → horizontal flip → RandAugment → `ToTensor` +
/// `Normalize` → random erasing, as timm's `create_transform(is_training=True)`
/// builds it (colour jitter is off whenever an auto-augment policy is set).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainTransform {
    /// The crop, which also fixes the output size.
    pub rrc: RandomResizedCrop,
    /// Probability of mirroring the crop.
    pub hflip_prob: f64,
    /// RandAugment, if any.
    pub rand_augment: Option<RandAugment>,
    /// Per-channel mean subtracted from `[0, 1]` RGB values.
    pub mean: [f32; 3],
    /// Per-channel standard deviation the centred values are divided by.
    pub std: [f32; 3],
    /// Random erasing of the normalised tensor, if any.
    pub erasing: Option<RandomErasing>,
}

impl TrainTransform {
    /// BEiT's fine-tuning transform: bicubic RRC of area 8 %–100 %, flip
    /// with p = 0.5, RandAugment `rand-m9-mstd0.5-inc1` filling with
    /// [`timm_img_mean`] and `translate_const = int(img_size * 0.45)`, and
    /// pixel-mode random erasing with p = 0.25.
    pub fn beit_finetune(img_size: usize, mean: [f32; 3], std: [f32; 3]) -> Self {
        let translate_const = (img_size as f64 * 0.45) as usize;
        let rand_augment =
            RandAugment::from_timm_str(BEIT_RAND_AUGMENT, timm_img_mean(mean), translate_const)
                .expect("the built-in RandAugment string parses");
        Self {
            rand_augment: Some(rand_augment),
            erasing: Some(RandomErasing::default()),
            ..Self::simple(img_size, mean, std)
        }
    }

    /// Crop and flip only: the transform of linear probing and of
    /// tokenizer training.
    pub fn simple(img_size: usize, mean: [f32; 3], std: [f32; 3]) -> Self {
        Self {
            rrc: RandomResizedCrop::new((img_size, img_size)),
            hflip_prob: 0.5,
            rand_augment: None,
            mean,
            std,
            erasing: None,
        }
    }

    /// Runs the pipeline on one image; returns CHW `f32` data of length
    /// `3 * rrc.size.0 * rrc.size.1`.
    pub fn apply(&self, img: &RgbImage, rng: &mut (impl Rng + ?Sized)) -> anyhow::Result<Vec<f32>> {
        ensure!(
            img.width > 0 && img.height > 0,
            "cannot augment an empty {}x{} image",
            img.width,
            img.height
        );
        let (height, width) = self.rrc.size;
        ensure!(
            height > 0 && width > 0,
            "invalid crop size {height}x{width}"
        );
        let mut img = self.rrc.apply(img, rng);
        // torchvision: `if torch.rand(1) < p: flip`.
        if rng.random::<f64>() < self.hflip_prob {
            img = hflip(&img);
        }
        if let Some(ra) = &self.rand_augment {
            img = ra.apply(&img, rng);
        }
        let mut chw = normalise(&img, self.mean, self.std);
        if let Some(erasing) = &self.erasing {
            erasing.apply(&mut chw, 3, height, width, rng);
        }
        Ok(chw)
    }
}

/// timm's RandAugment fill colour for a normalisation mean:
/// `min(255, round(255 * m))` per channel, Python's round (half to even).
pub fn timm_img_mean(mean: [f32; 3]) -> [u8; 3] {
    mean.map(|m| (255.0 * f64::from(m)).round_ties_even().clamp(0.0, 255.0) as u8)
}

/// torchvision `ToTensor()` + `Normalize(mean, std)`: CHW values
/// `(v / 255 - mean) / std` in `f32`, the same expression as the eval
/// transform.
pub(super) fn normalise(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let mut out = Vec::with_capacity(img.data.len());
    for c in 0..3 {
        out.extend(
            img.data
                .chunks_exact(3)
                .map(|px| (f32::from(px[c]) / 255.0 - mean[c]) / std[c]),
        );
    }
    out
}
