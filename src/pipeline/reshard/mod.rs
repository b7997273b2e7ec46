//! `reshard`: split the logical tensors again for another TP × PP grid, with the inverse
//! of every merge rule, and write per-rank safetensors folders or a `.nemo` NeMo loads.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde_norway::Value as Yaml;

use crate::arch::roles::Schema;
use crate::container::safetensors_write::{self, TensorSpec};
use crate::container::tar::MemberKind;
use crate::container::tar_write::TarWriter;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::output::{self, AtomicDir, AtomicFile};
use crate::io::progress::Progress;
use crate::io::sink::{FileSink, Plain};
use crate::model::View;
use crate::nemo::checkpoint::Checkpoint;
use crate::nemo::hf_tokenizer::TokenizerModel;
use crate::nemo::layout::rank_member;
use crate::pipeline::emit;
use crate::torch::save::{SaveEntry, TorchFile};

mod plan;

use plan::{plan_ranks, templates, OutEntry};

/// Output container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A folder: one `model.safetensors` per rank folder, NeMo key names.
    Safetensors,
    /// A `.nemo` archive as NeMo writes it.
    Nemo,
}

/// What to write.
#[derive(Debug, Clone)]
pub struct ReshardOptions {
    pub tp: u64,
    pub pp: u64,
    pub format: Format,
    pub dtype: Option<DType>,
    pub force: bool,
    /// Write values that overflow a narrowing cast as ±inf instead of refusing.
    pub allow_overflow: bool,
    pub progress: bool,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ReshardReport {
    pub ranks: Vec<String>,
    /// Weight tensors written: (rank file, name, shape, dtype). Rotary `inv_freq` and
    /// `_extra_state` entries are re-emitted for NeMo but are not weights, and not listed.
    pub tensors: Vec<(String, String, Vec<u64>, DType)>,
    pub bytes: u64,
    pub seconds: f64,
}

/// Checks that the model can be split `tp` × `pp` ways.
pub fn check_grid(ck: &Checkpoint, tp: u64, pp: u64) -> Result<()> {
    let d = ck.config.arch();
    let file = ck.files.display().to_string();
    if tp == 0 || pp == 0 {
        return Err(Error::Usage("--tp and --pp must be at least 1".into()));
    }
    d.check_tp(tp)
        .map_err(|m| Error::Usage(format!("{file}: cannot split for --tp {tp}: {m}")))?;
    if !d.layers.is_multiple_of(pp) {
        return Err(Error::Usage(format!(
            "{file}: cannot split for --pp {pp}: {} layers are not divisible by {pp}",
            d.layers
        )));
    }
    if d.tied && pp > 1 && ck.schema == crate::arch::roles::Schema::Legacy {
        return Err(Error::Usage(format!(
            "{file}: cannot split for --pp {pp}: a tied legacy-schema model needs NeMo's copy of the embedding on the last stage, which is not written (megatron-core keys are)"
        )));
    }
    Ok(())
}

/// The updated `model_config.yaml` text: the new grid, and `precision` when the weights
/// are cast (`32`, `16` or `bf16`, as NeMo writes it).
pub fn updated_yaml(ck: &Checkpoint, tp: u64, pp: u64, dtype: Option<DType>) -> Result<String> {
    let mut doc = ck.config.document.clone();
    let wrapped = matches!(&doc, Yaml::Mapping(m) if !m.contains_key("hidden_size") && matches!(m.get("model"), Some(Yaml::Mapping(_))));
    let map = match (&mut doc, wrapped) {
        (Yaml::Mapping(m), true) => match m.get_mut("model") {
            Some(Yaml::Mapping(inner)) => inner,
            _ => unreachable!("checked above"),
        },
        (Yaml::Mapping(m), false) => m,
        _ => {
            return Err(Error::Config {
                file: format!("{}:model_config.yaml", ck.files.display()),
                msg: "not a mapping".into(),
            })
        }
    };
    map.insert("tensor_model_parallel_size".into(), Yaml::Number(tp.into()));
    map.insert(
        "pipeline_model_parallel_size".into(),
        Yaml::Number(pp.into()),
    );
    // A NeMo 2.0 input's tokenizer lives in `context/`; the output carries it at the root
    // (a SentencePiece model) or in `nemo_tokenizer/` (Hugging Face files).
    if let (true, Ok(t)) = (ck.nemo2, ck.tokenizer()) {
        if let Some(Yaml::Mapping(tok)) = map.get_mut("tokenizer") {
            let base = t.member.rsplit('/').next().unwrap_or(&t.member);
            match t.model {
                TokenizerModel::SentencePiece(_) => {
                    tok.insert("model".into(), Yaml::String(format!("nemo:{base}")))
                }
                TokenizerModel::Hf(_) => tok.insert("type".into(), Yaml::String(HF_DIR.into())),
            };
        }
    }
    match dtype {
        Some(DType::F32) => map.insert("precision".into(), Yaml::Number(32.into())),
        Some(DType::F16) => map.insert("precision".into(), Yaml::Number(16.into())),
        Some(DType::BF16) => map.insert("precision".into(), Yaml::String("bf16".into())),
        _ => None,
    };
    serde_norway::to_string(&doc).map_err(|e| Error::Config {
        file: "model_config.yaml".into(),
        msg: format!("cannot write it: {e}"),
    })
}

/// Where a NeMo 2.0 input's Hugging Face tokenizer files go in the output.
const HF_DIR: &str = "nemo_tokenizer";

/// A NeMo 2.0 input's tokenizer files and their names in the output: the SentencePiece
/// model at the root, or every file of the Hugging Face tokenizer folder in [`HF_DIR`].
fn nemo2_tokenizer(ck: &Checkpoint) -> Vec<(String, &[u8])> {
    let Some(t) = ck.tokenizer().ok().filter(|_| ck.nemo2) else {
        return Vec::new();
    };
    let (dir, base) = t.member.rsplit_once('/').unwrap_or(("", &t.member));
    match t.model {
        TokenizerModel::SentencePiece(_) => ck
            .files
            .member(&t.member)
            .map(|m| (base.to_string(), ck.files.data(m)))
            .into_iter()
            .collect(),
        TokenizerModel::Hf(_) => ck
            .files
            .members()
            .iter()
            .filter(|m| m.kind == MemberKind::File)
            .filter_map(|m| {
                let f = m.name.strip_prefix(dir)?.strip_prefix('/')?;
                (!f.contains('/')).then(|| (format!("{HF_DIR}/{f}"), ck.files.data(m)))
            })
            .collect(),
    }
}

/// Reshards `ck` into `out`.
pub fn reshard(view: &View, out: &Path, opts: &ReshardOptions) -> Result<ReshardReport> {
    let start = Instant::now();
    let (ck, logicals) = view.nemo_parts("reshard")?;
    check_grid(ck, opts.tp, opts.pp)?;
    let vocab = view.vocab()?;
    let names = templates(ck);
    let yaml = updated_yaml(ck, opts.tp, opts.pp, opts.dtype)?;
    let out_dtype = |from: DType| opts.dtype.unwrap_or(from);
    let ranks = plan_ranks(ck, logicals, &names, opts, vocab);
    let total: u64 = ranks
        .iter()
        .flat_map(|(_, _, e)| e)
        .filter_map(|e| match e {
            OutEntry::Tensor { from, shape, .. } => {
                Some(shape.iter().product::<u64>() * out_dtype(*from).size() as u64)
            }
            OutEntry::None(_) => None,
        })
        .sum();
    let bar = Progress::bytes(total, "resharding", opts.progress);
    let artifacts: Vec<(String, &[u8])> = ck
        .files
        .members()
        .iter()
        .filter(|m| {
            m.kind == MemberKind::File
                && !m.name.contains('/')
                && m.name != "model_config.yaml"
                && !crate::nemo::layout::WEIGHT_FILES.contains(&m.name.as_str())
        })
        .map(|m| (m.name.clone(), ck.files.data(m)))
        .chain(nemo2_tokenizer(ck))
        .collect();
    let mut tensors = Vec::new();
    for (r, p, entries) in &ranks {
        let member = rank_member(*r, *p, opts.tp, opts.pp);
        let member = match opts.format {
            Format::Safetensors => member.replace("model_weights.ckpt", "model.safetensors"),
            Format::Nemo => member,
        };
        for e in entries {
            if let OutEntry::Tensor {
                name,
                logical: Some(_),
                from,
                shape,
                ..
            } = e
            {
                tensors.push((
                    member.clone(),
                    name.clone(),
                    shape.clone(),
                    out_dtype(*from),
                ));
            }
        }
    }
    let w = Writing {
        ck,
        opts,
        ranks: &ranks,
        yaml: &yaml,
        artifacts: &artifacts,
        bar: &bar,
    };
    let rank_names = match opts.format {
        Format::Safetensors => write_safetensors(&w, out)?,
        Format::Nemo => write_nemo(&w, out)?,
    };
    bar.finish();
    Ok(ReshardReport {
        ranks: rank_names,
        tensors,
        bytes: total,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// What both writers need.
struct Writing<'a> {
    ck: &'a Checkpoint,
    opts: &'a ReshardOptions,
    ranks: &'a [(u64, u64, Vec<OutEntry<'a>>)],
    yaml: &'a str,
    artifacts: &'a [(String, &'a [u8])],
    bar: &'a Progress,
}

