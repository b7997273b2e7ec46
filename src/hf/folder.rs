//! An opened Hugging Face folder: `config.json` read into the typed architecture, the
//! tokenizer, and every tensor of its safetensors files located in the mapping.

use std::path::Path;

use serde_json::Value;

use crate::arch::{Arch, RopeScaling};
use crate::container::mapped::{Mapped, OpenOptions};
use crate::dtype::TensorRef;
use crate::error::{Error, Result};
use crate::nemo::hf_tokenizer::{HfTokenizer, TokenizerModel};
use crate::nemo::tokenizer::SpModel;

/// A stored tensor and the file it is in.
#[derive(Debug, Clone)]
pub struct Stored {
    pub name: String,
    pub tensor: TensorRef,
    pub file: String,
}

/// An opened folder.
pub struct HfFolder {
    pub files: Mapped,
    pub config: Value,
    pub arch: Arch,
    /// `vocab_size` of `config.json`.
    pub vocab_size: u64,
    /// The SentencePiece model, or (file, why not).
    pub tokenizer: std::result::Result<TokenizerModel, (String, String)>,
    /// Every tensor of every safetensors file, in file order then offset.
    pub tensors: Vec<Stored>,
    /// The int8 scheme of its `quantization_config` (the group size, `None` per channel),
    /// when it is quantized.
    pub int8: Option<Option<usize>>,
}

/// The one test of "is this a Hugging Face folder": a folder with a `config.json`.
pub fn is_hf_folder(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file()
}

impl HfFolder {
    pub fn open(dir: &Path, opts: &OpenOptions) -> Result<HfFolder> {
        let files = Mapped::open(dir, opts)?;
        let file = files.display().to_string();
        let cfg_file = format!("{file}/config.json");
        let bytes = files
            .member("config.json")
            .map(|m| files.data(m))
            .unwrap_or_default();
        let config: Value = serde_json::from_slice(bytes).map_err(|e| Error::Config {
            file: cfg_file.clone(),
            msg: format!("not JSON: {e}"),
        })?;
        let (arch, vocab_size) = parse_config(&config).map_err(|msg| Error::Config {
            file: cfg_file.clone(),
            msg,
        })?;
        let int8 = match &config["quantization_config"] {
            Value::Null => None,
            q => Some(
                crate::quant::compressed::parse_config(q).map_err(|msg| Error::Config {
                    file: cfg_file.clone(),
                    msg,
                })?,
            ),
        };
        let tokenizer = read_tokenizer(&files, &file);
        let tensors = scan(&files)?;
        Ok(HfFolder {
            files,
            config,
            arch,
            vocab_size,
            tokenizer,
            tensors,
            int8,
        })
    }
}

/// Every tensor of the folder's top-level safetensors files; a name in two files is an
/// error.
fn scan(files: &Mapped) -> Result<Vec<Stored>> {
    let file = files.display().to_string();
    let mut names: Vec<String> = files
        .file_names()
        .filter(|n| n.ends_with(".safetensors") && !n.contains('/'))
        .map(str::to_string)
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(Error::Layout {
            file,
            msg: "no .safetensors files in the folder".into(),
        });
    }
    let mut all: Vec<Stored> = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for n in &names {
        let m = files.member(n).expect("listed");
        let sd = crate::container::safetensors::read(files.data(m), m.offset, n)
            .map_err(|e| e.in_file(&file))?;
        for (name, t) in sd {
            if seen.insert(name.clone(), n.clone()).is_some() {
                return Err(Error::Tensor {
                    member: format!("{file}/{n}"),
                    tensor: name,
                    msg: "appears in two files".into(),
                });
            }
            all.push(Stored {
                name,
                tensor: t,
                file: n.clone(),
            });
        }
    }
    // A stable order: the files' order, then offsets.
    all.sort_by_key(|s| s.tensor.offset);
    Ok(all)
}

/// `config.json` of a `LlamaForCausalLM` as the typed architecture and the vocabulary size.
pub fn parse_config(cfg: &Value) -> std::result::Result<(Arch, u64), String> {
    let num = |k: &str| -> std::result::Result<u64, String> {
        cfg[k]
            .as_u64()
            .ok_or_else(|| format!("`{k}` is missing or not an integer"))
    };
    let model_type = cfg["model_type"].as_str().unwrap_or("");
    if model_type != "llama" {
        return Err(format!("model_type `{model_type}` is not llama"));
    }
    let heads = num("num_attention_heads")?;
    let hidden = num("hidden_size")?;
    let rope_scaling = match &cfg["rope_scaling"] {
        Value::Null => RopeScaling::None,
        v => {
            let t = v["rope_type"].as_str().or(v["type"].as_str()).unwrap_or("");
            let field = |k: &str| {
                v[k].as_f64()
                    .ok_or_else(|| format!("rope_scaling ({t}) has no number `{k}`"))
            };
            match t {
                "linear" => RopeScaling::Linear(field("factor")?),
                "llama3" => RopeScaling::Llama3(crate::arch::Llama3Scaling {
                    factor: field("factor")?,
                    low_freq_factor: field("low_freq_factor")?,
                    high_freq_factor: field("high_freq_factor")?,
                    original_max_positions: field("original_max_position_embeddings")?,
                }),
                other => RopeScaling::Other(other.to_string()),
            }
        }
    };
    let arch = Arch {
        hidden,
        layers: num("num_hidden_layers")?,
        heads,
        groups: cfg["num_key_value_heads"].as_u64().unwrap_or(heads),
        head_dim: cfg["head_dim"].as_u64().unwrap_or(hidden / heads.max(1)),
        ffn: num("intermediate_size")?,
        eps: cfg["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        rope_theta: cfg["rope_theta"].as_f64().unwrap_or(10000.0),
        rope_scaling,
        rotary_percentage: 1.0,
        max_positions: num("max_position_embeddings")?,
        tied: cfg["tie_word_embeddings"].as_bool() == Some(true),
        bias: cfg["attention_bias"].as_bool() == Some(true)
            || cfg["mlp_bias"].as_bool() == Some(true),
        init_std: cfg["initializer_range"].as_f64().unwrap_or(0.02),
    };
    Ok((arch, num("vocab_size")?))
}

/// The folder's tokenizer: `tokenizer.model` (SentencePiece, read by our reader), else
/// `tokenizer.json` (with `tokenizer_config.json` naming BOS and EOS); or why there is none
/// (`(file, message)`).
fn read_tokenizer(
    files: &crate::container::mapped::Mapped,
    file: &str,
) -> std::result::Result<TokenizerModel, (String, String)> {
    if let Some(m) = files.member("tokenizer.model") {
        return SpModel::parse(files.data(m), &format!("{file}/tokenizer.model"))
            .map(TokenizerModel::SentencePiece)
            .map_err(|e| match e {
                Error::Tokenizer { file, msg } => (file, msg),
                other => (file.to_string(), other.to_string()),
            });
    }
    let Some(j) = files.member("tokenizer.json") else {
        return Err((
            file.to_string(),
            "no tokenizer.model or tokenizer.json in the folder".to_string(),
        ));
    };
    let cfg = files.member("tokenizer_config.json").map(|m| files.data(m));
    HfTokenizer::from_json(files.data(j), cfg)
        .map(TokenizerModel::Hf)
        .map_err(|msg| (format!("{file}/tokenizer.json"), msg))
}
