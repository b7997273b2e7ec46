//! Laying a model's weights over its files, from the model view: the same code for a
//! `.nemo` (computing on its TP shards as stored, no merged copy) and a Hugging Face
//! folder (float, or int8 in the compressed-tensors `pack-quantized` layout).

use std::path::Path;

use crate::arch::roles::{self, Kind};
use crate::arch::RopeScaling;
use crate::container::mapped::{Mapped, OpenOptions};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::{Tensor, View};
use crate::nemo::hf_tokenizer::TokenizerModel;
use crate::quant::compressed;
use crate::runtime::cpu::WType;
use crate::runtime::llama::{Acts, Band, Dims, Layer, Linear, Part, QkvOrder, Weights};
use crate::runtime::tokenizer::Tokenizer;

/// Where the weights came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A `.nemo` archive or a per-rank folder, computed on its TP shards.
    Nemo { tp: u64, pp: u64 },
    /// A Hugging Face folder.
    HuggingFace,
}

/// A model ready to run: its mapped files, weights laid over them, tokenizer.
pub struct Model {
    pub archive: Mapped,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    pub source: SourceKind,
    /// The BOS put before a prompt.
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Prompts go without a BOS when there is none (a `tokenizers` tokenizer whose
    /// post-processor adds none, as GPT-2's); a SentencePiece model without one is refused.
    pub bos_optional: bool,
    /// Where the forward pass runs (the CPU unless `select_device` moved it).
    pub backend: crate::runtime::backend::Backend,
    /// Whether [`Model::map_weights`] has run.
    mapped: std::sync::Once,
}

fn wtype(d: DType, what: &str, file: &str) -> Result<WType> {
    Ok(match d {
        DType::F32 => WType::F32,
        DType::F16 => WType::F16,
        DType::BF16 => WType::BF16,
        other => {
            return Err(Error::Tensor {
                member: file.to_string(),
                tensor: what.to_string(),
                msg: format!("dtype {} cannot be run", other.short_name()),
            })
        }
    })
}

fn to_f32(bytes: &[u8], d: DType) -> Vec<f32> {
    let mut v = vec![0f32; bytes.len() / d.size()];
    crate::dtype::to_f32(bytes, d, &mut v);
    v
}

impl Model {
    /// Opens a `.nemo`, a per-rank folder or a Hugging Face folder.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Model> {
        Model::from_view(View::open(path, opts)?)
    }

    /// Maps the files' pages before the first forward pass on the CPU, once, where they fit
    /// in memory (`Mapped::populate_if_fits`): one call per 8 MiB in parallel instead of a
    /// page fault per 64 KiB inside the first products (they made a 256-token prompt of the
    /// 134M bf16 model 10–17 % slower). Returns the seconds it
    /// took (0 after the first call, or where nothing was mapped).
    pub fn map_weights(&self) -> f64 {
        let mut secs = 0.0;
        self.mapped.call_once(|| {
            let t0 = std::time::Instant::now();
            if self.archive.populate_if_fits() {
                secs = t0.elapsed().as_secs_f64();
            }
        });
        secs
    }

    /// Logits of the last of `ids`, from a fresh session.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        let mut logits = vec![0f32; self.weights.dims.vocab];
        self.session(ids.len())?.forward_into(ids, &mut logits)?;
        Ok(logits)
    }

    /// Every id must have an embedding row, and the prompt must fit the context.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::Usage("the prompt has no tokens".into()));
        }
        let d = &self.weights.dims;
        if ids.len() > d.max_positions {
            return Err(Error::Usage(format!(
                "the prompt has {} tokens but the model's context is {} positions",
                ids.len(),
                d.max_positions
            )));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.weights.embed.out) {
            return Err(Error::Usage(format!(
                "token id {bad} is outside the embedding ({} rows)",
                self.weights.embed.out
            )));
        }
        Ok(())
    }
}

