//! bf16 and int8 linear layers on weights packed once at load, in AMX B-tile
//! order, with the bias and the next element-wise step (GELU, or the γ-scaled
//! residual add) applied to each finished 32×32 output block while it is
//! still in cache. int8 is symmetric: one scale per weight row (output
//! channel) and one per activation row (token).
//!
//! This file owns the layout, the activations' conversion, and the choice of
//! kernel ([`Kernel`]): AMX tiles (`amx.rs`), AVX-512 dot products
//! (`dot512.rs`), or, elsewhere, the same rounded operands through an fp32
//! GEMM (the same numbers up to fp32 rounding of the sums, at fp32 speed).
//! Plain loops over the layout are the reference the tests compare with.

use super::blocks::{MB, NB, TaskGrid, finish_row};
use super::f32_panels::{self, PackedF32};
use super::{Epilogue, check_sizes};
use crate::kernels::isa::{self, Isa};
use crate::kernels::math::{bf16_bits, bf16_to_f32};
use crate::kernels::scratch::{self, Scratch};
use rayon::prelude::*;

/// Storage precision of a packed weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    Bf16,
    Int8,
}

impl Quant {
    /// Reduction elements per k block (one 64-byte tile row for AMX).
    fn k_block(self) -> usize {
        match self {
            Quant::Bf16 => 32,
            Quant::Int8 => 64,
        }
    }
    /// Reduction elements interleaved per output column.
    fn group(self) -> usize {
        match self {
            Quant::Bf16 => 2,
            Quant::Int8 => 4,
        }
    }
    fn elem_bytes(self) -> usize {
        match self {
            Quant::Bf16 => 2,
            Quant::Int8 => 1,
        }
    }
}

/// A `(out, in)` weight packed into column panels of 32 outputs in AMX
/// B-tile order: `[panel][k_block][tile 0|1][k / group][16 columns][group]`.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    quant: Quant,
    out_dim: usize,
    in_dim: usize,
    /// `in_dim` rounded up to the k block.
    k_pad: usize,
    /// bf16 / i8 values as little-endian bytes.
    data: Vec<u8>,
    /// Per-output-channel scale (Int8 only).
    scales: Vec<f32>,
    /// Per-output-column sum of the int8 weights, whole panels (Int8 only):
    /// the correction for the VNNI kernel's shifted activations.
    col_sums: Vec<i32>,
    /// The packed values as f32 in `(out, in)` order (int8 unscaled), made on
    /// first use by the fp32-GEMM kernel for CPUs without AMX.
    values_f32: std::sync::OnceLock<Vec<f32>>,
    /// bf16 where no bf16 kernel runs but the fp32 panels do (AVX2, and
    /// AVX-512 without a fast `vdpbf16ps`): the rounded values in fp32
    /// panels, made on first use instead of `values_f32`.
    panels_f32: std::sync::OnceLock<PackedF32>,
}

/// Stores one weight row (output column `col` of its panel) in B-tile order
/// for k blocks of `KB` and groups of `G` (constants, so the index arithmetic
/// is shifts): `put(element index, value)`.
fn pack_column<const KB: usize, const G: usize>(
    row: &[f32],
    col: usize,
    mut put: impl FnMut(usize, f32),
) {
    let (t, c) = (col / 16, col % 16);
    for (k, &v) in row.iter().enumerate() {
        let (kblk, kr, e) = (k / KB, (k % KB) / G, k % G);
        put(((kblk * 2 + t) * (KB / G) + kr) * 16 * G + c * G + e, v);
    }
}

multiversion! {
    /// Symmetric scale of a row quantised to `−levels..=levels`: `max|x| / levels`
    /// (1 for an all-zero row). The maximum runs in 16 lanes so that it
    /// vectorises (a maximum does not depend on the order).
    fn int8_scale(row: &[f32], levels: f32) -> f32 {
        let mut lanes = [0f32; 16];
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = l.max(v.abs());
            }
        }
        let m = chunks
            .remainder()
            .iter()
            .chain(&lanes)
            .fold(0f32, |a, &v| a.max(v.abs()));
        if m > 0.0 { m / levels } else { 1.0 }
    }
}

