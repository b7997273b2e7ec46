//! CUDA 13's NVRTC, opened by full path from the folder its pip wheel installs
//! (`nvidia/cu13/lib`, which the loader does not search), compiles every kernel: its
//! builtins library is found beside it. A test binary of its own, so that no other NVRTC
//! is loaded in the process.

use std::path::PathBuf;
use steerlm_convert::gpu::{self, nvrtc::Nvrtc};

#[test]
fn cuda_13_nvrtc_compiles_from_its_wheel_folder() {
    let lib = std::env::var_os("STEERLM_CUDA_WHEELS")
        .map(|d| PathBuf::from(d).join("nvidia/cu13/lib/libnvrtc.so.13"))
        .filter(|p| p.exists());
    let Some(lib) = lib else {
        if std::env::var("STEERLM_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("no nvidia/cu13/lib/libnvrtc.so.13 under STEERLM_CUDA_WHEELS");
        }
        eprintln!("SKIPPED: no CUDA 13 NVRTC wheel; `cargo xtask test` installs it");
        return;
    };
    let nv = Nvrtc::open(&lib.to_string_lossy()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(nv.version.0, 13, "{}", nv.path);
    for arch in ["compute_80", "compute_90"] {
        gpu::compile_all(&nv, arch).unwrap_or_else(|log| panic!("{arch}: {log}"));
    }
}
