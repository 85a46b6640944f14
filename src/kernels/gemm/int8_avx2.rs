//! int8 blocks of the packed linear layers on AVX2 (Haswell, AMD Zen 1–3 and
//! later), for CPUs with neither AMX nor AVX512-VNNI.
//!
//! `vpmaddubsw` multiplies unsigned by signed bytes and sums adjacent pairs
//! into i16 *with saturation*; `vpmaddwd` against ones then sums those pairs
//! into i32. For the i16 sums never to saturate, this kernel's activations are
//! quantised to 7 bits, `q ∈ [−63, 63]` per token, and stored as `q + 64`
//! (`1..=127`): a pair is at most `2 · 127 · 127 = 32,258 < 32,767`. The
//! weights keep their 8 bits and the panel layout of every other level. The
//! shift comes back out through the weight's column sums, exactly:
//! `Σ (q + 64)·w − 64·Σ w = Σ q·w`.
//!
//! One group of a panel (16 columns × 4 k) is two ymm registers; a 32×32
//! block is computed as 8 × 2 micro-panels of 4 rows × 16 columns, each
//! holding its 8 accumulators in registers over the whole reduction.

use super::blocks::{AVX2_INT8_OFFSET as ACT_OFFSET, MB, NB};
use std::arch::x86_64::*;

/// Rows per micro-panel.
const MR: usize = 4;
/// Bytes of one k block of a panel (two tiles of 16 groups × 64 bytes).
const KBLOCK_BYTES: usize = 2048;

/// `MR` rows × 16 columns (tile `t` of the panel): `c[r][..] = Σ_k a·w − comp`.
///
/// SAFETY: `a` holds `MR` rows of `kblocks × 64` bytes at `stride`, `b` a
/// panel of `kblocks` k blocks, `c` `MR` rows of 16 writable f32 at `NB`
/// apart; the caller's target features include AVX2.
#[inline(always)]
unsafe fn micro_panel(
    a: *const u8,
    stride: usize,
    b: *const u8,
    kblocks: usize,
    comp: [__m256i; 2],
    c: *mut f32,
) {
    // SAFETY: see the function's contract.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 2]; MR];
        for kb in 0..kblocks {
            let bk = b.add(kb * KBLOCK_BYTES);
            let ak = a.add(kb * 64);
            for g in 0..16 {
                let b0 = _mm256_loadu_si256(bk.add(g * 64) as *const __m256i);
                let b1 = _mm256_loadu_si256(bk.add(g * 64 + 32) as *const __m256i);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let word = (ak.add(r * stride + 4 * g) as *const i32).read_unaligned();
                    let av = _mm256_set1_epi32(word);
                    let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones);
                    let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones);
                    acc[0] = _mm256_add_epi32(acc[0], p0);
                    acc[1] = _mm256_add_epi32(acc[1], p1);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let v0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[0], comp[0]));
            let v1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[1], comp[1]));
            _mm256_storeu_ps(c.add(r * NB), v0);
            _mm256_storeu_ps(c.add(r * NB + 8), v1);
        }
    }
}

/// A 32×32 int8 block: `tile = Σ q·w` as f32 (exact integers), from
/// activations stored as `q + 64` (`q ∈ [−63, 63]`) and the panel's 32 column
/// sums, for the block's first `rows` rows (rounded up to 4; the tile's
/// other rows are left as they were).
///
/// # Safety
/// The CPU has AVX2; `a` holds 32 rows of `kblocks × 64` bytes at `stride`;
/// `b` is a panel of `kblocks` k blocks.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn block(
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
        let sums = col_sums.as_ptr() as *const __m256i;
        let comp = |i: usize| {
            _mm256_mullo_epi32(
                _mm256_loadu_si256(sums.add(i)),
                _mm256_set1_epi32(ACT_OFFSET),
            )
        };
        for t in 0..2 {
            // Tile t: columns 16t..16t+16, the panel's bytes from 1024·t in
            // each k block.
            let comp = [comp(2 * t), comp(2 * t + 1)];
            for r0 in (0..rows.min(MB)).step_by(MR) {
                let c = tile[r0 * NB + 16 * t..].as_mut_ptr();
                micro_panel(
                    a.add(r0 * stride),
                    stride,
                    b.add(1024 * t),
                    kblocks,
                    comp,
                    c,
                );
            }
        }
    }
}
