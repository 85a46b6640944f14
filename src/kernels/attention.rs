//! Fused multi-head attention for inference: for each (image, head) the scores
//! `q·kᵀ·scale + bias` are computed straight from the packed qkv rows into a
//! scratch matrix that starts as the relative-position bias, soft-maxed in
//! place and multiplied by `v` into the head's columns of the output. q, k and
//! v are read through strides: no per-head copies, no (B, h, N, N) tensor.

use super::math::softmax_row;
use rayon::prelude::*;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionDims {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// `qkv`: (B·N, 3C) rows `[q | k | v]`, heads contiguous inside each part.
/// `bias`: (heads, N, N) added to the scaled scores, if any.
/// `out`: (B·N, C), head `h` written to columns `h·d..(h+1)·d`.
pub fn attention(
    qkv: &[f32],
    dims: AttentionDims,
    scale: f32,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let AttentionDims {
        batch,
        tokens: n,
        heads,
        head_dim: d,
    } = dims;
    let c = heads * d;
    assert_eq!(qkv.len(), batch * n * 3 * c, "qkv has the wrong size");
    assert_eq!(
        out.len(),
        batch * n * c,
        "attention output has the wrong size"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), heads * n * n, "attention bias has the wrong size");
    }
    let out_addr = out.as_mut_ptr() as usize;
    (0..batch * heads).into_par_iter().for_each_init(
        || vec![0f32; n * n],
        |scores, task| {
            let (img, h) = (task / heads, task % heads);
            let rows = &qkv[img * n * 3 * c..(img + 1) * n * 3 * c];
            let q = rows[h * d..].as_ptr();
            let k = rows[c + h * d..].as_ptr();
            let v = rows[2 * c + h * d..].as_ptr();
            if let Some(b) = bias {
                scores.copy_from_slice(&b[h * n * n..(h + 1) * n * n]);
            }
            let ld = (3 * c) as isize;
            // SAFETY: every pointer/stride pair stays inside `rows` or
            // `scores` for the m×n×k given; the output columns of distinct
            // tasks are disjoint, so concurrent writes never overlap.
            unsafe {
                gemm::gemm(
                    n,
                    n,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    n as isize,
                    bias.is_some(),
                    q,
                    1,
                    ld,
                    k,
                    ld,
                    1,
                    1.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for row in scores.chunks_exact_mut(n) {
                softmax_row(row);
            }
            let dst = (out_addr as *mut f32).wrapping_add(img * n * c + h * d);
            // SAFETY: as above; `dst` addresses rows img·N.. of `out`, columns h·d..(h+1)·d.
            unsafe {
                gemm::gemm(
                    n,
                    d,
                    n,
                    dst,
                    1,
                    c as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    n as isize,
                    v,
                    1,
                    ld,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
}
