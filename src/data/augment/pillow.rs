//! Bit-exact ports of the Pillow operations that timm's RandAugment calls,
//! for 8-bit RGB images.
//!
//! Each function follows the arithmetic of the Pillow C code or Python
//! wrapper it replaces (named in its doc comment), including the integer
//! types, the `float`/`double` precision of intermediate values and the
//! order of operations, so the outputs match Pillow 13 byte for byte.

use crate::data::decode::RgbImage;

/// Resampling filter of Pillow's geometric transforms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// `Image.BILINEAR`: linear interpolation in a 2×2 neighbourhood.
    Bilinear,
    /// `Image.BICUBIC`: cubic convolution in a 4×4 neighbourhood (the
    /// kernel of `Geometry.c`, not the antialiased one `resize` uses).
    Bicubic,
}

/// A per-channel lookup table, as `Image.point` takes for mode `RGB`.
pub(super) type Luts = [[u8; 256]; 3];

/// `Image.point(lut)`: maps every sample through its channel's table.
pub(super) fn point(img: &RgbImage, luts: &Luts) -> RgbImage {
    let mut data = img.data.clone();
    for px in data.chunks_exact_mut(3) {
        for (v, lut) in px.iter_mut().zip(luts) {
            *v = lut[usize::from(*v)];
        }
    }
    RgbImage { data, ..*img }
}

/// One table for all three channels (`ImageOps._lut` repeats a 256-entry
/// table three times for RGB).
pub(super) fn point_all(img: &RgbImage, lut: impl Fn(u8) -> u8) -> RgbImage {
    let table: [u8; 256] = std::array::from_fn(|i| lut(i as u8));
    point(img, &[table; 3])
}

/// `Image.histogram()` of each channel.
fn histograms(img: &RgbImage) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for px in img.data.chunks_exact(3) {
        for (hist, &v) in h.iter_mut().zip(px) {
            hist[usize::from(v)] += 1;
        }
    }
    h
}

/// `ImageOps.autocontrast(img)` (no cutoff, no ignored value): each
/// channel's occupied range `[lo, hi]` is stretched to `[0, 255]` with
/// `int(i * scale + offset)`, computed in `f64` like Python's floats.
pub(super) fn autocontrast(img: &RgbImage) -> RgbImage {
    let luts = histograms(img).map(|h| {
        let lo = h.iter().position(|&n| n != 0);
        let hi = h.iter().rposition(|&n| n != 0);
        let identity: [u8; 256] = std::array::from_fn(|i| i as u8);
        match (lo, hi) {
            (Some(lo), Some(hi)) if hi > lo => {
                let scale = 255.0 / (hi - lo) as f64;
                let offset = -(lo as f64) * scale;
                // Python's int() truncates toward zero, as does `as`.
                std::array::from_fn(|i| ((i as f64 * scale + offset) as i64).clamp(0, 255) as u8)
            }
            _ => identity,
        }
    });
    point(img, &luts)
}

/// `ImageOps.equalize(img)`: per channel, the cumulative histogram with
/// Pillow's integer rounding (`n // step`, starting at `step // 2`).
/// `Image.point` clips table entries above 255, which the last occupied bin
/// can produce.
pub(super) fn equalize(img: &RgbImage) -> RgbImage {
    let luts = histograms(img).map(|h| {
        let identity: [u8; 256] = std::array::from_fn(|i| i as u8);
        let occupied: Vec<u64> = h.iter().copied().filter(|&n| n != 0).collect();
        if occupied.len() <= 1 {
            return identity;
        }
        let total: u64 = occupied.iter().sum();
        let step = (total - occupied[occupied.len() - 1]) / 255;
        if step == 0 {
            return identity;
        }
        let mut n = step / 2;
        std::array::from_fn(|i| {
            let v = (n / step).min(255) as u8;
            n += h[i];
            v
        })
    });
    point(img, &luts)
}