impl Writing<'_> {
    fn out_dtype(&self, from: DType) -> DType {
        self.opts.dtype.unwrap_or(from)
    }
}

/// Writes a per-rank safetensors folder; returns the rank files.
fn write_safetensors(w: &Writing, out: &Path) -> Result<Vec<String>> {
    let (ck, opts, ranks, yaml, artifacts, bar) =
        (w.ck, w.opts, w.ranks, w.yaml, w.artifacts, w.bar);
    let out_dtype = |from: DType| w.out_dtype(from);
    let mut rank_names = Vec::new();
    let dir = AtomicDir::create(out, opts.force)?;
    write_file(&dir.path().join("model_config.yaml"), yaml.as_bytes())?;
    for (name, data) in artifacts {
        write_file(&dir.path().join(name), data)?;
    }
    // Each finished rank file is synced in the background while the next is written.
    let mut syncs = Vec::new();
    for (r, p, entries) in ranks {
        check_rank_records(ck, entries)?;
        let member = rank_member(*r, *p, opts.tp, opts.pp)
            .replace("model_weights.ckpt", "model.safetensors");
        let path = dir.path().join(&member);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let specs: Vec<TensorSpec> = entries
            .iter()
            .filter_map(|e| match e {
                OutEntry::Tensor {
                    name, from, shape, ..
                } => Some(TensorSpec {
                    name: name.clone(),
                    dtype: out_dtype(*from),
                    shape: shape.clone(),
                }),
                OutEntry::None(_) => None,
            })
            .collect();
        let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = FileSink::new(f);
        let refs: Vec<&TensorSpec> = specs.iter().collect();
        w.write_all(&safetensors_write::header(&refs))
            .map_err(|e| Error::io(&path, e))?;
        for e in entries {
            if let OutEntry::Tensor {
                name,
                logical,
                from,
                pieces,
                ..
            } = e
            {
                output::check_interrupted()?;
                let n = emit::write_pieces(
                    &ck.files,
                    *logical,
                    *from,
                    pieces,
                    out_dtype(*from),
                    &mut w,
                    bar,
                )
                .map_err(|e| Error::io(&path, e))?;
                emit::check_overflow(
                    ck.files.display(),
                    name,
                    n,
                    out_dtype(*from),
                    opts.allow_overflow,
                )?;
            }
        }
        let f = w.into_file().map_err(|e| Error::io(&path, e))?;
        syncs.push((path.clone(), std::thread::spawn(move || f.sync_all())));
        rank_names.push(member);
    }
    for (path, h) in syncs {
        h.join()
            .unwrap_or_else(|_| Err(std::io::Error::other("sync thread panicked")))
            .map_err(|e| Error::io(&path, e))?;
    }
    dir.commit()?;
    Ok(rank_names)
}

