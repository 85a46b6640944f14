//! `y = epilogue(x·Wᵀ + b)` over rows. Packed weights go to this crate's
//! kernels in [`super::packed`], which apply the epilogue per output block;
//! weights as loaded go to the `gemm` crate (AVX-512 kernels through its
//! `x86-v4` feature) with the bias written first and the epilogue as a pass.

use super::math::{add_scaled_residual, gelu_inplace};
use super::packed::{Epilogue, PackedWeight};
use super::scratch;
use super::sgemm::PackedF32;
use rayon::prelude::*;

/// The weight of a linear layer, `(out, in)` as PyTorch stores it.
#[derive(Debug, Clone, Copy)]
pub enum WeightRef<'a> {
    F32 {
        data: &'a [f32],
        out_dim: usize,
        in_dim: usize,
    },
    Packed(&'a PackedWeight),
    PackedF32(&'a PackedF32),
}

impl WeightRef<'_> {
    pub fn dims(&self) -> (usize, usize) {
        match self {
            WeightRef::F32 {
                out_dim, in_dim, ..
            } => (*out_dim, *in_dim),
            WeightRef::Packed(p) => (p.out_dim(), p.in_dim()),
            WeightRef::PackedF32(p) => (p.out_dim(), p.in_dim()),
        }
    }
}

/// Fills each `width`-wide row of `out` with `bias`, in parallel.
fn fill_rows(out: &mut [f32], bias: &[f32]) {
    let width = bias.len();
    out.par_chunks_mut(width * 64).for_each(|chunk| {
        chunk
            .chunks_exact_mut(width)
            .for_each(|r| r.copy_from_slice(bias))
    });
}

/// Checks the operand sizes of `out ← epilogue(x·Wᵀ + b)` for a weight of
/// `(out_dim, in_dim)`: every kernel asserts the same contract.
pub(super) fn check_sizes(
    x: &[f32],
    rows: usize,
    (out_dim, in_dim): (usize, usize),
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    out: &[f32],
) {
    assert_eq!(x.len(), rows * in_dim, "linear input has the wrong size");
    assert_eq!(
        out.len(),
        rows * out_dim,
        "linear output has the wrong size"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), out_dim, "linear bias has the wrong size");
    }
    if let Epilogue::Residual { gamma: Some(g) } = epilogue {
        assert_eq!(g.len(), out_dim, "layer scale has the wrong size");
    }
}

/// `out ← epilogue(x·Wᵀ + b)`; `x` is (rows, in), `out` (rows, out).
pub fn linear(
    x: &[f32],
    rows: usize,
    w: WeightRef,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    out: &mut [f32],
) {
    let (n, k) = w.dims();
    let data = match w {
        WeightRef::Packed(p) => return p.matmul(x, rows, bias, epilogue, out),
        WeightRef::PackedF32(p) => return p.matmul(x, rows, bias, epilogue, out),
        WeightRef::F32 { data, .. } => data,
    };
    check_sizes(x, rows, (n, k), bias, epilogue, out);
    assert_eq!(data.len(), n * k, "linear weight has the wrong size");
    // The residual epilogue needs the product apart from the stream in `out`.
    let mut temp =
        matches!(epilogue, Epilogue::Residual { .. }).then(|| scratch::take::<f32>(rows * n));
    let dst: &mut [f32] = match &mut temp {
        Some(t) => t,
        None => &mut *out,
    };
    if let Some(b) = bias {
        fill_rows(dst, b);
    }
    // SAFETY: lhs is rows×k row-major, rhs reads W (n×k row-major) as its
    // transpose, dst is rows×n row-major: all inside the slices.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            bias.is_some(),
            x.as_ptr(),
            1,
            k as isize,
            data.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
    match (epilogue, temp) {
        (Epilogue::Residual { gamma }, Some(product)) => {
            add_scaled_residual(out, &product, gamma, n)
        }
        (Epilogue::Gelu, _) => gelu_inplace(out),
        _ => {}
    }
}
