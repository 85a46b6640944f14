//! The evaluation transform of the reference pipelines (UNILM, timm):
//! torchvision `Resize(short, BICUBIC)` → `CenterCrop(crop)` → `ToTensor()`
//! → `Normalize(mean, std)`, reproduced step by step.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::decode::{RgbImage, load_rgb};
use super::resize::resize_bicubic;

/// timm's `IMAGENET_DEFAULT_MEAN`, used by every BEiT v2 classifier.
pub const IMAGENET_DEFAULT_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// timm's `IMAGENET_DEFAULT_STD`.
pub const IMAGENET_DEFAULT_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// timm's `IMAGENET_INCEPTION_MEAN` (maps `[0, 1]` to `[-1, 1]`), used by
/// BEiT v1 classifiers.
pub const IMAGENET_INCEPTION_MEAN: [f32; 3] = [0.5, 0.5, 0.5];
/// timm's `IMAGENET_INCEPTION_STD`.
pub const IMAGENET_INCEPTION_STD: [f32; 3] = [0.5, 0.5, 0.5];

/// Resize-shorter-side, centre-crop, normalise: the classifier eval pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalTransform {
    /// Target length of the shorter side after resizing.
    pub resize_short: usize,
    /// Crop size as (height, width).
    pub crop: (usize, usize),
    /// Per-channel mean subtracted from `[0, 1]` RGB values.
    pub mean: [f32; 3],
    /// Per-channel standard deviation the centred values are divided by.
    pub std: [f32; 3],
}

