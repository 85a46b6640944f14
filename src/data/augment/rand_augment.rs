//! timm's RandAugment (`timm.data.auto_augment.rand_augment_transform`):
//! per image, `num_layers` ops drawn uniformly with replacement, each applied
//! with probability `prob` at a magnitude perturbed by Gaussian noise.

use anyhow::{Context, bail};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use super::pillow::{self, Resample};
use crate::data::decode::RgbImage;

/// timm's `_LEVEL_DENOM`: magnitudes are on a 0–10 scale.
const LEVEL_DENOM: f64 = 10.0;

/// One augmentation op, named as in timm's `NAME_TO_OP`. `level` below is
/// the magnitude over 10; "±" marks the signed ops.
///
/// The "increasing" variants grow more severe with the magnitude (the set
/// `inc1` selects, as BEiT fine-tuning does); the plain ones are timm's
/// original level mappings (`inc0`). [`Op::TranslateX`] and
/// [`Op::TranslateY`] shift by `translate_const`-scaled absolute pixels;
/// they belong to timm's AutoAugment policies, not to any RandAugment set,
/// and are reachable here through [`RandAugment::apply_op`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Stretch each channel to the full range (`ImageOps.autocontrast`).
    AutoContrast,
    /// Equalise each channel's histogram (`ImageOps.equalize`).
    Equalize,
    /// Negate every sample (`ImageOps.invert`).
    Invert,
    /// Rotate by ±30° × level about the centre.
    Rotate,
    /// Keep 4 − ⌊4 × level⌋ bits per sample.
    PosterizeIncreasing,
    /// Invert samples at or above 256 − ⌊256 × level⌋.
    SolarizeIncreasing,
    /// Add ⌊110 × level⌋ to samples below 128, saturating.
    SolarizeAdd,
    /// Saturation factor 1 ± 0.9 × level (`ImageEnhance.Color`).
    ColorIncreasing,
    /// Contrast factor 1 ± 0.9 × level (`ImageEnhance.Contrast`).
    ContrastIncreasing,
    /// Brightness factor 1 ± 0.9 × level (`ImageEnhance.Brightness`).
    BrightnessIncreasing,
    /// Sharpness factor 1 ± 0.9 × level (`ImageEnhance.Sharpness`).
    SharpnessIncreasing,
    /// Horizontal shear by ±0.3 × level.
    ShearX,
    /// Vertical shear by ±0.3 × level.
    ShearY,
    /// Horizontal shift by ±0.45 × level of the width.
    TranslateXRel,
    /// Vertical shift by ±0.45 × level of the height.
    TranslateYRel,
    /// Keep ⌊4 × level⌋ bits per sample: most severe at level 0.
    Posterize,
    /// Invert samples at or above ⌊256 × level⌋.
    Solarize,
    /// Saturation factor 0.1 + 1.8 × level.
    Color,
    /// Contrast factor 0.1 + 1.8 × level.
    Contrast,
    /// Brightness factor 0.1 + 1.8 × level.
    Brightness,
    /// Sharpness factor 0.1 + 1.8 × level.
    Sharpness,
    /// Horizontal shift by ±`translate_const` × level pixels.
    TranslateX,
    /// Vertical shift by ±`translate_const` × level pixels.
    TranslateY,
}

/// timm's `_RAND_INCREASING_TRANSFORMS` (`inc1`).
pub const RAND_INCREASING_OPS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::PosterizeIncreasing,
    Op::SolarizeIncreasing,
    Op::SolarizeAdd,
    Op::ColorIncreasing,
    Op::ContrastIncreasing,
    Op::BrightnessIncreasing,
    Op::SharpnessIncreasing,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateXRel,
    Op::TranslateYRel,
];

/// timm's `_RAND_TRANSFORMS` (the default, `inc0`).
pub const RAND_OPS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::Posterize,
    Op::Solarize,
    Op::SolarizeAdd,
    Op::Color,
    Op::Contrast,
    Op::Brightness,
    Op::Sharpness,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateXRel,
    Op::TranslateYRel,
];

const NAMES: [(Op, &str); 23] = [
    (Op::AutoContrast, "AutoContrast"),
    (Op::Equalize, "Equalize"),
    (Op::Invert, "Invert"),
    (Op::Rotate, "Rotate"),
    (Op::PosterizeIncreasing, "PosterizeIncreasing"),
    (Op::SolarizeIncreasing, "SolarizeIncreasing"),
    (Op::SolarizeAdd, "SolarizeAdd"),
    (Op::ColorIncreasing, "ColorIncreasing"),
    (Op::ContrastIncreasing, "ContrastIncreasing"),
    (Op::BrightnessIncreasing, "BrightnessIncreasing"),
    (Op::SharpnessIncreasing, "SharpnessIncreasing"),
    (Op::ShearX, "ShearX"),
    (Op::ShearY, "ShearY"),
    (Op::TranslateXRel, "TranslateXRel"),
    (Op::TranslateYRel, "TranslateYRel"),
    (Op::Posterize, "Posterize"),
    (Op::Solarize, "Solarize"),
    (Op::Color, "Color"),
    (Op::Contrast, "Contrast"),
    (Op::Brightness, "Brightness"),
    (Op::Sharpness, "Sharpness"),
    (Op::TranslateX, "TranslateX"),
    (Op::TranslateY, "TranslateY"),
];

