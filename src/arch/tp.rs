//! Merge rules, implemented once per role: every logical tensor of the model (in the
//! TP = 1 Megatron layout, vocabulary still padded) is described as rows, each row a list
//! of byte ranges in the archive. Nothing is copied until a sink asks for rows.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::arch::roles::{Kind, Layer, Role};
use crate::nemo::checkpoint::{Checkpoint, Weights};
use crate::nemo::config::ModelConfig;
use crate::container::zarr::ZarrArray;
use crate::dtype::{DType, TensorRef};

/// A logical tensor: a kind at a global layer, merged over TP ranks.
#[derive(Debug, Clone)]
pub struct Logical<'a> {
    pub kind: Kind,
    /// Global layer for per-layer tensors.
    pub layer: Option<u64>,
    pub dtype: DType,
    /// Shape in the TP = 1 layout (vocabulary padded as stored).
    pub shape: Vec<u64>,
    rows: Rows<'a>,
}

#[derive(Debug, Clone)]
enum Rows<'a> {
    /// One part per TP rank, in rank order, merged by `role`.
    Ranks {
        role: Role,
        parts: Vec<&'a TensorRef>,
    },
    /// A zarr array (layers stacked on axis 0 when `layer` is set), already in TP = 1 layout.
    Zarr {
        array: &'a ZarrArray,
        layer: Option<u64>,
    },
}

/// A byte range of the archive.
pub type Seg = (u64, u64);

impl Logical<'_> {
    /// Number of rows (1 for vectors).
    pub fn rows(&self) -> u64 {
        if self.shape.len() == 1 {
            1
        } else {
            self.shape[0]
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> u64 {
        let cols = if self.shape.len() == 1 {
            self.shape[0]
        } else {
            self.shape[1]
        };
        cols * self.dtype.size() as u64
    }

    /// Appends the byte ranges of row `i` to `out`, merging with the previous range
    /// when contiguous.
    pub fn row_segments(&self, i: u64, out: &mut Vec<Seg>) {
        let esz = self.dtype.size() as u64;
        match &self.rows {
            Rows::Ranks { role, parts } => {
                let t = parts.len() as u64;
                match role {
                    Role::Replicated => push(out, parts[0].offset, parts[0].nbytes()),
                    Role::VocabRows | Role::ColumnRows | Role::QkvGrouped => {
                        let rpr = parts[0].shape[0];
                        let p = parts[(i / rpr) as usize];
                        let rb = p.shape[1] * esz;
                        push(out, p.offset + (i % rpr) * rb, rb);
                    }
                    Role::GateUpFused => {
                        let half = parts[0].shape[0] / 2;
                        let f = half * t;
                        let (j, second) = if i < f { (i, 0) } else { (i - f, half) };
                        let p = parts[(j / half) as usize];
                        let rb = p.shape[1] * esz;
                        push(out, p.offset + (second + j % half) * rb, rb);
                    }
                    Role::RowCols => {
                        for p in parts {
                            let rb = p.shape[1] * esz;
                            push(out, p.offset + i * rb, rb);
                        }
                    }
                    Role::Skip => {}
                }
            }
            Rows::Zarr { array, layer } => {
                let chunks = &array.chunks;
                let (lead, dims) = match layer {
                    Some(l) => (vec![*l / chunks[0]], &array.shape[1..]),
                    None => (Vec::new(), &array.shape[..]),
                };
                let cdims = &chunks[chunks.len() - dims.len()..];
                let in_layer = layer.map(|l| l % chunks[0]).unwrap_or(0);
                if dims.len() == 1 {
                    let mut idx = lead.clone();
                    for j in 0..dims[0].div_ceil(cdims[0]) {
                        idx.push(j);
                        let c = &array.chunk_refs[&idx];
                        let n = cdims[0].min(dims[0] - j * cdims[0]);
                        push(out, c.offset + in_layer * cdims[0] * esz, n * esz);
                        idx.pop();
                    }
                } else {
                    let (cr, cc) = (cdims[0], cdims[1]);
                    for j in 0..dims[1].div_ceil(cc) {
                        let mut idx = lead.clone();
                        idx.push(i / cr);
                        idx.push(j);
                        let c = &array.chunk_refs[&idx];
                        let n = cc.min(dims[1] - j * cc);
                        let local = in_layer * cr * cc + (i % cr) * cc;
                        push(out, c.offset + local * esz, n * esz);
                    }
                }
            }
        }
    }

    /// Byte ranges of everything this tensor reads (whole rank parts or chunks).
    pub fn source_ranges(&self) -> Vec<Seg> {
        match &self.rows {
            Rows::Ranks {
                role: Role::Replicated,
                parts,
            } => vec![(parts[0].offset, parts[0].nbytes())],
            Rows::Ranks { parts, .. } => parts.iter().map(|p| (p.offset, p.nbytes())).collect(),
            Rows::Zarr { array, layer } => array
                .chunk_refs
                .iter()
                .filter(|(idx, _)| layer.is_none_or(|l| idx.first() == Some(&l)))
                .map(|(_, c)| (c.offset, c.span))
                .collect(),
        }
    }

    /// For replicated tensors: the copies on the other ranks (to check they are equal).
    pub fn replicas(&self) -> Vec<Seg> {
        match &self.rows {
            Rows::Ranks {
                role: Role::Replicated,
                parts,
            } => parts.iter().map(|p| (p.offset, p.nbytes())).collect(),
            _ => Vec::new(),
        }
    }
}

fn push(out: &mut Vec<Seg>, off: u64, len: u64) {
    if let Some(last) = out.last_mut() {
        if last.0 + last.1 == off {
            last.1 += len;
            return;
        }
    }
    out.push((off, len));
}

/// Dimensions the merge checks shapes against.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub hidden: u64,
    pub heads: u64,
    pub groups: u64,
    pub head_dim: u64,
    pub ffn: u64,
    pub layers: u64,
    pub tp: u64,
    pub pp: u64,
}

