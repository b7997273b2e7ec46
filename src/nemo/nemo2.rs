//! NeMo 2.0 checkpoints: a folder (or its tar) with `context/model.yaml` (the model's
//! serialized config, read as data and never instantiated), the tokenizer in `context/`,
//! and `weights/` (a `torch_dist` distributed checkpoint whose keys start with `module.`).
//!
//! `model.yaml` is translated into `model_config.yaml`'s vocabulary, as NeMo's own
//! exporter does: the scalar fields of its `config` block, `activation_func` (silu with
//! `gated_linear_unit` is `fast-swiglu`), `add_bias_linear` → `bias`, `seq_length` →
//! `max_position_embeddings`, `rotary_percent` → `rotary_percentage`, `normalization:
//! RMSNorm` → `rmsnorm`, `params_dtype` → `precision`; and the `tokenizer` block
//! (`SentencePieceTokenizer.model_path`, `AutoTokenizer.pretrained_model_name`, relative to
//! `context/`). The result goes through the one config reader.

use serde_norway::{Mapping, Value};

use crate::error::{Error, Result};
use crate::nemo::config::ModelConfig;

/// The member that marks a NeMo 2.0 checkpoint.
pub const MODEL_YAML: &str = "context/model.yaml";
/// Where its weights are.
pub const WEIGHTS_DIR: &str = "weights";

const SP_TOKENIZER: &str =
    "nemo.collections.common.tokenizers.sentencepiece_tokenizer.SentencePieceTokenizer";
const AUTO_TOKENIZER: &str =
    "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer";