impl Op {
    /// timm's name for the op (a key of `NAME_TO_OP`).
    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(op, _)| *op == self)
            .map(|(_, n)| *n)
            .expect("every op is named")
    }

    /// The op timm calls `name`, if it is one of these.
    pub fn from_name(name: &str) -> Option<Self> {
        NAMES.iter().find(|(_, n)| *n == name).map(|(op, _)| *op)
    }

    /// Whether timm's level function negates the argument half the time
    /// (`_randomly_negate`).
    pub fn is_signed(self) -> bool {
        matches!(
            self,
            Op::Rotate
                | Op::ColorIncreasing
                | Op::ContrastIncreasing
                | Op::BrightnessIncreasing
                | Op::SharpnessIncreasing
                | Op::ShearX
                | Op::ShearY
                | Op::TranslateXRel
                | Op::TranslateYRel
                | Op::TranslateX
                | Op::TranslateY
        )
    }
}

/// A parsed RandAugment configuration plus the hparams timm passes to every
/// op (`img_mean` fill colour, `translate_const`, interpolation).
#[derive(Clone, Debug, PartialEq)]
pub struct RandAugment {
    /// The op set drawn from.
    pub ops: Vec<Op>,
    /// Ops drawn per image (`n`, default 2).
    pub num_layers: usize,
    /// Probability of applying each drawn op (`p`, default 0.5).
    pub prob: f64,
    /// Magnitude on the 0–10 scale (`m`, default 10).
    pub magnitude: f64,
    /// Standard deviation of the Gaussian noise added to the magnitude at
    /// every op call (`mstd`, default 0 = none); infinity (timm: `mstd` above
    /// 100) samples the magnitude uniformly from `[0, magnitude]` instead.
    pub magnitude_std: f64,
    /// Upper clip of the noisy magnitude (`mmax`); `None` means 10.
    pub magnitude_max: Option<f64>,
    /// Fill colour of pixels that geometric ops uncover: timm's `img_mean`,
    /// `round(255 * mean)` per channel.
    pub fill: [u8; 3],
    /// Pixels of a full-magnitude [`Op::TranslateX`] / [`Op::TranslateY`]
    /// shift (timm: `int(img_size * 0.45)`).
    pub translate_const: usize,
    /// Resampling of the geometric ops. timm uses the training
    /// interpolation, bicubic for BEiT.
    pub interpolation: Resample,
}

impl RandAugment {
    /// Parses timm's RandAugment string, e.g. `"rand-m9-mstd0.5-inc1"`: a
    /// leading `rand`, then dash-separated sections `m<int>` (magnitude),
    /// `n<int>` (layers), `p<float>` (probability), `mstd<float>`,
    /// `mmax<int>`, `inc<0|1>` (op set). As in timm, a section without a
    /// digit is ignored, the first `mstd` / `mmax` wins and other keys take
    /// their last value. The weighted op sets (`tweights`, `t3a`, `t3aw`)
    /// are not supported; other `t` sections select the default set, as in
    /// timm.
    pub fn from_timm_str(
        s: &str,
        img_mean: [u8; 3],
        translate_const: usize,
    ) -> anyhow::Result<Self> {
        let mut sections = s.split('-');
        if sections.next() != Some("rand") {
            bail!("RandAugment config {s:?} must start with \"rand\"");
        }
        let mut magnitude = LEVEL_DENOM;
        let mut num_layers = 2;
        let mut prob = 0.5;
        let mut increasing = false;
        let mut magnitude_std: Option<f64> = None;
        let mut magnitude_max: Option<f64> = None;
        for section in sections {
            if let Some(set) = section.strip_prefix('t') {
                if matches!(set, "weights" | "3a" | "3aw") {
                    bail!("RandAugment op set {set:?} in {s:?} is not supported");
                }
                continue;
            }
            // timm splits each section at its first digit into key and value.
            let Some(split) = section.find(|c: char| c.is_ascii_digit()) else {
                continue;
            };
            let (key, value) = section.split_at(split);
            let context = || format!("RandAugment config {s:?}: bad section {section:?}");
            match key {
                "mstd" => {
                    let std: f64 = value.parse().with_context(context)?;
                    magnitude_std.get_or_insert(if std > 100.0 { f64::INFINITY } else { std });
                }
                "mmax" => {
                    let max: i64 = value.parse().with_context(context)?;
                    magnitude_max.get_or_insert(max as f64);
                }
                "inc" => increasing = value.parse::<i64>().with_context(context)? != 0,
                "m" => magnitude = value.parse::<i64>().with_context(context)? as f64,
                "n" => num_layers = value.parse().with_context(context)?,
                "p" => prob = value.parse().with_context(context)?,
                _ => bail!("RandAugment config {s:?}: unknown section {section:?}"),
            }
        }
        Ok(Self {
            ops: if increasing {
                RAND_INCREASING_OPS
            } else {
                RAND_OPS
            }
            .to_vec(),
            num_layers,
            prob,
            magnitude,
            magnitude_std: magnitude_std.unwrap_or(0.0),
            // timm: `magnitude_max or _LEVEL_DENOM`, so 0 means the default.
            magnitude_max: magnitude_max.filter(|&m| m != 0.0),
            fill: img_mean,
            translate_const,
            interpolation: Resample::Bicubic,
        })
    }

