//! `xtask gpu-check`: on a GPU machine, every kernel against its CPU twin on random and
//! constructed inputs, kernel timings against the device's copy bandwidth, and quantize end
//! to end on the GPU against the CPU. It runs from prebuilt binaries (no cargo): the
//! release binary from `--bin PATH` or `STEERLM_BIN`. One PASS/FAIL line per check, to
//! stdout and to `--log FILE` (default `gpu-check.log`); it keeps going after a failure and
//! exits non-zero at the end if any check failed.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use steerlm_convert::container::mapped::{Mapped, OpenOptions};
use steerlm_convert::container::safetensors_write::{header, TensorSpec};
use steerlm_convert::dtype::DType;
use steerlm_convert::gpu::CudaEngine;
use steerlm_convert::quant::engine::{CpuEngine, Engine, RowSource};

/// PASS/FAIL lines, to stdout and the log file.
pub(crate) struct Log {
    file: std::fs::File,
    pub failures: usize,
    pub passes: usize,
}

impl Log {
    fn open(path: &Path) -> Result<Log> {
        Ok(Log {
            file: std::fs::File::create(path).with_context(|| path.display().to_string())?,
            failures: 0,
            passes: 0,
        })
    }

    /// A line of information.
    pub fn info(&mut self, line: &str) {
        use std::io::Write;
        println!("{line}");
        let _ = writeln!(self.file, "{line}");
    }

    pub fn pass(&mut self, name: &str, detail: &str) {
        self.passes += 1;
        self.info(&format!(
            "PASS {name}{}{detail}",
            if detail.is_empty() { "" } else { ": " }
        ));
    }

    pub fn fail(&mut self, name: &str, why: &str) {
        self.failures += 1;
        self.info(&format!("FAIL {name}: {why}"));
    }

    pub fn result(&mut self, name: &str, r: std::result::Result<(), String>) {
        match r {
            Ok(()) => self.pass(name, ""),
            Err(e) => self.fail(name, &e),
        }
    }
}

pub(crate) struct Rng(pub u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A value of mixed magnitude, with zeros, subnormals and outliers.
    pub fn value(&mut self) -> f32 {
        let r = self.next();
        let u = (r >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
        match r % 64 {
            0 => 0.0,
            1 => f32::from_bits((r >> 32) as u32 & 0x007f_ffff),
            2 => (u * 3e4) as f32,
            3 => (u * 1e-6) as f32,
            _ => (u * 0.05) as f32,
        }
    }
}

fn encode(vals: &[f32], dt: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(vals.len() * dt.size());
    for &v in vals {
        match dt {
            DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            _ => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
        }
    }
    out
}

/// Writes one tensor as a safetensors file in `dir` and opens the folder.
fn tensor_file(
    dir: &Path,
    vals: &[f32],
    dt: DType,
    rows: usize,
    cols: usize,
) -> Result<(Mapped, u64)> {
    let spec = TensorSpec {
        name: "w".into(),
        dtype: dt,
        shape: vec![rows as u64, cols as u64],
    };
    let mut bytes = header(&[&spec]);
    let off = bytes.len() as u64;
    bytes.extend_from_slice(&encode(vals, dt));
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("w.safetensors"), &bytes)?;
    let ar = Mapped::open(dir, &OpenOptions::default())?;
    let base = ar.member("w.safetensors").context("member")?.offset;
    Ok((ar, base + off))
}

pub fn run(args: &[String]) -> Result<()> {
    let log_path = crate::flag(args, "--log").unwrap_or("gpu-check.log");
    let mut log = Log::open(Path::new(log_path))?;
    let bin = crate::flag(args, "--bin")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("STEERLM_BIN").map(std::path::PathBuf::from));
    let dir = std::path::PathBuf::from(crate::flag(args, "--dir").unwrap_or("target/bench"));
    let mut copy_bw = None;
    match CudaEngine::open() {
        Ok(gpu) => {
            log.info(&format!("engine: {}", gpu.name()));
            quantize_checks(&mut log, &gpu)?;
            copy_bw = timings(&mut log, &gpu);
        }
        Err(e) => log.fail("open the GPU engine", &e),
    }
    match steerlm_convert::gpu::open_context() {
        Ok(ctx) => crate::gpu_kernels::check(&mut log, &ctx),
        Err(e) => log.fail("runtime kernels: CUDA context", &e),
    }
    let layers = crate::num(args, "--synth-layers", 40)?;
    match &bin {
        Some(b) => {
            end_to_end(&mut log, b, &dir);
            generate_13b(&mut log, b, &dir, layers, copy_bw);
        }
        None => log.fail(
            "quantize end to end",
            "no release binary: give --bin PATH or STEERLM_BIN",
        ),
    }
    log.info(&format!(
        "gpu-check: {} passed, {} failed (log: {log_path})",
        log.passes, log.failures
    ));
    if log.failures > 0 {
        bail!("{} checks failed", log.failures);
    }
    Ok(())
}

