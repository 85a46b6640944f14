//! bf16 and int8 blocks of the packed linear layers on Intel AMX
//! (`tdpbf16ps` / `tdpbssd`, Sapphire Rapids and later), issued through
//! inline assembly because Rust's AMX intrinsics are not stable. Tiles are 16
//! rows × 64 bytes; a 2×2 block of accumulator tiles covers 32×32 outputs.
//! The weight panels are stored in B-tile order ([`super::packed`]), so each
//! k block is two tile loads of 16 rows × 64 bytes.

use super::blocks::{MB, NB};
use std::arch::asm;

thread_local! {
    static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Loads the tile configuration (8 tiles of 16 rows × 64 bytes) once per thread.
fn configure_thread() {
    CONFIGURED.with(|c| {
        if !c.get() {
            #[repr(C, align(64))]
            struct Config([u8; 64]);
            let mut cfg = Config([0; 64]);
            cfg.0[0] = 1; // palette 1
            for t in 0..8 {
                cfg.0[16 + 2 * t] = 64; // bytes per row
                cfg.0[48 + t] = 16; // rows
            }
            // SAFETY: only reached from `block`, whose caller checked AMX; the
            // config is valid for palette 1.
            unsafe {
                asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
            }
            c.set(true);
        }
    });
}

/// One 32×32 block, `tile = Σ a·w` (int8: exact integers as f32): tiles 0–3
/// accumulate, 4–5 hold activations, 6–7 the two weight tiles of the panel.
///
/// # Safety
/// The CPU and the OS allow AMX (ISA level `amx`); `a` holds 32 rows of `kblocks × 64` bytes at
/// `stride`; `b` is a panel of `kblocks` k blocks of 2048 bytes.
pub(super) unsafe fn block(
    a: *const u8,
    stride: usize,
    b: *const u8,
    kblocks: usize,
    int8: bool,
    tile: &mut [f32; MB * NB],
) {
    configure_thread();
    // SAFETY (whole block): see the function's contract; tiles read 16 rows × 64 B.
    unsafe {
        let a1 = a.add(16 * stride);
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3"
        );
        for kblk in 0..kblocks {
            let off = kblk * 64;
            let b0 = b.add(kblk * 2048);
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                a0 = in(reg) a.add(off),
                a1 = in(reg) a1.add(off),
                b0 = in(reg) b0,
                b1 = in(reg) b0.add(1024),
                sa = in(reg) stride,
                sb = in(reg) 64usize,
                options(nostack, readonly),
            );
            if int8 {
                asm!(
                    "tdpbssd tmm0, tmm4, tmm6",
                    "tdpbssd tmm1, tmm4, tmm7",
                    "tdpbssd tmm2, tmm5, tmm6",
                    "tdpbssd tmm3, tmm5, tmm7",
                    options(nostack, nomem),
                )
            } else {
                asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    options(nostack, nomem),
                )
            }
        }
        let c = tile.as_mut_ptr() as *mut u8;
        asm!(
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c1} + {sc}*1], tmm1",
            "tilestored [{c2} + {sc}*1], tmm2",
            "tilestored [{c3} + {sc}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c.add(64),
            c2 = in(reg) c.add(16 * NB * 4),
            c3 = in(reg) c.add(16 * NB * 4 + 64),
            sc = in(reg) NB * 4,
            options(nostack),
        );
    }
    if int8 {
        super::blocks::i32_bits_to_f32(tile);
    }
}
