//! Attention of the reduced-precision paths (`--dtype bf16` / `int8`) with
//! bf16 products: per (image, head), `q·scale` and `k`, then the
//! exponentials and `v`, are rounded to bf16 and multiplied in 32×32 blocks
//! with f32 sums, as Intel AMX tiles or, on CPUs whose `vdpbf16ps` runs at the
//! FMA rate (AMD Zen 4), as AVX512-BF16 dot products over the same panel
//! layout ([`Products`]); the bias, the row maxima and sums stay f32, and each
//! output row is divided by its sum after P·V (one pass over the N×N scores
//! fewer than a softmax). Base model, one head of 197 tokens on one core of a
//! Sapphire Rapids Xeon: ~53 µs with AMX (packing 10, q·kᵀ 10, exponentials
//! 25, P·V 8) against ~95 µs for the fp32 kernel ([`super::attention`]).
//!
//! Every operand is padded to whole 32-token blocks (and the head size to
//! 32) with zeros, so the padded keys add nothing to P·V and the padded
//! queries' rows are dropped.

use super::AttentionDims;
use crate::kernels::amx::{self, PANEL_KBLOCK_BYTES};
use crate::kernels::isa::{self, Isa};
use crate::kernels::math::{add_bias_max, bf16_bits, exp_fma};
use rayon::prelude::*;

/// Rows and columns of one tile block; also the bf16 values per k block.
const BLOCK: usize = 32;
/// u32 pairs of bf16 in one k block of a B panel.
const PANEL_KBLOCK_PAIRS: usize = PANEL_KBLOCK_BYTES / 4;

/// The buffers of one head, padded and zeroed when first made on a thread
/// (and again when the shapes change); every task rewrites the same valid
/// region, so the padding stays zero.
struct Head {
    /// Valid tokens and head size.
    n: usize,
    d: usize,
    /// Tokens rounded up to [`BLOCK`].
    tokens: usize,
    /// Head size rounded up to [`BLOCK`].
    dim: usize,
    /// `q·scale`, tokens × dim bf16 (the left operand of q·kᵀ).
    q: Vec<u16>,
    /// 16 keys as bf16 rows (dim wide), before their transposition.
    keys: Vec<u16>,
    /// kᵀ as B panels of 32 keys: panel `j / 32`, dim/32 k blocks each.
    k: Vec<u32>,
    /// v as B panels of 32 columns: tokens/32 k blocks each.
    v: Vec<u32>,
    /// Scores: tokens × tokens f32.
    scores: Vec<f32>,
    /// `e^(score − row max)` in bf16 (the left operand of P·V): tokens × tokens.
    p: Vec<u16>,
    /// 1 / Σ of each row's exponentials.
    inv_sum: Vec<f32>,
    /// One 32×32 output block.
    block: Vec<f32>,
}

impl Head {
    fn new(n: usize, d: usize) -> Self {
        let (tokens, dim) = (n.next_multiple_of(BLOCK), d.next_multiple_of(BLOCK));
        Self {
            n,
            d,
            tokens,
            dim,
            q: vec![0; tokens * dim],
            keys: vec![0; 16 * dim],
            k: vec![0; tokens * dim / 2],
            v: vec![0; tokens * dim / 2],
            scores: vec![0.0; tokens * tokens],
            p: vec![0; tokens * tokens],
            inv_sum: vec![0.0; tokens],
            block: vec![0.0; BLOCK * BLOCK],
        }
    }
}

thread_local! {
    static HEAD: std::cell::RefCell<Option<Head>> = const { std::cell::RefCell::new(None) };
}

#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

/// bf16 of `scale·src` into `dst` (the same length), 16 at a time.
///
/// # Safety
/// The CPU has AVX512-BF16; called from [`head`] only, which is compiled for it.
#[inline(always)]
unsafe fn to_bf16(src: &[f32], scale: f32, dst: &mut [u16]) {
    let (mut sc, mut dc) = (src.chunks_exact(16), dst[..src.len()].chunks_exact_mut(16));
    for (s, d) in (&mut sc).zip(&mut dc) {
        let mut x = [0f32; 16];
        for i in 0..16 {
            x[i] = s[i] * scale;
        }
        // SAFETY: the caller's contract.
        unsafe { store_bf16x16(&x, d) };
    }
    for (d, &s) in dc.into_remainder().iter_mut().zip(sc.remainder()) {
        *d = bf16_bits(s * scale);
    }
}

