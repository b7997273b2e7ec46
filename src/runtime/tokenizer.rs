//! The runtime's tokenizer: SentencePiece BPE encoding and decoding (Llama-2's tokenizer),
//! pure Rust, exact against Python `sentencepiece` on the committed golden tables; other
//! tokenizers (`tokenizer.json`, GPT-2 BPE) through the `tokenizers` crate.
//!
//! Encoding follows SentencePiece's BPE model: normalise (escape spaces as `▁`, add the
//! dummy prefix), split into characters with user-defined pieces kept whole, merge the
//! adjacent pair whose merged piece has the highest score (leftmost first) until no merge
//! is in the vocabulary, then map symbols to ids, spelling unknown ones as `<0xXX>` byte
//! pieces when the model has byte fallback.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::nemo::hf_tokenizer::{HfTokenizer, TokenizerModel};
use crate::nemo::tokenizer::{PieceType, SpModel};

const SPACE: char = '\u{2581}';

/// The runtime's tokenizer: SentencePiece by our encoder, anything else by the
/// `tokenizers` crate.
#[derive(Clone)]
pub enum Tokenizer {
    Sp(Box<SpTokenizer>),
    Hf(HfTokenizer),
}

impl Tokenizer {
    pub fn new(model: impl Into<TokenizerModel>) -> Tokenizer {
        match model.into() {
            TokenizerModel::SentencePiece(m) => Tokenizer::Sp(Box::new(SpTokenizer::new(m))),
            TokenizerModel::Hf(t) => Tokenizer::Hf(t),
        }
    }

    /// Encodes `text` to ids (no BOS/EOS).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Sp(t) => t.encode(text),
            Tokenizer::Hf(t) => t
                .inner
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default(),
        }
    }

    /// Decodes ids to text (special tokens dropped).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Sp(t) => t.decode(ids),
            Tokenizer::Hf(t) => t.inner.decode(ids, true).unwrap_or_default(),
        }
    }

    /// The text each of `ids[from..]` adds to the decoded sequence, in its place (a
    /// leading space kept): the difference of decodes with and without it, over the 8
    /// tokens before it, so the cost stays linear. A token that ends a character split
    /// across byte pieces gets its own decoding.
    pub fn token_texts(&self, ids: &[u32], from: usize) -> Vec<String> {
        (from..ids.len())
            .map(|i| {
                let a = i.saturating_sub(8);
                let before = self.decode(&ids[a..i]);
                let now = self.decode(&ids[a..=i]);
                match now.strip_prefix(before.as_str()) {
                    Some(rest) => rest.to_string(),
                    None => self.decode(&ids[i..=i]),
                }
            })
            .collect()
    }

    /// The text of a token as the vocabulary spells it.
    pub fn piece(&self, id: u32) -> Option<String> {
        match self {
            Tokenizer::Sp(t) => t.piece(id).map(str::to_string),
            Tokenizer::Hf(t) => t.inner.id_to_token(id),
        }
    }
}

/// A tokenizer built from a SentencePiece model.
#[derive(Clone)]
pub struct SpTokenizer {
    model: SpModel,
    ids: HashMap<String, u32>,
    /// User-defined pieces, longest first (matched greedily in the input).
    user_defined: Vec<String>,
    bytes: [Option<u32>; 256],
}