/// `ImageOps.posterize(img, bits)`: keep the `bits` most significant bits.
///
/// Pillow 13 rejects `bits < 1`, which timm's `PosterizeIncreasing` asks
/// for at magnitude 10; the Pillow versions timm was written against mask
/// with `~(2 ** (8 - bits) - 1)`, which zeroes every sample for `bits <= 0`.
/// That older behaviour is kept so the op is defined over its whole range.
pub(super) fn posterize(img: &RgbImage, bits: i32) -> RgbImage {
    if bits >= 8 {
        return img.clone();
    }
    let mask = if bits <= 0 {
        0
    } else {
        !((1u8 << (8 - bits)) - 1)
    };
    point_all(img, |v| v & mask)
}

/// The luma Pillow's `convert("L")` computes (ITU-R 601-2 in 16-bit fixed
/// point, `L24` in `Convert.c`), rounding half up.
fn luma(px: &[u8]) -> u8 {
    let l = u32::from(px[0]) * 19595 + u32::from(px[1]) * 38470 + u32::from(px[2]) * 7471 + 0x8000;
    (l >> 16) as u8
}

/// `img.convert("L").convert("RGB")`: the degenerate image of
/// `ImageEnhance.Color`.
pub(super) fn grayscale(img: &RgbImage) -> RgbImage {
    let mut data = Vec::with_capacity(img.data.len());
    for px in img.data.chunks_exact(3) {
        let l = luma(px);
        data.extend_from_slice(&[l, l, l]);
    }
    RgbImage { data, ..*img }
}

/// The grey level of `ImageEnhance.Contrast`'s degenerate image:
/// `int(ImageStat.Stat(img.convert("L")).mean[0] + 0.5)`, the mean taken
/// as Python's exact integer sum over the count.
pub(super) fn mean_grey(img: &RgbImage) -> u8 {
    let count = img.data.len() / 3;
    if count == 0 {
        return 0;
    }
    let sum: u64 = img.data.chunks_exact(3).map(|px| u64::from(luma(px))).sum();
    (sum as f64 / count as f64 + 0.5) as u8
}

/// An image of one colour with `img`'s size.
pub(super) fn solid(img: &RgbImage, colour: [u8; 3]) -> RgbImage {
    RgbImage {
        width: img.width,
        height: img.height,
        data: colour.repeat(img.width * img.height),
    }
}

