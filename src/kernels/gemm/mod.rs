//! Linear layers, `out ← epilogue(x·Wᵀ + b)` over rows: the one dispatch
//! point between the weight's form and the kernels, one file per kernel
//! family and ISA level:
//!
//! | weight | kernel | file |
//! |---|---|---|
//! | fp32 as loaded | the `gemm` crate (its own ISA choice), epilogue as a pass | `f32_portable.rs` |
//! | fp32 panels (when packed) | layout, blocking, threads | `f32_panels.rs` |
//! | | AVX-512 FMA register block | `f32_avx512.rs` |
//! | | AVX2 + FMA register block | `f32_avx2.rs` |
//! | bf16 / int8 panels | AMX tiles | `../amx.rs` (shared with attention) |
//! | | AVX512-VNNI `vpdpbusd` / AVX512-BF16 `vdpbf16ps` | `dot512.rs` |
//! | | int8 on AVX2 `vpmaddubsw` | `int8_avx2.rs` |
//! | | fp32 GEMM on the rounded operands, or plain loops (tests) | `packed.rs` |
//!
//! `packed.rs` owns the bf16/int8 layout and the choice among its kernels;
//! `blocks.rs` the 32×32 blocking and the per-block epilogue that every
//! packed kernel shares. No kernel reads another's internals.

mod blocks;
#[cfg(target_arch = "x86_64")]
mod dot512;
#[cfg(target_arch = "x86_64")]
mod f32_avx2;
#[cfg(target_arch = "x86_64")]
mod f32_avx512;
mod f32_panels;
mod f32_portable;
#[cfg(target_arch = "x86_64")]
mod int8_avx2;
mod packed;

/// The `vdpbf16ps` 32×32 block, shared with attention's bf16 products.
#[cfg(target_arch = "x86_64")]
pub(crate) use dot512::block_bf16 as bf16_dot_block;
pub use f32_panels::PackedF32;
pub use f32_panels::available as f32_panels_available;
pub use packed::{
    Kernel, PackedWeight, Quant, bf16_dot_is_fast, force_kernel, not_accelerated_because,
};

/// What happens to `acc + bias` before it lands in the output.
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    /// `out = acc + b`
    Store,
    /// `out = gelu(acc + b)` (exact erf GELU)
    Gelu,
    /// `out += γ ∘ (acc + b)`: `out` holds the residual stream.
    Residual { gamma: Option<&'a [f32]> },
}

impl<'a> Epilogue<'a> {
    /// The epilogue for output columns `cols` (slices the layer scale).
    pub fn columns(self, cols: std::ops::Range<usize>) -> Self {
        match self {
            Epilogue::Residual { gamma: Some(g) } => Epilogue::Residual {
                gamma: Some(&g[cols]),
            },
            e => e,
        }
    }
}

/// The weight of a linear layer, `(out, in)` as PyTorch stores it.
#[derive(Debug, Clone, Copy)]
pub enum WeightRef<'a> {
    /// fp32 as loaded, with its fp32 panels when they were made.
    F32 {
        data: &'a [f32],
        out_dim: usize,
        in_dim: usize,
        panels: Option<&'a PackedF32>,
    },
    /// bf16 / int8 panels.
    Packed(&'a PackedWeight),
}

/// Checks the operand sizes of `out ← epilogue(x·Wᵀ + b)` for a weight of
/// `(out_dim, in_dim)`: every kernel asserts the same contract.
fn check_sizes(
    x: &[f32],
    rows: usize,
    (out_dim, in_dim): (usize, usize),
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    out: &[f32],
) {
    assert_eq!(x.len(), rows * in_dim, "linear input has the wrong size");
    assert_eq!(
        out.len(),
        rows * out_dim,
        "linear output has the wrong size"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), out_dim, "linear bias has the wrong size");
    }
    if let Epilogue::Residual { gamma: Some(g) } = epilogue {
        assert_eq!(g.len(), out_dim, "layer scale has the wrong size");
    }
}

/// `out ← epilogue(x·Wᵀ + b)`; `x` is (rows, in), `out` (rows, out).
pub fn linear(
    x: &[f32],
    rows: usize,
    w: WeightRef,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    out: &mut [f32],
) {
    match w {
        WeightRef::Packed(p) => p.matmul(x, rows, bias, epilogue, out),
        // Panels, where made, take every row count, so that a row's result
        // never depends on how many rows share its batch (resumed batch jobs
        // rely on that). They also beat the `gemm` crate where measured: its
        // AVX2 kernels ran at 132–173 GFLOP/s on the base model's shapes
        // against our 160–200 (AMD Zen 4, 2 threads), and at the AVX-512
        // level the base model at batch 8 ran at 5.36–5.58 images/s with
        // panels against 4.69–5.07 (the fused epilogues spare the residual's
        // temporary and its pass). A lower ISA cap since the packing reads
        // the plain weight.
        WeightRef::F32 {
            panels: Some(p), ..
        } if f32_panels::available() => p.matmul(x, rows, bias, epilogue, out),
        WeightRef::F32 {
            data,
            out_dim,
            in_dim,
            ..
        } => f32_portable::matmul(x, rows, data, (out_dim, in_dim), bias, epilogue, out),
    }
}
