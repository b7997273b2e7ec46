//! `steerlm-convert reshard`.

use std::process::ExitCode;

use serde_json::json;
use steerlm_convert::io::output;
use steerlm_convert::pipeline::reshard::{self, Format, ReshardOptions};
use steerlm_convert::Error;

use crate::cli::{FormatArg, ReshardArgs};

/// The output container: `--format`, else the output's extension (`.nemo` is an archive,
/// anything else a folder). A `.nemo` name with `--format safetensors` is a contradiction.
pub fn format_of(args: &ReshardArgs) -> Result<Format, Error> {
    let nemo_name = args
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("nemo"));
    match (args.format, nemo_name) {
        (Some(FormatArg::Safetensors), true) => Err(Error::Usage(format!(
            "{}: --format safetensors writes a folder, but the name ends in .nemo; drop --format or rename the output",
            args.output.display()
        ))),
        (Some(FormatArg::Nemo), _) | (None, true) => Ok(Format::Nemo),
        (Some(FormatArg::Safetensors), false) | (None, false) => Ok(Format::Safetensors),
    }
}

pub fn run(args: &ReshardArgs) -> anyhow::Result<ExitCode> {
    output::install_interrupt_handler();
    let format = format_of(args)?;
    // Re-sharding a .nemo file onto itself is safe: the new archive is written beside it
    // and renamed over it in one step, while the old one stays mapped until the end.
    let in_place_archive = format == Format::Nemo
        && args.input.is_file()
        && output::same_path(&args.input, &args.output);
    if !in_place_archive {
        output::check_not_input(&args.output, &[&args.input])?;
    }
    let ck = super::open_input(&args.input, &args.output, &args.io)?;
    let opts = ReshardOptions {
        tp: args.tp,
        pp: args.pp,
        format,
        dtype: args.dtype.dtype(),
        force: args.force,
        allow_overflow: args.allow_overflow,
        progress: !args.io.quiet,
    };
    let r = reshard::reshard(&ck, &args.output, &opts)?;
    let from = ck.grid().expect("reshard read a NeMo input");
    if args.json {
        let v = json!({
            "schema_version": 1,
            "command": "reshard",
            "output": args.output.display().to_string(),
            "format": match format { Format::Safetensors => "safetensors", Format::Nemo => "nemo" },
            "from": {"tp": from.0, "pp": from.1},
            "to": {"tp": args.tp, "pp": args.pp},
            "ranks": r.ranks,
            "tensor_count": r.tensors.len(),
            "tensors": r.tensors.iter().map(|(rank, name, shape, dtype)| json!({
                "rank": rank, "name": name, "shape": shape, "dtype": dtype.short_name(),
            })).collect::<Vec<_>>(),
            "bytes": r.bytes,
            "seconds": r.seconds,
            "peak_rss_bytes": output::peak_rss(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    let gb = r.bytes as f64 / 1e9;
    eprintln!(
        "wrote {}: TP {} x PP {} -> TP {} x PP {}, {} ranks, {} weight tensors, {:.3} GB in {:.2} s ({:.2} GB/s), peak RSS {:.0} MB",
        args.output.display(),
        from.0,
        from.1,
        args.tp,
        args.pp,
        r.ranks.len(),
        r.tensors.len(),
        gb,
        r.seconds,
        gb / r.seconds.max(1e-9),
        output::peak_rss() as f64 / 1e6
    );
    Ok(ExitCode::SUCCESS)
}