impl EvalTransform {
    /// timm/UNILM convention: resize the short side to
    /// `floor(crop_h / crop_pct)` (224 @ 0.875 → 256, @ 0.9 → 248,
    /// @ 1.0 → 224). For non-square crops timm resizes both sides instead;
    /// this transform always keys on the crop height.
    pub fn from_crop_pct(
        crop: (usize, usize),
        crop_pct: f64,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Self {
        Self {
            resize_short: (crop.0 as f64 / crop_pct).floor() as usize,
            crop,
            mean,
            std,
        }
    }

    /// torchvision `Resize(resize_short)` with PIL bicubic: the shorter side
    /// becomes `resize_short`, the longer one is scaled and truncated. An
    /// image already at that size is returned unchanged, as torchvision does.
    pub fn resize_short_side(&self, img: &RgbImage) -> RgbImage {
        let (width, height) = short_side_size(img.width, img.height, self.resize_short);
        resize_bicubic(img, width, height)
    }

    /// torchvision `ToTensor()` + `Normalize(mean, std)` in `f32`: CHW
    /// values `(v / 255 - mean[c]) / std[c]`, with the same operation order
    /// so results agree to the last bit or so.
    pub fn to_tensor_data(&self, img: &RgbImage) -> Vec<f32> {
        let mut out = Vec::with_capacity(img.data.len());
        for c in 0..3 {
            let (mean, std) = (self.mean[c], self.std[c]);
            let pixels = img.data.chunks_exact(3);
            out.extend(pixels.map(|px| (f32::from(px[c]) / 255.0 - mean) / std));
        }
        out
    }

    /// Runs the whole pipeline and returns CHW data of length
    /// `3 * crop.0 * crop.1`.
    pub fn preprocess(&self, img: &RgbImage) -> anyhow::Result<Vec<f32>> {
        self.validate()?;
        let resized = self.resize_short_side(img);
        let cropped = center_crop(&resized, self.crop.0, self.crop.1);
        Ok(self.to_tensor_data(&cropped))
    }

    /// Runs the whole pipeline; the tensor has shape `(3, crop.0, crop.1)`,
    /// dtype f32, on the CPU.
    pub fn apply(&self, img: &RgbImage) -> anyhow::Result<Tensor> {
        let data = self.preprocess(img)?;
        Ok(Tensor::from_vec(
            data,
            (3, self.crop.0, self.crop.1),
            &Device::Cpu,
        )?)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.resize_short == 0 || self.crop.0 == 0 || self.crop.1 == 0 {
            bail!(
                "invalid eval transform: resize {} / crop {}x{} must be positive",
                self.resize_short,
                self.crop.0,
                self.crop.1
            );
        }
        Ok(())
    }
}

/// torchvision's output size for `Resize(short)` on a `width` × `height`
/// image: `(new_width, new_height)` with the shorter side (the width on a
/// tie) set to `short` and the longer one `int(short * long / shorter)`.
pub fn short_side_size(width: usize, height: usize, short: usize) -> (usize, usize) {
    let (shorter, longer) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // Python's true division of the exact integer product, then truncation.
    let long = ((short * longer) as f64 / shorter as f64) as usize;
    if width <= height {
        (short, long)
    } else {
        (long, short)
    }
}

/// torchvision `CenterCrop((height, width))`: the offset on each axis is
/// `round((size - crop) / 2)` with Python's half-to-even rounding; an axis
/// shorter than the crop is first zero-padded, `(crop - size) // 2` before
/// and the rest after.
pub fn center_crop(img: &RgbImage, height: usize, width: usize) -> RgbImage {
    let rows = crop_axis(img.height, height);
    let cols = crop_axis(img.width, width);
    let mut data = vec![0u8; width * height * 3];
    for y in 0..rows.len {
        let src = &img.data[((rows.src + y) * img.width + cols.src) * 3..][..cols.len * 3];
        let dst = &mut data[((rows.dst + y) * width + cols.dst) * 3..][..cols.len * 3];
        dst.copy_from_slice(src);
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// Where a centre crop of one axis reads and writes: `len` samples from
/// source index `src` to destination index `dst`.
#[derive(Debug, PartialEq, Eq)]
struct AxisCrop {
    src: usize,
    dst: usize,
    len: usize,
}

fn crop_axis(size: usize, crop: usize) -> AxisCrop {
    if crop > size {
        AxisCrop {
            src: 0,
            dst: (crop - size) / 2,
            len: size,
        }
    } else {
        AxisCrop {
            src: ((size - crop) as f64 / 2.0).round_ties_even() as usize,
            dst: 0,
            len: crop,
        }
    }
}

/// Decodes and preprocesses `paths` in parallel. Each entry is the CHW data
/// for the corresponding path or an error naming it, so a batch job can skip
/// unreadable files.
pub fn load_batch(paths: &[PathBuf], t: &EvalTransform) -> Vec<anyhow::Result<Vec<f32>>> {
    paths.par_iter().map(|p| load_one(p, t)).collect()
}

fn load_one(path: &Path, t: &EvalTransform) -> anyhow::Result<Vec<f32>> {
    let img = load_rgb(path)?;
    t.preprocess(&img)
        .with_context(|| format!("cannot preprocess {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: usize, height: usize) -> RgbImage {
        let data = (0..width * height)
            .flat_map(|i| [(i % 256) as u8, (i / 256 % 256) as u8, 7])
            .collect();
        RgbImage {
            width,
            height,
            data,
        }
    }

    #[test]
    fn crop_pct_sizes() {
        let m = IMAGENET_DEFAULT_MEAN;
        let s = IMAGENET_DEFAULT_STD;
        let size = |pct| EvalTransform::from_crop_pct((224, 224), pct, m, s).resize_short;
        assert_eq!(size(0.875), 256);
        assert_eq!(size(0.9), 248);
        assert_eq!(size(0.95), 235);
        assert_eq!(size(1.0), 224);
        assert_eq!(
            EvalTransform::from_crop_pct((384, 384), 1.0, m, s).resize_short,
            384
        );
    }

    #[test]
    fn short_side_sizes_truncate() {
        assert_eq!(short_side_size(500, 375, 256), (341, 256)); // 341.33
        assert_eq!(short_side_size(375, 500, 256), (256, 341));
        assert_eq!(short_side_size(451, 300, 248), (372, 248)); // 372.85
        assert_eq!(short_side_size(300, 300, 256), (256, 256));
        assert_eq!(short_side_size(80, 100, 256), (256, 320));
    }

    #[test]
    fn crop_offsets_round_half_to_even() {
        // (size - crop) / 2 = 0.5, 1.5, 2.5, 3.5 → 0, 2, 2, 4.
        assert_eq!(crop_axis(225, 224).src, 0);
        assert_eq!(crop_axis(227, 224).src, 2);
        assert_eq!(crop_axis(229, 224).src, 2);
        assert_eq!(crop_axis(231, 224).src, 4);
        assert_eq!(crop_axis(256, 224).src, 16);
    }

    #[test]
    fn crop_pads_small_axes_with_zeros() {
        // 3 missing columns: 1 before, 2 after.
        assert_eq!(
            crop_axis(5, 8),
            AxisCrop {
                src: 0,
                dst: 1,
                len: 5
            }
        );
        let img = gradient(5, 10);
        let out = center_crop(&img, 4, 8);
        assert_eq!((out.width, out.height), (8, 4));
        let row = &out.data[..8 * 3];
        assert_eq!(&row[..3], &[0, 0, 0]);
        assert_eq!(&row[3..6], &img.data[3 * 5 * 3..][..3]); // source row 3, column 0
        assert_eq!(&row[18..], &[0; 6]);
    }

    #[test]
    fn crop_picks_the_centre() {
        let img = gradient(10, 6);
        let out = center_crop(&img, 2, 4);
        // top = round(2.0) = 2, left = round(3.0) = 3.
        assert_eq!(&out.data[..3], &img.data[(2 * 10 + 3) * 3..][..3]);
    }

    #[test]
    fn normalisation_matches_formula() {
        let t = EvalTransform::from_crop_pct((1, 2), 1.0, [0.5, 0.25, 0.0], [0.5, 0.5, 1.0]);
        let img = RgbImage {
            width: 2,
            height: 1,
            data: vec![255, 0, 51, 0, 255, 102],
        };
        let v = t.to_tensor_data(&img);
        assert_eq!(v, vec![1.0, -1.0, -0.5, 1.5, 0.2, 0.4]);
    }

    #[test]
    fn apply_shape_and_errors() {
        let m = IMAGENET_DEFAULT_MEAN;
        let s = IMAGENET_DEFAULT_STD;
        let t = EvalTransform::from_crop_pct((24, 20), 0.875, m, s);
        let tensor = t.apply(&gradient(40, 30)).unwrap();
        assert_eq!(tensor.dims(), &[3, 24, 20]);
        let bad = EvalTransform::from_crop_pct((0, 20), 0.875, m, s);
        assert!(bad.apply(&gradient(40, 30)).is_err());
    }
}
