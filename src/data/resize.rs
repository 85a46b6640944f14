//! Bit-exact port of Pillow's bicubic `Image.resize` for 8-bit RGB.
//!
//! torchvision's `Resize` on a PIL image calls `img.resize(size, BICUBIC)`,
//! which runs Pillow's `ImagingResample`: a separable convolution, horizontal
//! pass first, with the Keys cubic kernel (a = -0.5) stretched by the
//! downscale factor so that shrinking also low-pass filters (antialiasing).
//!
//! Matching Pillow bit for bit requires copying its arithmetic, not just its
//! maths:
//! * the weights are computed in `f64`, normalised to sum to one, then
//!   rounded half away from zero to fixed point with 22 fractional bits;
//! * each pass accumulates `u8 × i32` products in an `i32` seeded with one
//!   half (so the final shift rounds), and clips the result to `0..=255`;
//! * the intermediate image between the passes is itself rounded to `u8`.
//!
//! Integer accumulation makes the result independent of summation order, so
//! the loops here are free to differ from Pillow's as long as every sum holds
//! the same terms.

use rayon::prelude::*;

use super::decode::RgbImage;

/// Fractional bits of the fixed-point weights. Pillow reserves 8 bits for the
/// pixel value and 2 for overshoot of the negative-lobed kernel in a 32-bit
/// signed accumulator: `32 - 8 - 2`.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Accumulator seed: one half in fixed point, so `>> PRECISION_BITS` rounds.
const ROUNDING: i32 = 1 << (PRECISION_BITS - 1);

/// Half-width of the bicubic kernel at scale 1.
const BICUBIC_SUPPORT: f64 = 2.0;

/// Output samples per pass below which the work stays on the calling thread
/// (thread hand-off costs more than it saves on small images).
const PARALLEL_MIN_SAMPLES: usize = 1 << 16;

/// Resizes `img` to `width` × `height` exactly as Pillow's
/// `Image.resize((width, height), Image.BICUBIC)` does for mode `RGB`.
///
/// A zero target dimension yields an empty image.
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    if width == 0 || height == 0 || img.width == 0 || img.height == 0 {
        return RgbImage {
            width,
            height,
            data: vec![0; width * height * 3],
        };
    }
    if (width, height) == (img.width, img.height) {
        return img.clone();
    }

    let vertical = Weights::bicubic(img.height, height);
    // Only the source rows the vertical pass reads are resampled
    // horizontally, as Pillow does; this is a saving, not a change in result.
    let first_row = vertical.spans[0].start;
    let end_row = vertical.spans[height - 1].end();

    let (temp, row_offset) = if width == img.width {
        (img.clone(), 0)
    } else {
        let horizontal = Weights::bicubic(img.width, width);
        (
            horizontal_pass(img, &horizontal, first_row..end_row),
            first_row,
        )
    };
    if height == img.height {
        temp
    } else {
        vertical_pass(&temp, &vertical, row_offset)
    }
}

/// The source range one output sample reads: `len` samples from `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: usize,
    len: usize,
}

impl Span {
    fn end(self) -> usize {
        self.start + self.len
    }
}

/// Fixed-point filter weights for one axis: output sample `i` is the sum over
/// `spans[i]` of source samples times `taps[i * stride..][..spans[i].len]`.
#[derive(Debug)]
struct Weights {
    spans: Vec<Span>,
    taps: Vec<i32>,
    stride: usize,
}

impl Weights {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bicubic
    /// filter and the whole-image box `[0, in_size)`.
    fn bicubic(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = BICUBIC_SUPPORT * filter_scale;
        let stride = support.ceil() as usize * 2 + 1;
        let inv_filter_scale = 1.0 / filter_scale;

        let mut spans = Vec::with_capacity(out_size);
        let mut taps = vec![0i32; out_size * stride];
        let mut weights = Vec::with_capacity(stride);
        for (i, row) in taps.chunks_exact_mut(stride).enumerate() {
            let center = (i as f64 + 0.5) * scale;
            // `as` truncates toward zero like C's (int) cast; negative values
            // saturate to 0, which is also where Pillow clamps them.
            let start = (center - support + 0.5) as usize;
            let end = ((center + support + 0.5) as usize).min(in_size);
            let len = end.saturating_sub(start);

            weights.clear();
            weights.extend(
                (start..end).map(|x| bicubic_kernel((x as f64 - center + 0.5) * inv_filter_scale)),
            );
            let total: f64 = weights.iter().sum();
            for (tap, &w) in row.iter_mut().zip(&weights) {
                let normalised = if total != 0.0 { w / total } else { w };
                *tap = to_fixed(normalised);
            }
            spans.push(Span { start, len });
        }
        Self {
            spans,
            taps,
            stride,
        }
    }

    fn taps(&self, i: usize) -> &[i32] {
        &self.taps[i * self.stride..][..self.spans[i].len]
    }
}

