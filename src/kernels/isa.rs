//! Instruction-set levels of the hand-written kernels, chosen at run time,
//! and the cap that forces a lower one on any machine (`BEITV2_ISA`,
//! `bench --isa`) so that every path can be tested and measured wherever the
//! code runs. A level the CPU lacks is refused, naming the missing feature:
//! no kernel is ever entered on a CPU that cannot run it.
//!
//! The `gemm` crate (candle's matmul, the training GEMMs) picks its own level
//! and is not affected by the cap.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

/// The levels, lowest first. Each includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Isa {
    /// x86-64 baseline (SSE2) or the portable code on other architectures.
    Baseline,
    /// AVX2 + FMA (Haswell, AMD Zen 1 and later).
    Avx2,
    /// AVX-512 F/BW/DQ/VL (Skylake-SP, Ice Lake, Sapphire Rapids, AMD Zen 4).
    Avx512,
    /// AVX-512 plus VNNI (`vpdpbusd`): int8 dot products (Cascade Lake,
    /// Ice Lake, AMD Zen 4 and later).
    Avx512Vnni,
    /// AVX-512 VNNI plus BF16 (`vdpbf16ps`): bf16 dot products (Cooper Lake,
    /// Sapphire Rapids, AMD Zen 4 and later).
    Avx512Bf16,
    /// AVX-512 BF16 plus AMX tiles with BF16 and INT8, usable by this process
    /// (Sapphire Rapids and later).
    Amx,
}

