//! Image decoding to 8-bit RGB, matching Pillow's `Image.open(p).convert("RGB")`.
//!
//! The reference pipelines (UNILM, timm) decode with Pillow, so every colour
//! conversion here reproduces what Pillow 13 does rather than what would be
//! colorimetrically "right":
//!
//! * grey (any bit depth ≤ 8) is replicated into R, G and B;
//! * alpha is dropped, never composited (grey+alpha, RGBA, palette+tRNS, GIF
//!   transparency all keep the stored colour of a transparent pixel);
//! * palette images are looked up in their palette;
//! * **16-bit, multi-channel** (RGB, RGBA, grey+alpha in PNG and TIFF): Pillow
//!   unpacks them with its `;16B`/`;16L` raw modes, which keep only the high
//!   byte, i.e. `v >> 8` (checked with Pillow 13.0 for PNG RGB, RGBA and
//!   grey+alpha and TIFF RGB: `0x1234` → 18, `0x00ff` → 0);
//! * **16-bit, single-channel grey** (PNG and TIFF): Pillow opens these as
//!   mode `I;16`, whose conversion to RGB *saturates* instead of scaling:
//!   `min(v, 255)` (checked: 100 → 100, 256 → 255, 0x1234 → 255). This
//!   includes 16-bit grey PNGs with a tRNS colour key, which the `png` crate
//!   expands to grey+alpha but Pillow still opens as `I;16`.
//!
//! Like Pillow's `open`, nothing applies EXIF orientation or ICC profiles.
//! Known divergences: JPEG pixels may differ by a few levels (different IDCT
//! and chroma upsampling than libjpeg-turbo; see `tests/preprocess.rs`);
//! CMYK JPEG/TIFF and GIFs whose first frame does not cover the whole screen
//! are decoded but not checked against Pillow.
//!
//! Floating-point images are refused: Pillow cannot open float RGB TIFFs and
//! the `image` crate cannot open float grey TIFFs, so there is no common
//! behaviour to reproduce.

use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, bail};
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

/// Pillow's `Image.MAX_IMAGE_PIXELS` (`1024 * 1024 * 1024 // 4 // 3`).
const PILLOW_MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// Pillow raises `DecompressionBombError` above twice `MAX_IMAGE_PIXELS`
/// (between one and two times it only warns), so this is the largest image
/// the reference pipeline can load at all.
pub const MAX_PIXELS: u64 = 2 * PILLOW_MAX_IMAGE_PIXELS;

/// Decoder allocation cap: the largest accepted image at the widest pixel
/// type we accept (RGBA, 16 bits per channel = 8 bytes), plus 64 MiB of
/// decoder scratch. The default 512 MiB cap would refuse large RGB images
/// that Pillow still opens.
const MAX_DECODER_ALLOC: u64 = MAX_PIXELS * 8 + (64 << 20);

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (HWC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes: R, G, B for each pixel in row-major order.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// An image whose channel `c` of pixel (`x`, `y`) is `f(x, y, c)`.
    pub fn from_fn(width: usize, height: usize, f: impl Fn(usize, usize, usize) -> u8) -> Self {
        let mut data = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            for x in 0..width {
                data.extend((0..3).map(|c| f(x, y, c)));
            }
        }
        Self {
            width,
            height,
            data,
        }
    }
}

/// Reads and decodes an image file; see [`decode_rgb`].
pub fn load_rgb(path: &Path) -> anyhow::Result<RgbImage> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    decode_rgb(&bytes, &path.display().to_string())
}

/// Decodes an encoded image (JPEG, PNG, WebP, BMP, GIF first frame, TIFF) into
/// RGB the way Pillow's `convert("RGB")` does. The format is sniffed from the
/// content; `name` is only used in error messages.
///
/// Images larger than [`MAX_PIXELS`] are refused before any pixel data is
/// decoded, as Pillow does.
pub fn decode_rgb(bytes: &[u8], name: &str) -> anyhow::Result<RgbImage> {
    if bytes.is_empty() {
        bail!("{name}: empty file, not an image");
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .with_context(|| format!("{name}: cannot read image header"))?;
    if reader.format().is_none() {
        bail!("{name}: not a recognised image format");
    }
    reader.limits(decoder_limits());
    let decoder = reader
        .into_decoder()
        .with_context(|| format!("{name}: invalid or unsupported image"))?;

    let (width, height) = decoder.dimensions();
    check_dimensions(width, height).with_context(|| format!("{name}: image refused"))?;
    if decoder.total_bytes() > MAX_DECODER_ALLOC {
        bail!(
            "{name}: decoding would need {} bytes, over the {MAX_DECODER_ALLOC}-byte limit",
            decoder.total_bytes()
        );
    }

    let grey16 = is_png_grey16(bytes);
    let image = DynamicImage::from_decoder(decoder)
        .with_context(|| format!("{name}: corrupt or truncated image data"))?;
    to_rgb(image, grey16).with_context(|| format!("{name}: cannot convert to RGB"))
}

/// Whether `bytes` is a PNG whose header declares 16-bit greyscale (bit
/// depth 16, colour type 0), i.e. an image Pillow opens as `I;16` even when
/// a tRNS chunk makes the `png` crate add an alpha channel.
fn is_png_grey16(bytes: &[u8]) -> bool {
    // Signature (8 bytes), IHDR length (4), "IHDR" (4), width (4), height
    // (4), then bit depth and colour type.
    bytes.starts_with(b"\x89PNG\r\n\x1a\n")
        && bytes.get(12..16) == Some(&b"IHDR"[..])
        && bytes.get(24..26) == Some(&[16, 0][..])
}

fn decoder_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODER_ALLOC);
    limits
}

