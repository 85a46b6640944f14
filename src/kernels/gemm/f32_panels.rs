//! fp32 linear layers on weights packed once at load (`Beit::set_precision`)
//! into column panels `[panel][k][32]`, activations repacked per call into
//! micro-panels of 12 (or 8, or 4) rows, and the reduction run in slices that
//! keep a slice of the panel in L1 while every micro-panel of a 128-row chunk
//! passes over it. Each finished 32×32 block goes through the same epilogue
//! as the AMX kernels.
//!
//! This file owns the layout, the blocking and the threads; the register
//! blocks are one per ISA level: `f32_avx512.rs` (12 rows × 2 zmm) and
//! `f32_avx2.rs` (6 rows × 2 ymm, each panel as two 16-column halves).

use super::blocks::{MB, NB, TaskGrid, finish_row, micro_panels};
use super::{Epilogue, check_sizes};
use crate::kernels::scratch;
use rayon::prelude::*;

/// Reduction slice: 128 × 32 panel values (16 KiB) stay in L1.
const KC: usize = 128;

/// The ISA level whose register block runs the panel kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Avx512,
    Avx2,
}

impl Level {
    /// The best level that the CPU has and the ISA cap allows; None below AVX2.
    fn active() -> Option<Level> {
        if !cfg!(target_arch = "x86_64") {
            None
        } else if crate::kernels::has_avx512() {
            Some(Level::Avx512)
        } else if crate::kernels::has_avx2() {
            Some(Level::Avx2)
        } else {
            None
        }
    }

    /// Whether the CPU has this level's features, whatever the ISA cap.
    fn on_this_cpu(self) -> bool {
        use crate::kernels::isa::{Isa, detected};
        let needs = match self {
            Level::Avx512 => Isa::Avx512,
            Level::Avx2 => Isa::Avx2,
        };
        cfg!(target_arch = "x86_64") && detected() >= needs
    }

    /// [`chunk`] compiled for this level.
    ///
    /// # Safety
    /// As [`chunk`]; the CPU has the level's features ([`Level::active`]).
    unsafe fn chunk(
        self,
        a: &[f32],
        k: usize,
        rows: usize,
        mblocks: std::ops::Range<usize>,
        b: &[f32],
        tiles: &mut [[f32; MB * NB]],
    ) {
        // SAFETY: the caller's contract.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match self {
                Level::Avx512 => super::f32_avx512::chunk(a, k, rows, mblocks, b, tiles),
                Level::Avx2 => super::f32_avx2::chunk(a, k, rows, mblocks, b, tiles),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "no fp32 panel level is active off x86-64: {self:?} {a:p} {k} {rows} {mblocks:?} {b:p} {tiles:p}"
        )
    }
}

/// Whether the panel kernel can run here (AVX2 + FMA allowed, or AVX-512).
pub fn available() -> bool {
    Level::active().is_some()
}

/// A `(out, in)` fp32 weight in column panels of 32 outputs.
#[derive(Debug, Clone)]
pub struct PackedF32 {
    out_dim: usize,
    in_dim: usize,
    data: Vec<f32>,
}