#[derive(Debug, PartialEq)]
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    text_len: usize,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, o: &Self) -> Ordering {
        // Highest score first; on ties the leftmost pair.
        self.score
            .partial_cmp(&o.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl SpTokenizer {
    pub fn new(model: SpModel) -> SpTokenizer {
        let mut ids = HashMap::new();
        let mut user_defined = Vec::new();
        let mut bytes = [None; 256];
        for (i, p) in model.pieces.iter().enumerate() {
            ids.entry(p.piece.clone()).or_insert(i as u32);
            if p.kind == PieceType::UserDefined {
                user_defined.push(p.piece.clone());
            }
            if p.kind == PieceType::Byte {
                if let Some(b) = p
                    .piece
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    bytes[b as usize] = Some(i as u32);
                }
            }
        }
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        SpTokenizer {
            model,
            ids,
            user_defined,
            bytes,
        }
    }

    /// The model it was built from.
    pub fn model(&self) -> &SpModel {
        &self.model
    }

    fn normalise(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 3);
        let text = if self.model.remove_extra_whitespaces {
            collapse_spaces(text)
        } else {
            text.to_string()
        };
        if text.is_empty() {
            return out;
        }
        if self.model.add_dummy_prefix {
            out.push(SPACE);
        }
        for c in text.chars() {
            out.push(if c == ' ' && self.model.escape_whitespaces {
                SPACE
            } else {
                c
            });
        }
        out
    }

    /// Encodes `text` to ids (no BOS/EOS).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let norm = self.normalise(text);
        // Initial symbols: characters, with user-defined pieces whole.
        let mut symbols: Vec<String> = Vec::new();
        let mut rest = norm.as_str();
        while !rest.is_empty() {
            if let Some(u) = self
                .user_defined
                .iter()
                .find(|u| rest.starts_with(u.as_str()))
            {
                symbols.push(u.clone());
                rest = &rest[u.len()..];
                continue;
            }
            let c = rest.chars().next().expect("non-empty");
            symbols.push(c.to_string());
            rest = &rest[c.len_utf8()..];
        }
        let n = symbols.len();
        let fixed: Vec<bool> = symbols
            .iter()
            .map(|s| self.user_defined.iter().any(|u| u == s))
            .collect();
        let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
        let mut next: Vec<Option<usize>> = (0..n).map(|i| (i + 1 < n).then_some(i + 1)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Candidate>, symbols: &[String], l: usize, r: usize| {
            if fixed[l] || fixed[r] {
                return;
            }
            let merged = format!("{}{}", symbols[l], symbols[r]);
            if let Some(&id) = self.ids.get(&merged) {
                let p = &self.model.pieces[id as usize];
                if matches!(p.kind, PieceType::Normal | PieceType::UserDefined) {
                    heap.push(Candidate {
                        score: p.score,
                        left: l,
                        right: r,
                        text_len: merged.len(),
                    });
                }
            }
        };
        for i in 0..n.saturating_sub(1) {
            push(&mut heap, &symbols, i, i + 1);
        }
        while let Some(c) = heap.pop() {
            // Stale candidates: a side was merged away or changed since it was pushed.
            if !alive[c.left]
                || !alive[c.right]
                || next[c.left] != Some(c.right)
                || symbols[c.left].len() + symbols[c.right].len() != c.text_len
            {
                continue;
            }
            let right = std::mem::take(&mut symbols[c.right]);
            symbols[c.left].push_str(&right);
            alive[c.right] = false;
            next[c.left] = next[c.right];
            if let Some(nx) = next[c.right] {
                prev[nx] = Some(c.left);
            }
            if let Some(p) = prev[c.left] {
                push(&mut heap, &symbols, p, c.left);
            }
            if let Some(nx) = next[c.left] {
                push(&mut heap, &symbols, c.left, nx);
            }
        }
        let mut out = Vec::new();
        let mut i = Some(0).filter(|_| n > 0);
        while let Some(k) = i {
            let s = &symbols[k];
            match self.ids.get(s) {
                Some(&id) if self.model.pieces[id as usize].kind != PieceType::Unused => {
                    out.push(id)
                }
                _ if self.model.byte_fallback => {
                    for b in s.bytes() {
                        out.push(self.bytes[b as usize].unwrap_or(self.model.unk_id as u32));
                    }
                }
                _ => out.push(self.model.unk_id as u32),
            }
            i = next[k];
        }
        out
    }

    /// Decodes ids to text as SentencePiece does: control pieces vanish, byte pieces are
    /// gathered into UTF-8, `▁` becomes a space and the dummy prefix is dropped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes: Vec<u8> = Vec::new();
        let mut first = true;
        for &id in ids {
            let Some(p) = self.model.pieces.get(id as usize) else {
                continue;
            };
            match p.kind {
                PieceType::Control => continue,
                PieceType::Byte => {
                    if let Some(b) = p
                        .piece
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        bytes.push(b);
                    }
                }
                PieceType::Unknown => bytes.extend_from_slice(" \u{2047} ".as_bytes()),
                _ => {
                    let mut s = p.piece.replace(SPACE, " ");
                    if first && self.model.add_dummy_prefix && s.starts_with(' ') {
                        s.remove(0);
                    }
                    bytes.extend_from_slice(s.as_bytes());
                }
            }
            first = false;
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The text of a piece.
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.model.pieces.get(id as usize).map(|p| p.piece.as_str())
    }
}

fn collapse_spaces(s: &str) -> String {
    s.split(' ')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