impl Dims {
    pub fn of(ck: &Checkpoint) -> Dims {
        let c = &ck.config;
        Dims {
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            groups: c.num_query_groups,
            head_dim: c.head_dim,
            ffn: c.ffn_hidden_size,
            layers: c.num_layers,
            tp: ck.grid.tp,
            pp: ck.grid.pp,
        }
    }

    /// The TP = 1 shape of a kind (`vocab_rows` for vocabulary tensors).
    pub fn shape(&self, kind: Kind, vocab_rows: u64) -> Vec<u64> {
        let h = self.hidden;
        match kind {
            Kind::Embedding | Kind::Output => vec![vocab_rows, h],
            Kind::InputNorm | Kind::PostAttnNorm | Kind::FinalNorm => vec![h],
            Kind::Qkv => vec![(self.heads + 2 * self.groups) * self.head_dim, h],
            Kind::AttnOut => vec![h, self.heads * self.head_dim],
            Kind::GateUp => vec![2 * self.ffn, h],
            Kind::Gate | Kind::Up => vec![self.ffn, h],
            Kind::Down => vec![h, self.ffn],
            Kind::InvFreq | Kind::ExtraState => vec![],
        }
    }

    /// The shape one of `tp` ranks holds.
    pub fn rank_shape(&self, kind: Kind, vocab_rows: u64, tp: u64) -> Vec<u64> {
        let mut s = self.shape(kind, vocab_rows);
        match crate::arch::roles::role_of(kind) {
            Role::VocabRows | Role::ColumnRows | Role::QkvGrouped | Role::GateUpFused => s[0] /= tp,
            Role::RowCols => s[1] /= tp,
            Role::Replicated | Role::Skip => {}
        }
        s
    }

    /// Checks that `tp` can split this model (whole query groups, ffn and heads per rank).
    pub fn check_tp(&self, tp: u64) -> std::result::Result<(), String> {
        for (what, n) in [
            ("query groups", self.groups),
            ("attention heads", self.heads),
            ("ffn_hidden_size", self.ffn),
        ] {
            if !n.is_multiple_of(tp) {
                return Err(format!("{what} ({n}) is not divisible by TP {tp}"));
            }
        }
        Ok(())
    }
}

/// A rank's part of a tensor: the tensor, its key and the member it is in.
type Located<'a> = (&'a TensorRef, &'a str, &'a str);

