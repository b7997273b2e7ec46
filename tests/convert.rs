//! `nemo-to-safetensors` on every fixture: bit-identical to the ground-truth HF model,
//! sharded output, determinism, and refusals with nothing left behind.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use steerlm_convert::tensor::DType;

fn convert(input: &Path, out: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "nemo-to-safetensors",
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        "-q",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// All tensors of an HF output folder (sharded or not): name → (dtype, shape, bytes).
fn read_output(dir: &Path) -> HashMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut files = vec![];
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        let mut names: Vec<String> = v["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        names.sort();
        names.dedup();
        files.extend(names);
    } else {
        files.push("model.safetensors".to_string());
    }
    let mut out = HashMap::new();
    for f in files {
        let bytes = std::fs::read(dir.join(&f)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, v) in st.tensors() {
            out.insert(
                name,
                (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                ),
            );
        }
    }
    out
}

fn st_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        _ => unreachable!(),
    }
}

fn check_against_truth(dir: &Path, model: &str, dtype: DType, what: &str) {
    let hf = hf_tensors(model);
    let out = read_output(dir);
    assert_eq!(out.len(), hf.len(), "{what}: tensor count");
    for (name, (shape, vals)) in &hf {
        let (d, s, b) = out
            .get(name)
            .unwrap_or_else(|| panic!("{what}: missing {name}"));
        assert_eq!(d, st_name(dtype), "{what}: {name} dtype");
        assert_eq!(s, shape, "{what}: {name} shape");
        assert!(
            b == &cast(vals, dtype),
            "{what}: {name} bytes differ from the ground truth"
        );
    }
    let mut want: Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("models").join(model).join("hf/config.json")).unwrap(),
    )
    .unwrap();
    let got: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    want.as_object_mut().unwrap().remove("transformers_version");
    want["torch_dtype"] =
        Value::String(steerlm_convert::formats::hf::torch_dtype_name(dtype).into());
    assert_eq!(got, want, "{what}: config.json");
    let tok = std::fs::read(dir.join("tokenizer.model")).unwrap();
    let want_tok = std::fs::read(
        fixtures()
            .join("models")
            .join(model)
            .join("hf/tokenizer.model"),
    )
    .unwrap();
    assert_eq!(
        tok, want_tok,
        "{what}: tokenizer.model is the archive's own"
    );
}

#[test]
fn every_fixture_converts_bit_identically_to_the_ground_truth() {
    let dir = tempfile::tempdir().unwrap();
    for a in archives() {
        let file = a["file"].as_str().unwrap();
        let model = a["model"].as_str().unwrap();
        let stored = dtype_of(a["dtype"].as_str().unwrap());
        for (flag, dtype) in [
            ("keep", stored),
            ("fp32", DType::F32),
            ("bf16", DType::BF16),
        ] {
            let out = dir
                .path()
                .join(format!("{}-{flag}", file.replace('/', "_")));
            let (code, _, err) = convert(&fixtures().join(file), &out, &["--dtype", flag]);
            assert_eq!(code, 0, "{file} --dtype {flag}: {err}");
            check_against_truth(&out, model, dtype, &format!("{file} --dtype {flag}"));
        }
    }
}

#[test]
fn sharded_output_has_an_index_and_the_same_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sharded");
    let (code, stdout, err) = convert(
        &fixtures().join("archives/legacy_tp4_fp16.nemo"),
        &out,
        &["--max-shard-size", "100KB", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let index: Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let shards: Vec<&str> = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f.as_str())
        .filter(|f| f.starts_with("model-"))
        .collect();
    assert!(shards.len() >= 3, "{shards:?}");
    assert_eq!(
        shards[0],
        format!("model-00001-of-{:05}.safetensors", shards.len())
    );
    for s in &shards {
        let len = std::fs::metadata(out.join(s)).unwrap().len();
        assert!(
            len < 100_000 + 8192
                || index["weight_map"]
                    .as_object()
                    .unwrap()
                    .values()
                    .filter(|v| v == s)
                    .count()
                    == 1,
            "{s} {len}"
        );
    }
    let total: u64 = read_output(&out)
        .values()
        .map(|(_, _, b)| b.len() as u64)
        .sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    check_against_truth(&out, "mha", DType::F16, "sharded");
    assert_eq!(
        report["dropped"].as_array().unwrap().len(),
        1 + 4 * 4 + 1,
        "inv_freq and 17 _extra_state keys"
    );
}

