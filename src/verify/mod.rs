//! `verify`: is a converted model the same model? Integrity (stored checksums),
//! configuration, tokenizer, every tensor by the rule that produced it, and behaviour
//! (greedy generation, teacher-forced logits). Without a reference: a self-check.

pub mod behaviour;
pub mod meta;
pub mod prompts;
pub mod report;
pub mod structure;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::container::mapped::OpenOptions;
use crate::error::Result;
use crate::model::View;
use crate::runtime::load::Model;
use crate::runtime::tokenizer::Tokenizer;
use behaviour::{PromptCheck, RefRun, Thresholds};
use prompts::Prompt;
use structure::{Structure, TensorCheck};

/// What to check and how strictly.
#[derive(Debug, Clone)]
pub struct Options {
    pub prompts: Vec<Prompt>,
    /// Tokens generated per prompt (0: no behaviour check).
    pub tokens: usize,
    /// Overrides of the class defaults ([`default_thresholds`]).
    pub max_logit_diff: Option<f64>,
    pub max_kl: Option<f64>,
    pub min_top1: Option<f64>,
    pub open: OpenOptions,
    /// Where both models run (`--device`).
    pub device: crate::runtime::backend::DeviceChoice,
}

/// One row of the summary table.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `integrity`, `config`, `tokenizer`, `layout`, `tensors`, `finite`, `generation`.
    pub check: &'static str,
    /// What it was run on: a side, a tensor count, a prompt.
    pub subject: String,
    pub figures: String,
    pub pass: bool,
    pub detail: Option<String>,
}

/// Where the time went, in seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    pub open_s: f64,
    pub integrity_s: f64,
    pub integrity_bytes: u64,
    pub hashing_s: f64,
    pub hashed_bytes: u64,
    pub hash_bytes_per_s: f64,
    pub reference_load_s: f64,
    pub reference_prefill_s: f64,
    pub reference_decode_s: f64,
    pub candidate_load_s: f64,
    pub candidate_prefill_s: f64,
    pub candidate_decode_s: f64,
    pub total_s: f64,
    pub threads: usize,
}

/// Everything `verify` found (the `--json` report).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub command: &'static str,
    /// `compare` (with a reference) or `self`.
    pub mode: &'static str,
    pub reference: Option<String>,
    pub candidate: String,
    /// How the candidate was produced, from its tensors: `lossless` (same bits or exact
    /// widening), `cast` (some tensor narrowed), `int8`; `self` without a reference.
    pub class: &'static str,
    pub pass: bool,
    /// The first failing check, named with its subject and detail.
    pub first_failure: Option<String>,
    pub checks: Vec<Check>,
    pub thresholds: Option<Thresholds>,
    pub tensors: Vec<TensorCheck>,
    pub prompts: Vec<PromptCheck>,
    pub timing: Timing,
}

/// The default thresholds of a class, calibrated on the fixtures (README, `verify`).
pub fn default_thresholds(class: &str) -> Thresholds {
    match class {
        "lossless" => Thresholds {
            max_logit_diff: None,
            relative_logit_diff: Some(1e-4),
            max_kl: None,
            min_top1: 1.0,
            tokens_exact: true,
        },
        "cast" => Thresholds {
            max_logit_diff: None,
            relative_logit_diff: None,
            max_kl: Some(5e-3),
            min_top1: 0.9,
            tokens_exact: false,
        },
        _ => Thresholds {
            max_logit_diff: None,
            relative_logit_diff: None,
            max_kl: Some(5e-2),
            min_top1: 0.8,
            tokens_exact: false,
        },
    }
}

fn check(check: &'static str, subject: &str, figures: String, problem: Option<String>) -> Check {
    Check {
        check,
        subject: subject.to_string(),
        figures,
        pass: problem.is_none(),
        detail: problem,
    }
}