/// Refuses empty images and, like Pillow's decompression-bomb check, images
/// with more than [`MAX_PIXELS`] pixels.
fn check_dimensions(width: u32, height: u32) -> anyhow::Result<()> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 {
        bail!("image has no pixels ({width}x{height})");
    }
    if pixels > MAX_PIXELS {
        bail!(
            "{width}x{height} = {pixels} pixels exceeds the decompression-bomb limit of \
             {MAX_PIXELS} pixels"
        );
    }
    Ok(())
}

/// Converts any decoded pixel type to 8-bit RGB with Pillow's rules (see the
/// module documentation). `grey16_source` marks 16-bit grey+alpha pixels
/// that Pillow treats as single-channel `I;16`.
fn to_rgb(image: DynamicImage, grey16_source: bool) -> anyhow::Result<RgbImage> {
    let width = image.width() as usize;
    let height = image.height() as usize;
    let data = match image {
        DynamicImage::ImageRgb8(buf) => buf.into_raw(),
        DynamicImage::ImageRgba8(buf) => map_pixels(buf.as_raw(), 4, |p| [p[0], p[1], p[2]]),
        DynamicImage::ImageLuma8(buf) => map_pixels(buf.as_raw(), 1, |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(buf) => map_pixels(buf.as_raw(), 2, |p| [p[0]; 3]),
        DynamicImage::ImageRgb16(buf) => map_pixels(buf.as_raw(), 3, |p| {
            [high_byte(p[0]), high_byte(p[1]), high_byte(p[2])]
        }),
        DynamicImage::ImageRgba16(buf) => map_pixels(buf.as_raw(), 4, |p| {
            [high_byte(p[0]), high_byte(p[1]), high_byte(p[2])]
        }),
        DynamicImage::ImageLumaA16(buf) if grey16_source => {
            map_pixels(buf.as_raw(), 2, |p| [saturate(p[0]); 3])
        }
        DynamicImage::ImageLumaA16(buf) => map_pixels(buf.as_raw(), 2, |p| [high_byte(p[0]); 3]),
        DynamicImage::ImageLuma16(buf) => map_pixels(buf.as_raw(), 1, |p| [saturate(p[0]); 3]),
        other => bail!("unsupported pixel type {:?}", other.color()),
    };
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

/// Pillow's `;16B`/`;16L` unpackers keep the most significant byte.
fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

/// Pillow's `I;16` → `RGB` conversion clips instead of scaling.
fn saturate(v: u16) -> u8 {
    v.min(255) as u8
}

fn map_pixels<T: Copy>(src: &[T], channels: usize, f: impl Fn(&[T]) -> [u8; 3]) -> Vec<u8> {
    src.chunks_exact(channels).flat_map(f).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bomb_limit_is_twice_pillows_max_image_pixels() {
        assert_eq!(MAX_PIXELS, 178_956_970);
        // 17_895_697 * 10 is exactly the limit, which Pillow still accepts.
        assert!(check_dimensions(17_895_697, 10).is_ok());
        let err = check_dimensions(17_895_698, 10).unwrap_err().to_string();
        assert!(err.contains("178956980 pixels"), "{err}");
    }

    #[test]
    fn empty_images_are_refused() {
        assert!(check_dimensions(0, 10).is_err());
        assert!(check_dimensions(10, 0).is_err());
    }

    #[test]
    fn sixteen_bit_rules_follow_pillow() {
        assert_eq!(high_byte(0x1234), 0x12);
        assert_eq!(high_byte(0x00ff), 0);
        assert_eq!(saturate(100), 100);
        assert_eq!(saturate(256), 255);
    }

    #[test]
    fn png_grey16_header_detection() {
        let header = |depth: u8, colour: u8| {
            let mut h = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\x01\0\0\0\x01".to_vec();
            h.extend([depth, colour, 0, 0, 0]);
            h
        };
        assert!(is_png_grey16(&header(16, 0)));
        assert!(!is_png_grey16(&header(8, 0)));
        assert!(!is_png_grey16(&header(16, 4)));
        assert!(!is_png_grey16(&header(16, 0)[..20]));
    }

    #[test]
    fn garbage_is_an_error_naming_the_input() {
        for bytes in [&b""[..], b"hello, world", b"\x89PNG\r\n\x1a\n"] {
            let err = decode_rgb(bytes, "bad.png").unwrap_err();
            assert!(format!("{err:#}").contains("bad.png"), "{err:#}");
        }
    }
}