#[test]
fn output_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixtures().join("archives/gqa_dist_zarr_bf16.nemo");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    assert_eq!(convert(&input, &a, &[]).0, 0);
    assert_eq!(convert(&input, &b, &[]).0, 0);
    let mut names: Vec<PathBuf> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert_eq!(names.len(), 6);
    for p in names {
        let q = b.join(p.file_name().unwrap());
        assert_eq!(
            std::fs::read(&p).unwrap(),
            std::fs::read(&q).unwrap(),
            "{}",
            p.display()
        );
    }
}

/// Exit 2, one line containing `want`, and no output or partial output left.
fn refused(code: i32, err: &str, out: &Path, want: &str) {
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(want), "expected `{want}` in: {err}");
    assert!(!out.exists(), "no output");
    let parent = out.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty(), "partial output left: {leftovers:?}");
}

#[test]
fn existing_output_is_refused_without_force_and_replaced_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let input = fixtures().join("archives/legacy_tp2_bf16.nemo");
    let (code, _, err) = convert(&input, &out, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("already exists; pass --force"), "{err}");
    assert!(
        out.join("keep.txt").exists(),
        "an existing output is never touched"
    );
    let (code, _, err) = convert(&input, &out, &["--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.join("keep.txt").exists());
    check_against_truth(&out, "mha", DType::BF16, "--force");
}

#[test]
fn fp16_overflow_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.nemo");
    // Put bf16 3.0e38 (0x7f62) in the first element of rank 0's o_proj (dense) of layer 0.
    let fixture = std::fs::read(fixtures().join("archives/legacy_tp2_bf16.nemo")).unwrap();
    let ck = steerlm_convert::nemo::checkpoint::Checkpoint::open(
        &fixtures().join("archives/legacy_tp2_bf16.nemo"),
        &Default::default(),
    )
    .unwrap();
    let steerlm_convert::nemo::checkpoint::Weights::Ranks(ranks) = &ck.weights else {
        panic!()
    };
    let (_, t) = ranks[0]
        .state
        .tensors()
        .find(|(n, _)| n.ends_with("layers.0.self_attention.dense.weight"))
        .unwrap();
    let members = steerlm_convert::nemo::tar::index(&fixture, "f").unwrap();
    let m = members
        .iter()
        .find(|m| m.name == "mp_rank_00/model_weights.ckpt")
        .unwrap();
    let at = (t.offset - m.offset) as usize;
    rebuild(
        &fixtures().join("archives/legacy_tp2_bf16.nemo"),
        &src,
        |n, d| {
            let mut d = d.to_vec();
            if n == "mp_rank_00/model_weights.ckpt" {
                d[at..at + 2].copy_from_slice(&[0x62, 0x7f]);
            }
            Some((format!("./{n}"), d))
        },
    );
    let out = dir.path().join("out");
    let (code, _, err) = convert(&src, &out, &["--dtype", "fp16"]);
    refused(
        code,
        &err,
        &out,
        "tensor `model.layers.0.self_attn.o_proj.weight`: 1 values overflow fp16",
    );
    let (code, stdout, err) = convert(
        &src,
        &out,
        &["--dtype", "fp16", "--allow-overflow", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        r["fp16_overflow"],
        serde_json::json!([{"tensor": "model.layers.0.self_attn.o_proj.weight", "count": 1}])
    );
    assert!(
        err.contains("cast bf16->fp16") && err.contains("1 tensors had fp16 overflow"),
        "{err}"
    );
}

#[test]
fn bad_input_gives_one_line_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let tp2 = fixtures().join("archives/legacy_tp2_bf16.nemo");
    let out = dir.path().join("out");
    let edit_yaml = |name: &str, edits: &[(&str, &str)]| -> PathBuf {
        let p = dir.path().join(name);
        rebuild(&tp2, &p, |n, d| {
            if n == "model_config.yaml" {
                let mut y = String::from_utf8(d.to_vec()).unwrap();
                for (from, to) in edits {
                    assert!(y.contains(from), "{from}");
                    y = y.replace(from, to);
                }
                Some((format!("./{n}"), y.into_bytes()))
            } else {
                keep(n, d)
            }
        });
        p
    };
    let p = edit_yaml(
        "ffn.nemo",
        &[("ffn_hidden_size: 160", "ffn_hidden_size: 192")],
    );
    let (code, _, err) = convert(&p, &out, &[]);
    refused(code, &err, &out, "ffn.nemo:mp_rank_00/model_weights.ckpt: tensor `model.language_model.encoder.layers.0.mlp.dense_h_to_4h.weight`: shape [160, 64] contradicts the config (expected [192, 64] at TP 2)");
    let p = edit_yaml(
        "heads.nemo",
        &[
            ("num_attention_heads: 4", "num_attention_heads: 2"),
            ("kv_channels: null", "kv_channels: 16"),
        ],
    );
    let (code, _, err) = convert(&p, &out, &[]);
    refused(code, &err, &out, "contradicts the config");
    let p = edit_yaml(
        "heads3.nemo",
        &[
            ("num_attention_heads: 4", "num_attention_heads: 3"),
            ("kv_channels: null", "kv_channels: 16"),
        ],
    );
    let (code, _, err) = convert(&p, &out, &[]);
    refused(
        code,
        &err,
        &out,
        "query groups (3) is not divisible by TP 2",
    );
    // A tokenizer with more pieces than embedding rows.
    let p = dir.path().join("tok.nemo");
    let pieces: Vec<_> = (0..500)
        .map(|i| steerlm_convert::nemo::tokenizer::Piece {
            piece: format!("p{i}"),
            score: 0.0,
            kind: steerlm_convert::nemo::tokenizer::PieceType::Normal,
        })
        .collect();
    let big = steerlm_convert::nemo::tokenizer::write_bpe_model(&pieces, false);
    rebuild(&tp2, &p, |n, d| {
        if n.ends_with("_tokenizer.model") {
            Some((format!("./{n}"), big.clone()))
        } else {
            keep(n, d)
        }
    });
    let (code, _, err) = convert(&p, &out, &[]);
    refused(
        code,
        &err,
        &out,
        "the tokenizer has 500 pieces but the embedding has only 416 rows",
    );
    // An output whose folder does not exist.
    let nowhere = dir.path().join("no/such/dir/out");
    let (code, _, err) = convert(&tp2, &nowhere, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("the output's folder does not exist"), "{err}");
}

