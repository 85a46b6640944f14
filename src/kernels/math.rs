//! Element-wise and row kernels (exp, erf-GELU, softmax, LayerNorm) written so
//! that LLVM vectorises them: fixed-width lane arrays instead of serial float
//! reductions, branch-free polynomials instead of libm calls. Each public entry
//! point is compiled twice, once for AVX-512 and once for the baseline target,
//! and picks the build the CPU supports at run time.

use rayon::prelude::*;

/// Lanes per partial sum: one zmm register of f32.
const LANES: usize = 16;

/// f32 → bf16 bits, round to nearest even (NaN stays NaN).
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    // Both computed, one selected: the loops that call this vectorise.
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let quiet = ((b >> 16) | 0x40) as u16;
    if x.is_nan() { quiet } else { rounded }
}

/// bf16 bits → f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `e^x` to about 1 ulp on the range softmax and erf need; inputs below
/// −87.3 flush to ~1e-38 instead of 0 and inputs above 88.7 saturate.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_with(x, |a, b, c| a * b + c)
}

/// [`exp`] with fused multiply-adds (one rounding each, so not bit-equal to
/// it): only for code compiled with FMA, where `mul_add` is one instruction.
#[inline(always)]
pub fn exp_fma(x: f32) -> f32 {
    exp_with(x, f32::mul_add)
}

/// The polynomial of [`exp`], its `a·b + c` steps done by `madd`.
#[inline(always)]
fn exp_with(x: f32, madd: impl Fn(f32, f32, f32) -> f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to an integer and leaves it in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let shifted = madd(x, LOG2E, SHIFTER);
    let n = shifted - SHIFTER;
    let n_int = shifted.to_bits().wrapping_sub(SHIFTER.to_bits());
    let r = madd(-n, LN2_LO, madd(-n, LN2_HI, x));
    // Minimax polynomial of e^r on |r| ≤ ln2/2.
    let p = 1.987_569_1e-4;
    let p = madd(p, r, 1.398_199_9e-3);
    let p = madd(p, r, 8.333_452e-3);
    let p = madd(p, r, 4.166_579_6e-2);
    let p = madd(p, r, 1.666_666_5e-1);
    let p = madd(p, r, 0.5);
    let e = madd(p, r * r, r) + 1.0;
    f32::from_bits(n_int.wrapping_add(127) << 23) * e
}

/// `erf(x)`, absolute error ≈ 1e-7 (f32 rounding; the polynomials are within
/// 4e-9). Below 1: `x·P(x²)`. From 1: `1 − e^(−x²)·Q(1/x)` with Q fitted to
/// `erfc(x)·e^(x²)`; |x| is capped at 4, where erf is 1 in f32. Both pieces
/// are computed and one selected, so the loop vectorises.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs().min(4.0);
    let s = a * a;
    let p = 7.882_497e-5;
    let p = p * s - 8.018_855e-4;
    let p = p * s + 5.189_312e-3;
    let p = p * s - 2.685_432_9e-2;
    let p = p * s + 1.128_359_7e-1;
    let p = p * s - 3.761_262_7e-1;
    let p = p * s + std::f32::consts::FRAC_2_SQRT_PI;
    let small = p * a;
    let u = 1.0 / a.max(1.0);
    let q = -1.869_008e-2;
    let q = q * u + 1.244_353_2e-1;
    let q = q * u - 3.611_264_6e-1;
    let q = q * u + 5.825_459_3e-1;
    let q = q * u - 5.096_923e-1;
    let q = q * u + 5.221_007_3e-2;
    let q = q * u + 5.575_372_5e-1;
    let q = q * u + 3.638_529_2e-4;
    let large = 1.0 - q * exp(-s);
    let y = if a < 1.0 { small } else { large };
    f32::from_bits(y.to_bits() | (x.to_bits() & 0x8000_0000))
}

/// Exact (erf) GELU: `x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

multiversion! {
    /// `dx = g · (Φ(x) + x·φ(x))`, the derivative of exact GELU.
    pub fn gelu_grad(x: &[f32], g: &[f32], dx: &mut [f32]) {
        const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
        for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = FRAC_1_SQRT_2PI * exp(-0.5 * x * x);
            *d = g * (cdf + x * pdf);
        }
    }
}

multiversion! {
    /// GELU applied in place.
    fn gelu_slice(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = gelu(*v);
        }
    }
}

/// Adds `bias` (the same length) to `x` when given and returns the row's
/// maximum: the addition rides on the pass that finds it.
#[inline(always)]
pub fn add_bias_max(x: &mut [f32], bias: Option<&[f32]>) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut max = f32::NEG_INFINITY;
    if let Some(bias) = bias {
        assert_eq!(bias.len(), x.len(), "softmax bias has the wrong length");
        let mut chunks = x.chunks_exact_mut(LANES);
        let mut bchunks = bias.chunks_exact(LANES);
        for (c, b) in (&mut chunks).zip(&mut bchunks) {
            for i in 0..LANES {
                c[i] += b[i];
                lanes[i] = lanes[i].max(c[i]);
            }
        }
        for (v, &b) in chunks.into_remainder().iter_mut().zip(bchunks.remainder()) {
            *v += b;
            max = max.max(*v);
        }
    } else {
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                lanes[i] = lanes[i].max(c[i]);
            }
        }
        for &v in chunks.remainder() {
            max = max.max(v);
        }
    }
    lanes.iter().copied().fold(max, f32::max)
}