    /// timm's `RandAugment.__call__`: draws `num_layers` ops with
    /// replacement and applies each with probability `prob` at a freshly
    /// sampled magnitude.
    pub fn apply(&self, img: &RgbImage, rng: &mut (impl Rng + ?Sized)) -> RgbImage {
        let mut img = img.clone();
        if self.ops.is_empty() {
            return img;
        }
        for _ in 0..self.num_layers {
            let op = self.ops[rng.random_range(0..self.ops.len())];
            if self.prob < 1.0 && rng.random::<f64>() > self.prob {
                continue;
            }
            let magnitude = self.sample_magnitude(rng);
            img = self.apply_op(op, magnitude, &img, rng);
        }
        img
    }

    /// The magnitude of one op call (`AugmentOp.__call__`): the configured
    /// magnitude plus noise, clipped to `[0, magnitude_max or 10]`.
    pub fn sample_magnitude(&self, rng: &mut (impl Rng + ?Sized)) -> f64 {
        let mut magnitude = self.magnitude;
        if self.magnitude_std == f64::INFINITY {
            magnitude *= rng.random::<f64>();
        } else if self.magnitude_std > 0.0 {
            magnitude = Normal::new(magnitude, self.magnitude_std)
                .expect("finite positive std")
                .sample(rng);
        }
        let upper = self.magnitude_max.unwrap_or(LEVEL_DENOM);
        magnitude.min(upper).max(0.0)
    }

    /// Applies `op` at `magnitude` (not clipped); signed ops negate their
    /// argument with probability 1/2, as timm's `_randomly_negate` does.
    pub fn apply_op(
        &self,
        op: Op,
        magnitude: f64,
        img: &RgbImage,
        rng: &mut (impl Rng + ?Sized),
    ) -> RgbImage {
        // timm draws only for signed ops: `-v if random.random() > 0.5 else v`.
        let negate = op.is_signed() && rng.random::<f64>() > 0.5;
        self.apply_op_signed(op, magnitude, negate, img)
    }