/// Rounds half to even (as onnxruntime's and PyTorch's quantisers do); NaN
/// gives 0. Written so that it vectorises: the value is clamped first, so
/// adding and taking away 1.5·2²³ rounds it in the FPU's default mode, and
/// the cast needs no saturation (`round` was a libm call per value, and a
/// saturating cast a scalar conversion).
#[inline(always)]
fn to_i8(x: f32, inv_scale: f32, levels: f32) -> i8 {
    const ROUND: f32 = 12_582_912.0;
    let v = x * inv_scale;
    let v = if v.is_nan() {
        0.0
    } else {
        v.max(-levels).min(levels)
    };
    let r = (v + ROUND) - ROUND;
    // SAFETY: r is an integer in −levels..=levels (levels ≤ 127).
    unsafe { r.to_int_unchecked::<i32>() as i8 }
}

/// Levels of the weights (and of the activations except on AVX2): full int8.
const LEVELS: f32 = 127.0;

impl PackedWeight {
    /// Index of element (column `col` of the panel, reduction index `k`) in a panel.
    fn panel_index(&self, col: usize, k: usize) -> usize {
        let (kb, g) = (self.quant.k_block(), self.quant.group());
        let (t, c) = (col / 16, col % 16);
        let (kblk, kr, e) = (k / kb, (k % kb) / g, k % g);
        ((kblk * 2 + t) * (kb / g) + kr) * 16 * g + c * g + e
    }

    /// Packs a row-major `(out_dim, in_dim)` f32 weight.
    pub fn pack(w: &[f32], out_dim: usize, in_dim: usize, quant: Quant) -> Self {
        assert_eq!(w.len(), out_dim * in_dim, "weight has the wrong size");
        let kb = quant.k_block();
        let k_pad = in_dim.div_ceil(kb) * kb;
        let panels = out_dim.div_ceil(NB);
        let esize = quant.elem_bytes();
        let scales: Vec<f32> = match quant {
            Quant::Int8 => w
                .par_chunks_exact(in_dim)
                .map(|r| int8_scale(r, LEVELS))
                .collect(),
            Quant::Bf16 => Vec::new(),
        };
        let mut packed = Self {
            quant,
            out_dim,
            in_dim,
            k_pad,
            data: Vec::new(),
            scales,
            col_sums: Vec::new(),
            values_f32: std::sync::OnceLock::new(),
            panels_f32: std::sync::OnceLock::new(),
        };
        let panel_bytes = k_pad * NB * esize;
        let mut data = vec![0u8; panels * panel_bytes];
        data.par_chunks_mut(panel_bytes)
            .enumerate()
            .for_each(|(p, panel)| {
                for col in 0..NB.min(out_dim - p * NB) {
                    let n = p * NB + col;
                    let row = &w[n * in_dim..(n + 1) * in_dim];
                    match quant {
                        Quant::Bf16 => pack_column::<32, 2>(row, col, |i, v| {
                            panel[2 * i..2 * i + 2].copy_from_slice(&bf16_bits(v).to_le_bytes())
                        }),
                        Quant::Int8 => {
                            let inv = 1.0 / packed.scales[n];
                            pack_column::<64, 4>(row, col, |i, v| {
                                panel[i] = to_i8(v, inv, LEVELS) as u8
                            })
                        }
                    }
                }
            });
        packed.data = data;
        if quant == Quant::Int8 {
            packed.col_sums = (0..panels * NB)
                .map(|n| {
                    let (p, col) = (n / NB, n % NB);
                    let panel = packed.panel(p);
                    (0..in_dim)
                        .map(|k| panel[packed.panel_index(col, k)] as i8 as i32)
                        .sum()
                })
                .collect();
        }
        packed
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }
    pub fn quant(&self) -> Quant {
        self.quant
    }
    /// Bytes held by the packed weight.
    pub fn nbytes(&self) -> usize {
        self.data.len() + 4 * (self.scales.len() + self.col_sums.len())
    }

