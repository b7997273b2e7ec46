//! One module per subcommand: each wires the library, prints and reports.

pub mod generate;
pub mod inspect;
pub mod nemo_to_safetensors;
pub mod reshard;

use std::path::Path;

use steerlm_convert::nemo::archive::OpenOptions;
use steerlm_convert::nemo::checkpoint::Checkpoint;

/// Opens the input of a command that writes `output`: a gzip archive is decompressed
/// beside the output unless `--scratch-dir` says otherwise.
pub fn open_input(
    input: &Path,
    output: Option<&Path>,
    io: &crate::cli::IoArgs,
) -> steerlm_convert::Result<Checkpoint> {
    let beside = output
        .and_then(|o| o.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf);
    let scratch_dir = io.scratch_dir.clone().or(beside);
    Checkpoint::open(
        input,
        &OpenOptions {
            scratch_dir,
            progress: !io.quiet,
        },
    )
}