/// Every logical tensor of a checkpoint, keyed by (kind, global layer), shape-checked.
pub fn logical_tensors(ck: &Checkpoint) -> Result<BTreeMap<(Kind, Option<u64>), Logical<'_>>> {
    let d = Dims::of(ck);
    let file = ck.archive.display().to_string();
    let lerr = |msg: String| Error::Layout {
        file: file.clone(),
        msg,
    };
    d.check_tp(d.tp).map_err(|m| {
        lerr(format!(
            "the archive cannot have been written at this TP: {m}"
        ))
    })?;
    let mut out = BTreeMap::new();
    match &ck.weights {
        Weights::Ranks(ranks) => {
            let per_stage = d.layers / d.pp;
            let mut parts: BTreeMap<(Kind, Option<u64>), Vec<Option<Located>>> = BTreeMap::new();
            for r in ranks {
                for (name, t) in r.state.tensors() {
                    let Some(c) = ck.classify(name) else {
                        return Err(Error::Tensor {
                            member: format!("{file}:{}", r.state.member),
                            tensor: name.to_string(),
                            msg: "unknown tensor key (not part of a Llama model)".into(),
                        });
                    };
                    if c.role == Role::Skip {
                        continue;
                    }
                    let layer = match c.layer {
                        Layer::Index(l) if l < per_stage => Some(r.pp * per_stage + l),
                        Layer::Index(l) => {
                            return Err(Error::Tensor {
                                member: format!("{file}:{}", r.state.member),
                                tensor: name.to_string(),
                                msg: format!("layer {l} but a stage holds {per_stage} layers"),
                            })
                        }
                        Layer::None => None,
                        Layer::Stacked => {
                            return Err(lerr(format!(
                                "stacked key `{name}` in a per-rank checkpoint"
                            )))
                        }
                    };
                    let slot = parts
                        .entry((c.kind, layer))
                        .or_insert_with(|| vec![None; d.tp as usize]);
                    if slot[r.tp as usize]
                        .replace((t, name, &r.state.member))
                        .is_some()
                    {
                        return Err(Error::Tensor {
                            member: format!("{file}:{}", r.state.member),
                            tensor: name.to_string(),
                            msg: "appears twice for the same layer".into(),
                        });
                    }
                }
            }
            for ((kind, layer), slot) in parts {
                let mut refs = Vec::new();
                for (tp, s) in slot.iter().enumerate() {
                    match s {
                        Some(s) => refs.push(*s),
                        None => {
                            let (_, name, _) =
                                slot.iter().flatten().next().expect("at least one rank");
                            return Err(lerr(format!(
                                "tensor `{name}` is missing on TP rank {tp}"
                            )));
                        }
                    }
                }
                let (first, _, _) = refs[0];
                let vocab_rows = first.shape.first().copied().unwrap_or(0) * d.tp;
                let want = d.rank_shape(kind, vocab_rows, d.tp);
                for (t, name, member) in &refs {
                    let terr = |msg: String| Error::Tensor {
                        member: format!("{file}:{member}"),
                        tensor: name.to_string(),
                        msg,
                    };
                    if t.shape != want {
                        return Err(terr(format!(
                            "shape {} contradicts the config (expected {} at TP {})",
                            crate::dtype::fmt_shape(&t.shape),
                            crate::dtype::fmt_shape(&want),
                            d.tp
                        )));
                    }
                    if !t.is_contiguous() {
                        return Err(terr(
                            "is not contiguous (a strided view); not supported".into(),
                        ));
                    }
                    if t.dtype != first.dtype {
                        return Err(terr(format!(
                            "dtype {} differs from rank 0's {}",
                            t.dtype, first.dtype
                        )));
                    }
                }
                let role = crate::arch::roles::role_of(kind);
                out.insert(
                    (kind, layer),
                    Logical {
                        kind,
                        layer,
                        dtype: first.dtype,
                        shape: d.shape(kind, vocab_rows),
                        rows: Rows::Ranks {
                            role,
                            parts: refs.iter().map(|r| r.0).collect(),
                        },
                    },
                );
            }
        }
        Weights::Distributed(dist) => {
            for a in &dist.arrays {
                let Some(c) = ck.classify(&a.key) else {
                    return Err(lerr(format!(
                        "unknown array `{}` (not part of a Llama model)",
                        a.key
                    )));
                };
                if c.role == Role::Skip {
                    continue;
                }
                let vocab_rows = if c.layer == Layer::Stacked {
                    0
                } else {
                    a.shape[0]
                };
                let want = d.shape(c.kind, vocab_rows);
                let aerr = |msg: String| Error::DistCheckpoint {
                    file: file.clone(),
                    msg: format!("array `{}`: {msg}", a.key),
                };
                match c.layer {
                    Layer::Stacked => {
                        let mut full = vec![d.layers];
                        full.extend_from_slice(&want);
                        if a.shape != full || a.chunks[0] != 1 {
                            return Err(aerr(format!(
                                "shape {} contradicts the config (expected {} with one layer per chunk)",
                                crate::dtype::fmt_shape(&a.shape),
                                crate::dtype::fmt_shape(&full)
                            )));
                        }
                        for l in 0..d.layers {
                            out.insert(
                                (c.kind, Some(l)),
                                Logical {
                                    kind: c.kind,
                                    layer: Some(l),
                                    dtype: a.dtype,
                                    shape: want.clone(),
                                    rows: Rows::Zarr {
                                        array: a,
                                        layer: Some(l),
                                    },
                                },
                            );
                        }
                    }
                    _ => {
                        if a.shape != want {
                            return Err(aerr(format!(
                                "shape {} contradicts the config (expected {})",
                                crate::dtype::fmt_shape(&a.shape),
                                crate::dtype::fmt_shape(&want)
                            )));
                        }
                        out.insert(
                            (c.kind, None),
                            Logical {
                                kind: c.kind,
                                layer: None,
                                dtype: a.dtype,
                                shape: want,
                                rows: Rows::Zarr {
                                    array: a,
                                    layer: None,
                                },
                            },
                        );
                    }
                }
            }
        }
    }
    // Every layer and the model-level tensors must be present.
    let gate_up: &[Kind] = if ck.config.activation == crate::nemo::config::Activation::FastSwiglu
        || ck.schema == crate::arch::roles::Schema::Mcore
    {
        &[Kind::GateUp]
    } else {
        &[Kind::Gate, Kind::Up]
    };
    let mut need: Vec<(Kind, Option<u64>)> = vec![(Kind::Embedding, None), (Kind::FinalNorm, None)];
    if !ck.config.share_embeddings_and_output_weights {
        need.push((Kind::Output, None));
    }
    for l in 0..d.layers {
        for k in [
            Kind::InputNorm,
            Kind::Qkv,
            Kind::AttnOut,
            Kind::PostAttnNorm,
            Kind::Down,
        ]
        .iter()
        .chain(gate_up)
        {
            need.push((*k, Some(l)));
        }
    }
    for key in need {
        if !out.contains_key(&key) {
            let what = match key.1 {
                Some(l) => format!("{:?} of layer {l}", key.0),
                None => format!("{:?}", key.0),
            };
            return Err(lerr(format!("the archive has no {what} tensor")));
        }
    }
    Ok(out)
}

