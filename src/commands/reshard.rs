//! `steerlm-convert reshard`.

use std::process::ExitCode;

use serde_json::json;
use steerlm_convert::nemo::archive::OpenOptions;
use steerlm_convert::nemo::checkpoint::Checkpoint;
use steerlm_convert::output;
use steerlm_convert::reshard::{self, Format, ReshardOptions};
use steerlm_convert::tensor::DType;

use crate::cli::{DTypeArg, FormatArg, ReshardArgs};

pub fn run(args: &ReshardArgs) -> anyhow::Result<ExitCode> {
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
    let opts = ReshardOptions {
        tp: args.tp,
        pp: args.pp,
        format: match args.format {
            FormatArg::Safetensors => Format::Safetensors,
            FormatArg::Nemo => Format::Nemo,
        },
        dtype: match args.dtype {
            DTypeArg::Keep => None,
            DTypeArg::Bf16 => Some(DType::BF16),
            DTypeArg::Fp16 => Some(DType::F16),
            DTypeArg::Fp32 => Some(DType::F32),
        },
        force: args.force,
        progress: !args.quiet,
    };
    let r = reshard::reshard(&ck, &args.output, &opts)?;
    if args.json {
        let v = json!({
            "output": args.output.display().to_string(),
            "from": {"tp": ck.grid.tp, "pp": ck.grid.pp},
            "to": {"tp": args.tp, "pp": args.pp},
            "ranks": r.ranks,
            "tensors": r.tensors,
            "bytes": r.bytes,
            "seconds": r.seconds,
            "peak_rss_bytes": output::peak_rss(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    let gb = r.bytes as f64 / 1e9;
    eprintln!(
        "wrote {}: TP {} x PP {} -> TP {} x PP {}, {} ranks, {} tensors, {:.3} GB in {:.2} s ({:.2} GB/s), peak RSS {:.0} MB",
        args.output.display(),
        ck.grid.tp,
        ck.grid.pp,
        args.tp,
        args.pp,
        r.ranks.len(),
        r.tensors,
        gb,
        r.seconds,
        gb / r.seconds.max(1e-9),
        output::peak_rss() as f64 / 1e6
    );
    Ok(ExitCode::SUCCESS)
}