/// Checks the stored CRC-32 of every record the tensors are read from.
fn integrity(view: &View, side: &str) -> (Check, u64) {
    let mut seen = BTreeSet::new();
    let mut bytes = 0u64;
    let mut problem = None;
    for t in &view.tensors {
        if let Some((l, _)) = t.logical() {
            for r in l.records() {
                if seen.insert(r.offset) {
                    bytes += r.len;
                }
            }
        }
        if let Err(e) = t.check_records(view.files()) {
            problem = Some(e.to_string());
            break;
        }
    }
    let figures = if seen.is_empty() {
        "no checksums stored (safetensors / zarr)".to_string()
    } else {
        format!(
            "{} CRC-32 records, {:.1} MB",
            seen.len(),
            bytes as f64 / 1e6
        )
    };
    (check("integrity", side, figures, problem), bytes)
}

fn tensor_summary(s: &Structure, what: &'static str) -> Check {
    let bad: Vec<&TensorCheck> = s.tensors.iter().filter(|t| !t.pass).collect();
    let mut rules: std::collections::BTreeMap<&str, usize> = Default::default();
    for t in &s.tensors {
        *rules.entry(t.rule).or_default() += 1;
    }
    let rules: Vec<String> = rules.iter().map(|(r, n)| format!("{n} {r}")).collect();
    check(
        what,
        &format!("{} tensors", s.tensors.len()),
        format!(
            "{}; {:.1} MB in {:.1} s",
            rules.join(", "),
            s.bytes as f64 / 1e6,
            s.secs
        ),
        bad.first().map(|t| {
            format!(
                "{}{}: {}",
                t.name,
                if bad.len() > 1 {
                    format!(" (and {} more)", bad.len() - 1)
                } else {
                    String::new()
                },
                t.detail.as_deref().unwrap_or("fails")
            )
        }),
    )
}

fn class_of(s: &Structure) -> &'static str {
    if s.tensors.iter().any(|t| t.rule == "int8") {
        "int8"
    } else if s
        .tensors
        .iter()
        .any(|t| t.rule == "narrowed" || t.rule == "cast")
    {
        "cast"
    } else {
        "lossless"
    }
}

fn tokenizer_check(r: &View, c: &View, prompts: &[Prompt]) -> Result<Check> {
    let rsp = r.tokenizer()?;
    let problem = match c.tokenizer() {
        Err(e) => Some(format!("the candidate's tokenizer cannot be read: {e}")),
        Ok(csp) => meta::tokenizer_diff(rsp, csp).or_else(|| {
            let (rt, ct) = (Tokenizer::new(rsp.clone()), Tokenizer::new(csp.clone()));
            let texts: Vec<(&str, &str)> = prompts
                .iter()
                .map(|p| (p.name.as_str(), p.text.as_str()))
                .collect();
            meta::encoding_diff(&rt, &ct, &texts)
        }),
    };
    Ok(check(
        "tokenizer",
        "pieces, special ids, prompts",
        format!(
            "{} pieces, {} prompts encoded",
            rsp.vocab_size(),
            prompts.len()
        ),
        problem,
    ))
}

/// Runs every check of `candidate` against `reference` (or a self-check without one).
pub fn run(reference: Option<&Path>, candidate: &Path, opts: &Options) -> Result<Report> {
    let t0 = Instant::now();
    let cand = View::open(candidate, &opts.open)?;
    let mut timing = Timing {
        threads: rayon::current_num_threads(),
        ..Timing::default()
    };
    let mut report = Report {
        schema_version: 1,
        command: "verify",
        mode: if reference.is_some() {
            "compare"
        } else {
            "self"
        },
        reference: reference.map(|p| p.display().to_string()),
        candidate: candidate.display().to_string(),
        class: "self",
        pass: false,
        first_failure: None,
        checks: Vec::new(),
        thresholds: None,
        tensors: Vec::new(),
        prompts: Vec::new(),
        timing: Timing::default(),
    };
    match reference {
        Some(rp) => {
            let refv = View::open(rp, &opts.open)?;
            timing.open_s = t0.elapsed().as_secs_f64();
            compare_views(refv, cand, opts, &mut report, &mut timing)?;
        }
        None => {
            timing.open_s = t0.elapsed().as_secs_f64();
            self_check(cand, opts, &mut report, &mut timing)?;
        }
    }
    timing.hash_bytes_per_s = timing.hashed_bytes as f64 / timing.hashing_s.max(1e-9);
    timing.total_s = t0.elapsed().as_secs_f64();
    report.timing = timing;
    report.pass = report.checks.iter().all(|c| c.pass);
    report.first_failure = report.checks.iter().find(|c| !c.pass).map(|c| {
        format!(
            "{} ({}): {}",
            c.check,
            c.subject,
            c.detail.as_deref().unwrap_or("fails")
        )
    });
    Ok(report)
}

