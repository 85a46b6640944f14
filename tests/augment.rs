//! Training augmentations: invariants of the random parts, and the
//! deterministic parts checked against timm / Pillow / torchvision output
//! recorded by `tools/make_augment_fixtures.py` in
//! `tests/fixtures/augment/expected.safetensors`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use beitv2::data::augment::{
    CropBox, Mixup, Op, RAND_INCREASING_OPS, RandAugment, RandomErasing, RandomResizedCrop,
    Resample, TrainTransform, hflip, smooth_one_hot, timm_img_mean,
};
use beitv2::data::{
    IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, RgbImage, load_rgb,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;
mod common;
use common::rgb_image;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        std::fs::read(root().join("tests/fixtures/augment/expected.safetensors")).unwrap()
    })
}

fn fixtures() -> SafeTensors<'static> {
    SafeTensors::deserialize(fixture_bytes()).unwrap()
}

/// The fixture generator's parameters (`info` in the file's metadata).
fn info(key: &str) -> serde_json::Value {
    let (_, meta) = SafeTensors::read_metadata(fixture_bytes()).unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["info"]).unwrap();
    info[key].clone()
}

fn max_abs_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    let diffs = a.data.iter().zip(&b.data).map(|(x, y)| x.abs_diff(*y));
    diffs.max().unwrap_or(0)
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn beit_rand_augment(fill: [u8; 3], translate_const: usize) -> RandAugment {
    RandAugment::from_timm_str("rand-m9-mstd0.5-inc1", fill, translate_const).unwrap()
}

// ---------------------------------------------------------------------------
// Against timm / Pillow / torchvision

