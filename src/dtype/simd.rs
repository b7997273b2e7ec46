//! The one CPU-feature check every kernel dispatches on. `STEERLM_NO_SIMD` (any value)
//! forces the portable paths everywhere, so that tests can compare them with the wide ones.

use std::sync::OnceLock;

/// The instruction-set level the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Portable Rust, whatever the CPU.
    Generic,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
}

/// Detected once per process.
pub fn level() -> Level {
    static L: OnceLock<Level> = OnceLock::new();
    *L.get_or_init(|| {
        if std::env::var_os("STEERLM_NO_SIMD").is_some() {
            return Level::Generic;
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return Level::Avx2;
        }
        Level::Generic
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
