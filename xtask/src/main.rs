//! Project tasks: `cargo xtask synth`, `cargo xtask bench inspect`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use steerlm_convert::dtype::DType;
use steerlm_convert::synth::{self, SynthSpec};

mod bench;
mod bench_generate;
mod bench_kernels;
mod bench_verify;
mod gpu_bundle;
mod gpu_check;
mod gpu_kernels;

/// The NVRTC wheels the tests need, installed into `target/cuda-wheels`: the release that
/// writes the shipped PTX (`gpu::PTX_NVRTC`; the tests check the PTX is current with it),
/// and CUDA 13's, whose libraries sit in `nvidia/cu13/lib` (the tests load it by full path).
const NVRTC_WHEELS: [(&str, &str); 2] = [
    (
        "nvidia/cuda_nvrtc/lib/libnvrtc-builtins.so.12.4",
        "nvidia-cuda-nvrtc-cu12==12.4.127",
    ),
    (
        "nvidia/cu13/lib/libnvrtc.so.13",
        "nvidia-cuda-nvrtc==13.0.88",
    ),
];

/// `target/cuda-wheels`, with the NVRTC wheels installed when missing.
fn cuda_wheels(root: &Path) -> Result<PathBuf> {
    let wheels = root.join("target/cuda-wheels");
    let missing: Vec<&str> = NVRTC_WHEELS
        .iter()
        .filter(|(f, _)| !wheels.join(f).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        eprintln!("installing {} into {}", missing.join(" "), wheels.display());
        let pip = |extra: &[&str]| -> Result<bool> {
            Ok(Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--upgrade", "--target"])
                .arg(&wheels)
                .args(extra)
                .args(&missing)
                .status()
                .context("python3 -m pip (needed to fetch NVRTC for the kernel checks)")?
                .success())
        };
        // Distributions that mark their Python externally managed want the flag even for
        // --target.
        if !pip(&[])? && !pip(&["--break-system-packages"])? {
            bail!("pip could not install {}", missing.join(" "));
        }
    }
    Ok(wheels)
}

/// Runs the test suite with the NVRTC wheels available.
fn test_cmd() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root).args(["test", "--workspace"]);
    cmd.env("STEERLM_CUDA_WHEELS", cuda_wheels(&root)?);
    cmd.env("STEERLM_REQUIRE_NVRTC", "1");
    python_deps(&root, &mut cmd)?;
    let st = cmd.status()?;
    if !st.success() {
        bail!("tests failed");
    }
    Ok(())
}

/// `cargo xtask ptx`: writes `kernels/ptx/*.ptx` with the NVRTC release that the shipped
/// PTX is made with (installed into target/cuda-wheels when missing).
fn ptx_cmd() -> Result<()> {
    use steerlm_convert::gpu;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if std::env::var_os("STEERLM_CUDA_WHEELS").is_none() {
        // Single-threaded here: nothing reads the environment concurrently.
        std::env::set_var("STEERLM_CUDA_WHEELS", cuda_wheels(&root)?);
    }
    let nv = gpu::nvrtc::Nvrtc::load_version(gpu::PTX_NVRTC).map_err(anyhow::Error::msg)?;
    for k in gpu::KERNELS {
        let ptx = gpu::compile(&nv, k, gpu::PTX_ARCH).map_err(anyhow::Error::msg)?;
        let path = root.join(k.ptx_path());
        let tmp = path.with_extension("ptx.tmp");
        std::fs::write(&tmp, &ptx).with_context(|| tmp.display().to_string())?;
        std::fs::rename(&tmp, &path).with_context(|| path.display().to_string())?;
        println!(
            "{}: {} bytes of PTX for {} (NVRTC {}.{})",
            k.ptx_path(),
            ptx.len(),
            gpu::PTX_ARCH,
            nv.version.0,
            nv.version.1
        );
    }
    Ok(())
}

