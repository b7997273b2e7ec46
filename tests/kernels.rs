//! Every CUDA kernel compiles with NVRTC (no GPU needed), and a broken one is reported with
//! the compiler's log. `cargo xtask test` installs NVRTC from the `nvidia-cuda-nvrtc-cu12`
//! wheel when the machine has no CUDA toolkit.

use steerlm_convert::gpu::{self, nvrtc::Nvrtc};

fn nvrtc() -> Nvrtc {
    Nvrtc::load().unwrap_or_else(|e| {
        panic!("{e}\n(run the tests with `cargo xtask test`: it installs the NVRTC wheel)")
    })
}

#[test]
fn every_kernel_compiles_with_nvrtc() {
    let nv = nvrtc();
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
    let nv = nvrtc();
    let (_, _, src) = gpu::kernel_sources().remove(0);
    let broken = src.replace("rintf(", "rintff(");
    let err = nv
        .compile("quantize.cu", &broken, "compute_75", &[])
        .unwrap_err();
    assert!(err.contains("rintff"), "{err}");
}
