//! An opened `.nemo`: config, tokenizer, rank grid and every rank's state dict, located
//! in the mapped archive. Opening reads headers and pickles only, never tensor data.

use std::path::Path;

use crate::arch::roles::{self, Classified, Schema};
use crate::container::dist::DistCheckpoint;
use crate::container::mapped::{Mapped, OpenOptions};
use crate::error::{Error, Result};
use crate::nemo::config::ModelConfig;
use crate::nemo::hf_tokenizer::{HfTokenizer, TokenizerModel};
use crate::nemo::layout::{self, LayoutKind, RankGrid};
use crate::nemo::tokenizer::SpModel;
use crate::torch::state_dict::{StateDict, StateEntry};

/// One rank's state dict.
#[derive(Debug, Clone)]
pub struct Rank {
    pub tp: u64,
    pub pp: u64,
    pub state: StateDict,
}

/// The resolved tokenizer artifact.
#[derive(Debug, Clone)]
pub struct TokenizerArtifact {
    pub member: String,
    pub model: TokenizerModel,
}

/// Where the weights are.
#[derive(Debug, Clone)]
pub enum Storage {
    Ranks(Vec<Rank>),
    Distributed(DistCheckpoint),
}

/// An opened checkpoint.
pub struct Checkpoint {
    pub files: Mapped,
    pub config: ModelConfig,
    pub grid: RankGrid,
    pub weights: Storage,
    pub schema: Schema,
    pub tokenizer: std::result::Result<TokenizerArtifact, String>,
    pub warnings: Vec<String>,
    /// A NeMo 2.0 checkpoint (`context/model.yaml` + `weights/`), not a NeMo 1.x `.nemo`.
    pub nemo2: bool,
}

const CONFIG_MEMBER: &str = "model_config.yaml";

