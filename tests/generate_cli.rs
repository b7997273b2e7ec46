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

/// Regression (special tokens in raw prompts): `<s>` typed in a prompt is text, as
/// SentencePiece and NeMo's server read it (NeMo's SentencePiece tokenizer does not split
/// control tokens out of text); transformers agrees with `split_special_tokens=True`.
/// Its default reads `<s>` as the BOS token, and slow and fast do not even agree there.
#[test]
fn special_tokens_in_raw_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    let (code, _, err) = run(&[
        "nemo-to-safetensors",
        fixtures()
            .join("archives/nemo_legacy_tp2.nemo")
            .to_str()
            .unwrap(),
        hf.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(code, 0, "{err}");
    let texts = ["<s>x", "a</s>b <unk>", "<extra_id_1>User"];
    let Some(r) = transformers_ids(&hf, &texts) else {
        return;
    };
    for (i, text) in texts.iter().enumerate() {
        let v = gen_json(&hf, text, &["--raw", "--max-tokens", "1"]);
        let ours: Vec<u32> = ids_of(&v["prompt_ids"])[1..].to_vec();
        let case = &r["cases"][i];
        assert_eq!(ours, ids_of(&case["sentencepiece"]), "{text}");
        assert_eq!(ours, ids_of(&case["slow_split_special"]), "{text}");
        assert_eq!(ours, ids_of(&case["fast_split_special"]), "{text}");
    }
    assert_ne!(r["cases"][0]["slow"], r["cases"][0]["slow_split_special"]);
}

/// Regression (template): a custom --system text is followed by the blank line the
/// card's template has; `--attr quality:3` is accepted.
#[test]
fn template_custom_system_has_no_blank_line() {
    let model = fixtures().join("archives/nemo_legacy_tp1.nemo");
    let v = gen_json(
        &model,
        "Hi",
        &[
            "--system",
            "Be brief.",
            "--attr",
            "quality:3",
            "--max-tokens",
            "1",
        ],
    );
    assert_eq!(
        v["prompt"],
        "<extra_id_0>System\nBe brief.\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n<extra_id_2>quality:3,toxicity:0,humor:0,creativity:0,violence:0,helpfulness:9,not_appropriate:0\n"
    );
}

/// Regression (`--prompt-file` kept the trailing newline and CRLF): the file's text is
/// the same prompt as --prompt gives.
#[test]
fn prompt_file_keeps_trailing_newline_and_crlf() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("p.txt");
    std::fs::write(&f, "Line one.\r\nLine two.\r\n").unwrap();
    let model = fixtures().join("archives/nemo_legacy_tp1.nemo");
    let from_arg = gen_json(&model, "Line one.\nLine two.", &["--max-tokens", "1"]);
    let (code, out, err) = run(&[
        "generate",
        model.to_str().unwrap(),
        "--prompt-file",
        f.to_str().unwrap(),
        "--max-tokens",
        "1",
        "--json",
        "-q",
    ]);
    assert_eq!(code, 0, "{err}");
    let from_file: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(from_file["prompt"], from_arg["prompt"]);
    assert_eq!(from_file["prompt_ids"], from_arg["prompt_ids"]);
    // A missing prompt names both ways to give one.
    let (code, _, err) = run(&["generate", model.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--prompt") && err.contains("--prompt-file"),
        "{err}"
    );
}

/// Regression (the context limit was applied inconsistently): prompt and completion
/// together never exceed the context (512 positions here), whatever the prompt's length.
#[test]
fn context_limit_is_applied_inconsistently() {
    let model = fixtures().join("models/mha/hf");
    // A prompt of exactly 512 tokens ("x" is one token after BOS and the dummy prefix).
    let tok = steerlm_convert::runtime::tokenizer::Tokenizer::new(
        steerlm_convert::nemo::tokenizer::SpModel::parse(
            &std::fs::read(model.join("tokenizer.model")).unwrap(),
            "tokenizer.model",
        )
        .unwrap(),
    );
    let mut text = String::from("a");
    while tok.encode(&text).len() + 1 < 512 {
        text.push_str(" a");
    }
    assert_eq!(tok.encode(&text).len() + 1, 512);
    let full = gen_json(
        &model,
        &text,
        &["--raw", "--ignore-eos", "--max-tokens", "8"],
    );
    assert_eq!(full["prompt_ids"].as_array().unwrap().len(), 512);
    assert_eq!(full["generated_ids"].as_array().unwrap().len(), 0);
    assert_eq!(full["stop"], "context");
    let short = gen_json(
        &model,
        "a",
        &["--raw", "--ignore-eos", "--max-tokens", "1000"],
    );
    let total = short["prompt_ids"].as_array().unwrap().len()
        + short["generated_ids"].as_array().unwrap().len();
    assert_eq!(total, 512);
    assert_eq!(short["stop"], "context");
}

/// Regression (`--json` vocabulary): a schema version, `generated_ids`, `stop` as an enum
/// with its detail apart, `fp32`-style dtype names, and EOS kept in the ids as an end
/// string's tokens are.
#[test]
fn json_schema_is_stable_and_names_agree() {
    let model = fixtures().join("archives/nemo_legacy_tp1.nemo");
    let v = gen_json(
        &model,
        "Where and when did techno music originate?",
        &["--max-tokens", "64"],
    );
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["command"], "generate");
    let stop = v["stop"].as_str().unwrap();
    assert!(
        ["max_tokens", "eos", "end_string", "context"].contains(&stop),
        "{stop}"
    );
    assert_eq!(v["stop_detail"].is_string(), stop == "end_string", "{v}");
    assert!(["fp32", "fp16", "bf16", "int8"].contains(&v["weights"].as_str().unwrap()));
    let eos = v["generated_ids"].as_array().unwrap().last().cloned();
    if stop == "eos" {
        assert_eq!(eos, Some(serde_json::json!(2)), "EOS is the last id");
    }
}

