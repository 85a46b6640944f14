//! Random resized crop and horizontal flip.

use rand::Rng;

use crate::data::decode::RgbImage;
use crate::data::resize::resize_bicubic;

/// A crop rectangle in pixels, inside the image it was sampled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// timm's `RandomResizedCropAndInterpolation` with bicubic interpolation: a
/// box covering a random fraction `scale` of the image area with a
/// log-uniform aspect ratio (width / height) in `ratio`, resized to `size`.
#[derive(Clone, Debug, PartialEq)]
pub struct RandomResizedCrop {
    /// Output size as (height, width).
    pub size: (usize, usize),
    /// Range of the box area as a fraction of the image area.
    pub scale: (f64, f64),
    /// Range of the box aspect ratio, width / height.
    pub ratio: (f64, f64),
}

impl RandomResizedCrop {
    /// torchvision's defaults: area 8 %–100 %, aspect 3/4–4/3.
    pub fn new(size: (usize, usize)) -> Self {
        Self {
            size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }

    /// `get_params`: up to ten draws of area and log-uniform aspect, the
    /// first whose rounded box fits is placed uniformly; otherwise the
    /// centred box of the whole image with its aspect clamped into `ratio`.
    ///
    /// timm accepts zero-sized boxes (it only tests the upper bounds);
    /// torchvision, followed here, also requires both sides to be positive,
    /// which only matters for images a few pixels across. The image must
    /// not be empty.
    pub fn sample_box(
        &self,
        width: usize,
        height: usize,
        rng: &mut (impl Rng + ?Sized),
    ) -> CropBox {
        let area = (width * height) as f64;
        let log_ratio = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area = uniform(rng, self.scale) * area;
            let aspect = uniform(rng, log_ratio).exp();
            // Python's round() rounds half to even.
            let w = (target_area * aspect).sqrt().round_ties_even() as usize;
            let h = (target_area / aspect).sqrt().round_ties_even() as usize;
            if 0 < w && w <= width && 0 < h && h <= height {
                return CropBox {
                    top: rng.random_range(0..=height - h),
                    left: rng.random_range(0..=width - w),
                    height: h,
                    width: w,
                };
            }
        }
        let (min_ratio, max_ratio) = (
            self.ratio.0.min(self.ratio.1),
            self.ratio.0.max(self.ratio.1),
        );
        let in_ratio = width as f64 / height as f64;
        let (w, h) = if in_ratio < min_ratio {
            (width, (width as f64 / min_ratio).round_ties_even() as usize)
        } else if in_ratio > max_ratio {
            (
                (height as f64 * max_ratio).round_ties_even() as usize,
                height,
            )
        } else {
            (width, height)
        };
        CropBox {
            top: (height - h) / 2,
            left: (width - w) / 2,
            height: h,
            width: w,
        }
    }

    /// Samples a box and returns it resized to `size` with Pillow's bicubic
    /// filter (torchvision `F.resized_crop`: crop, then resize).
    pub fn apply(&self, img: &RgbImage, rng: &mut (impl Rng + ?Sized)) -> RgbImage {
        let b = self.sample_box(img.width, img.height, rng);
        self.resize_box(img, b)
    }

    /// The deterministic half of [`Self::apply`]: `img` cropped to `b` and
    /// resized to `size`.
    pub fn resize_box(&self, img: &RgbImage, b: CropBox) -> RgbImage {
        resize_bicubic(&crop(img, b), self.size.1, self.size.0)
    }
}

/// `random.uniform(lo, hi)`: `lo + (hi - lo) * U[0, 1)`.
pub(super) fn uniform(rng: &mut (impl Rng + ?Sized), (lo, hi): (f64, f64)) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// `Image.crop` of a box inside the image.
fn crop(img: &RgbImage, b: CropBox) -> RgbImage {
    assert!(
        b.top + b.height <= img.height && b.left + b.width <= img.width,
        "crop box {b:?} outside a {}x{} image",
        img.width,
        img.height
    );
    let mut data = Vec::with_capacity(b.width * b.height * 3);
    for y in b.top..b.top + b.height {
        data.extend_from_slice(&img.data[(y * img.width + b.left) * 3..][..b.width * 3]);
    }
    RgbImage {
        width: b.width,
        height: b.height,
        data,
    }
}

/// Mirrors the image left to right (`F.hflip`).
pub fn hflip(img: &RgbImage) -> RgbImage {
    if img.data.is_empty() {
        return img.clone();
    }
    let mut data = Vec::with_capacity(img.data.len());
    for row in img.data.chunks_exact(img.width * 3) {
        for px in row.chunks_exact(3).rev() {
            data.extend_from_slice(px);
        }
    }
    RgbImage { data, ..*img }
}