impl Checkpoint {
    /// Opens `path` and reads everything but tensor data.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Checkpoint> {
        let archive = Mapped::open(path, opts)?;
        let file = archive.display().to_string();
        let nemo2 = archive.member(CONFIG_MEMBER).is_none()
            && archive.member(crate::nemo::nemo2::MODEL_YAML).is_some();
        let name = if nemo2 {
            crate::nemo::nemo2::MODEL_YAML
        } else {
            CONFIG_MEMBER
        };
        let cfg_member = archive.member(name).ok_or_else(|| Error::Config {
            file: file.clone(),
            msg: "no model_config.yaml member (nor NeMo 2.0's context/model.yaml): not a NeMo model archive".into(),
        })?;
        let text = std::str::from_utf8(archive.data(cfg_member)).map_err(|_| Error::Config {
            file: format!("{file}:{name}"),
            msg: "not UTF-8 text".into(),
        })?;
        let config = if nemo2 {
            crate::nemo::nemo2::parse(text, &format!("{file}:{name}"))?
        } else {
            ModelConfig::parse(text, &format!("{file}:{name}"))?
        };
        let mut warnings = config.warnings.clone();
        let grid = if nemo2 {
            RankGrid {
                kind: LayoutKind::Distributed,
                tp: config.tensor_model_parallel_size,
                pp: config.pipeline_model_parallel_size,
                files: Default::default(),
            }
        } else {
            layout::detect(
                archive.file_names(),
                config.tensor_model_parallel_size,
                config.pipeline_model_parallel_size,
                &file,
            )?
        };
        if config.num_layers % grid.pp != 0 {
            return Err(Error::Layout {
                file,
                msg: format!(
                    "num_layers ({}) is not divisible by pipeline_model_parallel_size ({})",
                    config.num_layers, grid.pp
                ),
            });
        }
        let weights = if grid.kind == LayoutKind::Distributed {
            let dir = if nemo2 {
                crate::nemo::nemo2::WEIGHTS_DIR
            } else {
                "model_weights"
            };
            Storage::Distributed(crate::torch::distcp::read(&archive, dir)?)
        } else {
            let mut ranks = Vec::new();
            for (&(tp, pp), member) in &grid.files {
                let m = archive
                    .member(member)
                    .expect("grid built from member names");
                let state = if member.ends_with(".safetensors") {
                    crate::container::safetensors::read(archive.data(m), m.offset, member).map(
                        |ts| StateDict {
                            member: member.clone(),
                            zip_root: String::new(),
                            entries: ts
                                .into_iter()
                                .map(|(k, t)| (k, StateEntry::Tensor(t)))
                                .collect(),
                        },
                    )
                } else {
                    StateDict::read(archive.data(m), m.offset, member)
                }
                .map_err(|e| e.in_file(&file))?;
                ranks.push(Rank { tp, pp, state });
            }
            Storage::Ranks(ranks)
        };
        let schema = detect_schema(&weights, &config);
        if schema == Schema::Mcore && !config.mcore_gpt {
            warnings.push(
                "keys use megatron-core names but mcore_gpt is not true in the config".into(),
            );
        }
        let tokenizer = resolve_tokenizer(&archive, &config);
        if let Err(e) = &tokenizer {
            warnings.push(e.clone());
        }
        let mut ck = Checkpoint {
            files: archive,
            config,
            grid,
            weights,
            schema,
            tokenizer,
            warnings,
            nemo2,
        };
        if let Storage::Distributed(d) = &ck.weights {
            crate::nemo::logical::check_dist_shapes(&ck, d)?;
        }
        let unknown = ck.unknown_keys();
        for k in unknown {
            ck.warnings.push(format!("unknown tensor key `{k}`"));
        }
        Ok(ck)
    }

    /// The tokenizer, or the reason it could not be read.
    pub fn tokenizer(&self) -> Result<&TokenizerArtifact> {
        self.tokenizer.as_ref().map_err(|e| Error::Tokenizer {
            file: self.files.display().to_string(),
            msg: e.clone(),
        })
    }

    /// Classifies a key with this checkpoint's activation.
    pub fn classify(&self, key: &str) -> Option<Classified> {
        roles::classify(key, self.config.activation)
    }

    /// Keys (with the member they are in) that the role table does not know.
    pub fn unknown_keys(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.weights {
            Storage::Ranks(ranks) => {
                for r in ranks {
                    for (k, _) in &r.state.entries {
                        if self.classify(k).is_none() && !out.contains(k) {
                            out.push(k.clone());
                        }
                    }
                }
            }
            Storage::Distributed(d) => {
                for a in &d.arrays {
                    if self.classify(&a.key).is_none() {
                        out.push(a.key.clone());
                    }
                }
            }
        }
        out
    }

    /// Every stored weight tensor (not `inv_freq` or `_extra_state`): (dtype, bytes).
    fn weight_tensors(&self) -> Vec<(crate::dtype::DType, u64)> {
        let is_weight = |k: &str| self.classify(k).is_none_or(|c| c.role != roles::Role::Skip);
        match &self.weights {
            Storage::Ranks(ranks) => ranks
                .iter()
                .flat_map(|r| r.state.tensors())
                .filter(|(k, _)| is_weight(k))
                .map(|(_, t)| (t.dtype, t.nbytes()))
                .collect(),
            Storage::Distributed(d) => d
                .arrays
                .iter()
                .filter(|a| is_weight(&a.key))
                .map(|a| (a.dtype, a.nbytes()))
                .collect(),
        }
    }

    /// Number of stored weight tensors (all ranks).
    pub fn weight_count(&self) -> usize {
        self.weight_tensors().len()
    }

    /// Total bytes of all stored weights (padding and all ranks included).
    pub fn stored_bytes(&self) -> u64 {
        self.weight_tensors().iter().map(|&(_, b)| b).sum()
    }

    /// The distinct dtypes of the stored weights.
    pub fn stored_dtypes(&self) -> Vec<crate::dtype::DType> {
        let mut v: Vec<_> = self.weight_tensors().iter().map(|&(d, _)| d).collect();
        v.sort();
        v.dedup();
        v
    }

    /// The padded vocabulary as stored (rows of the embedding, summed over TP ranks).
    pub fn stored_vocab_rows(&self) -> Option<u64> {
        match &self.weights {
            Storage::Ranks(ranks) => {
                let rows: u64 = ranks
                    .iter()
                    .filter(|r| r.pp == 0)
                    .flat_map(|r| r.state.tensors())
                    .filter(|(k, _)| {
                        self.classify(k)
                            .is_some_and(|c| c.kind == roles::Kind::Embedding)
                    })
                    .map(|(_, t)| t.shape.first().copied().unwrap_or(0))
                    .sum();
                (rows > 0).then_some(rows)
            }
            Storage::Distributed(d) => d
                .arrays
                .iter()
                .find(|a| {
                    self.classify(&a.key)
                        .is_some_and(|c| c.kind == roles::Kind::Embedding)
                })
                .and_then(|a| a.shape.first().copied()),
        }
    }
}

fn detect_schema(weights: &Storage, config: &ModelConfig) -> Schema {
    let keys: Vec<&str> = match weights {
        Storage::Ranks(r) => r
            .iter()
            .flat_map(|r| r.state.entries.iter().map(|(k, _)| k.as_str()))
            .collect(),
        Storage::Distributed(d) => d.arrays.iter().map(|a| a.key.as_str()).collect(),
    };
    let mut legacy = 0;
    let mut mcore = 0;
    for k in keys {
        match roles::classify(k, config.activation).map(|c| c.schema) {
            Some(Schema::Legacy) => legacy += 1,
            Some(Schema::Mcore) => mcore += 1,
            None => {}
        }
    }
    if mcore > legacy || (mcore == legacy && config.mcore_gpt) {
        Schema::Mcore
    } else {
        Schema::Legacy
    }
}

