//! The one CPU-feature check every kernel dispatches on. `STEERLM_ISA=generic|avx2` (or
//! `STEERLM_NO_SIMD`, any value, for generic) forces a path everywhere, so that tests can
//! compare every path with the others.

use std::sync::OnceLock;

/// The instruction-set level the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Portable Rust, whatever the CPU.
    Generic,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
}

/// The best level this CPU supports.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        return Level::Avx2;
    }
    Level::Generic
}

/// Detected once per process. `STEERLM_ISA=generic|avx2` forces a level (to test every
/// kernel path on one machine); one the CPU lacks is refused with a warning and the
/// detected level is used.
pub fn level() -> Level {
    static L: OnceLock<Level> = OnceLock::new();
    *L.get_or_init(|| {
        if std::env::var_os("STEERLM_NO_SIMD").is_some() {
            return Level::Generic;
        }
        let best = detected();
        match std::env::var("STEERLM_ISA").ok().as_deref() {
            None | Some("") => best,
            Some("generic") => Level::Generic,
            Some("avx2") if best == Level::Avx2 => Level::Avx2,
            Some(other) => {
                eprintln!(
                    "warning: STEERLM_ISA={other}: not a level this CPU runs (generic, avx2); using {}",
                    best.as_str()
                );
                best
            }
        }
    })
}

/// True when the AVX2 + FMA + F16C kernels may run.
#[inline]
pub fn avx2() -> bool {
    level() == Level::Avx2
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Generic => "generic",
            Level::Avx2 => "avx2",
        }
    }
}
