//! `model_config.yaml` → a typed model configuration.
//!
//! OmegaConf interpolations (`${…}`) are kept as opaque strings and never evaluated: a key
//! whose value is one counts as absent, and the fallback rules below apply (with a warning).

use serde_norway::{Mapping, Value};

use crate::error::{Error, Result};

pub use crate::arch::Activation;

/// The model section of `model_config.yaml`, as far as conversion needs it.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub num_layers: u64,
    pub hidden_size: u64,
    pub ffn_hidden_size: u64,
    pub num_attention_heads: u64,
    pub num_query_groups: u64,
    pub head_dim: u64,
    pub activation: Activation,
    pub normalization: String,
    pub layernorm_epsilon: f64,
    pub position_embedding_type: String,
    pub rotary_percentage: f64,
    pub rotary_base: f64,
    pub seq_len_interpolation_factor: Option<f64>,
    /// Llama 3.1 RoPE scaling, when the config asks for it.
    pub rope_llama3: Option<crate::arch::Llama3Scaling>,
    pub bias: bool,
    pub share_embeddings_and_output_weights: bool,
    pub make_vocab_size_divisible_by: u64,
    pub tensor_model_parallel_size: u64,
    pub pipeline_model_parallel_size: u64,
    pub max_position_embeddings: u64,
    pub init_method_std: f64,
    pub precision: Option<String>,
    pub megatron_amp_o2: bool,
    pub mcore_gpt: bool,
    pub transformer_engine: bool,
    pub megatron_legacy: bool,
    pub tokenizer: TokenizerConfig,
    /// Things worth telling the user (interpolations not evaluated, defaults assumed).
    pub warnings: Vec<String>,
    /// The parsed YAML document, kept so that writers can re-emit it with few changes.
    pub document: Value,
}

/// The `tokenizer:` section.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    pub library: Option<String>,
    /// `nemo:<hash>_tokenizer.model` or a path.
    pub model: Option<String>,
    pub kind: Option<String>,
    /// GPT-2 BPE files (`library: megatron`).
    pub vocab_file: Option<String>,
    pub merge_file: Option<String>,
    pub sentencepiece_legacy: bool,
}

struct Reader<'a> {
    map: &'a Mapping,
    file: &'a str,
    warnings: Vec<String>,
}

impl Reader<'_> {
    fn err(&self, msg: String) -> Error {
        Error::Config {
            file: self.file.to_string(),
            msg,
        }
    }

    /// The value of `key`, or `None` when absent, null or an interpolation.
    fn raw(&mut self, key: &str) -> Option<&Value> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.contains("${") => {
                self.warnings.push(format!(
                    "`{key}: {s}` is an OmegaConf interpolation; not evaluated"
                ));
                None
            }
            Some(v) => Some(v),
        }
    }

    fn uint(&mut self, key: &str) -> Result<Option<u64>> {
        match self.raw(key).cloned() {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
                self.err(format!("`{key}` must be a non-negative integer, found {n}"))
            }),
            Some(v) => Err(self.err(format!("`{key}` must be an integer, found {}", show(&v)))),
        }
    }

    fn required_uint(&mut self, key: &str) -> Result<u64> {
        match self.uint(key)? {
            Some(0) => Err(self.err(format!("`{key}` must be positive"))),
            Some(v) => Ok(v),
            None => Err(self.err(format!("missing required key `{key}`"))),
        }
    }

    fn float(&mut self, key: &str) -> Result<Option<f64>> {
        match self.raw(key).cloned() {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(Value::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| self.err(format!("`{key}` must be a number, found `{s}`"))),
            Some(v) => Err(self.err(format!("`{key}` must be a number, found {}", show(&v)))),
        }
    }

    fn boolean(&mut self, key: &str) -> Result<Option<bool>> {
        match self.raw(key).cloned() {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(self.err(format!("`{key}` must be true or false, found {}", show(&v)))),
        }
    }

    fn string(&mut self, key: &str) -> Option<String> {
        match self.raw(key).cloned() {
            Some(Value::String(s)) => Some(s),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(Value::Bool(b)) => Some(b.to_string()),
            _ => None,
        }
    }
}

fn show(v: &Value) -> String {
    serde_norway::to_string(v)
        .map(|s| s.trim().replace('\n', " "))
        .unwrap_or_else(|_| "an unreadable value".into())
}

