//! `cargo xtask gpu-check`: on a GPU machine, every kernel against its CPU twin on random
//! inputs, kernel timings against the device's copy bandwidth, and quantize end to end on
//! the GPU against the CPU. Prints everything it measures; fails on any mismatch.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use steerlm_convert::container::mapped::{Mapped, OpenOptions};
use steerlm_convert::container::safetensors_write::{header, TensorSpec};
use steerlm_convert::dtype::DType;
use steerlm_convert::gpu::CudaEngine;
use steerlm_convert::quant::engine::{CpuEngine, Engine, RowSource};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A value of mixed magnitude, with zeros, subnormals and outliers.
    fn value(&mut self) -> f32 {
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

pub fn run() -> Result<()> {
    let gpu = CudaEngine::open().map_err(|e| anyhow::anyhow!("no usable GPU: {e}"))?;
    println!("engine: {}", gpu.name());
    let cpu = CpuEngine;
    let tmp = std::env::temp_dir().join(format!("steerlm-gpu-check-{}", std::process::id()));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut failures = 0;
    let shapes = [(257usize, 5120usize), (64, 13824), (33, 96), (5, 4)];
    for dt in [DType::F32, DType::F16, DType::BF16] {
        for &(rows, cols) in &shapes {
            let mut vals: Vec<f32> = (0..rows * cols).map(|_| rng.value()).collect();
            // A zero row and a row with one huge outlier.
            vals[..cols].fill(0.0);
            if rows > 2 {
                vals[cols + cols / 2] = 6.0e4;
            }
            let (ar, off) = tensor_file(&tmp, &vals, dt, rows, cols)?;
            let src = RowSource::plain(&ar, "w", dt, rows, cols, off);
            for group in [cols, 128, 32, 4] {
                if cols % group != 0 {
                    continue;
                }
                let t0 = std::time::Instant::now();
                let a = cpu.quantize(&src, 0, rows, group, dt, Vec::new());
                let tc = t0.elapsed().as_secs_f64();
                let t1 = std::time::Instant::now();
                let b = gpu.quantize(&src, 0, rows, group, dt, Vec::new());
                let tg = t1.elapsed().as_secs_f64();
                let ok = match (&a, &b) {
                    (Ok(x), Ok(y)) => {
                        x.q == y.q
                            && x.scales
                                .iter()
                                .map(|v| v.to_bits())
                                .eq(y.scales.iter().map(|v| v.to_bits()))
                    }
                    (Err(x), Err(y)) => x.0 == y.0,
                    _ => false,
                };
                if !ok {
                    failures += 1;
                }
                let diff = match (&a, &b) {
                    (Ok(x), Ok(y)) => x.q.iter().zip(&y.q).filter(|(p, q)| p != q).count(),
                    _ => 0,
                };
                println!(
                    "quantize {:>4} [{rows:>4}, {cols:>5}] group {group:>5}: {} (int8 values differing: {diff}; cpu {:.2} ms, gpu {:.2} ms incl. transfers)",
                    dt.short_name(),
                    if ok { "bit-identical" } else { "MISMATCH" },
                    tc * 1e3,
                    tg * 1e3
                );
            }
            for to in [DType::F32, DType::F16, DType::BF16] {
                if to == dt {
                    continue;
                }
                let a = cpu
                    .cast(&src, 0, rows, to, Vec::new())
                    .map_err(|e| anyhow::anyhow!(e))?;
                let b = gpu
                    .cast(&src, 0, rows, to, Vec::new())
                    .map_err(|e| anyhow::anyhow!(e))?;
                let ok =
                    a.bytes == b.bytes && a.overflow == b.overflow && a.non_finite == b.non_finite;
                if !ok {
                    failures += 1;
                }
                println!(
                    "cast {:>4} -> {:>4} [{rows:>4}, {cols:>5}]: {} (overflow cpu {} gpu {})",
                    dt.short_name(),
                    to.short_name(),
                    if ok { "bit-identical" } else { "MISMATCH" },
                    a.overflow,
                    b.overflow
                );
            }
        }
    }
    // Non-finite input: both refuse at the same row.
    let (rows, cols) = (16, 256);
    let mut vals: Vec<f32> = (0..rows * cols).map(|_| rng.value()).collect();
    vals[7 * cols + 100] = f32::NAN;
    vals[9 * cols + 3] = f32::INFINITY;
    let (ar, off) = tensor_file(&tmp, &vals, DType::F32, rows, cols)?;
    let src = RowSource::plain(&ar, "w", DType::F32, rows, cols, off);
    let a = cpu
        .quantize(&src, 0, rows, cols, DType::F32, Vec::new())
        .err()
        .map(|e| e.0);
    let b = gpu
        .quantize(&src, 0, rows, cols, DType::F32, Vec::new())
        .err()
        .map(|e| e.0);
    println!("non-finite input: cpu refuses at row {a:?}, gpu at row {b:?}");
    if a != b || a != Some(7) {
        failures += 1;
    }
    let _ = std::fs::remove_dir_all(&tmp);

    let k = gpu.kernel_times(1024).map_err(|e| anyhow::anyhow!(e))?;
    let gb = k.bytes as f64 / 1e9;
    let copy_bw = 2.0 * gb / k.copy_s;
    let q_moved = 1.5 * gb / k.quantize_s;
    let c_moved = 2.0 * gb / k.cast_s;
    println!(
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
    );

    // End to end on a 13B-shaped archive (2 layers), GPU against CPU.
    let dir = Path::new("target/bench");
    let p = crate::synth_if_absent(dir, 2)?;
    let bin = crate::release_binary()?;
    for device in ["cpu", "cuda"] {
        let out = dir.join(format!("gpu-check-{device}"));
        crate::remove(&out);
        let (s, rss, o) = crate::measure(
            Command::new(&bin)
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
        println!(
            "quantize end to end, {device}: {s:.2} s, {:.2} GB/s of input, peak RSS {:.0} MB",
            std::fs::metadata(&p)?.len() as f64 / 1e9 / s,
            rss as f64 / 1e6
        );
    }
    let a = std::fs::read(dir.join("gpu-check-cpu/model.safetensors"))?;
    let b = std::fs::read(dir.join("gpu-check-cuda/model.safetensors"))?;
    println!(
        "end-to-end outputs: {}",
        if a == b { "byte-identical" } else { "DIFFER" }
    );
    if a != b {
        failures += 1;
    }
    if failures > 0 {
        bail!("{failures} checks failed");
    }
    println!("gpu-check: all kernels bit-identical to their CPU twins");
    Ok(())
}
