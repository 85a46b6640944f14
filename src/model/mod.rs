//! The BEiT model: configuration, backbone, attention, relative position bias.

pub mod attention;
pub mod backbone;
pub mod clip;
pub mod config;
pub mod layers;
pub mod mim;
pub mod rel_pos;
pub mod vqkd;

pub use backbone::{Beit, Intermediate, mean_patch_tokens};
pub use config::{BeitConfig, GlobalPool, RelPosBias};
pub use rel_pos::RelPosInterp;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use std::sync::Mutex;

/// A VarBuilder backend that hands out zero-cost broadcast zeros and records
/// every (name, shape) the model asks for: the model constructor is the single
/// source of truth for the expected weights.
#[derive(Default)]
struct ShapeRecorder {
    seen: Mutex<Vec<(String, Vec<usize>)>>,
}

impl SimpleBackend for &ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push((name.to_string(), s.dims().to_vec()));
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape of '{name}' is unknown")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Every weight that `build` asks its VarBuilder for, with its shape, in order.
pub fn record_weights(
    build: impl FnOnce(VarBuilder) -> candle_core::Result<()>,
) -> anyhow::Result<Vec<(String, Vec<usize>)>> {
    let rec = ShapeRecorder::default();
    build(VarBuilder::from_backend(
        Box::new(&rec),
        DType::F32,
        Device::Cpu,
    ))?;
    Ok(rec.seen.into_inner().unwrap_or_default())
}

/// Every weight the model for `cfg` needs, with its shape, in construction order.
pub fn expected_weights(cfg: &BeitConfig) -> anyhow::Result<Vec<(String, Vec<usize>)>> {
    record_weights(|vb| Beit::new(cfg, vb).map(|_| ()))
}

/// Number of learnable parameters (index buffers are not parameters).
pub fn param_count(cfg: &BeitConfig) -> anyhow::Result<u64> {
    Ok(expected_weights(cfg)?
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum())
}
