//! `cargo xtask gpu-bundle [DIR]`: everything a GPU machine without a Rust toolchain or a
//! network needs to check the GPU path, in one folder (default `target/gpu-bundle`, under
//! 64 MiB so that it can travel with the working tree): the release binary, the xtask
//! binary, the test binaries that exercise the GPU (`tests/device.rs`, `tests/kernels.rs`),
//! stripped of debug information, and `run.sh`, the one prepared script. Run there from the
//! repository root: `bash target/gpu-bundle/run.sh OUT_DIR`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const TESTS: [&str; 2] = ["device", "kernels"];

const RUN: &str = r#"#!/usr/bin/env bash
# The GPU check, from prebuilt binaries (made by `cargo xtask gpu-bundle`); run from the
# repository root (the fixtures are read from ./fixtures). Every step runs even when an
# earlier one fails; the full log is OUT/gpu-run.log and the PASS/FAIL lines of gpu-check
# are OUT/gpu-check.log. Exit status: the number of failed steps.
set -u
B="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-${OUT:-.}}"
mkdir -p "$OUT"
export STEERLM_FIXTURES="$PWD/fixtures" STEERLM_BIN="$B/steerlm-convert"
failed=0
step() {
    echo "== $*"
    "$@" || { echo "== FAILED (rc $?): $*"; failed=$((failed + 1)); }
}
{
    date -u
    step nvidia-smi
    for t in "$B"/deps/*; do
        step "$t" --test-threads 1
    done
    step "$B/xtask" gpu-check --bin "$B/steerlm-convert" --log "$OUT/gpu-check.log" \
        --dir "${GPU_CHECK_DIR:-/tmp/steerlm-gpu-check}"
    echo "== $failed failed steps"
    date -u
} 2>&1 | tee "$OUT/gpu-run.log"
exit "$(grep -c '^== FAILED' "$OUT/gpu-run.log")"
"#;

fn cargo(args: &[&str]) -> Result<std::process::Output> {
    let o = Command::new("cargo")
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo")?;
    if !o.status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(o)
}

/// The executables of the test targets `TESTS`, from cargo's JSON messages.
fn test_binaries() -> Result<Vec<(String, PathBuf)>> {
    let mut args = vec!["test", "--release", "--no-run", "--message-format=json"];
    for t in TESTS {
        args.extend(["--test", t]);
    }
    let o = cargo(&args)?;
    let mut out = Vec::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = v["target"]["name"].as_str().unwrap_or_default();
        if let (Some(exe), true) = (v["executable"].as_str(), TESTS.contains(&name)) {
            out.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if out.len() != TESTS.len() {
        bail!(
            "cargo listed {} of the {} test binaries",
            out.len(),
            TESTS.len()
        );
    }
    Ok(out)
}

fn put(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("{} -> {}", from.display(), to.display()))?;
    // Debug information is most of a binary's size; the bundle must stay small.
    let st = Command::new("strip").arg("--strip-debug").arg(to).status();
    if !st.is_ok_and(|s| s.success()) {
        eprintln!(
            "note: could not strip {} (binutils' strip missing?)",
            to.display()
        );
    }
    Ok(())
}

pub fn run(args: &[String]) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/gpu-bundle"));
    cargo(&[
        "build",
        "--release",
        "-p",
        "steerlm-convert",
        "--bin",
        "steerlm-convert",
    ])?;
    cargo(&["build", "--release", "-p", "xtask"])?;
    let tests = test_binaries()?;
    crate::remove(&dir);
    std::fs::create_dir_all(dir.join("deps"))?;
    let rel = root.join("target/release");
    put(&rel.join("steerlm-convert"), &dir.join("steerlm-convert"))?;
    put(&rel.join("xtask"), &dir.join("xtask"))?;
    for (name, exe) in &tests {
        put(exe, &dir.join("deps").join(name))?;
    }
    std::fs::write(dir.join("run.sh"), RUN)?;
    let mut total = 0u64;
    for e in walk(&dir)? {
        total += std::fs::metadata(&e)?.len();
    }
    println!(
        "{}: {:.1} MiB; on the GPU machine, from the repository root: bash {}/run.sh OUT_DIR",
        dir.display(),
        total as f64 / (1u64 << 20) as f64,
        dir.strip_prefix(&root).unwrap_or(&dir).display()
    );
    if total > 64 << 20 {
        bail!("the bundle is over 64 MiB");
    }
    Ok(())
}

fn walk(d: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}
