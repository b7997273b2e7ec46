//! `bench verify`: `verify` of a synthetic 13B-shaped TP 4 `.nemo` against its Hugging
//! Face conversion, from a cold page cache, against `cat` of the same bytes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{flag, num, release_binary, synth_if_absent};

/// Every regular file under `p` (or `p` itself).
fn files(p: &Path) -> Vec<PathBuf> {
    if p.is_file() {
        return vec![p.to_path_buf()];
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// Drops the files' clean pages from the page cache (`POSIX_FADV_DONTNEED`), so that the
/// next read comes from the disk.
fn evict(paths: &[PathBuf]) -> Result<()> {
    use std::os::fd::AsRawFd;
    for p in paths {
        let f = std::fs::File::open(p)?;
        // SAFETY: advice on an open descriptor; no memory is touched.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    Ok(())
}

/// Seconds `cat FILES > /dev/null` takes.
fn cat_seconds(paths: &[PathBuf]) -> Result<f64> {
    let t = Instant::now();
    let st = Command::new("cat")
        .args(paths)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("cat failed");
    }
    Ok(t.elapsed().as_secs_f64())
}

fn kb(line: &str) -> u64 {
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        * 1024
}

/// Runs `cmd`, sampling its RssAnon and RssFile every 100 ms; returns (seconds, peak
/// anonymous, peak file-backed, output).
fn sampled(cmd: &mut Command) -> Result<(f64, u64, u64, std::process::Output)> {
    let t = Instant::now();
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let status = format!("/proc/{}/status", child.id());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    let sampler = std::thread::spawn(move || {
        let (mut anon, mut file) = (0u64, 0u64);
        while !d2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(s) = std::fs::read_to_string(&status) {
                for l in s.lines() {
                    if l.starts_with("RssAnon:") {
                        anon = anon.max(kb(l));
                    } else if l.starts_with("RssFile:") {
                        file = file.max(kb(l));
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        (anon, file)
    });
    let out = child.wait_with_output()?;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (anon, file) = sampler.join().unwrap_or((0, 0));
    Ok((t.elapsed().as_secs_f64(), anon, file, out))
}

pub fn verify(args: &[String]) -> Result<()> {
    let dir = PathBuf::from(flag(args, "--dir").unwrap_or("target/bench"));
    let layers = num(args, "--layers", 20)?;
    let tokens = num(args, "--tokens", 16)?;
    let bin = release_binary()?;
    let nemo = synth_if_absent(&dir, layers)?;
    let hf = dir.join(format!("synth13b_tp4_l{layers}-hf"));
    if !hf.exists() {
        eprintln!("converting to {} ...", hf.display());
        let st = Command::new(&bin)
            .arg("nemo-to-safetensors")
            .args([&nemo, &hf])
            .arg("-q")
            .status()?;
        if !st.success() {
            bail!("nemo-to-safetensors failed");
        }
    }
    let prompts = dir.join("verify-one-prompt.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"Where and when did techno music originate?\"}\n",
    )?;
    let report = dir.join("verify-report.json");
    let mut all = files(&nemo);
    all.extend(files(&hf));
    let bytes: u64 = all
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(kb))
        .unwrap_or(0);
    evict(&all)?;
    let cat = cat_seconds(&all)?;
    evict(&all)?;
    let (secs, anon, file, out) = sampled(
        Command::new(&bin)
            .arg("verify")
            .arg(&hf)
            .arg("--against")
            .arg(&nemo)
            .arg("--prompts")
            .arg(&prompts)
            .args(["--tokens", &tokens.to_string(), "-q", "--json"])
            .arg(&report),
    )?;
    if !out.status.success() {
        bail!(
            "verify failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let r: Value = serde_json::from_slice(&std::fs::read(&report)?).context("report")?;
    let t = &r["timing"];
    let f = |k: &str| t[k].as_f64().unwrap_or(0.0);
    let cat_bps = bytes as f64 / cat;
    let p = &r["prompts"][0];
    println!(
        "model: {layers} layers of Llama-2 13B (hidden 5120, 40 heads, ffn 13824), TP 4 bf16 .nemo + its HF folder: {:.1} GB together, RAM {:.1} GB",
        bytes as f64 / 1e9,
        mem as f64 / 1e9
    );
    println!(
        "cat of both, cold cache: {cat:.1} s = {:.0} MB/s (the limit)",
        cat_bps / 1e6
    );
    println!(
        "verify, cold cache: {secs:.1} s wall, peak RSS {:.2} GB anonymous + {:.2} GB mapped file pages; {}",
        anon as f64 / 1e9,
        file as f64 / 1e9,
        if r["pass"] == true { "PASS" } else { "FAIL" }
    );
    let row = |what: &str, s: f64, b: f64| {
        if b > 0.0 {
            println!(
                "  {what:<22} {s:>7.1} s  {:>7.0} MB/s  {:>5.2} x cat",
                b / s.max(1e-9) / 1e6,
                b / s.max(1e-9) / cat_bps
            );
        } else {
            println!("  {what:<22} {s:>7.1} s");
        }
    };
    row("integrity (CRC-32)", f("integrity_s"), f("integrity_bytes"));
    row("hashing + tensor rules", f("hashing_s"), f("hashed_bytes"));
    row("reference load", f("reference_load_s"), 0.0);
    row(
        &format!("reference prefill ({} tok)", p["prompt_tokens"]),
        f("reference_prefill_s"),
        0.0,
    );
    row(
        &format!("reference decode ({} tok)", p["positions"]),
        f("reference_decode_s"),
        0.0,
    );
    row("candidate load", f("candidate_load_s"), 0.0);
    row("candidate prefill", f("candidate_prefill_s"), 0.0);
    row("candidate decode", f("candidate_decode_s"), 0.0);
    println!(
        "(hashing reads both sides after the integrity pass read the .nemo once, so part of it may come from the page cache)"
    );
    Ok(())
}
