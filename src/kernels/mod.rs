//! Hand-written CPU kernels behind the inference path of the model (no
//! gradient tracked): fused attention, LayerNorm, GELU, bias and residual
//! epilogues, and bf16/int8 linear layers. The model calls them only for
//! constant f32 CPU tensors; training runs candle's differentiable ops.

/// Compiles `$body` as a generic function, an AVX2+FMA one and an AVX-512
/// one, and calls the best that the running CPU supports and the ISA cap
/// allows ([`isa`]).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if $crate::kernels::has_avx512() {
                    // SAFETY: the CPU supports every feature `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if $crate::kernels::has_avx2() {
                    // SAFETY: the CPU supports every feature `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod attention;
pub mod autograd;
pub mod gemm;
pub mod isa;
pub mod math;
pub mod profile;
pub mod scratch;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

pub use gemm::{Epilogue, PackedWeight, Quant};

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns the fused inference kernels off (candle's ops run instead), for
/// comparisons and tests. Reduced-precision weights, once packed, stay in use.
pub fn set_fused(on: bool) {
    DISABLED.store(!on, Ordering::Relaxed);
}

pub fn fused_enabled() -> bool {
    !DISABLED.load(Ordering::Relaxed)
}

/// AVX-512 F/BW/DQ/VL (with AVX2 and FMA) may be used: the CPU has them and
/// the ISA cap allows them.
pub fn has_avx512() -> bool {
    isa::active() >= isa::Isa::Avx512
}

/// AVX2 and FMA may be used: the CPU has them and the ISA cap allows them.
pub fn has_avx2() -> bool {
    isa::active() >= isa::Isa::Avx2
}

/// Precision of the linear layers at inference (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    /// fp32 weights and arithmetic (the reference).
    #[default]
    F32,
    /// bf16 weights and activations, fp32 accumulation.
    Bf16,
    /// int8 weights (per output channel) and activations (per token), int32 accumulation.
    Int8,
}

impl Precision {
    /// The AMX packing of a reduced precision (None for fp32).
    pub fn quant(self) -> Option<Quant> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(Quant::Bf16),
            Precision::Int8 => Some(Quant::Int8),
        }
    }
}

/// The f32 values of a contiguous CPU tensor, borrowed from its storage.
pub fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => match layout.contiguous_offsets() {
            Some((a, b)) => Ok(&v[a..b]),
            None => candle_core::bail!("fused kernel: tensor is not contiguous"),
        },
        _ => candle_core::bail!("fused kernel: expected an f32 CPU tensor"),
    }
}

/// Calls `f` with the f32 values of `t` (made contiguous first if needed).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    f(cpu_f32(&storage, layout)?)
}

/// Calls `f` with the f32 values of `t`, writable: `t`'s own storage (and
/// that of every tensor sharing it, as a [`candle_core::Var`]'s does), so
/// that an update in place needs neither a new buffer nor a copy back.
/// `t` must be a contiguous f32 CPU tensor.
pub fn with_f32_mut<R>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<R>) -> Result<R> {
    struct InPlace<F, R> {
        f: std::cell::RefCell<Option<F>>,
        out: std::cell::RefCell<Option<Result<R>>>,
    }
    impl<F: FnOnce(&mut [f32]) -> Result<R>, R> candle_core::InplaceOp1 for InPlace<F, R> {
        fn name(&self) -> &'static str {
            "beitv2-in-place"
        }
        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
            let CpuStorage::F32(v) = storage else {
                candle_core::bail!("in-place update: expected an f32 CPU tensor")
            };
            let Some((a, b)) = layout.contiguous_offsets() else {
                candle_core::bail!("in-place update: tensor is not contiguous")
            };
            let f = self.f.borrow_mut().take().expect("the op runs once");
            *self.out.borrow_mut() = Some(f(&mut v[a..b]));
            Ok(())
        }
    }
    let op = InPlace {
        f: std::cell::RefCell::new(Some(f)),
        out: std::cell::RefCell::new(None),
    };
    t.inplace_op1(&op)?;
    op.out.into_inner().expect("the op ran")
}

/// Runs `f` on a thread of rayon's pool (at once when already on one), so
/// that the parallel kernels inside share their work with that thread and
/// the calling thread sleeps once for the whole call, instead of being woken
/// after every parallel step while the pool's threads spin: on 2 cores, a
/// base batch-1 int8 pass switched threads 6× less often and ran 2–10%
/// faster (AMD Zen 4).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::current_thread_index() {
        Some(_) => f(),
        None => rayon::scope(|_| f()),
    }
}

/// Whether `t` can take the fused path: a constant f32 tensor on the CPU.
pub fn is_plain_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && !t.track_op()
}

/// Deterministic values in [-1, 1] for the kernels' unit tests.
#[cfg(test)]
pub(crate) fn test_data(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let h = (i as u32 ^ seed)
                .wrapping_mul(2_654_435_761)
                .rotate_left(13);
            (h % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}