/// `img.filter(ImageFilter.SMOOTH)`: the 3×3 kernel `[1 1 1; 1 5 1; 1 1 1]
/// / 13` in `f32` (`ImagingFilter3x3`), rounding by a `+0.5` offset then
/// truncating. The one-pixel border is copied unchanged, and images smaller
/// than the kernel are returned as they are.
pub(super) fn smooth(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let mut out = img.clone();
    if w < 3 || h < 3 {
        return out;
    }
    // `_imaging.c` divides each `f32` weight by the `f32` scale.
    let edge = 1.0f32 / 13.0;
    let centre = 5.0f32 / 13.0;
    let stride = w * 3;
    let at = |y: usize, x: usize| f32::from(img.data[y * stride + x]);
    for y in 1..h - 1 {
        for x in 3..stride - 3 {
            let row =
                |yy: usize, k1: f32| at(yy, x - 3) * edge + at(yy, x) * k1 + at(yy, x + 3) * edge;
            // Same summation order as Pillow: offset, row below, row, row above.
            let mut ss = 0.5f32;
            ss += row(y + 1, edge);
            ss += row(y, centre);
            ss += row(y - 1, edge);
            out.data[y * stride + x] = ss.clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// `Image.blend(im1, im2, alpha)` (`ImagingBlend`): `im1 + alpha * (im2 -
/// im1)` in `f32`, truncated; extrapolation (`alpha` outside `[0, 1]`) is
/// clipped to `[0, 255]`, which Rust's saturating `as u8` also does.
/// `ImageEnhance` calls it with the degenerate image as `im1`.
pub(super) fn blend(im1: &RgbImage, im2: &RgbImage, alpha: f64) -> RgbImage {
    debug_assert_eq!((im1.width, im1.height), (im2.width, im2.height));
    // `_imaging.c` narrows the Python float to C `float`.
    let alpha = alpha as f32;
    if alpha == 0.0 {
        return im1.clone();
    }
    if alpha == 1.0 {
        return im2.clone();
    }
    let data = im1
        .data
        .iter()
        .zip(&im2.data)
        .map(|(&a, &b)| {
            let diff = i32::from(b) - i32::from(a);
            (f32::from(a) + alpha * diff as f32) as u8
        })
        .collect();
    RgbImage { data, ..*im1 }
}

/// `img.transform(img.size, Image.AFFINE, matrix, resample, fillcolor=fill)`
/// (`ImagingGenericTransform` with `affine_transform`): output pixel centre
/// `(x + 0.5, y + 0.5)` maps to source point `(a0 x + a1 y + a2, a3 x + a4 y
/// + a5)`; points outside the source keep the fill colour.
pub(super) fn affine(img: &RgbImage, a: [f64; 6], resample: Resample, fill: [u8; 3]) -> RgbImage {
    let mut out = solid(img, fill);
    let (w, h) = (img.width as f64, img.height as f64);
    for (y, row) in out.data.chunks_exact_mut(img.width * 3).enumerate() {
        let yin = y as f64 + 0.5;
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let xin = x as f64 + 0.5;
            let xx = a[0] * xin + a[1] * yin + a[2];
            let yy = a[3] * xin + a[4] * yin + a[5];
            // The filters' own bounds test (`*_filter32RGB`).
            if !(xx >= 0.0 && xx < w && yy >= 0.0 && yy < h) {
                continue;
            }
            match resample {
                Resample::Bilinear => bilinear_sample(img, xx, yy, px),
                Resample::Bicubic => bicubic_sample(img, xx, yy, px),
            }
        }
    }
    out
}

/// Splits a source coordinate into the integer sample index left of it
/// (relative to sample centres) and the fractional offset, like `Geometry.c`
/// (`v -= 0.5; i = FLOOR(v); d = v - i`).
fn split(v: f64) -> (isize, f64) {
    let v = v - 0.5;
    let i = v.floor();
    (i as isize, v - i)
}

/// `XCLIP` / `YCLIP`: clamps an index into `0..len`.
fn clip(i: isize, len: usize) -> usize {
    i.clamp(0, len as isize - 1) as usize
}

/// `bilinear_filter32RGB`.
fn bilinear_sample(img: &RgbImage, xx: f64, yy: f64, out: &mut [u8]) {
    let (x, dx) = split(xx);
    let (y, dy) = split(yy);
    let cols = [clip(x, img.width), clip(x + 1, img.width)];
    let row0 = clip(y, img.height);
    // Pillow reads the second row only when it exists, else reuses the first.
    let row1 = if (0..img.height as isize).contains(&(y + 1)) {
        (y + 1) as usize
    } else {
        row0
    };
    let sample = |r: usize, c: usize, b: usize| f64::from(img.data[(r * img.width + c) * 3 + b]);
    for (b, o) in out.iter_mut().enumerate() {
        let lerp_row = |r| {
            let (p0, p1) = (sample(r, cols[0], b), sample(r, cols[1], b));
            p0 + (p1 - p0) * dx
        };
        let v1 = lerp_row(row0);
        let v2 = lerp_row(row1);
        *o = (v1 + (v2 - v1) * dy) as u8;
    }
}

/// `bicubic_filter32RGB`: a separable cubic with `a = -1` on the 4×4
/// neighbourhood, rows first, in `f64`; the result is clipped and
/// truncated.
fn bicubic_sample(img: &RgbImage, xx: f64, yy: f64, out: &mut [u8]) {
    let (x, dx) = split(xx);
    let (y, dy) = split(yy);
    let cols: [usize; 4] = std::array::from_fn(|k| clip(x - 1 + k as isize, img.width));
    // The first row is clamped; each later one is used only if it lies in
    // the image, otherwise the previous row's value is repeated.
    let mut rows = [clip(y - 1, img.height); 4];
    for k in 1..4 {
        let r = y - 1 + k as isize;
        rows[k] = if (0..img.height as isize).contains(&r) {
            r as usize
        } else {
            rows[k - 1]
        };
    }
    let sample = |r: usize, c: usize, b: usize| f64::from(img.data[(r * img.width + c) * 3 + b]);
    for (b, o) in out.iter_mut().enumerate() {
        let v = rows.map(|r| {
            let p = cols.map(|c| sample(r, c, b));
            cubic(p, dx)
        });
        // Saturating `as u8` is Pillow's `<= 0 → 0, >= 255 → 255, else
        // truncate`.
        *o = cubic(v, dy) as u8;
    }
}

/// The `BICUBIC` macro of `Geometry.c`, same operation order. Sample values
/// are small integers, so computing the coefficients in `f64` is exact.
fn cubic([v1, v2, v3, v4]: [f64; 4], d: f64) -> f64 {
    let p1 = v2;
    let p2 = -v1 + v3;
    let p3 = 2.0 * (v1 - v2) + v3 - v4;
    let p4 = -v1 + v2 - v3 + v4;
    p1 + d * (p2 + d * (p3 + d * p4))
}

/// Python's `round(x, 15)`: the nearest double to `x` correctly rounded to
/// 15 decimal places (Rust's fixed-precision formatting is exact too).
fn round15(x: f64) -> f64 {
    format!("{x:.15}").parse().expect("formatted float parses")
}

/// `img.rotate(degrees, resample, fillcolor=fill)` without `expand`:
/// counter-clockwise about the image centre, through Pillow's affine matrix
/// (trigonometric terms rounded to 15 decimals) or, for multiples of 90°
/// that keep the size, its exact transposes.
pub(super) fn rotate(img: &RgbImage, degrees: f64, resample: Resample, fill: [u8; 3]) -> RgbImage {
    // Python's float `%` takes the sign of the divisor.
    let mut angle = degrees % 360.0;
    if angle < 0.0 {
        angle += 360.0;
    }
    if angle == 0.0 {
        return img.clone();
    }
    if angle == 180.0 {
        return transpose(img, |x, y, w, h| (w - 1 - x, h - 1 - y));
    }
    if img.width == img.height {
        if angle == 90.0 {
            return transpose(img, |x, y, w, _| (y, w - 1 - x));
        }
        if angle == 270.0 {
            return transpose(img, |x, y, _, h| (h - 1 - y, x));
        }
    }
    let (cx, cy) = (img.width as f64 / 2.0, img.height as f64 / 2.0);
    // CPython's `math.radians`: `x * (pi / 180)`.
    let theta = -(angle * (std::f64::consts::PI / 180.0));
    let (cos, sin, neg_sin) = (
        round15(theta.cos()),
        round15(theta.sin()),
        round15(-theta.sin()),
    );
    // Pillow maps (-cx, -cy) through the linear part and adds the centre
    // back; its intermediate `+ 0.0` cannot change the final sum.
    let tx = cos * -cx + sin * -cy + cx;
    let ty = neg_sin * -cx + cos * -cy + cy;
    let m = [cos, sin, tx, neg_sin, cos, ty];
    affine(img, m, resample, fill)
}

/// Moves each source pixel `(x, y)` to `to(x, y, width, height)` in an image
/// of the same size (the rotations of `Image.transpose`).
fn transpose(
    img: &RgbImage,
    to: impl Fn(usize, usize, usize, usize) -> (usize, usize),
) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let mut data = vec![0u8; img.data.len()];
    for y in 0..h {
        for x in 0..w {
            let (tx, ty) = to(x, y, w, h);
            let (src, dst) = ((y * w + x) * 3, (ty * w + tx) * 3);
            data[dst..dst + 3].copy_from_slice(&img.data[src..src + 3]);
        }
    }
    RgbImage { data, ..*img }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luma_matches_pillow_fixed_point() {
        assert_eq!(luma(&[255, 255, 255]), 255);
        assert_eq!(luma(&[0, 0, 0]), 0);
        assert_eq!(luma(&[255, 0, 0]), 76);
        assert_eq!(luma(&[0, 255, 0]), 150);
        assert_eq!(luma(&[0, 0, 255]), 29);
    }

    #[test]
    fn round15_rounds_to_fifteen_decimals() {
        assert_eq!(round15(0.1 + 0.2), 0.3);
        assert_eq!(round15(1.0 / 3.0), 0.333_333_333_333_333);
        assert_eq!(round15(-1.0), -1.0);
        assert_eq!(round15(1e-17), 0.0);
    }

    #[test]
    fn cubic_interpolates_sample_points() {
        let p = [10.0, 20.0, 40.0, 80.0];
        assert_eq!(cubic(p, 0.0), 20.0);
        assert_eq!(cubic(p, 1.0), 40.0);
    }

    #[test]
    fn quarter_turns_are_transposes() {
        let img = RgbImage::from_fn(4, 4, |x, y, c| (x * 16 + y * 4 + c) as u8);
        let fill = [1, 2, 3];
        let four = (0..4).fold(img.clone(), |acc, _| {
            rotate(&acc, 90.0, Resample::Bicubic, fill)
        });
        assert_eq!(four, img);
        let half = rotate(&img, 180.0, Resample::Bicubic, fill);
        assert_eq!(rotate(&half, -180.0, Resample::Bilinear, fill), img);
        assert_eq!(
            rotate(&img, 270.0, Resample::Bicubic, fill),
            rotate(&half, 90.0, Resample::Bicubic, fill)
        );
        assert_eq!(rotate(&img, 360.0, Resample::Bicubic, fill), img);
    }

    #[test]
    fn identity_affine_is_a_copy() {
        let img = RgbImage::from_fn(7, 5, |x, y, c| (x * 30 + y * 11 + c * 7) as u8);
        for resample in [Resample::Bilinear, Resample::Bicubic] {
            let out = affine(&img, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], resample, [9, 9, 9]);
            assert_eq!(out, img);
        }
    }

    #[test]
    fn blend_endpoints_are_copies() {
        let a = RgbImage::from_fn(3, 2, |x, _, _| x as u8 * 50);
        let b = RgbImage::from_fn(3, 2, |_, y, _| 200 - y as u8 * 50);
        assert_eq!(blend(&a, &b, 0.0), a);
        assert_eq!(blend(&a, &b, 1.0), b);
        // Extrapolation saturates.
        assert!(
            blend(&a, &b, 3.0)
                .data
                .iter()
                .all(|&v| v >= 200 || v == 150)
        );
    }

    #[test]
    fn smooth_keeps_border_and_constant_images() {
        let img = RgbImage::from_fn(5, 4, |x, y, _| if (x + y) % 2 == 0 { 255 } else { 0 });
        let out = smooth(&img);
        for y in 0..4 {
            for x in 0..5 {
                let border = x == 0 || y == 0 || x == 4 || y == 3;
                let i = (y * 5 + x) * 3;
                if border {
                    assert_eq!(out.data[i], img.data[i]);
                }
            }
        }
        let flat = RgbImage::from_fn(6, 6, |_, _, c| [3, 128, 250][c]);
        assert_eq!(smooth(&flat), flat);
        let tiny = RgbImage::from_fn(2, 9, |x, y, _| (x + y) as u8);
        assert_eq!(smooth(&tiny), tiny);
    }

    #[test]
    fn equalize_and_autocontrast_leave_single_level_channels() {
        let img = RgbImage::from_fn(32, 32, |x, y, c| {
            if c == 2 {
                77
            } else {
                ((x * 32 + y) % 256) as u8
            }
        });
        for out in [equalize(&img), autocontrast(&img)] {
            assert!(out.data.chunks_exact(3).all(|px| px[2] == 77));
        }
    }

    #[test]
    fn posterize_zero_bits_is_black() {
        let img = RgbImage::from_fn(3, 3, |x, y, c| (x * 80 + y * 20 + c) as u8);
        assert!(posterize(&img, 0).data.iter().all(|&v| v == 0));
        assert_eq!(posterize(&img, 8), img);
        assert!(posterize(&img, 1).data.iter().all(|&v| v == 0 || v == 128));
    }
}
