//! `nemo-to-safetensors` on every fixture: bit-identical to the ground-truth HF model,
//! sharded output, determinism, and refusals with nothing left behind.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use steerlm_convert::dtype::DType;

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
        Value::String(steerlm_convert::hf::config::torch_dtype_name(dtype).into());
    assert_eq!(got, want, "{what}: config.json");
    let hf_dir = fixtures().join("models").join(model).join("hf");
    if !hf_dir.join("tokenizer.model").exists() {
        // A tokenizers tokenizer: ours must encode every truth prompt as transformers'
        // own tokenizer.json does.
        let load = |d: &Path| tokenizers::Tokenizer::from_file(d.join("tokenizer.json")).unwrap();
        let (ours, theirs) = (load(dir), load(&hf_dir));
        for p in truth(model)["prompts"].as_array().unwrap() {
            let text = p["text"].as_str().unwrap();
            let ids = |t: &tokenizers::Tokenizer| t.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(
                ids(&ours),
                ids(&theirs),
                "{what}: tokenizer.json on {text:?}"
            );
            assert_eq!(ids(&ours), ids_of(&p["ids"]), "{what}: the truth ids");
        }
        return;
    }
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

/// A distributed checkpoint reads the same from an unpacked `.nemo` folder as from the tar
/// (zarr and torch_dist; the folder is unpacked with the `tar` crate).
#[test]
fn unpacked_dist_checkpoints_convert_like_their_archives() {
    let dir = tempfile::tempdir().unwrap();
    for (file, model) in [
        ("archives/gqa_torch_dist_tp2_bf16.nemo", "gqa"),
        ("archives/mha_torch_dist_tp1_fp32.nemo", "mha"),
        ("archives/gqa_dist_zarr_bf16.nemo", "gqa"),
        // NeMo 2.0: context/ + weights/, as a folder is what NeMo writes.
        ("archives/nemo2_gqa_tp2_bf16.nemo", "gqa"),
    ] {
        let name = file.replace('/', "_");
        let folder = dir.path().join(format!("{name}-folder"));
        let f = std::fs::File::open(fixtures().join(file)).unwrap();
        tar::Archive::new(f).unpack(&folder).unwrap();
        let (from_tar, from_dir) = (
            dir.path().join(format!("{name}-a")),
            dir.path().join(format!("{name}-b")),
        );
        for (input, out) in [
            (fixtures().join(file), &from_tar),
            (folder.clone(), &from_dir),
        ] {
            let (code, _, err) = convert(&input, out, &["--dtype", "fp32"]);
            assert_eq!(code, 0, "{}: {err}", input.display());
        }
        check_against_truth(&from_dir, model, DType::F32, &format!("{file} unpacked"));
        assert_eq!(read_output(&from_tar), read_output(&from_dir), "{file}");
    }
}