fn compare_views(
    refv: View,
    cand: View,
    opts: &Options,
    report: &mut Report,
    timing: &mut Timing,
) -> Result<()> {
    let t = Instant::now();
    let (ri, rb) = integrity(&refv, "reference");
    let (ci, cb) = integrity(&cand, "candidate");
    timing.integrity_s = t.elapsed().as_secs_f64();
    timing.integrity_bytes = rb + cb;
    let intact = ri.pass && ci.pass;
    report.checks.extend([ri, ci]);
    let diff = meta::config_diff(&refv.arch, refv.vocab()?, &cand.arch, cand.vocab()?);
    report.checks.push(check(
        "config",
        "dims, heads, groups, vocab, rope, eps, tied",
        format!("{} layers, hidden {}", refv.arch.layers, refv.arch.hidden),
        (!diff.is_empty()).then(|| diff.join("; ")),
    ));
    report
        .checks
        .push(tokenizer_check(&refv, &cand, &opts.prompts)?);
    for (side, v) in [("reference", &refv), ("candidate", &cand)] {
        let problem = meta::layout(v).unwrap_or_else(Some);
        report.checks.push(check(
            "layout",
            side,
            format!("{} tensors as the config calls for", v.tensors.len()),
            problem,
        ));
    }
    let s = structure::compare(&refv, &cand, opts.open.progress);
    timing.hashing_s = s.secs;
    timing.hashed_bytes = s.bytes;
    report.class = class_of(&s);
    report.checks.push(tensor_summary(&s, "tensors"));
    report.tensors = s.tensors;
    let mut th = default_thresholds(report.class);
    if let Some(x) = opts.max_logit_diff {
        th.max_logit_diff = Some(x);
    }
    if let Some(x) = opts.max_kl {
        th.max_kl = Some(x);
    }
    if let Some(x) = opts.min_top1 {
        th.min_top1 = x;
    }
    report.thresholds = Some(th);
    if opts.tokens == 0 {
        return Ok(());
    }
    if !intact {
        report.checks.push(check(
            "generation",
            "all prompts",
            "not run".into(),
            Some("skipped: a side fails its integrity check".into()),
        ));
        return Ok(());
    }
    let t = Instant::now();
    let mut model = Model::from_view(refv)?;
    if let Some(why) = model.select_device(opts.device, opts.open.progress)? {
        if opts.open.progress {
            eprintln!("no GPU used ({why}); computing on the CPU");
        }
    }
    timing.reference_load_s = t.elapsed().as_secs_f64();
    let runs = behaviour::reference(&model, &opts.prompts, opts.tokens, opts.open.progress)?;
    drop(model);
    for r in &runs {
        timing.reference_prefill_s += r.prefill_secs;
        timing.reference_decode_s += r.decode_secs;
    }
    let t = Instant::now();
    let Some(mut model) = runnable(cand, "candidate", report) else {
        return Ok(());
    };
    // The reference ran where this one can: a GPU that took the reference takes it too.
    model.select_device(opts.device, false)?;
    timing.candidate_load_s = t.elapsed().as_secs_f64();
    candidate_runs(&model, &runs, &th, opts.open.progress, report, timing);
    Ok(())
}

