//! `steerlm-convert generate` end to end: exact-length greedy runs from a `.nemo`, from the
//! folder `nemo-to-safetensors` writes and from a per-rank folder `reshard` writes, equal
//! to transformers' tokens; the SteerLM template; bad input.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn truth_prompt(model: &str, name: &str) -> Value {
    truth(model)["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()
        .clone()
}

fn gen_json(model: &Path, text: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "generate",
        model.to_str().unwrap(),
        "--prompt",
        text,
        "--json",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn exact_run(model: &Path, which: &str) {
    for name in ["plain", "unicode", "steerlm"] {
        let p = truth_prompt(which, name);
        let v = gen_json(
            model,
            p["text"].as_str().unwrap(),
            &["--raw", "--ignore-eos", "--max-tokens", "16"],
        );
        assert_eq!(v["prompt_ids"], p["ids"], "{}: {name}", model.display());
        assert_eq!(
            v["generated_ids"],
            p["greedy"],
            "{}: {name}",
            model.display()
        );
        assert_eq!(v["stop"], "max_tokens");
    }
}

#[test]
fn exact_runs_from_nemo_converted_and_resharded() {
    let tmp = tempfile::tempdir().unwrap();
    exact_run(&fixtures().join("archives/nemo_legacy_tp2_pp2.nemo"), "mha");
    exact_run(&fixtures().join("archives/gqa_dist_zarr_bf16.nemo"), "gqa");
    let hf = tmp.path().join("hf");
    let (code, _, err) = run(&[
        "nemo-to-safetensors",
        fixtures()
            .join("archives/nemo_mcore_gqa_tp2.nemo")
            .to_str()
            .unwrap(),
        hf.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(code, 0, "{err}");
    exact_run(&hf, "gqa");
    let ranks = tmp.path().join("tp4");
    reshard_to_ranks("archives/legacy_tp2_bf16.nemo", &ranks, 4);
    exact_run(&ranks, "mha");
}

/// Attribute overrides (one known name, one new) and an exact length.
const POEM_ARGS: [&str; 7] = [
    "--attr",
    "humor=4",
    "--attr",
    "verbosity=2",
    "--max-tokens",
    "8",
    "--ignore-eos",
];

#[test]
fn template_attributes_and_streaming() {
    let model = fixtures().join("archives/nemo_legacy_tp1.nemo");
    let v = gen_json(&model, "Write a poem.", &POEM_ARGS);
    assert_eq!(
        v["prompt"],
        "<extra_id_0>System\nA chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.\n\n<extra_id_1>User\nWrite a poem.\n<extra_id_1>Assistant\n<extra_id_2>quality:9,toxicity:0,humor:4,creativity:0,violence:0,helpfulness:9,not_appropriate:0,verbosity:2\n"
    );
    assert_eq!(v["prompt_ids"][0], 1);
    // The streamed text is the JSON text (the same run, without --json).
    let mut args = vec![
        "generate",
        model.to_str().unwrap(),
        "--prompt",
        "Write a poem.",
    ];
    args.extend(POEM_ARGS);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("{}\n", v["text"].as_str().unwrap()));
    assert!(err.contains("tok/s"), "{err}");
    // --no-bos drops the BOS id and nothing else.
    let nb = gen_json(
        &model,
        "Write a poem.",
        &[&POEM_ARGS[..4], &["--max-tokens", "1", "--no-bos"]].concat(),
    );
    let with: Vec<Value> = v["prompt_ids"].as_array().unwrap()[1..].to_vec();
    assert_eq!(nb["prompt_ids"].as_array().unwrap(), &with);
}

fn fails(args: &[&str], needle: &str) {
    let (code, out, err) = run(args);
    assert_eq!(code, 2, "{args:?}: {err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(needle), "{args:?}: {err}");
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("models/mha/hf");
    let copy = |name: &str| {
        let d = tmp.path().join(name);
        copy_dir(&src, &d);
        d
    };
    // A tokenizer file that is not a SentencePiece model.
    let bad_tok = copy("badtok");
    std::fs::write(bad_tok.join("tokenizer.model"), b"{\"version\": \"1.0\"}").unwrap();
    fails(
        &["generate", bad_tok.to_str().unwrap(), "--prompt", "hi"],
        "tokenizer.model",
    );
    // A folder with a tensor missing.
    let missing = copy("missing");
    let data = std::fs::read(missing.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.2.mlp.down_proj.weight")
        .collect();
    safetensors::serialize_to_file(kept, None, &missing.join("model.safetensors")).unwrap();
    fails(
        &["generate", missing.to_str().unwrap(), "--prompt", "hi"],
        "model.layers.2.mlp.down_proj.weight",
    );
    // A prompt longer than the context (512 positions).
    let long = "word ".repeat(600);
    fails(
        &[
            "generate",
            src.to_str().unwrap(),
            "--raw",
            "--prompt",
            &long,
        ],
        "context is 512 positions",
    );
    fails(
        &[
            "generate",
            src.to_str().unwrap(),
            "--prompt",
            "hi",
            "--attr",
            "humor",
        ],
        "name=value",
    );
    fails(
        &[
            "generate",
            tmp.path().join("nope.nemo").to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        "nope.nemo",
    );
}
