//! NeMo's text-generation API (`PUT /generate`, `megatron_gpt_eval.py server=True`): the
//! request fields and defaults of `nemo-format.md` §7, and its response.
//!
//! Differences from NeMo, on purpose: a bad request gets HTTP 400 with a JSON error (NeMo
//! answers 200 with an error string); `logprob` covers the generated tokens only (NeMo's
//! also covers the prompt's); the stop rule is the end string anywhere in the completion
//! or EOS (NeMo's extra rule, stopping at the first token of an end string's encoding, is
//! not applied).

use serde_json::{json, Value};

use crate::runtime::generate::GenOptions;
use crate::runtime::sample::Sampling;
use crate::runtime::tokenizer::Tokenizer;
use crate::serve::worker::{GenJob, GenOut};
use crate::serve::{field, Info};

/// The most sentences in one request, as NeMo allows.
pub const MAX_SENTENCES: usize = 128;

/// The most values `full_logprob` may hold (64 MB as f32).
pub const MAX_FULL_LOGPROBS: u64 = 16 << 20;

/// A checked request.
#[derive(Debug, Clone)]
pub struct Request {
    pub sentences: Vec<String>,
    pub jobs: Vec<GenJob>,
    pub all_probs: bool,
    pub compute_logprob: bool,
}

/// Reads and checks a request body (already JSON) against NeMo's fields and ranges.
pub fn parse(v: &Value, info: &Info) -> Result<Request, String> {
    let obj = v.as_object().ok_or("the body must be a JSON object")?;
    let sentences: Vec<String> = match obj.get("sentences") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or("`sentences` must be a list of strings")?,
        Some(_) => return Err("`sentences` must be a list of strings".into()),
        None => return Err("`sentences` is required".into()),
    };
    if sentences.is_empty() || sentences.len() > MAX_SENTENCES {
        return Err(format!(
            "`sentences` must hold 1 to {MAX_SENTENCES} strings, not {}",
            sentences.len()
        ));
    }
    let tokens = field::int(obj, "tokens_to_generate", 64, 1, u32::MAX as u64)? as usize;
    let temperature = field::num(
        obj,
        "temperature",
        1.0,
        |x| x > 0.0 && x <= 100.0,
        "in (0, 100]",
    )?;
    let add_bos = field::boolean(obj, "add_BOS", false)?;
    let top_k = field::int(obj, "top_k", 0, 0, u32::MAX as u64)? as usize;
    let top_p = field::num(obj, "top_p", 0.9, |x| (0.0..=1.0).contains(&x), "in [0, 1]")?;
    let greedy = field::boolean(obj, "greedy", false)?;
    let all_probs = field::boolean(obj, "all_probs", false)?;
    let penalty = field::num(
        obj,
        "repetition_penalty",
        1.2,
        |x| x >= 1.0 && x.is_finite(),
        "≥ 1",
    )?;
    let min_tokens = field::int(obj, "min_tokens_to_generate", 0, 0, u32::MAX as u64)? as usize;
    let end_strings = match obj.get("end_strings") {
        None | Some(Value::Null) => vec!["<|endoftext|>".to_string()],
        Some(v) => field::strings(v).ok_or("`end_strings` must be a list of strings")?,
    };
    let compute_logprob = field::boolean(obj, "compute_logprob", false)?;
    // `full_logprob` holds every token's log-probability at every step: bounded, so that
    // one request cannot exhaust the server's memory.
    let steps = tokens.min(info.max_positions);
    let floats = sentences.len() as u64 * steps as u64 * info.vocab as u64;
    if all_probs && floats > MAX_FULL_LOGPROBS {
        return Err(format!(
            "`all_probs` would return {floats} log-probabilities ({} sentences × {steps} steps × {} tokens; at most {MAX_FULL_LOGPROBS}): ask for fewer sentences or tokens",
            sentences.len(),
            info.vocab
        ));
    }
    let seed = match obj.get("random_seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or("`random_seed` must be an integer ≥ 0 or null")?,
        ),
    };
    // NeMo: greedy is argmax (no penalty); otherwise temperature, penalty over the
    // generated tokens, top-k, top-p (0 = no nucleus cut).
    let sampling = if greedy {
        Sampling::default()
    } else {
        Sampling {
            temperature,
            top_k,
            top_p: if top_p == 0.0 { 1.0 } else { top_p },
            repetition_penalty: penalty,
            seed: seed.unwrap_or_else(field::clock_seed),
            penalize_prompt: false,
        }
    };
    let mut jobs = Vec::new();
    for s in &sentences {
        let ids = info
            .prompt_ids(s, add_bos)
            .map_err(|e| format!("`sentences`: {e}"))?;
        jobs.push(GenJob {
            ids,
            opts: GenOptions {
                max_tokens: tokens,
                ignore_eos: false,
                end_strings: end_strings.clone(),
                keep_logits: false,
                sampling,
                min_tokens,
                cancel: None,
            },
            logprobs: compute_logprob || all_probs,
            full: all_probs,
        });
    }
    Ok(Request {
        sentences,
        jobs,
        all_probs,
        compute_logprob,
    })
}

/// Character offsets of each token of `ids` in their decoded text.
fn offsets(tok: &Tokenizer, ids: &[u32]) -> Vec<usize> {
    let mut at = 0;
    tok.token_texts(ids, 0)
        .iter()
        .map(|t| {
            let o = at;
            at += t.chars().count();
            o
        })
        .collect()
}

/// NeMo's response: `sentences` (prompt + completion, end string kept), `tokens`,
/// `token_ids`, `logprob`, `offsets`, and `full_logprob` with `all_probs`.
pub fn response(req: &Request, outs: &[GenOut], tok: &Tokenizer) -> Value {
    let mut sentences = Vec::new();
    let mut tokens = Vec::new();
    let mut token_ids = Vec::new();
    let mut offs = Vec::new();
    let mut logprob = Vec::new();
    let mut full = Vec::new();
    for ((s, j), o) in req.sentences.iter().zip(&req.jobs).zip(outs) {
        let mut all = j.ids.clone();
        all.extend(&o.g.ids);
        sentences.push(format!("{s}{}", o.text_with_end));
        tokens.push(
            all.iter()
                .map(|&i| tok.piece(i).unwrap_or_default())
                .collect::<Vec<_>>(),
        );
        offs.push(offsets(tok, &all));
        token_ids.push(all);
        logprob.push(o.logprobs.clone());
        full.push(o.full.clone());
    }
    let mut v = json!({
        "sentences": sentences,
        "tokens": tokens,
        "token_ids": token_ids,
        "logprob": if req.compute_logprob || req.all_probs { json!(logprob) } else { Value::Null },
        "offsets": offs,
    });
    if req.all_probs {
        v["full_logprob"] = json!(full);
    }
    v
}
