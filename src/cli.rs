//! Command-line definitions: one struct per subcommand.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Convert NeMo `.nemo` checkpoints of Megatron-GPT / Llama-2 models (such as SteerLM
/// Llama-2 13B) into what people deploy, in bounded memory, without Python or a GPU.
#[derive(Debug, Parser)]
#[command(name = "steerlm-convert", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what a .nemo archive holds: layout, architecture, vocabulary, dtypes, tokenizer.
    ///
    /// Reads only headers, the config, the tokenizer and the pickles: never tensor data,
    /// so it takes well under a second even for a 50 GB archive. Exit code 2 on a
    /// malformed archive, with one line naming the file, member and offset.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The .nemo archive (plain or gzip-compressed tar).
    pub input: PathBuf,
    /// Also list every tensor with its rank, shape, dtype and role.
    #[arg(long)]
    pub tensors: bool,
    /// Print one JSON document on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Where a gzip-compressed archive is decompressed (default: the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// Hide progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}
