//! The AVX-512 register block of the fp32 panel kernel (`f32_panels.rs`):
//! up to 12 rows × 2 zmm of accumulators, each k step loading the panel's
//! 32 values once and broadcasting one activation per row.

use super::blocks::{MB, NB};
use super::f32_panels::{FmaRows, Lanes, chunk as generic_chunk, rows};
use std::arch::x86_64::*;

struct Avx512;

impl FmaRows for Avx512 {
    #[inline(always)]
    unsafe fn micro_panel(
        a: *const f32,
        mr: usize,
        k: usize,
        b: *const f32,
        c: *mut f32,
        add: bool,
    ) {
        // SAFETY: the trait's contract; `rows` reads mr values a k step.
        unsafe {
            match mr {
                12 => rows::<__m512, 12>(a, 12, k, b, c, add),
                8 => rows::<__m512, 8>(a, 8, k, b, c, add),
                _ => rows::<__m512, 4>(a, 4, k, b, c, add),
            }
        }
    }
}

// SAFETY (every method): `rows` calls them only inside the `chunk` below,
// compiled for AVX-512F, on pointers its contract covers.
impl Lanes for __m512 {
    const WIDTH: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        unsafe { _mm512_set1_ps(v) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, acc: Self) -> Self {
        unsafe { _mm512_fmadd_ps(a, b, acc) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { _mm512_storeu_ps(p, self) }
    }
}

/// The panel kernel's reduction compiled for AVX-512.
///
/// # Safety
/// The CPU has AVX-512F; otherwise as `f32_panels::chunk`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn chunk(
    a: &[f32],
    k: usize,
    rows: usize,
    mblocks: std::ops::Range<usize>,
    b: &[f32],
    tiles: &mut [[f32; MB * NB]],
) {
    // SAFETY: the caller's contract.
    unsafe { generic_chunk::<Avx512>(a, k, rows, mblocks, b, tiles) }
}
