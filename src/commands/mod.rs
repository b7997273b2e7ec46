//! One module per subcommand: each wires the library, prints and reports.

pub mod generate;
pub mod inspect;
pub mod nemo_to_safetensors;
pub mod quantize;
pub mod reshard;
pub mod serve;
pub mod verify;

use std::path::Path;

use steerlm_convert::container::mapped::OpenOptions;
use steerlm_convert::model::View;
use steerlm_convert::nemo::checkpoint::Checkpoint;

/// How the input of a command that writes `output` is opened: a gzip archive is
/// decompressed beside the output unless `--scratch-dir` says otherwise.
pub fn open_options(
    output: Option<&Path>,
    scratch_dir: &Option<std::path::PathBuf>,
    quiet: bool,
    no_crc: bool,
) -> OpenOptions {
    let beside = output
        .and_then(|o| o.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf);
    OpenOptions {
        scratch_dir: scratch_dir.clone().or(beside),
        progress: !quiet,
        no_crc,
    }
}

/// Opens the input of a command that writes `output`, through the model view.
pub fn open_input(
    input: &Path,
    output: &Path,
    io: &crate::cli::IoArgs,
) -> steerlm_convert::Result<View> {
    View::open(
        input,
        &open_options(Some(output), &io.scratch_dir, io.quiet, io.crc.no_crc),
    )
}

/// Opens a NeMo input without assembling its tensors (`inspect`).
pub fn open_checkpoint(
    input: &Path,
    scratch_dir: &Option<std::path::PathBuf>,
    quiet: bool,
) -> steerlm_convert::Result<Checkpoint> {
    View::open_checkpoint(input, &open_options(None, scratch_dir, quiet, false))
}

/// The GPU engine `--device` asks for: `None` for the CPU. `auto` falls back to the CPU
/// with the reason on stderr; `cuda` fails when no GPU can be used.
pub fn gpu_engine(
    device: crate::cli::DeviceArg,
    quiet: bool,
) -> steerlm_convert::Result<Option<Box<dyn steerlm_convert::quant::engine::Engine>>> {
    use crate::cli::DeviceArg;
    if device == DeviceArg::Cpu {
        return Ok(None);
    }
    match steerlm_convert::gpu::CudaEngine::open() {
        Ok(g) => Ok(Some(Box::new(g))),
        Err(why) if device == DeviceArg::Auto => {
            if !quiet {
                eprintln!("no GPU used ({why}); computing on the CPU");
            }
            Ok(None)
        }
        Err(why) => Err(steerlm_convert::Error::Usage(format!(
            "--device cuda: {why}"
        ))),
    }
}

/// How a command that only reads a model opens it.
pub fn read_options(io: &crate::cli::ReadArgs, crc: &crate::cli::CrcArg) -> OpenOptions {
    OpenOptions {
        scratch_dir: io.scratch_dir.clone(),
        progress: !io.quiet,
        no_crc: crc.no_crc,
    }
}

/// Where the runtime computes for `--device`, settled before any work (see
/// `DeviceChoice::resolve`).
pub fn runtime_device(
    device: crate::cli::DeviceArg,
    quiet: bool,
) -> steerlm_convert::Result<steerlm_convert::runtime::backend::DeviceChoice> {
    use crate::cli::DeviceArg;
    use steerlm_convert::runtime::backend::DeviceChoice;
    match device {
        DeviceArg::Auto => DeviceChoice::Auto,
        DeviceArg::Cpu => DeviceChoice::Cpu,
        DeviceArg::Cuda => DeviceChoice::Cuda,
    }
    .resolve(quiet)
}
