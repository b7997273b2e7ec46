//! The reader on archives written by real PyTorch: every fixture opens as its manifest
//! says, and the tensors it locates hold the ground-truth bytes.

mod common;

use common::*;
use steerlm_convert::arch::roles::{KeyLayer, Kind};
use steerlm_convert::container::mapped::OpenOptions;
use steerlm_convert::dtype::TensorRef;
use steerlm_convert::nemo::checkpoint::{Checkpoint, Storage};
use steerlm_convert::nemo::layout::LayoutKind;

fn open(file: &str) -> Checkpoint {
    Checkpoint::open(&fixtures().join(file), &OpenOptions::default())
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn bytes<'a>(ck: &'a Checkpoint, t: &TensorRef) -> &'a [u8] {
    assert!(t.is_contiguous());
    ck.files.slice(t.offset, t.nbytes())
}

#[test]
fn every_fixture_opens_as_its_manifest_says() {
    for a in archives() {
        let file = a["file"].as_str().unwrap();
        let ck = open(file);
        assert_eq!(ck.grid.tp, a["tp"].as_u64().unwrap(), "{file}");
        assert_eq!(ck.grid.pp, a["pp"].as_u64().unwrap(), "{file}");
        let schema = a["schema"].as_str().unwrap();
        let want_schema = if schema == "legacy" {
            "legacy"
        } else {
            "mcore"
        };
        assert_eq!(ck.schema.as_str(), want_schema, "{file}");
        assert_eq!(
            ck.grid.kind == LayoutKind::Distributed,
            schema.starts_with("dist-"),
            "{file}"
        );
        if let Storage::Distributed(d) = &ck.weights {
            let want = if schema == "dist-zarr" {
                "zarr"
            } else {
                "torch_dist"
            };
            assert_eq!(d.backend, want, "{file}");
        }
        assert_eq!(
            ck.stored_dtypes(),
            vec![dtype_of(a["dtype"].as_str().unwrap())],
            "{file}"
        );
        assert_eq!(
            ck.config.activation.as_str(),
            a["activation"].as_str().unwrap(),
            "{file}"
        );
        assert_eq!(ck.stored_vocab_rows(), a["padded_vocab"].as_u64(), "{file}");
        assert_eq!(
            ck.files.was_compressed(),
            a["gzip"].as_bool().unwrap(),
            "{file}"
        );
        let tok = ck.tokenizer().unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(tok.model.vocab_size(), 400, "{file}");
        assert_eq!(
            ck.config.padded_vocab(400, ck.grid.tp),
            a["padded_vocab"].as_u64().unwrap(),
            "{file}: padded vocab rule"
        );
        assert!(
            ck.unknown_keys().is_empty(),
            "{file}: {:?}",
            ck.unknown_keys()
        );
        // Embedding, 6 per-layer kinds, final norm, and the output layer unless tied.
        let kinds = if ck.config.share_embeddings_and_output_weights {
            8
        } else {
            9
        };
        assert!(ck.weight_count() >= kinds, "{file}");
        if let Storage::Ranks(ranks) = &ck.weights {
            for r in ranks {
                let root = r
                    .state
                    .member
                    .replace("/model_weights.ckpt", "_model_weights");
                let root = if root == "model_weights.ckpt" {
                    "model_weights".to_string()
                } else {
                    root
                };
                assert_eq!(
                    r.state.zip_root, root,
                    "{file}: zip root named after the saved file"
                );
                for (name, t) in r.state.tensors() {
                    assert_eq!(t.offset % 64, 0, "{file}: {name} is 64-byte aligned");
                }
            }
        }
    }
}

#[test]
fn the_extra_id_markers_are_pieces_only_in_the_extra_tokenizer() {
    let with = open("archives/legacy_tp2_bf16.nemo");
    let ids: Vec<usize> = with
        .tokenizer()
        .unwrap()
        .model
        .extra_id_pieces()
        .iter()
        .map(|p| p.1)
        .collect();
    assert_eq!(ids, vec![3, 4, 5]);
    let without = open("archives/gqa_mcore_tp2_bf16.nemo");
    assert!(without
        .tokenizer()
        .unwrap()
        .model
        .extra_id_pieces()
        .is_empty());
    let m = with.tokenizer().unwrap().model.sp().expect("SentencePiece");
    assert!(m.byte_fallback && m.add_dummy_prefix && m.model_type_name() == "bpe");
    assert_eq!((m.unk_id, m.bos_id, m.eos_id), (0, 1, 2));
}

/// HF name of a norm kind at global layer `g`.
fn hf_norm(kind: Kind, g: u64) -> String {
    match kind {
        Kind::InputNorm => format!("model.layers.{g}.input_layernorm.weight"),
        Kind::PostAttnNorm => format!("model.layers.{g}.post_attention_layernorm.weight"),
        Kind::FinalNorm => "model.norm.weight".into(),
        _ => unreachable!(),
    }
}