#[test]
fn a_full_disk_leaves_nothing_behind() {
    // A file-size limit of 200 KiB makes the ~1 MB fp32 output fail mid-write (EFBIG),
    // as a full disk would (ENOSPC): the same error path.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let bin = assert_cmd::cargo::cargo_bin("steerlm-convert");
    let input = fixtures().join("archives/legacy_tp2_bf16.nemo");
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -f 200; exec '{}' nemo-to-safetensors '{}' '{}' --dtype fp32 -q",
            bin.display(),
            input.display(),
            out.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    refused(
        o.status.code().unwrap_or(-1),
        &err,
        &out,
        "model.safetensors",
    );
}

#[test]
fn large_ranges_copied_by_the_kernel_are_exact() {
    // Tensors of several MiB take the copy_file_range path (the fixtures are too small
    // for it); check them against the TP=1 archive's own bytes, merged here by hand.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.nemo");
    let spec = steerlm_convert::synth::SynthSpec {
        layers: 2,
        hidden: 512,
        heads: 8,
        groups: 8,
        ffn: 1024,
        vocab: 2000,
        tp: 1,
        pp: 1,
        dtype: DType::F32,
        make_vocab_size_divisible_by: 8,
    };
    steerlm_convert::synth::write(&spec, &src, |_| {}).unwrap();
    let out = dir.path().join("hf");
    let (code, _, err) = convert(&src, &out, &[]);
    assert_eq!(code, 0, "{err}");
    let got = read_output(&out);
    let ck =
        steerlm_convert::nemo::checkpoint::Checkpoint::open(&src, &Default::default()).unwrap();
    let steerlm_convert::nemo::checkpoint::Weights::Ranks(ranks) = &ck.weights else {
        panic!()
    };
    let t = |name: &str| -> Vec<u8> {
        let (_, t) = ranks[0]
            .state
            .tensors()
            .find(|(n, _)| n.ends_with(name))
            .unwrap();
        ck.archive.slice(t.offset, t.nbytes()).to_vec()
    };
    let (h, f, hd) = (512usize, 1024usize, 64usize);
    let row = h * 4;
    assert_eq!(
        got["model.embed_tokens.weight"].2,
        t("embedding.word_embeddings.weight")[..2000 * row]
    );
    assert_eq!(
        got["lm_head.weight"].2,
        t("output_layer.weight")[..2000 * row]
    );
    for l in 0..2 {
        let p = format!("layers.{l}.");
        let fc1 = t(&format!("{p}mlp.dense_h_to_4h.weight"));
        assert_eq!(
            got[&format!("model.layers.{l}.mlp.gate_proj.weight")].2,
            fc1[..f * row]
        );
        assert_eq!(
            got[&format!("model.layers.{l}.mlp.up_proj.weight")].2,
            fc1[f * row..]
        );
        assert_eq!(
            got[&format!("model.layers.{l}.mlp.down_proj.weight")].2,
            t(&format!("{p}mlp.dense_4h_to_h.weight"))
        );
        assert_eq!(
            got[&format!("model.layers.{l}.self_attn.o_proj.weight")].2,
            t(&format!("{p}self_attention.dense.weight"))
        );
        let qkv = t(&format!("{p}self_attention.query_key_value.weight"));
        let head = |i: usize, j: usize| &qkv[(3 * i + j) * hd * row..(3 * i + j + 1) * hd * row];
        let cat = |j: usize| {
            (0..8)
                .flat_map(|i| head(i, j).to_vec())
                .collect::<Vec<u8>>()
        };
        assert_eq!(
            got[&format!("model.layers.{l}.self_attn.q_proj.weight")].2,
            cat(0)
        );
        assert_eq!(
            got[&format!("model.layers.{l}.self_attn.k_proj.weight")].2,
            cat(1)
        );
        assert_eq!(
            got[&format!("model.layers.{l}.self_attn.v_proj.weight")].2,
            cat(2)
        );
    }
}

