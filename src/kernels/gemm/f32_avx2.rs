//! The AVX2 + FMA register block of the fp32 panel kernel (`f32_panels.rs`).
//! Sixteen ymm registers hold 6 rows × 16 columns of accumulators (12), two
//! weight vectors and a broadcast, so each 32-column panel slice is taken
//! as two 16-column halves, and a micro-panel of 12 (8) rows as two groups
//! of 6 (4): per k step, 2 weight loads and 6 broadcasts feed 12 FMAs. The
//! activations keep the micro-panel layout of the AVX-512 level.

use super::blocks::{MB, NB};
use super::f32_panels::{FmaRows, chunk as generic_chunk};
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
                        rows::<6>(a, 12, k, b, c, add);
                        rows::<6>(a.add(6), 12, k, b, c.add(6 * NB), add);
                    }
                    8 => {
                        rows::<4>(a, 8, k, b, c, add);
                        rows::<4>(a.add(4), 8, k, b, c.add(4 * NB), add);
                    }
                    _ => rows::<4>(a, 4, k, b, c, add),
                }
            }
        }
    }
}

/// `c[r][..16] (+)= Σ_k a[k·lda + r] · b[k·32..][..16]` for `R` rows.
///
/// SAFETY: k × lda values at `a` (R ≤ lda), k rows of 32 at `b` (16 read),
/// R rows of 32 at `c` (16 written); the caller has AVX2 and FMA.
#[inline(always)]
unsafe fn rows<const R: usize>(
    a: *const f32,
    lda: usize,
    k: usize,
    b: *const f32,
    c: *mut f32,
    add: bool,
) {
    // SAFETY: see the function's contract.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        if add {
            for (r, acc) in acc.iter_mut().enumerate() {
                acc[0] = _mm256_loadu_ps(c.add(r * NB));
                acc[1] = _mm256_loadu_ps(c.add(r * NB + 8));
            }
        }
        for kk in 0..k {
            let b0 = _mm256_loadu_ps(b.add(kk * NB));
            let b1 = _mm256_loadu_ps(b.add(kk * NB + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*a.add(kk * lda + r));
                acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * NB), acc[0]);
            _mm256_storeu_ps(c.add(r * NB + 8), acc[1]);
        }
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
