//! The masked-image-modeling input (spec F.1): colour jitter and flip shared
//! by two views of one random resized crop — the student's, normalised with
//! the model's mean/std, and the tokenizer's, in [0, 1] — plus a block-wise
//! mask over the student's patch grid.

use anyhow::{Result, ensure};
use rand::Rng;
use rand::seq::SliceRandom;

use super::crop::{RandomResizedCrop, hflip, uniform};
use super::rand_augment::{brightness, color, contrast};
use super::transform::normalise;
use crate::data::decode::RgbImage;
use crate::data::masking::MaskingGenerator;

/// torchvision `ColorJitter(brightness, contrast, saturation)` with no hue on
/// a PIL image: the three enhancements in a random order, each factor drawn
/// uniformly from `[max(0, 1 − v), 1 + v]` (a zero strength skips it).
#[derive(Clone, Debug, PartialEq)]
pub struct ColorJitter {
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
}

impl ColorJitter {
    pub fn apply(&self, img: &RgbImage, rng: &mut (impl Rng + ?Sized)) -> RgbImage {
        // `get_params`: the permutation first, then the factors in a fixed order.
        let mut order = [0usize, 1, 2, 3];
        order.shuffle(rng);
        let mut factor = |v: f64| (v > 0.0).then(|| uniform(rng, ((1.0 - v).max(0.0), 1.0 + v)));
        let (b, c, s) = (
            factor(self.brightness),
            factor(self.contrast),
            factor(self.saturation),
        );
        let mut out = img.clone();
        for op in order {
            out = match (op, b, c, s) {
                (0, Some(f), _, _) => brightness(&out, f),
                (1, _, Some(f), _) => contrast(&out, f),
                (2, _, _, Some(f)) => color(&out, f),
                _ => out,
            };
        }
        out
    }
}

/// unilm's `DataAugmentationForBEiT`: one sample becomes the flat record
/// `[student view (3·H·W) | tokenizer view (3·H2·W2) | mask (grid cells, 0/1)]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TwoViewTransform {
    pub jitter: Option<ColorJitter>,
    pub hflip_prob: f64,
    /// The crop box sampler and the student view's size.
    pub crop: RandomResizedCrop,
    /// The tokenizer view's (height, width).
    pub second_size: (usize, usize),
    /// Student normalisation.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub mask: MaskingGenerator,
}

impl TwoViewTransform {
    /// BEiT v2's pretraining views: jitter 0.4/0.4/0.4, flip 0.5, crop scale
    /// 0.2–1, both views bicubic at `size`.
    pub fn beitv2(
        size: (usize, usize),
        second_size: (usize, usize),
        mean: [f32; 3],
        std: [f32; 3],
        mask: MaskingGenerator,
    ) -> Self {
        let mut crop = RandomResizedCrop::new(size);
        crop.scale = (0.2, 1.0);
        Self {
            jitter: Some(ColorJitter {
                brightness: 0.4,
                contrast: 0.4,
                saturation: 0.4,
            }),
            hflip_prob: 0.5,
            crop,
            second_size,
            mean,
            std,
            mask,
        }
    }

    /// Values per record.
    pub fn record_len(&self) -> usize {
        let (h, w) = self.crop.size;
        let (h2, w2) = self.second_size;
        3 * h * w + 3 * h2 * w2 + self.mask.height * self.mask.width
    }

    pub fn apply(&self, img: &RgbImage, rng: &mut (impl Rng + ?Sized)) -> Result<Vec<f32>> {
        ensure!(
            img.width > 0 && img.height > 0,
            "cannot augment an empty {}x{} image",
            img.width,
            img.height
        );
        let mut img = match &self.jitter {
            Some(j) => j.apply(img, rng),
            None => img.clone(),
        };
        if rng.random::<f64>() < self.hflip_prob {
            img = hflip(&img);
        }
        let b = self.crop.sample_box(img.width, img.height, rng);
        let student = self.crop.resize_box(&img, b);
        let second = RandomResizedCrop {
            size: self.second_size,
            ..self.crop.clone()
        }
        .resize_box(&img, b);
        let mut out = Vec::with_capacity(self.record_len());
        out.extend(normalise(&student, self.mean, self.std));
        out.extend(normalise(&second, [0.0; 3], [1.0; 3]));
        out.extend(
            self.mask
                .generate(rng)
                .into_iter()
                .map(|m| if m { 1.0 } else { 0.0 }),
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn image() -> RgbImage {
        let (width, height) = (37, 29);
        let data = (0..width * height * 3)
            .map(|i| ((i * 37 + i / 7) % 251) as u8)
            .collect();
        RgbImage {
            width,
            height,
            data,
        }
    }

    fn transform(second: (usize, usize)) -> TwoViewTransform {
        let mask = MaskingGenerator::new((4, 4), 6, 2, None, 0.3, None).unwrap();
        TwoViewTransform::beitv2((16, 16), second, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], mask)
    }

    #[test]
    fn both_views_come_from_one_jittered_flipped_crop() {
        let t = transform((16, 16));
        for seed in 0..20 {
            let rec = t
                .apply(&image(), &mut ChaCha8Rng::seed_from_u64(seed))
                .unwrap();
            assert_eq!(rec.len(), t.record_len());
            let (student, rest) = rec.split_at(3 * 16 * 16);
            let (second, mask) = rest.split_at(3 * 16 * 16);
            // Same pixels: the student view is the tokenizer view normalised.
            for c in 0..3 {
                for i in 0..256 {
                    let want = (second[c * 256 + i] - t.mean[c]) / t.std[c];
                    assert_eq!(student[c * 256 + i], want);
                }
            }
            assert!(second.iter().all(|v| (0.0..=1.0).contains(v)));
            assert_eq!(mask.iter().filter(|&&m| m == 1.0).count(), 6);
            assert!(mask.iter().all(|&m| m == 0.0 || m == 1.0));
        }
    }

    #[test]
    fn the_second_view_is_the_same_box_at_its_own_size() {
        let t = transform((8, 8));
        let img = image();
        let seed = 5;
        let rec = t.apply(&img, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        // Replay the draws: jitter, flip, box.
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut j = t.jitter.as_ref().unwrap().apply(&img, &mut rng);
        if rng.random::<f64>() < t.hflip_prob {
            j = hflip(&j);
        }
        let b = t.crop.sample_box(j.width, j.height, &mut rng);
        let small = RandomResizedCrop {
            size: (8, 8),
            ..t.crop.clone()
        }
        .resize_box(&j, b);
        let want = normalise(&small, [0.0; 3], [1.0; 3]);
        assert_eq!(&rec[3 * 256..3 * 256 + 3 * 64], want.as_slice());
    }

    #[test]
    fn neutral_jitter_is_the_identity() {
        let j = ColorJitter {
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
        };
        let img = image();
        assert_eq!(
            j.apply(&img, &mut ChaCha8Rng::seed_from_u64(1)).data,
            img.data
        );
    }
}