/// The tokenizer's pieces must all have embedding rows.
pub fn check_vocab(
    ck: &Checkpoint,
    logicals: &BTreeMap<(Kind, Option<u64>), Logical<'_>>,
    vocab: u64,
) -> Result<()> {
    let rows = logicals[&(Kind::Embedding, None)].rows();
    if let Some(msg) = vocab_misfit(&ck.config, vocab, rows) {
        return Err(Error::Tokenizer {
            file: ck.archive.display().to_string(),
            msg,
        });
    }
    Ok(())
}

/// Why a tokenizer of `pieces` pieces does not belong with an embedding of `rows` rows,
/// if it does not: the rows must be the pieces padded to a multiple of
/// `make_vocab_size_divisible_by × TP` for some power-of-two TP (NeMo pads for the TP it
/// saved with, and the padding is trimmed on export).
pub fn vocab_misfit(cfg: &ModelConfig, pieces: u64, rows: u64) -> Option<String> {
    if pieces > rows {
        return Some(format!(
            "the tokenizer has {pieces} pieces but the embedding has only {rows} rows"
        ));
    }
    let fits = rows == pieces || (0..8).any(|k| cfg.padded_vocab(pieces, 1 << k) == rows);
    (!fits).then(|| {
        format!(
            "the tokenizer has {pieces} pieces, which padded to a multiple of {} x TP give {} rows, but the embedding has {rows}: it is not this model's tokenizer",
            cfg.make_vocab_size_divisible_by,
            cfg.padded_vocab(pieces, cfg.tensor_model_parallel_size)
        )
    })
}
