//! fp32 linear layers for small batches on AVX-512, with weights packed once at load into
//! column panels `[panel][k][32]`, activations repacked per call into
//! micro-panels of 12 (or 8) rows, and the reduction run in slices that keep
//! a slice of the panel in L1 while every micro-panel of a 128-row chunk
//! passes over it. Each finished 32×32 block goes through the same epilogue
//! as the AMX kernels.

use super::blocks::{CHUNK_MBLOCKS, MB, NB, TaskGrid, finish_row};
use super::{Epilogue, check_sizes};
use crate::kernels::scratch;
use rayon::prelude::*;

/// Rows per register block: 12 × 2 accumulators + 2 weight vectors + a broadcast.
const MR: usize = 12;

/// The row micro-panels (first row, rows) of a block holding `rows` ≤ 32
/// real rows: 12, 12 and 8 for a full block; a partial one (the last block
/// of a batch, 5 rows at batch 1) stops at its last row, rounded up to 4,
/// instead of multiplying zero rows.
fn micro_panels(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows)
        .step_by(MR)
        .map(move |r0| (r0, (rows - r0).min(MR).next_multiple_of(4)))
}
/// Reduction slice: 128 × 32 panel values (16 KiB) stay in L1.
const KC: usize = 128;

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

    /// `out ← epilogue(x·Wᵀ + b)`. Needs AVX-512F (see [`crate::kernels::has_avx512`]).
    pub fn matmul(
        &self,
        x: &[f32],
        rows: usize,
        bias: Option<&[f32]>,
        epilogue: Epilogue,
        out: &mut [f32],
    ) {
        let k = self.in_dim;
        check_sizes(x, rows, (self.out_dim, k), bias, epilogue, out);
        assert!(
            crate::kernels::has_avx512(),
            "the fp32 packed kernel needs AVX-512"
        );
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
        let grid = TaskGrid::new(rows, self.out_dim);
        let out_addr = out.as_mut_ptr() as usize;
        let a: &[f32] = &panels_a;
        (0..grid.tasks).into_par_iter().for_each(|task| {
            let (mrange, panel_range) = grid.task(task);
            let mut tiles = vec![[0f32; MB * NB]; CHUNK_MBLOCKS];
            for p in panel_range {
                let b = &self.data[p * k * NB..(p + 1) * k * NB];
                // SAFETY: AVX-512F checked above; slices sized by construction.
                unsafe { chunk(a, k, rows, mrange.clone(), b, &mut tiles) };
                let n0 = p * NB;
                let ncols = NB.min(self.out_dim - n0);
                let bias = bias.map(|b| &b[n0..n0 + ncols]);
                let epi = epilogue.columns(n0..n0 + ncols);
                for (mb, tile) in mrange.clone().zip(&tiles) {
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
        for r in 0..mr {
            if r0 + r < rows {
                let row = &src[(r0 + r) * k..(r0 + r + 1) * k];
                for (kk, &v) in row.iter().enumerate() {
                    panel[kk * mr + r] = v;
                }
            } else {
                for kk in 0..k {
                    panel[kk * mr + r] = 0.0;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chunk(
    a: &[f32],
    k: usize,
    rows: usize,
    mblocks: std::ops::Range<usize>,
    b: &[f32],
    tiles: &mut [[f32; MB * NB]],
) {
    use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
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
                    _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(line * 16).cast());
                }
                pass += 1;
                let ap = block[r0 * k + k0 * mr..].as_ptr();
                let c = tile[r0 * NB..].as_mut_ptr();
                let bp = b[k0 * NB..].as_ptr();
                // SAFETY: the micro-panel holds k × mr values from k0, the
                // panel (k − k0) × 32, the tile mr × 32 from row r0.
                unsafe {
                    match mr {
                        12 => fma_rows::<12>(ap, kc, bp, c, k0 > 0),
                        8 => fma_rows::<8>(ap, kc, bp, c, k0 > 0),
                        _ => fma_rows::<4>(ap, kc, bp, c, k0 > 0),
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn chunk(
    _: &[f32],
    _: usize,
    _: usize,
    _: std::ops::Range<usize>,
    _: &[f32],
    _: &mut [[f32; MB * NB]],
) {
    unreachable!("the fp32 packed kernel is only selected on x86-64 with AVX-512")
}

/// `c[r][..] (+)= Σ_k a[k][r] · b[k][..]` for `R` rows and 32 columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fma_rows<const R: usize>(a: *const f32, k: usize, b: *const f32, c: *mut f32, add: bool) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees k × R values at `a`, k × 32 at `b` and
    // R × 32 writable values at `c`.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::math::gelu;

    use crate::kernels::test_data as data;

    #[test]
    fn packed_f32_matmul_matches_f64_with_every_epilogue() {
        if !crate::kernels::has_avx512() {
            return; // the kernel is never selected without AVX-512
        }
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
                packed.matmul(&x, rows, Some(&bias), epilogue, &mut out);
                for (i, &got) in out.iter().enumerate() {
                    let want = match epilogue {
                        Epilogue::Store => lin[i],
                        Epilogue::Gelu => gelu(lin[i] as f32) as f64,
                        Epilogue::Residual { .. } => resid[i] as f64 + gamma[i % n] as f64 * lin[i],
                    };
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{rows}x{n}x{k} {epilogue:?} [{i}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