impl PackedF32 {
    pub fn pack(w: &[f32], out_dim: usize, in_dim: usize) -> Self {
        assert_eq!(w.len(), out_dim * in_dim, "weight has the wrong size");
        let panels = out_dim.div_ceil(NB);
        let mut data = vec![0f32; panels * in_dim * NB];
        data.par_chunks_mut(in_dim * NB)
            .enumerate()
            .for_each(|(p, panel)| {
                for col in 0..NB.min(out_dim - p * NB) {
                    let row = &w[(p * NB + col) * in_dim..(p * NB + col + 1) * in_dim];
                    for (k, &v) in row.iter().enumerate() {
                        panel[k * NB + col] = v;
                    }
                }
            });
        Self {
            out_dim,
            in_dim,
            data,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// `out ← epilogue(x·Wᵀ + b)`. Needs AVX2 + FMA at least ([`available`]).
    pub fn matmul(
        &self,
        x: &[f32],
        rows: usize,
        bias: Option<&[f32]>,
        epilogue: Epilogue,
        out: &mut [f32],
    ) {
        let level = Level::active().expect("the fp32 panel kernel needs AVX2 + FMA");
        self.matmul_at(level, x, rows, bias, epilogue, out)
    }

    /// [`PackedF32::matmul`] with the register blocks of `level`.
    ///
    /// # Panics
    /// When the CPU lacks the level's features.
    fn matmul_at(
        &self,
        level: Level,
        x: &[f32],
        rows: usize,
        bias: Option<&[f32]>,
        epilogue: Epilogue,
        out: &mut [f32],
    ) {
        assert!(
            level.on_this_cpu(),
            "this CPU cannot run the {level:?} panel kernel"
        );
        let k = self.in_dim;
        check_sizes(x, rows, (self.out_dim, k), bias, epilogue, out);
        if rows == 0 || self.out_dim == 0 {
            return;
        }
        let mblocks = rows.div_ceil(MB);
        let mut panels_a = scratch::take::<f32>(mblocks * MB * k);
        panels_a
            .par_chunks_mut(MB * k)
            .enumerate()
            .for_each(|(mb, dst)| {
                let src = &x[mb * MB * k..((mb + 1) * MB).min(rows) * k];
                pack_block(dst, src, k)
            });
        let out_addr = out.as_mut_ptr() as usize;
        let a: &[f32] = &panels_a;
        TaskGrid::for_each_panel(rows, self.out_dim, |mrange, p, tiles| {
            let b = &self.data[p * k * NB..(p + 1) * k * NB];
            // SAFETY: the CPU has the level (asserted above); slices sized by construction.
            unsafe { level.chunk(a, k, rows, mrange.clone(), b, tiles) };
            let n0 = p * NB;
            let ncols = NB.min(self.out_dim - n0);
            let bias = bias.map(|b| &b[n0..n0 + ncols]);
            let epi = epilogue.columns(n0..n0 + ncols);
            for (mb, tile) in mrange.zip(tiles.iter()) {
                for r in 0..MB.min(rows - mb * MB) {
                    let m = mb * MB + r;
                    // SAFETY: tasks own disjoint (row block, panel) rectangles of `out`.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            (out_addr as *mut f32).add(m * self.out_dim + n0),
                            ncols,
                        )
                    };
                    finish_row(dst, &tile[r * NB..(r + 1) * NB], 1.0, None, bias, epi);
                }
            }
        });
    }
}

/// Transposes up to 32 rows × k into the zero-padded micro-panels of
/// [`micro_panels`].
fn pack_block(dst: &mut [f32], src: &[f32], k: usize) {
    let rows = src.len() / k;
    for (r0, mr) in micro_panels(rows) {
        let panel = &mut dst[r0 * k..(r0 + mr) * k];
        let real = mr.min(rows - r0);
        let src = &src[r0 * k..(r0 + real) * k];
        match mr {
            12 => pack_micro_panel::<12>(panel, src, k),
            8 => pack_micro_panel::<8>(panel, src, k),
            _ => pack_micro_panel::<4>(panel, src, k),
        }
    }
}

/// One micro-panel: `panel[kk·MR + r] = src[r][kk]`, zero past the real
/// rows. The panel is written in order, a k step (MR values) at a time,
/// while the rows are read as MR sequential streams.
#[inline(always)]
fn pack_micro_panel<const MR: usize>(panel: &mut [f32], src: &[f32], k: usize) {
    let real = src.len() / k;
    let rows: [&[f32]; MR] = std::array::from_fn(|r| {
        if r < real {
            &src[r * k..(r + 1) * k]
        } else {
            &[]
        }
    });
    for (kk, step) in panel.chunks_exact_mut(MR).enumerate() {
        let step: &mut [f32; MR] = step.try_into().expect("MR values a k step");
        for r in 0..MR {
            step[r] = rows[r].get(kk).copied().unwrap_or(0.0);
        }
    }
}

