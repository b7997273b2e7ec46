//! Greedy generation with streaming output and NeMo-style end strings.

use std::time::Instant;

use crate::runtime::load::Model;
use crate::runtime::sample::{Sampler, Sampling};
use crate::runtime::steerlm;

/// What stops generation, besides the token budget.
#[derive(Debug, Clone, Default)]
pub struct GenOptions {
    pub max_tokens: usize,
    pub ignore_eos: bool,
    /// Checked on the decoded completion after each token.
    pub end_strings: Vec<String>,
    /// Keep the logits each generated token was picked from (`Generation::step_logits`).
    pub keep_logits: bool,
    /// How each token is chosen (default greedy).
    pub sampling: Sampling,
    /// EOS cannot be picked before this many tokens (its logit is taken as −∞).
    pub min_tokens: usize,
    /// Checked before each forward pass: once set, generation stops (`Stop::Cancelled`).
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// Why generation stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    MaxTokens,
    Eos,
    EndString(String),
    /// The model's context is full.
    Context,
    /// The caller stopped it (`GenOptions::cancel`): its client went away.
    Cancelled,
}

impl Stop {
    /// One of `max_tokens`, `eos`, `end_string`, `context`.
    pub fn kind(&self) -> &'static str {
        match self {
            Stop::MaxTokens => "max_tokens",
            Stop::Eos => "eos",
            Stop::EndString(_) => "end_string",
            Stop::Context => "context",
            Stop::Cancelled => "cancelled",
        }
    }

    /// The end string that stopped generation.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Stop::EndString(s) => Some(s),
            _ => None,
        }
    }
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    /// The completion, without the end string that stopped it.
    pub text: String,
    pub stop: Stop,
    /// Logits of the prompt's last position.
    pub prompt_logits: Vec<f32>,
    /// With `keep_logits`: the logits each of `ids` was picked from, in order.
    pub step_logits: Vec<Vec<f32>>,
    pub prompt_secs: f64,
    /// Seconds spent mapping the weights' pages before the prompt (the first run on the
    /// CPU only; `Model::map_weights`).
    pub map_secs: f64,
    /// Single-token forward passes and the time they took.
    pub decode_steps: usize,
    pub decode_secs: f64,
}

/// The completion's text: the whole sequence decoded, less the prompt's own decoding (as
/// NeMo's clients cut `sentences[0][len(prompt):]`), so that a leading space survives.
fn completion(model: &Model, prompt_text: &str, all: &[u32], n_prompt: usize) -> String {
    let full = model.tokenizer.decode(all);
    match full.strip_prefix(prompt_text) {
        Some(rest) => rest.to_string(),
        None => model.tokenizer.decode(&all[n_prompt..]),
    }
}

/// Runs decoding (greedy unless `opts.sampling` says otherwise) from `prompt_ids`; `emit` receives the completion's text as it
/// becomes final (never text that might still turn out to be part of an end string).
pub fn generate(
    model: &Model,
    prompt_ids: &[u32],
    opts: &GenOptions,
    emit: &mut dyn FnMut(&str),
) -> crate::Result<Generation> {
    model.check_ids(prompt_ids)?;
    let w = &model.weights;
    let ends: Vec<&str> = opts.end_strings.iter().map(String::as_str).collect();
    // Room for the whole run: decoding then never grows the cache.
    let map_secs = match model.backend {
        crate::runtime::backend::Backend::Cpu => model.map_weights(),
        #[cfg(feature = "cuda")]
        _ => 0.0,
    };
    let mut session = model.session(prompt_ids.len() + opts.max_tokens)?;
    let t0 = Instant::now();
    let mut prompt_logits = vec![0f32; w.dims.vocab];
    session.forward_into(prompt_ids, &mut prompt_logits)?;
    let prompt_secs = t0.elapsed().as_secs_f64();
    let prompt_text = model.tokenizer.decode(prompt_ids);
    let mut all = prompt_ids.to_vec();
    let mut logits = prompt_logits.clone();
    let mut shown = 0usize;
    let mut text = String::new();
    let mut steps = 0usize;
    let mut step_logits = Vec::new();
    let mut sampler = Sampler::new(opts.sampling);
    let t1 = Instant::now();
    // One rule: prompt and completion together never exceed the context.
    let stop = loop {
        if all.len() - prompt_ids.len() >= opts.max_tokens {
            break Stop::MaxTokens;
        }
        if all.len() >= w.dims.max_positions {
            break Stop::Context;
        }
        let generated = all.len() - prompt_ids.len();
        if generated < opts.min_tokens {
            if let Some(e) = model.eos.and_then(|e| logits.get_mut(e as usize)) {
                *e = f32::NEG_INFINITY;
            }
        }
        let history = if opts.sampling.penalize_prompt {
            &all[..]
        } else {
            &all[prompt_ids.len()..]
        };
        let next = sampler.pick(&logits, history);
        if opts.keep_logits {
            step_logits.push(logits.clone());
        }
        all.push(next);
        if !opts.ignore_eos && Some(next) == model.eos {
            // EOS is kept in the ids, as an end string's tokens are; it has no text.
            break Stop::Eos;
        }
        text = completion(model, &prompt_text, &all, prompt_ids.len());
        if let Some((at, i)) = steerlm::find_end(&text, &ends) {
            text.truncate(at);
            if text.len() > shown {
                emit(&text[shown..]);
            }
            break Stop::EndString(ends[i].to_string());
        }
        let safe = steerlm::safe_prefix(&text, &ends);
        if safe > shown {
            emit(&text[shown..safe]);
            shown = safe;
        }
        if all.len() - prompt_ids.len() >= opts.max_tokens {
            break Stop::MaxTokens;
        }
        if all.len() >= w.dims.max_positions {
            break Stop::Context;
        }
        if opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        {
            break Stop::Cancelled;
        }
        session.forward_into(&[next], &mut logits)?;
        steps += 1;
    };
    if !matches!(stop, Stop::EndString(_)) && text.len() > shown {
        emit(&text[shown..]);
    }
    Ok(Generation {
        prompt_ids: prompt_ids.to_vec(),
        ids: all[prompt_ids.len()..].to_vec(),
        text,
        stop,
        prompt_logits,
        step_logits,
        prompt_secs,
        map_secs,
        decode_steps: steps,
        decode_secs: t1.elapsed().as_secs_f64(),
    })
}
