//! Differentiable fused ops for training: linear layers, attention,
//! LayerNorm, softmax over the last axis and exact GELU as candle custom ops
//! with their own backward passes.
//! Each replaces a chain of candle ops (and their allocations and
//! single-threaded reductions) with one multi-threaded pass forward and one
//! backward. f32 CPU tensors only; callers fall back to composites otherwise.

use super::attention::{AttentionDims, attention, attention_backward};
use super::math::{self, layer_norm};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per parallel task for row-wise kernels.
fn chunk_rows(width: usize) -> usize {
    (16384 / width.max(1)).max(1)
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: expected a contiguous f32 tensor"),
    }
}

/// Runs `f` on the contiguous f32 data of `t`.
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    super::with_f32(t, f)
}

/// LayerNorm over the last axis: `x`, weight, bias → y.
struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "beitv2-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            slice(s1, l1, "layer norm input")?,
            slice(s2, l2, "layer norm weight")?,
            slice(s3, l3, "layer norm bias")?,
        );
        let mut out = vec![0f32; x.len()];
        layer_norm(x, w, b, self.eps, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = w.dim(0)?;
        let (dx, dw, db) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(grad, |g| Ok(layer_norm_backward(x, w, g, self.eps)))
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, c, dev)?),
            Some(Tensor::from_vec(db, c, dev)?),
        ))
    }
}

/// Gradients of LayerNorm: with x̂ = (x − μ)·r and ĝ = g ∘ w,
/// dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ ∘ x̂)), dw = Σ g ∘ x̂, db = Σ g.
fn layer_norm_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = w.len();
    let rows = chunk_rows(c);
    let mut dx = vec![0f32; x.len()];
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(rows * c)
        .zip(x.par_chunks(rows * c).zip(g.par_chunks(rows * c)))
        .map(|(dx, (x, g))| {
            let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
            let mut xhat = vec![0f32; c];
            for ((dx, x), g) in dx
                .chunks_exact_mut(c)
                .zip(x.chunks_exact(c))
                .zip(g.chunks_exact(c))
            {
                let n = c as f32;
                let mean = x.iter().sum::<f32>() / n;
                let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
                let r = 1.0 / (var + eps).sqrt();
                let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                for i in 0..c {
                    xhat[i] = (x[i] - mean) * r;
                    let gh = g[i] * w[i];
                    sum_g += gh;
                    sum_gx += gh * xhat[i];
                    dw[i] += g[i] * xhat[i];
                    db[i] += g[i];
                }
                let (mg, mgx) = (sum_g / n, sum_gx / n);
                for i in 0..c {
                    dx[i] = r * (g[i] * w[i] - mg - xhat[i] * mgx);
                }
            }
            (dw, db)
        })
        .collect();
    let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
    for (pw, pb) in partials {
        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    (dx, dw, db)
}