impl Model {
    /// Lays the view's tensors out for the forward pass.
    pub fn from_view(view: View) -> Result<Model> {
        let file = view.display().to_string();
        let a = &view.arch;
        let cerr = |msg: String| Error::Config {
            file: match view.hf() {
                Some(_) => format!("{file}/config.json"),
                None => file.clone(),
            },
            msg,
        };
        if a.bias {
            return Err(cerr(
                "linear biases are not supported by the runtime".into(),
            ));
        }
        if a.rotary_percentage != 1.0 {
            return Err(cerr(format!(
                "rotary_percentage {} is not supported (Llama rotates whole heads)",
                a.rotary_percentage
            )));
        }
        if let RopeScaling::Other(t) = &a.rope_scaling {
            return Err(cerr(format!(
                "rope_scaling type `{t}` is not supported (linear and llama3 are)"
            )));
        }
        for t in &view.tensors {
            t.check_records(view.files())?;
        }
        let sp = view.tokenizer()?.clone();
        let vocab = view.vocab()?;
        if sp.vocab_size() as u64 > vocab {
            return Err(Error::Tokenizer {
                file: format!("{file}/tokenizer.model"),
                msg: format!("{} pieces but vocab_size is {vocab}", sp.vocab_size()),
            });
        }
        let get = |name: &str| -> Result<&Tensor> {
            view.get(name).ok_or_else(|| Error::Tensor {
                member: file.clone(),
                tensor: name.to_string(),
                msg: "missing from the folder".into(),
            })
        };
        let linear = |name: &str| -> Result<Linear> { linear_of(&view, get(name)?) };
        let vector = |name: &str| -> Result<Vec<f32>> {
            let t = get(name)?;
            wtype(t.dtype, name, &t.file)?;
            let mut segs = Vec::new();
            t.row_segs(0, &mut segs);
            let mut bytes = Vec::new();
            for (o, n) in segs {
                bytes.extend_from_slice(view.files().slice(o, n));
            }
            Ok(to_f32(&bytes, t.dtype))
        };
        let one = |kind: Kind, g: u64| roles::hf_names(kind, g).remove(0);
        let mut layers = Vec::new();
        for i in 0..a.layers {
            // Stacked under a label named after the layer's first part (`….q_proj+k+v`).
            let stacked = |names: Vec<String>, label: &str| -> Result<Linear> {
                let ls = names
                    .iter()
                    .map(|n| linear(n))
                    .collect::<Result<Vec<_>>>()?;
                let first = names[0].trim_end_matches(".weight");
                let prefix = first.rsplit_once('.').map_or(first, |p| p.0);
                stack(&format!("{prefix}.{label}"), ls, &file)
            };
            layers.push(Layer {
                attn_norm: vector(&one(Kind::InputNorm, i))?,
                qkv: stacked(roles::hf_names(Kind::Qkv, i), "qkv")?,
                o: linear(&one(Kind::AttnOut, i))?,
                mlp_norm: vector(&one(Kind::PostAttnNorm, i))?,
                gate_up: stacked(vec![one(Kind::Gate, i), one(Kind::Up, i)], "gate_up")?,
                down: linear(&one(Kind::Down, i))?,
            });
        }
        let embed = linear(&one(Kind::Embedding, 0))?;
        let output = one(Kind::Output, 0);
        let lm_head = if a.tied && view.get(&output).is_none() {
            embed.clone()
        } else {
            linear(&output)?
        };
        let dims = Dims {
            hidden: a.hidden as usize,
            heads: a.heads as usize,
            kv_heads: a.groups as usize,
            head_dim: a.head_dim as usize,
            ffn: a.ffn as usize,
            layers: a.layers as usize,
            vocab: vocab as usize,
            eps: a.eps as f32,
            inv_freq: a.scaled_inv_freq(),
            max_positions: a.max_positions as usize,
        };
        let weights = Weights {
            dims,
            embed,
            layers,
            norm: vector(&one(Kind::FinalNorm, 0))?,
            lm_head,
            qkv_order: QkvOrder::Separate,
            acts: Acts::default(),
        };
        check_shapes(&weights, &file)?;
        let source = match view.grid() {
            Some((tp, pp)) => SourceKind::Nemo { tp, pp },
            None => SourceKind::HuggingFace,
        };
        let files = match view.source {
            crate::model::Source::Nemo { checkpoint, .. } => checkpoint.files,
            crate::model::Source::Hf(f) => f.files,
        };
        Ok(finish(files, weights, sp, source))
    }
}