/// Reads `context/model.yaml` (`text`; `file` names it in errors).
pub fn parse(text: &str, file: &str) -> Result<ModelConfig> {
    let err = |msg: String| Error::Config {
        file: file.to_string(),
        msg,
    };
    let doc: Value =
        serde_norway::from_str(text).map_err(|e| err(format!("not valid YAML: {e}")))?;
    let Some(Value::Mapping(cfg)) = doc.get("config") else {
        return Err(err("no `config` block: not a NeMo 2.0 model.yaml".into()));
    };
    let target = |v: &Value| {
        v.get("_target_")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let class = target(&Value::Mapping(cfg.clone())).unwrap_or_default();
    // Defaults of the Llama config classes where a field is left out.
    let llama = class.contains(".llama.") || class.contains("Llama");
    let mut out = Mapping::new();
    for (k, v) in cfg {
        let Some(k) = k.as_str() else { continue };
        if k.starts_with('_')
            || !matches!(
                v,
                Value::Bool(_) | Value::Number(_) | Value::String(_) | Value::Null
            )
        {
            continue;
        }
        out.insert(k.into(), v.clone());
    }
    let get = |k: &str| cfg.get(k);
    let activation = match get("activation_func").and_then(target) {
        Some(f) => f,
        None if llama => "torch.nn.functional.silu".into(),
        None => return Err(err("config.activation_func is not set".into())),
    };
    let gated = get("gated_linear_unit")
        .and_then(Value::as_bool)
        .unwrap_or(llama);
    out.insert(
        "activation".into(),
        match (activation.rsplit('.').next(), gated) {
            (Some("silu"), true) => "fast-swiglu".into(),
            (name, _) => format!(
                "{}{}",
                name.unwrap_or("?"),
                if gated { " (gated)" } else { "" }
            )
            .into(),
        },
    );
    let norm = get("normalization")
        .and_then(Value::as_str)
        .unwrap_or(if llama { "RMSNorm" } else { "LayerNorm" });
    out.insert(
        "normalization".into(),
        match norm {
            "RMSNorm" => "rmsnorm".to_string(),
            other => other.to_lowercase(),
        }
        .into(),
    );
    let bias = get("add_bias_linear")
        .and_then(Value::as_bool)
        .unwrap_or(!llama);
    out.insert("bias".into(), bias.into());
    if !out.contains_key("share_embeddings_and_output_weights") {
        out.insert(
            "share_embeddings_and_output_weights".into(),
            (!llama).into(),
        );
    }
    if !out.contains_key("position_embedding_type") {
        out.insert("position_embedding_type".into(), "rope".into());
    }
    if let Some(s) = get("seq_length") {
        out.insert("max_position_embeddings".into(), s.clone());
    }
    if let Some(r) = get("rotary_percent") {
        out.insert("rotary_percentage".into(), r.clone());
    }
    if let Some(d) = get("params_dtype").and_then(target) {
        let p = match d.as_str() {
            "torch.bfloat16" => "bf16",
            "torch.float16" => "16",
            _ => "32",
        };
        out.insert("precision".into(), p.into());
    }
    out.insert("mcore_gpt".into(), true.into());
    if let Some(t) = doc.get("tokenizer") {
        out.insert("tokenizer".into(), Value::Mapping(tokenizer(t, &target)));
    }
    let text = serde_norway::to_string(&Value::Mapping(out))
        .map_err(|e| err(format!("cannot restate the config: {e}")))?;
    ModelConfig::parse(&text, file)
}

/// The tokenizer block in `model_config.yaml`'s words; paths are members of the archive.
fn tokenizer(t: &Value, target: &dyn Fn(&Value) -> Option<String>) -> Mapping {
    let mut m = Mapping::new();
    let path = |k: &str| {
        t.get(k)
            .and_then(Value::as_str)
            .map(|p| format!("context/{}", p.trim_start_matches("./")))
    };
    match target(t).as_deref() {
        Some(SP_TOKENIZER) => {
            m.insert("library".into(), "sentencepiece".into());
            if let Some(p) = path("model_path") {
                m.insert("model".into(), p.into());
            }
        }
        Some(AUTO_TOKENIZER) => {
            m.insert("library".into(), "huggingface".into());
            if let Some(p) = path("pretrained_model_name") {
                m.insert("type".into(), p.into());
            }
        }
        other => {
            m.insert("library".into(), other.unwrap_or("unknown").into());
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "_target_: nemo.collections.llm.gpt.model.llama.LlamaModel\nconfig:\n  _target_: nemo.collections.llm.gpt.model.llama.Llama31Config8B\n  activation_func:\n    _call_: false\n    _target_: torch.nn.functional.silu\n  add_bias_linear: false\n  gated_linear_unit: true\n  hidden_size: 4096\n  ffn_hidden_size: 14336\n  num_attention_heads: 32\n  num_query_groups: 8\n  num_layers: 32\n  normalization: RMSNorm\n  layernorm_epsilon: 1.0e-05\n  rotary_base: 500000\n  rotary_percent: 1.0\n  seq_length: 8192\n  scale_factor: 8.0\n  low_freq_factor: 1.0\n  high_freq_factor: 4.0\n  old_context_len: 8192\n  share_embeddings_and_output_weights: false\n  make_vocab_size_divisible_by: 128\n  params_dtype:\n    _call_: false\n    _target_: torch.bfloat16\ntokenizer:\n  _target_: nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer\n  pretrained_model_name: nemo_tokenizer\n";

    #[test]
    fn llama31_model_yaml() {
        let c = parse(YAML, "model.yaml").unwrap();
        assert_eq!(c.num_layers, 32);
        assert_eq!(c.num_query_groups, 8);
        assert_eq!(c.max_position_embeddings, 8192);
        assert_eq!(c.activation.as_str(), "fast-swiglu");
        assert!(!c.bias && !c.share_embeddings_and_output_weights && c.mcore_gpt);
        assert_eq!(c.rope_llama3.unwrap().factor, 8.0);
        assert_eq!(c.tokenizer.library.as_deref(), Some("huggingface"));
        assert_eq!(c.tokenizer.kind.as_deref(), Some("context/nemo_tokenizer"));
        assert_eq!(c.precision.as_deref(), Some("bf16"));
    }

    #[test]
    fn not_llama_is_refused() {
        let gelu = YAML.replace("torch.nn.functional.silu", "torch.nn.functional.gelu");
        let e = parse(&gelu, "model.yaml").unwrap_err().to_string();
        assert!(e.contains("activation `gelu (gated)`"), "{e}");
        let e = parse("config: 3\n", "model.yaml").unwrap_err().to_string();
        assert!(e.contains("no `config` block"), "{e}");
    }
}