    /// Applies `op` at `magnitude` with the sign of signed ops fixed
    /// (`negate` is ignored by unsigned ops): timm's level function followed
    /// by its op function, deterministic.
    pub fn apply_op_signed(
        &self,
        op: Op,
        magnitude: f64,
        negate: bool,
        img: &RgbImage,
    ) -> RgbImage {
        let level = magnitude / LEVEL_DENOM;
        let signed = |v: f64| if negate { -v } else { v };
        // `_enhance_increasing_level_to_arg`: 1 ± 0.9 level, at least 0.1.
        let increasing_factor = || (1.0 + signed(level * 0.9)).max(0.1);
        // `_enhance_level_to_arg`: 0.1 to 1.9.
        let factor = || level * 1.8 + 0.1;
        // Python's int() truncates toward zero, as `as` does.
        let posterize_bits = || (level * 4.0) as i32;
        let solarize_threshold = || ((level * 256.0) as i32).min(256);
        let shift = |size: usize| signed(level * 0.45) * size as f64;
        let translate_abs = || signed(level * self.translate_const as f64);
        match op {
            Op::AutoContrast => pillow::autocontrast(img),
            Op::Equalize => pillow::equalize(img),
            Op::Invert => pillow::point_all(img, |v| 255 - v),
            Op::Rotate => pillow::rotate(img, signed(level * 30.0), self.interpolation, self.fill),
            Op::Posterize => pillow::posterize(img, posterize_bits()),
            Op::PosterizeIncreasing => pillow::posterize(img, 4 - posterize_bits()),
            Op::Solarize => solarize(img, solarize_threshold()),
            Op::SolarizeIncreasing => solarize(img, 256 - solarize_threshold()),
            Op::SolarizeAdd => {
                let add = ((level * 110.0) as i32).min(128);
                pillow::point_all(img, |v| {
                    if v < 128 {
                        (i32::from(v) + add).min(255) as u8
                    } else {
                        v
                    }
                })
            }
            Op::Color => color(img, factor()),
            Op::ColorIncreasing => color(img, increasing_factor()),
            Op::Contrast => contrast(img, factor()),
            Op::ContrastIncreasing => contrast(img, increasing_factor()),
            Op::Brightness => brightness(img, factor()),
            Op::BrightnessIncreasing => brightness(img, increasing_factor()),
            Op::Sharpness => sharpness(img, factor()),
            Op::SharpnessIncreasing => sharpness(img, increasing_factor()),
            Op::ShearX => self.affine(img, [1.0, signed(level * 0.3), 0.0, 0.0, 1.0, 0.0]),
            Op::ShearY => self.affine(img, [1.0, 0.0, 0.0, signed(level * 0.3), 1.0, 0.0]),
            Op::TranslateXRel => self.affine(img, [1.0, 0.0, shift(img.width), 0.0, 1.0, 0.0]),
            Op::TranslateYRel => self.affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, shift(img.height)]),
            Op::TranslateX => self.affine(img, [1.0, 0.0, translate_abs(), 0.0, 1.0, 0.0]),
            Op::TranslateY => self.affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, translate_abs()]),
        }
    }

    fn affine(&self, img: &RgbImage, matrix: [f64; 6]) -> RgbImage {
        pillow::affine(img, matrix, self.interpolation, self.fill)
    }
}

/// `ImageOps.solarize(img, threshold)`: invert samples at or above the
/// threshold.
fn solarize(img: &RgbImage, threshold: i32) -> RgbImage {
    pillow::point_all(img, |v| if i32::from(v) < threshold { v } else { 255 - v })
}

/// `ImageEnhance.Color(img).enhance(factor)`.
pub(super) fn color(img: &RgbImage, factor: f64) -> RgbImage {
    pillow::blend(&pillow::grayscale(img), img, factor)
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: towards the mean grey.
pub(super) fn contrast(img: &RgbImage, factor: f64) -> RgbImage {
    let grey = pillow::mean_grey(img);
    pillow::blend(&pillow::solid(img, [grey; 3]), img, factor)
}

/// `ImageEnhance.Brightness(img).enhance(factor)`: towards black.
pub(super) fn brightness(img: &RgbImage, factor: f64) -> RgbImage {
    pillow::blend(&pillow::solid(img, [0; 3]), img, factor)
}

/// `ImageEnhance.Sharpness(img).enhance(factor)`: away from the smoothed
/// image.
fn sharpness(img: &RgbImage, factor: f64) -> RgbImage {
    pillow::blend(&pillow::smooth(img), img, factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_beit_config() {
        let ra = RandAugment::from_timm_str("rand-m9-mstd0.5-inc1", [124, 116, 104], 100).unwrap();
        assert_eq!(ra.ops, RAND_INCREASING_OPS);
        assert_eq!(
            (ra.num_layers, ra.prob, ra.magnitude, ra.magnitude_std),
            (2, 0.5, 9.0, 0.5)
        );
        assert_eq!(ra.magnitude_max, None);
        assert_eq!(ra.interpolation, Resample::Bicubic);
    }

    #[test]
    fn parses_timm_options() {
        let ra =
            RandAugment::from_timm_str("rand-n3-p0.7-m7-mstd101-mstd0.2-mmax15-x-inc0", [0; 3], 1)
                .unwrap();
        assert_eq!(ra.ops, RAND_OPS);
        assert_eq!((ra.num_layers, ra.prob, ra.magnitude), (3, 0.7, 7.0));
        assert_eq!(ra.magnitude_std, f64::INFINITY);
        assert_eq!(ra.magnitude_max, Some(15.0));
        let default = RandAugment::from_timm_str("rand", [0; 3], 1).unwrap();
        assert_eq!(
            (default.num_layers, default.magnitude, default.magnitude_std),
            (2, 10.0, 0.0)
        );
    }

    #[test]
    fn rejects_bad_configs() {
        for bad in [
            "",
            "augmix-m5",
            "rand-q3",
            "rand-m9.5",
            "rand-tweights",
            "rand-n-1",
        ] {
            assert!(RandAugment::from_timm_str(bad, [0; 3], 1).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_round_trip() {
        for (op, name) in NAMES {
            assert_eq!(op.name(), name);
            assert_eq!(Op::from_name(name), Some(op));
        }
        assert_eq!(Op::from_name("Cutout"), None);
    }
}