/// A linear layer of the view: int8 over its packed bytes, float over its rows.
fn linear_of(view: &View, t: &Tensor) -> Result<Linear> {
    let Some(q) = &t.int8 else {
        return linear_from_rows(t);
    };
    let base = t.name.strip_suffix(".weight").unwrap_or(&t.name);
    let p = compressed::read_packed(
        view.files(),
        base,
        (&q.packed, &q.files[0]),
        (&q.scale, &q.files[1]),
        (&q.shape, &q.files[2]),
        q.group,
    )?;
    Ok(Linear {
        name: base.to_string(),
        out: p.out,
        inp: p.inp,
        wtype: WType::U8Offset,
        group: p.group,
        bands: vec![Band {
            row0: 0,
            rows: p.out,
            parts: vec![Part {
                col0: 0,
                cols: p.inp,
                offset: p.offset,
                stride: p.inp as u64,
                scales: p.scales,
            }],
        }],
        plan: Default::default(),
    })
}

/// Lays a tensor's rows over the mapped files: consecutive rows whose byte ranges have
/// the same shape and advance by a constant stride form one band. A stored matrix is one
/// band; a column-parallel NeMo tensor one band per TP rank (and query group); a
/// row-parallel one a band with a part per rank.
fn linear_from_rows(t: &Tensor) -> Result<Linear> {
    let (name, file) = (t.name.as_str(), t.file.as_str());
    let wt = wtype(t.dtype, name, file)?;
    let esz = wt.size() as u64;
    if t.shape.len() != 2 {
        return Err(Error::Tensor {
            member: file.to_string(),
            tensor: name.to_string(),
            msg: "not a matrix".into(),
        });
    }
    let (rows, cols) = (t.rows(), t.cols());
    let mut bands: Vec<Band> = Vec::new();
    let mut segs = Vec::new();
    for i in 0..rows {
        segs.clear();
        t.row_segs(i, &mut segs);
        let fits = bands.last_mut().is_some_and(|b| {
            if b.parts.len() != segs.len()
                || b.parts
                    .iter()
                    .zip(&segs)
                    .any(|(p, s)| p.cols as u64 * esz != s.1)
            {
                return false;
            }
            if b.rows == 1 {
                if segs.iter().zip(&b.parts).any(|(s, p)| s.0 <= p.offset) {
                    return false;
                }
                for (p, s) in b.parts.iter_mut().zip(&segs) {
                    p.stride = s.0 - p.offset;
                }
                true
            } else {
                b.parts
                    .iter()
                    .zip(&segs)
                    .all(|(p, s)| p.offset + b.rows as u64 * p.stride == s.0)
            }
        });
        if fits {
            bands.last_mut().expect("checked").rows += 1;
            continue;
        }
        let mut col0 = 0usize;
        let mut parts = Vec::with_capacity(segs.len());
        for s in &segs {
            let c = (s.1 / esz) as usize;
            parts.push(Part {
                col0,
                cols: c,
                offset: s.0,
                stride: s.1,
                scales: Vec::new(),
            });
            col0 += c;
        }
        if col0 != cols {
            return Err(Error::Tensor {
                member: file.to_string(),
                tensor: name.to_string(),
                msg: format!("row {i} spans {col0} columns, not {cols}"),
            });
        }
        bands.push(Band {
            row0: i,
            rows: 1,
            parts,
        });
    }
    Ok(Linear {
        name: name.to_string(),
        out: rows,
        inp: cols,
        wtype: wt,
        group: cols,
        bands,
        plan: Default::default(),
    })
}