impl Isa {
    pub const ALL: [Isa; 6] = [
        Isa::Baseline,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Vnni,
        Isa::Avx512Bf16,
        Isa::Amx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Avx512Bf16 => "avx512-bf16",
            Isa::Amx => "amx",
        }
    }

    /// The CPU features this level needs, as `is_x86_feature_detected!` names them.
    fn features(self) -> &'static [&'static str] {
        match self {
            Isa::Baseline => &[],
            Isa::Avx2 => &["avx2", "fma"],
            Isa::Avx512 => &["avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"],
            Isa::Avx512Vnni => &[
                "avx2",
                "fma",
                "avx512f",
                "avx512bw",
                "avx512dq",
                "avx512vl",
                "avx512vnni",
            ],
            Isa::Avx512Bf16 => &[
                "avx2",
                "fma",
                "avx512f",
                "avx512bw",
                "avx512dq",
                "avx512vl",
                "avx512vnni",
                "avx512bf16",
            ],
            Isa::Amx => &[
                "avx2",
                "fma",
                "avx512f",
                "avx512bw",
                "avx512dq",
                "avx512vl",
                "avx512vnni",
                "avx512bf16",
                "amx-tile",
                "amx-bf16",
                "amx-int8",
            ],
        }
    }

    /// The first feature of this level that the CPU (or, for AMX, the OS)
    /// does not offer; None when the level can run here.
    pub fn missing_feature(self) -> Option<&'static str> {
        if self == Isa::Amx && self.features().iter().all(|f| cpu_has(f)) && !amx_permitted() {
            return Some("AMX tile state (the kernel refused ARCH_REQ_XCOMP_PERM)");
        }
        self.features().iter().copied().find(|f| !cpu_has(f))
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Isa::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!(
                    "unknown ISA level '{s}'; known: {}",
                    Isa::ALL.map(Isa::name).join(", ")
                )
            })
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_has(feature: &str) -> bool {
    match feature {
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        "fma" => std::arch::is_x86_feature_detected!("fma"),
        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
        "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
        "avx512dq" => std::arch::is_x86_feature_detected!("avx512dq"),
        "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
        "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
        "avx512bf16" => std::arch::is_x86_feature_detected!("avx512bf16"),
        "amx-tile" | "amx-bf16" | "amx-int8" => {
            // cpuid leaf 7 is read only when the CPU reports it.
            if std::arch::x86_64::__cpuid(0).eax < 7 {
                return false;
            }
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            let bit = match feature {
                "amx-bf16" => 22,
                "amx-tile" => 24,
                _ => 25,
            };
            edx >> bit & 1 == 1
        }
        _ => false,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has(_feature: &str) -> bool {
    false
}

/// The CPU reports itself as AMD's ("AuthenticAMD"). Asked once: `cpuid`
/// leaves a virtual machine for the hypervisor, and kernels ask per call.
#[cfg(target_arch = "x86_64")]
pub fn cpu_vendor_is_amd() -> bool {
    static AMD: OnceLock<bool> = OnceLock::new();
    *AMD.get_or_init(|| {
        let r = std::arch::x86_64::__cpuid(0);
        let vendor: Vec<u8> = [r.ebx, r.edx, r.ecx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        vendor == b"AuthenticAMD"
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub fn cpu_vendor_is_amd() -> bool {
    false
}

/// The OS lets this process use AMX tile data (asked once).
fn amx_permitted() -> bool {
    static PERMITTED: OnceLock<bool> = OnceLock::new();
    *PERMITTED.get_or_init(request_amx_permission)
}

/// Asks the kernel for the AMX tile state (Linux `arch_prctl`); false where
/// it refuses or the OS is not Linux. Called once, after CPUID reported AMX.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_amx_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: the syscall only asks the kernel for permission and touches no memory.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") 158i64 => ret, // SYS_arch_prctl
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_amx_permission() -> bool {
    false
}

/// The highest level this machine runs.
pub fn detected() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|l| l.missing_feature().is_none())
            .unwrap_or(Isa::Baseline)
    })
}

/// `u8::MAX`: no cap set.
static CAP: AtomicU8 = AtomicU8::new(u8::MAX);

/// The level the kernels use now: the detected one, or the cap below it.
pub fn active() -> Isa {
    let d = detected();
    match CAP.load(Ordering::Relaxed) {
        u8::MAX => d,
        c => Isa::ALL[c as usize].min(d),
    }
}

/// Caps the kernels at `level` (None lifts the cap). A level this machine
/// cannot run is refused, naming the missing feature. Weights packed for a
/// reduced precision before the change keep their layout; every level reads
/// it.
pub fn set_cap(level: Option<Isa>) -> Result<(), String> {
    match level {
        None => CAP.store(u8::MAX, Ordering::Relaxed),
        Some(l) => {
            if let Some(f) = l.missing_feature() {
                return Err(format!(
                    "ISA level '{l}' is not available on this CPU: it lacks {f} (the highest level \
                     here is '{}')",
                    detected()
                ));
            }
            // The discriminants are the positions in `Isa::ALL`.
            CAP.store(l as u8, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Applies `BEITV2_ISA` (a level name) when it is set; errors name the
/// variable and the problem.
pub fn cap_from_env() -> Result<(), String> {
    match std::env::var("BEITV2_ISA") {
        Ok(v) if !v.trim().is_empty() => {
            let level: Isa = v.parse().map_err(|e| format!("BEITV2_ISA: {e}"))?;
            set_cap(Some(level)).map_err(|e| format!("BEITV2_ISA: {e}"))
        }
        _ => Ok(()),
    }
}

/// Every level this machine runs, lowest first (the kernel tests run under each).
pub fn supported() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|l| *l <= detected()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_a_cap_above_the_cpu_is_refused() {
        for l in Isa::ALL {
            assert_eq!(l.name().parse::<Isa>(), Ok(l));
        }
        assert!(
            "avx3"
                .parse::<Isa>()
                .unwrap_err()
                .contains("known: baseline")
        );
        assert_eq!(Isa::Baseline.missing_feature(), None);
        assert!(supported().contains(&Isa::Baseline));
        // Above the detected level, the refusal names a feature and the cap stays off.
        if let Some(&above) = Isa::ALL.iter().find(|l| **l > detected()) {
            let e = set_cap(Some(above)).unwrap_err();
            let f = above.missing_feature().unwrap();
            assert!(e.contains(f), "{e}");
            assert_eq!(active(), detected());
        }
    }
}
