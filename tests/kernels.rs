//! Every CUDA kernel compiles with NVRTC (no GPU needed), the PTX the binary ships is what
//! `cargo xtask ptx` makes from today's sources, and a broken kernel is reported with the
//! compiler's log. `cargo xtask test` installs the NVRTC wheels into target/cuda-wheels.

use steerlm_convert::gpu::{self, nvrtc::Nvrtc};

fn required() -> bool {
    std::env::var("STEERLM_REQUIRE_NVRTC").is_ok_and(|v| v == "1")
}

/// `found`, or `None` with the reason printed when this machine has no such NVRTC. `cargo
/// xtask test` installs it and sets `STEERLM_REQUIRE_NVRTC=1`, so under the README's test
/// command these checks cannot skip.
fn or_skip(found: Result<Nvrtc, String>) -> Option<Nvrtc> {
    match found {
        Ok(n) => Some(n),
        Err(e) if required() => panic!("{e}"),
        Err(e) => {
            eprintln!("SKIPPED: {e}; `cargo xtask test` installs the NVRTC wheels");
            None
        }
    }
}

#[test]
fn every_kernel_compiles_with_nvrtc() {
    let Some(nv) = or_skip(Nvrtc::load()) else {
        return;
    };
    eprintln!("NVRTC {}.{} from {}", nv.version.0, nv.version.1, nv.path);
    // The shipped PTX's target, the A100's and the H100's.
    for arch in ["compute_75", "compute_80", "compute_90"] {
        let ptx = gpu::compile_all(&nv, arch).unwrap_or_else(|log| panic!("{arch}: {log}"));
        assert_eq!(ptx.len(), gpu::KERNELS.len());
        for (name, p) in &ptx {
            assert!(
                p.contains(&format!(".target sm_{}", &arch[8..])),
                "{name}: not PTX for {arch}"
            );
        }
    }
}

#[test]
fn the_shipped_ptx_is_current() {
    let Some(nv) = or_skip(Nvrtc::load_version(gpu::PTX_NVRTC)) else {
        return;
    };
    for k in gpu::KERNELS {
        let ptx = gpu::compile(&nv, k, gpu::PTX_ARCH).unwrap_or_else(|log| panic!("{log}"));
        assert!(
            ptx == k.ptx,
            "{} is not what {} compiles to today: run `cargo xtask ptx` and commit it",
            k.ptx_path(),
            k.file
        );
    }
}

#[test]
fn the_shipped_ptx_targets_compute_75_with_isa_8_4() {
    // No NVRTC needed: what the driver will be given.
    for k in gpu::KERNELS {
        assert!(k.ptx.contains(".version 8.4\n"), "{}", k.ptx_path());
        assert!(k.ptx.contains(".target sm_75\n"), "{}", k.ptx_path());
        for e in k.entries {
            assert!(
                k.ptx.contains(&format!(".entry {e}(")),
                "{}: {e}",
                k.ptx_path()
            );
        }
    }
}

#[test]
fn a_broken_kernel_fails_with_the_compiler_log() {
    let Some(nv) = or_skip(Nvrtc::load()) else {
        return;
    };
    let broken = gpu::KERNELS[0].source().replace("rintf(", "rintff(");
    let err = nv
        .compile("quantize.cu", &broken, "compute_75", &[])
        .unwrap_err();
    assert!(err.contains("rintff"), "{err}");
}
