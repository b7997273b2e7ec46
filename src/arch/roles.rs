//! THE role table: every state-dict key maps, by its name alone, to what the tensor is
//! (its kind and layer) and to how it is split across tensor-parallel ranks (its role).
//! Merge and split rules are implemented once per role elsewhere.

use crate::arch::Activation;

/// How a tensor is distributed over tensor-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Identical on every rank (norms).
    Replicated,
    /// Rows split contiguously, vocabulary padded (embedding, output layer).
    VocabRows,
    /// Rows (output features) split contiguously.
    ColumnRows,
    /// Columns (input features) split contiguously.
    RowCols,
    /// Fused QKV; each rank owns whole query groups `[q heads…, k, v]`.
    QkvGrouped,
    /// Fused gate/up; each rank holds `[gate_r; up_r]`.
    GateUpFused,
    /// Not a weight (`inv_freq`, `_extra_state`): dropped on export.
    Skip,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Replicated => "replicated",
            Role::VocabRows => "vocab-rows",
            Role::ColumnRows => "column-rows",
            Role::RowCols => "row-cols",
            Role::QkvGrouped => "qkv-grouped",
            Role::GateUpFused => "gate-up-fused",
            Role::Skip => "skip",
        }
    }
}

/// What a tensor is in the Llama architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Embedding,
    InputNorm,
    Qkv,
    AttnOut,
    PostAttnNorm,
    /// gate and up fused (`fast-swiglu`).
    GateUp,
    /// gate alone (`swiglu` `dense_h_to_4h`).
    Gate,
    /// up alone (`swiglu` `dense_h_to_4h_2`).
    Up,
    Down,
    FinalNorm,
    Output,
    InvFreq,
    ExtraState,
}

/// The layer a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayer {
    /// Not a per-layer tensor.
    None,
    /// Stage-local index as written in the key.
    Index(u64),
    /// All layers stacked on a leading axis (distributed checkpoints).
    Stacked,
}

/// Which naming scheme a key uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// `model.language_model.…` (NeMo ≤ 1.20, `mcore_gpt: False`).
    Legacy,
    /// `model.decoder.…` (megatron-core).
    Mcore,
}

impl Schema {
    pub fn as_str(self) -> &'static str {
        match self {
            Schema::Legacy => "legacy",
            Schema::Mcore => "mcore",
        }
    }
}

/// A classified key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    pub schema: Schema,
    pub kind: Kind,
    pub layer: KeyLayer,
    pub role: Role,
}

/// Patterns for keys inside a layer: (schema, suffix after `layers.N.`, kind).
const LAYER_KEYS: &[(Schema, &str, Kind)] = &[
    (Schema::Legacy, "input_layernorm.weight", Kind::InputNorm),
    (
        Schema::Legacy,
        "self_attention.query_key_value.weight",
        Kind::Qkv,
    ),
    (Schema::Legacy, "self_attention.dense.weight", Kind::AttnOut),
    (
        Schema::Legacy,
        "post_attention_layernorm.weight",
        Kind::PostAttnNorm,
    ),
    (Schema::Legacy, "mlp.dense_h_to_4h.weight", Kind::GateUp),
    (Schema::Legacy, "mlp.dense_h_to_4h_2.weight", Kind::Up),
    (Schema::Legacy, "mlp.dense_4h_to_h.weight", Kind::Down),
    (
        Schema::Mcore,
        "self_attention.linear_qkv.layer_norm_weight",
        Kind::InputNorm,
    ),
    (Schema::Mcore, "input_layernorm.weight", Kind::InputNorm),
    (Schema::Mcore, "self_attention.linear_qkv.weight", Kind::Qkv),
    (
        Schema::Mcore,
        "self_attention.linear_proj.weight",
        Kind::AttnOut,
    ),
    (
        Schema::Mcore,
        "mlp.linear_fc1.layer_norm_weight",
        Kind::PostAttnNorm,
    ),
    (
        Schema::Mcore,
        "pre_mlp_layernorm.weight",
        Kind::PostAttnNorm,
    ),
    (Schema::Mcore, "mlp.linear_fc1.weight", Kind::GateUp),
    (Schema::Mcore, "mlp.linear_fc2.weight", Kind::Down),
];

