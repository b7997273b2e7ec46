//! Loading a kernel file into a CUDA context: the shipped PTX, or (`STEERLM_KERNELS=nvrtc`)
//! NVRTC's for the device's architecture. A module the driver refuses is reported with the
//! driver's JIT log; a cached NVRTC PTX that the driver refuses (a truncated or corrupt
//! file) is compiled again once before that.

use std::ffi::{c_void, CStr, CString};
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaModule};

use super::nvrtc::Nvrtc;
use super::Kernel;

/// The driver's version, as `cuDriverGetVersion` gives it (13000 for CUDA 13.0).
pub fn driver_version() -> Result<i32, String> {
    let mut v = 0;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| format!("cuDriverGetVersion: {e:?}"))?;
    Ok(v)
}

/// How the kernels are compiled: the shipped PTX, or NVRTC for `arch` (with the driver
/// version that keys the cache).
pub enum Source {
    Shipped,
    Nvrtc {
        nv: Nvrtc,
        arch: String,
        driver: i32,
    },
}

impl Source {
    /// What `STEERLM_KERNELS` asks for, for a device of compute capability `cc`.
    pub fn from_env(cc: (i32, i32)) -> Result<Source, String> {
        if !super::use_nvrtc()? {
            return Ok(Source::Shipped);
        }
        Ok(Source::Nvrtc {
            nv: Nvrtc::load().map_err(|e| format!("STEERLM_KERNELS=nvrtc: {e}"))?,
            arch: format!("compute_{}{}", cc.0, cc.1),
            driver: driver_version()?,
        })
    }

    /// A few words for the engine's name.
    pub fn describe(&self) -> String {
        match self {
            Source::Shipped => format!("shipped PTX ({})", super::PTX_ARCH),
            Source::Nvrtc { nv, arch, .. } => format!(
                "NVRTC {}.{} from {}, {arch}",
                nv.version.0, nv.version.1, nv.path
            ),
        }
    }
}

/// Loads `k` into `ctx`.
pub(super) fn load(
    ctx: &Arc<CudaContext>,
    k: &Kernel,
    src: &Source,
) -> Result<Arc<CudaModule>, String> {
    let try_load = |ptx: &str| {
        ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| format!("{e:?}; the driver's JIT log: {}", jit_log(ctx, ptx)))
    };
    match src {
        Source::Shipped => {
            try_load(k.ptx).map_err(|e| format!("{}: the driver refused its PTX: {e}", k.file))
        }
        Source::Nvrtc { nv, arch, driver } => with_recompile(
            |fresh| super::cached_ptx(nv, k, arch, *driver, fresh),
            try_load,
        )
        .map_err(|e| format!("{}: {e}", k.file)),
    }
}

/// Loads what `ptx(false)` gives (the cache, or a compile); when the driver refuses it,
/// compiles again (`ptx(true)`, which replaces the cached file) and loads that.
pub fn with_recompile<M>(
    ptx: impl Fn(bool) -> Result<String, String>,
    load: impl Fn(&str) -> Result<M, String>,
) -> Result<M, String> {
    let first = ptx(false)?;
    match load(&first) {
        Ok(m) => Ok(m),
        Err(_) => {
            let again = ptx(true)?;
            load(&again).map_err(|e| format!("the driver refused NVRTC's PTX: {e}"))
        }
    }
}

/// The driver's error and information logs for loading `ptx`, or a note that there are
/// none.
fn jit_log(ctx: &Arc<CudaContext>, ptx: &str) -> String {
    let Ok(src) = CString::new(ptx) else {
        return "(the PTX holds a NUL byte)".into();
    };
    if ctx.bind_to_thread().is_err() {
        return "(unavailable: the context cannot be bound)".into();
    }
    const N: usize = 1 << 14;
    let mut err = vec![0u8; N];
    let mut info = vec![0u8; N];
    let mut opts = [
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
        sys::CUjit_option::CU_JIT_INFO_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
    ];
    let mut vals: [*mut c_void; 4] = [
        err.as_mut_ptr().cast(),
        N as *mut c_void,
        info.as_mut_ptr().cast(),
        N as *mut c_void,
    ];
    let mut m: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: the option values are the buffers and their sizes, which outlive the call.
    let rc = unsafe {
        sys::cuModuleLoadDataEx(
            &mut m,
            src.as_ptr().cast(),
            opts.len() as u32,
            opts.as_mut_ptr(),
            vals.as_mut_ptr(),
        )
    };
    if rc == sys::CUresult::CUDA_SUCCESS {
        // SAFETY: the module was just loaded and is used by nothing.
        unsafe { sys::cuModuleUnload(m) };
    }
    let text = |b: &[u8]| {
        CStr::from_bytes_until_nul(b)
            .map(|c| c.to_string_lossy().trim().to_string())
            .unwrap_or_default()
    };
    let log = [text(&err), text(&info)]
        .into_iter()
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    if log.is_empty() {
        "(empty)".into()
    } else {
        log
    }
}

#[cfg(test)]
mod tests {
    use super::with_recompile;
    use std::cell::Cell;

    #[test]
    fn a_refused_cached_ptx_is_compiled_again() {
        let compiles = Cell::new(0);
        let got = with_recompile(
            |fresh| {
                if fresh {
                    compiles.set(compiles.get() + 1);
                    Ok(".version 8.4 good".to_string())
                } else {
                    Ok(".version 8.4 trunc".to_string())
                }
            },
            |p| {
                if p.ends_with("good") {
                    Ok(p.len())
                } else {
                    Err("CUDA_ERROR_INVALID_PTX".to_string())
                }
            },
        );
        assert_eq!(got, Ok(17));
        assert_eq!(compiles.get(), 1);
    }

    #[test]
    fn a_ptx_refused_twice_is_an_error_with_the_reason() {
        let got: Result<(), String> = with_recompile(
            |_| Ok("x".to_string()),
            |_| Err("CUDA_ERROR_INVALID_PTX; the driver's JIT log: line 3: bad".to_string()),
        );
        let e = got.unwrap_err();
        assert!(e.contains("line 3: bad"), "{e}");
    }
}
