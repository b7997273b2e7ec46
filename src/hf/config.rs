//! The Hugging Face `LlamaForCausalLM` folder: which logical rows become which HF tensor,
//! `config.json`, `generation_config.json` and the tokenizer files.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::arch::roles::Kind;
use crate::arch::tp::Logical;
use crate::nemo::config::ModelConfig;
use crate::nemo::tokenizer::{PieceType, SpModel};
use crate::dtype::DType;

/// One HF tensor: rows `rows` (ranges, in order) of a logical tensor.
#[derive(Debug, Clone)]
pub struct HfTensor {
    pub name: String,
    pub key: (Kind, Option<u64>),
    pub rows: Vec<(u64, u64)>,
    pub shape: Vec<u64>,
}

/// The HF tensors in the order they are written.
pub fn plan(
    logicals: &BTreeMap<(Kind, Option<u64>), Logical<'_>>,
    cfg: &ModelConfig,
    vocab: u64,
) -> Vec<HfTensor> {
    let mut out = Vec::new();
    let mut add = |name: String, kind: Kind, layer: Option<u64>, rows: Vec<(u64, u64)>| {
        let l = &logicals[&(kind, layer)];
        let n: u64 = rows.iter().map(|r| r.1 - r.0).sum();
        let shape = if l.shape.len() == 1 {
            l.shape.clone()
        } else {
            vec![n, l.shape[1]]
        };
        out.push(HfTensor {
            name,
            key: (kind, layer),
            rows,
            shape,
        });
    };
    let all = |kind: Kind, layer: Option<u64>| vec![(0, logicals[&(kind, layer)].rows())];
    add(
        "model.embed_tokens.weight".into(),
        Kind::Embedding,
        None,
        vec![(0, vocab)],
    );
    let (hd, groups) = (cfg.head_dim, cfg.num_query_groups);
    let qpg = cfg.num_attention_heads / groups;
    let f = cfg.ffn_hidden_size;
    for g in 0..cfg.num_layers {
        let p = |s: &str| format!("model.layers.{g}.{s}");
        let l = Some(g);
        add(
            p("input_layernorm.weight"),
            Kind::InputNorm,
            l,
            all(Kind::InputNorm, l),
        );
        let group_rows = |first: u64, count: u64| -> Vec<(u64, u64)> {
            (0..groups)
                .map(|grp| {
                    let base = (grp * (qpg + 2) + first) * hd;
                    (base, base + count * hd)
                })
                .collect()
        };
        add(
            p("self_attn.q_proj.weight"),
            Kind::Qkv,
            l,
            group_rows(0, qpg),
        );
        add(
            p("self_attn.k_proj.weight"),
            Kind::Qkv,
            l,
            group_rows(qpg, 1),
        );
        add(
            p("self_attn.v_proj.weight"),
            Kind::Qkv,
            l,
            group_rows(qpg + 1, 1),
        );
        add(
            p("self_attn.o_proj.weight"),
            Kind::AttnOut,
            l,
            all(Kind::AttnOut, l),
        );
        add(
            p("post_attention_layernorm.weight"),
            Kind::PostAttnNorm,
            l,
            all(Kind::PostAttnNorm, l),
        );
        if logicals.contains_key(&(Kind::GateUp, l)) {
            add(p("mlp.gate_proj.weight"), Kind::GateUp, l, vec![(0, f)]);
            add(p("mlp.up_proj.weight"), Kind::GateUp, l, vec![(f, 2 * f)]);
        } else {
            add(p("mlp.gate_proj.weight"), Kind::Gate, l, all(Kind::Gate, l));
            add(p("mlp.up_proj.weight"), Kind::Up, l, all(Kind::Up, l));
        }
        add(p("mlp.down_proj.weight"), Kind::Down, l, all(Kind::Down, l));
    }
    add(
        "model.norm.weight".into(),
        Kind::FinalNorm,
        None,
        all(Kind::FinalNorm, None),
    );
    if logicals.contains_key(&(Kind::Output, None)) && !cfg.share_embeddings_and_output_weights {
        add(
            "lm_head.weight".into(),
            Kind::Output,
            None,
            vec![(0, vocab)],
        );
    }
    out
}