/// Reads the tokenizer the config names: a SentencePiece artifact
/// (`nemo:<hash>_tokenizer.model`), GPT-2 BPE files (`library: megatron`, `vocab_file` and
/// `merge_file`), or a Hugging Face tokenizer folder in the checkpoint (`library:
/// huggingface`, NeMo 2.0's `context/nemo_tokenizer`).
fn resolve_tokenizer(
    archive: &Mapped,
    config: &ModelConfig,
) -> std::result::Result<TokenizerArtifact, String> {
    let t = &config.tokenizer;
    let read = |member: &str| archive.data(archive.member(member).expect("member exists"));
    match t.library.as_deref() {
        None | Some("sentencepiece") => {
            let wanted = t
                .model
                .as_deref()
                .ok_or("model_config.yaml names no tokenizer model (tokenizer.model)")?;
            let member = find_artifact(archive, wanted, Some(".model"))?;
            let model = SpModel::parse(read(&member), &member).map_err(|e| e.to_string())?;
            Ok(TokenizerArtifact {
                member,
                model: TokenizerModel::SentencePiece(model),
            })
        }
        Some("megatron") if t.kind.as_deref().is_some_and(|k| k.contains("GPT2")) => {
            let (Some(v), Some(m)) = (t.vocab_file.as_deref(), t.merge_file.as_deref()) else {
                return Err("a GPT-2 BPE tokenizer needs tokenizer.vocab_file and tokenizer.merge_file".into());
            };
            let (vocab, merges) = (find_artifact(archive, v, None)?, find_artifact(archive, m, None)?);
            let tok = HfTokenizer::from_gpt2_files(read(&vocab), read(&merges))
                .map_err(|e| format!("{vocab}, {merges}: {e}"))?;
            Ok(TokenizerArtifact {
                member: vocab,
                model: TokenizerModel::Hf(tok),
            })
        }
        Some("huggingface") => {
            let dir = t.kind.as_deref().unwrap_or("").trim_end_matches('/');
            let json = format!("{dir}/tokenizer.json");
            if archive.member(&json).is_none() {
                return Err(format!(
                    "the Hugging Face tokenizer `{dir}` has no tokenizer.json in the checkpoint (a hub name is not downloaded)"
                ));
            }
            let cfg = archive
                .member(&format!("{dir}/tokenizer_config.json"))
                .map(|m| archive.data(m));
            let tok = HfTokenizer::from_json(read(&json), cfg).map_err(|e| format!("{json}: {e}"))?;
            Ok(TokenizerArtifact {
                member: json,
                model: TokenizerModel::Hf(tok),
            })
        }
        Some(lib) => Err(format!(
            "tokenizer library `{lib}` (type {}) is not supported (sentencepiece, megatron GPT2BPETokenizer and huggingface are)",
            t.kind.as_deref().unwrap_or("none")
        )),
    }
}

/// The member an artifact reference names: a path in the checkpoint, `nemo:<name>` at the
/// root, or a training machine's path matched by its file name (or, for `fallback`, the
/// one root file with that suffix).
fn find_artifact(
    archive: &Mapped,
    wanted: &str,
    fallback: Option<&str>,
) -> std::result::Result<String, String> {
    let base = wanted.strip_prefix("nemo:").unwrap_or(wanted);
    let basename = base.rsplit('/').next().unwrap_or(base);
    if archive.member(base).is_some() {
        // A path inside the checkpoint (NeMo 2.0's `context/…`).
        return Ok(base.to_string());
    }
    if archive.member(basename).is_some() {
        return Ok(basename.to_string());
    }
    // Absolute paths of the training machine, or `/artifacts/…`: match by suffix at the root.
    let tail = basename
        .rsplit_once('_')
        .map(|(_, t)| t)
        .unwrap_or(basename);
    let mut candidates: Vec<&str> = archive
        .file_names()
        .filter(|n| !n.contains('/') && (n.ends_with(basename) || n.ends_with(&format!("_{tail}"))))
        .collect();
    if let (true, Some(suffix)) = (candidates.is_empty(), fallback) {
        candidates = archive
            .file_names()
            .filter(|n| !n.contains('/') && n.ends_with(suffix))
            .collect();
    }
    match candidates.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(format!(
            "tokenizer artifact `{wanted}` is not in the archive"
        )),
        _ => Err(format!(
            "tokenizer artifact `{wanted}` is ambiguous: {}",
            candidates.join(", ")
        )),
    }
}