    fn panel(&self, p: usize) -> &[u8] {
        let len = self.k_pad * NB * self.quant.elem_bytes();
        &self.data[p * len..(p + 1) * len]
    }

    /// Element `(col, k)` of panel `p` as the f32 the kernels multiply by
    /// (int8 not yet scaled).
    fn value(&self, p: usize, col: usize, k: usize) -> f32 {
        let panel = self.panel(p);
        let i = self.panel_index(col, k);
        match self.quant {
            Quant::Bf16 => bf16_to_f32(u16::from_le_bytes([panel[i * 2], panel[i * 2 + 1]])),
            Quant::Int8 => panel[i] as i8 as f32,
        }
    }

    /// The weight as the f32 values the kernels multiply by (dequantised).
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = self.values_f32().to_vec();
        for (row, &scale) in w.chunks_mut(self.in_dim).zip(&self.scales) {
            row.iter_mut().for_each(|v| *v *= scale);
        }
        w
    }

    /// `out ← epilogue(x·Wᵀ + b)` for `x` (rows, in) and `out` (rows, out),
    /// both row-major.
    pub fn matmul(
        &self,
        x: &[f32],
        rows: usize,
        bias: Option<&[f32]>,
        epilogue: Epilogue,
        out: &mut [f32],
    ) {
        let dims = (self.out_dim, self.in_dim);
        check_sizes(x, rows, dims, bias, epilogue, out);
        if rows == 0 || self.out_dim == 0 {
            return;
        }
        let kernel = Kernel::select(self.quant);
        if kernel == Kernel::Fp32Gemm && self.quant == Quant::Bf16 && f32_panels::available() {
            return self.matmul_bf16_panels(x, rows, bias, epilogue, out);
        }
        let acts = Activations::convert(x, rows, self, kernel);
        if kernel == Kernel::Fp32Gemm {
            return self.matmul_fp32(&acts, rows, bias, epilogue, out);
        }
        let out_addr = out.as_mut_ptr() as usize;
        TaskGrid::for_each_panel(rows, self.out_dim, |mblock_range, p, tiles| {
            match kernel {
                Kernel::Amx | Kernel::Avx512Dot | Kernel::Avx2Int8 => mblock_range
                    .clone()
                    .zip(tiles.iter_mut())
                    .for_each(|(mb, tile)| {
                        self.block_fast(kernel, &acts, mb, MB.min(rows - mb * MB), p, tile)
                    }),
                Kernel::Reference | Kernel::Fp32Gemm => mblock_range
                    .clone()
                    .zip(tiles.iter_mut())
                    .for_each(|(mb, tile)| {
                        self.block_reference(&acts, mb, MB.min(rows - mb * MB), p, tile)
                    }),
            }
            for (mb, tile) in mblock_range.zip(tiles.iter()) {
                let valid = MB.min(rows - mb * MB);
                // SAFETY: tasks own disjoint (row block, panel) rectangles of `out`.
                unsafe {
                    self.finish(
                        &acts,
                        mb,
                        valid,
                        p,
                        tile,
                        bias,
                        epilogue,
                        out_addr as *mut f32,
                    )
                };
            }
        });
    }

    /// Applies scale, bias and epilogue to a finished block and writes it out.
    #[allow(clippy::too_many_arguments)]
    unsafe fn finish(
        &self,
        acts: &Activations,
        mb: usize,
        valid: usize,
        p: usize,
        tile: &[f32; MB * NB],
        bias: Option<&[f32]>,
        epilogue: Epilogue,
        out: *mut f32,
    ) {
        let n0 = p * NB;
        let ncols = NB.min(self.out_dim - n0);
        let bias = bias.map(|b| &b[n0..n0 + ncols]);
        let w_scales = (self.quant == Quant::Int8).then(|| &self.scales[n0..n0 + ncols]);
        let epilogue = epilogue.columns(n0..n0 + ncols);
        for r in 0..valid {
            let m = mb * MB + r;
            // SAFETY: row m < rows and columns n0..n0+ncols < out_dim.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(out.add(m * self.out_dim + n0), ncols) };
            let a_scale = acts.scales.get(m).copied().unwrap_or(1.0);
            finish_row(
                dst,
                &tile[r * NB..(r + 1) * NB],
                a_scale,
                w_scales,
                bias,
                epilogue,
            );
        }
    }

    /// The packed values as f32, `(out, in)` row-major, int8 unscaled.
    fn values_f32(&self) -> &[f32] {
        self.values_f32.get_or_init(|| self.rounded_values())
    }

    /// [`Self::values_f32`], computed.
    fn rounded_values(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out_dim * self.in_dim];
        w.par_chunks_mut(self.in_dim)
            .enumerate()
            .for_each(|(n, row)| {
                for (k, v) in row.iter_mut().enumerate() {
                    *v = self.value(n / NB, n % NB, k);
                }
            });
        w
    }

    /// bf16 through the fp32 panels: activations rounded to bf16 (as f32),
    /// times the rounded weights, with fp32 sums: the numbers of the bf16
    /// kernels up to the order of the sums, at the fp32 kernels' speed.
    fn matmul_bf16_panels(
        &self,
        x: &[f32],
        rows: usize,
        bias: Option<&[f32]>,
        epilogue: Epilogue,
        out: &mut [f32],
    ) {
        let (n, k) = (self.out_dim, self.in_dim);
        let panels = self
            .panels_f32
            .get_or_init(|| PackedF32::pack(&self.rounded_values(), n, k));
        let mut a = scratch::take::<f32>(rows * k);
        a.par_chunks_mut(k)
            .zip(x.par_chunks(k))
            .for_each(|(dst, src)| round_to_bf16(dst, src));
        panels.matmul(&a, rows, bias, epilogue, out)
    }

    /// The AMX computation on any CPU: rounded activations and weights as
    /// f32 through the `gemm` crate, then the same per-row epilogue.
    fn matmul_fp32(
        &self,
        acts: &Activations,
        rows: usize,
        bias: Option<&[f32]>,
        epilogue: Epilogue,
        out: &mut [f32],
    ) {
        let (n, k) = (self.out_dim, self.in_dim);
        let mut a = scratch::take::<f32>(rows * k);
        a.par_chunks_mut(k).enumerate().for_each(|(m, row)| {
            for (kk, v) in row.iter_mut().enumerate() {
                *v = match self.quant {
                    Quant::Bf16 => acts.bf16_at(m, kk),
                    Quant::Int8 => acts.i8_at(m, kk) as f32,
                };
            }
        });
        let mut acc = scratch::take::<f32>(rows * n);
        let w = self.values_f32();
        super::f32_portable::matmul(&a, rows, w, (n, k), None, Epilogue::Store, &mut acc);
        let w_scales = (self.quant == Quant::Int8).then_some(self.scales.as_slice());
        out.par_chunks_mut(n)
            .zip(acc.par_chunks(n))
            .enumerate()
            .for_each(|(m, (dst, acc))| {
                let a_scale = acts.scales.get(m).copied().unwrap_or(1.0);
                for n0 in (0..n).step_by(NB) {
                    let cols = NB.min(n - n0);
                    let mut block = [0f32; NB];
                    block[..cols].copy_from_slice(&acc[n0..n0 + cols]);
                    let epilogue = epilogue.columns(n0..n0 + cols);
                    finish_row(
                        &mut dst[n0..n0 + cols],
                        &block,
                        a_scale,
                        w_scales.map(|s| &s[n0..n0 + cols]),
                        bias.map(|b| &b[n0..n0 + cols]),
                        epilogue,
                    );
                }
            });
    }

    /// Reference kernel: same inputs, same layout, plain loops.
    fn block_reference(
        &self,
        acts: &Activations,
        mb: usize,
        valid: usize,
        p: usize,
        tile: &mut [f32; MB * NB],
    ) {
        tile.fill(0.0);
        for r in 0..valid {
            let m = mb * MB + r;
            for col in 0..NB {
                let mut acc_f = 0f32;
                let mut acc_i = 0i32;
                for k in 0..self.in_dim {
                    let w = self.value(p, col, k);
                    match self.quant {
                        Quant::Bf16 => acc_f += acts.bf16_at(m, k) * w,
                        Quant::Int8 => acc_i += acts.i8_at(m, k) as i32 * w as i32,
                    }
                }
                tile[r * NB + col] = if self.quant == Quant::Int8 {
                    acc_i as f32
                } else {
                    acc_f
                };
            }
        }
    }

    /// One 32×32 block on AMX or on AVX-512 dot products (int8 activations
    /// shifted by 128 there), as `kernel` says; the dot-product kernels stop
    /// after the block's `valid` rows (rounded up to 4).
    #[cfg(target_arch = "x86_64")]
    fn block_fast(
        &self,
        kernel: Kernel,
        acts: &Activations,
        mb: usize,
        valid: usize,
        p: usize,
        tile: &mut [f32; MB * NB],
    ) {
        let stride = self.k_pad * self.quant.elem_bytes();
        let a = acts.bytes[mb * MB * stride..].as_ptr();
        let b = self.panel(p).as_ptr();
        let kblocks = self.k_pad / self.quant.k_block();
        let int8 = self.quant == Quant::Int8;
        // The int8 dot-product kernels take the activations' offset back out
        // through the panel's column sums (empty for bf16).
        let sums = || -> &[i32; NB] {
            self.col_sums[p * NB..(p + 1) * NB]
                .try_into()
                .expect("a panel has 32 column sums")
        };
        // SAFETY (every arm): `Kernel::select` checked that the CPU, the OS
        // and the ISA cap allow the kernel; activations are padded to whole
        // 32-row blocks and k blocks, the panel to whole k blocks.
        match (kernel, self.quant) {
            (Kernel::Amx, _) => {
                let c = tile.as_mut_ptr() as *mut u8;
                unsafe { crate::kernels::amx::block(a, stride, b, kblocks, int8, c, NB * 4) };
                if int8 {
                    super::blocks::i32_bits_to_f32(tile);
                }
            }
            (Kernel::Avx2Int8, _) => unsafe {
                super::int8_avx2::block(a, stride, b, kblocks, valid, sums(), tile)
            },
            (_, Quant::Int8) => unsafe {
                super::dot512::block_int8(a, stride, b, kblocks, valid, sums(), tile)
            },
            (_, Quant::Bf16) => unsafe {
                super::dot512::block_bf16(a, stride, b, kblocks, valid, tile)
            },
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn block_fast(
        &self,
        _kernel: Kernel,
        acts: &Activations,
        mb: usize,
        valid: usize,
        p: usize,
        tile: &mut [f32; MB * NB],
    ) {
        self.block_reference(acts, mb, valid, p, tile)
    }
}

/// Which kernel runs the packed matmul.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Intel AMX tiles.
    Amx,
    /// AVX-512 dot products: `vpdpbusd` (VNNI) for int8, `vdpbf16ps` for bf16.
    Avx512Dot,
    /// int8 on AVX2 (`vpmaddubsw` + `vpmaddwd`), activations at 7 bits.
    Avx2Int8,
    /// Without a dedicated kernel: the rounded operands as f32 through an
    /// fp32 GEMM (the same numbers up to fp32 rounding of the sums, at fp32
    /// speed): our fp32 panels for bf16 where they run, else the `gemm` crate.
    Fp32Gemm,
    /// Plain loops over the packed layout: the reference the tests compare with.
    Reference,
}