/// Tokens `2·r2` and `2·r2 + 1` of v (`hi` None past the last token) as
/// bf16 pairs into row `r2` of every panel's tiles (`kblocks` per panel).
///
/// # Safety
/// As [`to_bf16`].
#[inline(always)]
unsafe fn pack_v_pair(lo: &[f32], hi: Option<&[f32]>, r2: usize, kblocks: usize, v: &mut [u32]) {
    use std::arch::x86_64::*;
    let row = (r2 / 16) * PANEL_KBLOCK_PAIRS + (r2 % 16) * 16;
    // Word i of the interleaved pairs: lo[i/2] for even i, hi[i/2] for odd.
    const INTERLEAVE: [i16; 32] = {
        let mut idx = [0i16; 32];
        let mut i = 0;
        while i < 32 {
            idx[i] = (i / 2 + (i % 2) * 16) as i16;
            i += 1;
        }
        idx
    };
    for (q, lo) in lo.chunks(16).enumerate() {
        // 16 columns: tile q % 2 of panel q / 2.
        let dst =
            &mut v[(q / 2) * kblocks * PANEL_KBLOCK_PAIRS + (q % 2) * 256 + row..][..lo.len()];
        let hi = hi.map(|h| &h[q * 16..q * 16 + lo.len()]);
        if lo.len() == 16 {
            // SAFETY: 16 f32 in lo (and hi) and 16 u32 in dst; the caller's
            // contract covers the instructions.
            unsafe {
                let l = _mm512_loadu_ps(lo.as_ptr());
                let h = hi.map_or(_mm512_setzero_ps(), |h| _mm512_loadu_ps(h.as_ptr()));
                let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(h, l));
                let idx = _mm512_loadu_si512(INTERLEAVE.as_ptr() as *const __m512i);
                _mm512_storeu_si512(
                    dst.as_mut_ptr() as *mut __m512i,
                    _mm512_permutexvar_epi16(idx, words),
                );
            }
        } else {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = pair(lo[j], hi.map_or(0.0, |h| h[j]));
            }
        }
    }
}

/// Keys `16·g..16·g + 16` (bf16 rows of `dim` values in `keys`) into tile
/// `g % 2` of k panel `g / 2`: each k block's 16 pairs of a key become a
/// column, a 16×16 transposition of pairs.
#[inline(always)]
fn pack_key_group(keys: &[u16], dim: usize, g: usize, k: &mut [u32]) {
    let kblocks = dim / BLOCK;
    let base = (g / 2) * kblocks * PANEL_KBLOCK_PAIRS + (g % 2) * 256;
    for kb in 0..kblocks {
        let tile = &mut k[base + kb * PANEL_KBLOCK_PAIRS..][..256];
        for (c, key) in keys.chunks_exact(dim).enumerate() {
            let pairs = &key[kb * BLOCK..(kb + 1) * BLOCK];
            for (r, p) in pairs.chunks_exact(2).enumerate() {
                tile[r * 16 + c] = p[0] as u32 | (p[1] as u32) << 16;
            }
        }
    }
}

/// 16 f32 → 16 bf16 (round to nearest even) with `vcvtneps2bf16`.
///
/// # Safety
/// The CPU has AVX512-BF16.
#[inline(always)]
unsafe fn store_bf16x16(x: &[f32; 16], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    assert_eq!(dst.len(), 16);
    // SAFETY: 16 readable f32 and 16 writable u16; the caller checked the CPU.
    unsafe {
        let b = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr()));
        _mm256_storeu_si256(
            dst.as_mut_ptr() as *mut __m256i,
            std::mem::transmute::<__m256bh, __m256i>(b),
        );
    }
}

