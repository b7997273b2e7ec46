//! `steerlm-convert reshard`.

use std::process::ExitCode;

use serde_json::json;
use steerlm_convert::output;
use steerlm_convert::reshard::{self, Format, ReshardOptions};

use crate::cli::{FormatArg, ReshardArgs};

pub fn run(args: &ReshardArgs) -> anyhow::Result<ExitCode> {
    output::install_interrupt_handler();
    let ck = super::open_input(&args.input, Some(&args.output), &args.io)?;
    let opts = ReshardOptions {
        tp: args.tp,
        pp: args.pp,
        format: match args.format {
            FormatArg::Safetensors => Format::Safetensors,
            FormatArg::Nemo => Format::Nemo,
        },
        dtype: args.dtype.dtype(),
        force: args.force,
        progress: !args.io.quiet,
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
