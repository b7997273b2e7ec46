//! [`View::open`]: the one place that decides what an input is and opens it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::arch::roles::Kind;
use crate::arch::tp::{Logical, Seg};
use crate::arch::Arch;
use crate::container::mapped::{Mapped, OpenOptions};
use crate::dtype::{DType, TensorRef};
use crate::error::{Error, Result};
use crate::hf::folder::{self, HfFolder};
use crate::hf::names;
use crate::nemo::checkpoint::Checkpoint;
use crate::nemo::hf_tokenizer::TokenizerModel;
use crate::nemo::logical::{self, Logicals};

/// What was opened.
pub enum Source {
    /// A `.nemo` (archive or folder) or a per-rank folder, with its logical tensors.
    Nemo {
        checkpoint: Box<Checkpoint>,
        logicals: Logicals,
    },
    /// A Hugging Face folder.
    Hf(Box<HfFolder>),
}

/// The stored parts of an int8 (compressed-tensors `pack-quantized`) linear.
#[derive(Debug, Clone)]
pub struct Int8Parts {
    pub packed: TensorRef,
    pub scale: TensorRef,
    pub shape: TensorRef,
    /// Columns per scale; `None` per output channel.
    pub group: Option<usize>,
    /// The files the three are in.
    pub files: [String; 3],
}

#[derive(Debug, Clone)]
enum RowMap {
    /// Row ranges, in order, of a logical (merged) tensor.
    Logical(Arc<Logical>, Vec<(u64, u64)>),
    /// A contiguous stored tensor.
    Plain(TensorRef),
}

/// A canonical tensor: its Hugging Face name, dtype and shape, and where its rows are.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    /// The logical tensor it is taken from (NeMo inputs).
    pub key: Option<(Kind, Option<u64>)>,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Where it is stored, for messages.
    pub file: String,
    /// Set for int8 linears of a quantized folder (then the rows are the packed bytes).
    pub int8: Option<Int8Parts>,
    rows: RowMap,
}

impl Tensor {
    /// Rows (1 for vectors and scalars).
    pub fn rows(&self) -> usize {
        match self.shape.len() {
            0 | 1 => 1,
            _ => self.shape[0] as usize,
        }
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        match self.shape.len() {
            0 => 1,
            1 => self.shape[0] as usize,
            _ => self.shape[1] as usize,
        }
    }

    /// Appends the byte ranges of row `i`, in column order.
    pub fn row_segs(&self, i: usize, out: &mut Vec<Seg>) {
        match &self.rows {
            RowMap::Plain(t) => {
                let rb = t.nbytes() / self.rows().max(1) as u64;
                out.push((t.offset + i as u64 * rb, rb));
            }
            RowMap::Logical(l, ranges) => {
                let mut i = i as u64;
                for &(a, b) in ranges {
                    if i < b - a {
                        l.row_segments(a + i, out);
                        return;
                    }
                    i -= b - a;
                }
                unreachable!("row within the tensor");
            }
        }
    }

    /// Checks the CRC-32 of every record this tensor is read from (once per record; a
    /// no-op under `--no-crc`), naming the member, record and tensor when one fails.
    pub fn check_records(&self, files: &Mapped) -> Result<()> {
        match self.logical() {
            Some((l, _)) => l.check_records(files, &self.name),
            None => Ok(()),
        }
    }

    /// The logical tensor and the row ranges of it this tensor is (NeMo inputs).
    pub fn logical(&self) -> Option<(&Logical, &[(u64, u64)])> {
        match &self.rows {
            RowMap::Logical(l, r) => Some((l, r)),
            RowMap::Plain(_) => None,
        }
    }

    /// The stored tensor this is (Hugging Face inputs).
    pub fn stored(&self) -> Option<&TensorRef> {
        match &self.rows {
            RowMap::Plain(t) => Some(t),
            RowMap::Logical(..) => None,
        }
    }
}

/// An opened model.
pub struct View {
    pub source: Source,
    pub arch: Arch,
    /// The canonical tensors in the order they are written.
    pub tensors: Vec<Tensor>,
    index: HashMap<String, usize>,
}

