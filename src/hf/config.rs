//! The Hugging Face `config.json` (written from and read into the typed architecture),
//! `generation_config.json` and the tokenizer's config files.

use serde_json::{json, Value};

use crate::arch::{Arch, RopeScaling};
use crate::dtype::DType;
use crate::nemo::hf_tokenizer::{HfTokenizer, TokenizerModel};
use crate::nemo::tokenizer::{PieceType, SpModel};

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
pub fn config_json(a: &Arch, tok: &TokenizerModel, dtype: DType) -> Value {
    let (bos, eos) = tok.bos_eos();
    let rope_scaling = match &a.rope_scaling {
        RopeScaling::Linear(f) => json!({"type": "linear", "factor": f}),
        RopeScaling::Llama3(s) => json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_positions as u64,
        }),
        RopeScaling::None | RopeScaling::Other(_) => Value::Null,
    };
    json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": a.bias,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "hidden_size": a.hidden,
        "initializer_range": a.init_std,
        "intermediate_size": a.ffn,
        "max_position_embeddings": a.max_positions,
        "mlp_bias": a.bias,
        "model_type": "llama",
        "num_attention_heads": a.heads,
        "num_hidden_layers": a.layers,
        "num_key_value_heads": a.groups,
        "pretraining_tp": 1,
        "rms_norm_eps": a.eps,
        "rope_scaling": rope_scaling,
        "rope_theta": a.rope_theta,
        "tie_word_embeddings": a.tied,
        "torch_dtype": torch_dtype_name(dtype),
        "use_cache": true,
        "vocab_size": tok.vocab_size(),
    })
}

/// `generation_config.json`.
pub fn generation_config_json(tok: &TokenizerModel) -> Value {
    let (bos, eos) = tok.bos_eos();
    json!({"_from_model_config": true, "bos_token_id": bos, "eos_token_id": eos})
}

/// `tokenizer_config.json` and `special_tokens_map.json` for a tokenizer kept as its
/// `tokenizer.json` (`PreTrainedTokenizerFast`; its added tokens are in that file).
pub fn fast_tokenizer_configs(t: &HfTokenizer, max_len: u64) -> (Value, Value) {
    let name = |v: &Option<(u32, String)>| v.as_ref().map(|(_, s)| s.clone());
    let cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(&t.bos),
        "eos_token": name(&t.eos),
        "clean_up_tokenization_spaces": false,
        "model_max_length": max_len,
    });
    let mut map = serde_json::Map::new();
    for (k, v) in [("bos_token", &t.bos), ("eos_token", &t.eos)] {
        if let Some((_, s)) = v {
            map.insert(k.into(), Value::String(s.clone()));
        }
    }
    (cfg, Value::Object(map))
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
