//! NVRTC, loaded at run time with `dlopen` from wherever it is: `STEERLM_NVRTC` (a path to
//! `libnvrtc.so*`), the CUDA toolkit (`CUDA_HOME`, `CUDA_PATH`, `/usr/local/cuda`), the
//! loader's search path, or a pip wheel: `nvidia-cuda-nvrtc` (CUDA 13, `nvidia/cu13/lib`) or
//! `nvidia-cuda-nvrtc-cu12` (`nvidia/cuda_nvrtc/lib`), in `STEERLM_CUDA_WHEELS` or the
//! site-packages of a Python found on `PATH`. Nothing CUDA is needed to build the binary, and
//! running needs NVRTC only for `STEERLM_KERNELS=nvrtc` (the kernels ship as PTX).
//!
//! NVRTC opens its builtins library (`libnvrtc-builtins.so.<major>.<minor>`) by name at the
//! first compile, which fails when NVRTC was opened by full path from a folder the loader
//! does not search (a wheel). So the builtins of the same folder are opened first: the
//! loader then finds them already loaded.

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

/// Toolkit library folders: `CUDA_HOME`, `CUDA_PATH`, then `/usr/local/cuda`.
fn toolkit_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots
        .iter()
        .flat_map(|r| [r.join("lib64"), r.join("targets/x86_64-linux/lib")])
        .collect()
}

/// The library names, CUDA 13 before 12.
const NAMES: [&str; 3] = ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"];

/// Where NVRTC might be, most specific first.
pub fn candidates() -> Vec<String> {
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os("STEERLM_NVRTC") {
        c.push(p.to_string_lossy().into_owned());
    }
    for d in toolkit_dirs() {
        for n in NAMES {
            c.push(d.join(n).to_string_lossy().into_owned());
        }
    }
    for n in NAMES {
        c.push(n.to_string());
    }
    for d in wheel_dirs() {
        for lib in [
            "nvidia/cu13/lib/libnvrtc.so.13",
            "nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
        ] {
            c.push(d.join(lib).to_string_lossy().into_owned());
        }
    }
    c
}

/// The builtins library beside `lib` (a full path to `libnvrtc.so*`) of the same major
/// version, if the folder has one: `libnvrtc-builtins.so.13.0` beside `libnvrtc.so.13`.
pub fn builtins_beside(lib: &Path) -> Option<PathBuf> {
    let dir = lib.parent()?;
    let name = lib.file_name()?.to_str()?;
    let major = name
        .strip_prefix("libnvrtc.so.")
        .and_then(|v| v.split('.').next());
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let Some(n) = p.file_name().and_then(|n| n.to_str()) else {
                return false;
            };
            match (n.strip_prefix("libnvrtc-builtins.so."), major) {
                (Some(v), Some(m)) => v.split('.').next() == Some(m),
                (Some(_), None) => true,
                _ => false,
            }
        })
        .collect();
    // The most specific name (libnvrtc-builtins.so.13.0 over a bare .so link).
    found.sort();
    found.pop()
}