#[test]
fn an_unknown_tensor_key_is_refused_by_name() {
    use steerlm_convert::torch::checkpoint::{StateDict, StateEntry};
    use steerlm_convert::torch::save::{SaveEntry, TorchFile};
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixtures().join("archives/legacy_tp2_bf16.nemo");
    let src = dir.path().join("lora.nemo");
    rebuild(&fixture, &src, |n, d| {
        if n != "mp_rank_01/model_weights.ckpt" {
            return keep(n, d);
        }
        // Rewrite rank 1 with our torch writer: the same tensors plus an adapter weight.
        let sd = StateDict::read(d, 0, n).unwrap();
        let mut entries = Vec::new();
        let mut data: Vec<Vec<u8>> = Vec::new();
        for (name, e) in &sd.entries {
            match e {
                StateEntry::Tensor(t) => {
                    entries.push((
                        name.clone(),
                        SaveEntry::Tensor {
                            dtype: t.dtype,
                            shape: t.shape.clone(),
                        },
                    ));
                    data.push(d[t.offset as usize..(t.offset + t.nbytes()) as usize].to_vec());
                }
                StateEntry::Other(_) => entries.push((name.clone(), SaveEntry::None)),
            }
        }
        let lora = "model.language_model.encoder.layers.0.self_attention.adapter_layer.lora_kqv_adapter.linear_in.weight";
        entries.push((
            lora.into(),
            SaveEntry::Tensor {
                dtype: DType::BF16,
                shape: vec![8, 64],
            },
        ));
        data.push(vec![0; 8 * 64 * 2]);
        let f = TorchFile::new("mp_rank_01_model_weights", &entries);
        let mut cur = std::io::Cursor::new(Vec::new());
        f.write(&mut cur, |i, o| o.write_all(&data[i])).unwrap();
        Some((format!("./{n}"), cur.into_inner()))
    });
    let (code, stdout, _) = run(&["inspect", src.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(stdout.contains("warning: unknown tensor key `model.language_model.encoder.layers.0.self_attention.adapter_layer"), "{stdout}");
    let out = dir.path().join("out");
    let (code, _, err) = convert(&src, &out, &[]);
    refused(code, &err, &out, "lora.nemo:mp_rank_01/model_weights.ckpt: tensor `model.language_model.encoder.layers.0.self_attention.adapter_layer.lora_kqv_adapter.linear_in.weight`: unknown tensor key");
}
