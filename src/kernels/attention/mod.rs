//! Fused multi-head attention: for each (image, head) the scores
//! `q·kᵀ·scale` are computed straight from the packed qkv rows into a
//! scratch matrix, soft-maxed in place with the relative-position bias added
//! in the softmax's first pass, and multiplied by `v` into the head's columns
//! of the output. q, k and
//! v are read through strides: no per-head copies, no (B, h, N, N) tensor.
//! The backward pass (for training) recomputes the probabilities per head.
//! The reduced precisions run the products as bf16 blocks on AMX or
//! AVX512-BF16 ([`bf16`]).

#[cfg(target_arch = "x86_64")]
pub mod bf16;

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

impl AttentionDims {
    /// Checks the qkv, per-token (B·N, C) and bias sizes against the shapes.
    fn check(&self, qkv: &[f32], per_token: &[f32], bias: Option<&[f32]>) {
        let (n, c) = (self.tokens, self.heads * self.head_dim);
        assert_eq!(qkv.len(), self.batch * n * 3 * c, "qkv has the wrong size");
        assert_eq!(
            per_token.len(),
            self.batch * n * c,
            "attention output/gradient has the wrong size"
        );
        if let Some(b) = bias {
            assert_eq!(
                b.len(),
                self.heads * n * n,
                "attention bias has the wrong size"
            );
        }
    }
}

