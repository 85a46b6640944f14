//! The one Intel AMX primitive (`tdpbf16ps` / `tdpbssd`, Sapphire Rapids
//! and later) that the packed linear layers and the reduced-precision
//! attention share, issued through inline assembly because Rust's AMX
//! intrinsics are not stable. Tiles are 16 rows × 64 bytes; a 2×2 block of
//! accumulator tiles covers 32×32 outputs. The right-hand operand is a panel
//! of 32 columns in B-tile order: per k block (32 bf16 or 64 int8 values of
//! the reduction) two tiles of 16 columns, each 16 rows of `[column][group]`
//! (a group: the 2 bf16 or 4 int8 reduction values one column takes per row).

use std::arch::asm;

/// Bytes of one k block of a B panel: two tiles of 16 rows × 64 bytes.
pub const PANEL_KBLOCK_BYTES: usize = 2048;

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

/// One 32×32 block `c = Σ a·b` stored at `c` with rows `c_stride` bytes
/// apart (bf16: f32 sums; int8: the i32 sums' bits): tiles 0–3 accumulate,
/// 4–5 hold rows of `a`, 6–7 the two tiles of the panel's k block.
///
/// # Safety
/// The CPU and the OS allow AMX (ISA level `amx`); `a` holds 32 rows of
/// `kblocks × 64` bytes at `stride`; `b` is a panel of `kblocks` k blocks of
/// [`PANEL_KBLOCK_BYTES`]; `c` has 32 writable rows of 128 bytes at `c_stride`.
pub unsafe fn block(
    a: *const u8,
    stride: usize,
    b: *const u8,
    kblocks: usize,
    int8: bool,
    c: *mut u8,
    c_stride: usize,
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
            let b0 = b.add(kblk * PANEL_KBLOCK_BYTES);
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
        asm!(
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c1} + {sc}*1], tmm1",
            "tilestored [{c2} + {sc}*1], tmm2",
            "tilestored [{c3} + {sc}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c.add(64),
            c2 = in(reg) c.add(16 * c_stride),
            c3 = in(reg) c.add(16 * c_stride + 64),
            sc = in(reg) c_stride,
            options(nostack),
        );
    }
}
