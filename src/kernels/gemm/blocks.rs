//! The blocking shared by the packed kernels: 32×32 output blocks, parallel
//! tasks over chunks of row blocks × groups of column panels, and the
//! per-row epilogue applied to each finished block while it is in cache.

use super::Epilogue;
use crate::kernels::math::gelu;

/// Output columns per packed panel (two 16-column tiles).
pub const NB: usize = 32;
/// Activation rows per block (two 16-row tiles).
pub const MB: usize = 32;
/// Row blocks that share one pass over the weight panels: their activations
/// (≤ 128 rows × in) stay in L2 while the panels stream past.
pub const CHUNK_MBLOCKS: usize = 4;
/// Rows of a micro-panel in the AVX-512 register blocks (fp32 panels and
/// the dot-product kernels): 12 × 2 accumulators, 2 weight vectors and a
/// broadcast.
pub const MICRO_ROWS: usize = 12;

/// The row micro-panels (first row, rows) of a block holding `rows` ≤ 32
/// real rows: 12, 12 and 8 for a full block; a partial one (the last block
/// of a batch, 5 rows at batch 1) stops at its last row, rounded up to 4,
/// instead of multiplying zero rows.
pub fn micro_panels(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows)
        .step_by(MICRO_ROWS)
        .map(move |r0| (r0, (rows - r0).min(MICRO_ROWS).next_multiple_of(4)))
}

/// What the AVX2 int8 kernel's 7-bit activations are stored as: `q + 64`
/// (`int8_avx2.rs`; here so that the layout code builds on every target).
pub const AVX2_INT8_OFFSET: i32 = 64;

/// Splits an `rows × out` product into parallel tasks: chunks of
/// [`CHUNK_MBLOCKS`] 32-row blocks (whose activations stay in L2 while the
/// weight panels stream past) times groups of 32-column panels, enough
/// tasks to keep every thread busy when there are few rows.
pub struct TaskGrid {
    mblocks: usize,
    mchunks: usize,
    panels: usize,
    per_group: usize,
    tasks: usize,
}

impl TaskGrid {
    fn new(rows: usize, out_dim: usize) -> Self {
        let mblocks = rows.div_ceil(MB);
        let mchunks = mblocks.div_ceil(CHUNK_MBLOCKS);
        let panels = out_dim.div_ceil(NB);
        let groups = (4 * rayon::current_num_threads())
            .div_ceil(mchunks)
            .clamp(1, panels);
        Self {
            mblocks,
            mchunks,
            panels,
            per_group: panels.div_ceil(groups),
            tasks: mchunks * groups,
        }
    }

    /// Runs `panel(row blocks, p, tiles)` for every chunk of row blocks and
    /// every column panel `p` of an `rows × out_dim` product, the tasks in
    /// parallel, each with its own [`CHUNK_MBLOCKS`] tiles (one per row
    /// block of its chunk) that `panel` fills and finishes.
    pub fn for_each_panel<F>(rows: usize, out_dim: usize, panel: F)
    where
        F: Fn(std::ops::Range<usize>, usize, &mut [[f32; MB * NB]]) + Sync,
    {
        use rayon::prelude::*;
        let grid = Self::new(rows, out_dim);
        (0..grid.tasks).into_par_iter().for_each(|task| {
            let (mblocks, panels) = grid.task(task);
            let mut tiles = vec![[0f32; MB * NB]; CHUNK_MBLOCKS];
            for p in panels {
                panel(mblocks.clone(), p, &mut tiles);
            }
        });
    }

    /// Task `i`'s row blocks and column panels. Consecutive tasks share a
    /// panel group, so that when rayon hands each thread a contiguous run
    /// of tasks, each thread streams its own part of the weights instead of
    /// every thread streaming all of them.
    fn task(&self, i: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let (g, mc) = (i / self.mchunks, i % self.mchunks);
        (
            mc * CHUNK_MBLOCKS..((mc + 1) * CHUNK_MBLOCKS).min(self.mblocks),
            g * self.per_group..((g + 1) * self.per_group).min(self.panels),
        )
    }
}

multiversion! {
    /// An int8 tile's exact i32 sums, stored in place of its f32 values, as f32.
    pub fn i32_bits_to_f32(tile: &mut [f32; MB * NB]) {
        for v in tile.iter_mut() {
            *v = v.to_bits() as i32 as f32;
        }
    }
}

multiversion! {
    /// One output row of a block: scale (int8), bias, then the epilogue.
    pub fn finish_row(
        dst: &mut [f32],
        acc: &[f32],
        a_scale: f32,
        w_scales: Option<&[f32]>,
        bias: Option<&[f32]>,
        epilogue: Epilogue
    ) {
        let acc: &[f32; NB] = acc.try_into().expect("a block row is 32 wide");
        match <&mut [f32; NB]>::try_from(&mut *dst) {
            Ok(full) => finish_full_row(full, acc, a_scale, w_scales, bias, epilogue),
            Err(_) => finish_partial_row(dst, acc, a_scale, w_scales, bias, epilogue),
        }
    }
}

/// [`finish_row`] for a row of all 32 columns: fixed-length loops with the
/// missing scales as ones and the missing bias as zeros (exact: `v·1 + 0`
/// is `v`), so the row stays in registers instead of a copy on the stack.
#[inline(always)]
fn finish_full_row(
    dst: &mut [f32; NB],
    acc: &[f32; NB],
    a_scale: f32,
    w_scales: Option<&[f32]>,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
) {
    const ONES: [f32; NB] = [1.0; NB];
    const ZEROS: [f32; NB] = [0.0; NB];
    let full = |s: Option<&[f32]>, default| -> [f32; NB] {
        s.map_or(default, |s| s.try_into().expect("32 per-column values"))
    };
    let (ws, b) = (full(w_scales, ONES), full(bias, ZEROS));
    let a_scale = if w_scales.is_some() { a_scale } else { 1.0 };
    let mut v = [0f32; NB];
    for i in 0..NB {
        v[i] = acc[i] * (a_scale * ws[i]) + b[i];
    }
    match epilogue {
        Epilogue::Store => *dst = v,
        Epilogue::Gelu => {
            for i in 0..NB {
                dst[i] = gelu(v[i]);
            }
        }
        Epilogue::Residual { gamma } => {
            let g = full(gamma, ONES);
            for i in 0..NB {
                dst[i] += g[i] * v[i];
            }
        }
    }
}

/// [`finish_row`] for the last panel's partial row (`dst` under 32 wide).
#[inline(always)]
fn finish_partial_row(
    dst: &mut [f32],
    acc: &[f32; NB],
    a_scale: f32,
    w_scales: Option<&[f32]>,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
) {
    let mut v = *acc;
    if let Some(ws) = w_scales {
        for (v, &w) in v.iter_mut().zip(ws) {
            *v *= a_scale * w;
        }
    }
    if let Some(b) = bias {
        for (v, &b) in v.iter_mut().zip(b) {
            *v += b;
        }
    }
    match epilogue {
        Epilogue::Store => {
            let n = dst.len();
            dst.copy_from_slice(&v[..n])
        }
        Epilogue::Gelu => {
            for (d, &v) in dst.iter_mut().zip(&v) {
                *d = gelu(v);
            }
        }
        Epilogue::Residual { gamma: Some(g) } => {
            for ((d, &v), &g) in dst.iter_mut().zip(&v).zip(g) {
                *d += g * v;
            }
        }
        Epilogue::Residual { gamma: None } => {
            for (d, &v) in dst.iter_mut().zip(&v) {
                *d += v;
            }
        }
    }
}