/// The model of `view`, or a failed generation check saying why it cannot be run.
fn runnable(view: View, who: &str, report: &mut Report) -> Option<Model> {
    match Model::from_view(view) {
        Ok(m) => Some(m),
        Err(e) => {
            report.checks.push(check(
                "generation",
                "all prompts",
                "not run".into(),
                Some(format!("the {who} cannot be run: {e}")),
            ));
            None
        }
    }
}

fn candidate_runs(
    model: &Model,
    runs: &[RefRun],
    th: &Thresholds,
    progress: bool,
    report: &mut Report,
    timing: &mut Timing,
) {
    let bar = crate::io::progress::Progress::count(runs.len() as u64, "candidate", progress);
    for r in runs {
        let pc = match behaviour::teacher_forced(model, r) {
            Ok((logits, p, d)) => {
                timing.candidate_prefill_s += p;
                timing.candidate_decode_s += d;
                behaviour::judge(r, &logits, (p, d), th)
            }
            Err(e) => {
                let mut pc = behaviour::judge(r, &[], (0.0, 0.0), th);
                pc.pass = false;
                pc.detail = Some(format!("the candidate cannot run it: {e}"));
                pc
            }
        };
        report.checks.push(check(
            "generation",
            &pc.name,
            format!(
                "{} tokens{}, top-1 {:.3}, max |Δ| {:.2e}, KL {:.2e}",
                pc.positions,
                if pc.tokens_match { " identical" } else { "" },
                pc.top1_agreement,
                pc.max_abs_diff,
                pc.max_kl
            ),
            pc.detail.clone(),
        ));
        report.prompts.push(pc);
        bar.inc(1);
    }
    bar.finish();
}

fn self_check(view: View, opts: &Options, report: &mut Report, timing: &mut Timing) -> Result<()> {
    let t = Instant::now();
    let (ci, cb) = integrity(&view, "model");
    timing.integrity_s = t.elapsed().as_secs_f64();
    timing.integrity_bytes = cb;
    let intact = ci.pass;
    report.checks.push(ci);
    report.checks.push(check(
        "layout",
        "model",
        format!("{} tensors as the config calls for", view.tensors.len()),
        meta::layout(&view).unwrap_or_else(Some),
    ));
    let embed = crate::arch::roles::hf_names(crate::arch::roles::Kind::Embedding, 0).remove(0);
    let rows = view.get(&embed).map_or(0, |t| t.shape[0]);
    let tok = match view.tokenizer() {
        Ok(sp) => check(
            "tokenizer",
            "special ids",
            format!("{} pieces, embedding {rows} rows", sp.vocab_size()),
            meta::specials_outside(sp, rows),
        ),
        Err(e) if opts.tokens > 0 => return Err(e),
        Err(e) => check("tokenizer", "model", "not read".into(), Some(e.to_string())),
    };
    report.checks.push(tok);
    let s = structure::finite(&view, opts.open.progress);
    timing.hashing_s = s.secs;
    timing.hashed_bytes = s.bytes;
    report.checks.push(tensor_summary(&s, "finite"));
    report.tensors = s.tensors;
    if opts.tokens == 0 || !intact {
        return Ok(());
    }
    let t = Instant::now();
    let Some(model) = runnable(view, "model", report) else {
        return Ok(());
    };
    timing.reference_load_s = t.elapsed().as_secs_f64();
    let runs = behaviour::reference(&model, &opts.prompts, opts.tokens, opts.open.progress)?;
    for r in &runs {
        timing.reference_prefill_s += r.prefill_secs;
        timing.reference_decode_s += r.decode_secs;
        let bad = behaviour::non_finite(r);
        report.checks.push(check(
            "generation",
            &r.name,
            format!("{} tokens, stop {}", r.generated.len(), r.stop),
            bad.map(|p| format!("the logits at generated position {p} are not all finite")),
        ));
    }
    Ok(())
}
