//! Tokenizers that are not SentencePiece, through the `tokenizers` crate (the library
//! `transformers` itself uses): a Hugging Face `tokenizer.json` (Llama 3, NeMo 2.0's
//! `AutoTokenizer`), or GPT-2 BPE `vocab.json` + `merges.txt` (NeMo's `megatron`
//! `GPT2BPETokenizer`), which is restated as the `tokenizer.json` transformers builds for
//! GPT-2 (byte-level pre-tokenizer, post-processor and decoder; `<|endoftext|>` special).
//!
//! [`TokenizerModel`] is what a checkpoint carries: this or a SentencePiece model.

use std::str::FromStr;

use serde_json::{json, Value};

use crate::nemo::tokenizer::SpModel;

/// A tokenizer read by the `tokenizers` crate, with what the conversion needs to know.
#[derive(Clone)]
pub struct HfTokenizer {
    /// The `tokenizer.json` text (for GPT-2 BPE files, the one built from them).
    pub json: String,
    /// Boxed: the crate's tokenizer is large, and the enums holding this stay small.
    pub inner: Box<tokenizers::Tokenizer>,
    /// `tokenizer.json` or `gpt2-bpe`.
    pub kind: &'static str,
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    /// The BOS its post-processor puts before a text (Llama 3's), if any.
    pub adds_bos: Option<u32>,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HfTokenizer({}, {} tokens)",
            self.kind,
            self.vocab_size()
        )
    }
}

const GPT2_EOT: &str = "<|endoftext|>";

impl HfTokenizer {
    /// Reads a `tokenizer.json`; `config` is the `tokenizer_config.json` beside it, which
    /// names the BOS and EOS tokens.
    pub fn from_json(json: &[u8], config: Option<&[u8]>) -> Result<HfTokenizer, String> {
        let text =
            std::str::from_utf8(json).map_err(|_| "tokenizer.json is not UTF-8".to_string())?;
        let inner =
            tokenizers::Tokenizer::from_str(text).map_err(|e| format!("tokenizer.json: {e}"))?;
        let cfg: Value = match config {
            Some(c) => {
                serde_json::from_slice(c).map_err(|e| format!("tokenizer_config.json: {e}"))?
            }
            None => Value::Null,
        };
        let named = |k: &str| -> Option<(u32, String)> {
            let v = &cfg[k];
            let s = v.as_str().or(v["content"].as_str())?;
            Some((inner.token_to_id(s)?, s.to_string()))
        };
        let (bos, eos) = (named("bos_token"), named("eos_token"));
        Ok(Self::finish(
            text.to_string(),
            inner,
            "tokenizer.json",
            bos,
            eos,
        ))
    }

    /// Builds GPT-2's tokenizer from `vocab.json` and `merges.txt`.
    pub fn from_gpt2_files(vocab: &[u8], merges: &[u8]) -> Result<HfTokenizer, String> {
        let vocab: Value = serde_json::from_slice(vocab).map_err(|e| format!("vocab.json: {e}"))?;
        if !vocab.is_object() {
            return Err("vocab.json is not an object of token ids".into());
        }
        let merges =
            std::str::from_utf8(merges).map_err(|_| "merges.txt is not UTF-8".to_string())?;
        let merges: Vec<&str> = merges
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let mut added = Vec::new();
        if let Some(id) = vocab[GPT2_EOT].as_u64() {
            added.push(json!({"id": id, "content": GPT2_EOT, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
        }
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": byte_level,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let text = serde_json::to_string_pretty(&doc).expect("JSON");
        let inner = tokenizers::Tokenizer::from_str(&text)
            .map_err(|e| format!("vocab.json + merges.txt: {e}"))?;
        // NeMo's GPT-2 tokenizer: `<|endoftext|>` is both BOS and EOS.
        let eot = inner
            .token_to_id(GPT2_EOT)
            .map(|i| (i, GPT2_EOT.to_string()));
        Ok(Self::finish(text, inner, "gpt2-bpe", eot.clone(), eot))
    }

    fn finish(
        json: String,
        inner: tokenizers::Tokenizer,
        kind: &'static str,
        bos: Option<(u32, String)>,
        eos: Option<(u32, String)>,
    ) -> HfTokenizer {
        let with = inner
            .encode("a", true)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default();
        let without = inner
            .encode("a", false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default();
        let adds_bos =
            (with.len() == without.len() + 1 && with[1..] == without[..]).then(|| with[0]);
        HfTokenizer {
            json,
            inner: Box::new(inner),
            kind,
            bos,
            eos,
            adds_bos,
        }
    }

    /// Tokens, added ones included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// The tokenizer a checkpoint carries.
#[derive(Debug, Clone)]
pub enum TokenizerModel {
    SentencePiece(SpModel),
    Hf(HfTokenizer),
}

impl From<SpModel> for TokenizerModel {
    fn from(m: SpModel) -> Self {
        TokenizerModel::SentencePiece(m)
    }
}

impl TokenizerModel {
    pub fn vocab_size(&self) -> usize {
        match self {
            TokenizerModel::SentencePiece(m) => m.vocab_size(),
            TokenizerModel::Hf(t) => t.vocab_size(),
        }
    }

    /// The SentencePiece model, when it is one.
    pub fn sp(&self) -> Option<&SpModel> {
        match self {
            TokenizerModel::SentencePiece(m) => Some(m),
            TokenizerModel::Hf(_) => None,
        }
    }

    /// BOS and EOS ids (in the vocabulary), if the tokenizer has them.
    pub fn bos_eos(&self) -> (Option<u32>, Option<u32>) {
        match self {
            TokenizerModel::SentencePiece(m) => {
                let id = |i: i64| (i >= 0 && (i as usize) < m.pieces.len()).then_some(i as u32);
                (id(m.bos_id), id(m.eos_id))
            }
            TokenizerModel::Hf(t) => (t.bos.as_ref().map(|b| b.0), t.eos.as_ref().map(|e| e.0)),
        }
    }

    /// `<extra_id_N>` markers that are single tokens, with their ids.
    pub fn extra_id_pieces(&self) -> Vec<(String, usize)> {
        match self {
            TokenizerModel::SentencePiece(m) => m.extra_id_pieces(),
            TokenizerModel::Hf(t) => (0..100)
                .map(|n| format!("<extra_id_{n}>"))
                .filter_map(|p| t.inner.token_to_id(&p).map(|i| (p, i as usize)))
                .collect(),
        }
    }

    /// The token `id` as the vocabulary spells it.
    pub fn token(&self, id: i64) -> Option<String> {
        match self {
            TokenizerModel::SentencePiece(m) => m.piece(id).map(str::to_string),
            TokenizerModel::Hf(t) => u32::try_from(id).ok().and_then(|i| t.inner.id_to_token(i)),
        }
    }

    /// `sentencepiece` kinds (`bpe`, `unigram`), `tokenizer.json` or `gpt2-bpe`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            TokenizerModel::SentencePiece(m) => m.model_type_name(),
            TokenizerModel::Hf(t) => t.kind,
        }
    }
}