static FORCED: std::sync::Mutex<Option<Kernel>> = std::sync::Mutex::new(None);

/// Forces a kernel (None: the best this CPU runs). For tests and comparisons.
pub fn force_kernel(kernel: Option<Kernel>) {
    *FORCED.lock().unwrap_or_else(|e| e.into_inner()) = kernel;
}

impl Kernel {
    /// The kernel for `quant`: the forced one when this CPU and the ISA cap
    /// allow it, else the fastest allowed.
    fn select(quant: Quant) -> Self {
        let allowed = |k: Kernel| match k {
            Kernel::Amx => amx_available(),
            Kernel::Avx512Dot => dot_allowed(quant),
            Kernel::Avx2Int8 => quant == Quant::Int8 && isa::active() >= Isa::Avx2,
            Kernel::Fp32Gemm | Kernel::Reference => true,
        };
        match *FORCED.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(k) if allowed(k) => k,
            _ if amx_available() => Kernel::Amx,
            _ if dot_allowed(quant) && dot_beats_fma(quant) => Kernel::Avx512Dot,
            _ if allowed(Kernel::Avx2Int8) => Kernel::Avx2Int8,
            _ => Kernel::Fp32Gemm,
        }
    }

    /// int8 activation levels: `−levels..=levels` (7 bits on AVX2, where
    /// `vpmaddubsw`'s i16 pair sums must not saturate).
    fn act_levels(self) -> f32 {
        match self {
            Kernel::Avx2Int8 => 63.0,
            _ => LEVELS,
        }
    }

    /// What the int8 activations are stored as: `q + offset` (the dot-product
    /// instructions take them unsigned).
    fn act_offset(self) -> u8 {
        match self {
            Kernel::Avx512Dot => 128,
            Kernel::Avx2Int8 => super::blocks::AVX2_INT8_OFFSET as u8,
            _ => 0,
        }
    }
}

