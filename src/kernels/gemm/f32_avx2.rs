//! The AVX2 + FMA register block of the fp32 panel kernel (`f32_panels.rs`).
//! Sixteen ymm registers hold 6 rows × 16 columns of accumulators (12), two
//! weight vectors and a broadcast, so each 32-column panel slice is taken
//! as two 16-column halves, and a micro-panel of 12 (8) rows as two groups
//! of 6 (4): per k step, 2 weight loads and 6 broadcasts feed 12 FMAs. The
//! activations keep the micro-panel layout of the AVX-512 level.

use super::blocks::{MB, NB};
use super::f32_panels::{FmaRows, Lanes, chunk as generic_chunk, rows};
use std::arch::x86_64::*;

struct Avx2;

impl FmaRows for Avx2 {
    #[inline(always)]
    unsafe fn micro_panel(
        a: *const f32,
        mr: usize,
        k: usize,
        b: *const f32,
        c: *mut f32,
        add: bool,
    ) {
        // SAFETY: the trait's contract; each call covers rows r0.. of the
        // micro-panel (stride mr a k step) and one 16-column half.
        unsafe {
            for half in [0, 16] {
                let (b, c) = (b.add(half), c.add(half));
                match mr {
                    12 => {
                        rows::<__m256, 6>(a, 12, k, b, c, add);
                        rows::<__m256, 6>(a.add(6), 12, k, b, c.add(6 * NB), add);
                    }
                    8 => {
                        rows::<__m256, 4>(a, 8, k, b, c, add);
                        rows::<__m256, 4>(a.add(4), 8, k, b, c.add(4 * NB), add);
                    }
                    _ => rows::<__m256, 4>(a, 4, k, b, c, add),
                }
            }
        }
    }
}

// SAFETY (every method): `rows` calls them only inside the `chunk` below,
// compiled for AVX2 and FMA, on pointers its contract covers.
impl Lanes for __m256 {
    const WIDTH: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        unsafe { _mm256_set1_ps(v) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, acc: Self) -> Self {
        unsafe { _mm256_fmadd_ps(a, b, acc) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { _mm256_storeu_ps(p, self) }
    }
}

/// The panel kernel's reduction compiled for AVX2 + FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA; otherwise as `f32_panels::chunk`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn chunk(
    a: &[f32],
    k: usize,
    rows: usize,
    mblocks: std::ops::Range<usize>,
    b: &[f32],
    tiles: &mut [[f32; MB * NB]],
) {
    // SAFETY: the caller's contract.
    unsafe { generic_chunk::<Avx2>(a, k, rows, mblocks, b, tiles) }
}
