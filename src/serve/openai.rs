//! The OpenAI-compatible API: `POST /v1/completions`, `POST /v1/chat/completions` (with
//! `stream: true` as server-sent events) and `GET /v1/models`.
//!
//! Chat messages are rendered with the SteerLM template: a `system` message replaces the
//! card's system text, earlier user/assistant turns follow NeMo's chat format, and the
//! SteerLM attributes come from the extra field `steerlm_attributes` (an object; the
//! card's values by default). Generation stops at the card's end strings and at `stop`;
//! neither is part of the returned text.

use serde_json::{json, Map, Value};

use crate::runtime::generate::{GenOptions, Stop};
use crate::runtime::sample::Sampling;
use crate::runtime::steerlm::{self, Attributes};
use crate::serve::worker::{GenJob, GenOut};
use crate::serve::{field, Info};

/// Which endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct Request {
    pub kind: Kind,
    pub model: String,
    pub jobs: Vec<GenJob>,
    pub stream: bool,
    /// Completions: log-probabilities wanted (`logprobs` ≥ 0). Chat: `logprobs: true`.
    pub logprobs: bool,
}

fn chat_prompt(o: &Map<String, Value>) -> Result<String, String> {
    let msgs = o
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or("`messages` must be a non-empty list")?;
    let mut system = steerlm::DEFAULT_SYSTEM.to_string();
    let mut turns: Vec<(String, String)> = Vec::new();
    let mut pending: Option<String> = None;
    for (i, m) in msgs.iter().enumerate() {
        let role = m["role"]
            .as_str()
            .ok_or(format!("messages[{i}].role must be a string"))?;
        let content = match &m["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .map(|p| p["text"].as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or(format!("messages[{i}].content parts must be text"))?
                .concat(),
            _ => return Err(format!("messages[{i}].content must be a string")),
        };
        match (role, &pending) {
            ("system" | "developer", _) if i == 0 => system = content,
            ("user", None) => pending = Some(content),
            ("assistant", Some(u)) => {
                turns.push((u.clone(), content));
                pending = None;
            }
            _ => {
                return Err(format!(
                    "messages[{i}]: role `{role}` out of order (a system message first, then user and assistant turns, ending with a user turn)"
                ))
            }
        }
    }
    let user = pending.ok_or("the last message must be the user's")?;
    let attrs = match o.get("steerlm_attributes") {
        None | Some(Value::Null) => Attributes::default(),
        Some(Value::Object(a)) => {
            let items: Vec<String> = a
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => format!("{k}={s}"),
                    other => format!("{k}={other}"),
                })
                .collect();
            Attributes::with_overrides(&items).map_err(|e| format!("`steerlm_attributes`: {e}"))?
        }
        Some(_) => return Err("`steerlm_attributes` must be an object of name → value".into()),
    };
    Ok(steerlm::chat(&system, &turns, &user, &attrs))
}

