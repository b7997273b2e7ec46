//! `reshard` on every fixture and grid, checked through `nemo-to-safetensors` against the
//! ground truth; split ∘ merge = identity for every role on random shapes; refusals.

mod common;

use std::path::Path;

use assert_cmd::Command;
use common::*;
use proptest::prelude::*;
use serde_json::Value;
use steerlm_convert::container::mapped::OpenOptions;
use steerlm_convert::dtype::DType;
use steerlm_convert::model::View;
use steerlm_convert::pipeline::reshard::{reshard, Format, ReshardOptions};
use steerlm_convert::pipeline::to_hf::{nemo_to_safetensors, ConvertOptions};
use steerlm_convert::synth::{self, SynthSpec};

fn open(p: &Path) -> View {
    View::open(p, &OpenOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn opts(tp: u64, pp: u64, format: Format) -> ReshardOptions {
    ReshardOptions {
        tp,
        pp,
        format,
        dtype: None,
        force: false,
        allow_overflow: false,
        progress: false,
    }
}

fn to_hf(ck: &View, out: &Path) {
    let o = ConvertOptions {
        dtype: Some(DType::F32),
        max_shard_bytes: u64::MAX,
        force: false,
        allow_overflow: false,
        progress: false,
    };
    nemo_to_safetensors(ck, out, &o).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
}

/// name → bytes of an HF output folder's single safetensors file.
fn tensors(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    v.sort();
    v
}

fn truth_f32(model: &str) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = hf_tensors(model)
        .into_iter()
        .map(|(n, (_, vals))| (n, cast(&vals, DType::F32)))
        .collect();
    v.sort();
    v
}

/// The config without its grid; a NeMo 2.0 source's tokenizer path (in `context/`)
/// becomes the artifact's name at the root (or `nemo_tokenizer/`), so the path is left
/// out for those.
fn yaml_without_grid(v: &View, nemo2: bool) -> serde_norway::Value {
    let ck = v.nemo().unwrap();
    let mut d = ck.config.document.clone();
    if let serde_norway::Value::Mapping(m) = &mut d {
        m.remove("tensor_model_parallel_size");
        m.remove("pipeline_model_parallel_size");
        if let (true, Some(serde_norway::Value::Mapping(t))) = (nemo2, m.get_mut("tokenizer")) {
            t.remove("model");
            t.remove("type");
        }
    }
    d
}

#[test]
fn every_fixture_reshards_to_every_grid_and_back_to_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    for a in archives() {
        let file = a["file"].as_str().unwrap();
        let src = open(&fixtures().join(file));
        let truth = truth_f32(a["model"].as_str().unwrap());
        let groups = src.nemo().unwrap().config.num_query_groups;
        for (i, (tp, pp)) in [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)]
            .into_iter()
            .enumerate()
        {
            if !groups.is_multiple_of(tp) {
                continue;
            }
            let format = if i % 2 == 0 {
                Format::Nemo
            } else {
                Format::Safetensors
            };
            let out = dir.path().join(format!("{n}.out"));
            let r = reshard(&src, &out, &opts(tp, pp, format))
                .unwrap_or_else(|e| panic!("{file} -> {tp}x{pp}: {e}"));
            assert_eq!(r.ranks.len() as u64, tp * pp);
            let back = open(&out);
            assert_eq!(back.grid().unwrap(), (tp, pp), "{file} -> {tp}x{pp}");
            assert_eq!(
                back.nemo().unwrap().stored_vocab_rows(),
                Some(src.nemo().unwrap().config.padded_vocab(400, tp)),
                "{file} -> {tp}x{pp}: vocab re-padded"
            );
            assert!(back.nemo().unwrap().unknown_keys().is_empty());
            let nemo2 = src.nemo().unwrap().nemo2;
            assert_eq!(
                yaml_without_grid(&back, nemo2),
                yaml_without_grid(&src, nemo2),
                "{file} -> {tp}x{pp}: model_config.yaml"
            );
            let tok = back
                .nemo()
                .unwrap()
                .tokenizer()
                .map(|t| t.model.vocab_size());
            assert_eq!(
                tok.ok(),
                Some(400),
                "{file} -> {tp}x{pp}: the tokenizer comes along"
            );
            let hf = dir.path().join(format!("{n}.hf"));
            to_hf(&back, &hf);
            assert!(
                tensors(&hf) == truth,
                "{file} -> {tp}x{pp} ({format:?}): tensors differ from the truth"
            );
            n += 1;
        }
    }
    assert!(n >= 60, "{n} reshards checked");
}

