//! bf16 and int8 blocks of the packed linear layers on CPUs with AVX-512
//! dot-product instructions but no AMX (Ice Lake, Cascade Lake, AMD Zen 4, and
//! Xeons whose hypervisor hides AMX): `vpdpbusd` (AVX512-VNNI: four u8 × s8
//! products summed into each i32 lane) and `vdpbf16ps` (AVX512-BF16: two bf16
//! products summed into each f32 lane).
//!
//! Both read the AMX panel layout unchanged. Per k block a panel holds, for
//! each of its two 16-column tiles, 16 groups of (16 columns × 4 bytes): one
//! group is one zmm of weights, and one activation row meets it as a 4-byte
//! broadcast (four int8 or two bf16 values at the same k offset). A 32×32
//! block is computed as micro-panels of 12, 12 and 8 rows, each keeping its
//! 2 × rows accumulators in registers over the whole reduction.
//!
//! `vpdpbusd` multiplies *unsigned* by signed bytes, while the activations are
//! symmetric int8. They are stored shifted by 128 (`a + 128` as u8), and the
//! shift comes back out through the weight's column sums:
//! `Σ (a + 128)·w − 128·Σ w = Σ a·w`, exactly, so the result equals AMX's
//! `tdpbssd` bit for bit.

use super::blocks::{MB, NB, micro_panels};
use std::arch::x86_64::*;

/// Bytes of one k block of a panel (two tiles of 16 groups × 64 bytes).
const KBLOCK_BYTES: usize = 2048;

/// One dot-product instruction and how its accumulator becomes f32.
trait Dot {
    /// `acc + Σ a·b` over each 4-byte lane.
    unsafe fn dot(acc: __m512i, a: __m512i, b: __m512i) -> __m512i;
    /// The accumulator as f32, less the correction `comp`.
    unsafe fn finish(acc: __m512i, comp: __m512i) -> __m512;
}

struct Vnni;
struct Bf16;

impl Dot for Vnni {
    #[inline(always)]
    unsafe fn dot(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
        // SAFETY: only inlined into functions compiled with AVX512-VNNI.
        unsafe { _mm512_dpbusd_epi32(acc, a, b) }
    }
    #[inline(always)]
    unsafe fn finish(acc: __m512i, comp: __m512i) -> __m512 {
        // SAFETY: as above (AVX-512F).
        unsafe { _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, comp)) }
    }
}

impl Dot for Bf16 {
    #[inline(always)]
    unsafe fn dot(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
        // SAFETY: only inlined into functions compiled with AVX512-BF16; the
        // casts reinterpret 512 bits as 32 bf16 values or 16 f32 lanes.
        unsafe {
            let a = std::mem::transmute::<__m512i, __m512bh>(a);
            let b = std::mem::transmute::<__m512i, __m512bh>(b);
            _mm512_castps_si512(_mm512_dpbf16_ps(_mm512_castsi512_ps(acc), a, b))
        }
    }
    #[inline(always)]
    unsafe fn finish(acc: __m512i, _comp: __m512i) -> __m512 {
        // SAFETY: a reinterpretation (AVX-512F).
        unsafe { _mm512_castsi512_ps(acc) }
    }
}

/// `R` rows × 32 columns: `c[r][..] = finish(Σ_k a[r][k] · b[k][..])`.
///
/// SAFETY: `a` holds `R` rows of `kblocks × 64` bytes at `stride`, `b`
/// `kblocks` k blocks of a panel, `c` `R × 32` writable f32; the caller's
/// target features include `D`'s instruction.
#[inline(always)]
unsafe fn micro_panel<D: Dot, const R: usize>(
    a: *const u8,
    stride: usize,
    b: *const u8,
    kblocks: usize,
    comp: [__m512i; 2],
    c: *mut f32,
) {
    // SAFETY: see the function's contract.
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); 2]; R];
        for kb in 0..kblocks {
            let bk = b.add(kb * KBLOCK_BYTES);
            let ak = a.add(kb * 64);
            for g in 0..16 {
                let b0 = _mm512_loadu_si512(bk.add(g * 64) as *const _);
                let b1 = _mm512_loadu_si512(bk.add(1024 + g * 64) as *const _);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let word = (ak.add(r * stride + 4 * g) as *const i32).read_unaligned();
                    let av = _mm512_set1_epi32(word);
                    acc[0] = D::dot(acc[0], av, b0);
                    acc[1] = D::dot(acc[1], av, b1);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * NB), D::finish(acc[0], comp[0]));
            _mm512_storeu_ps(c.add(r * NB + 16), D::finish(acc[1], comp[1]));
        }
    }
}

/// The micro-panels of a block's first `rows` rows (the tile's other rows
/// are left as they were).
///
/// SAFETY: as [`micro_panel`], for 32 rows.
#[inline(always)]
unsafe fn block<D: Dot>(
    a: *const u8,
    stride: usize,
    b: *const u8,
    kblocks: usize,
    rows: usize,
    comp: [__m512i; 2],
    tile: &mut [f32; MB * NB],
) {
    for (r0, mr) in micro_panels(rows.min(MB)) {
        let c = tile[r0 * NB..].as_mut_ptr();
        // SAFETY: rows r0..r0+mr ≤ 32 of the block, per the contract.
        unsafe {
            let a = a.add(r0 * stride);
            match mr {
                12 => micro_panel::<D, 12>(a, stride, b, kblocks, comp, c),
                8 => micro_panel::<D, 8>(a, stride, b, kblocks, comp, c),
                _ => micro_panel::<D, 4>(a, stride, b, kblocks, comp, c),
            }
        }
    }
}

/// A 32×32 int8 block: `tile = Σ a·w` as f32 (exact integers), from
/// activations stored as `a + 128` (u8) and the panel's 32 column sums, for
/// the block's first `rows` rows (rounded up to 4).
///
/// # Safety
/// The CPU has AVX512-F/BW and AVX512-VNNI; `a` holds 32 rows of
/// `kblocks × 64` bytes at `stride`; `b` is a panel of `kblocks` k blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn block_int8(
    a: *const u8,
    stride: usize,
    b: *const u8,
    kblocks: usize,
    rows: usize,
    col_sums: &[i32; NB],
    tile: &mut [f32; MB * NB],
) {
    // SAFETY: see the function's contract; col_sums holds 32 values.
    unsafe {
        let sums = col_sums.as_ptr() as *const __m512i;
        let comp = [
            _mm512_slli_epi32::<7>(_mm512_loadu_si512(sums)),
            _mm512_slli_epi32::<7>(_mm512_loadu_si512(sums.add(1))),
        ];
        block::<Vnni>(a, stride, b, kblocks, rows, comp, tile)
    }
}

/// A 32×32 bf16 block: `tile = Σ a·w` with f32 accumulation, for the
/// block's first `rows` rows (rounded up to 4).
///
/// # Safety
/// The CPU has AVX512-F/BW and AVX512-BF16; `a` holds 32 rows of
/// `kblocks × 64` bytes (32 bf16 a block) at `stride`; `b` is a panel of
/// `kblocks` k blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn block_bf16(
    a: *const u8,
    stride: usize,
    b: *const u8,
    kblocks: usize,
    rows: usize,
    tile: &mut [f32; MB * NB],
) {
    let zero = _mm512_setzero_si512();
    // SAFETY: see the function's contract.
    unsafe { block::<Bf16>(a, stride, b, kblocks, rows, [zero; 2], tile) }
}
