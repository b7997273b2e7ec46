//! NVRTC, loaded at run time with `dlopen` from wherever it is: `STEERLM_NVRTC` (a path to
//! `libnvrtc.so*`), the CUDA toolkit, the loader's search path, or the pip wheel
//! `nvidia-cuda-nvrtc-cu12` (`STEERLM_CUDA_WHEELS`, or the wheel beside a Python found on
//! `PATH`). Nothing CUDA is needed to build the binary.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};

type Prog = *mut c_void;
type CreateFn = unsafe extern "C" fn(
    *mut Prog,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type CompileFn = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(Prog, *mut usize) -> c_int;
type GetFn = unsafe extern "C" fn(Prog, *mut c_char) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut Prog) -> c_int;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;

/// A loaded NVRTC library.
pub struct Nvrtc {
    pub path: String,
    pub version: (i32, i32),
    create: CreateFn,
    compile: CompileFn,
    log_size: SizeFn,
    log: GetFn,
    ptx_size: SizeFn,
    ptx: GetFn,
    destroy: DestroyFn,
}

// SAFETY: NVRTC's API is thread-safe for distinct programs; the handle is never closed.
unsafe impl Send for Nvrtc {}
unsafe impl Sync for Nvrtc {}

fn wheel_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("STEERLM_CUDA_WHEELS") {
        dirs.push(PathBuf::from(d));
    }
    // site-packages of the Pythons on PATH.
    for py in ["python3", "python"] {
        if let Ok(out) = std::process::Command::new(py)
            .args([
                "-c",
                "import site,sys;print('\\n'.join(site.getsitepackages()+[site.getusersitepackages()]))",
            ])
            .stderr(std::process::Stdio::null())
            .output()
        {
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                dirs.push(PathBuf::from(l.trim()));
            }
        }
    }
    dirs
}

/// Where NVRTC might be, most specific first.
pub fn candidates() -> Vec<String> {
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os("STEERLM_NVRTC") {
        c.push(p.to_string_lossy().into_owned());
    }
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
    ] {
        for n in ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"] {
            c.push(format!("{d}/{n}"));
        }
    }
    for n in ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"] {
        c.push(n.to_string());
    }
    for d in wheel_dirs() {
        c.push(
            d.join("nvidia/cuda_nvrtc/lib/libnvrtc.so.12")
                .to_string_lossy()
                .into_owned(),
        );
    }
    c
}

/// The include folders of the `nvidia-cuda-runtime-cu12` wheel that exist (its headers).
pub fn wheel_includes() -> Vec<PathBuf> {
    wheel_dirs()
        .into_iter()
        .map(|d| d.join("nvidia/cuda_runtime/include"))
        .filter(|d| d.is_dir())
        .collect()
}

unsafe fn sym<T: Copy>(lib: *mut c_void, name: &str) -> Result<T, String> {
    let c = CString::new(name).expect("no NUL");
    let p = libc::dlsym(lib, c.as_ptr());
    if p.is_null() {
        return Err(format!("NVRTC has no symbol {name}"));
    }
    Ok(std::mem::transmute_copy(&p))
}

impl Nvrtc {
    /// Loads the first candidate that opens.
    pub fn load() -> Result<Nvrtc, String> {
        let cands = candidates();
        for path in &cands {
            if path.starts_with('/') && !Path::new(path).exists() {
                continue;
            }
            let c = CString::new(path.as_str()).map_err(|e| e.to_string())?;
            // SAFETY: dlopen with a valid C string; the handle is kept for the process.
            let lib = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if lib.is_null() {
                continue;
            }
            // SAFETY: the symbols have the signatures of NVRTC's C API (nvrtc.h).
            return unsafe {
                let version: VersionFn = sym(lib, "nvrtcVersion")?;
                let (mut ma, mut mi) = (0, 0);
                version(&mut ma, &mut mi);
                Ok(Nvrtc {
                    path: path.clone(),
                    version: (ma, mi),
                    create: sym(lib, "nvrtcCreateProgram")?,
                    compile: sym(lib, "nvrtcCompileProgram")?,
                    log_size: sym(lib, "nvrtcGetProgramLogSize")?,
                    log: sym(lib, "nvrtcGetProgramLog")?,
                    ptx_size: sym(lib, "nvrtcGetPTXSize")?,
                    ptx: sym(lib, "nvrtcGetPTX")?,
                    destroy: sym(lib, "nvrtcDestroyProgram")?,
                })
            };
        }
        Err("NVRTC (libnvrtc.so) not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc-cu12`, or set STEERLM_NVRTC".into())
    }

    /// Compiles `src` (named `name`) to PTX for `arch` (e.g. `compute_90`); on failure the
    /// compiler's log.
    pub fn compile(
        &self,
        name: &str,
        src: &str,
        arch: &str,
        includes: &[PathBuf],
    ) -> Result<String, String> {
        let csrc = CString::new(src).map_err(|e| e.to_string())?;
        let cname = CString::new(name).map_err(|e| e.to_string())?;
        let mut opts: Vec<CString> = vec![
            CString::new(format!("--gpu-architecture={arch}")).expect("no NUL"),
            CString::new("--std=c++14").expect("no NUL"),
            // Exact IEEE division, denormals kept, no contraction into FMA: the CPU twin's
            // arithmetic.
            CString::new("--prec-div=true").expect("no NUL"),
            CString::new("--ftz=false").expect("no NUL"),
            CString::new("--fmad=false").expect("no NUL"),
        ];
        for i in includes {
            opts.push(
                CString::new(format!("--include-path={}", i.display()))
                    .map_err(|e| e.to_string())?,
            );
        }
        let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let mut prog: Prog = std::ptr::null_mut();
        // SAFETY: NVRTC's C API with valid pointers that outlive the calls.
        unsafe {
            let rc = (self.create)(
                &mut prog,
                csrc.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            if rc != 0 {
                return Err(format!("nvrtcCreateProgram failed ({rc})"));
            }
            let rc = (self.compile)(prog, ptrs.len() as c_int, ptrs.as_ptr());
            let mut n = 0usize;
            (self.log_size)(prog, &mut n);
            let mut log = vec![0u8; n.max(1)];
            (self.log)(prog, log.as_mut_ptr() as *mut c_char);
            let log = CStr::from_bytes_until_nul(&log)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            if rc != 0 {
                (self.destroy)(&mut prog);
                return Err(format!("{name}: NVRTC error {rc}:\n{log}"));
            }
            let mut n = 0usize;
            (self.ptx_size)(prog, &mut n);
            let mut ptx = vec![0u8; n.max(1)];
            (self.ptx)(prog, ptx.as_mut_ptr() as *mut c_char);
            (self.destroy)(&mut prog);
            let ptx = CStr::from_bytes_until_nul(&ptx)
                .map(|c| c.to_string_lossy().into_owned())
                .map_err(|e| e.to_string())?;
            Ok(ptx)
        }
    }
}