/// Keys outside the layers: (schema, full key, kind).
const MODEL_KEYS: &[(Schema, &str, Kind)] = &[
    (
        Schema::Legacy,
        "model.language_model.embedding.word_embeddings.weight",
        Kind::Embedding,
    ),
    (
        Schema::Legacy,
        "model.language_model.rotary_pos_emb.inv_freq",
        Kind::InvFreq,
    ),
    (
        Schema::Legacy,
        "model.language_model.encoder.final_layernorm.weight",
        Kind::FinalNorm,
    ),
    (
        Schema::Legacy,
        "model.language_model.output_layer.weight",
        Kind::Output,
    ),
    (
        Schema::Mcore,
        "model.embedding.word_embeddings.weight",
        Kind::Embedding,
    ),
    (
        Schema::Mcore,
        "model.decoder.final_layernorm.weight",
        Kind::FinalNorm,
    ),
    (Schema::Mcore, "model.output_layer.weight", Kind::Output),
];

const LEGACY_LAYERS: &str = "model.language_model.encoder.layers.";
const MCORE_LAYERS: &str = "model.decoder.layers.";

/// The NeMo key of a weight kind in `schema`, from the table, with `{L}` for the
/// stage-local layer of per-layer kinds. `fused_norms` picks megatron-core's
/// TransformerEngine names for the norms (`linear_qkv.layer_norm_weight`) over the separate
/// ones (`input_layernorm.weight`); legacy `swiglu` gate is `dense_h_to_4h`.
pub fn key_template(schema: Schema, kind: Kind, fused_norms: bool) -> Option<String> {
    if let Some((_, key, _)) = MODEL_KEYS
        .iter()
        .find(|(s, _, k)| *s == schema && *k == kind)
    {
        return Some(key.to_string());
    }
    let stored = match (schema, kind) {
        (Schema::Legacy, Kind::Gate) => Kind::GateUp,
        _ => kind,
    };
    let mut found = LAYER_KEYS
        .iter()
        .filter(|(s, _, k)| *s == schema && *k == stored)
        .map(|(_, suffix, _)| *suffix);
    let first = found.next()?;
    let suffix = match found.next() {
        Some(second) if first.contains("layer_norm_weight") != fused_norms => second,
        _ => first,
    };
    let prefix = match schema {
        Schema::Legacy => LEGACY_LAYERS,
        Schema::Mcore => MCORE_LAYERS,
    };
    Some(format!("{prefix}{{L}}.{suffix}"))
}

/// Removes wrappers that do not change what a key means: a leading `model.module.`
/// (`megatron_amp_O2`) or `module.` (NeMo 2.0), and `._orig_mod` (`torch.compile`).
pub fn normalise_key(key: &str) -> String {
    let k = key.replace("._orig_mod", "");
    // `module.` is NeMo 2.0's prefix (Lightning's MegatronParallel wrapper).
    match k
        .strip_prefix("model.module.")
        .or(k.strip_prefix("module."))
    {
        Some(rest) => format!("model.{rest}"),
        None => k,
    }
}

/// Classifies a (normalised) key. `activation` decides what legacy `dense_h_to_4h` holds.
/// Returns `None` for keys that are not part of a Llama model.
pub fn classify(key: &str, activation: Activation) -> Option<Classified> {
    let key = normalise_key(key);
    let (schema, layer, rest) = if let Some(rest) = key.strip_prefix(LEGACY_LAYERS) {
        let (layer, rest) = split_layer(rest);
        (Schema::Legacy, layer, rest)
    } else if let Some(rest) = key.strip_prefix(MCORE_LAYERS) {
        let (layer, rest) = split_layer(rest);
        (Schema::Mcore, layer, rest)
    } else {
        if key.ends_with("._extra_state") {
            let schema = if key.starts_with("model.language_model.") {
                Schema::Legacy
            } else {
                Schema::Mcore
            };
            return Some(make(schema, Kind::ExtraState, KeyLayer::None, activation));
        }
        let &(schema, _, kind) = MODEL_KEYS.iter().find(|(_, k, _)| *k == key)?;
        return Some(make(schema, kind, KeyLayer::None, activation));
    };
    if rest.ends_with("._extra_state") || rest == "_extra_state" {
        return Some(make(schema, Kind::ExtraState, layer, activation));
    }
    let &(_, _, kind) = LAYER_KEYS
        .iter()
        .find(|(s, suffix, _)| *s == schema && *suffix == rest)?;
    Some(make(schema, kind, layer, activation))
}

fn split_layer(rest: &str) -> (KeyLayer, &str) {
    match rest.split_once('.') {
        Some((n, tail)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            match n.parse() {
                Ok(i) => (KeyLayer::Index(i), tail),
                Err(_) => (KeyLayer::Stacked, rest),
            }
        }
        _ => (KeyLayer::Stacked, rest),
    }
}