/// Reads and checks a completion or chat request.
pub fn parse(kind: Kind, v: &Value, info: &Info) -> Result<Request, String> {
    let o = v.as_object().ok_or("the body must be a JSON object")?;
    let (prompts, ends, default_max) = match kind {
        Kind::Completion => {
            let p = o
                .get("prompt")
                .and_then(field::strings)
                .filter(|p| !p.is_empty())
                .ok_or("`prompt` must be a string or a list of strings")?;
            (p, Vec::new(), 16)
        }
        Kind::Chat => {
            let ends = steerlm::END_STRINGS.iter().map(|s| s.to_string()).collect();
            (vec![chat_prompt(o)?], ends, 256)
        }
    };
    let max_key = if o.contains_key("max_completion_tokens") {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = field::int(o, max_key, default_max, 1, u32::MAX as u64)? as usize;
    let temperature = field::num(
        o,
        "temperature",
        1.0,
        |x| (0.0..=2.0).contains(&x),
        "in [0, 2]",
    )?;
    let top_p = field::num(o, "top_p", 1.0, |x| x > 0.0 && x <= 1.0, "in (0, 1]")?;
    let seed = match o.get("seed") {
        None | Some(Value::Null) => field::clock_seed(),
        Some(v) => v.as_u64().ok_or("`seed` must be an integer ≥ 0")?,
    };
    let mut ends = ends;
    match o.get("stop") {
        None | Some(Value::Null) => {}
        Some(v) => {
            ends.extend(field::strings(v).ok_or("`stop` must be a string or a list of strings")?)
        }
    }
    let logprobs = match (kind, o.get("logprobs")) {
        (_, None | Some(Value::Null)) => false,
        (Kind::Chat, Some(Value::Bool(b))) => *b,
        (Kind::Completion, Some(v)) if v.as_u64().is_some_and(|n| n <= 5) => true,
        _ => {
            return Err(
                "`logprobs` must be true/false (chat) or an integer 0 to 5 (completions)".into(),
            )
        }
    };
    let stream = field::boolean(o, "stream", false)?;
    let sampling = Sampling {
        temperature,
        top_p,
        seed,
        ..Sampling::default()
    };
    let mut jobs = Vec::new();
    for p in prompts {
        let ids = info.prompt_ids(&p, info.bos.is_some())?;
        jobs.push(GenJob {
            ids,
            opts: GenOptions {
                max_tokens,
                end_strings: ends.clone(),
                sampling,
                ..GenOptions::default()
            },
            logprobs,
            full: false,
        });
    }
    if stream && jobs.len() > 1 {
        return Err("`stream` takes one prompt".into());
    }
    Ok(Request {
        kind,
        model: o
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(&info.name)
            .to_string(),
        jobs,
        stream,
        logprobs,
    })
}

/// `stop` or `length`, as OpenAI names why a choice ended.
pub fn finish_reason(s: &Stop) -> &'static str {
    match s {
        Stop::Eos | Stop::EndString(_) => "stop",
        Stop::MaxTokens | Stop::Context | Stop::Cancelled => "length",
    }
}

fn usage(req: &Request, outs: &[GenOut]) -> Value {
    let p: usize = req.jobs.iter().map(|j| j.ids.len()).sum();
    let c: usize = outs.iter().map(|o| o.g.ids.len()).sum();
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

fn logprobs_of(req: &Request, o: &GenOut, info: &Info) -> Value {
    if !req.logprobs {
        return Value::Null;
    }
    let mut seq = o.g.prompt_ids.clone();
    seq.extend(&o.g.ids);
    let pieces = info.tokenizer.token_texts(&seq, o.g.prompt_ids.len());
    match req.kind {
        Kind::Chat => json!({"content": pieces.iter().zip(&o.logprobs).map(|(t, l)| json!({
            "token": t, "logprob": l, "bytes": t.as_bytes(), "top_logprobs": []
        })).collect::<Vec<_>>()}),
        Kind::Completion => {
            let mut at = 0;
            let offsets: Vec<usize> = pieces
                .iter()
                .map(|t| {
                    let o = at;
                    at += t.len();
                    o
                })
                .collect();
            json!({"tokens": pieces, "token_logprobs": o.logprobs, "top_logprobs": null, "text_offset": offsets})
        }
    }
}

/// The whole (non-streamed) response.
pub fn response(req: &Request, outs: &[GenOut], id: &str, created: u64, info: &Info) -> Value {
    let choices: Vec<Value> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| match req.kind {
            Kind::Completion => json!({
                "text": o.g.text, "index": i, "logprobs": logprobs_of(req, o, info),
                "finish_reason": finish_reason(&o.g.stop),
            }),
            Kind::Chat => json!({
                "index": i,
                "message": {"role": "assistant", "content": o.g.text},
                "logprobs": logprobs_of(req, o, info),
                "finish_reason": finish_reason(&o.g.stop),
            }),
        })
        .collect();
    json!({
        "id": id,
        "object": if req.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": req.model,
        "choices": choices,
        "usage": usage(req, outs),
    })
}

/// One streamed chunk: a text delta, or the last chunk with the finish reason.
pub fn chunk(
    req: &Request,
    id: &str,
    created: u64,
    delta: Option<&str>,
    finish: Option<&str>,
) -> Value {
    let choice = match req.kind {
        Kind::Completion => json!({
            "text": delta.unwrap_or(""), "index": 0, "logprobs": null, "finish_reason": finish,
        }),
        Kind::Chat => {
            let d = match delta {
                Some(t) => json!({"role": "assistant", "content": t}),
                None => json!({}),
            };
            json!({"index": 0, "delta": d, "logprobs": null, "finish_reason": finish})
        }
    };
    json!({
        "id": id,
        "object": if req.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": created,
        "model": req.model,
        "choices": [choice],
    })
}