/// Stacks linears with the same input size and storage (q, k, v; gate, up) into one.
fn stack(name: &str, parts: Vec<Linear>, file: &str) -> Result<Linear> {
    let mut bands = Vec::new();
    let mut row0 = 0;
    let first = &parts[0];
    let (inp, wtype, group) = (first.inp, first.wtype, first.group);
    if let Some(l) = parts
        .iter()
        .find(|l| l.inp != inp || l.wtype != wtype || l.group != group)
    {
        return Err(Error::Tensor {
            member: file.to_string(),
            tensor: l.name.clone(),
            msg: format!(
                "differs from `{}` in input size or storage; they must match to be stacked",
                first.name
            ),
        });
    }
    for l in parts {
        for mut b in l.bands {
            b.row0 += row0;
            bands.push(b);
        }
        row0 += l.out;
    }
    Ok(Linear {
        name: name.to_string(),
        out: row0,
        inp,
        wtype,
        group,
        bands,
        plan: Default::default(),
    })
}

fn finish(archive: Mapped, weights: Weights, sp: TokenizerModel, source: SourceKind) -> Model {
    // The BOS put before a prompt: SentencePiece Llama always has one; a `tokenizers`
    // tokenizer only if its post-processor adds it (Llama 3 does, GPT-2 does not).
    let (bos, eos) = match &sp {
        TokenizerModel::SentencePiece(_) => sp.bos_eos(),
        TokenizerModel::Hf(t) => (t.adds_bos, sp.bos_eos().1),
    };
    let bos_optional = matches!(sp, TokenizerModel::Hf(_));
    Model {
        archive,
        weights,
        tokenizer: Tokenizer::new(sp),
        source,
        bos,
        eos,
        bos_optional,
        backend: crate::runtime::backend::Backend::Cpu,
        mapped: std::sync::Once::new(),
    }
}

fn check_shapes(w: &Weights, file: &str) -> Result<()> {
    let d = &w.dims;
    let terr = |name: &str, msg: String| Error::Tensor {
        member: file.to_string(),
        tensor: name.to_string(),
        msg,
    };
    if d.kv_heads == 0 || !d.heads.is_multiple_of(d.kv_heads) || !d.head_dim.is_multiple_of(2) {
        return Err(Error::Config {
            file: file.to_string(),
            msg: format!(
                "{} heads in {} query groups of head size {} cannot be run",
                d.heads, d.kv_heads, d.head_dim
            ),
        });
    }
    let qkv = (d.heads + 2 * d.kv_heads) * d.head_dim;
    let want = |l: &Linear, out: usize, inp: usize| -> Result<()> {
        if l.out != out || l.inp != inp {
            return Err(terr(
                &l.name,
                format!("shape [{}, {}], expected [{out}, {inp}]", l.out, l.inp),
            ));
        }
        Ok(())
    };
    if w.embed.inp != d.hidden || w.embed.out < d.vocab {
        return Err(terr(
            &w.embed.name,
            format!("shape [{}, {}]", w.embed.out, w.embed.inp),
        ));
    }
    if w.lm_head.inp != d.hidden || w.lm_head.out < d.vocab {
        return Err(terr(
            &w.lm_head.name,
            format!("shape [{}, {}]", w.lm_head.out, w.lm_head.inp),
        ));
    }
    for l in &w.layers {
        want(&l.qkv, qkv, d.hidden)?;
        want(&l.o, d.hidden, d.heads * d.head_dim)?;
        want(&l.gate_up, 2 * d.ffn, d.hidden)?;
        want(&l.down, d.hidden, d.ffn)?;
        if l.attn_norm.len() != d.hidden || l.mlp_norm.len() != d.hidden {
            return Err(terr(
                &l.qkv.name,
                "norm weights are not hidden-sized".into(),
            ));
        }
    }
    if w.norm.len() != d.hidden {
        return Err(terr("model.norm.weight", "not hidden-sized".into()));
    }
    Ok(())
}