/// The AVX-512 dot-product instruction for `quant` may be used (CPU and cap).
fn dot_allowed(quant: Quant) -> bool {
    match quant {
        Quant::Int8 => isa::active() >= Isa::Avx512Vnni,
        Quant::Bf16 => isa::active() >= Isa::Avx512Bf16,
    }
}

/// AMX tiles with BF16 and INT8 are present, the OS let this process use
/// them, and the ISA cap allows them.
fn amx_available() -> bool {
    isa::active() >= Isa::Amx
}

/// Whether the dot-product kernel beats the fp32 GEMM fallback. `vpdpbusd`
/// issues at the rate of an FMA with 4× its products. On Intel, `vdpbf16ps`
/// issues at about half that rate (measured on an Emerald Rapids Xeon: 1.1 G
/// instructions/s against 2.2–2.9 for FMA on one core), so its 2× products
/// win nothing and bf16 there runs as the fp32 fallback; AMD Zen 4 issues it
/// at the FMA rate (per the published instruction tables; not measured here).
fn dot_beats_fma(quant: Quant) -> bool {
    match quant {
        Quant::Int8 => true,
        Quant::Bf16 => isa::cpu_vendor_is_amd(),
    }
}

/// Whether bf16 products run on `vdpbf16ps` here, faster than fp32 FMAs
/// (AVX512-BF16 allowed, on a CPU that issues it at the FMA rate).
pub fn bf16_dot_is_fast() -> bool {
    dot_allowed(Quant::Bf16) && dot_beats_fma(Quant::Bf16)
}