/// Tied embeddings and Llama 3.1 RoPE scaling reach config.json as transformers wrote
/// them for the source model, and no `lm_head` is written.
#[test]
fn tied_embeddings_and_llama3_scaling_are_carried_over() {
    let dir = tempfile::tempdir().unwrap();
    let want: Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("models/tied/hf/config.json")).unwrap(),
    )
    .unwrap();
    for file in [
        "archives/tied_llama3_mcore_tp2_bf16.nemo",
        "archives/tied_llama3_torch_dist_tp1_fp32.nemo",
    ] {
        let out = dir.path().join(file.replace('/', "_"));
        let (code, _, err) = convert(&fixtures().join(file), &out, &[]);
        assert_eq!(code, 0, "{file}: {err}");
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["tie_word_embeddings"], true, "{file}");
        assert_eq!(cfg["rope_scaling"], want["rope_scaling"], "{file}");
        assert!(
            !read_output(&out).contains_key("lm_head.weight"),
            "{file}: a tied model has no lm_head"
        );
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
    assert_eq!(names.len(), 7, "{names:?}");
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
    let src = overflowing_archive(dir.path());
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
        r["overflow"],
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
    let (code, json, err) = convert(&src, &out, &["--json"]);
    assert_eq!(code, 0, "{err}");
    // The kernel-side path ran: the embedding and output layer (2000 x 512 f32, 4 MB each)
    // and every MLP matrix (2 MiB and more) are ranges it copies.
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let copied = report["kernel_copied_bytes"].as_u64().unwrap();
    assert!(
        copied >= 2 * 2000 * 512 * 4,
        "kernel-copied bytes: {copied}"
    );
    let got = read_output(&out);
    let ck =
        steerlm_convert::nemo::checkpoint::Checkpoint::open(&src, &Default::default()).unwrap();
    let steerlm_convert::nemo::checkpoint::Storage::Ranks(ranks) = &ck.weights else {
        panic!()
    };
    let t = |name: &str| -> Vec<u8> {
        let (_, t) = ranks[0]
            .state
            .tensors()
            .find(|(n, _)| n.ends_with(name))
            .unwrap();
        ck.files.slice(t.offset, t.nbytes()).to_vec()
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
    use steerlm_convert::torch::save::{SaveEntry, TorchFile};
    use steerlm_convert::torch::state_dict::{StateDict, StateEntry};
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

/// Texts that tell tokenizers apart: leading, repeated and trailing spaces, newlines,
/// digits, unicode and the SteerLM `<extra_id_N>` pieces.
const TOKENIZER_TEXTS: [&str; 16] = [
    "  leading spaces",
    "repeated   spaces  and\ttabs",
    "trailing space ",
    " ",
    "line one\nline two\n\nafter a blank line\n",
    "\n starts with a newline",
    "digits 0123456789 and 3.14159",
    "héllo wörld — ✓ 日本語 😀",
    "<extra_id_0>System\nBe brief.\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n<extra_id_2>quality:9",
    "a<extra_id_1>b",
    " <extra_id_1> x",
    "<extra_id_1><extra_id_2>",
    "word<extra_id_2>quality:9,toxicity:0",
    "a ▁ b",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    "x<extra_id_1>",
];

/// Regression (tokenizer drift): the folder we write loads in `AutoTokenizer`, slow and
/// fast, and both give SentencePiece's ids, and ours, on every text.
#[test]
fn tokenizer_we_write_drifts_from_the_source() {
    let dir = tempfile::tempdir().unwrap();
    for fixture in ["nemo_legacy_tp2.nemo", "nemo_mcore_gqa.nemo"] {
        let out = dir.path().join(fixture);
        let (code, _, err) = convert(&fixtures().join("archives").join(fixture), &out, &[]);
        assert_eq!(code, 0, "{err}");
        assert!(out.join("tokenizer.json").exists());
        let Some(r) = transformers_ids(&out, &TOKENIZER_TEXTS) else {
            return;
        };
        assert_eq!(r["classes"]["slow"], "LlamaTokenizer");
        assert_eq!(r["classes"]["fast"], "LlamaTokenizerFast");
        let ours = steerlm_convert::runtime::tokenizer::Tokenizer::new(
            steerlm_convert::nemo::tokenizer::SpModel::parse(
                &std::fs::read(out.join("tokenizer.model")).unwrap(),
                "tokenizer.model",
            )
            .unwrap(),
        );
        for case in r["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let sp = ids_of(&case["sentencepiece"]);
            assert_eq!(ours.encode(text), sp, "{fixture}: ours on {text:?}");
            for which in ["slow", "fast"] {
                assert_eq!(ids_of(&case[which]), sp, "{fixture}: {which} on {text:?}");
            }
        }
    }
}

/// A conversion slow enough to be caught mid-write: the big archive widened to fp32.
fn slow_convert(src: &Path, out: &Path) -> Vec<String> {
    [
        "nemo-to-safetensors",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        "--dtype",
        "fp32",
        "-q",
    ]
    .map(String::from)
    .to_vec()
}

fn spawn(args: &[&str]) -> std::process::Child {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("steerlm-convert"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (at most 60 s) until `out`'s `.partial-<pid>` of `child` exists.
fn wait_for_partial(out: &Path, child: &std::process::Child) -> PathBuf {
    let partial = out.with_file_name(format!(
        "{}.partial-{}",
        out.file_name().unwrap().to_string_lossy(),
        child.id()
    ));
    let t = std::time::Instant::now();
    while !partial.exists() {
        assert!(t.elapsed().as_secs() < 60, "no partial output appeared");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    partial
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Regression (kill -9 leaves OUT.partial-<pid> behind for good): the next run removes
/// it, says so, and leaves nothing behind.
#[test]
fn sigkill_mid_write_then_rerun_leaves_no_partials() {
    let dir = tempfile::tempdir().unwrap();
    let src = big_archive(dir.path());
    let out = dir.path().join("out");
    let args = slow_convert(&src, &out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = spawn(&args);
    let partial = wait_for_partial(&out, &child);
    signal(&child, libc::SIGKILL);
    child.wait().unwrap();
    assert!(partial.exists(), "a killed run cannot clean up");
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("removed") && err.contains("no longer running"),
        "{err}"
    );
    assert!(!partial.exists());
    assert_no_leftovers(&out);
    assert!(out.join("model.safetensors").exists());
}

/// Regression (SIGTERM and SIGHUP leave OUT.partial-<pid>): every termination signal
/// cleans up as Ctrl-C does.
#[test]
fn sigterm_and_sighup_leave_no_partial_output() {
    let dir = tempfile::tempdir().unwrap();
    let src = big_archive(dir.path());
    for (sig, name) in [
        (libc::SIGTERM, "term"),
        (libc::SIGHUP, "hup"),
        (libc::SIGINT, "int"),
    ] {
        let out = dir.path().join(name);
        let args = slow_convert(&src, &out);
        let child = spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
        wait_for_partial(&out, &child);
        signal(&child, sig);
        let st = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&st.stderr);
        assert_eq!(st.status.code(), Some(130), "{name}: {err}");
        assert!(
            err.contains("interrupted; partial output removed"),
            "{name}: {err}"
        );
        assert!(!out.exists(), "{name}");
        assert_no_leftovers(&out);
    }
}

/// Regression (two runs to the same OUT at once): one output, and one clear line naming
/// the process that holds it.
#[test]
fn two_concurrent_runs_give_one_output_and_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = big_archive(dir.path());
    let out = dir.path().join("out");
    let args = slow_convert(&src, &out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = spawn(&args);
    wait_for_partial(&out, &first);
    let (code, _, err) = run(&args);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("is being written by process {}", first.id())),
        "{err}"
    );
    let st = first.wait_with_output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(out.join("model.safetensors").exists());
    assert_no_leftovers(&out);
}

/// Regression (`nemo-to-safetensors a.nemo a.nemo --force` deleted the source): an output
/// that is the input, lies inside it or holds it is refused, and the source is intact.
#[test]
fn out_equal_to_in_is_refused_with_the_source_intact() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.nemo");
    std::fs::copy(fixtures().join("archives/legacy_tp2_bf16.nemo"), &src).unwrap();
    let before = std::fs::read(&src).unwrap();
    let s = src.to_str().unwrap();
    let (code, _, err) = run(&["nemo-to-safetensors", s, s, "--force"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the output is the input"), "{err}");
    assert_eq!(std::fs::read(&src).unwrap(), before);
    // A folder input: the output inside it, and the folder holding it.
    let hf = dir.path().join("hf");
    assert_eq!(convert(&src, &hf, &[]).0, 0);
    let inside = hf.join("again");
    let (code, _, err) = convert(&hf, &inside, &["--force"]);
    assert!(code == 2 && err.contains("lies inside the input"), "{err}");
    let holder = dir.path().join("ranks");
    reshard_to_ranks("archives/legacy_tp2_bf16.nemo", &holder, 2);
    let (code, _, err) = run(&[
        "nemo-to-safetensors",
        holder.join(".").to_str().unwrap(),
        holder.to_str().unwrap(),
        "--force",
    ]);
    assert!(
        code == 2 && err.contains("the output is the input"),
        "{err}"
    );
    assert!(holder.join("model_config.yaml").exists());
    assert_no_leftovers(&src);
}

/// Regression (every I/O error repeated its cause): the cause is said once.
#[test]
fn io_errors_repeat_their_cause() {
    let (code, _, err) = run(&[
        "nemo-to-safetensors",
        "/nonexistent.nemo",
        "/tmp/never-written",
    ]);
    assert_eq!(code, 2);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
}

/// Regression (a tokenizer that does not fit the model was accepted): pieces that the
/// config's padding cannot turn into the embedding's rows are refused, and inspect warns.
#[test]
fn a_tokenizer_that_does_not_fit_the_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("misfit.nemo");
    // 400 pieces and 416 stored rows (padded to 16 x TP 2). With a padding unit of 100 the
    // config implies 400 rows at TP 1, 2 and 4, 800 at TP 8, and never 416.
    rebuild(
        &fixtures().join("archives/legacy_tp2_bf16.nemo"),
        &src,
        |n, d| {
            let d = if n == "model_config.yaml" {
                String::from_utf8_lossy(d)
                    .replace(
                        "make_vocab_size_divisible_by: 16",
                        "make_vocab_size_divisible_by: 100",
                    )
                    .into_bytes()
            } else {
                d.to_vec()
            };
            Some((format!("./{n}"), d))
        },
    );
    let out = dir.path().join("out");
    let (code, _, err) = convert(&src, &out, &[]);
    refused(code, &err, &out, "it is not this model's tokenizer");
    let (code, text, err) = run(&["inspect", src.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("warning: the tokenizer has 400 pieces"),
        "{text}"
    );
}