#[test]
fn a_resharded_folder_is_input_for_another_reshard() {
    let dir = tempfile::tempdir().unwrap();
    let src = open(&fixtures().join("archives/nemo_legacy_tp4.nemo"));
    let a = dir.path().join("tp2");
    reshard(&src, &a, &opts(2, 1, Format::Safetensors)).unwrap();
    let b = dir.path().join("tp1pp2.nemo");
    reshard(&open(&a), &b, &opts(1, 2, Format::Nemo)).unwrap();
    let c = dir.path().join("tp4");
    reshard(&open(&b), &c, &opts(4, 1, Format::Safetensors)).unwrap();
    let hf = dir.path().join("hf");
    to_hf(&open(&c), &hf);
    assert!(tensors(&hf) == truth_f32("mha"));
}

#[test]
fn impossible_grids_and_bad_inputs_are_refused_with_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let o = out.to_str().unwrap();
    let gqa = fixtures().join("archives/gqa_mcore_tp2_bf16.nemo");
    let mha = fixtures().join("archives/legacy_tp2_bf16.nemo");
    for (args, want) in [
        (
            vec!["reshard", gqa.to_str().unwrap(), o, "--tp", "4"],
            "cannot split for --tp 4: query groups (2) is not divisible by TP 4",
        ),
        (
            vec![
                "reshard",
                mha.to_str().unwrap(),
                o,
                "--tp",
                "1",
                "--pp",
                "3",
            ],
            "cannot split for --pp 3: 4 layers are not divisible by 3",
        ),
        (
            vec!["reshard", mha.to_str().unwrap(), o, "--tp", "0"],
            "--tp and --pp must be at least 1",
        ),
        (
            vec![
                "reshard",
                fixtures().join("models/mha/hf").to_str().unwrap(),
                o,
                "--tp",
                "1",
            ],
            "not a NeMo model archive",
        ),
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "expected `{want}` in {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!out.exists());
    }
    std::fs::write(&out, b"mine").unwrap();
    let (code, _, err) = run(&[
        "reshard",
        mha.to_str().unwrap(),
        o,
        "--tp",
        "1",
        "--format",
        "nemo",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("already exists; pass --force"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"mine");
    let (code, _, err) = run(&[
        "reshard",
        mha.to_str().unwrap(),
        o,
        "--tp",
        "1",
        "--format",
        "nemo",
        "--force",
        "--json",
        "-q",
    ]);
    assert_eq!(code, 0, "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn json_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.nemo");
    let f = fixtures().join("archives/legacy_tp2_pp2_bf16.nemo");
    let o = Command::cargo_bin("steerlm-convert")
        .unwrap()
        .args([
            "reshard",
            f.to_str().unwrap(),
            out.to_str().unwrap(),
            "--tp",
            "4",
            "--format",
            "nemo",
            "--json",
            "-q",
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["from"], serde_json::json!({"tp": 2, "pp": 2}));
    assert_eq!(v["to"], serde_json::json!({"tp": 4, "pp": 1}));
    assert_eq!(v["ranks"].as_array().unwrap().len(), 4);
    assert_eq!(v["ranks"][3], "mp_rank_03/model_weights.ckpt");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// split ∘ merge = identity for every role (vocab rows, QKV groups with GQA, fused
    /// gate/up, row-parallel columns, replicated norms), on random shapes and degrees:
    /// a TP=a archive resharded to TP=b and back to TP=a holds the same logical tensors.
    #[test]
    fn split_then_merge_is_the_identity(
        groups_per_tp in 1u64..3, q_per_group in 1u64..4, hd in prop::sample::select(vec![2u64, 4, 8]),
        ffn_per_tp in 1u64..5, vocab in 50u64..300, a in prop::sample::select(vec![1u64, 2, 4, 8]),
        b in prop::sample::select(vec![1u64, 2, 4, 8]), pp in 1u64..3, dtype in prop::sample::select(vec![DType::F32, DType::BF16, DType::F16]),
    ) {
        let lcm = a.max(b);
        let groups = groups_per_tp * lcm;
        let heads = groups * q_per_group;
        let spec = SynthSpec {
            layers: 2 * pp, hidden: heads * hd, heads, groups, ffn: ffn_per_tp * lcm, vocab: vocab.max(262),
            tp: a, pp, dtype, make_vocab_size_divisible_by: 8,
        };
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.nemo");
        synth::write(&spec, &src, |_| {}).unwrap();
        let there = dir.path().join("there");
        reshard(&open(&src), &there, &opts(b, 1, Format::Safetensors)).unwrap();
        let back = dir.path().join("back.nemo");
        reshard(&open(&there), &back, &opts(a, pp, Format::Nemo)).unwrap();
        let (h1, h2) = (dir.path().join("h1"), dir.path().join("h2"));
        to_hf(&open(&src), &h1);
        to_hf(&open(&back), &h2);
        prop_assert!(tensors(&h1) == tensors(&h2));
    }
}

#[test]
fn recomputed_rope_frequencies_are_torchs_to_the_bit() {
    // legacy_tp1_fp32 stores the inv_freq transformers computed in float32.
    let ck = open(&fixtures().join("archives/legacy_tp1_fp32.nemo"));
    let steerlm_convert::nemo::checkpoint::Storage::Ranks(ranks) = &ck.nemo().unwrap().weights
    else {
        panic!()
    };
    let (_, t) = ranks[0]
        .state
        .tensors()
        .find(|(n, _)| n.ends_with("inv_freq"))
        .unwrap();
    let want = ck.files().slice(t.offset, t.nbytes()).to_vec();
    let got: Vec<u8> = steerlm_convert::arch::rope_inv_freq(10000.0, 8)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(got, want);
}

fn reshard_cli(args: &[&str]) -> (i32, String, String) {
    let mut a = vec!["reshard"];
    a.extend_from_slice(args);
    a.push("-q");
    run(&a)
}

/// Regression (`reshard --dtype fp16` wrote ±inf with no word): refused, naming the
/// tensor and count, unless --allow-overflow; in both output formats.
#[test]
fn reshard_dtype_fp16_writes_inf_with_no_word() {
    let dir = tempfile::tempdir().unwrap();
    let src = overflowing_archive(dir.path());
    let s = src.to_str().unwrap();
    for out in ["out", "out.nemo"] {
        let out = dir.path().join(out);
        let o = out.to_str().unwrap();
        let (code, _, err) = reshard_cli(&[s, o, "--tp", "1", "--dtype", "fp16"]);
        refused(
            code,
            &err,
            &out,
            "language_model.encoder.layers.0.self_attention.dense.weight`: 1 values overflow fp16",
        );
        let (code, _, err) =
            reshard_cli(&[s, o, "--tp", "1", "--dtype", "fp16", "--allow-overflow"]);
        assert_eq!(code, 0, "{err}");
    }
}

/// Regression (`reshard IN out.nemo` without --format made a folder named out.nemo): the
/// extension decides, and a contradiction is refused.
#[test]
fn reshard_to_a_nemo_name_without_format_creates_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures().join("archives/legacy_tp2_bf16.nemo");
    let out = dir.path().join("out.nemo");
    let (code, _, err) = reshard_cli(&[f.to_str().unwrap(), out.to_str().unwrap(), "--tp", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.is_file(), "a .nemo archive, not a folder");
    open(&out);
    let other = dir.path().join("other.nemo");
    let (code, _, err) = reshard_cli(&[
        f.to_str().unwrap(),
        other.to_str().unwrap(),
        "--tp",
        "1",
        "--format",
        "safetensors",
    ]);
    refused(code, &err, &other, "--format safetensors writes a folder");
}

/// Regression (`reshard --format nemo --dtype fp32` left `precision: bf16`): the YAML
/// says the written dtype.
#[test]
fn reshard_dtype_leaves_the_old_precision_in_the_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures().join("archives/legacy_tp2_bf16.nemo");
    for (dtype, want) in [("fp32", "32"), ("fp16", "16"), ("bf16", "bf16")] {
        let out = dir.path().join(format!("{dtype}.nemo"));
        let (code, _, err) = reshard_cli(&[
            f.to_str().unwrap(),
            out.to_str().unwrap(),
            "--tp",
            "2",
            "--dtype",
            dtype,
        ]);
        assert_eq!(code, 0, "{err}");
        let ck = open(&out);
        let yaml = yaml_without_grid(&ck, false);
        assert_eq!(
            serde_norway::to_string(&yaml["precision"]).unwrap().trim(),
            want,
            "{dtype}"
        );
    }
}

/// Regression (`reshard X X --force` replaced the source): a folder onto itself is
/// refused with the source intact; a .nemo onto itself is the documented atomic rewrite.
#[test]
fn reshard_onto_its_own_input_replaces_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let ranks = dir.path().join("ranks");
    reshard_to_ranks("archives/legacy_tp2_bf16.nemo", &ranks, 2);
    let r = ranks.to_str().unwrap();
    let (code, _, err) = reshard_cli(&[r, r, "--tp", "1", "--force"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the output is the input"), "{err}");
    assert!(ranks.join("model_config.yaml").exists());
    // In place for a .nemo file: complete, re-sharded, and nothing left beside it.
    let a = dir.path().join("a.nemo");
    std::fs::copy(fixtures().join("archives/legacy_tp2_bf16.nemo"), &a).unwrap();
    let s = a.to_str().unwrap();
    let (code, _, err) = reshard_cli(&[s, s, "--tp", "4", "--force"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(open(&a).grid().unwrap().0, 4);
    let hf = dir.path().join("hf");
    to_hf(&open(&a), &hf);
    assert_eq!(tensors(&hf), {
        let h2 = dir.path().join("hf2");
        to_hf(
            &open(&fixtures().join("archives/legacy_tp2_bf16.nemo")),
            &h2,
        );
        tensors(&h2)
    });
    assert_no_leftovers(&a);
}

/// Regression (counts disagreed: reshard said 28 tensors per rank where inspect said 27):
/// reshard counts weight tensors, as inspect does, and lists them.
#[test]
fn reshard_counts_agree_with_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures().join("archives/legacy_tp2_bf16.nemo");
    let out = dir.path().join("o");
    let (code, stdout, err) = reshard_cli(&[
        f.to_str().unwrap(),
        out.to_str().unwrap(),
        "--tp",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let (code, ins, err) = run(&["inspect", f.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let ins: Value = serde_json::from_str(&ins).unwrap();
    assert_eq!(v["tensor_count"], ins["tensor_count"]);
    assert_eq!(
        v["tensors"].as_array().unwrap().len() as u64,
        v["tensor_count"].as_u64().unwrap()
    );
    assert!(v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| !t["name"].as_str().unwrap().ends_with("inv_freq")));
}

/// Regression (TP 1 wrote model.safetensors at the top level while the README said rank
/// folders): the README now says what is written, and this is it.
#[test]
fn reshard_tp1_layout_is_the_documented_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tp1");
    reshard_to_ranks("archives/legacy_tp2_bf16.nemo", &out, 1);
    assert!(out.join("model.safetensors").is_file());
    assert!(!out.join("mp_rank_00").exists());
    let readme = std::fs::read_to_string(fixtures().join("../README.md")).unwrap();
    assert!(readme.contains("for TP 1 × PP 1 a single\n`model.safetensors` at the top"));
}

/// A tied model split over pipeline stages: the last stage does not hold the embedding, so
/// it stores megatron-core's copy of it as `output_layer.weight` (the rank NeMo loads
/// expects it there), equal to the first stage's embedding byte for byte.
#[test]
fn tied_models_split_over_stages_keep_the_output_copy_on_the_last_stage() {
    use steerlm_convert::nemo::checkpoint::{Checkpoint, Storage};
    let dir = tempfile::tempdir().unwrap();
    let src = open(&fixtures().join("archives/tied_llama3_mcore_tp2_bf16.nemo"));
    let out = dir.path().join("pp2.nemo");
    reshard(&src, &out, &opts(1, 2, Format::Nemo)).unwrap();
    let ck = Checkpoint::open(&out, &OpenOptions::default()).unwrap();
    let Storage::Ranks(ranks) = &ck.weights else {
        panic!("rank files")
    };
    let find = |pp: u64, key: &str| {
        let r = ranks.iter().find(|r| r.pp == pp).unwrap();
        r.state
            .tensors()
            .find(|(k, _)| *k == key)
            .map(|(_, t)| ck.files.slice(t.offset, t.nbytes()).to_vec())
    };
    let emb = find(0, "model.embedding.word_embeddings.weight").expect("stage 0 embedding");
    assert_eq!(find(1, "model.output_layer.weight"), Some(emb));
    assert_eq!(find(0, "model.output_layer.weight"), None);
    // In one stage the embedding is the output layer: nothing else is written.
    let out1 = dir.path().join("pp1.nemo");
    reshard(&src, &out1, &opts(1, 1, Format::Nemo)).unwrap();
    let ck1 = open(&out1);
    assert!(ck1.nemo().unwrap().unknown_keys().is_empty());
    assert!(
        ck1.tensors.iter().all(|t| t.name != "lm_head.weight"),
        "no lm_head in a tied model's view"
    );
}
