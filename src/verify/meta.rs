//! The checks that read no tensor data: configuration, tokenizer, and that a model's
//! tensors are the ones its own configuration calls for.

use crate::arch::roles::Kind;
use crate::arch::Arch;
use crate::hf::names;
use crate::model::View;
use crate::nemo::hf_tokenizer::{HfTokenizer, TokenizerModel};
use crate::nemo::tokenizer::SpModel;
use crate::runtime::tokenizer::Tokenizer;

/// The fields that differ between two configurations (`name: reference vs candidate`).
pub fn config_diff(r: &Arch, rv: u64, c: &Arch, cv: u64) -> Vec<String> {
    let mut d = Vec::new();
    let mut f = |name: &str, a: String, b: String| {
        if a != b {
            d.push(format!(
                "{name}: {a} in the reference, {b} in the candidate"
            ));
        }
    };
    f("hidden size", r.hidden.to_string(), c.hidden.to_string());
    f("layers", r.layers.to_string(), c.layers.to_string());
    f("attention heads", r.heads.to_string(), c.heads.to_string());
    f("query groups", r.groups.to_string(), c.groups.to_string());
    f("head dim", r.head_dim.to_string(), c.head_dim.to_string());
    f("ffn size", r.ffn.to_string(), c.ffn.to_string());
    f("vocab", rv.to_string(), cv.to_string());
    f(
        "rope base",
        r.rope_theta.to_string(),
        c.rope_theta.to_string(),
    );
    f(
        "rope scaling",
        format!("{:?}", r.rope_scaling),
        format!("{:?}", c.rope_scaling),
    );
    f(
        "rotary percentage",
        r.rotary_percentage.to_string(),
        c.rotary_percentage.to_string(),
    );
    f("norm eps", r.eps.to_string(), c.eps.to_string());
    f(
        "context",
        r.max_positions.to_string(),
        c.max_positions.to_string(),
    );
    f("tied embeddings", r.tied.to_string(), c.tied.to_string());
    f("linear biases", r.bias.to_string(), c.bias.to_string());
    d
}

/// The first way `view`'s tensors depart from what its own configuration calls for: a
/// missing or unexpected name, or a shape.
pub fn layout(view: &View) -> Result<Option<String>, String> {
    let vocab = view.vocab().map_err(|e| e.to_string())?;
    let fused = view
        .tensors
        .iter()
        .any(|t| t.key.map(|k| k.0) == Some(Kind::GateUp));
    let plan = names::plan(&view.arch, vocab, |k, _| match k {
        Kind::GateUp => fused,
        _ => true,
    });
    for p in &plan {
        match view.get(&p.name) {
            None => return Ok(Some(format!("{} is missing", p.name))),
            Some(t) if t.shape != p.shape => {
                return Ok(Some(format!(
                    "{} has shape {:?}; the configuration calls for {:?}",
                    p.name, t.shape, p.shape
                )))
            }
            Some(_) => {}
        }
    }
    let tied_head = roles_output_name();
    for t in &view.tensors {
        let extra = !plan.iter().any(|p| p.name == t.name);
        // A tied model may still store its output layer (transformers sometimes does).
        if extra && !(view.arch.tied && t.name == tied_head) {
            return Ok(Some(format!(
                "{} is not a tensor of this configuration",
                t.name
            )));
        }
    }
    Ok(None)
}

fn roles_output_name() -> String {
    crate::arch::roles::hf_names(Kind::Output, 0).remove(0)
}

/// The first difference between two tokenizers: for SentencePiece, pieces (text, score,
/// type), special ids and normalization settings; for `tokenizers` ones, the
/// `tokenizer.json` documents (compared as JSON) and BOS / EOS.
pub fn tokenizer_diff(r: &TokenizerModel, c: &TokenizerModel) -> Option<String> {
    match (r, c) {
        (TokenizerModel::SentencePiece(r), TokenizerModel::SentencePiece(c)) => sp_diff(r, c),
        (TokenizerModel::Hf(r), TokenizerModel::Hf(c)) => {
            let doc = |t: &HfTokenizer| serde_json::from_str::<serde_json::Value>(&t.json).ok();
            if doc(r) != doc(c) {
                return Some(format!(
                    "the {} tokenizers differ ({} and {} tokens)",
                    r.kind,
                    r.vocab_size(),
                    c.vocab_size()
                ));
            }
            (r.bos != c.bos || r.eos != c.eos).then(|| {
                format!(
                    "BOS / EOS are {:?} / {:?} in the reference, {:?} / {:?} in the candidate",
                    r.bos, r.eos, c.bos, c.eos
                )
            })
        }
        _ => Some(format!(
            "the reference's tokenizer is {}, the candidate's {}",
            r.kind_name(),
            c.kind_name()
        )),
    }
}

