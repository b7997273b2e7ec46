//! `bench quantize` and `bench generate`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use steerlm_convert::dtype::DType;
use steerlm_convert::synth::{self, SynthSpec};

use crate::{best_against_cp, flag, measure, num, release_binary, runs, synth_if_absent};

/// Memory read bandwidth in GB/s with `threads` threads: the best of 3 passes summing a
/// 1 GiB buffer (already in memory) with independent accumulators.
pub fn read_bandwidth(threads: usize) -> f64 {
    let n = 1usize << 27;
    let v: Vec<u64> = (0..n as u64).collect();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let chunk = n / threads;
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = v
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || {
                        let mut acc = [0u64; 8];
                        for w in c.chunks_exact(8) {
                            for l in 0..8 {
                                acc[l] = acc[l].wrapping_add(w[l]);
                            }
                        }
                        acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 8) as f64 / best / 1e9
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn gpu_present() -> bool {
    steerlm_convert::gpu::CudaEngine::open().is_ok()
}

pub fn quantize(args: &[String]) -> Result<()> {
    let dir = PathBuf::from(flag(args, "--dir").unwrap_or("target/bench"));
    let layers = num(args, "--layers", 4)?;
    let bin = release_binary()?;
    let p = synth_if_absent(&dir, layers)?;
    let size = std::fs::metadata(&p)?.len();
    Command::new("cat")
        .arg(&p)
        .stdout(std::process::Stdio::null())
        .status()?;
    let shm = Path::new("/dev/shm");
    let mut devices = vec!["cpu"];
    if gpu_present() {
        devices.push("cuda");
    }
    println!(
        "{:<26} {:>7} {:>6} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9}",
        "archive", "scheme", "device", "output", "cp+sync s", "ours s", "vs cp", "GB/s in", "RSS"
    );
    for scheme in ["int8", "fp16"] {
        for device in &devices {
            for target in ["disk", "tmpfs"] {
                let out = if target == "disk" {
                    dir.join("quantized")
                } else if shm.is_dir() {
                    shm.join("steerlm-bench-quantized")
                } else {
                    continue;
                };
                let mut cmd = || {
                    let mut c = Command::new(&bin);
                    c.arg("quantize")
                        .arg(&p)
                        .arg(&out)
                        .args(["--scheme", scheme, "--device", device, "-q"]);
                    c
                };
                let (cp_s, s, rss) = best_against_cp(&p, &dir, &out, runs(args)?, &mut cmd)?;
                println!(
                    "{:<26} {:>7} {:>6} {:>9} {:>9.2} {:>9.2} {:>8.2} {:>9.2} {:>6.0} MB",
                    p.file_name().unwrap().to_string_lossy(),
                    scheme,
                    device,
                    target,
                    cp_s,
                    s,
                    s / cp_s,
                    size as f64 / 1e9 / s,
                    rss as f64 / 1e6
                );
            }
        }
    }
    // Measured after the runs: a child forked while this process holds the 1 GiB test
    // buffer would report it as its peak RSS.
    let bw1 = read_bandwidth(1);
    let bwn = read_bandwidth(threads());
    println!(
        "memory read bandwidth: {bw1:.1} GB/s (1 thread), {bwn:.1} GB/s ({} threads)",
        threads()
    );
    println!(
        "GB/s in = archive bytes / wall time of the whole command (open, quantize, write, fsync).\n\
         The tmpfs rows write the output to /dev/shm: the quantizer without the disk.\n\
         Against memory: the quantizer reads each input byte once and writes half (int8) or\n\
         all (fp16) of it; {bwn:.1} GB/s is this machine's read bandwidth."
    );
    Ok(())
}

fn gen_json(bin: &Path, model: &Path, prompt: &str, tokens: u64, threads: usize) -> Result<Value> {
    let (_, _, o) = measure(
        Command::new(bin)
            .arg("generate")
            .arg(model)
            .args(["--raw", "--ignore-eos", "--json", "-q", "--prompt", prompt])
            .args(["--max-tokens", &tokens.to_string()])
            .args(["--threads", &threads.to_string()]),
    )?;
    if !o.status.success() {
        bail!("generate failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(serde_json::from_slice(&o.stdout)?)
}

pub fn generate(args: &[String]) -> Result<()> {
    let dir = PathBuf::from(flag(args, "--dir").unwrap_or("target/bench"));
    let tokens = num(args, "--tokens", 64)?;
    let python = flag(args, "--python").unwrap_or("python3").to_string();
    let bin = release_binary()?;
    std::fs::create_dir_all(&dir)?;
    let nemo = dir.join("synth100m.nemo");
    let spec = SynthSpec {
        layers: 8,
        hidden: 768,
        heads: 12,
        groups: 12,
        ffn: 2048,
        vocab: 32000,
        tp: 1,
        pp: 1,
        dtype: DType::BF16,
        make_vocab_size_divisible_by: 128,
    };
    if !nemo.exists() {
        synth::write(&spec, &nemo, |_| {})?;
    }
    let run = |args: &[&str]| -> Result<()> {
        let st = Command::new(&bin).args(args).arg("-q").status()?;
        if !st.success() {
            bail!("{args:?} failed");
        }
        Ok(())
    };
    let f32_dir = dir.join("synth100m-f32");
    let bf16_dir = dir.join("synth100m-bf16");
    let int8_dir = dir.join("synth100m-int8");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    if !f32_dir.exists() {
        run(&[
            "nemo-to-safetensors",
            &s(&nemo),
            &s(&f32_dir),
            "--dtype",
            "fp32",
        ])?;
    }
    if !bf16_dir.exists() {
        run(&["nemo-to-safetensors", &s(&nemo), &s(&bf16_dir)])?;
    }
    if !int8_dir.exists() {
        run(&[
            "quantize",
            &s(&bf16_dir),
            &s(&int8_dir),
            "--scheme",
            "int8",
            "--device",
            "cpu",
        ])?;
    }
    // About 250 tokens with the synthetic tokenizer.
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(4);
    let has_hf = Command::new(&python)
        .args(["-c", "import torch, transformers, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success());
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/hf_generate.py");
    let max_t = threads().min(2);
    let bws: Vec<f64> = (1..=max_t).map(read_bandwidth).collect();
    for (i, b) in bws.iter().enumerate() {
        println!("memory read bandwidth: {b:.1} GB/s ({} threads)", i + 1);
    }
    println!(
        "{:<8} {:>7} {:>10} {:>11} {:>11} {:>10} {:>8} {:>12} {:>12}",
        "weights",
        "threads",
        "MB/token",
        "limit tok/s",
        "decode tok/s",
        "of limit",
        "prompt",
        "prompt tok/s",
        "transformers"
    );
    for (name, d) in [("f32", &f32_dir), ("bf16", &bf16_dir), ("int8", &int8_dir)] {
        for t in 1..=max_t {
            let v = gen_json(&bin, d, &prompt, tokens, t)?;
            let bpt = v["weight_bytes_per_token"]
                .as_f64()
                .context("bytes per token")?;
            let dec = v["timing"]["decode_tokens_per_s"].as_f64().unwrap_or(0.0);
            let pre = v["timing"]["prompt_tokens_per_s"].as_f64().unwrap_or(0.0);
            let np = v["timing"]["prompt_tokens"].as_u64().unwrap_or(0);
            let limit = bws[t - 1] * 1e9 / bpt;
            let hf = if has_hf && name != "int8" {
                let o = Command::new(&python)
                    .arg(&peer)
                    .arg(d)
                    .arg(tokens.to_string())
                    .arg(t.to_string())
                    .arg(&prompt)
                    .output()?;
                if o.status.success() {
                    let j: Value = serde_json::from_slice(&o.stdout)?;
                    format!(
                        "{:.1} tok/s",
                        j["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
                    )
                } else {
                    "failed".into()
                }
            } else {
                "n/a".into()
            };
            println!(
                "{:<8} {:>7} {:>10.1} {:>11.1} {:>11.1} {:>9.0}% {:>8} {:>12.1} {:>12}",
                name,
                t,
                bpt / 1e6,
                limit,
                dec,
                100.0 * dec / limit,
                np,
                pre,
                hf
            );
        }
    }
    println!(
        "limit = read bandwidth at that thread count / weight bytes read per token; the model\n\
         has {} parameters (8 layers, hidden 768, ffn 2048, vocab 32000).",
        {
            let v = gen_json(&bin, &bf16_dir, "x", 1, 1)?;
            v["parameters"].as_u64().unwrap_or(0)
        }
    );
    Ok(())
}