multiversion! {
    /// Softmax of one row in place, after adding `bias` (the same length)
    /// when given.
    pub fn softmax_row(x: &mut [f32], bias: Option<&[f32]>) {
        let max = add_bias_max(x, bias);
        let mut chunks = x.chunks_exact_mut(LANES);
        let mut sums = [0f32; LANES];
        for c in &mut chunks {
            for i in 0..LANES {
                c[i] = exp(c[i] - max);
                sums[i] += c[i];
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in x.iter_mut() {
            *v *= inv;
        }
    }
}

#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut sums = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            sums[i] += f(c[i]);
        }
    }
    sums.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

multiversion! {
    /// LayerNorm of one row (biased variance, `eps` inside the root).
    fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
        let n = x.len() as f32;
        let mean = lane_sum(x, |v| v) / n;
        let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
        let rstd = 1.0 / (var + eps).sqrt();
        for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
            *o = (v - mean) * rstd * w + b;
        }
    }
}

/// Rows per parallel task: enough work to amortise scheduling.
fn rows_per_task(width: usize) -> usize {
    (16384 / width.max(1)).max(1)
}

/// LayerNorm over rows of width `w.len()`, in parallel.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let c = w.len();
    let chunk = rows_per_task(c) * c;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                layer_norm_row(x, w, b, eps, o);
            }
        });
}

/// Exact GELU in place, in parallel.
pub fn gelu_inplace(x: &mut [f32]) {
    x.par_chunks_mut(16384).for_each(gelu_slice);
}

multiversion! {
    /// `x[r] += γ ∘ y[r]` for every row `r` (γ optional: plain residual add).
    fn residual_rows(x: &mut [f32], y: &[f32], gamma: Option<&[f32]>) {
        match gamma {
            Some(g) => {
                let c = g.len();
                for (x, y) in x.chunks_exact_mut(c).zip(y.chunks_exact(c)) {
                    for ((x, &y), &g) in x.iter_mut().zip(y).zip(g) {
                        *x += g * y;
                    }
                }
            }
            None => {
                for (x, &y) in x.iter_mut().zip(y) {
                    *x += y;
                }
            }
        }
    }
}

/// `x += γ ∘ y` row-wise (γ of the row width), in parallel.
pub fn add_scaled_residual(x: &mut [f32], y: &[f32], gamma: Option<&[f32]>, width: usize) {
    let chunk = rows_per_task(width) * width;
    x.par_chunks_mut(chunk)
        .zip(y.par_chunks(chunk))
        .for_each(|(x, y)| residual_rows(x, y, gamma));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Taylor series in f64 (converges fast for |x| ≤ 3), and 1 beyond.
    fn erf_ref(x: f64) -> f64 {
        if x.abs() > 5.5 {
            return x.signum();
        }
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_is_within_two_ulp() {
        for i in -8000..=8000 {
            let x = i as f32 * 0.01;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            assert!(
                ((got - want) / want).abs() < 2.5e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn gelu_matches_the_erf_definition() {
        for i in -600..=600 {
            let x = i as f64 * 0.01;
            let want = 0.5 * x * (1.0 + erf_ref(x / std::f64::consts::SQRT_2));
            let got = gelu(x as f32) as f64;
            assert!(
                (got - want).abs() <= 2e-7 * (1.0 + x.abs()),
                "gelu({x}) = {got}, want {want}"
            );
        }
        let mut v: Vec<f32> = (0..100).map(|i| i as f32 * 0.1 - 5.0).collect();
        let want: Vec<f32> = v.iter().map(|&x| gelu(x)).collect();
        gelu_inplace(&mut v);
        assert_eq!(v, want);
    }

    #[test]
    fn softmax_and_layer_norm_match_f64() {
        let x: Vec<f32> = (0..197)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3)
            .collect();
        let mut s = x.clone();
        softmax_row(&mut s, None);
        let m = x.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
        let z: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
        for (&got, &v) in s.iter().zip(&x) {
            let want = (v as f64 - m).exp() / z;
            assert!(
                (got as f64 - want).abs() < 1e-7 + 1e-6 * want,
                "{got} vs {want}"
            );
        }
        let w: Vec<f32> = (0..197).map(|i| 1.0 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..197).map(|i| i as f32 * -0.02).collect();
        let mut out = vec![0f32; 2 * 197];
        let xx: Vec<f32> = x.iter().chain(&x).copied().collect();
        layer_norm(&xx, &w, &b, 1e-6, &mut out);
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / 197.0;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 197.0;
        for r in 0..2 {
            for i in 0..197 {
                let want = (x[i] as f64 - mean) / (var + 1e-6).sqrt() * w[i] as f64 + b[i] as f64;
                assert!((out[r * 197 + i] as f64 - want).abs() < 2e-6, "{i}");
            }
        }
    }
}