/// Why `quant` runs as an fp32 GEMM on the rounded operands here (same
/// numbers, no faster than fp32); None when a dedicated kernel (AMX, or AVX-512
/// VNNI / BF16 dot products) runs it.
pub fn not_accelerated_because(quant: Quant) -> Option<&'static str> {
    match (Kernel::select(quant), quant) {
        (Kernel::Fp32Gemm, Quant::Int8) => Some("its kernels need AVX2, AVX512-VNNI or AMX"),
        (Kernel::Fp32Gemm, Quant::Bf16) if dot_allowed(quant) => Some(
            "without AMX, this CPU's vdpbf16ps issues at half the FMA rate and its 2x products win nothing",
        ),
        (Kernel::Fp32Gemm, Quant::Bf16) => Some("its kernels need AMX (or AVX512-BF16 on AMD)"),
        _ => None,
    }
}

/// Activations prepared for one call: bf16/int8 rows padded with zeros to
/// whole 32-row blocks and k blocks for the tile loads.
struct Activations {
    bytes: Scratch<u8>,
    k_pad: usize,
    /// Per-row scale (int8 only).
    scales: Vec<f32>,
}

impl Activations {
    /// int8 with `kernel`'s levels and offset.
    fn convert(x: &[f32], rows: usize, w: &PackedWeight, kernel: Kernel) -> Self {
        let (k, k_pad, quant) = (w.in_dim, w.k_pad, w.quant);
        let (levels, offset) = (kernel.act_levels(), kernel.act_offset());
        let scales: Vec<f32> = match quant {
            Quant::Int8 => x.par_chunks(k).map(|r| int8_scale(r, levels)).collect(),
            Quant::Bf16 => Vec::new(),
        };
        let esize = quant.elem_bytes();
        let row_bytes = k_pad * esize;
        let mut bytes = scratch::take::<u8>(rows.div_ceil(MB) * MB * row_bytes);
        let (data, padding) = bytes.split_at_mut(rows * row_bytes);
        padding.fill(0);
        data.par_chunks_mut(row_bytes)
            .zip(x.par_chunks(k))
            .zip(scales.par_iter().chain(rayon::iter::repeat_n(&1.0, rows)))
            .for_each(|((dst, src), &scale)| {
                let int8 = (quant == Quant::Int8).then_some((scale, levels, offset));
                convert_row(dst, src, int8)
            });
        Self {
            bytes,
            k_pad,
            scales,
        }
    }