fn sp_diff(r: &SpModel, c: &SpModel) -> Option<String> {
    if r.vocab_size() != c.vocab_size() {
        return Some(format!(
            "{} pieces in the reference, {} in the candidate",
            r.vocab_size(),
            c.vocab_size()
        ));
    }
    for (i, (a, b)) in r.pieces.iter().zip(&c.pieces).enumerate() {
        if a.piece != b.piece || a.score.to_bits() != b.score.to_bits() || a.kind != b.kind {
            return Some(format!(
                "piece {i} is {:?} (score {}, {:?}) in the reference, {:?} (score {}, {:?}) in the candidate",
                a.piece, a.score, a.kind, b.piece, b.score, b.kind
            ));
        }
    }
    let ids = |m: &SpModel| (m.unk_id, m.bos_id, m.eos_id, m.pad_id);
    if ids(r) != ids(c) {
        return Some(format!(
            "special ids (unk, bos, eos, pad) are {:?} in the reference, {:?} in the candidate",
            ids(r),
            ids(c)
        ));
    }
    let norm = |m: &SpModel| {
        (
            m.model_type,
            m.byte_fallback,
            m.add_dummy_prefix,
            m.remove_extra_whitespaces,
            m.escape_whitespaces,
            m.normalizer_name.clone(),
            m.split_digits,
        )
    };
    if norm(r) != norm(c) {
        return Some(format!(
            "model type and normalization (type, byte_fallback, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces, normalizer, split_digits) are {:?} in the reference, {:?} in the candidate",
            norm(r),
            norm(c)
        ));
    }
    None
}

/// The first of `texts` (named) that the two tokenizers encode differently.
pub fn encoding_diff(r: &Tokenizer, c: &Tokenizer, texts: &[(&str, &str)]) -> Option<String> {
    for (name, text) in texts {
        let (a, b) = (r.encode(text), c.encode(text));
        if a != b {
            let at = a
                .iter()
                .zip(&b)
                .position(|(x, y)| x != y)
                .unwrap_or(a.len().min(b.len()));
            return Some(format!(
                "prompt {name} encodes differently from token {at} ({:?} vs {:?})",
                a.get(at),
                b.get(at)
            ));
        }
    }
    None
}

/// Self-check of a tokenizer: every special id and `<extra_id_N>` piece has an embedding
/// row. Returns the first that does not.
pub fn specials_outside(tok: &TokenizerModel, embed_rows: u64) -> Option<String> {
    let sp = match tok {
        TokenizerModel::SentencePiece(sp) => sp,
        TokenizerModel::Hf(t) => {
            return [("bos", &t.bos), ("eos", &t.eos)]
                .into_iter()
                .find_map(|(n, v)| {
                    v.as_ref()
                        .filter(|(id, _)| *id as u64 >= embed_rows)
                        .map(|(id, _)| (n, *id))
                })
                .map(|(n, id)| format!("{n} id {id} has no embedding row ({embed_rows} rows)"));
        }
    };
    let mut ids = vec![
        ("unk", sp.unk_id),
        ("bos", sp.bos_id),
        ("eos", sp.eos_id),
        ("pad", sp.pad_id),
    ];
    let extra = sp.extra_id_pieces();
    ids.extend(extra.iter().map(|(n, i)| (n.as_str(), *i as i64)));
    ids.into_iter()
        .filter(|&(_, id)| id >= 0)
        .find(|&(_, id)| id as u64 >= embed_rows)
        .map(|(n, id)| format!("{n} id {id} has no embedding row ({embed_rows} rows)"))
}
