//! Planning a re-shard: every output rank's entries, each tensor as the slices of its
//! logical tensor that rank holds, under key names from the role table.

use std::collections::BTreeMap;

use super::{Format, ReshardOptions};
use crate::arch::roles::{self, KeyLayer, Kind};
use crate::arch::tp::{self, Logical, Slice};
use crate::dtype::DType;
use crate::nemo::checkpoint::{Checkpoint, Storage};
use crate::nemo::logical::Logicals;
use crate::pipeline::emit;

/// One entry of an output rank's state dict.
pub(super) enum OutEntry<'a> {
    Tensor {
        name: String,
        logical: Option<&'a Logical>,
        from: DType,
        pieces: Vec<Slice>,
        shape: Vec<u64>,
    },
    None(String),
}

/// Key templates (`{L}` for the stage-local layer): weights from the role table in the
/// source's schema (and norm naming), the non-weight entries as the source names them.
pub(super) struct Names {
    pub weights: BTreeMap<Kind, String>,
    /// `_extra_state` keys: per-layer templates and model-level keys.
    pub extra_layer: Vec<String>,
    pub extra_model: Vec<String>,
    pub inv_freq: Option<(String, (u64, u64), DType)>,
}

pub(super) fn templates(ck: &Checkpoint) -> Names {
    let mut weights = BTreeMap::new();
    let mut extra_layer = Vec::new();
    let mut extra_model = Vec::new();
    let mut inv_freq = None;
    let mut note = |key: &str, inv: Option<(u64, u64, DType)>| {
        let key = roles::normalise_key(key);
        let Some(c) = ck.classify(&key) else { return };
        let template = match c.layer {
            KeyLayer::Index(_) | KeyLayer::Stacked => {
                let (head, tail) = key
                    .split_once("layers.")
                    .expect("per-layer keys contain layers.");
                let tail = match c.layer {
                    KeyLayer::Index(_) => tail.split_once('.').map(|t| t.1).unwrap_or(tail),
                    _ => tail,
                };
                format!("{head}layers.{{L}}.{tail}")
            }
            KeyLayer::None => key.clone(),
        };
        match c.kind {
            Kind::ExtraState if c.layer == KeyLayer::None => {
                if !extra_model.contains(&template) {
                    extra_model.push(template)
                }
            }
            Kind::ExtraState => {
                if !extra_layer.contains(&template) {
                    extra_layer.push(template)
                }
            }
            Kind::InvFreq => {
                if let (None, Some((o, n, d))) = (&inv_freq, inv) {
                    inv_freq = Some((template, (o, n), d));
                }
            }
            k => {
                let fused = template.ends_with("layer_norm_weight");
                if let Some(t) = roles::key_template(c.schema, k, fused) {
                    weights.entry(k).or_insert(t);
                }
            }
        }
    };
    match &ck.weights {
        Storage::Ranks(ranks) => {
            for r in ranks {
                for (k, e) in &r.state.entries {
                    let inv = match e {
                        crate::torch::state_dict::StateEntry::Tensor(t) => {
                            Some((t.offset, t.nbytes(), t.dtype))
                        }
                        _ => None,
                    };
                    note(k, inv);
                }
            }
        }
        Storage::Distributed(d) => {
            for a in &d.arrays {
                note(&a.key, None);
            }
            for (k, _) in &d.objects {
                note(k, None);
            }
        }
    }
    Names {
        weights,
        extra_layer,
        extra_model,
        inv_freq,
    }
}

/// Every output rank's entries: `(tp, pp, entries)`, each tensor as the slices of its
/// logical tensor that rank holds.
pub(super) fn plan_ranks<'a>(
    ck: &Checkpoint,
    logicals: &'a Logicals,
    names: &Names,
    opts: &ReshardOptions,
    vocab: u64,
) -> Vec<(u64, u64, Vec<OutEntry<'a>>)> {
    let new_rows = ck.config.padded_vocab(vocab, opts.tp);
    let per_stage = ck.config.num_layers / opts.pp;
    let out_dtype = |from: DType| opts.dtype.unwrap_or(from);
    let mut ranks: Vec<(u64, u64, Vec<OutEntry>)> = Vec::new();
    for p in 0..opts.pp {
        for r in 0..opts.tp {
            let mut entries = Vec::new();
            let mut add_as = |kind: Kind, layer: Option<u64>, local: Option<u64>, t: &str| {
                let Some(l) = logicals.get(&(kind, layer)) else {
                    return;
                };
                let name = match local {
                    Some(i) => t.replace("{L}", &i.to_string()),
                    None => t.to_string(),
                };
                let pieces = tp::split(l, roles::role_of(kind), r, opts.tp, vocab, new_rows);
                let shape = emit::shape_of(l, &pieces);
                entries.push(OutEntry::Tensor {
                    name,
                    logical: Some(l),
                    from: l.dtype,
                    pieces,
                    shape,
                });
            };
            let mut add = |kind: Kind, layer: Option<u64>, local: Option<u64>| {
                if let Some(t) = names.weights.get(&kind) {
                    add_as(kind, layer, local, t);
                }
            };
            if p == 0 {
                add(Kind::Embedding, None, None);
            }
            for i in 0..per_stage {
                let g = Some(p * per_stage + i);
                for k in [
                    Kind::InputNorm,
                    Kind::Qkv,
                    Kind::AttnOut,
                    Kind::PostAttnNorm,
                    Kind::GateUp,
                    Kind::Gate,
                    Kind::Up,
                    Kind::Down,
                ] {
                    add(k, g, Some(i));
                }
            }
            if p == opts.pp - 1 {
                add(Kind::FinalNorm, None, None);
                add(Kind::Output, None, None);
                // Tied, and the embedding is on another stage: megatron-core's last stage
                // allocates its own output layer, a copy of the embedding, and saves it.
                if p > 0 && ck.config.share_embeddings_and_output_weights {
                    let out = roles::key_template(ck.schema, Kind::Output, false)
                        .expect("megatron-core names the output layer");
                    add_as(Kind::Embedding, None, None, &out);
                }
            }
            if let Some((name, seg, d)) = &names.inv_freq {
                let n = seg.1 / d.size() as u64;
                // The source's bytes when the dtype is kept (as NeMo re-saves them); a widened
                // dtype gets the frequencies recomputed, not the rounded ones widened.
                let piece = if out_dtype(*d) == *d {
                    Slice::Raw(*seg)
                } else {
                    Slice::Values(crate::arch::rope_inv_freq(ck.config.rotary_base, n))
                };
                entries.insert(
                    usize::from(p == 0),
                    OutEntry::Tensor {
                        name: name.clone(),
                        logical: None,
                        from: *d,
                        pieces: vec![piece],
                        shape: vec![n],
                    },
                );
            }
            if opts.format == Format::Nemo {
                for i in 0..per_stage {
                    for t in &names.extra_layer {
                        entries.push(OutEntry::None(t.replace("{L}", &i.to_string())));
                    }
                }
                if p == opts.pp - 1 {
                    for k in &names.extra_model {
                        entries.push(OutEntry::None(k.clone()));
                    }
                }
            }
            ranks.push((r, p, entries));
        }
    }
    ranks
}
