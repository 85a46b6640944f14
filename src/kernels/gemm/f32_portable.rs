//! fp32 linear layers on the weights as loaded, through the `gemm` crate
//! (which picks its own ISA level: AVX-512 kernels through its `x86-v4`
//! feature, AVX2, or portable code), with the bias written first and the
//! epilogue as a pass over the output.

use super::{Epilogue, check_sizes};
use crate::kernels::math::{add_scaled_residual, gelu_inplace};
use crate::kernels::scratch;
use rayon::prelude::*;

/// Fills each `width`-wide row of `out` with `bias`, in parallel.
fn fill_rows(out: &mut [f32], bias: &[f32]) {
    let width = bias.len();
    out.par_chunks_mut(width * 64).for_each(|chunk| {
        chunk
            .chunks_exact_mut(width)
            .for_each(|r| r.copy_from_slice(bias))
    });
}

/// `out ← epilogue(x·Wᵀ + b)` for a row-major `(n, k)` weight `w`.
pub(super) fn matmul(
    x: &[f32],
    rows: usize,
    w: &[f32],
    (n, k): (usize, usize),
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    out: &mut [f32],
) {
    check_sizes(x, rows, (n, k), bias, epilogue, out);
    assert_eq!(w.len(), n * k, "linear weight has the wrong size");
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
            w.as_ptr(),
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