/// A row of constructed values for quantize: exact rounding ties of the stored scale
/// (x / s = k + 0.5, both signs).
fn constructed(cols: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(cols);
    // amax 127: the scale is exactly 1 in every dtype, so x = k + 0.5 is a tie.
    for j in 0..cols {
        let k = (j % 120) as f32 + 0.5;
        v.push(if j % 2 == 0 { k } else { -k });
    }
    v[0] = 127.0;
    v
}

fn quantize_checks(log: &mut Log, gpu: &CudaEngine) -> Result<()> {
    let cpu = CpuEngine;
    let tmp = std::env::temp_dir().join(format!("steerlm-gpu-check-{}", std::process::id()));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let shapes = [(257usize, 5120usize), (64, 13824), (33, 96), (5, 4)];
    for dt in [DType::F32, DType::F16, DType::BF16] {
        for &(rows, cols) in &shapes {
            let mut vals: Vec<f32> = (0..rows * cols).map(|_| rng.value()).collect();
            // A zero row, a row with one huge outlier, a row of exact rounding ties, and
            // a row whose scale rounds down (its largest value then quantizes from just
            // above 127, next to the clamp).
            vals[..cols].fill(0.0);
            if rows > 2 {
                vals[cols + cols / 2] = 6.0e4;
                vals[2 * cols..3 * cols].copy_from_slice(&constructed(cols));
            }
            if rows > 3 {
                for (j, x) in vals[3 * cols..4 * cols].iter_mut().enumerate() {
                    *x = if j == 0 {
                        130.0
                    } else {
                        129.9 - (j % 7) as f32
                    };
                }
            }
            let (ar, off) = tensor_file(&tmp, &vals, dt, rows, cols)?;
            let src = RowSource::plain(&ar, "w", dt, rows, cols, off);
            for group in [cols, 128, 32, 4] {
                if cols % group != 0 {
                    continue;
                }
                let name = format!(
                    "quantize {} [{rows}, {cols}] group {group}",
                    dt.short_name()
                );
                let t0 = std::time::Instant::now();
                let a = cpu.quantize(&src, 0, rows, group, dt, Vec::new());
                let tc = t0.elapsed().as_secs_f64();
                let t1 = std::time::Instant::now();
                let b = gpu.quantize(&src, 0, rows, group, dt, Vec::new());
                let tg = t1.elapsed().as_secs_f64();
                let verdict = match (&a, &b) {
                    (Ok(x), Ok(y)) => {
                        if let Some(i) = (0..x.q.len()).find(|&i| x.q.get(i) != y.q.get(i)) {
                            let (r, c) = (i / cols, i % cols);
                            Err(format!(
                                "first differing int8 at row {r}, column {c}: input {:e}, scale cpu {:e} gpu {:e}; q cpu {} gpu {:?}",
                                vals[i],
                                x.scales[r * (cols / group) + c / group],
                                y.scales.get(r * (cols / group) + c / group).copied().unwrap_or(f32::NAN),
                                x.q[i] as i32 - 128,
                                y.q.get(i).map(|v| *v as i32 - 128)
                            ))
                        } else if let Some(g) = (0..x.scales.len()).find(|&g| {
                            Some(x.scales[g].to_bits()) != y.scales.get(g).map(|v| v.to_bits())
                        }) {
                            Err(format!(
                                "first differing scale: group {g} (row {}), cpu {:e} gpu {:?}",
                                g / (cols / group),
                                x.scales[g],
                                y.scales.get(g)
                            ))
                        } else {
                            Ok(())
                        }
                    }
                    (Err(x), Err(y)) if x.0 == y.0 => Ok(()),
                    (x, y) => Err(format!(
                        "cpu {:?}, gpu {:?}",
                        x.as_ref().err(),
                        y.as_ref().err()
                    )),
                };
                match verdict {
                    Ok(()) => log.pass(
                        &name,
                        &format!(
                            "bit-identical (cpu {:.2} ms, gpu {:.2} ms incl. transfers)",
                            tc * 1e3,
                            tg * 1e3
                        ),
                    ),
                    Err(e) => log.fail(&name, &e),
                }
            }
            for to in [DType::F32, DType::F16, DType::BF16] {
                if to == dt {
                    continue;
                }
                let name = format!(
                    "cast {} -> {} [{rows}, {cols}]",
                    dt.short_name(),
                    to.short_name()
                );
                let a = cpu.cast(&src, 0, rows, to, Vec::new());
                let b = gpu.cast(&src, 0, rows, to, Vec::new());
                let verdict = match (a, b) {
                    (Ok(a), Ok(b)) => {
                        if let Some(i) =
                            (0..a.bytes.len()).find(|&i| a.bytes.get(i) != b.bytes.get(i))
                        {
                            let e = i / to.size();
                            Err(format!(
                                "first differing value {e} (row {}, column {}): input {:e}",
                                e / cols,
                                e % cols,
                                vals[e]
                            ))
                        } else if a.overflow != b.overflow || a.non_finite != b.non_finite {
                            Err(format!(
                                "overflow cpu {} gpu {}, non-finite cpu {:?} gpu {:?}",
                                a.overflow, b.overflow, a.non_finite, b.non_finite
                            ))
                        } else {
                            Ok(())
                        }
                    }
                    (a, b) => Err(format!("cpu {:?}, gpu {:?}", a.err(), b.err())),
                };
                log.result(&name, verdict);
            }
        }
    }
    // Non-finite input: both refuse at the same row; an earlier overflowing row wins over
    // a later NaN.
    let (rows, cols) = (16, 256);
    let mut vals: Vec<f32> = (0..rows * cols).map(|_| rng.value()).collect();
    vals[7 * cols + 100] = f32::NAN;
    vals[9 * cols + 3] = f32::INFINITY;
    for (case, extra) in [
        ("a NaN at row 7", None),
        ("overflow at row 4, NaN at row 7", Some(4usize)),
    ] {
        let mut v = vals.clone();
        if let Some(r) = extra {
            v[r * cols + 9] = 3.0e38;
        }
        let (ar, off) = tensor_file(&tmp, &v, DType::F32, rows, cols)?;
        let src = RowSource::plain(&ar, "w", DType::F32, rows, cols, off);
        // A bf16-overflowing scale needs an f16 scale dtype: 3e38 / 127 overflows f16.
        let a = cpu
            .quantize(&src, 0, rows, cols, DType::F16, Vec::new())
            .err()
            .map(|e| e.0);
        let b = gpu
            .quantize(&src, 0, rows, cols, DType::F16, Vec::new())
            .err()
            .map(|e| e.0);
        let want = Some(extra.unwrap_or(7));
        log.result(
            &format!("quantize refuses {case}"),
            if a == b && a == want {
                Ok(())
            } else {
                Err(format!(
                    "cpu refuses at row {a:?}, gpu at row {b:?}, expected {want:?}"
                ))
            },
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// Kernel timings; the device's copy bandwidth (read + write, bytes/s).
fn timings(log: &mut Log, gpu: &CudaEngine) -> Option<f64> {
    let k = match gpu.kernel_times(1024) {
        Ok(k) => k,
        Err(e) => {
            log.fail("kernel timings", &e);
            return None;
        }
    };
    let gb = k.bytes as f64 / 1e9;
    let copy_bw = 2.0 * gb / k.copy_s;
    let q_moved = 1.5 * gb / k.quantize_s;
    let c_moved = 2.0 * gb / k.cast_s;
    log.info(&format!(
        "device copy: {:.1} GB/s (read + write of {gb:.2} GB)\n\
         quantize_int8 (bf16 -> int8, channel): {:.1} GB/s of input, {:.1} GB/s moved = {:.0}% of copy\n\
         cast_float (bf16 -> f16): {:.1} GB/s of input, {:.1} GB/s moved = {:.0}% of copy",
        copy_bw,
        gb / k.quantize_s,
        q_moved,
        100.0 * q_moved / copy_bw,
        gb / k.cast_s,
        c_moved,
        100.0 * c_moved / copy_bw
    ));
    Some(copy_bw * 1e9)
}

/// `generate --device cuda` of a synthetic 13B-shaped TP 4 bf16 archive (`layers`
/// layers) and of its int8 quantization: decode tokens/s against the roofline (weight
/// bytes per token at the device's copy bandwidth). The goal is 70 % of it at batch 1.
fn generate_13b(log: &mut Log, bin: &Path, dir: &Path, layers: u64, copy_bw: Option<f64>) {
    /// Decode and prompt tokens/s, weight bytes per token, and a few words more.
    type Run = (f64, f64, u64, String);
    let run = |model: &Path| -> Result<Run> {
        let (s, _, o) = crate::measure(
            Command::new(bin)
                .arg("generate")
                .arg(model)
                .args([
                    "--prompt",
                    "Write a haiku about checkpoints.",
                    "--max-tokens",
                    "32",
                ])
                .args(["--ignore-eos", "--json", "-q", "--device", "cuda"]),
        )?;
        if !o.status.success() {
            bail!("generate: {}", String::from_utf8_lossy(&o.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        let t = &v["timing"];
        Ok((
            t["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            t["prompt_tokens_per_s"].as_f64().unwrap_or(0.0),
            v["weight_bytes_per_token"].as_u64().unwrap_or(0),
            format!("{s:.1} s wall (load and upload included), {}", t["device"]),
        ))
    };
    let r = (|| -> Result<Vec<(String, Run)>> {
        let p = crate::synth_if_absent(dir, layers)?;
        let mut out = vec![("bf16".to_string(), run(&p)?)];
        let q = dir.join(format!("gpu-check-13b-int8-l{layers}"));
        crate::remove(&q);
        let o = Command::new(bin)
            .arg("quantize")
            .arg(&p)
            .arg(&q)
            .args(["--scheme", "int8", "--device", "cuda", "-q"])
            .output()?;
        if !o.status.success() {
            bail!("quantize: {}", String::from_utf8_lossy(&o.stderr));
        }
        out.push(("int8".to_string(), run(&q)?));
        Ok(out)
    })();
    match r {
        Err(e) => log.fail("generate 13B-shaped on the GPU", &format!("{e:#}")),
        Ok(rows) => {
            for (what, (decode, prompt, bytes, detail)) in rows {
                let name = format!(
                    "generate 13B-shaped {what} ({layers} layers), decode against the roofline"
                );
                let Some(bw) = copy_bw else {
                    log.fail(&name, "no copy bandwidth was measured");
                    continue;
                };
                let limit = bw / bytes.max(1) as f64;
                let frac = decode / limit;
                let line = format!(
                    "decode {decode:.1} tok/s = {:.0}% of {limit:.1} tok/s ({:.2} GB per token at {:.0} GB/s copy); prompt {prompt:.1} tok/s; {detail}",
                    100.0 * frac,
                    bytes as f64 / 1e9,
                    bw / 1e9
                );
                if frac >= 0.7 {
                    log.pass(&name, &line);
                } else {
                    log.fail(&name, &format!("{line}: under the 70% goal"));
                }
            }
        }
    }
}

/// quantize of a 13B-shaped archive (2 layers) with `--device cpu` and `--device cuda`:
/// the two outputs byte for byte.
fn end_to_end(log: &mut Log, bin: &Path, dir: &Path) {
    let r = (|| -> Result<String> {
        let p = crate::synth_if_absent(dir, 2)?;
        let mut times = Vec::new();
        for device in ["cpu", "cuda"] {
            let out = dir.join(format!("gpu-check-{device}"));
            crate::remove(&out);
            let (s, rss, o) = crate::measure(
                Command::new(bin)
                    .arg("quantize")
                    .arg(&p)
                    .arg(&out)
                    .args(["--scheme", "int8", "--device", device, "-q"]),
            )?;
            if !o.status.success() {
                bail!(
                    "quantize --device {device}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            times.push(format!(
                "{device} {s:.2} s ({:.2} GB/s of input, peak RSS {:.0} MB)",
                std::fs::metadata(&p)?.len() as f64 / 1e9 / s,
                rss as f64 / 1e6
            ));
        }
        let a = std::fs::read(dir.join("gpu-check-cpu/model.safetensors"))?;
        let b = std::fs::read(dir.join("gpu-check-cuda/model.safetensors"))?;
        if a != b {
            let i = a
                .iter()
                .zip(&b)
                .position(|(x, y)| x != y)
                .unwrap_or(a.len().min(b.len()));
            bail!(
                "the outputs differ, first at byte {i} (sizes {} and {})",
                a.len(),
                b.len()
            );
        }
        Ok(format!("byte-identical; {}", times.join(", ")))
    })();
    match r {
        Ok(d) => log.pass("quantize end to end, cuda against cpu", &d),
        Err(e) => log.fail("quantize end to end, cuda against cpu", &format!("{e:#}")),
    }
}