/// `qkv`: (B·N, 3C) rows `[q | k | v]`, heads contiguous inside each part.
/// `bias`: (heads, N, N) added to the scaled scores, if any.
/// `out`: (B·N, C), head `h` written to columns `h·d..(h+1)·d`.
/// `bf16`: the two products may round their operands to bf16 (the reduced
/// precisions' layers); they do where AMX or a fast `vdpbf16ps` runs them
/// ([`bf16`]).
pub fn attention(
    qkv: &[f32],
    dims: AttentionDims,
    scale: f32,
    bias: Option<&[f32]>,
    bf16: bool,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if bf16
        && dims.head_dim.is_multiple_of(2)
        && let Some(products) = bf16::Products::fast_here()
    {
        return bf16::attention(products, qkv, dims, scale, bias, out);
    }
    let _ = bf16;
    let AttentionDims {
        batch,
        tokens: n,
        heads,
        head_dim: d,
    } = dims;
    let c = heads * d;
    dims.check(qkv, out, bias);
    let out_addr = out.as_mut_ptr() as usize;
    (0..batch * heads).into_par_iter().for_each_init(
        || vec![0f32; n * n],
        |scores, task| {
            let (img, h) = (task / heads, task % heads);
            let rows = &qkv[img * n * 3 * c..(img + 1) * n * 3 * c];
            probabilities(rows, h, dims, scale, bias, scores);
            let v = rows[2 * c + h * d..].as_ptr();
            let ld = (3 * c) as isize;
            let dst = (out_addr as *mut f32).wrapping_add(img * n * c + h * d);
            // SAFETY: `scores` is N×N, v addresses N rows of `rows` (stride
            // 3C), `dst` rows img·N.. of `out` (stride C), columns h·d..(h+1)·d;
            // tasks write disjoint columns, so concurrent writes never overlap.
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

/// The soft-maxed scores `softmax(q·kᵀ·scale + bias)` (N×N) of head `h`
/// of one image, whose qkv rows are `rows` (N × 3C).
fn probabilities(
    rows: &[f32],
    h: usize,
    dims: AttentionDims,
    scale: f32,
    bias: Option<&[f32]>,
    scores: &mut [f32],
) {
    let (n, d) = (dims.tokens, dims.head_dim);
    let c = dims.heads * d;
    let q = rows[h * d..].as_ptr();
    let k = rows[c + h * d..].as_ptr();
    let ld = (3 * c) as isize;
    // SAFETY: q and k address N rows of `rows` (stride 3C), d columns each;
    // `scores` is N×N.
    unsafe {
        gemm::gemm(
            n,
            n,
            d,
            scores.as_mut_ptr(),
            1,
            n as isize,
            false,
            q,
            1,
            ld,
            k,
            ld,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    // The bias is added inside the softmax's first pass, not copied in
    // beforehand: one pass over the N×N scores fewer.
    let bias = bias.map(|b| &b[h * n * n..(h + 1) * n * n]);
    for (i, row) in scores.chunks_exact_mut(n).enumerate() {
        softmax_row(row, bias.map(|b| &b[i * n..(i + 1) * n]));
    }
}

/// `dst (m×n) = alpha·dst + beta·lhs·rhs` with explicit (row, column)
/// strides for every operand, single-threaded (callers run it per head).
#[allow(clippy::too_many_arguments)]
unsafe fn small_gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Gradients of [`attention`] given the gradient of its output `grad_out`
/// (B·N, C): `dqkv` (B·N, 3C) and, when there is a bias, `dbias` (heads, N, N)
/// summed over the images. P is recomputed rather than stored. Per head:
/// dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − rowsum(dP ∘ P)),
/// dQ = scale·dS·K, dK = scale·dSᵀ·Q, dbias = Σ_images dS.
pub fn attention_backward(
    qkv: &[f32],
    dims: AttentionDims,
    scale: f32,
    bias: Option<&[f32]>,
    grad_out: &[f32],
    dqkv: &mut [f32],
    dbias: Option<&mut [f32]>,
) {
    let AttentionDims {
        batch,
        tokens: n,
        heads,
        head_dim: d,
    } = dims;
    let c = heads * d;
    dims.check(qkv, grad_out, bias);
    assert_eq!(dqkv.len(), qkv.len(), "qkv gradient has the wrong size");
    let dq_addr = dqkv.as_mut_ptr() as usize;
    let db_addr = dbias.map(|b| {
        assert_eq!(b.len(), heads * n * n, "bias gradient has the wrong size");
        b.fill(0.0);
        b.as_mut_ptr() as usize
    });
    // One task per head, looping over the images: the bias gradient of a
    // head is then summed by one thread only.
    (0..heads).into_par_iter().for_each(|h| {
        let mut p = vec![0f32; n * n];
        let mut ds = vec![0f32; n * n];
        for img in 0..batch {
            let rows = &qkv[img * n * 3 * c..(img + 1) * n * 3 * c];
            probabilities(rows, h, dims, scale, bias, &mut p);
            let (q, k, v) = (
                rows[h * d..].as_ptr(),
                rows[c + h * d..].as_ptr(),
                rows[2 * c + h * d..].as_ptr(),
            );
            let d_out = grad_out[img * n * c + h * d..].as_ptr();
            let dst = (dq_addr as *mut f32).wrapping_add(img * n * 3 * c + h * d);
            // SAFETY: every operand stays inside its slice for the given shapes
            // and strides; tasks write disjoint columns (head h) of dqkv and
            // their own head's slice of dbias.
            unsafe {
                // dV = Pᵀ·dO
                small_gemm(
                    (n, d, n),
                    dst.add(2 * c),
                    3 * c,
                    false,
                    p.as_ptr(),
                    (1, n),
                    d_out,
                    (c, 1),
                    1.0,
                );
                // dP = dO·Vᵀ
                small_gemm(
                    (n, n, d),
                    ds.as_mut_ptr(),
                    n,
                    false,
                    d_out,
                    (c, 1),
                    v,
                    (1, 3 * c),
                    1.0,
                );
            }
            for (ds, p) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
                let dot: f32 = ds.iter().zip(p).map(|(a, b)| a * b).sum();
                ds.iter_mut().zip(p).for_each(|(g, p)| *g = p * (*g - dot));
            }
            if let Some(addr) = db_addr {
                // SAFETY: head h's N×N slice of dbias belongs to this task.
                let db = unsafe {
                    std::slice::from_raw_parts_mut((addr as *mut f32).add(h * n * n), n * n)
                };
                db.iter_mut().zip(&ds).for_each(|(a, b)| *a += b);
            }
            // SAFETY: as above.
            unsafe {
                // dQ = scale·dS·K
                small_gemm(
                    (n, d, n),
                    dst,
                    3 * c,
                    false,
                    ds.as_ptr(),
                    (n, 1),
                    k,
                    (3 * c, 1),
                    scale,
                );
                // dK = scale·dSᵀ·Q
                small_gemm(
                    (n, d, n),
                    dst.add(c),
                    3 * c,
                    false,
                    ds.as_ptr(),
                    (1, n),
                    q,
                    (3 * c, 1),
                    scale,
                );
            }
        }
    });
}
