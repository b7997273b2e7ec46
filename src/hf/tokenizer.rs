//! `tokenizer.json` for the fast (Rust `tokenizers`) tokenizer, written so that it gives
//! the SentencePiece model's ids exactly.
//!
//! transformers' own slow-to-fast conversion of a Llama SentencePiece model does not:
//! with `legacy: false` its `Metaspace` pre-tokenizer skips the dummy prefix when the text
//! already starts with a space (`"  a"` loses a `▁`) and after a leading user-defined piece;
//! with `legacy: true` its normalizer adds a prefix after every added token
//! (`a<extra_id_1>b` gets `▁b`). SentencePiece adds one `▁` at the start of the whole text
//! and matches user-defined pieces inside it. So here:
//!
//! - the normalizer prepends `▁` once, at the start of the text (a regex on `\A`), then
//!   turns spaces into `▁`, as SentencePiece's identity normalizer does;
//! - user-defined pieces (`<extra_id_N>`) are added tokens matched *after* normalization
//!   (`normalized: true`). Their own text is normalized too, and must stay itself, so the
//!   start-of-text regex skips a text that is exactly one user-defined piece. The one
//!   input that then differs is a text made of a single user-defined piece and nothing
//!   else (SentencePiece gives `▁` before it);
//! - control pieces (`<s>`, `</s>`, `<unk>`) are special added tokens, as transformers
//!   makes them: their text in a prompt is read as the token unless the caller passes
//!   `split_special_tokens=True`, which gives SentencePiece's (and NeMo's) literal pieces;
//! - the BPE merges are the pairs of pieces whose concatenation is a piece, ordered by that
//!   piece's score, as transformers' converter orders them.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::nemo::tokenizer::{PieceType, SpModel};

/// The `tokenizer.json` document, or `None` (with the reason) when the SentencePiece
/// model uses a feature this writer does not express; transformers then converts the
/// slow tokenizer itself.
pub fn tokenizer_json(sp: &SpModel) -> Result<Value, String> {
    if sp.model_type != 2 {
        return Err(format!("a {} model, not BPE", sp.model_type_name()));
    }
    let identity = sp.normalizer_name.is_empty() || sp.normalizer_name == "identity";
    // `split_digits` is a trainer option: it kept digits out of merged pieces, so the
    // vocabulary alone already splits them.
    if !identity || sp.remove_extra_whitespaces || !sp.escape_whitespaces {
        return Err("a normalizer other than identity, or whitespace rules".into());
    }
    let piece = |id: i64| sp.piece(id).map(str::to_string);
    let mut added = Vec::new();
    let mut user_defined = Vec::new();
    for (i, p) in sp.pieces.iter().enumerate() {
        let special = matches!(p.kind, PieceType::Control | PieceType::Unknown);
        if special || p.kind == PieceType::UserDefined {
            added.push(json!({
                "id": i, "content": p.piece, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": !special, "special": special,
            }));
        }
        if p.kind == PieceType::UserDefined {
            user_defined.push(regex_escape(&p.piece));
        }
    }
    let space = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if sp.add_dummy_prefix {
        let not_alone = if user_defined.is_empty() {
            String::new()
        } else {
            format!("(?!(?:{})\\z)", user_defined.join("|"))
        };
        json!({"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"Regex": format!("\\A{not_alone}(?=[\\s\\S])")}, "content": "\u{2581}"},
            space,
        ]})
    } else {
        space
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if sp.add_dummy_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let post_processor = match piece(sp.bos_id) {
        Some(bos) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos.clone(): {"id": bos, "ids": [sp.bos_id], "tokens": [bos]}},
        }),
        None => Value::Null,
    };
    let vocab: serde_json::Map<String, Value> = sp
        .pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.piece.clone(), json!(i)))
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": piece(sp.unk_id),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": sp.byte_fallback,
            "vocab": vocab,
            "merges": merges(sp),
        },
    }))
}

/// Every `(left, right)` pair of pieces whose concatenation is a piece, as `"left right"`:
/// per merged piece (in id order) the pairs by (left id, right id), then all of them by
/// the merged piece's score, highest first, keeping that order among equal scores.
fn merges(sp: &SpModel) -> Vec<String> {
    let ids: HashMap<&str, usize> = sp
        .pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.piece.as_str(), i))
        .collect();
    let mut all: Vec<(usize, usize, f32)> = Vec::new();
    for p in &sp.pieces {
        let mut local: Vec<(usize, usize, f32)> = p
            .piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = p.piece.split_at(at);
                Some((*ids.get(l)?, *ids.get(r)?, p.score))
            })
            .collect();
        local.sort_by_key(|&(l, r, _)| (l, r));
        all.extend(local);
    }
    all.sort_by(|a, b| b.2.total_cmp(&a.2));
    all.iter()
        .map(|&(l, r, _)| format!("{} {}", sp.pieces[l].piece, sp.pieces[r].piece))
        .collect()
}

/// `s` with every regex metacharacter escaped.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.^$|?*+()[]{}-".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