/// The vector operations of one level's register block (`__m512`,
/// `__m256`): `WIDTH` f32 lanes.
pub(super) trait Lanes: Copy {
    const WIDTH: usize;
    /// # Safety
    /// The caller runs with the level's target features (all five).
    unsafe fn zero() -> Self;
    /// # Safety
    /// `p` holds `WIDTH` readable f32.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// As [`Lanes::zero`].
    unsafe fn splat(v: f32) -> Self;
    /// `a·b + acc`, fused.
    ///
    /// # Safety
    /// As [`Lanes::zero`].
    unsafe fn fma(a: Self, b: Self, acc: Self) -> Self;
    /// # Safety
    /// `p` holds `WIDTH` writable f32.
    unsafe fn store(self, p: *mut f32);
}

/// The register block of every level: `c[r][..2W] (+)= Σ_k a[k·lda + r] ·
/// b[k·32..][..2W]` for `R` rows, two vectors of accumulators a row, each k
/// step loading two weight vectors and broadcasting one activation per row.
///
/// # Safety
/// k × lda values at `a` (R ≤ lda), k rows of 32 at `b` and R rows of 32
/// at `c` (2·WIDTH ≤ 32 of each read or written); the caller runs with
/// `V`'s target features.
#[inline(always)]
pub(super) unsafe fn rows<V: Lanes, const R: usize>(
    a: *const f32,
    lda: usize,
    k: usize,
    b: *const f32,
    c: *mut f32,
    add: bool,
) {
    let w = V::WIDTH;
    // SAFETY: see the function's contract.
    unsafe {
        let mut acc = [[V::zero(); 2]; R];
        if add {
            for (r, acc) in acc.iter_mut().enumerate() {
                acc[0] = V::load(c.add(r * NB));
                acc[1] = V::load(c.add(r * NB + w));
            }
        }
        for kk in 0..k {
            let b0 = V::load(b.add(kk * NB));
            let b1 = V::load(b.add(kk * NB + w));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = V::splat(*a.add(kk * lda + r));
                acc[0] = V::fma(av, b0, acc[0]);
                acc[1] = V::fma(av, b1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            acc[0].store(c.add(r * NB));
            acc[1].store(c.add(r * NB + w));
        }
    }
}

/// One ISA level's register blocks over a micro-panel.
pub(super) trait FmaRows {
    /// `c[r][..] (+)= Σ_k a[k·mr + r] · b[k][..]` for the `mr` ∈ {12, 8, 4}
    /// rows of a micro-panel and the 32 columns of a panel slice; `add`
    /// accumulates onto `c` instead of overwriting it.
    ///
    /// # Safety
    /// `a` holds k × mr values, `b` k × 32, `c` mr × 32 writable values;
    /// the caller runs with the level's target features.
    unsafe fn micro_panel(
        a: *const f32,
        mr: usize,
        k: usize,
        b: *const f32,
        c: *mut f32,
        add: bool,
    );
}

/// The reduction over `b` (one panel, k × 32) for the row blocks `mblocks`
/// of the packed activations `a`, into `tiles`, in slices of [`KC`].
/// Inlined into each level's `#[target_feature]` entry point.
///
/// # Safety
/// `a` holds the packed micro-panels of `rows` rows × k, `b` one panel of
/// k × 32, `tiles` one tile per row block; the caller runs with `F`'s
/// target features.
#[inline(always)]
pub(super) unsafe fn chunk<F: FmaRows>(
    a: &[f32],
    k: usize,
    rows: usize,
    mblocks: std::ops::Range<usize>,
    b: &[f32],
    tiles: &mut [[f32; MB * NB]],
) {
    let passes: usize = mblocks
        .clone()
        .map(|mb| micro_panels(MB.min(rows - mb * MB)).count())
        .sum();
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        // The weights that come next (the following slice, or the next
        // panel's first one: panels are contiguous) are fetched into L2
        // while this slice is in use, a share before each pass: the panels
        // stream from memory once per chunk, and without this the first
        // pass over each slice waits on them.
        let next = b.as_ptr().wrapping_add((k0 + kc) * NB);
        let lines = KC * NB * 4 / 64;
        let mut pass = 0;
        for (mb, tile) in mblocks.clone().zip(tiles.iter_mut()) {
            let block = &a[mb * MB * k..(mb + 1) * MB * k];
            for (r0, mr) in micro_panels(MB.min(rows - mb * MB)) {
                for line in lines * pass / passes..lines * (pass + 1) / passes {
                    prefetch_l2(next.wrapping_add(line * 16));
                }
                pass += 1;
                let ap = block[r0 * k + k0 * mr..].as_ptr();
                let c = tile[r0 * NB..].as_mut_ptr();
                let bp = b[k0 * NB..].as_ptr();
                // SAFETY: the micro-panel holds k × mr values from k0, the
                // panel (k − k0) × 32, the tile mr × 32 from row r0.
                unsafe { F::micro_panel(ap, mr, kc, bp, c, k0 > 0) }
            }
        }
    }
}