/// Adds the bias row, then writes `e^(s − max)` as bf16 to `p`; returns
/// 1 / Σ e^(s − max) (the softmax's normalisation, applied to P·V's rows).
/// The last partial 16 columns run as a full vector over a padded copy.
///
/// # Safety
/// The CPU has AVX-512 F/BW/DQ/VL, BF16 and FMA (every AMX CPU has). Kept
/// out of line: inlined into [`head`] it ran 1.6x slower.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma")]
unsafe fn exp_to_bf16(s: &mut [f32], bias: Option<&[f32]>, p: &mut [u16]) -> f32 {
    let max = add_bias_max(s, bias);
    let mut sums = [0f32; 16];
    let (mut sc, mut pc) = (s.chunks_exact(16), p[..s.len()].chunks_exact_mut(16));
    for (s, p) in (&mut sc).zip(&mut pc) {
        let mut e = [0f32; 16];
        for i in 0..16 {
            e[i] = exp_fma(s[i] - max);
            sums[i] += e[i];
        }
        // SAFETY: the caller's contract.
        unsafe { store_bf16x16(&e, p) };
    }
    let tail = sc.remainder();
    if !tail.is_empty() {
        let mut x = [max; 16];
        x[..tail.len()].copy_from_slice(tail);
        let mut e = [0f32; 16];
        for i in 0..16 {
            e[i] = if i < tail.len() {
                exp_fma(x[i] - max)
            } else {
                0.0
            };
            sums[i] += e[i];
        }
        let mut out = [0u16; 16];
        // SAFETY: as above.
        unsafe { store_bf16x16(&e, &mut out) };
        pc.into_remainder().copy_from_slice(&out[..tail.len()]);
    }
    1.0 / sums.iter().sum::<f32>()
}

/// What multiplies the bf16 blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX512-BF16 `vdpbf16ps`, the linear layers' dot-product block.
    Dot,
}

impl Products {
    /// The products that pay here: AMX, or `vdpbf16ps` where it issues at
    /// the FMA rate (the linear layers' choice); None where fp32 attention
    /// is as fast.
    pub fn fast_here() -> Option<Products> {
        if isa::active() >= Isa::Amx {
            Some(Products::Amx)
        } else if crate::kernels::gemm::bf16_dot_is_fast() {
            Some(Products::Dot)
        } else {
            None
        }
    }

    /// Whether the CPU and the ISA cap allow these products at all.
    fn allowed(self) -> bool {
        match self {
            Products::Amx => isa::active() >= Isa::Amx,
            Products::Dot => isa::active() >= Isa::Avx512Bf16,
        }
    }

    /// `c = a·b` for the first `rows` rows (rounded up to 4; AMX does all
    /// 32) of a 32×32 block, rows of `c` `c_stride` f32 apart.
    ///
    /// # Safety
    /// The products are allowed; `a` holds 32 rows of `kblocks × 64` bytes
    /// at `stride`, `b` a panel of `kblocks` k blocks, `c` 32 writable rows
    /// of 32 f32 at `c_stride`; the caller is compiled for AVX512-BF16.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        self,
        a: *const u16,
        stride: usize,
        b: *const u32,
        kblocks: usize,
        rows: usize,
        c: *mut f32,
        c_stride: usize,
        tmp: &mut [f32; BLOCK * BLOCK],
    ) {
        let (a, b) = (a as *const u8, b as *const u8);
        // SAFETY: the function's contract.
        unsafe {
            match self {
                Products::Amx => {
                    amx::block(a, stride, b, kblocks, false, c as *mut u8, c_stride * 4)
                }
                Products::Dot => {
                    crate::kernels::gemm::bf16_dot_block(a, stride, b, kblocks, rows, tmp);
                    for r in 0..rows.min(BLOCK) {
                        std::ptr::copy_nonoverlapping(
                            tmp[r * BLOCK..].as_ptr(),
                            c.add(r * c_stride),
                            BLOCK,
                        );
                    }
                }
            }
        }
    }
}

/// [`super::attention`] with bf16 block products: the same arguments.
///
/// # Panics
/// When the CPU or the ISA cap does not allow `products`, or the sizes are wrong.
pub fn attention(
    products: Products,
    qkv: &[f32],
    dims: AttentionDims,
    scale: f32,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!(
        products.allowed(),
        "bf16 attention with {products:?} is not allowed on this CPU or under the ISA cap"
    );
    assert!(
        dims.head_dim.is_multiple_of(2),
        "bf16 attention needs an even head size"
    );
    let (n, d, heads) = (dims.tokens, dims.head_dim, dims.heads);
    dims.check(qkv, out, bias);
    let out_addr = out.as_mut_ptr() as usize;
    (0..dims.batch * heads).into_par_iter().for_each(|task| {
        HEAD.with_borrow_mut(|slot| {
            let buf = match slot {
                Some(h) if h.n == n && h.d == d => h,
                _ => slot.insert(Head::new(n, d)),
            };
            let (img, h) = (task / heads, task % heads);
            let bias = bias.map(|b| &b[h * n * n..(h + 1) * n * n]);
            let dst = (out_addr as *mut f32).wrapping_add(img * n * heads * d + h * d);
            // SAFETY: the products were asserted allowed above (AVX512-BF16
            // at least); head h's columns of image img belong to this task.
            unsafe {
                head(
                    products,
                    buf,
                    &qkv[img * n * 3 * heads * d..][..n * 3 * heads * d],
                    h,
                    heads,
                    scale,
                    bias,
                    dst,
                )
            };
        })
    });
}