fn make(schema: Schema, kind: Kind, layer: KeyLayer, activation: Activation) -> Classified {
    let kind = match (schema, kind, activation) {
        (Schema::Legacy, Kind::GateUp, Activation::Swiglu) => Kind::Gate,
        _ => kind,
    };
    Classified {
        schema,
        kind,
        layer,
        role: role_of(kind),
    }
}

/// The split rule of each kind.
pub fn role_of(kind: Kind) -> Role {
    match kind {
        Kind::Embedding | Kind::Output => Role::VocabRows,
        Kind::InputNorm | Kind::PostAttnNorm | Kind::FinalNorm => Role::Replicated,
        Kind::Qkv => Role::QkvGrouped,
        Kind::AttnOut | Kind::Down => Role::RowCols,
        Kind::GateUp => Role::GateUpFused,
        Kind::Gate | Kind::Up => Role::ColumnRows,
        Kind::InvFreq | Kind::ExtraState => Role::Skip,
    }
}

/// The Hugging Face `LlamaForCausalLM` names a kind becomes (global layer `g`).
pub fn hf_names(kind: Kind, g: u64) -> Vec<String> {
    let l = |s: &str| format!("model.layers.{g}.{s}");
    match kind {
        Kind::Embedding => vec!["model.embed_tokens.weight".into()],
        Kind::InputNorm => vec![l("input_layernorm.weight")],
        Kind::Qkv => vec![
            l("self_attn.q_proj.weight"),
            l("self_attn.k_proj.weight"),
            l("self_attn.v_proj.weight"),
        ],
        Kind::AttnOut => vec![l("self_attn.o_proj.weight")],
        Kind::PostAttnNorm => vec![l("post_attention_layernorm.weight")],
        Kind::GateUp => vec![l("mlp.gate_proj.weight"), l("mlp.up_proj.weight")],
        Kind::Gate => vec![l("mlp.gate_proj.weight")],
        Kind::Up => vec![l("mlp.up_proj.weight")],
        Kind::Down => vec![l("mlp.down_proj.weight")],
        Kind::FinalNorm => vec!["model.norm.weight".into()],
        Kind::Output => vec!["lm_head.weight".into()],
        Kind::InvFreq | Kind::ExtraState => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_and_mcore_keys() {
        let c = classify(
            "model.language_model.encoder.layers.7.mlp.dense_h_to_4h.weight",
            Activation::FastSwiglu,
        )
        .unwrap();
        assert_eq!(
            (c.kind, c.layer, c.role),
            (Kind::GateUp, KeyLayer::Index(7), Role::GateUpFused)
        );
        let c = classify(
            "model.language_model.encoder.layers.7.mlp.dense_h_to_4h.weight",
            Activation::Swiglu,
        )
        .unwrap();
        assert_eq!((c.kind, c.role), (Kind::Gate, Role::ColumnRows));
        let c = classify(
            "model.module.decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
            Activation::FastSwiglu,
        )
        .unwrap();
        assert_eq!(
            (c.schema, c.kind, c.role),
            (Schema::Mcore, Kind::PostAttnNorm, Role::Replicated)
        );
        let c = classify(
            "model.decoder.layers.self_attention.linear_qkv.weight",
            Activation::FastSwiglu,
        )
        .unwrap();
        assert_eq!((c.kind, c.layer), (Kind::Qkv, KeyLayer::Stacked));
        let c = classify(
            "model.decoder.layers.3.self_attention.core_attention._extra_state",
            Activation::FastSwiglu,
        )
        .unwrap();
        assert_eq!(c.role, Role::Skip);
        assert!(classify(
            "model.language_model.encoder.layers.0.adapter_layer.lora.weight",
            Activation::FastSwiglu
        )
        .is_none());
        assert!(classify(
            "model.language_model.encoder.layers.0.self_attention.dense.bias",
            Activation::FastSwiglu
        )
        .is_none());
        assert_eq!(
            key_template(Schema::Mcore, Kind::InputNorm, true).unwrap(),
            "model.decoder.layers.{L}.self_attention.linear_qkv.layer_norm_weight"
        );
        assert_eq!(
            key_template(Schema::Mcore, Kind::PostAttnNorm, false).unwrap(),
            "model.decoder.layers.{L}.pre_mlp_layernorm.weight"
        );
        assert_eq!(
            key_template(Schema::Legacy, Kind::Gate, false).unwrap(),
            "model.language_model.encoder.layers.{L}.mlp.dense_h_to_4h.weight"
        );
        assert_eq!(
            key_template(Schema::Legacy, Kind::Output, false).unwrap(),
            "model.language_model.output_layer.weight"
        );
        assert_eq!(
            hf_names(Kind::Qkv, 3)[1],
            "model.layers.3.self_attn.k_proj.weight"
        );
    }
}
