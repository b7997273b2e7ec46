//! `steerlm-convert inspect` end to end on the fixtures.

mod common;

use common::*;
use serde_json::Value;

fn json(file: &str, extra: &[&str]) -> Value {
    let path = fixtures().join(file);
    let mut args = vec!["inspect", path.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{file}: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn text_report_of_a_tp2_archive() {
    let path = fixtures().join("archives/legacy_tp2_bf16.nemo");
    let (code, out, err) = run(&["inspect", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for want in [
        "layout        mp_rank folders, TP 2 x PP 1, legacy keys",
        "4 layers, hidden 64, 4 heads, 4 query groups, head dim 16, ffn 160, fast-swiglu, rmsnorm",
        "rope base 10000.0, 512 positions",
        "400 real, 416 padded for TP 2 (unit 16), 416 rows stored",
        "bf16, 54 weight tensors",
        "240192 parameters",
        "bpe, 400 pieces, byte fallback, bos 1 <s>, eos 2 </s>; single pieces <extra_id_0>=3 <extra_id_1>=4 <extra_id_2>=5",
    ] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
    assert!(!out.contains("warning"), "{out}");
}

#[test]
fn json_report_matches_every_manifest_entry() {
    for a in archives() {
        let file = a["file"].as_str().unwrap();
        let r = json(file, &[]);
        assert_eq!(r["tp"], a["tp"], "{file}");
        assert_eq!(r["pp"], a["pp"], "{file}");
        assert_eq!(r["dtypes"], serde_json::json!([a["dtype"]]), "{file}");
        assert_eq!(r["vocab"]["real"], 400, "{file}");
        assert_eq!(r["vocab"]["stored_rows"], a["padded_vocab"], "{file}");
        assert_eq!(r["compressed"], a["gzip"], "{file}");
        assert_eq!(r["architecture"]["activation"], a["activation"], "{file}");
        let hf: Value = serde_json::from_slice(
            &std::fs::read(
                fixtures()
                    .join("models")
                    .join(a["model"].as_str().unwrap())
                    .join("hf/config.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let arch = &r["architecture"];
        assert_eq!(arch["hidden_size"], hf["hidden_size"], "{file}");
        assert_eq!(arch["num_layers"], hf["num_hidden_layers"], "{file}");
        assert_eq!(
            arch["num_attention_heads"], hf["num_attention_heads"],
            "{file}"
        );
        assert_eq!(
            arch["num_query_groups"], hf["num_key_value_heads"],
            "{file}"
        );
        assert_eq!(arch["ffn_hidden_size"], hf["intermediate_size"], "{file}");
        assert_eq!(
            arch["rope_base"].as_f64(),
            hf["rope_theta"].as_f64(),
            "{file}"
        );
        assert_eq!(
            arch["max_position_embeddings"], hf["max_position_embeddings"],
            "{file}"
        );
        let hf_params: u64 = hf_tensors(a["model"].as_str().unwrap())
            .values()
            .map(|(s, _)| s.iter().product::<usize>() as u64)
            .sum();
        assert_eq!(
            r["parameters"].as_u64(),
            Some(hf_params),
            "{file}: parameter count"
        );
        assert_eq!(r["warnings"], serde_json::json!([]), "{file}");
    }
}

#[test]
fn tensors_listing_has_every_tensor_with_rank_and_role() {
    let r = json("archives/legacy_tp2_pp2_bf16.nemo", &["--tensors"]);
    let ts = r["tensors"].as_array().unwrap();
    // 2 TP × (4 layers × 6 weights + embedding + final norm + output); the rotary inv_freq
    // of each of the 4 ranks is not a weight and is listed with the non-weight entries.
    assert_eq!(ts.len(), 2 * (4 * 6 + 3));
    let qkv = ts
        .iter()
        .find(|t| {
            t["rank"] == "tp_rank_01_pp_rank_001"
                && t["name"]
                    == "model.language_model.encoder.layers.1.self_attention.query_key_value.weight"
        })
        .unwrap();
    assert_eq!(qkv["shape"], serde_json::json!([96, 64]));
    assert_eq!(qkv["role"], "qkv-grouped");
    assert_eq!(qkv["dtype"], "bf16");
    let extra = r["non_tensors"].as_array().unwrap();
    assert!(extra.iter().all(|e| e["role"] == "skip"));
    let inv_freq = extra
        .iter()
        .filter(|e| e["name"].as_str().unwrap().ends_with("inv_freq"))
        .count();
    assert_eq!(inv_freq, 4);
    assert!(extra
        .iter()
        .filter(|e| !e["name"].as_str().unwrap().ends_with("inv_freq"))
        .all(|e| e["value"] == "None"));
    // zarr as NeMo 1.23 wrote it, and megatron-core's torch_dist save of the same model:
    // the same chunks (one per layer and per gate / up half of each TP rank).
    for (file, backend) in [
        ("archives/gqa_dist_zarr_bf16.nemo", "zarr"),
        ("archives/gqa_torch_dist_tp2_bf16.nemo", "torch_dist"),
    ] {
        let z = json(file, &["--tensors"]);
        assert_eq!(z["dist"]["backend"], backend);
        assert_eq!(z["dist"]["arrays"], 9);
        let fc1 = z["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "model.decoder.layers.mlp.linear_fc1.weight")
            .unwrap();
        assert_eq!(fc1["shape"], serde_json::json!([4, 320, 64]), "{file}");
        assert_eq!(fc1["chunks"], 16, "{file}");
        assert_eq!(fc1["chunk_shape"], serde_json::json!([1, 80, 64]), "{file}");
        assert_eq!(fc1["role"], "gate-up-fused", "{file}");
    }
    let path = fixtures().join("archives/gqa_torch_dist_tp2_bf16.nemo");
    let (code, text, err) = run(&["inspect", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("dist          torch_dist backend in model_weights/: 9 arrays in 53 chunks"),
        "{text}"
    );
}

/// Regression (counts disagree): the storage line, `tensor_count` and the `--tensors`
/// listing count the same weight tensors, and say what is left out.
#[test]
fn counts_disagree_between_summary_and_listing() {
    let r = json("archives/legacy_tp2_pp2_bf16.nemo", &["--tensors"]);
    assert_eq!(
        r["tensor_count"].as_u64().unwrap() as usize,
        r["tensors"].as_array().unwrap().len()
    );
    assert!(r["non_weight_count"].as_u64().unwrap() >= 4);
    let (code, out, err) = run(&[
        "inspect",
        fixtures()
            .join("archives/legacy_tp2_pp2_bf16.nemo")
            .to_str()
            .unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("{} weight tensors (+", r["tensor_count"]))
            && out.contains("not counted"),
        "{out}"
    );
}

#[test]
fn help_documents_every_flag() {
    let (code, out, _) = run(&["inspect", "--help"]);
    assert_eq!(code, 0);
    for flag in ["--tensors", "--json", "--scratch-dir", "--quiet"] {
        assert!(out.contains(flag), "{flag}");
    }
    let (code, _, err) = run(&["inspect"]);
    assert_eq!(code, 2, "usage errors exit 2: {err}");
}

/// Regression (help text): `--scratch-dir` says what each command does with it, `--scheme`
/// is described, inputs are not only ".nemo archives", the stop values are listed, and a
/// missing prompt names both ways to give one.
#[test]
fn help_text_says_one_thing_per_command() {
    let help = |cmd: &str| {
        let (code, out, err) = run(&[cmd, "--help"]);
        assert_eq!(code, 0, "{err}");
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let generate = help("generate");
    assert!(
        generate.contains("(default: the system temp dir)"),
        "{generate}"
    );
    assert!(!generate.contains("the output's folder"), "{generate}");
    assert!(
        generate.contains("max_tokens, eos, end_string") && generate.contains("context"),
        "{generate}"
    );
    assert!(help("nemo-to-safetensors").contains("(default: the output's folder)"));
    let quantize = help("quantize");
    assert!(
        quantize.contains("--scheme <SCHEME> What to write"),
        "{quantize}"
    );
    for cmd in ["inspect", "nemo-to-safetensors"] {
        assert!(help(cmd).contains("per-rank folder"), "{cmd}");
    }
    let (code, _, err) = run(&["generate", "model.nemo"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--prompt <PROMPT>|--prompt-file <FILE>"),
        "{err}"
    );
}
