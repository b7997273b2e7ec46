//! `steerlm-convert quantize`.

use std::process::ExitCode;

use steerlm_convert::container::mapped::OpenOptions;
use steerlm_convert::dtype::DType;
use steerlm_convert::io::output;
use steerlm_convert::pipeline::quantize::{self, QuantizeOptions, QuantizeReport, Scheme};
use steerlm_convert::quant::engine::{CpuEngine, Engine};
use steerlm_convert::Error;

use crate::cli::{GranularityArg, QuantizeArgs, SchemeArg};

fn scheme(args: &QuantizeArgs) -> Result<Scheme, Error> {
    let usage = |m: &str| Err(Error::Usage(m.to_string()));
    match args.scheme {
        SchemeArg::Fp16 | SchemeArg::Bf16 => {
            if args.granularity.is_some() || args.group_size.is_some() {
                return usage("--granularity and --group-size apply to --scheme int8 only");
            }
            Ok(Scheme::Cast(if args.scheme == SchemeArg::Fp16 {
                DType::F16
            } else {
                DType::BF16
            }))
        }
        SchemeArg::Int8 => match (args.granularity, args.group_size) {
            (None | Some(GranularityArg::Channel), None) => Ok(Scheme::Int8 { group: None }),
            (None | Some(GranularityArg::Channel), Some(_)) => {
                usage("--group-size needs --granularity group (channel has one scale per row)")
            }
            (Some(GranularityArg::Group), g) => {
                let g = g.unwrap_or(128);
                if g == 0 || g % 4 != 0 {
                    return usage("--group-size must be a positive multiple of 4");
                }
                Ok(Scheme::Int8 { group: Some(g) })
            }
        },
    }
}

pub fn run(args: &QuantizeArgs) -> anyhow::Result<ExitCode> {
    output::install_interrupt_handler();
    let scheme = scheme(args)?;
    output::check_not_input(&args.output, &[&args.input])?;
    // Every output path is checked before any work: the report's folder must exist.
    let report_file = match &args.report {
        Some(p) => {
            output::check_not_input(p, &[&args.input, &args.output])?;
            Some(output::AtomicFile::create(p, true)?)
        }
        None => None,
    };
    let cpu = CpuEngine;
    let gpu = super::gpu_engine(args.device, args.io.quiet)?;
    let engine: &dyn Engine = match &gpu {
        Some(g) => g.as_ref(),
        None => &cpu,
    };
    if !args.io.quiet {
        eprintln!("device: {}", engine.name());
    }
    let beside = args
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| p.to_path_buf());
    let opts = QuantizeOptions {
        scheme,
        keep: args.keep.clone(),
        force: args.force,
        progress: !args.io.quiet,
        max_shard_bytes: args.max_shard_size,
        allow_overflow: args.allow_overflow,
        engine,
        open: OpenOptions {
            scratch_dir: args.io.scratch_dir.clone().or(beside),
            progress: !args.io.quiet,
            no_crc: args.io.crc.no_crc,
        },
    };
    let report = quantize::quantize(&args.input, &args.output, &opts)?;
    let doc = report.to_json(&args.output);
    if let Some(f) = report_file {
        f.write_all((serde_json::to_string_pretty(&doc)? + "\n").as_bytes())?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    print_table(&report, args.worst);
    let gb = report.bytes_in as f64 / 1e9;
    let overflowed: Vec<_> = report
        .tensors
        .iter()
        .filter(|t| t.stats.overflow > 0)
        .collect();
    eprintln!(
        "wrote {}: {} tensors, {:.3} GB in -> {:.3} GB out in {:.2} s ({:.2} GB/s of input) on {}, peak RSS {:.0} MB{}",
        args.output.display(),
        report.tensors.len(),
        gb,
        report.bytes_out as f64 / 1e9,
        report.seconds,
        gb / report.seconds.max(1e-9),
        report.engine,
        output::peak_rss() as f64 / 1e6,
        if overflowed.is_empty() {
            String::new()
        } else {
            format!(
                "; {} values in {} tensors overflowed to ±inf (--allow-overflow)",
                overflowed.iter().map(|t| t.stats.overflow).sum::<u64>(),
                overflowed.len()
            )
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn print_table(r: &QuantizeReport, worst: usize) {
    let mut changed: Vec<_> = r
        .tensors
        .iter()
        .filter(|t| t.written_as != "copy")
        .collect();
    if changed.is_empty() || worst == 0 {
        return;
    }
    changed.sort_by(|a, b| b.stats.rel_rms().total_cmp(&a.stats.rel_rms()));
    let mut all = steerlm_convert::quant::int8::ErrStats::default();
    for t in &changed {
        all.merge(&t.stats);
    }
    eprintln!(
        "{:<48} {:>14} {:>12} {:>12} {:>9}",
        "tensor (worst first)", "as", "max |err|", "rel RMS", "SNR dB"
    );
    for t in changed.iter().take(worst) {
        eprintln!(
            "{:<48} {:>14} {:>12.3e} {:>12.3e} {:>9.2}",
            t.name,
            t.written_as,
            t.stats.max_abs,
            t.stats.rel_rms(),
            t.stats.snr_db()
        );
    }
    eprintln!(
        "{:<48} {:>14} {:>12.3e} {:>12.3e} {:>9.2}",
        format!("all {} changed tensors", changed.len()),
        "",
        all.max_abs,
        all.rel_rms(),
        all.snr_db()
    );
}
