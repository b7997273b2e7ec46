//! `steerlm-convert nemo-to-safetensors`.

use std::process::ExitCode;

use steerlm_convert::convert::{self, ConvertOptions};
use steerlm_convert::nemo::archive::OpenOptions;
use steerlm_convert::nemo::checkpoint::Checkpoint;
use steerlm_convert::output;
use steerlm_convert::tensor::DType;

use crate::cli::{DTypeArg, NemoToSafetensorsArgs};

pub fn run(args: &NemoToSafetensorsArgs) -> anyhow::Result<ExitCode> {
    output::install_interrupt_handler();
    let scratch = args.scratch_dir.clone().or_else(|| {
        args.output
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| p.to_path_buf())
    });
    let ck = Checkpoint::open(
        &args.input,
        &OpenOptions {
            scratch_dir: scratch,
            progress: !args.quiet,
        },
    )?;
    let opts = ConvertOptions {
        dtype: match args.dtype {
            DTypeArg::Keep => None,
            DTypeArg::Bf16 => Some(DType::BF16),
            DTypeArg::Fp16 => Some(DType::F16),
            DTypeArg::Fp32 => Some(DType::F32),
        },
        max_shard_bytes: args.max_shard_size,
        force: args.force,
        allow_overflow: args.allow_overflow,
        progress: !args.quiet,
    };
    let report = convert::nemo_to_safetensors(&ck, &args.output, &opts)?;
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
