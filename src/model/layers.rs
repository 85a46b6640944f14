//! Building blocks with PyTorch semantics (spec M). Without a gradient the
//! inference kernels of `crate::kernels` run; with one, the differentiable
//! custom ops of `kernels::autograd` (f32 on the CPU) or candle's composites,
//! so one model definition serves inference and training.

use crate::kernels::gemm::{PackedF32, WeightRef};
use crate::kernels::{self, Epilogue, PackedWeight, Precision, autograd, cpu_f32, profile};
use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;
use rand::Rng;
use std::sync::Arc;

/// `y = x·Wᵀ + b` over the last axis, computed as one 2-D GEMM over all leading
/// axes (no per-batch broadcast of the weight).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// The weight packed for the reduced-precision kernels, when chosen.
    packed: Option<Arc<PackedWeight>>,
    /// The weight in fp32 panels for small batches, when packed.
    packed_f32: Option<Arc<PackedF32>>,
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::from_parts(weight, bias))
    }

    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            packed: None,
            packed_f32: None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, self.bias.as_ref())
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Packs the weight for the inference kernels at `precision`: bf16/int8
    /// tiles, or fp32 panels for the small-batch kernel (AVX2 or AVX-512).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        let (n, k) = self.weight.dims2()?;
        self.packed = None;
        self.packed_f32 = None;
        match precision.quant() {
            Some(q) => {
                self.packed = Some(Arc::new(kernels::with_f32(&self.weight, |w| {
                    Ok(PackedWeight::pack(w, n, k, q))
                })?))
            }
            None if kernels::gemm::f32_panels_available() => {
                self.packed_f32 = Some(Arc::new(kernels::with_f32(&self.weight, |w| {
                    Ok(PackedF32::pack(w, n, k))
                })?))
            }
            None => {}
        }
        Ok(())
    }

    /// Whether bf16/int8 packed weights are in use.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// Inference kernel: `out ← epilogue(x·Wᵀ + b)` for `rows` rows of `x`.
    pub fn forward_into(
        &self,
        name: &'static str,
        x: &[f32],
        rows: usize,
        epilogue: Epilogue,
        out: &mut [f32],
    ) -> Result<()> {
        let (n, k) = self.weight.dims2()?;
        let _t = profile::scope(name, 2.0 * (rows * n * k) as f64);
        self.apply_into(x, rows, epilogue, out)
    }

    /// [`Self::forward_into`] without its profile scope, for callers timed
    /// under a scope of their own.
    pub fn apply_into(
        &self,
        x: &[f32],
        rows: usize,
        epilogue: Epilogue,
        out: &mut [f32],
    ) -> Result<()> {
        let (n, k) = self.weight.dims2()?;
        let (ws, wl) = self.weight.storage_and_layout();
        let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias_guard {
            Some((s, l)) => Some(cpu_f32(s, l)?),
            None => None,
        };
        let w = match &self.packed {
            Some(p) => WeightRef::Packed(p),
            None => WeightRef::F32 {
                data: cpu_f32(&ws, wl)?,
                out_dim: n,
                in_dim: k,
                panels: self.packed_f32.as_deref(),
            },
        };
        kernels::gemm::linear(x, rows, w, bias, epilogue, out);
        Ok(())
    }
}

/// `x·Wᵀ + b` with `W` of shape (out, in), for any number of leading axes.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if let Some(b) = bias
        && tracked(&[x, weight, b])
        && let Some(y) = autograd::linear_op(x, weight, b)?
    {
        return Ok(y);
    }
    let dims = x.dims();
    let (lead, in_dim) = dims.split_at(dims.len() - 1);
    let rows: usize = lead.iter().product();
    let x2 = x.reshape((rows, in_dim[0]))?;
    let y = match bias {
        Some(b) => x2.matmul(&weight.t()?)?.broadcast_add(b)?,
        None => x2.matmul(&weight.t()?)?,
    };
    let mut out_shape = lead.to_vec();
    out_shape.push(weight.dim(0)?);
    y.reshape(out_shape)
}

fn tracked(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// LayerNorm over the last axis (biased variance, `eps` inside the root).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    /// Inference kernel over rows of the normalised width.
    pub fn forward_into(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let _t = profile::scope("layernorm", 0.0);
        let (ws, wl) = self.weight.storage_and_layout();
        let (bs, bl) = self.bias.storage_and_layout();
        kernels::math::layer_norm(
            x,
            cpu_f32(&ws, wl)?,
            cpu_f32(&bs, bl)?,
            self.eps as f32,
            out,
        );
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _t = profile::scope("layernorm", 0.0);
        if !tracked(&[x, &self.weight, &self.bias]) {
            let x = x.contiguous()?;
            return candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps as f32);
        }
        if let Some(y) = autograd::layer_norm_op(x, &self.weight, &self.bias, self.eps)? {
            return Ok(y);
        }
        let dim = x.dim(D::Minus1)? as f64;
        let mean = (x.sum_keepdim(D::Minus1)? / dim)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / dim)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// Softmax over the last axis.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if tracked(&[x]) {
        if let Some(y) = autograd::softmax_op(x)? {
            return Ok(y);
        }
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

/// fc1 → exact (erf) GELU → fc2.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(dim, hidden, true, vb.pp("fc1"))?,
            fc2: Linear::new(hidden, dim, true, vb.pp("fc2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = {
            let _t = profile::scope("linear.fc1", 0.0);
            self.fc1.forward(x)?
        };
        let h = {
            let _t = profile::scope("gelu", 0.0);
            let fused = match h.track_op() {
                true => autograd::gelu_op(&h)?,
                false => None,
            };
            match fused {
                Some(y) => y,
                None => h.gelu_erf()?,
            }
        };
        let _t = profile::scope("linear.fc2", 0.0);
        self.fc2.forward(&h)
    }
}

/// Stochastic depth (timm `drop_path`): each sample's branch is kept with
/// probability `1 − rate` and then scaled by `1 / (1 − rate)`. These are
/// the per-sample factors for a batch of `b` (0 or `1 / (1 − rate)`), or
/// None when `rate` is 0 (no random draw then).
pub fn drop_path_factors(b: usize, rate: f64, rng: &mut impl Rng) -> Option<Vec<f32>> {
    if rate <= 0.0 {
        return None;
    }
    let keep = 1.0 - rate;
    Some(
        (0..b)
            .map(|_| {
                if rng.random::<f64>() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect(),
    )
}
