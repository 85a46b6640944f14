//! The AVX-512 register block of the fp32 panel kernel (`f32_panels.rs`):
//! up to 12 rows × 2 zmm of accumulators, each k step loading the panel's
//! 32 values once and broadcasting one activation per row.

use super::blocks::{MB, NB};
use super::f32_panels::{FmaRows, chunk as generic_chunk};
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
                12 => rows::<12>(a, k, b, c, add),
                8 => rows::<8>(a, k, b, c, add),
                _ => rows::<4>(a, k, b, c, add),
            }
        }
    }
}

/// `c[r][..] (+)= Σ_k a[k][r] · b[k][..]` for `R` rows and 32 columns.
///
/// SAFETY: k × R values at `a`, k × 32 at `b`, R × 32 writable at `c`;
/// the caller has AVX-512F.
#[inline(always)]
unsafe fn rows<const R: usize>(a: *const f32, k: usize, b: *const f32, c: *mut f32, add: bool) {
    // SAFETY: see the function's contract.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if add {
            for (r, acc) in acc.iter_mut().enumerate() {
                acc[0] = _mm512_loadu_ps(c.add(r * NB));
                acc[1] = _mm512_loadu_ps(c.add(r * NB + 16));
            }
        }
        for kk in 0..k {
            let b0 = _mm512_loadu_ps(b.add(kk * NB));
            let b1 = _mm512_loadu_ps(b.add(kk * NB + 16));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(kk * R + r));
                acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * NB), acc[0]);
            _mm512_storeu_ps(c.add(r * NB + 16), acc[1]);
        }
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
