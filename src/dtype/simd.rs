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