/// The torch dtype name `config.json` uses.
pub fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// `config.json` for `LlamaForCausalLM`.
pub fn config_json(cfg: &ModelConfig, sp: &SpModel, dtype: DType) -> Value {
    let rope_scaling = match cfg.seq_len_interpolation_factor {
        Some(f) if f != 1.0 => json!({"type": "linear", "factor": f}),
        _ => Value::Null,
    };
    json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": cfg.bias,
        "attention_dropout": 0.0,
        "bos_token_id": sp.bos_id,
        "eos_token_id": sp.eos_id,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.init_method_std,
        "intermediate_size": cfg.ffn_hidden_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "mlp_bias": cfg.bias,
        "model_type": "llama",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_query_groups,
        "pretraining_tp": 1,
        "rms_norm_eps": cfg.layernorm_epsilon,
        "rope_scaling": rope_scaling,
        "rope_theta": cfg.rotary_base,
        "tie_word_embeddings": cfg.share_embeddings_and_output_weights,
        "torch_dtype": torch_dtype_name(dtype),
        "use_cache": true,
        "vocab_size": sp.vocab_size(),
    })
}

/// `generation_config.json`.
pub fn generation_config_json(sp: &SpModel) -> Value {
    json!({"_from_model_config": true, "bos_token_id": sp.bos_id, "eos_token_id": sp.eos_id})
}

/// An added token. User-defined pieces are matched after normalization (as in
/// `tokenizer.json`; transformers re-adds these entries over that file's).
fn added_token(content: &str, special: bool) -> Value {
    json!({"content": content, "lstrip": false, "normalized": !special, "rstrip": false, "single_word": false, "special": special})
}

/// `tokenizer_config.json`, with control and user-defined pieces as added tokens. The slow
/// `LlamaTokenizer` gives SentencePiece's ids exactly with `legacy: false` (with `true` it
/// would add a `▁` after every added token). `add_prefix_space` is written only when it
/// is false: when set at all, `LlamaTokenizerFast` ignores `tokenizer.json` and converts
/// the slow tokenizer, which drifts (see `hf_tokenizer`).
pub fn tokenizer_config_json(sp: &SpModel, max_len: u64) -> Value {
    let mut decoder = serde_json::Map::new();
    for (i, p) in sp.pieces.iter().enumerate() {
        let special = matches!(p.kind, PieceType::Control | PieceType::Unknown);
        if special || p.kind == PieceType::UserDefined {
            decoder.insert(i.to_string(), added_token(&p.piece, special));
        }
    }
    let piece = |id: i64| {
        sp.piece(id)
            .map(|s| Value::String(s.into()))
            .unwrap_or(Value::Null)
    };
    let mut v = json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "added_tokens_decoder": decoder,
        "bos_token": piece(sp.bos_id),
        "clean_up_tokenization_spaces": false,
        "eos_token": piece(sp.eos_id),
        "legacy": false,
        "model_max_length": max_len,
        "pad_token": Value::Null,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": false,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": piece(sp.unk_id),
        "use_default_system_prompt": false,
    });
    if !sp.add_dummy_prefix {
        v["add_prefix_space"] = json!(false);
    }
    v
}

/// `special_tokens_map.json`.
pub fn special_tokens_map_json(sp: &SpModel) -> Value {
    let tok = |id: i64| {
        sp.piece(id)
            .map(|s| json!({"content": s, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false}))
            .unwrap_or(Value::Null)
    };
    json!({"bos_token": tok(sp.bos_id), "eos_token": tok(sp.eos_id), "unk_token": tok(sp.unk_id)})
}