/// Softmax over the last axis.
struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "beitv2-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "softmax input")?;
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = x.to_vec();
        out.par_chunks_mut(chunk_rows(n) * n).for_each(|rows| {
            rows.chunks_exact_mut(n)
                .for_each(|row| math::softmax_row(row, None))
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// dx = y ∘ (g − Σ g ∘ y) per row.
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = res.dim(candle_core::D::Minus1)?.max(1);
        let dx = with_data(res, |y| {
            with_data(grad, |g| {
                let mut dx = vec![0f32; y.len()];
                dx.par_chunks_mut(chunk_rows(n) * n)
                    .zip(
                        y.par_chunks(chunk_rows(n) * n)
                            .zip(g.par_chunks(chunk_rows(n) * n)),
                    )
                    .for_each(|(dx, (y, g))| {
                        for ((dx, y), g) in dx
                            .chunks_exact_mut(n)
                            .zip(y.chunks_exact(n))
                            .zip(g.chunks_exact(n))
                        {
                            let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                            for i in 0..n {
                                dx[i] = y[i] * (g[i] - dot);
                            }
                        }
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// Exact (erf) GELU.
struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "beitv2-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = slice(s, l, "gelu input")?.to_vec();
        math::gelu_inplace(&mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// d gelu/dx = Φ(x) + x·φ(x).
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_data(arg, |x| {
            with_data(grad, |g| {
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(16384)
                    .zip(x.par_chunks(16384).zip(g.par_chunks(16384)))
                    .for_each(|(dx, (x, g))| math::gelu_grad(x, g, dx));
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `y = x·Wᵀ + b` for x (…, in), W (out, in), b (out) → (…, out). Taking
/// any leading axes keeps reshapes (each one a zeroed gradient buffer and an
/// add in candle's backward) out of the graph.
struct LinearOp;

/// (product of the leading axes, last axis) of a shape of rank ≥ 1.
fn rows_and_width(shape: &Shape) -> Result<(usize, usize)> {
    match shape.dims().split_last() {
        Some((&k, lead)) => Ok((lead.iter().product(), k)),
        None => candle_core::bail!("linear: the input is a scalar"),
    }
}

/// `lhs · rhs` (m×n, row-major) on the `gemm` crate, the operands row-major
/// except where the strides say otherwise: (rows, cols, depth, lhs (ptr, rs,
/// cs), rhs (ptr, rs, cs)). The output is written once, never zeroed first.
#[allow(clippy::too_many_arguments)]
fn gemm_new(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) -> Vec<f32> {
    let last = |(r, c): (usize, usize), (rs, cs): (usize, usize)| {
        (r.max(1) - 1) * rs + (c.max(1) - 1) * cs
    };
    assert!(
        m * k == 0 || last((m, k), (lhs_rs, lhs_cs)) < lhs.len(),
        "gemm lhs is too short for its strides"
    );
    assert!(
        k * n == 0 || last((k, n), (rhs_rs, rhs_cs)) < rhs.len(),
        "gemm rhs is too short for its strides"
    );
    if k == 0 {
        return vec![0f32; m * n];
    }
    let mut dst = Vec::<f32>::with_capacity(m * n);
    // SAFETY: every m×k / k×n access stays inside `lhs` / `rhs` (asserted
    // above); with alpha 0 and read_dst false the crate writes all m×n
    // outputs without reading them, so the length is set after they are.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
        dst.set_len(m * n);
    }
    dst
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "beitv2-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            slice(s1, l1, "linear input")?,
            slice(s2, l2, "linear weight")?,
            slice(s3, l3, "linear bias")?,
        );
        let (rows, k) = rows_and_width(l1.shape())?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 || b.len() != n {
            candle_core::bail!(
                "linear: input {:?}, weight {n}×{k2}, bias {}",
                l1.shape().dims(),
                b.len()
            );
        }
        let mut out = vec![0f32; rows * n];
        let weight = super::gemm::WeightRef::F32 {
            data: w,
            out_dim: n,
            in_dim: k,
            panels: None,
        };
        super::gemm::linear(x, rows, weight, Some(b), super::Epilogue::Store, &mut out);
        let mut shape = l1.shape().dims().to_vec();
        *shape.last_mut().expect("rank checked above") = n;
        Ok((CpuStorage::F32(out), shape.into()))
    }

    /// dx = g·W, dW = gᵀ·x, db = Σ_rows g.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, k) = rows_and_width(x.shape())?;
        let n = w.dim(0)?;
        let (dx, dw, db) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(grad, |g| {
                    let dx = gemm_new(rows, k, n, g, (n, 1), w, (k, 1));
                    let dw = gemm_new(n, k, rows, g, (1, n), x, (k, 1));
                    Ok((dx, dw, column_sums(g, n)))
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, (n, k), dev)?),
            Some(Tensor::from_vec(db, n, dev)?),
        ))
    }
}

/// Sums of the columns of a row-major matrix `width` wide, in parallel over
/// fixed row chunks whose partial sums are added in order, so the result
/// does not depend on thread scheduling (training resumes exactly).
fn column_sums(g: &[f32], width: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = g
        .par_chunks(chunk_rows(width) * width)
        .map(|chunk| {
            let mut s = vec![0f32; width];
            for row in chunk.chunks_exact(width) {
                s.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
            s
        })
        .collect();
    let mut sums = vec![0f32; width];
    for p in partials {
        sums.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    sums
}

/// Multi-head attention from packed qkv (B, N, 3C) with a (heads, N, N)
/// bias added to the scaled scores → (B, N, C), before the output projection.
struct AttentionOp {
    heads: usize,
    scale: f32,
}

impl AttentionOp {
    fn dims(&self, qkv: &Shape) -> Result<AttentionDims> {
        let (batch, tokens, c3) = qkv.dims3()?;
        Ok(AttentionDims {
            batch,
            tokens,
            heads: self.heads,
            head_dim: c3 / 3 / self.heads,
        })
    }
}

impl CustomOp2 for AttentionOp {
    fn name(&self) -> &'static str {
        "beitv2-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (qkv, bias) = (slice(s1, l1, "qkv")?, slice(s2, l2, "attention bias")?);
        let dims = self.dims(l1.shape())?;
        let c = dims.heads * dims.head_dim;
        let mut out = vec![0f32; dims.batch * dims.tokens * c];
        attention(qkv, dims, self.scale, Some(bias), false, &mut out);
        Ok((CpuStorage::F32(out), (dims.batch, dims.tokens, c).into()))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dims = self.dims(qkv.shape())?;
        let (dqkv, dbias) = with_data(qkv, |q| {
            with_data(bias, |b| {
                with_data(grad, |g| {
                    let mut dqkv = vec![0f32; q.len()];
                    let mut dbias = vec![0f32; b.len()];
                    attention_backward(
                        q,
                        dims,
                        self.scale,
                        Some(b),
                        g,
                        &mut dqkv,
                        Some(&mut dbias),
                    );
                    Ok((dqkv, dbias))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?),
            Some(Tensor::from_vec(dbias, bias.shape(), bias.device())?),
        ))
    }
}

/// A block's residual add `x + s[b]·γ ∘ y`: layer scale γ (C) and the
/// per-sample drop-path factor s (B; all ones when nothing is dropped), one
/// node in place of candle's two broadcast products and an add.
struct ResidualOp {
    sample_scale: Option<Vec<f32>>,
}

impl ResidualOp {
    fn scale(&self, b: usize) -> f32 {
        self.sample_scale.as_ref().map_or(1.0, |s| s[b])
    }

    /// (channels, elements per sample) after checking that x and y are one
    /// (B, …, C) shape, γ has C values and s has B.
    fn check(&self, x: &Shape, y: &Shape, c: usize) -> Result<(usize, usize)> {
        let dims = x.dims();
        if x != y || dims.len() < 2 || dims.last() != Some(&c) {
            candle_core::bail!(
                "residual: input {:?}, branch {:?}, layer scale of {c}",
                dims,
                y.dims()
            );
        }
        if let Some(s) = &self.sample_scale
            && s.len() != dims[0]
        {
            candle_core::bail!(
                "residual: {} drop-path factors for a batch of {}",
                s.len(),
                dims[0]
            );
        }
        Ok((c, x.elem_count() / dims[0]))
    }
}

impl CustomOp3 for ResidualOp {
    fn name(&self) -> &'static str {
        "beitv2-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, y, g) = (
            slice(s1, l1, "residual input")?,
            slice(s2, l2, "residual branch")?,
            slice(s3, l3, "layer scale")?,
        );
        let (c, per_sample) = self.check(l1.shape(), l2.shape(), g.len())?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(per_sample)
            .zip(x.par_chunks(per_sample).zip(y.par_chunks(per_sample)))
            .enumerate()
            .for_each(|(b, (o, (x, y)))| {
                let s = self.scale(b);
                for ((o, x), y) in o
                    .chunks_exact_mut(c)
                    .zip(x.chunks_exact(c))
                    .zip(y.chunks_exact(c))
                {
                    for i in 0..c {
                        // The composite's order: (y·γ)·s, then + x.
                        o[i] = x[i] + y[i] * g[i] * s;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// dx = g, dy = (g·s[b]) ∘ γ, dγ = Σ_b,n (g·s[b]) ∘ y.
    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        gamma: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = gamma.elem_count();
        let (_, per_sample) = self.check(x.shape(), y.shape(), c)?;
        let (dy, dgamma) = with_data(y, |y| {
            with_data(gamma, |gm| {
                with_data(grad, |g| {
                    let mut dy = vec![0f32; y.len()];
                    let partials: Vec<Vec<f32>> = dy
                        .par_chunks_mut(per_sample)
                        .zip(y.par_chunks(per_sample).zip(g.par_chunks(per_sample)))
                        .enumerate()
                        .map(|(b, (dy, (y, g)))| {
                            let s = self.scale(b);
                            let mut dg = vec![0f32; c];
                            for ((dy, y), g) in dy
                                .chunks_exact_mut(c)
                                .zip(y.chunks_exact(c))
                                .zip(g.chunks_exact(c))
                            {
                                for i in 0..c {
                                    let gs = g[i] * s;
                                    dy[i] = gs * gm[i];
                                    dg[i] += gs * y[i];
                                }
                            }
                            dg
                        })
                        .collect();
                    // Summed in sample order: the result does not depend on scheduling.
                    let mut dgamma = vec![0f32; c];
                    for p in partials {
                        dgamma.iter_mut().zip(p).for_each(|(a, b)| *a += b);
                    }
                    Ok((dy, dgamma))
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(grad.clone()),
            Some(Tensor::from_vec(dy, y.shape(), dev)?),
            Some(Tensor::from_vec(dgamma, gamma.shape(), dev)?),
        ))
    }
}

fn plain(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

/// Differentiable LayerNorm, or None when the tensors are not f32 on the CPU.
pub fn layer_norm_op(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !plain(&[x, w, b]) {
        return Ok(None);
    }
    let op = LayerNormOp { eps: eps as f32 };
    Ok(Some(x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        op,
    )?))
}

/// Differentiable `x·Wᵀ + b` over the last axis of `x`, or None off the
/// f32 CPU path.
pub fn linear_op(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    if !plain(&[x, w, b]) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LinearOp,
    )?))
}

/// Differentiable attention (see [`AttentionOp`]): `qkv` (B, N, 3C), `bias`
/// (heads, N, N). None off the f32 CPU path.
pub fn attention_op(
    qkv: &Tensor,
    bias: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    if !plain(&[qkv, bias]) {
        return Ok(None);
    }
    let op = AttentionOp {
        heads,
        scale: scale as f32,
    };
    Ok(Some(qkv.contiguous()?.apply_op2(&bias.contiguous()?, op)?))
}

/// Differentiable `x + s[b]·γ ∘ y` (see [`ResidualOp`]) for x, y (B, …, C),
/// γ (C) and per-sample factors s (B) or none. None off the f32 CPU path.
pub fn residual_op(
    x: &Tensor,
    y: &Tensor,
    gamma: &Tensor,
    sample_scale: Option<Vec<f32>>,
) -> Result<Option<Tensor>> {
    if !plain(&[x, y, gamma]) {
        return Ok(None);
    }
    let op = ResidualOp { sample_scale };
    Ok(Some(x.contiguous()?.apply_op3(
        &y.contiguous()?,
        &gamma.contiguous()?,
        op,
    )?))
}

/// Differentiable softmax over the last axis, or None off the f32 CPU path.
pub fn softmax_op(x: &Tensor) -> Result<Option<Tensor>> {
    if !plain(&[x]) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(SoftmaxOp)?))
}

/// Differentiable exact GELU, or None off the f32 CPU path.
pub fn gelu_op(x: &Tensor) -> Result<Option<Tensor>> {
    if !plain(&[x]) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(GeluOp)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Forward values and gradients (through a random weighting of the
    /// output) of `fused` and `reference` agree.
    fn check(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Tensor,
        reference: impl Fn(&[Tensor]) -> Tensor,
        tol: f32,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&ts), reference(&ts));
        assert!(
            max_diff(&a, &b) <= tol,
            "forward differs by {}",
            max_diff(&a, &b)
        );
        let weight = rand(a.dims(), 99);
        let ga = (&a * &weight)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (&b * &weight)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, t) in ts.iter().enumerate() {
            let (x, y) = (ga.get(t).unwrap(), gb.get(t).unwrap());
            let d = max_diff(x, y);
            assert!(d <= tol, "gradient of input {i} differs by {d}");
        }
    }

    #[test]
    fn layer_norm_matches_candle_composite() {
        let eps = 1e-6;
        check(
            &[rand(&[3, 5, 48], 1), rand(&[48], 2), rand(&[48], 3)],
            |t| layer_norm_op(&t[0], &t[1], &t[2], eps).unwrap().unwrap(),
            |t| {
                let x = &t[0];
                let mean = x.mean_keepdim(D::Minus1).unwrap();
                let xc = x.broadcast_sub(&mean).unwrap();
                let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                let xn = xc
                    .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
                    .unwrap();
                xn.broadcast_mul(&t[1])
                    .unwrap()
                    .broadcast_add(&t[2])
                    .unwrap()
            },
            2e-5,
        );
    }

    #[test]
    fn linear_matches_candle_matmul() {
        check(
            &[rand(&[37, 24], 6), rand(&[40, 24], 7), rand(&[40], 8)],
            |t| linear_op(&t[0], &t[1], &t[2]).unwrap().unwrap(),
            |t| {
                t[0].matmul(&t[1].t().unwrap())
                    .unwrap()
                    .broadcast_add(&t[2])
                    .unwrap()
            },
            2e-5,
        );
    }

    #[test]
    fn linear_on_leading_axes_matches_candle_matmul() {
        check(
            &[rand(&[3, 5, 24], 16), rand(&[40, 24], 17), rand(&[40], 18)],
            |t| linear_op(&t[0], &t[1], &t[2]).unwrap().unwrap(),
            |t| {
                t[0].broadcast_matmul(&t[1].t().unwrap())
                    .unwrap()
                    .broadcast_add(&t[2])
                    .unwrap()
            },
            2e-5,
        );
    }

    #[test]
    fn residual_matches_candle_composite() {
        let x = || rand(&[3, 5, 8], 20);
        let y = || rand(&[3, 5, 8], 21);
        let gamma = || rand(&[8], 22);
        let scale = vec![1.25f32, 0.0, 1.25];
        for s in [None, Some(scale)] {
            let mask = s
                .clone()
                .map(|v| Tensor::from_vec(v, (3, 1, 1), &Device::Cpu).unwrap());
            check(
                &[x(), y(), gamma()],
                |t| {
                    residual_op(&t[0], &t[1], &t[2], s.clone())
                        .unwrap()
                        .unwrap()
                },
                |t| {
                    let mut branch = t[1].broadcast_mul(&t[2]).unwrap();
                    if let Some(m) = &mask {
                        branch = branch.broadcast_mul(m).unwrap();
                    }
                    (&t[0] + branch).unwrap()
                },
                1e-6,
            );
        }
        // A batch of three with two drop-path factors is refused.
        let t = residual_op(&x(), &y(), &gamma(), Some(vec![1.0, 1.0]))
            .unwrap_err()
            .to_string();
        assert!(t.contains("2 drop-path factors for a batch of 3"), "{t}");
    }

    #[test]
    fn attention_matches_candle_composite() {
        // The models' head sizes (32, 64) beside a tiny one, with token
        // counts that are not multiples of the GEMM's register blocks.
        for (b, n, h, d) in [(2, 7, 3, 4), (2, 50, 2, 32), (1, 29, 2, 64)] {
            attention_case(b, n, h, d);
        }
    }

    fn attention_case(b: usize, n: usize, h: usize, d: usize) {
        let scale = (d as f64).powf(-0.5);
        check(
            &[rand(&[b, n, 3 * h * d], 10), rand(&[h, n, n], 11)],
            |t| attention_op(&t[0], &t[1], h, scale).unwrap().unwrap(),
            |t| {
                let qkv = t[0]
                    .reshape((b, n, 3, h, d))
                    .unwrap()
                    .permute((2, 0, 3, 1, 4))
                    .unwrap();
                let q = (qkv.get(0).unwrap() * scale).unwrap().contiguous().unwrap();
                let k = qkv.get(1).unwrap().contiguous().unwrap();
                let v = qkv.get(2).unwrap().contiguous().unwrap();
                let s = q
                    .matmul(&k.t().unwrap())
                    .unwrap()
                    .broadcast_add(&t[1])
                    .unwrap();
                let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
                p.matmul(&v)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((b, n, h * d))
                    .unwrap()
            },
            2e-5,
        );
    }

    #[test]
    fn softmax_and_gelu_match_candle_ops() {
        check(
            &[rand(&[2, 3, 7, 33], 4)],
            |t| softmax_op(&t[0]).unwrap().unwrap(),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1).unwrap(),
            1e-6,
        );
        check(
            &[rand(&[4, 100], 5)],
            |t| gelu_op(&t[0]).unwrap().unwrap(),
            |t| t[0].gelu_erf().unwrap(),
            2e-6,
        );
    }
}