/// The tokenizer checks run transformers on the folders we write, and the `serve` tests
/// run the model card's client (requests) and the openai client. When python3 cannot
/// import them, fixtures/requirements-tokenizer.txt is installed into target/py-deps (no
/// root needed). The tests are then told to fail, never skip, without them.
fn python_deps(root: &Path, cmd: &mut Command) -> Result<()> {
    const PROBE: &str = "import transformers, sentencepiece, google.protobuf, requests, openai";
    let deps = root.join("target/py-deps");
    let importable = |path: Option<&Path>| {
        let mut c = Command::new("python3");
        c.args(["-c", PROBE]);
        if let Some(p) = path {
            c.env("PYTHONPATH", p);
        }
        c.output().is_ok_and(|o| o.status.success())
    };
    if !importable(None) {
        if !importable(Some(&deps)) {
            eprintln!(
                "installing fixtures/requirements-tokenizer.txt into {}",
                deps.display()
            );
            let pip = |extra: &[&str]| -> Result<bool> {
                Ok(Command::new("python3")
                    .args(["-m", "pip", "install", "--quiet", "--target"])
                    .arg(&deps)
                    .args(extra)
                    .arg("-r")
                    .arg(root.join("fixtures/requirements-tokenizer.txt"))
                    .status()
                    .context("python3 -m pip (needed for the transformers tokenizer checks)")?
                    .success())
            };
            if !pip(&[])? && !pip(&["--break-system-packages"])? {
                bail!("pip could not install fixtures/requirements-tokenizer.txt");
            }
        }
        cmd.env("PYTHONPATH", &deps);
    }
    cmd.env("STEERLM_PYTHON", "python3")
        .env("STEERLM_REQUIRE_PYTHON", "1");
    Ok(())
}