/// One head `h` of one image whose qkv rows are `rows` (N × 3C); the output
/// rows (stride C) start at `dst`.
///
/// # Safety
/// `products` are allowed (so the ISA level has AVX-512, its BF16 and FMA);
/// `dst` is valid for N rows of stride C from column h·d, written by no
/// other thread.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma")]
unsafe fn head(
    products: Products,
    buf: &mut Head,
    rows: &[f32],
    h: usize,
    heads: usize,
    scale: f32,
    bias: Option<&[f32]>,
    dst: *mut f32,
) {
    let (n, d) = (buf.n, buf.d);
    let c = heads * d;
    let row = |t: usize, part: usize| &rows[t * 3 * c + part * c + h * d..][..d];
    let (tp, dp) = (buf.tokens, buf.dim);
    let (dim_kblocks, token_kblocks) = (dp / BLOCK, tp / BLOCK);
    for t in 0..n {
        // SAFETY (and for the conversions below): this function's contract.
        unsafe { to_bf16(row(t, 0), scale, &mut buf.q[t * dp..t * dp + d]) };
    }
    for g in 0..n.div_ceil(16) {
        for (i, key) in buf.keys.chunks_exact_mut(dp).enumerate() {
            match g * 16 + i {
                t if t < n => unsafe { to_bf16(row(t, 1), 1.0, &mut key[..d]) },
                _ => key.fill(0),
            }
        }
        pack_key_group(&buf.keys, dp, g, &mut buf.k);
    }
    for r2 in 0..n.div_ceil(2) {
        let hi = (2 * r2 + 1 < n).then(|| row(2 * r2 + 1, 2));
        unsafe { pack_v_pair(row(2 * r2, 2), hi, r2, token_kblocks, &mut buf.v) };
    }
    let mut tmp = [0f32; BLOCK * BLOCK];
    for mb in 0..token_kblocks {
        let rows = BLOCK.min(n - mb * BLOCK);
        for panel in 0..token_kblocks {
            // SAFETY: the products are allowed; q has 32 rows of dim/32 k
            // blocks from row mb·32, the k panel dim/32 k blocks, and the
            // scores 32 rows of ≥ 32 columns there.
            unsafe {
                products.block(
                    buf.q[mb * BLOCK * dp..].as_ptr(),
                    dp * 2,
                    buf.k[panel * dim_kblocks * PANEL_KBLOCK_PAIRS..].as_ptr(),
                    dim_kblocks,
                    rows,
                    buf.scores[mb * BLOCK * tp + panel * BLOCK..].as_mut_ptr(),
                    tp,
                    &mut tmp,
                );
            }
        }
    }
    for i in 0..n {
        // SAFETY: this function's contract.
        buf.inv_sum[i] = unsafe {
            exp_to_bf16(
                &mut buf.scores[i * tp..i * tp + n],
                bias.map(|b| &b[i * n..(i + 1) * n]),
                &mut buf.p[i * tp..],
            )
        };
    }
    for mb in 0..token_kblocks {
        let rows = BLOCK.min(n - mb * BLOCK);
        for panel in 0..dim_kblocks {
            // SAFETY: as above: p has 32 rows of tokens/32 k blocks from row
            // mb·32, the v panel tokens/32 k blocks, the block buffer is 32×32.
            unsafe {
                products.block(
                    buf.p[mb * BLOCK * tp..].as_ptr(),
                    tp * 2,
                    buf.v[panel * token_kblocks * PANEL_KBLOCK_PAIRS..].as_ptr(),
                    token_kblocks,
                    rows,
                    buf.block.as_mut_ptr(),
                    BLOCK,
                    &mut tmp,
                );
            }
            let cols = (d - panel * BLOCK).min(BLOCK);
            for r in 0..BLOCK.min(n.saturating_sub(mb * BLOCK)) {
                let t = mb * BLOCK + r;
                let inv = buf.inv_sum[t];
                // SAFETY: token t < n, columns h·d + panel·32.. of head h:
                // inside the output, and no other task writes them.
                let out =
                    unsafe { std::slice::from_raw_parts_mut(dst.add(t * c + panel * BLOCK), cols) };
                for (o, &v) in out.iter_mut().zip(&buf.block[r * BLOCK..]) {
                    *o = v * inv;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::math::bf16_to_f32;
    use crate::kernels::test_data as data;

    fn bf16(x: f64) -> f64 {
        bf16_to_f32(bf16_bits(x as f32)) as f64
    }

    /// Attention in f64 on the operands rounded as the tiles see them:
    /// bf16 `q·scale`, `k`, `v` and exponentials (normalised after P·V).
    fn rounded_reference(
        qkv: &[f32],
        (b, n, h, d): (usize, usize, usize, usize),
        scale: f32,
        bias: &[f32],
    ) -> Vec<f64> {
        let c = h * d;
        let at = |img: usize, t: usize, part: usize, head: usize, i: usize| {
            qkv[(img * n + t) * 3 * c + part * c + head * d + i]
        };
        let mut out = vec![0f64; b * n * c];
        for img in 0..b {
            for head in 0..h {
                for i in 0..n {
                    let s: Vec<f64> = (0..n)
                        .map(|j| {
                            let dot: f64 = (0..d)
                                .map(|e| {
                                    bf16((at(img, i, 0, head, e) * scale) as f64)
                                        * bf16(at(img, j, 1, head, e) as f64)
                                })
                                .sum();
                            dot + bias[(head * n + i) * n + j] as f64
                        })
                        .collect();
                    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = s.iter().map(|v| (v - max).exp()).sum();
                    for e in 0..d {
                        out[(img * n + i) * c + head * d + e] = (0..n)
                            .map(|j| {
                                bf16((s[j] - max).exp()) * bf16(at(img, j, 2, head, e) as f64) / sum
                            })
                            .sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn bf16_blocks_match_the_rounded_reference_and_fp32() {
        let products: Vec<Products> = [Products::Amx, Products::Dot]
            .into_iter()
            .filter(|p| p.allowed())
            .collect();
        if products.is_empty() {
            eprintln!("skipped: this CPU or the ISA cap has neither AMX nor AVX512-BF16");
        }
        for products in products {
            // Head sizes of the models (64, 32) and one that is not a multiple
            // of 32; token counts with partial 32-blocks, odd and even.
            for (b, n, h, d) in [
                (2, 50, 2, 32),
                (1, 197, 2, 64),
                (2, 29, 3, 48),
                (1, 33, 1, 64),
            ] {
                let c = h * d;
                // Scores of a few units, as in trained models, so that the
                // softmax is not flat.
                let qkv: Vec<f32> = data(b * n * 3 * c, 21).iter().map(|v| 2.0 * v).collect();
                let bias = data(h * n * n, 22);
                let scale = (d as f32).powf(-0.5);
                let dims = AttentionDims {
                    batch: b,
                    tokens: n,
                    heads: h,
                    head_dim: d,
                };
                let mut tiles = vec![f32::NAN; b * n * c];
                attention(products, &qkv, dims, scale, Some(&bias), &mut tiles);
                let mut fp32 = vec![f32::NAN; b * n * c];
                super::super::attention(&qkv, dims, scale, Some(&bias), false, &mut fp32);
                let reference = rounded_reference(&qkv, (b, n, h, d), scale, &bias);
                let (mut worst_ref, mut worst_f32) = (0f64, 0f64);
                for ((&t, &f), &r) in tiles.iter().zip(&fp32).zip(&reference) {
                    worst_ref = worst_ref.max((t as f64 - r).abs());
                    worst_f32 = worst_f32.max((t - f).abs() as f64);
                }
                // Against the rounded operands only the f32 sums (and a rare
                // probability rounded the other way) differ; against fp32 the
                // bf16 rounding of every operand shows.
                assert!(
                    worst_ref < 2e-3,
                    "{products:?} {b}x{n}x{h}x{d}: {worst_ref} from the rounded reference"
                );
                assert!(
                    worst_f32 < 5e-2,
                    "{products:?} {b}x{n}x{h}x{d}: {worst_f32} from fp32"
                );
                assert!(
                    worst_f32 > 1e-5,
                    "{products:?} {b}x{n}x{h}x{d}: no bf16 rounding seen"
                );
            }
        }
    }
}
