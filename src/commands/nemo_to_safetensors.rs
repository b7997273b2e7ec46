//! `steerlm-convert nemo-to-safetensors`.

use std::process::ExitCode;

use steerlm_convert::io::output;
use steerlm_convert::pipeline::to_hf::{self, ConvertOptions};

use crate::cli::NemoToSafetensorsArgs;

pub fn run(args: &NemoToSafetensorsArgs) -> anyhow::Result<ExitCode> {
    output::install_interrupt_handler();
    output::check_not_input(&args.output, &[&args.input])?;
    let ck = super::open_input(&args.input, &args.output, &args.io)?;
    let opts = ConvertOptions {
        dtype: args.dtype.dtype(),
        max_shard_bytes: args.max_shard_size,
        force: args.force,
        allow_overflow: args.allow_overflow,
        progress: !args.io.quiet,
    };
    let report = to_hf::nemo_to_safetensors(&ck, &args.output, &opts)?;
    let casts: Vec<String> = {
        let mut v: Vec<String> = report
            .tensors
            .iter()
            .filter(|(t, src)| t.dtype != *src)
            .map(|(t, src)| format!("{src}->{}", t.dtype))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_json(&args.output))?
        );
    }
    let gb = report.bytes as f64 / 1e9;
    eprintln!(
        "wrote {}: {} tensors, {:.3} GB in {:.2} s ({:.2} GB/s){}{}, peak RSS {:.0} MB",
        args.output.display(),
        report.tensors.len(),
        gb,
        report.seconds,
        gb / report.seconds.max(1e-9),
        if casts.is_empty() {
            String::new()
        } else {
            format!(", cast {}", casts.join(", "))
        },
        if report.overflow.is_empty() {
            String::new()
        } else {
            format!(", {} tensors had fp16 overflow", report.overflow.len())
        },
        output::peak_rss() as f64 / 1e6
    );
    Ok(ExitCode::SUCCESS)
}