pub(crate) const USAGE: &str = "usage:
  cargo xtask synth OUT.nemo [--layers N] [--tp N] [--pp N] [--dtype bf16|fp16|fp32]
                             [--hidden H --heads A --groups G --ffn F --vocab V]
      Writes a synthetic archive (Llama-2 13B shapes at TP 4 by default) with the
      project's own torch writer.
  cargo xtask bench inspect [--layers 4,16] [--dir DIR]
      Times `steerlm-convert inspect` and measures its peak RSS on synthetic 13B-shaped
      archives (made in DIR, default target/bench, if absent).
  cargo xtask bench convert [--layers 4,16] [--dir DIR] [--python PY] [--runs 3]
      nemo-to-safetensors on the same archives against `cp` (+ fsync) of the archive to
      the same disk, and against the Python way (torch.load + cat + save_file) when PY
      (default: python3) imports torch.
  cargo xtask bench reshard [--layers 4,16] [--dir DIR] [--runs 3]
      reshard TP 4 -> TP 2 and -> TP 8 (safetensors and .nemo output) against `cp` (+ fsync)
      of the archive, with peak RSS. The disk is noisy: cp and ours alternate and the best
      of --runs of each is kept.
  cargo xtask bench quantize [--layers 4] [--dir DIR] [--runs 2]
      int8 (channel) and fp16 quantize of the 13B-shaped archive on the CPU (and the GPU
      when there is one): GB/s of input against this machine's memory read bandwidth and
      against cp (+ fsync) of the archive.
  cargo xtask bench generate [--dir DIR] [--tokens 64] [--runs 2]
                             [--llama-bench PATH [--llama-convert PY_SCRIPT] [--python PY]]
                             [--weights bf16,int8,...] [--threads N] [--tests tg,pp256,...]
      Decode (tg) and prompt (pp256, pp1024) tokens/s of a synthetic 134M Llama (f32,
      bf16, f16, int8 channel / group 128 / group 32) at 1 and 2 threads, against the
      bandwidth limit (weight bytes per token / measured read bandwidth) and, given a
      llama.cpp you built (PATH: its llama-bench; llama-quantize beside it), against
      llama.cpp on GGUF files its own convert_hf_to_gguf.py and llama-quantize make from
      the same folder, the two run alternately. --weights, --threads and --tests keep
      only the rows named (weights as printed; tests by prefix).
  cargo xtask bench kernels [--cols N] [NAME...]
      Each CPU weight-row kernel alone (those whose names contain a NAME given): GB/s
      from memory against the read bandwidth, and in cache (its compute ceiling), at 1
      and 2 threads, over rows of N columns (4096; the 134M model's are 768 and 2048).
  cargo xtask bench verify [--layers 20] [--dir DIR] [--tokens 16]
      verify of a synthetic 13B-shaped TP 4 bf16 archive (made if absent) against its
      HF conversion, 1 prompt, from a cold page cache: wall time, peak anonymous and
      file-backed RSS, and the time of each phase, with the reading phases in MB/s
      against `cat` of the same files.
  cargo xtask ptx
      Writes kernels/ptx/*.ptx (the PTX the binary ships, for compute_75) from
      kernels/*.cu with NVRTC 12.4 (nvidia-cuda-nvrtc-cu12==12.4.127, installed into
      target/cuda-wheels when missing). The tests fail when the PTX is not current.
  cargo xtask test
      The test suite: installs NVRTC 12.4 and 13.0 (nvidia-cuda-nvrtc-cu12,
      nvidia-cuda-nvrtc) into target/cuda-wheels when missing (the kernels are
      compile-checked for sm_75, sm_80 and sm_90, the shipped PTX is checked current,
      and CUDA 13's NVRTC is loaded from its wheel folder), and transformers + sentencepiece + requests + openai
      (fixtures/requirements-tokenizer.txt) into target/py-deps when python3 lacks them
      (the tokenizer and serve checks), then runs
      cargo test --workspace.
  cargo xtask gpu-bundle [DIR]
      Builds, on a CPU machine, what the GPU check needs on a machine with no Rust and no
      network (release binary, xtask, the GPU test binaries, stripped; under 64 MiB) into
      DIR (default target/gpu-bundle) with run.sh, the one prepared script: there, from
      the repository root, `bash target/gpu-bundle/run.sh OUT_DIR`.
  cargo xtask gpu-check [--bin PATH] [--log FILE] [--dir DIR] [--synth-layers 40]
      On a machine with a GPU, from prebuilt binaries (the xtask binary itself runs it
      with no cargo: `xtask gpu-check --bin target/release/steerlm-convert`, or
      STEERLM_BIN): quantize and cast against the CPU on random and constructed inputs
      (bit-identical int8, scales and casts; the same refused row), each runtime kernel
      against its CPU twin at several sizes, kernel timings against the device copy
      bandwidth, and quantize end to end on the GPU against the CPU. One PASS/FAIL line
      per check to stdout and FILE (default gpu-check.log); it keeps going after a
      failure and exits non-zero if any failed.";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("synth") => synth_cmd(&args[1..]),
        Some("bench") => match args.get(1).map(String::as_str) {
            Some("inspect") => bench_inspect(&args[2..]),
            Some("convert") => bench_convert(&args[2..]),
            Some("reshard") => bench_reshard(&args[2..]),
            Some("quantize") => bench::quantize(&args[2..]),
            Some("generate") => bench_generate::generate(&args[2..]),
            Some("verify") => bench_verify::verify(&args[2..]),
            Some("kernels") => bench_kernels::kernels(&args[2..]),
            _ => bail!("{USAGE}"),
        },
        Some("test") => test_cmd(),
        Some("ptx") => ptx_cmd(),
        Some("gpu-check") => gpu_check::run(&args[1..]),
        Some("gpu-bundle") => gpu_bundle::run(&args[1..]),
        _ => bail!("{USAGE}"),
    }
}

pub(crate) fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

pub(crate) fn num(args: &[String], name: &str, default: u64) -> Result<u64> {
    flag(args, name).map_or(Ok(default), |v| {
        v.parse().with_context(|| format!("{name} {v}"))
    })
}

fn synth_cmd(args: &[String]) -> Result<()> {
    let out = args
        .first()
        .filter(|a| !a.starts_with("--"))
        .context(USAGE)?;
    let mut spec = SynthSpec::llama2_13b(num(args, "--layers", 4)?);
    spec.tp = num(args, "--tp", spec.tp)?;
    spec.pp = num(args, "--pp", spec.pp)?;
    spec.hidden = num(args, "--hidden", spec.hidden)?;
    spec.heads = num(args, "--heads", spec.heads)?;
    spec.groups = num(args, "--groups", spec.heads)?;
    spec.ffn = num(args, "--ffn", spec.ffn)?;
    spec.vocab = num(args, "--vocab", spec.vocab)?;
    spec.dtype = match flag(args, "--dtype").unwrap_or("bf16") {
        "bf16" => DType::BF16,
        "fp16" => DType::F16,
        "fp32" => DType::F32,
        d => bail!("unknown dtype {d}"),
    };
    let t = Instant::now();
    let bytes = synth::write(&spec, Path::new(out), |_| {})?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "wrote {out}: {} layers, TP {} x PP {}, {:.2} GB of tensors in {s:.1} s ({:.2} GB/s)",
        spec.layers,
        spec.tp,
        spec.pp,
        bytes as f64 / 1e9,
        bytes as f64 / 1e9 / s
    );
    Ok(())
}

/// Runs a command and returns (wall seconds, peak RSS of the child in bytes).
pub(crate) fn measure(cmd: &mut Command) -> Result<(f64, u64, std::process::Output)> {
    let t = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id() as libc::pid_t;
    // Reap the child ourselves with wait4 to get its own rusage (not all children's).
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let out = {
        let stdout = child.stdout;
        let stderr = child.stderr;
        let h1 = std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut s) = stdout {
                std::io::Read::read_to_end(&mut s, &mut v).ok();
            }
            v
        });
        let h2 = std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut s) = stderr {
                std::io::Read::read_to_end(&mut s, &mut v).ok();
            }
            v
        });
        // SAFETY: plain wait4 on our own child pid with valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r != pid {
            bail!("wait4 failed");
        }
        let stdout = h1.join().unwrap_or_default();
        let stderr = h2.join().unwrap_or_default();
        std::process::Output {
            status: std::os::unix::process::ExitStatusExt::from_raw(status),
            stdout,
            stderr,
        }
    };
    Ok((
        t.elapsed().as_secs_f64(),
        usage.ru_maxrss as u64 * 1024,
        out,
    ))
}

pub(crate) fn release_binary() -> Result<PathBuf> {
    let st = Command::new("cargo")
        .args(["build", "--release", "--bin", "steerlm-convert"])
        .status()?;
    if !st.success() {
        bail!("cargo build --release failed");
    }
    Ok(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/steerlm-convert"))
}

pub(crate) fn synth_if_absent(dir: &Path, layers: u64) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join(format!("synth13b_tp4_l{layers}.nemo"));
    if !p.exists() {
        eprintln!("writing {} ...", p.display());
        synth::write(&SynthSpec::llama2_13b(layers), &p, |_| {})?;
    }
    Ok(p)
}

fn bench_inspect(args: &[String]) -> Result<()> {
    let dir = PathBuf::from(flag(args, "--dir").unwrap_or("target/bench"));
    let layers = layer_list(args)?;
    let bin = release_binary()?;
    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>12}",
        "archive", "size GB", "tensors", "inspect ms", "peak RSS MB"
    );
    for l in layers {
        let p = synth_if_absent(&dir, l)?;
        let size = std::fs::metadata(&p)?.len();
        // Drop the page cache's advantage of the first run by taking the best of 3 runs
        // after one warm-up; the quantity of interest is work done, not disk latency.
        let mut best = f64::MAX;
        let mut rss = 0;
        let mut tensors = 0;
        for _ in 0..4 {
            let (s, r, out) = measure(Command::new(&bin).arg("inspect").arg(&p).arg("--json"))?;
            if !out.status.success() {
                bail!("inspect failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            tensors = v["tensor_count"].as_u64().unwrap_or(0);
            best = best.min(s);
            rss = rss.max(r);
        }
        println!(
            "{:<28} {:>10.2} {:>10} {:>12.1} {:>12.1}",
            p.file_name().unwrap().to_string_lossy(),
            size as f64 / 1e9,
            tensors,
            best * 1e3,
            rss as f64 / 1e6
        );
    }
    Ok(())
}

fn layer_list(args: &[String]) -> Result<Vec<u64>> {
    flag(args, "--layers")
        .unwrap_or("4,16")
        .split(',')
        .map(|s| s.parse().context("--layers"))
        .collect()
}

/// The best of runs alternated with `cp` + `sync` of the same input.
pub(crate) struct Against {
    /// Best `cp` + `sync` seconds.
    pub cp_s: f64,
    /// Best seconds of the command.
    pub s: f64,
    /// Its largest peak RSS.
    pub rss: u64,
    /// Bytes the command wrote (the output's size).
    pub out_bytes: u64,
}

impl Against {
    /// Seconds the disk needs for the command's output at the rate `cp` + `sync` wrote
    /// the input (`src_bytes` in `cp_s`): the physical limit of a command whose output is
    /// `out_bytes`.
    pub fn disk_limit_s(&self, src_bytes: u64) -> f64 {
        self.cp_s * self.out_bytes as f64 / src_bytes as f64
    }
}

/// Alternates `cp` + `sync` of `src` with the command `cmd()` (which writes `out`) `runs`
/// times, as the disk is noisy.
pub(crate) fn best_against_cp(
    src: &Path,
    dir: &Path,
    out: &Path,
    runs: u64,
    cmd: &mut dyn FnMut() -> Command,
) -> Result<Against> {
    let mut a = Against {
        cp_s: f64::MAX,
        s: f64::MAX,
        rss: 0,
        out_bytes: 0,
    };
    for _ in 0..runs {
        a.cp_s = a.cp_s.min(cp_sync_seconds(src, dir)?);
        remove(out);
        let (s, r, o) = measure(&mut cmd())?;
        a.out_bytes = tree_bytes(out);
        remove(out);
        if !o.status.success() {
            bail!("{:?} failed: {}", cmd(), String::from_utf8_lossy(&o.stderr));
        }
        a.s = a.s.min(s);
        a.rss = a.rss.max(r);
    }
    Ok(a)
}

/// Bytes of a file, or of every file under a folder.
fn tree_bytes(p: &Path) -> u64 {
    match std::fs::read_dir(p) {
        Ok(rd) => rd.flatten().map(|e| tree_bytes(&e.path())).sum(),
        Err(_) => std::fs::metadata(p).map_or(0, |m| m.len()),
    }
}

/// `--runs N`: repetitions whose best time is kept (default 3).
pub(crate) fn runs(args: &[String]) -> Result<u64> {
    num(args, "--runs", 3).map(|n| n.max(1))
}

pub(crate) fn remove(p: &Path) {
    let _ = if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
}

fn bench_convert(args: &[String]) -> Result<()> {
    let dir = PathBuf::from(flag(args, "--dir").unwrap_or("target/bench"));
    let python = flag(args, "--python").unwrap_or("python3").to_string();
    let has_torch = Command::new(&python)
        .args(["-c", "import torch, safetensors, yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    let bin = release_binary()?;
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/torch_merge.py");
    println!(
        "{:<24} {:>8} {:>9} {:>9} {:>7} {:>10} {:>9} {:>7} {:>10}",
        "archive",
        "GB",
        "cp+sync s",
        "ours s",
        "ratio",
        "ours RSS",
        "torch s",
        "ratio",
        "torch RSS"
    );
    for l in layer_list(args)? {
        let p = synth_if_absent(&dir, l)?;
        let size = std::fs::metadata(&p)?.len();
        // Warm the page cache equally for every contender.
        Command::new("cat")
            .arg(&p)
            .stdout(std::process::Stdio::null())
            .status()?;
        let out = dir.join("hf-out");
        let mut cmd = || {
            let mut c = Command::new(&bin);
            c.arg("nemo-to-safetensors").arg(&p).arg(&out).arg("-q");
            c
        };
        let a = best_against_cp(&p, &dir, &out, runs(args)?, &mut cmd)?;
        let (cp_s, ours_s, ours_rss) = (a.cp_s, a.s, a.rss);
        let (torch_s, torch_rss) = if has_torch {
            let (s, r, o) = measure(Command::new(&python).arg(&peer).arg(&p).arg(&out))?;
            remove(&out);
            if !o.status.success() {
                bail!("torch peer failed: {}", String::from_utf8_lossy(&o.stderr));
            }
            (format!("{s:.1}"), format!("{:.0} MB", r as f64 / 1e6))
        } else {
            ("n/a".into(), "n/a".into())
        };
        let torch_ratio = torch_s
            .parse::<f64>()
            .map(|t| format!("{:.2}", t / cp_s))
            .unwrap_or_else(|_| "n/a".into());
        println!(
            "{:<24} {:>8.2} {:>9.2} {:>9.2} {:>7.2} {:>7.0} MB {:>9} {:>7} {:>10}",
            p.file_name().unwrap().to_string_lossy(),
            size as f64 / 1e9,
            cp_s,
            ours_s,
            ours_s / cp_s,
            ours_rss as f64 / 1e6,
            torch_s,
            torch_ratio,
            torch_rss
        );
    }
    Ok(())
}

pub(crate) fn cp_sync_seconds(src: &Path, dir: &Path) -> Result<f64> {
    let copy = dir.join("copy.nemo");
    remove(&copy);
    let (s, _, o) = measure(Command::new("sh").arg("-c").arg(format!(
        "cp '{}' '{}' && sync '{}'",
        src.display(),
        copy.display(),
        copy.display()
    )))?;
    remove(&copy);
    if !o.status.success() {
        bail!("cp failed");
    }
    Ok(s)
}

fn bench_reshard(args: &[String]) -> Result<()> {
    let dir = PathBuf::from(flag(args, "--dir").unwrap_or("target/bench"));
    let bin = release_binary()?;
    println!(
        "{:<24} {:>8} {:>7} {:>12} {:>9} {:>9} {:>7} {:>10}",
        "archive", "GB", "to", "format", "cp+sync s", "ours s", "ratio", "peak RSS"
    );
    for l in layer_list(args)? {
        let p = synth_if_absent(&dir, l)?;
        let size = std::fs::metadata(&p)?.len();
        Command::new("cat")
            .arg(&p)
            .stdout(std::process::Stdio::null())
            .status()?;
        for tp in ["2", "8"] {
            for format in ["safetensors", "nemo"] {
                let out = dir.join("resharded");
                let mut cmd = || {
                    let mut c = Command::new(&bin);
                    c.arg("reshard")
                        .arg(&p)
                        .arg(&out)
                        .args(["--tp", tp, "--format", format, "-q"]);
                    c
                };
                let a = best_against_cp(&p, &dir, &out, runs(args)?, &mut cmd)?;
                let (cp_s, s, rss) = (a.cp_s, a.s, a.rss);
                println!(
                    "{:<24} {:>8.2} {:>7} {:>12} {:>9.2} {:>9.2} {:>7.2} {:>7.0} MB",
                    p.file_name().unwrap().to_string_lossy(),
                    size as f64 / 1e9,
                    format!("TP {tp}"),
                    format,
                    cp_s,
                    s,
                    s / cp_s,
                    rss as f64 / 1e6
                );
            }
        }
    }
    Ok(())
}
