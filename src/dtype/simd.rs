//! The one CPU-feature check every kernel dispatches on. `STEERLM_ISA=generic|avx2|avx512`
//! (or `STEERLM_NO_SIMD`, any value, for generic) forces a path everywhere, so that tests
//! can compare every path with the others.

use std::sync::OnceLock;

/// The instruction-set level the kernels use.
/// Levels are ordered: each includes the one below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Portable Rust, whatever the CPU.
    Generic,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// AVX2's set plus AVX-512 F, BW and VL: the runtime's dot products and row
    /// conversions 16 lanes wide (the conversion commands stay on AVX2).
    Avx512,
}

const LEVELS: [Level; 3] = [Level::Generic, Level::Avx2, Level::Avx512];

/// The best level this CPU supports.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
        {
            return Level::Avx512;
        }
        return Level::Avx2;
    }
    Level::Generic
}

/// Every level this CPU runs, lowest first.
pub fn available() -> Vec<Level> {
    let best = detected();
    LEVELS.into_iter().filter(|l| *l <= best).collect()
}

/// Detected once per process. `STEERLM_ISA=generic|avx2|avx512` forces a level (to test
/// every kernel path on one machine); one the CPU lacks is refused with a warning and the
/// detected level is used.
pub fn level() -> Level {
    static L: OnceLock<Level> = OnceLock::new();
    *L.get_or_init(|| {
        if std::env::var_os("STEERLM_NO_SIMD").is_some() {
            return Level::Generic;
        }
        let best = detected();
        let Some(want) = std::env::var("STEERLM_ISA").ok().filter(|v| !v.is_empty()) else {
            return best;
        };
        match available().into_iter().find(|l| l.as_str() == want) {
            Some(l) => l,
            None => {
                let names: Vec<&str> = available().iter().map(|l| l.as_str()).collect();
                eprintln!(
                    "warning: STEERLM_ISA={want}: not a level this CPU runs ({}); using {}",
                    names.join(", "),
                    best.as_str()
                );
                best
            }
        }
    })
}

/// Whether the CPU is AMD's (CPUID vendor string `AuthenticAMD`).
pub fn amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let v = unsafe { std::arch::x86_64::__cpuid(0) };
        (v.ebx, v.edx, v.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether `STEERLM_ISA` or `STEERLM_NO_SIMD` chose the level.
fn forced() -> bool {
    std::env::var_os("STEERLM_NO_SIMD").is_some()
        || std::env::var("STEERLM_ISA").is_ok_and(|v| !v.is_empty())
}

/// The level of the runtime's weight-row kernels (decode), for int8 rows or float rows.
/// Where the CPU has AVX-512 and no level was forced, float rows take the AVX2 kernels,
/// which decoded faster on both AVX-512 cores measured, one thread, tok/s on AVX2 against
/// AVX-512: a Zen 4, which runs 512-bit operations as two halves (bf16 59–72 against
/// 46–47, f16 64–71 against 42–45, f32 43–47 against 33–37), and an Intel Xeon with
/// AVX-512 FP16 (family 6 model 167; f16 49–53 against 42–43, f32 30–31 against 30–31;
/// bf16 rows, since read as pairs, 53–56 against 52–55). int8 rows keep AVX-512, faster on
/// both (Zen 4: channel 108–110 against 91–102, group 32 82–86 against 69–77; the Xeon:
/// channel 73–75 against 71–72).
/// Decided once per process: it is asked for every weight row.
pub fn row_level(int8: bool) -> Level {
    static FLOAT: OnceLock<Level> = OnceLock::new();
    if int8 {
        return level();
    }
    *FLOAT.get_or_init(|| {
        let l = level();
        if l == Level::Avx512 && !forced() {
            Level::Avx2
        } else {
            l
        }
    })
}

/// True when the AVX2 + FMA + F16C kernels may run.
#[inline]
pub fn avx2() -> bool {
    level() >= Level::Avx2
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Generic => "generic",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_float_rows_on_avx512_leave_the_level() {
        assert_eq!(row_level(true), level());
        if row_level(false) != level() {
            assert!(!forced());
            assert_eq!((level(), row_level(false)), (Level::Avx512, Level::Avx2));
        }
    }
}
