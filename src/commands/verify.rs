//! `steerlm-convert verify`: the checks of `steerlm_convert::verify`, a table on stdout,
//! the report as JSON, exit 0 / 1 / 2.

use std::process::ExitCode;

use steerlm_convert::container::mapped::OpenOptions;
use steerlm_convert::io::output;
use steerlm_convert::verify::{self, prompts, report};
use steerlm_convert::Error;

use crate::cli::VerifyArgs;

pub fn run(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let device = super::runtime_device(args.device, args.io.quiet)?;
    for (flag, v) in [
        ("--max-logit-diff", args.max_logit_diff),
        ("--max-kl", args.max_kl),
    ] {
        if v.is_some_and(|x| x.is_nan() || x < 0.0) {
            return Err(Error::Usage(format!("{flag} must be a number ≥ 0")).into());
        }
    }
    if args.min_top1.is_some_and(|x| !(0.0..=1.0).contains(&x)) {
        return Err(Error::Usage("--min-top1 must be between 0 and 1".into()).into());
    }
    let prompts = match &args.prompts {
        None => prompts::builtin(),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            prompts::parse_jsonl(&text, &p.display().to_string()).map_err(Error::Usage)?
        }
    };
    // The report's path is checked before any work; it is written only at the end.
    let json = match &args.json {
        Some(p) => {
            let mut inputs = vec![args.candidate.as_path()];
            inputs.extend(args.against.as_deref());
            output::check_not_input(p, &inputs)?;
            Some(output::AtomicFile::create(p, true)?)
        }
        None => None,
    };
    let threads = args.threads.unwrap_or(0);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Usage(format!("cannot start {threads} threads: {e}")))?;
    let opts = verify::Options {
        prompts,
        tokens: args.tokens,
        max_logit_diff: args.max_logit_diff,
        max_kl: args.max_kl,
        min_top1: args.min_top1,
        open: OpenOptions {
            scratch_dir: args.io.scratch_dir.clone(),
            progress: !args.io.quiet,
            no_crc: false,
        },
        device,
    };
    let r = pool.install(|| verify::run(args.against.as_deref(), &args.candidate, &opts))?;
    if let Some(f) = json {
        f.write_all(&serde_json::to_vec_pretty(&r)?)?;
    }
    print!("{}", report::table(&r));
    Ok(if r.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
