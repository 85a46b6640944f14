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
