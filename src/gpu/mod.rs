//! The GPU path: kernels in `kernels/*.cu`, compiled at first use by NVRTC for the device's
//! architecture (PTX cached under `$XDG_CACHE_HOME/steerlm-convert`), launched through
//! `cudarc` with the driver loaded at run time. Without a driver or a device every command
//! runs on the CPU; the binary never needs CUDA to build or start.

pub mod nvrtc;

#[cfg(feature = "cuda")]
mod engine;
#[cfg(feature = "cuda")]
pub use engine::CudaEngine;
#[cfg(all(feature = "cuda", feature = "dev-tools"))]
mod timing;
#[cfg(all(feature = "cuda", feature = "dev-tools"))]
pub use timing::KernelTimes;

const COMMON: &str = include_str!("../../kernels/common.cuh");

/// Every kernel source: (file, entry points, source as NVRTC compiles it).
pub fn kernel_sources() -> Vec<(&'static str, &'static [&'static str], String)> {
    vec![
        (
            "quantize.cu",
            &["quantize_int8"][..],
            format!("{COMMON}\n{}", include_str!("../../kernels/quantize.cu")),
        ),
        (
            "cast.cu",
            &["cast_float"][..],
            format!("{COMMON}\n{}", include_str!("../../kernels/cast.cu")),
        ),
    ]
}

/// Compiles every kernel for `arch` (e.g. `compute_75`); returns (file, PTX) pairs or the
/// first compiler log.
pub fn compile_all(nv: &nvrtc::Nvrtc, arch: &str) -> Result<Vec<(&'static str, String)>, String> {
    let inc = nvrtc::wheel_includes();
    kernel_sources()
        .into_iter()
        .map(|(name, entries, src)| {
            let ptx = nv.compile(name, &src, arch, &inc)?;
            for e in entries {
                if !ptx.contains(&format!(".entry {e}")) {
                    return Err(format!("{name}: the PTX has no entry point {e}"));
                }
            }
            Ok((name, ptx))
        })
        .collect()
}

/// PTX of `name` for `arch`, from the cache when the same source was compiled before.
pub fn cached_ptx(nv: &nvrtc::Nvrtc, name: &str, src: &str, arch: &str) -> Result<String, String> {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in src.bytes().chain(arch.bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    let dir = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .map(|d| d.join("steerlm-convert"));
    let file = dir.as_ref().map(|d| {
        d.join(format!(
            "{name}-{arch}-{h:016x}-nvrtc{}.{}.ptx",
            nv.version.0, nv.version.1
        ))
    });
    if let Some(f) = &file {
        if let Ok(p) = std::fs::read_to_string(f) {
            return Ok(p);
        }
    }
    let ptx = nv.compile(name, src, arch, &nvrtc::wheel_includes())?;
    if let (Some(d), Some(f)) = (&dir, &file) {
        // A cache that cannot be written is only slower.
        let _ = std::fs::create_dir_all(d).and_then(|_| {
            let tmp = f.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, &ptx)?;
            std::fs::rename(&tmp, f)
        });
    }
    Ok(ptx)
}

/// Stand-in when built without the `cuda` feature: never opens.
#[cfg(not(feature = "cuda"))]
pub enum CudaEngine {}

#[cfg(not(feature = "cuda"))]
impl CudaEngine {
    pub fn open() -> Result<CudaEngine, String> {
        Err("built without the `cuda` feature".into())
    }
}

#[cfg(not(feature = "cuda"))]
impl crate::quant::engine::Engine for CudaEngine {
    fn name(&self) -> String {
        match *self {}
    }
    fn quantize(
        &self,
        _: &crate::quant::engine::RowSource<'_>,
        _: usize,
        _: usize,
        _: usize,
        _: crate::dtype::DType,
    ) -> Result<crate::quant::engine::QBatch, (usize, crate::quant::int8::RowError)> {
        match *self {}
    }
    fn cast(
        &self,
        _: &crate::quant::engine::RowSource<'_>,
        _: usize,
        _: usize,
        _: crate::dtype::DType,
    ) -> Result<crate::quant::engine::CastBatch, String> {
        match *self {}
    }
}
