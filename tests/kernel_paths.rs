//! Every CPU kernel path, forced with `STEERLM_ISA`, through the binary: float models give
//! transformers' logits (within 1e-4) and greedy tokens on each path; int8 models give the
//! same logits (within 1e-4) and tokens on each path as on the portable one.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// The levels this CPU can run.
fn levels() -> Vec<&'static str> {
    let mut v = vec!["generic"];
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        v.push("avx2");
    }
    v
}

/// `generate` on `model` with the kernels forced to `isa`: (last-position logits, greedy
/// ids).
fn run_on(isa: &str, model: &Path, text: &str, tmp: &Path) -> (Vec<f32>, Vec<u32>) {
    let logits = tmp.join(format!("logits-{isa}.json"));
    let out = assert_cmd::Command::cargo_bin("steerlm-convert")
        .unwrap()
        .env("STEERLM_ISA", isa)
        .arg("generate")
        .arg(model)
        .args(["--raw", "--ignore-eos", "--json", "-q", "--threads", "2"])
        .args(["--max-tokens", "16", "--prompt", text])
        .arg("--logits-out")
        .arg(&logits)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{isa} {}: {}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["timing"]["isa"], isa, "the forced path ran");
    let l: Value = serde_json::from_slice(&std::fs::read(&logits).unwrap()).unwrap();
    (floats_of(&l), ids_of(&doc["generated_ids"]))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn float_models_match_transformers_on_every_kernel_path() {
    let tmp = tempfile::tempdir().unwrap();
    let levels = levels();
    for (src, model) in [
        ("models/mha/hf", "mha"),
        ("archives/legacy_tp2_bf16.nemo", "mha"),
        ("archives/legacy_tp4_fp16.nemo", "mha"),
        ("archives/gqa_mcore_tp2_bf16.nemo", "gqa"),
    ] {
        let t = truth(model);
        for p in t["prompts"].as_array().unwrap() {
            let text = p["text"].as_str().unwrap();
            let want = floats_of(&p["last_logits"]);
            for isa in &levels {
                let (logits, ids) = run_on(isa, &fixtures().join(src), text, tmp.path());
                let d = max_diff(&logits, &want);
                assert!(d <= 1e-4, "{src} {isa} {}: logits differ by {d}", p["name"]);
                assert_eq!(ids, ids_of(&p["greedy"]), "{src} {isa} {}", p["name"]);
            }
        }
    }
}

#[test]
fn int8_models_agree_on_every_kernel_path() {
    let tmp = tempfile::tempdir().unwrap();
    let levels = levels();
    for group in [None, Some("32")] {
        let out = tmp.path().join(format!("int8-{group:?}"));
        let mut args = vec!["quantize", "--scheme", "int8", "--device", "cpu", "-q"];
        if let Some(g) = group {
            args.extend(["--granularity", "group", "--group-size", g]);
        }
        let src = fixtures().join("models/gqa/hf");
        let (code, _, err) = run(&[
            &args[..1],
            &[src.to_str().unwrap(), out.to_str().unwrap()],
            &args[1..],
        ]
        .concat());
        assert_eq!(code, 0, "{err}");
        for p in truth("gqa")["prompts"].as_array().unwrap() {
            let text = p["text"].as_str().unwrap();
            let (base, base_ids) = run_on("generic", &out, text, tmp.path());
            for isa in &levels[1..] {
                let (logits, ids) = run_on(isa, &out, text, tmp.path());
                let d = max_diff(&logits, &base);
                assert!(d <= 1e-4, "{group:?} {isa} {}: {d} from generic", p["name"]);
                assert_eq!(ids, base_ids, "{group:?} {isa} {}", p["name"]);
            }
        }
    }
}
