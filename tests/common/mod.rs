//! Helpers shared by the integration tests.

// Each test binary compiles this module and uses only some of it.
#![allow(dead_code)]

use beitv2::data::RgbImage;
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

/// All tensors of a fixture safetensors file.
pub fn load_st(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// max |a − b| over all elements; the shapes must agree.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The values of an integer tensor (token ids) as i64, flattened.
pub fn int_values(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
}

/// A uint8 HWC image stored under `key` in a fixture file.
pub fn rgb_image(st: &SafeTensors<'_>, key: &str) -> RgbImage {
    let view = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(view.dtype(), Dtype::U8, "{key}");
    let &[height, width, 3] = view.shape() else {
        panic!("{key}: shape {:?}", view.shape());
    };
    RgbImage {
        width,
        height,
        data: view.data().to_vec(),
    }
}

/// A scalar tensor of any float dtype as f64.
pub fn scalar_f64(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

/// max |a − b| / max(|b|, 1e-6) over all elements (f32 tensors).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6) as f64;
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() as f64 / scale)
        .fold(0.0, f64::max)
}

/// An image folder with two classes of `n` synthetic `w`×`h` PNGs each.
pub fn write_class_folders(root: &Path, n: u32, (w, h): (u32, u32)) {
    for (c, class) in ["circle", "square"].iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..n {
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                let v = ((x * 7 + y * 13 + i * 31 + c as u32 * 90) % 255) as u8;
                image::Rgb([v, 255 - v, (v / 2) + c as u8 * 100])
            });
            img.save(dir.join(format!("{i}.png"))).unwrap();
        }
    }
}

/// The records of a run's `metrics.jsonl`, without the wall-clock field.
pub fn metrics_without_time(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("elapsed_s");
            v
        })
        .collect()
}
