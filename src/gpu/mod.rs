//! The GPU path: kernels in `kernels/*.cu`, shipped as PTX for a generic target
//! (`kernels/ptx/*.ptx`, compute_75, made by `cargo xtask ptx` with the NVRTC of
//! [`PTX_NVRTC`]) that the driver compiles for the device it finds, launched through
//! `cudarc` with the driver loaded at run time. Running needs only the NVIDIA driver: no
//! toolkit, no NVRTC. `STEERLM_KERNELS=nvrtc` compiles the sources with NVRTC instead, for
//! the device's own architecture (development; PTX cached under
//! `$XDG_CACHE_HOME/steerlm-convert`). Without a driver or a device every command runs on
//! the CPU; the binary never needs CUDA to build or start.

pub mod nvrtc;
pub mod status;

#[cfg(feature = "cuda")]
mod engine;
#[cfg(feature = "cuda")]
pub use engine::CudaEngine;
#[cfg(feature = "cuda")]
mod module;
#[cfg(feature = "cuda")]
pub use module::{driver_version, Source};
#[cfg(all(feature = "cuda", feature = "dev-tools"))]
mod timing;
#[cfg(all(feature = "cuda", feature = "dev-tools"))]
pub use timing::KernelTimes;

const COMMON: &str = include_str!("../../kernels/common.cuh");

/// The target of the shipped PTX: the oldest architecture that NVRTC 12 and 13 both
/// compile for; drivers compile it for any newer device.
pub const PTX_ARCH: &str = "compute_75";

/// The NVRTC release (major, minor) that wrote the shipped PTX. Its PTX ISA (8.4) is one
/// that every driver since 550 (CUDA 12.4) compiles; `cargo xtask test` installs this
/// release so that the tests can check the PTX is current.
pub const PTX_NVRTC: (i32, i32) = (12, 4);

/// One kernel file: its entry points, its source, and the PTX shipped for it.
pub struct Kernel {
    pub file: &'static str,
    pub entries: &'static [&'static str],
    body: &'static str,
    /// `kernels/ptx/<file>.ptx`, as `cargo xtask ptx` wrote it.
    pub ptx: &'static str,
}

impl Kernel {
    /// The source as NVRTC compiles it (with `common.cuh` in front).
    pub fn source(&self) -> String {
        format!("{COMMON}\n{}", self.body)
    }

    /// Where `cargo xtask ptx` writes this kernel's PTX, relative to the repository.
    pub fn ptx_path(&self) -> String {
        format!("kernels/ptx/{}", self.file.replace(".cu", ".ptx"))
    }
}

/// Every kernel file.
pub const KERNELS: &[Kernel] = &[
    Kernel {
        file: "quantize.cu",
        entries: &["quantize_int8"],
        body: include_str!("../../kernels/quantize.cu"),
        ptx: include_str!("../../kernels/ptx/quantize.ptx"),
    },
    Kernel {
        file: "cast.cu",
        entries: &["cast_float"],
        body: include_str!("../../kernels/cast.cu"),
        ptx: include_str!("../../kernels/ptx/cast.ptx"),
    },
    Kernel {
        file: "runtime.cu",
        entries: &[
            "embed_rows",
            "rms_norm",
            "rope_qkv",
            "attention",
            "silu_mul",
            "add_into",
            "matvec",
            "argmax",
        ],
        body: include_str!("../../kernels/runtime.cu"),
        ptx: include_str!("../../kernels/ptx/runtime.ptx"),
    },
];

/// Compiles one kernel for `arch` (e.g. `compute_75`) and checks that the PTX has its
/// entry points; on failure the compiler's log.
pub fn compile(nv: &nvrtc::Nvrtc, k: &Kernel, arch: &str) -> Result<String, String> {
    let ptx = nv.compile(k.file, &k.source(), arch, &nvrtc::wheel_includes())?;
    for e in k.entries {
        if !ptx.contains(&format!(".entry {e}")) {
            return Err(format!("{}: the PTX has no entry point {e}", k.file));
        }
    }
    Ok(ptx)
}