/// Keys' cubic convolution kernel with a = -0.5, written in the same
/// operation order as Pillow so every `f64` rounding step is identical.
fn bicubic_kernel(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's conversion of a normalised weight to fixed point: round half
/// away from zero (`(int)(w * 2^22 ± 0.5)`, truncating toward zero).
fn to_fixed(w: f64) -> i32 {
    let scaled = w * f64::from(1u32 << PRECISION_BITS);
    if w < 0.0 {
        (scaled - 0.5) as i32
    } else {
        (scaled + 0.5) as i32
    }
}

/// Pillow's `clip8`: drop the fraction (arithmetic shift, i.e. floor) and
/// clamp to the `u8` range.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resamples rows `rows` of `img` to `weights.spans.len()` columns.
fn horizontal_pass(img: &RgbImage, weights: &Weights, rows: std::ops::Range<usize>) -> RgbImage {
    let width = weights.spans.len();
    let height = rows.len();
    let in_stride = img.width * 3;
    let mut data = vec![0u8; width * height * 3];
    let src_rows = &img.data[rows.start * in_stride..rows.end * in_stride];

    let resample_row = |(src, dst): (&[u8], &mut [u8])| {
        for (x, out) in dst.chunks_exact_mut(3).enumerate() {
            let span = weights.spans[x];
            let pixels = &src[span.start * 3..span.end() * 3];
            let mut acc = [ROUNDING; 3];
            for (px, &k) in pixels.chunks_exact(3).zip(weights.taps(x)) {
                acc[0] += i32::from(px[0]) * k;
                acc[1] += i32::from(px[1]) * k;
                acc[2] += i32::from(px[2]) * k;
            }
            out.copy_from_slice(&acc.map(clip8));
        }
    };
    let out_stride = width * 3;
    if data.len() >= PARALLEL_MIN_SAMPLES {
        src_rows
            .par_chunks_exact(in_stride)
            .zip(data.par_chunks_exact_mut(out_stride))
            .for_each(resample_row);
    } else {
        src_rows
            .chunks_exact(in_stride)
            .zip(data.chunks_exact_mut(out_stride))
            .for_each(resample_row);
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// Resamples `img` to `weights.spans.len()` rows; span starts are relative
/// to source row `row_offset` of the original image, i.e. row 0 of `img`
/// is original row `row_offset`.
fn vertical_pass(img: &RgbImage, weights: &Weights, row_offset: usize) -> RgbImage {
    let height = weights.spans.len();
    let row_len = img.width * 3;
    let mut data = vec![0u8; row_len * height];

    let resample_row = |(y, dst): (usize, &mut [u8])| {
        let span = weights.spans[y];
        let first = span.start - row_offset;
        let mut acc = vec![ROUNDING; row_len];
        for (dy, &k) in weights.taps(y).iter().enumerate() {
            let src = &img.data[(first + dy) * row_len..][..row_len];
            for (a, &p) in acc.iter_mut().zip(src) {
                *a += i32::from(p) * k;
            }
        }
        for (d, &a) in dst.iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    };
    if data.len() >= PARALLEL_MIN_SAMPLES {
        data.par_chunks_exact_mut(row_len)
            .enumerate()
            .for_each(resample_row);
    } else {
        data.chunks_exact_mut(row_len)
            .enumerate()
            .for_each(resample_row);
    }
    RgbImage {
        width: img.width,
        height,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_values() {
        assert_eq!(bicubic_kernel(0.0), 1.0);
        assert_eq!(bicubic_kernel(1.0), 0.0);
        assert_eq!(bicubic_kernel(-1.0), 0.0);
        assert_eq!(bicubic_kernel(2.0), 0.0);
        assert_eq!(bicubic_kernel(0.5), 0.5625);
        assert_eq!(bicubic_kernel(1.5), -0.0625);
    }

    #[test]
    fn fixed_point_rounds_half_away_from_zero() {
        assert_eq!(to_fixed(1.0), 1 << 22);
        assert_eq!(to_fixed(0.5 / f64::from(1u32 << 22)), 1);
        assert_eq!(to_fixed(-0.5 / f64::from(1u32 << 22)), -1);
        assert_eq!(to_fixed(-0.0625), -(1 << 18));
    }

    #[test]
    fn clip8_floors_and_clamps() {
        assert_eq!(clip8(-1), 0);
        assert_eq!(clip8((3 << 22) - 1), 2);
        assert_eq!(clip8(256 << 22), 255);
    }

    #[test]
    fn downscale_weights_are_stretched_and_sum_to_one() {
        // 2x reduction: support 4 source samples each side, 9 taps at most.
        let w = Weights::bicubic(100, 50);
        assert_eq!(w.stride, 9);
        assert_eq!(w.spans[0], Span { start: 0, len: 5 });
        assert_eq!(w.spans[10], Span { start: 17, len: 8 });
        for i in 0..50 {
            let sum: i32 = w.taps(i).iter().sum();
            assert!((sum - (1 << 22)).abs() <= 8, "row {i}: {sum}");
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_fn(37, 23, |_, _, c| [10, 128, 250][c]);
        for (w, h) in [(256, 160), (11, 7), (37, 5), (3, 23)] {
            let out = resize_bicubic(&img, w, h);
            assert_eq!((out.width, out.height), (w, h));
            assert!(out.data.chunks_exact(3).all(|p| p == [10, 128, 250]));
        }
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = RgbImage::from_fn(5, 4, |x, y, c| (x * 40 + y * 7 + c) as u8);
        assert_eq!(resize_bicubic(&img, 5, 4), img);
    }

    #[test]
    fn zero_target_is_empty() {
        let img = RgbImage::from_fn(5, 4, |_, _, _| 1);
        assert!(resize_bicubic(&img, 0, 4).data.is_empty());
    }
}