impl ModelConfig {
    /// The typed architecture this config describes.
    pub fn arch(&self) -> crate::arch::Arch {
        use crate::arch::{Arch, RopeScaling};
        Arch {
            hidden: self.hidden_size,
            layers: self.num_layers,
            heads: self.num_attention_heads,
            groups: self.num_query_groups,
            head_dim: self.head_dim,
            ffn: self.ffn_hidden_size,
            eps: self.layernorm_epsilon,
            rope_theta: self.rotary_base,
            rope_scaling: match (self.rope_llama3, self.seq_len_interpolation_factor) {
                (Some(s), _) => RopeScaling::Llama3(s),
                (None, Some(f)) if f != 1.0 => RopeScaling::Linear(f),
                _ => RopeScaling::None,
            },
            rotary_percentage: self.rotary_percentage,
            max_positions: self.max_position_embeddings,
            tied: self.share_embeddings_and_output_weights,
            bias: self.bias,
            init_std: self.init_method_std,
        }
    }

    /// Parses the YAML text of `model_config.yaml`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<ModelConfig> {
        let doc: Value = serde_norway::from_str(text).map_err(|e| Error::Config {
            file: file.to_string(),
            msg: format!("not valid YAML: {e}"),
        })?;
        let Value::Mapping(root) = &doc else {
            return Err(Error::Config {
                file: file.to_string(),
                msg: "the document is not a mapping of keys".into(),
            });
        };
        // Some hand-made files wrap the model keys in `model:`; NeMo unwraps it.
        let map = match root.get("model") {
            Some(Value::Mapping(m)) if !root.contains_key("hidden_size") => m,
            _ => root,
        };
        let mut r = Reader {
            map,
            file,
            warnings: Vec::new(),
        };
        let num_layers = r.required_uint("num_layers")?;
        let hidden_size = r.required_uint("hidden_size")?;
        let ffn_hidden_size = r.required_uint("ffn_hidden_size")?;
        let num_attention_heads = r.required_uint("num_attention_heads")?;
        let num_query_groups = r
            .uint("num_query_groups")?
            .filter(|&g| g > 0)
            .unwrap_or(num_attention_heads);
        if num_attention_heads % num_query_groups != 0 {
            return Err(r.err(format!(
                "num_attention_heads ({num_attention_heads}) is not a multiple of num_query_groups ({num_query_groups})"
            )));
        }
        let head_dim = match r.uint("kv_channels")? {
            Some(d) if d > 0 => d,
            _ => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(r.err(format!(
                        "hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and kv_channels is not set"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        let activation = activation(&mut r)?;
        let normalization = r
            .string("normalization")
            .unwrap_or_else(|| "layernorm".into());
        let position_embedding_type = r
            .string("position_embedding_type")
            .unwrap_or_else(|| "learned_absolute".into());
        let layernorm_epsilon = r.float("layernorm_epsilon")?.unwrap_or(1e-5);
        let rotary_percentage = r.float("rotary_percentage")?.unwrap_or(1.0);
        let rotary_base = r.float("rotary_base")?.unwrap_or(10000.0);
        let seq_len_interpolation_factor = r.float("seq_len_interpolation_factor")?;
        let rope_llama3 = rope_llama3(&mut r)?;
        let bias = r.boolean("bias")?.unwrap_or(true);
        let share = r
            .boolean("share_embeddings_and_output_weights")?
            .unwrap_or(true);
        let make_vocab_size_divisible_by = r
            .uint("make_vocab_size_divisible_by")?
            .unwrap_or(128)
            .max(1);
        let tp = r.uint("tensor_model_parallel_size")?.unwrap_or(1).max(1);
        let pp = r.uint("pipeline_model_parallel_size")?.unwrap_or(1).max(1);
        if r.uint("virtual_pipeline_model_parallel_size")?
            .is_some_and(|v| v > 1)
        {
            return Err(r.err("virtual (interleaved) pipeline parallelism is not supported".into()));
        }
        let max_position_embeddings = max_positions(&mut r)?;
        let init_method_std = r.float("init_method_std")?.unwrap_or(0.02);
        let precision = r.string("precision");
        let megatron_amp_o2 = r.boolean("megatron_amp_O2")?.unwrap_or(false);
        let mcore_gpt = r.boolean("mcore_gpt")?.unwrap_or(false);
        let transformer_engine = r.boolean("transformer_engine")?.unwrap_or(false);
        let megatron_legacy = r.boolean("megatron_legacy")?.unwrap_or(false);
        let tokenizer = tokenizer_section(map, file, &mut r.warnings)?;
        if megatron_legacy {
            return Err(r.err(
                "megatron_legacy: true (old Megatron-LM QKV order) is not a Llama layout".into(),
            ));
        }
        if normalization != "rmsnorm" {
            return Err(r.err(format!(
                "normalization `{normalization}` is not Llama's rmsnorm"
            )));
        }
        if position_embedding_type != "rope" {
            return Err(r.err(format!(
                "position_embedding_type `{position_embedding_type}` is not rope"
            )));
        }
        let warnings = r.warnings;
        Ok(ModelConfig {
            num_layers,
            hidden_size,
            ffn_hidden_size,
            num_attention_heads,
            num_query_groups,
            head_dim,
            activation,
            normalization,
            layernorm_epsilon,
            position_embedding_type,
            rotary_percentage,
            rotary_base,
            seq_len_interpolation_factor,
            rope_llama3,
            bias,
            share_embeddings_and_output_weights: share,
            make_vocab_size_divisible_by,
            tensor_model_parallel_size: tp,
            pipeline_model_parallel_size: pp,
            max_position_embeddings,
            init_method_std,
            precision,
            megatron_amp_o2,
            mcore_gpt,
            transformer_engine,
            megatron_legacy,
            tokenizer,
            warnings,
            document: doc,
        })
    }

    /// The vocabulary padded as Megatron pads it for `tp` ranks.
    pub fn padded_vocab(&self, vocab: u64, tp: u64) -> u64 {
        let unit = self.make_vocab_size_divisible_by * tp.max(1);
        vocab.div_ceil(unit) * unit
    }

    /// Parameters of the model at TP = 1 with the real (unpadded) vocabulary.
    pub fn parameter_count(&self, vocab: u64) -> u64 {
        let h = self.hidden_size;
        let qkv = h * (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim;
        let o = self.num_attention_heads * self.head_dim * h;
        let mlp = 3 * h * self.ffn_hidden_size;
        let per_layer = qkv + o + mlp + 2 * h;
        let emb = vocab
            * h
            * if self.share_embeddings_and_output_weights {
                1
            } else {
                2
            };
        emb + self.num_layers * per_layer + h
    }
}

/// `activation`, which must be one of Llama's.
fn activation(r: &mut Reader) -> Result<Activation> {
    match r.string("activation").as_deref() {
        Some("fast-swiglu") => Ok(Activation::FastSwiglu),
        Some("swiglu") => Ok(Activation::Swiglu),
        Some(other) => Err(r.err(format!(
            "activation `{other}` is not a Llama activation (expected fast-swiglu or swiglu)"
        ))),
        None => Err(r.err("missing required key `activation`".into())),
    }
}

/// Llama 3.1 RoPE scaling, in either config style: NeMo 2.0's `scale_factor`,
/// `low_freq_factor`, `high_freq_factor`, `old_context_len` (Llama31Config), or NeMo 1.x's
/// `scale_positional_embedding: true`, which megatron-core applies with its fixed constants
/// (factor 8, or `rope_scaling_factor` where set; 1, 4, 8192).
fn rope_llama3(r: &mut Reader) -> Result<Option<crate::arch::Llama3Scaling>> {
    let d = crate::arch::Llama3Scaling::MCORE_DEFAULT;
    if let Some(factor) = r.float("scale_factor")? {
        return Ok(Some(crate::arch::Llama3Scaling {
            factor,
            low_freq_factor: r.float("low_freq_factor")?.unwrap_or(d.low_freq_factor),
            high_freq_factor: r.float("high_freq_factor")?.unwrap_or(d.high_freq_factor),
            original_max_positions: r
                .float("old_context_len")?
                .unwrap_or(d.original_max_positions),
        }));
    }
    if r.boolean("scale_positional_embedding")?.unwrap_or(false) {
        return Ok(Some(crate::arch::Llama3Scaling {
            factor: r.float("rope_scaling_factor")?.unwrap_or(d.factor),
            ..d
        }));
    }
    Ok(None)
}

/// `max_position_embeddings`, else `encoder_seq_length`.
fn max_positions(r: &mut Reader) -> Result<u64> {
    let encoder_seq_length = r.uint("encoder_seq_length")?;
    match (r.uint("max_position_embeddings")?, encoder_seq_length) {
        (Some(m), _) => Ok(m),
        (None, Some(e)) => Ok(e),
        (None, None) => {
            Err(r.err("neither max_position_embeddings nor encoder_seq_length is set".into()))
        }
    }
}

/// The `tokenizer:` section; its warnings are added to `warnings`.
fn tokenizer_section(
    map: &Mapping,
    file: &str,
    warnings: &mut Vec<String>,
) -> Result<TokenizerConfig> {
    let Some(Value::Mapping(t)) = map.get("tokenizer") else {
        return Ok(TokenizerConfig::default());
    };
    let mut tr = Reader {
        map: t,
        file,
        warnings: Vec::new(),
    };
    let cfg = TokenizerConfig {
        library: tr.string("library"),
        model: tr.string("model"),
        kind: tr.string("type"),
        vocab_file: tr.string("vocab_file"),
        merge_file: tr.string("merge_file"),
        sentencepiece_legacy: tr.boolean("sentencepiece_legacy")?.unwrap_or(false),
    };
    warnings.extend(tr.warnings.into_iter().map(|w| format!("tokenizer: {w}")));
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "num_layers: 40\nhidden_size: 5120\nffn_hidden_size: 13824\nnum_attention_heads: 40\nactivation: fast-swiglu\nnormalization: rmsnorm\nposition_embedding_type: rope\nbias: false\nshare_embeddings_and_output_weights: false\nencoder_seq_length: 4096\nmax_position_embeddings: ${.encoder_seq_length}\ntensor_model_parallel_size: 4\ntokenizer:\n  library: sentencepiece\n  model: nemo:abc_tokenizer.model\n";

    #[test]
    fn llama13b_and_interpolation() {
        let c = ModelConfig::parse(BASE, "t").unwrap();
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.num_query_groups, 40);
        assert_eq!(c.max_position_embeddings, 4096);
        assert_eq!(c.warnings.len(), 1);
        assert_eq!(c.padded_vocab(32000, 4), 32256);
        assert_eq!(c.padded_vocab(32000, 1), 32000);
        assert_eq!(c.padded_vocab(32000, 8), 32768);
        assert_eq!(
            c.tokenizer.model.as_deref(),
            Some("nemo:abc_tokenizer.model")
        );
        // Llama-2 13B has 13,015,864,320 parameters.
        assert_eq!(c.parameter_count(32000), 13_015_864_320);
    }

    #[test]
    fn llama3_rope_scaling_in_both_config_styles() {
        use crate::arch::{Llama3Scaling, RopeScaling};
        let c =
            ModelConfig::parse(&format!("{BASE}scale_positional_embedding: true\n"), "t").unwrap();
        assert_eq!(
            c.arch().rope_scaling,
            RopeScaling::Llama3(Llama3Scaling::MCORE_DEFAULT)
        );
        let nemo2 = format!(
            "{BASE}scale_factor: 32.0\nlow_freq_factor: 1.0\nhigh_freq_factor: 4.0\nold_context_len: 8192\n"
        );
        let c = ModelConfig::parse(&nemo2, "t").unwrap();
        assert_eq!(
            c.arch().rope_scaling,
            RopeScaling::Llama3(Llama3Scaling {
                factor: 32.0,
                ..Llama3Scaling::MCORE_DEFAULT
            })
        );
        let plain =
            ModelConfig::parse(&format!("{BASE}scale_positional_embedding: false\n"), "t").unwrap();
        assert_eq!(plain.arch().rope_scaling, RopeScaling::None);
        // The rule keeps short wavelengths, divides long ones, and blends between.
        let mut f = vec![1.0f32, 1e-3, 1e-6];
        Llama3Scaling::MCORE_DEFAULT.apply(&mut f);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[2], 1e-6 / 8.0);
        assert!(f[1] < 1e-3 && f[1] > 1e-3 / 8.0, "{}", f[1]);
    }

    #[test]
    fn model_wrapper_and_errors() {
        let wrapped = format!(
            "model:\n{}",
            BASE.lines().map(|l| format!("  {l}\n")).collect::<String>()
        );
        assert_eq!(ModelConfig::parse(&wrapped, "t").unwrap().num_layers, 40);
        let e = ModelConfig::parse("num_layers: x\n", "cfg.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cfg.yaml: `num_layers` must be an integer"),
            "{e}"
        );
        assert!(ModelConfig::parse("[1, 2]", "t").is_err());
        assert!(ModelConfig::parse(": : :", "t").is_err());
    }
}
