//! Every CUDA kernel compiles with NVRTC (no GPU needed), and a broken one is reported with
//! the compiler's log. `cargo xtask test` installs NVRTC from the `nvidia-cuda-nvrtc-cu12`
//! wheel when the machine has no CUDA toolkit.

use steerlm_convert::gpu::{self, nvrtc::Nvrtc};

/// NVRTC, or `None` with the reason printed when this machine has none. `cargo xtask
/// test` installs it and sets `STEERLM_REQUIRE_NVRTC=1`, so under the README's test
/// command these checks cannot skip.
fn nvrtc() -> Option<Nvrtc> {
    match Nvrtc::load() {
        Ok(n) => Some(n),
        Err(e) if std::env::var("STEERLM_REQUIRE_NVRTC").is_ok_and(|v| v == "1") => {
            panic!("{e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: no NVRTC ({e}); `cargo xtask test` installs the wheel");
            None
        }
    }
}

#[test]
fn every_kernel_compiles_with_nvrtc() {
    let Some(nv) = nvrtc() else { return };
    eprintln!("NVRTC {}.{} from {}", nv.version.0, nv.version.1, nv.path);
    // The oldest architecture NVRTC 12 and 13 both target, and the H100's.
    for arch in ["compute_75", "compute_90"] {
        let ptx = gpu::compile_all(&nv, arch).unwrap_or_else(|log| panic!("{arch}: {log}"));
        assert_eq!(ptx.len(), gpu::kernel_sources().len());
        for (name, p) in &ptx {
            assert!(p.contains(".target sm_"), "{name}: not PTX");
        }
    }
}

#[test]
fn a_broken_kernel_fails_with_the_compiler_log() {
    let Some(nv) = nvrtc() else { return };
    let (_, _, src) = gpu::kernel_sources().remove(0);
    let broken = src.replace("rintf(", "rintff(");
    let err = nv
        .compile("quantize.cu", &broken, "compute_75", &[])
        .unwrap_err();
    assert!(err.contains("rintff"), "{err}");
}