/// A hint to bring the cache line at `p` into L2 (nothing where there is no
/// such instruction). Never faults, whatever `p` is.
#[inline(always)]
fn prefetch_l2(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint (SSE, in the x86-64 baseline) and never faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::math::gelu;

    use crate::kernels::test_data as data;

    /// The levels this CPU has, whatever the cap (the test calls each directly).
    fn levels_here() -> Vec<Level> {
        [Level::Avx2, Level::Avx512]
            .into_iter()
            .filter(|l| l.on_this_cpu())
            .collect()
    }

    #[test]
    fn packed_f32_matmul_matches_f64_with_every_epilogue_at_every_level() {
        // 35 rows: a 3-row tail block (one 4-row micro-panel); 150: 8-row
        // micro-panels; k = 130 and 300: partial reduction slices.
        for level in levels_here() {
            for (rows, n, k) in [(5, 20, 40), (35, 40, 130), (150, 96, 300)] {
                let (x, w, bias, gamma, resid) = (
                    data(rows * k, 1),
                    data(n * k, 2),
                    data(n, 3),
                    data(n, 4),
                    data(rows * n, 5),
                );
                let packed = PackedF32::pack(&w, n, k);
                let lin: Vec<f64> = (0..rows * n)
                    .map(|i| {
                        let (m, j) = (i / n, i % n);
                        (0..k)
                            .map(|t| x[m * k + t] as f64 * w[j * k + t] as f64)
                            .sum::<f64>()
                            + bias[j] as f64
                    })
                    .collect();
                let epilogues = [
                    Epilogue::Store,
                    Epilogue::Gelu,
                    Epilogue::Residual {
                        gamma: Some(&gamma),
                    },
                ];
                for epilogue in epilogues {
                    let mut out = resid.clone();
                    packed.matmul_at(level, &x, rows, Some(&bias), epilogue, &mut out);
                    for (i, &got) in out.iter().enumerate() {
                        let want = match epilogue {
                            Epilogue::Store => lin[i],
                            Epilogue::Gelu => gelu(lin[i] as f32) as f64,
                            Epilogue::Residual { .. } => {
                                resid[i] as f64 + gamma[i % n] as f64 * lin[i]
                            }
                        };
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{level:?} {rows}x{n}x{k} {epilogue:?} [{i}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_rows_beside_it() {
        // Resumed batch jobs regroup images into other batches: every row
        // must come out with the same bits whatever the batch holds.
        let (rows, n, k) = (70, 40, 300);
        let (x, w, bias) = (data(rows * k, 6), data(n * k, 7), data(n, 8));
        let packed = PackedF32::pack(&w, n, k);
        for level in levels_here() {
            let mut all = vec![0f32; rows * n];
            packed.matmul_at(level, &x, rows, Some(&bias), Epilogue::Gelu, &mut all);
            for (r0, r1) in [(0, 1), (0, 5), (5, 38), (38, 70), (69, 70)] {
                let mut part = vec![0f32; (r1 - r0) * n];
                let xs = &x[r0 * k..r1 * k];
                packed.matmul_at(level, xs, r1 - r0, Some(&bias), Epilogue::Gelu, &mut part);
                let same = part
                    .iter()
                    .zip(&all[r0 * n..r1 * n])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{level:?}: rows {r0}..{r1} alone differ from the batch of {rows}"
                );
            }
        }
    }
}