#[test]
fn every_op_matches_timm_bit_for_bit() {
    let st = fixtures();
    let fill: [u8; 3] = serde_json::from_value(info("fill")).unwrap();
    let translate_const: usize = serde_json::from_value(info("translate_const")).unwrap();
    let mut worst: BTreeMap<String, (u8, usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    for key in st.names() {
        let Some(case) = key.strip_prefix("op/") else {
            continue;
        };
        let [input, name, magnitude, sign, resample] = case.split('/').collect::<Vec<_>>()[..]
        else {
            panic!("bad fixture key {key}");
        };
        let op = Op::from_name(name).unwrap_or_else(|| panic!("unknown op {name}"));
        let mut ra = beit_rand_augment(fill, translate_const);
        ra.interpolation = match resample {
            "bicubic" => Resample::Bicubic,
            "bilinear" => Resample::Bilinear,
            other => panic!("unknown resample {other}"),
        };
        let img = rgb_image(&st, &format!("input/{input}"));
        let expected = rgb_image(&st, key);
        let out = ra.apply_op_signed(op, magnitude.parse().unwrap(), sign == "-", &img);
        let diff = max_abs_diff(&out, &expected);
        let label = match resample {
            "bicubic" => name.to_string(),
            _ => format!("{name} ({resample})"),
        };
        let entry = worst.entry(label).or_default();
        *entry = (entry.0.max(diff), entry.1 + 1);
        if diff != 0 {
            let differing = out.data.iter().zip(&expected.data).filter(|(a, b)| a != b);
            failures.push(format!(
                "{key}: {} bytes differ, max {diff}",
                differing.count()
            ));
        }
    }
    for (op, (diff, cases)) in &worst {
        println!("{op:32} {cases:2} cases, max |diff| {diff}");
    }
    // All 23 ops, bilinear variants included, are covered.
    assert_eq!(worst.len(), 23 + 2, "{:?}", worst.keys());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn resized_crop_of_a_box_matches_torchvision() {
    let st = fixtures();
    let chelsea = load_rgb(&root().join("assets/photos/chelsea.png")).unwrap();
    let mut checked = 0;
    for key in st.names() {
        let Some(case) = key.strip_prefix("rrc/") else {
            continue;
        };
        let (coords, size) = case.split_once('/').unwrap();
        let b: Vec<usize> = coords.split('_').map(|v| v.parse().unwrap()).collect();
        let (h, w) = size.split_once('x').unwrap();
        let rrc = RandomResizedCrop::new((h.parse().unwrap(), w.parse().unwrap()));
        let crop = CropBox {
            top: b[0],
            left: b[1],
            height: b[2],
            width: b[3],
        };
        let out = rrc.resize_box(&chelsea, crop);
        assert_eq!(out, rgb_image(&st, key), "{key}");
        checked += 1;
    }
    assert_eq!(checked, 3);
}

#[test]
fn fill_colour_matches_timm() {
    let default: [u8; 3] = serde_json::from_value(info("img_mean_default")).unwrap();
    let inception: [u8; 3] = serde_json::from_value(info("img_mean_inception")).unwrap();
    assert_eq!(timm_img_mean(IMAGENET_DEFAULT_MEAN), default);
    assert_eq!(timm_img_mean(IMAGENET_INCEPTION_MEAN), inception);
}

// ---------------------------------------------------------------------------
// Random resized crop and flip

/// The box `sample_box` falls back to after ten failed draws.
fn fallback_box(rrc: &RandomResizedCrop, width: usize, height: usize) -> CropBox {
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < rrc.ratio.0 {
        (width, (width as f64 / rrc.ratio.0).round() as usize)
    } else if in_ratio > rrc.ratio.1 {
        ((height as f64 * rrc.ratio.1).round() as usize, height)
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

#[test]
fn crop_boxes_stay_in_bounds_and_in_range() {
    let rrc = RandomResizedCrop::new((224, 224));
    let mut rng = rng(1);
    for (width, height) in [
        (451, 300),
        (224, 224),
        (1, 1),
        (3, 2),
        (1000, 7),
        (9, 2000),
        (64, 48),
    ] {
        let mut fallbacks = 0;
        for _ in 0..2000 {
            let b = rrc.sample_box(width, height, &mut rng);
            assert!(b.width > 0 && b.height > 0, "{b:?}");
            assert!(
                b.left + b.width <= width && b.top + b.height <= height,
                "{b:?}"
            );
            if b == fallback_box(&rrc, width, height) {
                fallbacks += 1;
                continue;
            }
            // Sides are the rounded square roots of area·aspect and
            // area/aspect: allow half a pixel on each.
            let (w, h) = (b.width as f64, b.height as f64);
            let area = (width * height) as f64;
            let lo = (w - 0.5).max(0.0) * (h - 0.5).max(0.0) / area;
            let hi = (w + 0.5) * (h + 0.5) / area;
            assert!(
                lo <= rrc.scale.1 && hi >= rrc.scale.0,
                "{width}x{height}: {b:?}"
            );
            let (min_aspect, max_aspect) = ((w - 0.5) / (h + 0.5), (w + 0.5) / (h - 0.5).max(0.0));
            assert!(
                min_aspect <= rrc.ratio.1 && max_aspect >= rrc.ratio.0,
                "{width}x{height}: {b:?}"
            );
        }
        if width >= 64 && height >= 48 {
            assert!(fallbacks < 20, "{width}x{height}: {fallbacks} fallbacks");
        }
    }
}

#[test]
fn crop_is_resized_to_the_requested_size() {
    let img = RgbImage::from_fn(97, 61, |x, y, c| (x * 5 + y * 3 + c * 40) as u8);
    let rrc = RandomResizedCrop::new((32, 40));
    let out = rrc.apply(&img, &mut rng(2));
    assert_eq!((out.height, out.width), (32, 40));
}

#[test]
fn flip_mirrors_and_twice_is_identity() {
    let img = RgbImage::from_fn(5, 3, |x, y, c| (x * 50 + y * 7 + c) as u8);
    let flipped = hflip(&img);
    for y in 0..3 {
        for x in 0..5 {
            let (a, b) = ((y * 5 + x) * 3, (y * 5 + 4 - x) * 3);
            assert_eq!(flipped.data[a..a + 3], img.data[b..b + 3]);
        }
    }
    assert_eq!(hflip(&flipped), img);
}

// ---------------------------------------------------------------------------
// RandAugment

#[test]
fn noisy_magnitudes_are_clipped_to_the_level_range() {
    let ra = beit_rand_augment([124, 116, 104], 100);
    let mut rng = rng(3);
    let draws: Vec<f64> = (0..20_000).map(|_| ra.sample_magnitude(&mut rng)).collect();
    assert!(draws.iter().all(|m| (0.0..=10.0).contains(m)));
    // N(9, 0.5) clipped at 10: about 2.3 % at the bound, mean just below 9.
    let clipped = draws.iter().filter(|&&m| m == 10.0).count() as f64 / draws.len() as f64;
    assert!((0.015..0.031).contains(&clipped), "{clipped}");
    let mean = draws.iter().sum::<f64>() / draws.len() as f64;
    assert!((8.97..9.01).contains(&mean), "{mean}");

    let mut uniform = ra.clone();
    uniform.magnitude_std = f64::INFINITY;
    assert!((0..1000).all(|_| (0.0..=9.0).contains(&uniform.sample_magnitude(&mut rng))));
}

#[test]
fn signed_ops_take_either_sign() {
    let img = RgbImage::from_fn(24, 16, |x, y, c| (x * 10 + y * 5 + c * 60) as u8);
    let ra = beit_rand_augment([124, 116, 104], 10);
    let plus = ra.apply_op_signed(Op::Rotate, 9.0, false, &img);
    let minus = ra.apply_op_signed(Op::Rotate, 9.0, true, &img);
    assert_ne!(plus, minus);
    let mut rng = rng(4);
    let mut negated = 0;
    for _ in 0..400 {
        let out = ra.apply_op(Op::Rotate, 9.0, &img, &mut rng);
        if out == minus {
            negated += 1;
        } else {
            assert_eq!(out, plus);
        }
    }
    assert!((150..250).contains(&negated), "{negated}");
    // Unsigned ops ignore the sign.
    assert_eq!(
        ra.apply_op_signed(Op::SolarizeAdd, 9.0, true, &img),
        ra.apply_op_signed(Op::SolarizeAdd, 9.0, false, &img)
    );
}

#[test]
fn rand_augment_is_deterministic_and_can_be_disabled() {
    let img = RgbImage::from_fn(40, 30, |x, y, c| ((x * 7) ^ (y * 13) ^ (c * 50)) as u8);
    let ra = beit_rand_augment([124, 116, 104], 18);
    assert_eq!(ra.ops, RAND_INCREASING_OPS);
    let a = ra.apply(&img, &mut rng(5));
    assert_eq!(a, ra.apply(&img, &mut rng(5)));
    let changed = (0..20)
        .filter(|&s| ra.apply(&img, &mut rng(s)) != img)
        .count();
    assert!(changed > 5, "{changed}");

    let mut never = ra.clone();
    never.prob = 0.0;
    assert!((0..20).all(|s| never.apply(&img, &mut rng(s)) == img));
    let mut none = ra;
    none.num_layers = 0;
    assert_eq!(none.apply(&img, &mut rng(6)), img);
}

// ---------------------------------------------------------------------------
// Random erasing

#[test]
fn erasing_covers_a_rectangle_of_the_right_size_a_quarter_of_the_time() {
    let erasing = RandomErasing::default();
    let (c, h, w) = (3, 80, 96);
    let mut rng = rng(7);
    let draws = 4000;
    let mut erased = 0;
    for _ in 0..draws {
        let mut x = vec![100.0f32; c * h * w];
        erasing.apply(&mut x, c, h, w, &mut rng);
        let changed: Vec<usize> = (0..h * w).filter(|&i| x[i] != 100.0).collect();
        if changed.is_empty() {
            assert!(x.iter().all(|&v| v == 100.0));
            continue;
        }
        erased += 1;
        // One rectangle, the same in every channel, filled with N(0, 1).
        let (ys, xs): (Vec<usize>, Vec<usize>) = changed.iter().map(|i| (i / w, i % w)).unzip();
        let (y0, y1) = (*ys.iter().min().unwrap(), *ys.iter().max().unwrap());
        let (x0, x1) = (*xs.iter().min().unwrap(), *xs.iter().max().unwrap());
        let area = (y1 - y0 + 1) * (x1 - x0 + 1);
        assert_eq!(changed.len(), area);
        for plane in x.chunks_exact(h * w) {
            for y in 0..h {
                for xx in 0..w {
                    let inside = (y0..=y1).contains(&y) && (x0..=x1).contains(&xx);
                    let v = plane[y * w + xx];
                    assert_eq!(v != 100.0, inside);
                    assert!(v == 100.0 || v.abs() < 7.0);
                }
            }
        }
        // Rounded sides move the area a little off U(0.02, 1/3).
        let fraction = area as f64 / (h * w) as f64;
        assert!(
            (0.02 * 0.95..=1.0 / 3.0 * 1.05).contains(&fraction),
            "{fraction}"
        );
        let aspect = (y1 - y0 + 1) as f64 / (x1 - x0 + 1) as f64;
        assert!((0.3 * 0.9..=1.0 / 0.3 * 1.1).contains(&aspect), "{aspect}");
    }
    let rate = erased as f64 / draws as f64;
    assert!((0.225..0.275).contains(&rate), "{rate}");
}

#[test]
fn erased_values_look_standard_normal() {
    let erasing = RandomErasing {
        probability: 1.0,
        ..RandomErasing::default()
    };
    let mut rng = rng(8);
    let mut values = Vec::new();
    while values.len() < 50_000 {
        let mut x = vec![f32::NAN; 3 * 64 * 64];
        erasing.apply(&mut x, 3, 64, 64, &mut rng);
        values.extend(x.into_iter().filter(|v| !v.is_nan()).map(f64::from));
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    assert!(
        mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
        "{mean} {var}"
    );
}

// ---------------------------------------------------------------------------
// Mixup / CutMix

fn constant_batch(batch: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    (0..batch).flat_map(|i| vec![i as f32; c * h * w]).collect()
}

#[test]
fn soft_targets_are_distributions() {
    let mixup = Mixup::beit_finetune(10);
    let (b, c, h, w) = (6, 3, 8, 8);
    let labels = [0, 3, 3, 9, 1, 5];
    for seed in 0..200 {
        let mut x = constant_batch(b, c, h, w);
        let t = mixup
            .apply(&mut x, (b, c, h, w), &labels, &mut rng(seed))
            .unwrap();
        assert_eq!(t.len(), b * 10);
        for row in t.chunks_exact(10) {
            assert!(row.iter().all(|&v| v >= 0.0));
            let sum: f64 = row.iter().map(|&v| f64::from(v)).sum();
            assert!((sum - 1.0).abs() <= 1e-6, "{sum}");
        }
    }
}

#[test]
fn cutmix_lambda_is_the_unpasted_area() {
    let mixup = Mixup {
        mixup_alpha: 0.0,
        label_smoothing: 0.0,
        ..Mixup::beit_finetune(4)
    };
    let (b, c, h, w) = (4, 2, 13, 17);
    let labels = [0, 1, 2, 3];
    let mut pasted_somewhere = false;
    for seed in 0..300 {
        let mut x = constant_batch(b, c, h, w);
        let t = mixup
            .apply(&mut x, (b, c, h, w), &labels, &mut rng(seed))
            .unwrap();
        for i in 0..b {
            let partner = b - 1 - i;
            let img = &x[i * c * h * w..][..c * h * w];
            // Every pixel comes from the image or its partner.
            assert!(img.iter().all(|&v| v == i as f32 || v == partner as f32));
            let pasted = img.iter().filter(|&&v| v == partner as f32).count();
            pasted_somewhere |= pasted > 0;
            let lam = 1.0 - pasted as f64 / (c * h * w) as f64;
            let row = &t[i * 4..][..4];
            assert!(
                (f64::from(row[labels[i]]) - lam).abs() < 1e-6,
                "{row:?} vs {lam}"
            );
            assert!((f64::from(row[labels[partner]]) - (1.0 - lam)).abs() < 1e-6);
        }
    }
    assert!(pasted_somewhere);
}

#[test]
fn mixup_blends_with_the_reversed_batch() {
    let mixup = Mixup {
        cutmix_alpha: 0.0,
        label_smoothing: 0.0,
        ..Mixup::beit_finetune(2)
    };
    let (b, c, h, w) = (2, 1, 2, 3);
    let mut x = constant_batch(b, c, h, w);
    let t = mixup
        .apply(&mut x, (b, c, h, w), &[0, 1], &mut rng(9))
        .unwrap();
    // Image 0 is 0 and image 1 is 1: image 0 becomes 1 - λ, image 1 λ.
    let lam = t[0];
    assert!(x[..6].iter().all(|&v| (v - (1.0 - lam)).abs() < 1e-6));
    assert!(x[6..].iter().all(|&v| (v - lam).abs() < 1e-6));
    assert!((t[2] - (1.0 - lam)).abs() < 1e-6 && (t[3] - lam).abs() < 1e-6);
}

#[test]
fn mixup_can_be_skipped_and_rejects_bad_batches() {
    let off = Mixup {
        prob: 0.0,
        ..Mixup::beit_finetune(3)
    };
    let mut x = constant_batch(2, 1, 2, 2);
    let t = off
        .apply(&mut x, (2, 1, 2, 2), &[2, 0], &mut rng(10))
        .unwrap();
    assert_eq!(x, constant_batch(2, 1, 2, 2));
    assert_eq!(t, smooth_one_hot(&[2, 0], 3, 0.1));

    let mixup = Mixup::beit_finetune(3);
    let mut odd = constant_batch(3, 1, 2, 2);
    assert!(
        mixup
            .apply(&mut odd, (3, 1, 2, 2), &[0, 1, 2], &mut rng(0))
            .is_err()
    );
    assert!(
        mixup
            .apply(&mut x, (2, 1, 2, 2), &[0, 3], &mut rng(0))
            .is_err()
    );
    assert!(
        mixup
            .apply(&mut x, (2, 1, 2, 3), &[0, 1], &mut rng(0))
            .is_err()
    );
    assert!(
        mixup
            .apply(&mut x, (2, 1, 2, 2), &[0], &mut rng(0))
            .is_err()
    );
}

#[test]
fn mixup_is_deterministic() {
    let mixup = Mixup::beit_finetune(5);
    let run = |seed| {
        let mut x: Vec<f32> = (0..4 * 3 * 6 * 6).map(|i| (i % 97) as f32).collect();
        let t = mixup
            .apply(&mut x, (4, 3, 6, 6), &[4, 0, 1, 2], &mut rng(seed))
            .unwrap();
        (x, t)
    };
    assert_eq!(run(11), run(11));
    assert_ne!(run(11), run(12));
}

#[test]
fn smoothed_one_hot_values() {
    let t = smooth_one_hot(&[1, 0], 4, 0.1);
    let (off, on) = (0.025f32, 0.925f32);
    assert_eq!(t, [off, on, off, off, on, off, off, off]);
    let row_sum: f64 = smooth_one_hot(&[7], 1000, 0.1)
        .iter()
        .map(|&v| f64::from(v))
        .sum();
    assert!((row_sum - 1.0).abs() < 1e-6, "{row_sum}");
}

// ---------------------------------------------------------------------------
// The whole per-image pipeline

#[test]
fn beit_transform_is_spec_l1() {
    let t = TrainTransform::beit_finetune(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD);
    assert_eq!(t.rrc, RandomResizedCrop::new((224, 224)));
    assert_eq!((t.rrc.scale, t.rrc.ratio), ((0.08, 1.0), (0.75, 4.0 / 3.0)));
    assert_eq!(t.hflip_prob, 0.5);
    let ra = t.rand_augment.as_ref().unwrap();
    assert_eq!(ra.fill, [124, 116, 104]);
    assert_eq!(ra.translate_const, 100);
    assert_eq!(
        (ra.magnitude, ra.magnitude_std, ra.num_layers, ra.prob),
        (9.0, 0.5, 2, 0.5)
    );
    assert_eq!(ra.interpolation, Resample::Bicubic);
    assert_eq!(t.erasing, Some(RandomErasing::default()));
    let e = RandomErasing::default();
    assert_eq!(
        (
            e.probability,
            e.min_area,
            e.max_area,
            e.min_aspect,
            e.max_count
        ),
        (0.25, 0.02, 1.0 / 3.0, 0.3, 1)
    );

    let simple = TrainTransform::simple(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD);
    assert!(simple.rand_augment.is_none() && simple.erasing.is_none());
}

#[test]
fn train_transform_is_deterministic_per_seed() {
    let chelsea = load_rgb(&root().join("assets/photos/chelsea.png")).unwrap();
    let t = TrainTransform::beit_finetune(64, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD);
    let a = t.apply(&chelsea, &mut rng(13)).unwrap();
    assert_eq!(a.len(), 3 * 64 * 64);
    assert_eq!(a, t.apply(&chelsea, &mut rng(13)).unwrap());
    assert_ne!(a, t.apply(&chelsea, &mut rng(14)).unwrap());
    // Normalised pixels lie in [(0 - mean) / std, (1 - mean) / std]; erased
    // ones are normal noise.
    assert!(a.iter().all(|v| v.is_finite() && v.abs() < 10.0));

    let simple = TrainTransform::simple(48, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD);
    let s = simple.apply(&chelsea, &mut rng(15)).unwrap();
    assert_eq!(s.len(), 3 * 48 * 48);
    for (c, plane) in s.chunks_exact(48 * 48).enumerate() {
        let (lo, hi) = (
            -IMAGENET_DEFAULT_MEAN[c] / IMAGENET_DEFAULT_STD[c],
            (1.0 - IMAGENET_DEFAULT_MEAN[c]) / IMAGENET_DEFAULT_STD[c],
        );
        assert!(plane.iter().all(|&v| v >= lo - 1e-5 && v <= hi + 1e-5));
    }
}

#[test]
fn train_transform_without_randomness_is_resize_and_normalise() {
    let img = RgbImage::from_fn(30, 20, |x, y, c| (x * 8 + y * 3 + c * 20) as u8);
    let mut t = TrainTransform::simple(16, [0.5; 3], [0.25; 3]);
    t.hflip_prob = 0.0;
    t.rrc.scale = (1.0, 1.0);
    t.rrc.ratio = (1.5, 1.5);
    let out = t.apply(&img, &mut rng(16)).unwrap();
    let resized = t.rrc.resize_box(
        &img,
        CropBox {
            top: 0,
            left: 0,
            height: 20,
            width: 30,
        },
    );
    for c in 0..3 {
        for (i, px) in resized.data.chunks_exact(3).enumerate() {
            assert_eq!(out[c * 256 + i], (f32::from(px[c]) / 255.0 - 0.5) / 0.25);
        }
    }
    let empty = RgbImage {
        width: 0,
        height: 0,
        data: Vec::new(),
    };
    assert!(t.apply(&empty, &mut rng(0)).is_err());
}

#[test]
fn generators_are_used_not_global_state() {
    // Same seed through a `dyn RngCore` gives the same result as the
    // concrete type: nothing outside the generator is consulted.
    let img = RgbImage::from_fn(50, 40, |x, y, c| (x * 3 + y * 5 + c * 70) as u8);
    let t = TrainTransform::beit_finetune(32, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD);
    let mut boxed: Box<dyn rand::RngCore> = Box::new(rng(17));
    let a = t.apply(&img, &mut *boxed).unwrap();
    assert_eq!(a, t.apply(&img, &mut rng(17)).unwrap());
    let _: f64 = boxed.random();
}
