//! Every CPU kernel path, forced with `STEERLM_ISA`, through the binary: float models give
//! transformers' logits (within 1e-4) and greedy tokens on each path; int8 models give the
//! same logits (within 1e-4) and tokens on each path as on the portable one; the opt-in
//! roundings (`--int8-activations`, `--bf16-activations`) stay close, with their error printed.

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
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
        {
            v.push("avx512");
        }
    }
    v
}

/// `generate` on `model` with the kernels forced to `isa`: (last-position logits, greedy
/// ids).
fn run_on(isa: &str, model: &Path, text: &str, tmp: &Path) -> (Vec<f32>, Vec<u32>) {
    run_with(isa, model, text, tmp, &[])
}

fn run_with(
    isa: &str,
    model: &Path,
    text: &str,
    tmp: &Path,
    extra: &[&str],
) -> (Vec<f32>, Vec<u32>) {
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
        .args(extra)
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
        quantize_int8(&fixtures().join("models/gqa/hf"), &out, group);
        for p in truth("gqa")["prompts"].as_array().unwrap() {
            let text = p["text"].as_str().unwrap();
            let (base, base_ids) = run_on("generic", &out, text, tmp.path());
            for isa in &levels[1..] {
                let (logits, ids) = run_on(isa, &out, text, tmp.path());
                let d = max_diff(&logits, &base);
                assert!(d <= 1e-4, "{group:?} {isa} {}: {d} from generic", p["name"]);
                assert_eq!(ids, base_ids, "{group:?} {isa} {}", p["name"]);
            }
            // --int8-activations (opt-in): the prompt stays f32, so the prompt logits are
            // the exact ones; decoding rounds the activations, which moves the greedy
            // tokens' logits a little. Every path gives the same tokens as the portable one.
            let a8 = ["--int8-activations"];
            let (l0, a8_ids) = run_with("generic", &out, text, tmp.path(), &a8);
            assert!(max_diff(&l0, &base) <= 1e-4, "{group:?}: a8 prompt logits");
            let same = a8_ids.iter().zip(&base_ids).filter(|(a, b)| a == b).count();
            assert!(
                same >= 12,
                "{group:?} {}: a8 kept {same}/16 tokens",
                p["name"]
            );
            for isa in &levels[1..] {
                let (_, ids) = run_with(isa, &out, text, tmp.path(), &a8);
                assert_eq!(ids, a8_ids, "{group:?} {isa} {}: a8", p["name"]);
            }
        }
    }
}

/// `--int8-activations` changes one decode step's logits (the path runs), by little (the
/// activations' rounding), and the exact path is the default.
#[test]
fn int8_activations_move_decode_logits_a_little() {
    use steerlm_convert::container::mapped::OpenOptions;
    use steerlm_convert::runtime::load::Model;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("int8");
    let src = fixtures().join("models/gqa/hf");
    let args = [
        "quantize",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        "-q",
    ];
    let (code, _, err) = run(&[&args[..], &["--scheme", "int8", "--device", "cpu"]].concat());
    assert_eq!(code, 0, "{err}");
    let mut m = Model::open(&out, &OpenOptions::default()).unwrap();
    assert!(
        !m.weights.acts.int8 && !m.weights.acts.bf16,
        "exact by default"
    );
    let step = |m: &Model| {
        let mut c = m.weights.new_cache();
        m.weights.forward(&m.archive, &mut c, &[1, 17, 42]);
        m.weights.forward(&m.archive, &mut c, &[99])
    };
    let exact = step(&m);
    m.weights.acts.int8 = true;
    let a8 = step(&m);
    let d = max_diff(&exact, &a8);
    let range = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
    eprintln!("--int8-activations: max |Δlogit| {d:.3e} (logits up to {range:.2})");
    assert!(d > 0.0 && d < 0.05 * range.max(1.0), "{d} of {range}");
}

/// `--bf16-activations` (opt-in) on bf16 models and int8 ones (one scale a row, and
/// groups of 32): the prompt's activations are rounded to bf16, which moves the logits from
/// the exact run's a little (printed, and bounded here) on every path. The greedy tokens
/// after the prompt are printed, not held: these small models have near ties that a
/// 3·10⁻² move flips (one prompt keeps 4 of 16 on int8). The paths do not agree with each other more closely than
/// with the exact run: a sum that differs in its last bit between two paths can round to
/// bf16 one step (2^-8) apart before the next product. The kernels themselves are held to
/// f64 sums in the unit tests.
#[test]
fn bf16_activations_move_prompt_logits_a_little_on_every_path() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = fixtures().join("models/gqa/hf");
    let mut models = vec![
        fixtures().join("archives/legacy_tp2_bf16.nemo"),
        fixtures().join("archives/gqa_mcore_tp2_bf16.nemo"),
    ];
    for group in [None, Some("32")] {
        let out = tmp.path().join(format!("int8-{group:?}"));
        quantize_int8(&hf, &out, group);
        models.push(out);
    }
    let flag = ["--bf16-activations"];
    for isa in levels() {
        let mut moved = 0f32;
        for path in &models {
            let model = if path.to_string_lossy().contains("legacy") {
                "mha"
            } else {
                "gqa"
            };
            for p in truth(model)["prompts"].as_array().unwrap() {
                let text = p["text"].as_str().unwrap();
                let (exact, exact_ids) = run_on(isa, path, text, tmp.path());
                let (logits, ids) = run_with(isa, path, text, tmp.path(), &flag);
                let d = max_diff(&logits, &exact);
                let range = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
                let name = format!("{} {isa} {}", path.display(), p["name"]);
                let same = ids.iter().zip(&exact_ids).filter(|(a, b)| a == b).count();
                eprintln!(
                    "{name}: --bf16-activations max |dlogit| {d:.3e} (logits up to {range:.2}), \
                     {same}/16 greedy tokens kept"
                );
                assert!(d <= 0.01 * range.max(1.0), "{name}: {d} of {range}");
                moved = moved.max(d);
            }
        }
        assert!(
            moved > 1e-5,
            "{isa}: the rounding never moved a logit: it did not run"
        );
    }
}