impl View {
    /// Opens any input this tool reads.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<View> {
        if folder::is_hf_folder(path) {
            return View::from_hf(HfFolder::open(path, opts)?);
        }
        View::from_nemo(Checkpoint::open(path, opts)?)
    }

    /// Opens a NeMo input only, without assembling its tensors (for `inspect`, which
    /// reports on archives that cannot be converted).
    pub fn open_checkpoint(path: &Path, opts: &OpenOptions) -> Result<Checkpoint> {
        Checkpoint::open(path, opts)
    }

    /// The view of an opened checkpoint: logical tensors assembled and checked, the
    /// vocabulary checked against the tokenizer, HF tensors planned over them.
    pub fn from_nemo(ck: Checkpoint) -> Result<View> {
        let vocab = ck.tokenizer()?.model.vocab_size() as u64;
        let logicals = logical::logical_tensors(&ck)?;
        logical::check_vocab(&ck, &logicals, vocab)?;
        let arch = ck.config.arch();
        let file = ck.files.display().to_string();
        let plan = names::plan(&arch, vocab, |k, l| logicals.contains_key(&(k, l)));
        let tensors = plan
            .into_iter()
            .map(|p| {
                let l = logicals[&p.key].clone();
                Tensor {
                    name: p.name,
                    key: Some(p.key),
                    dtype: l.dtype,
                    shape: p.shape,
                    file: file.clone(),
                    int8: None,
                    rows: RowMap::Logical(l, p.rows),
                }
            })
            .collect();
        Ok(View::new(
            Source::Nemo {
                checkpoint: Box::new(ck),
                logicals,
            },
            arch,
            tensors,
        ))
    }

    fn from_hf(f: HfFolder) -> Result<View> {
        let dir = f.files.display().to_string();
        let mut tensors = Vec::new();
        let by_name: HashMap<&str, &folder::Stored> =
            f.tensors.iter().map(|s| (s.name.as_str(), s)).collect();
        for s in &f.tensors {
            let at = format!("{dir}/{}", s.file);
            let base = s.name.strip_suffix(".weight_packed");
            let int8 = match (f.int8, base) {
                (Some(group), Some(base)) => {
                    let part = |suffix: &str| {
                        let n = format!("{base}.{suffix}");
                        by_name.get(n.as_str()).copied().ok_or(Error::Tensor {
                            member: dir.clone(),
                            tensor: n.clone(),
                            msg: "missing from the folder".into(),
                        })
                    };
                    let (sc, sh) = (part("weight_scale")?, part("weight_shape")?);
                    Some(Int8Parts {
                        packed: s.tensor.clone(),
                        scale: sc.tensor.clone(),
                        shape: sh.tensor.clone(),
                        group,
                        files: [
                            at.clone(),
                            format!("{dir}/{}", sc.file),
                            format!("{dir}/{}", sh.file),
                        ],
                    })
                }
                _ => None,
            };
            if f.int8.is_some()
                && (s.name.ends_with(".weight_scale") || s.name.ends_with(".weight_shape"))
                && by_name.contains_key(
                    format!("{}.weight_packed", &s.name[..s.name.len() - 13]).as_str(),
                )
            {
                continue;
            }
            let (name, shape) = match (&int8, base) {
                (Some(_), Some(base)) => {
                    let sh = &s.tensor.shape;
                    (
                        format!("{base}.weight"),
                        vec![sh[0], sh.get(1).copied().unwrap_or(0) * 4],
                    )
                }
                _ => (s.name.clone(), s.tensor.shape.clone()),
            };
            tensors.push(Tensor {
                name,
                key: None,
                dtype: if int8.is_some() {
                    DType::U8
                } else {
                    s.tensor.dtype
                },
                shape,
                file: at,
                int8,
                rows: RowMap::Plain(s.tensor.clone()),
            });
        }
        let arch = f.arch.clone();
        Ok(View::new(Source::Hf(Box::new(f)), arch, tensors))
    }

    fn new(source: Source, arch: Arch, tensors: Vec<Tensor>) -> View {
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        View {
            source,
            arch,
            tensors,
            index,
        }
    }

    /// The mapped input.
    pub fn files(&self) -> &Mapped {
        match &self.source {
            Source::Nemo { checkpoint, .. } => &checkpoint.files,
            Source::Hf(f) => &f.files,
        }
    }

    /// The input's path as given.
    pub fn display(&self) -> &str {
        self.files().display()
    }

    /// A canonical tensor by its Hugging Face name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The NeMo checkpoint, for NeMo inputs.
    pub fn nemo(&self) -> Option<&Checkpoint> {
        match &self.source {
            Source::Nemo { checkpoint, .. } => Some(checkpoint),
            Source::Hf(_) => None,
        }
    }

    /// The checkpoint and its logical tensors, for commands that read only NeMo inputs.
    pub fn nemo_parts(&self, command: &str) -> Result<(&Checkpoint, &Logicals)> {
        match &self.source {
            Source::Nemo {
                checkpoint,
                logicals,
            } => Ok((checkpoint, logicals)),
            Source::Hf(_) => Err(Error::Layout {
                file: self.display().to_string(),
                msg: format!(
                    "not a NeMo model archive (a Hugging Face folder; {command} reads a .nemo or a per-rank folder)"
                ),
            }),
        }
    }

    /// The Hugging Face folder, for such inputs.
    pub fn hf(&self) -> Option<&HfFolder> {
        match &self.source {
            Source::Hf(f) => Some(f),
            Source::Nemo { .. } => None,
        }
    }

    /// The tokenizer, or why there is none.
    pub fn tokenizer(&self) -> Result<&TokenizerModel> {
        match &self.source {
            Source::Nemo { checkpoint, .. } => Ok(&checkpoint.tokenizer()?.model),
            Source::Hf(f) => f
                .tokenizer
                .as_ref()
                .map_err(|(file, msg)| Error::Tokenizer {
                    file: file.clone(),
                    msg: msg.clone(),
                }),
        }
    }

    /// Rows of the embedding that are real tokens: the tokenizer's size for NeMo (the
    /// rest is padding), `vocab_size` for Hugging Face.
    pub fn vocab(&self) -> Result<u64> {
        match &self.source {
            Source::Nemo { .. } => Ok(self.tokenizer()?.vocab_size() as u64),
            Source::Hf(f) => Ok(f.vocab_size),
        }
    }

    /// Where the TP shards came from: `(tp, pp)` for NeMo inputs.
    pub fn grid(&self) -> Option<(u64, u64)> {
        self.nemo().map(|c| (c.grid.tp, c.grid.pp))
    }
}

impl crate::quant::engine::RowSegs for Tensor {
    fn row_segs(&self, i: usize, out: &mut Vec<Seg>) {
        Tensor::row_segs(self, i, out)
    }

    fn check(&self, files: &Mapped) -> Result<()> {
        self.check_records(files)
    }
}