/// Writes a `.nemo` archive; returns the rank members.
fn write_nemo(w: &Writing, out: &Path) -> Result<Vec<String>> {
    let (ck, opts, ranks, yaml, artifacts, bar) =
        (w.ck, w.opts, w.ranks, w.yaml, w.artifacts, w.bar);
    let out_dtype = |from: DType| w.out_dtype(from);
    let mut rank_names = Vec::new();
    let file = AtomicFile::create(out, opts.force)?;
    let io = |e: std::io::Error| Error::io(file.path(), e);
    let f = File::create(file.path()).map_err(io)?;
    let mut t = TarWriter::new(FileSink::new(f));
    t.dir(".").map_err(io)?;
    t.file("./model_config.yaml", yaml.as_bytes()).map_err(io)?;
    let mut dirs = Vec::new();
    for (name, data) in artifacts {
        if let Some((d, _)) = name.rsplit_once('/').filter(|(d, _)| !dirs.contains(d)) {
            t.dir(&format!("./{d}")).map_err(io)?;
            dirs.push(d);
        }
        t.file(&format!("./{name}"), data).map_err(io)?;
    }
    for (r, p, entries) in ranks {
        check_rank_records(ck, entries)?;
        let member = rank_member(*r, *p, opts.tp, opts.pp);
        let root = match member.rsplit_once('/') {
            Some((folder, _)) => {
                t.dir(&format!("./{folder}")).map_err(io)?;
                format!("{folder}_model_weights")
            }
            None => "model_weights".to_string(),
        };
        let save: Vec<(String, SaveEntry)> = entries
            .iter()
            .map(|e| match e {
                OutEntry::Tensor {
                    name, from, shape, ..
                } => (
                    name.clone(),
                    SaveEntry::Tensor {
                        dtype: out_dtype(*from),
                        shape: shape.clone(),
                    },
                ),
                OutEntry::None(name) => (name.clone(), SaveEntry::None),
            })
            .collect();
        let tensor_entries: Vec<&OutEntry> = entries
            .iter()
            .filter(|e| matches!(e, OutEntry::Tensor { .. }))
            .collect();
        let tf = TorchFile::new(&root, &save);
        t.begin_file(&format!("./{member}"), tf.size())
            .map_err(io)?;
        let mut refused: Option<Error> = None;
        tf.write(t.inner(), |i, w| {
            check_interrupted_io()?;
            let OutEntry::Tensor {
                name,
                logical,
                from,
                pieces,
                ..
            } = tensor_entries[i]
            else {
                unreachable!()
            };
            let n = emit::write_pieces(
                &ck.files,
                *logical,
                *from,
                pieces,
                out_dtype(*from),
                &mut Plain(w),
                bar,
            )?;
            emit::check_overflow(
                ck.files.display(),
                name,
                n,
                out_dtype(*from),
                opts.allow_overflow,
            )
            .map_err(|e| {
                refused = Some(e);
                std::io::Error::other("overflow")
            })
        })
        .map_err(|e| {
            if let Some(r) = refused.take() {
                r
            } else if e.kind() == std::io::ErrorKind::Interrupted {
                Error::Interrupted
            } else {
                io(e)
            }
        })?;
        t.end_file().map_err(io)?;
        rank_names.push(member);
    }
    let w = t.finish().map_err(io)?;
    let f = w.into_file().map_err(io)?;
    f.sync_all().map_err(io)?;
    file.commit()?;
    Ok(rank_names)
}

/// The CRC-32 of every record a rank's tensors are read from (each record once).
fn check_rank_records(ck: &Checkpoint, entries: &[OutEntry]) -> Result<()> {
    for e in entries {
        if let OutEntry::Tensor {
            name,
            logical: Some(l),
            ..
        } = e
        {
            l.check_records(&ck.files, name)?;
        }
    }
    Ok(())
}

fn check_interrupted_io() -> std::io::Result<()> {
    output::check_interrupted()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::Interrupted, "interrupted"))
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    std::fs::write(path, data).map_err(|e| Error::io(path, e))
}

/// Schema of the written keys (the source's).
pub fn schema(ck: &Checkpoint) -> Schema {
    ck.schema
}
