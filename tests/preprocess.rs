//! Decoding and preprocessing checked against Pillow / torchvision output
//! recorded by `tools/make_image_fixtures.py` in
//! `tests/fixtures/images/expected.safetensors`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use beitv2::data::{
    EvalTransform, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, RgbImage, load_batch, load_rgb,
    resize_bicubic,
};
use safetensors::{Dtype, SafeTensors};
mod common;
use common::rgb_image;

/// Largest per-channel difference allowed between our JPEG decoding
/// (zune-jpeg) and Pillow's (libjpeg-turbo), which use different integer
/// IDCTs and chroma upsampling. Measured maxima: 4 (photo.jpg,
/// 4:2:0), 2 (photo444.jpg, 4:4:4), 1 (grey.jpg).
const JPEG_MAX_ABS_DIFF: u8 = 4;

/// Maximum allowed error of the normalised tensor against torchvision's.
const TENSOR_TOLERANCE: f32 = 1e-6;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/images").join(name)
}

fn photo(name: &str) -> PathBuf {
    root().join("assets/photos").join(format!("{name}.png"))
}

fn expected_file() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| std::fs::read(fixture("expected.safetensors")).unwrap())
}

fn expected() -> SafeTensors<'static> {
    SafeTensors::deserialize(expected_file()).unwrap()
}

/// An expected uint8 HWC image.
fn expected_image(key: &str) -> RgbImage {
    rgb_image(&expected(), key)
}

fn expected_f32(key: &str) -> (Vec<usize>, Vec<f32>) {
    let st = expected();
    let view = st.tensor(key).unwrap();
    assert_eq!(view.dtype(), Dtype::F32, "{key}");
    let data = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (view.shape().to_vec(), data)
}

/// Describes how `actual` differs from `expected`, or `None` if identical.
fn image_mismatch(actual: &RgbImage, expected: &RgbImage) -> Option<String> {
    if (actual.width, actual.height) != (expected.width, expected.height) {
        return Some(format!(
            "size {}x{} != expected {}x{}",
            actual.width, actual.height, expected.width, expected.height
        ));
    }
    let differing = actual
        .data
        .iter()
        .zip(&expected.data)
        .filter(|(a, b)| a != b)
        .count();
    (differing > 0).then(|| format!("{differing} of {} bytes differ", actual.data.len()))
}

fn max_abs_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn crop(img: &RgbImage, left: usize, top: usize, width: usize, height: usize) -> RgbImage {
    let data = (top..top + height)
        .flat_map(|y| &img.data[(y * img.width + left) * 3..][..width * 3])
        .copied()
        .collect();
    RgbImage {
        width,
        height,
        data,
    }
}

fn resize_short(size: usize) -> EvalTransform {
    let mut t =
        EvalTransform::from_crop_pct((224, 224), 1.0, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD);
    t.resize_short = size;
    t
}

#[test]
fn lossless_decoding_matches_pillow_exactly() {
    let files = [
        "mode_1.png",
        "l.png",
        "la.png",
        "p.png",
        "p_trns.png",
        "p4.png",
        "rgb.png",
        "rgba.png",
        "grey16.png",
        "grey16_trns.png",
        "rgb16.png",
        "anim.gif",
        "rgb.bmp",
        "p.bmp",
        "rgb.tif",
        "rgba_lzw.tif",
        "grey16.tif",
        "lossless.webp",
        "rgba_lossless.webp",
    ];
    let failures: Vec<String> = files
        .iter()
        .filter_map(|name| {
            let expected = expected_image(&format!("decode/{name}"));
            match load_rgb(&fixture(name)) {
                Ok(img) => image_mismatch(&img, &expected).map(|m| format!("{name}: {m}")),
                Err(e) => Some(format!("{name}: {e:#}")),
            }
        })
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn jpeg_decoding_is_close_to_pillow() {
    for name in ["photo.jpg", "photo444.jpg", "grey.jpg"] {
        let img = load_rgb(&fixture(name)).unwrap();
        let expected = expected_image(&format!("decode/{name}"));
        let diff = max_abs_diff(&img, &expected);
        println!("{name}: max abs difference to Pillow {diff}");
        assert!(diff <= JPEG_MAX_ABS_DIFF, "{name}: {diff}");
    }
}

#[test]
fn bicubic_short_side_resize_matches_pillow_bit_exactly() {
    let cases = [
        (256, "chelsea"),
        (256, "coffee"),
        (256, "astronaut"),
        (256, "rocket"),
        (248, "chelsea"),
        (248, "rocket"),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|&(size, name)| {
            let img = load_rgb(&photo(name)).unwrap();
            let resized = resize_short(size).resize_short_side(&img);
            let expected = expected_image(&format!("resize{size}/{name}"));
            image_mismatch(&resized, &expected).map(|m| format!("{name}@{size}: {m}"))
        })
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn bicubic_upscale_matches_pillow_bit_exactly() {
    let chelsea = load_rgb(&photo("chelsea")).unwrap();
    let patch = crop(&chelsea, 200, 100, 45, 37);
    let resized = resize_short(64).resize_short_side(&patch);
    let expected = expected_image("upscale64/chelsea_patch");
    assert_eq!(image_mismatch(&resized, &expected), None);
}

#[test]
fn bicubic_non_uniform_aspect_matches_pillow_bit_exactly() {
    let chelsea = load_rgb(&photo("chelsea")).unwrap();
    let resized = resize_bicubic(&chelsea, 61, 443);
    let expected = expected_image("resize61x443/chelsea");
    assert_eq!(image_mismatch(&resized, &expected), None);
}

fn assert_close_to_torchvision(actual: &[f32]) {
    let (shape, expected) = expected_f32("eval224/chelsea");
    assert_eq!(shape, [3, 224, 224]);
    assert_eq!(actual.len(), expected.len());
    let worst = actual
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= TENSOR_TOLERANCE, "max abs error {worst}");
}

#[test]
fn eval_transform_matches_torchvision() {
    let t = EvalTransform::from_crop_pct(
        (224, 224),
        0.875,
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
    );
    assert_eq!(t.resize_short, 256);
    let tensor = t.apply(&load_rgb(&photo("chelsea")).unwrap()).unwrap();
    assert_eq!(tensor.dims(), &[3, 224, 224]);
    let data = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_close_to_torchvision(&data);
}

#[test]
fn load_batch_keeps_errors_per_item() {
    let t = EvalTransform::from_crop_pct(
        (224, 224),
        0.875,
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
    );
    let paths = [photo("chelsea"), fixture("empty.png"), photo("rocket")];
    let results = load_batch(&paths, &t);
    assert_eq!(results.len(), 3);
    assert_close_to_torchvision(results[0].as_ref().unwrap());
    let err = format!("{:#}", results[1].as_ref().unwrap_err());
    assert!(err.contains("empty.png"), "{err}");
    assert_eq!(results[2].as_ref().unwrap().len(), 3 * 224 * 224);
}

#[test]
fn bad_files_are_errors_naming_the_file() {
    for (name, detail) in [
        ("truncated.png", ""),
        ("empty.png", "empty"),
        ("not_an_image.jpg", "not a recognised image format"),
        ("bomb.png", "200000000 pixels"),
        ("missing.png", ""),
    ] {
        let err = match load_rgb(&fixture(name)) {
            Ok(img) => panic!("{name}: decoded {}x{}", img.width, img.height),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(name), "{name}: {err}");
        assert!(err.contains(detail), "{name}: {err}");
    }
}
