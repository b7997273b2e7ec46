//! Assembling a checkpoint's rank parts (or zarr arrays) into the model's logical
//! tensors, shape-checked against the config, through the merge rules of `arch::tp`.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::arch::roles::{Classified, KeyLayer, Kind, Role};
use crate::arch::tp::Logical;
use crate::container::dist::{DistArray, DistCheckpoint};
use crate::dtype::TensorRef;
use crate::error::{Error, Result};
use crate::nemo::checkpoint::{Checkpoint, Rank, Storage};
use crate::nemo::config::ModelConfig;

/// Logical tensors keyed by (kind, global layer).
pub type Logicals = BTreeMap<(Kind, Option<u64>), Arc<Logical>>;

/// A rank's part of a tensor: the tensor, its key and the member it is in.
type Located<'a> = (&'a TensorRef, &'a str, &'a str);

/// Every logical tensor of a checkpoint, keyed by (kind, global layer), shape-checked.
/// Every logical tensor of a checkpoint, keyed by (kind, global layer), shape-checked.
pub fn logical_tensors(ck: &Checkpoint) -> Result<Logicals> {
    let tp = ck.grid.tp;
    ck.config.arch().check_tp(tp).map_err(|m| Error::Layout {
        file: ck.files.display().to_string(),
        msg: format!("the archive cannot have been written at this TP: {m}"),
    })?;
    let mut out: Logicals = BTreeMap::new();
    match &ck.weights {
        Storage::Ranks(ranks) => from_ranks(ck, ranks, &mut out)?,
        Storage::Distributed(dist) => from_dist(ck, dist, &mut out)?,
    }
    check_complete(ck, &out)?;
    Ok(out)
}

/// Merge rule inputs from per-rank state dicts: one part per TP rank of every tensor.
fn from_ranks(ck: &Checkpoint, ranks: &[Rank], out: &mut Logicals) -> Result<()> {
    let d = ck.config.arch();
    let (tp, pp) = (ck.grid.tp, ck.grid.pp);
    let file = ck.files.display().to_string();
    let lerr = |msg: String| Error::Layout {
        file: file.clone(),
        msg,
    };
    let per_stage = d.layers / pp;
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
                KeyLayer::Index(l) if l < per_stage => Some(r.pp * per_stage + l),
                KeyLayer::Index(l) => {
                    return Err(Error::Tensor {
                        member: format!("{file}:{}", r.state.member),
                        tensor: name.to_string(),
                        msg: format!("layer {l} but a stage holds {per_stage} layers"),
                    })
                }
                KeyLayer::None => None,
                KeyLayer::Stacked => {
                    return Err(lerr(format!(
                        "stacked key `{name}` in a per-rank checkpoint"
                    )))
                }
            };
            let slot = parts
                .entry((c.kind, layer))
                .or_insert_with(|| vec![None; tp as usize]);
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
                    let (_, name, _) = slot.iter().flatten().next().expect("at least one rank");
                    return Err(lerr(format!("tensor `{name}` is missing on TP rank {tp}")));
                }
            }
        }
        let (first, _, _) = refs[0];
        let vocab_rows = first.shape.first().copied().unwrap_or(0) * tp;
        let want = d.rank_shape(kind, vocab_rows, tp);
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
                    tp
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
        out.insert(
            (kind, layer),
            Arc::new(Logical::from_ranks(
                kind,
                layer,
                d.shape(kind, vocab_rows),
                refs.iter().map(|r| r.0.clone()).collect(),
            )),
        );
    }
    Ok(())
}

/// Logical tensors from a distributed checkpoint, already in the TP = 1 layout.
fn from_dist(ck: &Checkpoint, dist: &DistCheckpoint, out: &mut Logicals) -> Result<()> {
    let file = ck.files.display().to_string();
    for a in &dist.arrays {
        let Some((c, want)) = dist_slice_shape(ck, a)? else {
            continue;
        };
        let array = Arc::new(a.clone());
        let aerr = |msg: String| Error::DistCheckpoint {
            file: file.clone(),
            msg: format!("array `{}`: {msg}", a.key),
        };
        if c.layer == KeyLayer::Stacked {
            for l in 0..ck.config.num_layers {
                let t = Logical::from_dist(c.kind, Some(l), want.clone(), array.clone(), true)
                    .map_err(aerr)?;
                out.insert((c.kind, Some(l)), Arc::new(t));
            }
        } else {
            let t = Logical::from_dist(c.kind, None, want, array, false).map_err(aerr)?;
            out.insert((c.kind, None), Arc::new(t));
        }
    }
    Ok(())
}

/// Every known array of a distributed checkpoint has the global shape its config calls
/// for (checked when the checkpoint is opened; unknown keys are warned about there).
pub fn check_dist_shapes(ck: &Checkpoint, dist: &DistCheckpoint) -> Result<()> {
    for a in dist.arrays.iter().filter(|a| ck.classify(&a.key).is_some()) {
        dist_slice_shape(ck, a)?;
    }
    Ok(())
}

/// The role of array `a` and the shape of one logical tensor of it (one layer of a
/// stacked array), after checking its global shape against the config; `None` for
/// arrays that are not weights.
fn dist_slice_shape(ck: &Checkpoint, a: &DistArray) -> Result<Option<(Classified, Vec<u64>)>> {
    let d = ck.config.arch();
    let file = ck.files.display().to_string();
    let Some(c) = ck.classify(&a.key) else {
        return Err(Error::Layout {
            file,
            msg: format!("unknown array `{}` (not part of a Llama model)", a.key),
        });
    };
    if c.role == Role::Skip {
        return Ok(None);
    }
    let stacked = c.layer == KeyLayer::Stacked;
    let want = d.shape(c.kind, if stacked { 0 } else { a.shape[0] });
    let full = if stacked {
        std::iter::once(d.layers)
            .chain(want.iter().copied())
            .collect()
    } else {
        want.clone()
    };
    if a.shape != full {
        return Err(Error::DistCheckpoint {
            file,
            msg: format!(
                "array `{}`: shape {} contradicts the config (expected {})",
                a.key,
                crate::dtype::fmt_shape(&a.shape),
                crate::dtype::fmt_shape(&full)
            ),
        });
    }
    Ok(Some((c, want)))
}

/// Every layer and the model-level tensors must be present.
fn check_complete(ck: &Checkpoint, out: &Logicals) -> Result<()> {
    let d = ck.config.arch();
    let file = ck.files.display().to_string();
    let lerr = |msg: String| Error::Layout {
        file: file.clone(),
        msg,
    };
    let gate_up: &[Kind] = if ck.config.activation == crate::arch::Activation::FastSwiglu
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
    Ok(())
}

/// The tokenizer's pieces must all have embedding rows.
pub fn check_vocab(ck: &Checkpoint, logicals: &Logicals, vocab: u64) -> Result<()> {
    let rows = logicals[&(Kind::Embedding, None)].rows();
    if let Some(msg) = vocab_misfit(&ck.config, vocab, rows) {
        return Err(Error::Tokenizer {
            file: ck.files.display().to_string(),
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