#[test]
fn sampling_is_reproducible_from_a_seed_and_top_k_1_is_greedy() {
    let model = fixtures().join("archives/nemo_mcore_gqa.nemo");
    let ids = |extra: &[&str]| {
        let mut a = vec!["--raw", "--ignore-eos", "--max-tokens", "24"];
        a.extend_from_slice(extra);
        let v = gen_json(&model, "The quick brown fox", &a);
        v["generated_ids"].clone()
    };
    let greedy = ids(&[]);
    let s1 = ids(&["--temperature", "0.9", "--seed", "1"]);
    assert_eq!(
        s1,
        ids(&["--temperature", "0.9", "--seed", "1"]),
        "same seed"
    );
    assert_ne!(
        s1,
        ids(&["--temperature", "0.9", "--seed", "2"]),
        "other seed"
    );
    assert_ne!(s1, greedy, "sampling at 0.9 departs from greedy");
    // top-k 1, or a nucleus so small that only the top token is left, is greedy.
    assert_eq!(
        ids(&["--temperature", "3", "--top-k", "1", "--seed", "5"]),
        greedy
    );
    assert_eq!(
        ids(&["--temperature", "1", "--top-p", "1e-9", "--seed", "5"]),
        greedy
    );
    let v = gen_json(
        &model,
        "hi",
        &[
            "--max-tokens",
            "2",
            "--temperature",
            "0.5",
            "--top-k",
            "40",
            "--seed",
            "9",
        ],
    );
    assert_eq!(v["sampling"]["seed"], 9);
    assert_eq!(v["sampling"]["greedy"], false);
    for (bad, needle) in [
        ("--temperature=-1", "--temperature"),
        ("--top-p=0", "--top-p"),
        ("--top-p=1.5", "--top-p"),
        ("--repetition-penalty=0", "--repetition-penalty"),
    ] {
        let (code, _, err) = run(&[
            "generate",
            model.to_str().unwrap(),
            "--prompt",
            "hi",
            "-q",
            bad,
        ]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
}