    fn bf16_at(&self, m: usize, k: usize) -> f32 {
        let i = (m * self.k_pad + k) * 2;
        bf16_to_f32(u16::from_le_bytes([self.bytes[i], self.bytes[i + 1]]))
    }

    fn i8_at(&self, m: usize, k: usize) -> i8 {
        self.bytes[m * self.k_pad + k] as i8
    }
}

multiversion! {
    /// `dst = src` rounded to bf16 (nearest even), kept as f32.
    fn round_to_bf16(dst: &mut [f32], src: &[f32]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = bf16_to_f32(bf16_bits(v));
        }
    }
}

multiversion! {
    /// One activation row to bf16 (round to nearest even), or to int8 with
    /// `(scale, levels, offset)` stored as `q + offset`, zero-filling the k
    /// padding.
    fn convert_row(dst: &mut [u8], src: &[f32], int8: Option<(f32, f32, u8)>) {
        if let Some((scale, levels, offset)) = int8 {
            let inv = 1.0 / scale;
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = (to_i8(v, inv, levels) as u8).wrapping_add(offset);
            }
            dst[src.len()..].fill(0);
        } else {
            for (d, &v) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&bf16_bits(v).to_le_bytes());
            }
            dst[2 * src.len()..].fill(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::math::gelu;
    use crate::kernels::test_data as data;

    /// The activations as the kernels see them (rounded to bf16, or to int8
    /// with `levels`).
    fn quantised_row(r: &[f32], quant: Quant, levels: f32) -> Vec<f32> {
        match quant {
            Quant::Bf16 => r.iter().map(|&v| bf16_to_f32(bf16_bits(v))).collect(),
            Quant::Int8 => {
                let s = int8_scale(r, levels);
                r.iter()
                    .map(|&v| to_i8(v, 1.0 / s, levels) as f32 * s)
                    .collect()
            }
        }
    }

    fn check(quant: Quant, rows: usize, n: usize, k: usize) {
        let x = data(rows * k, 1);
        let w = data(n * k, 2);
        let bias = data(n, 3);
        let gamma = data(n, 4);
        let resid = data(rows * n, 5);
        let packed = PackedWeight::pack(&w, n, k, quant);
        let wu = packed.unpack();
        // acc + b in f64 from the dequantised operands.
        let linear_f64 = |levels: f32| {
            let mut lin = vec![0f64; rows * n];
            for m in 0..rows {
                let xr = quantised_row(&x[m * k..(m + 1) * k], quant, levels);
                for j in 0..n {
                    let s: f64 = (0..k).map(|i| xr[i] as f64 * wu[j * k + i] as f64).sum();
                    lin[m * n + j] = s + bias[j] as f64;
                }
            }
            lin
        };
        // int8 sums are exact integers: kernels with the same activation
        // levels give the same bits.
        let mut int8_outputs: Vec<(Kernel, Vec<f32>)> = Vec::new();
        for kernel in [
            Kernel::Amx,
            Kernel::Avx512Dot,
            Kernel::Avx2Int8,
            Kernel::Fp32Gemm,
            Kernel::Reference,
        ] {
            force_kernel(Some(kernel));
            let ran = Kernel::select(quant);
            match kernel {
                Kernel::Avx512Dot => assert_eq!(ran == kernel, dot_allowed(quant)),
                Kernel::Avx2Int8 => assert_eq!(
                    ran == kernel,
                    quant == Quant::Int8 && isa::active() >= Isa::Avx2
                ),
                _ => {}
            }
            let lin = linear_f64(ran.act_levels());
            type Expected<'a> = Box<dyn Fn(usize) -> f64 + 'a>;
            let cases: [(Epilogue, Expected); 3] = [
                (Epilogue::Store, Box::new(|i| lin[i])),
                (Epilogue::Gelu, Box::new(|i| gelu(lin[i] as f32) as f64)),
                (
                    Epilogue::Residual {
                        gamma: Some(&gamma),
                    },
                    Box::new(|i| resid[i] as f64 + gamma[i % n] as f64 * lin[i]),
                ),
            ];
            for (epilogue, want) in cases {
                let mut out = resid.clone();
                packed.matmul(&x, rows, Some(&bias), epilogue, &mut out);
                if quant == Quant::Int8 && matches!(epilogue, Epilogue::Store) {
                    let same_levels = int8_outputs
                        .iter()
                        .find(|(prev, _)| prev.act_levels() == ran.act_levels());
                    if let Some((first, bits)) = same_levels {
                        assert!(
                            bits.iter()
                                .zip(&out)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "int8 {rows}x{n}x{k}: {ran:?} differs from {first:?}"
                        );
                    }
                    int8_outputs.push((ran, out.clone()));
                }
                for (i, &got) in out.iter().enumerate() {
                    let want = want(i);
                    let err = (got as f64 - want).abs() / (1.0 + want.abs());
                    assert!(
                        err < 1e-5,
                        "{quant:?} {rows}x{n}x{k} {epilogue:?} {kernel:?}: [{i}] {got} vs {want}"
                    );
                }
            }
        }
        force_kernel(None);
        packed.matmul(&[], 0, Some(&bias), Epilogue::Store, &mut []); // no rows: no work
        // The packed weight stays within half a step of the f32 one.
        let step = |v: f32| match quant {
            Quant::Bf16 => v.abs() / 256.0,
            Quant::Int8 => 1.0 / 127.0 / 2.0,
        };
        for (a, b) in wu.iter().zip(&w) {
            assert!((a - b).abs() <= step(*b) * 1.0001, "{quant:?}: {a} vs {b}");
        }
    }

    #[test]
    fn packed_matmul_matches_its_dequantised_reference() {
        for quant in [Quant::Bf16, Quant::Int8] {
            check(quant, 5, 20, 40); // smaller than one block everywhere
            check(quant, 150, 96, 160); // several chunks, blocks and tails
            check(quant, 45, 40, 130); // a 13-row last block: micro-panels of 12 and 4
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even 1.0.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(bf16_to_f32(bf16_bits(f32::NAN)).is_nan());
    }
}