/// The include folders of the CUDA runtime wheels that exist (their headers).
pub fn wheel_includes() -> Vec<PathBuf> {
    wheel_dirs()
        .into_iter()
        .flat_map(|d| {
            [
                d.join("nvidia/cu13/include"),
                d.join("nvidia/cuda_runtime/include"),
            ]
        })
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
        for path in candidates() {
            if path.starts_with('/') && !Path::new(&path).exists() {
                continue;
            }
            if let Ok(n) = Nvrtc::open(&path) {
                return Ok(n);
            }
        }
        Err("NVRTC (libnvrtc.so) not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc`, or set STEERLM_NVRTC".into())
    }

    /// The first candidate whose release is `want` (major, minor): the NVRTC that writes
    /// the shipped PTX.
    pub fn load_version(want: (i32, i32)) -> Result<Nvrtc, String> {
        let mut seen = Vec::new();
        for path in candidates() {
            if path.starts_with('/') && !Path::new(&path).exists() {
                continue;
            }
            if let Ok(n) = Nvrtc::open(&path) {
                if n.version == want {
                    return Ok(n);
                }
                seen.push(format!("{}.{} ({})", n.version.0, n.version.1, n.path));
            }
        }
        Err(format!(
            "NVRTC {}.{} not found (found: {}); `pip install nvidia-cuda-nvrtc-cu12=={}.{}.*` and set STEERLM_CUDA_WHEELS, or run `cargo xtask test`, which installs it",
            want.0,
            want.1,
            if seen.is_empty() { "none".to_string() } else { seen.join(", ") },
            want.0,
            want.1
        ))
    }

    /// Opens NVRTC from `path` (a full path, or a name the loader searches for). A full
    /// path first opens the builtins library beside it.
    pub fn open(path: &str) -> Result<Nvrtc, String> {
        let dl = |p: &str, flags: c_int| -> Result<*mut c_void, String> {
            let c = CString::new(p).map_err(|e| e.to_string())?;
            // SAFETY: dlopen with a valid C string; the handle is kept for the process.
            let lib = unsafe { libc::dlopen(c.as_ptr(), flags) };
            if lib.is_null() {
                // SAFETY: dlerror returns a C string owned by libc, or null.
                let why = unsafe { libc::dlerror() };
                let why = if why.is_null() {
                    String::new()
                } else {
                    unsafe { CStr::from_ptr(why) }
                        .to_string_lossy()
                        .into_owned()
                };
                return Err(format!("cannot open {p}: {why}"));
            }
            Ok(lib)
        };
        if path.starts_with('/') {
            if let Some(b) = builtins_beside(Path::new(path)) {
                dl(&b.to_string_lossy(), libc::RTLD_NOW | libc::RTLD_GLOBAL)?;
            }
        }
        // Local: two NVRTC versions in one process must not resolve each other's symbols.
        let lib = dl(path, libc::RTLD_NOW | libc::RTLD_LOCAL)?;
        // SAFETY: the symbols have the signatures of NVRTC's C API (nvrtc.h).
        unsafe {
            let version: VersionFn = sym(lib, "nvrtcVersion")?;
            let (mut ma, mut mi) = (0, 0);
            version(&mut ma, &mut mi);
            Ok(Nvrtc {
                path: path.to_string(),
                version: (ma, mi),
                create: sym(lib, "nvrtcCreateProgram")?,
                compile: sym(lib, "nvrtcCompileProgram")?,
                log_size: sym(lib, "nvrtcGetProgramLogSize")?,
                log: sym(lib, "nvrtcGetProgramLog")?,
                ptx_size: sym(lib, "nvrtcGetPTXSize")?,
                ptx: sym(lib, "nvrtcGetPTX")?,
                destroy: sym(lib, "nvrtcDestroyProgram")?,
            })
        }
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

#[cfg(test)]
mod tests {
    use super::builtins_beside;

    #[test]
    fn the_builtins_of_the_same_major_version_are_found_beside_nvrtc() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "libnvrtc.so.13",
            "libnvrtc-builtins.so.13.0",
            "libnvrtc-builtins.alt.so.13.0",
            "libnvrtc-builtins.so.12.4",
        ] {
            std::fs::write(d.path().join(f), b"").unwrap();
        }
        let got = builtins_beside(&d.path().join("libnvrtc.so.13")).unwrap();
        assert_eq!(got.file_name().unwrap(), "libnvrtc-builtins.so.13.0");
        let got = builtins_beside(&d.path().join("libnvrtc.so.12")).unwrap();
        assert_eq!(got.file_name().unwrap(), "libnvrtc-builtins.so.12.4");
        assert!(builtins_beside(&d.path().join("libnvrtc.so.11")).is_none());
    }
}
