//! The model's own thread: it takes jobs from a bounded queue, one generation at a time,
//! and answers each on its channel (whole, or token by token for streams).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use crate::runtime::generate::{generate, GenOptions, Generation, Stop};
use crate::runtime::load::Model;

/// One generation to run.
#[derive(Debug, Clone)]
pub struct GenJob {
    pub ids: Vec<u32>,
    pub opts: GenOptions,
    /// Keep the log-probability of each generated token (and, with `full`, every
    /// token's at each step).
    pub logprobs: bool,
    pub full: bool,
}

/// A finished generation, with what the APIs report.
#[derive(Debug, Clone)]
pub struct GenOut {
    pub g: Generation,
    /// The completion as decoded, the end string that stopped it included.
    pub text_with_end: String,
    /// log p of each generated token.
    pub logprobs: Vec<f32>,
    /// With `full`: log p of every token at each step.
    pub full: Vec<Vec<f32>>,
}

/// What a stream receives.
#[derive(Debug)]
pub enum StreamMsg {
    Delta(String),
    Done(Box<Result<GenOut, String>>),
}

/// Where the answer goes.
pub enum Reply {
    Whole(tokio::sync::oneshot::Sender<Vec<Result<GenOut, String>>>),
    /// The flag is set by the receiving side when its client went away.
    Stream(
        tokio::sync::mpsc::UnboundedSender<StreamMsg>,
        Arc<AtomicBool>,
    ),
}

/// A request's generations and where to answer.
pub struct Job {
    pub gens: Vec<GenJob>,
    pub enqueued: Instant,
    pub reply: Reply,
    /// Set by the worker: seconds the job waited in the queue.
    pub wait: std::sync::Arc<std::sync::Mutex<f64>>,
}

fn log_softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    v.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// Runs one generation; `emit` gets the text as it becomes final. Generation stops early
/// once `gone()` says the client went away (checked as text is emitted).
pub fn run_one(
    model: &Model,
    job: &GenJob,
    emit: &mut dyn FnMut(&str),
    gone: &dyn Fn() -> bool,
) -> Result<GenOut, String> {
    let mut opts = job.opts.clone();
    opts.keep_logits = job.logprobs || job.full;
    let cancel = Arc::new(AtomicBool::new(gone()));
    opts.cancel = Some(cancel.clone());
    let mut watch = |s: &str| {
        emit(s);
        if gone() {
            cancel.store(true, Ordering::Relaxed);
        }
    };
    let g = generate(model, &job.ids, &opts, &mut watch).map_err(|e| e.to_string())?;
    let mut logprobs = Vec::new();
    let mut full = Vec::new();
    for (l, &id) in g.step_logits.iter().zip(&g.ids) {
        let ls = log_softmax(l);
        logprobs.push(ls.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY));
        if job.full {
            full.push(ls);
        }
    }
    let text_with_end = match &g.stop {
        Stop::EndString(s) => format!("{}{s}", g.text),
        _ => g.text.clone(),
    };
    let mut g = g;
    g.step_logits = Vec::new();
    Ok(GenOut {
        g,
        text_with_end,
        logprobs,
        full,
    })
}

/// The worker loop: runs until every sender of `jobs` is gone.
pub fn serve_jobs(model: &Model, jobs: mpsc::Receiver<Job>) {
    for job in jobs {
        *job.wait.lock().expect("not poisoned") = job.enqueued.elapsed().as_secs_f64();
        match job.reply {
            Reply::Whole(tx) => {
                let outs = job
                    .gens
                    .iter()
                    .map(|j| run_one(model, j, &mut |_| {}, &|| tx.is_closed()))
                    .collect();
                let _ = tx.send(outs);
            }
            Reply::Stream(tx, gone) => {
                for j in &job.gens {
                    let out = run_one(
                        model,
                        j,
                        &mut |s| {
                            let _ = tx.send(StreamMsg::Delta(s.to_string()));
                        },
                        &|| tx.is_closed() || gone.load(Ordering::Relaxed),
                    );
                    let _ = tx.send(StreamMsg::Done(Box::new(out)));
                }
            }
        }
    }
}