/// Compiles every kernel for `arch`; returns (file, PTX) pairs or the first compiler log.
pub fn compile_all(nv: &nvrtc::Nvrtc, arch: &str) -> Result<Vec<(&'static str, String)>, String> {
    KERNELS
        .iter()
        .map(|k| Ok((k.file, compile(nv, k, arch)?)))
        .collect()
}

/// The file under `dir` that caches the PTX of `k` for `arch`, NVRTC `nv_version` and the
/// driver `driver` (as `cuDriverGetVersion` gives it): a new driver or NVRTC, or a changed
/// source, is a new file.
pub fn cache_file(
    dir: &std::path::Path,
    k: &Kernel,
    arch: &str,
    nv_version: (i32, i32),
    driver: i32,
) -> std::path::PathBuf {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in k.source().bytes().chain(arch.bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    dir.join(format!(
        "{}-{arch}-{h:016x}-nvrtc{}.{}-driver{driver}.ptx",
        k.file, nv_version.0, nv_version.1
    ))
}

/// The folder of the NVRTC PTX cache: `$XDG_CACHE_HOME/steerlm-convert` or
/// `~/.cache/steerlm-convert`.
pub fn cache_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .map(|d| d.join("steerlm-convert"))
}

/// PTX of `k` compiled by NVRTC for `arch`, from the cache when the same source was
/// compiled before by the same NVRTC for the same driver. `fresh` skips the cache (a
/// cached file the driver refused is compiled again and replaced).
pub fn cached_ptx(
    nv: &nvrtc::Nvrtc,
    k: &Kernel,
    arch: &str,
    driver: i32,
    fresh: bool,
) -> Result<String, String> {
    let dir = cache_dir();
    let file = dir
        .as_ref()
        .map(|d| cache_file(d, k, arch, nv.version, driver));
    if let (Some(f), false) = (&file, fresh) {
        if let Ok(p) = std::fs::read_to_string(f) {
            return Ok(p);
        }
    }
    let ptx = compile(nv, k, arch)?;
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

/// Whether `STEERLM_KERNELS=nvrtc` asks for the kernels compiled by NVRTC rather than the
/// shipped PTX; any other value than `ptx` or `nvrtc` is an error.
pub fn use_nvrtc() -> Result<bool, String> {
    match std::env::var("STEERLM_KERNELS").as_deref() {
        Err(_) | Ok("") | Ok("ptx") => Ok(false),
        Ok("nvrtc") => Ok(true),
        Ok(v) => Err(format!("STEERLM_KERNELS={v}: expected `ptx` or `nvrtc`")),
    }
}

/// A context on device 0, or the one-line reason there is none: no driver library, no
/// device, or a driver error. Never panics (cudarc panics when a call needs a driver that
/// is absent, so its presence is probed first).
#[cfg(feature = "cuda")]
pub fn open_context() -> Result<std::sync::Arc<cudarc::driver::CudaContext>, String> {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda.so) found".into());
    }
    let n = cudarc::driver::CudaContext::device_count()
        .map_err(|e| format!("cuDeviceGetCount: {e:?}"))?;
    if n < 1 {
        return Err("the CUDA driver sees no device".into());
    }
    cudarc::driver::CudaContext::new(0).map_err(|e| format!("creating a CUDA context: {e:?}"))
}

/// The entry points `entries` of the kernel file `file`, loaded into `ctx` from `src`.
#[cfg(feature = "cuda")]
pub fn functions(
    ctx: &std::sync::Arc<cudarc::driver::CudaContext>,
    file: &str,
    entries: &[&str],
    src: &Source,
) -> Result<Vec<cudarc::driver::CudaFunction>, String> {
    let k = KERNELS
        .iter()
        .find(|k| k.file == file)
        .ok_or_else(|| format!("no kernel file {file}"))?;
    let m = module::load(ctx, k, src)?;
    entries
        .iter()
        .map(|e| {
            m.load_function(e)
                .map_err(|err| format!("{file}: entry point {e}: {err:?}"))
        })
        .collect()
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