#[test]
fn replicated_tensors_hold_the_ground_truth_on_every_rank() {
    for a in archives() {
        let file = a["file"].as_str().unwrap();
        let ck = open(file);
        let hf = hf_tensors(a["model"].as_str().unwrap());
        let per_stage = ck.config.num_layers / ck.grid.pp;
        let mut checked = 0;
        match &ck.weights {
            Storage::Ranks(ranks) => {
                for r in ranks {
                    for (name, t) in r.state.tensors() {
                        let c = ck.classify(name).unwrap();
                        if !matches!(
                            c.kind,
                            Kind::InputNorm | Kind::PostAttnNorm | Kind::FinalNorm
                        ) {
                            continue;
                        }
                        let g = match c.layer {
                            KeyLayer::Index(l) => r.pp * per_stage + l,
                            _ => 0,
                        };
                        let want = cast(&hf[&hf_norm(c.kind, g)].1, t.dtype);
                        assert_eq!(
                            bytes(&ck, t),
                            want.as_slice(),
                            "{file} {}: {name}",
                            r.state.member
                        );
                        checked += 1;
                    }
                }
            }
            Storage::Distributed(d) => {
                for arr in &d.arrays {
                    let c = ck.classify(&arr.key).unwrap();
                    if !matches!(
                        c.kind,
                        Kind::InputNorm | Kind::PostAttnNorm | Kind::FinalNorm
                    ) {
                        continue;
                    }
                    for chunk in &arr.chunks {
                        let (idx, t) = (&chunk.offsets, &chunk.data);
                        let g = if c.layer == KeyLayer::Stacked {
                            idx[0]
                        } else {
                            0
                        };
                        let want = cast(&hf[&hf_norm(c.kind, g)].1, t.dtype);
                        assert_eq!(
                            bytes(&ck, t),
                            want.as_slice(),
                            "{file}: {} chunk {idx:?}",
                            arr.key
                        );
                        checked += 1;
                    }
                }
            }
        }
        // Two norms per layer and the final norm (last stage), on every TP rank.
        let expected = (2 * ck.config.num_layers + 1) * ck.grid.tp;
        let expected = if ck.grid.kind == LayoutKind::Distributed {
            2 * ck.config.num_layers + 1
        } else {
            expected
        };
        assert_eq!(checked, expected, "{file}");
    }
}

#[test]
fn tp1_tensors_are_the_hf_tensors_in_megatron_layout() {
    let ck = open("archives/legacy_tp1_fp32.nemo");
    let hf = hf_tensors("mha");
    let (heads, hd, h) = (4usize, 16usize, 64usize);
    let Storage::Ranks(ranks) = &ck.weights else {
        panic!()
    };
    let mut seen = 0;
    for (name, t) in ranks[0].state.tensors() {
        let c = ck.classify(name).unwrap();
        let g = match c.layer {
            KeyLayer::Index(l) => l,
            _ => 0,
        };
        let l = |s: &str| hf[&format!("model.layers.{g}.{s}")].1.clone();
        let want: Vec<f32> = match c.kind {
            Kind::Embedding => hf["model.embed_tokens.weight"].1.clone(),
            Kind::Output => hf["lm_head.weight"].1.clone(),
            Kind::AttnOut => l("self_attn.o_proj.weight"),
            Kind::Down => l("mlp.down_proj.weight"),
            Kind::GateUp => [l("mlp.gate_proj.weight"), l("mlp.up_proj.weight")].concat(),
            Kind::Qkv => {
                let (q, k, v) = (
                    l("self_attn.q_proj.weight"),
                    l("self_attn.k_proj.weight"),
                    l("self_attn.v_proj.weight"),
                );
                let mut out = Vec::new();
                for head in 0..heads {
                    for m in [&q, &k, &v] {
                        out.extend_from_slice(&m[head * hd * h..(head + 1) * hd * h]);
                    }
                }
                out
            }
            _ => continue,
        };
        assert_eq!(bytes(&ck, t), cast(&want, t.dtype).as_slice(), "{name}");
        seen += 1;
    }
    assert_eq!(seen, 2 + 4 * 4);
}

#[test]
fn vocab_rows_are_split_by_rank_and_padding_is_not_zero() {
    for file in [
        "archives/legacy_tp4_fp16.nemo",
        "archives/legacy_tp2_bf16.nemo",
        "archives/mcore_tp2_bf16.nemo",
    ] {
        let ck = open(file);
        let hf = hf_tensors("mha");
        let emb = &hf["model.embed_tokens.weight"].1;
        let Storage::Ranks(ranks) = &ck.weights else {
            panic!()
        };
        let mut padding_nonzero = false;
        for r in ranks {
            let (name, t) = r
                .state
                .tensors()
                .find(|(n, _)| ck.classify(n).is_some_and(|c| c.kind == Kind::Embedding))
                .unwrap();
            let rows = t.shape[0] as usize;
            let first = r.tp as usize * rows;
            let real = rows.min(400usize.saturating_sub(first));
            let b = bytes(&ck, t);
            let row_bytes = 64 * t.dtype.size();
            assert_eq!(
                &b[..real * row_bytes],
                cast(&emb[first * 64..(first + real) * 64], t.dtype).as_slice(),
                "{file} {name} rank {}",
                r.tp
            );
            padding_nonzero |= b[real * row_bytes..].iter().any(|&x| x != 0);
        }
        assert!(
            padding_nonzero,
            "{file}: padding rows are random, as in a model trained at TP>1"
        );
    }
}
