//! The library's error type. Every variant names where the problem is (file, member,
//! tensor, offset) so that the command line can print it as one line.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The tar container is malformed.
    #[error("{file}: tar: {msg} (at byte {offset})")]
    Tar {
        file: String,
        offset: u64,
        msg: String,
    },
    /// A torch zip record inside a member is malformed.
    #[error("{member}: zip: {msg} (at byte {offset} of the member)")]
    Zip {
        member: String,
        offset: u64,
        msg: String,
    },
    /// The pickle inside a torch checkpoint is malformed or hostile.
    #[error("{member}: pickle: {msg} (at byte {offset} of the pickle)")]
    Pickle {
        member: String,
        offset: u64,
        msg: String,
    },
    /// A tensor's description does not fit its storage or the model.
    #[error("{member}: tensor `{tensor}`: {msg}")]
    Tensor {
        member: String,
        tensor: String,
        msg: String,
    },
    /// `model_config.yaml` is missing, malformed or contradicts the archive.
    #[error("{file}: {msg}")]
    Config { file: String, msg: String },
    /// The rank grid or key schema of the archive is not what it must be.
    #[error("{file}: {msg}")]
    Layout { file: String, msg: String },
    /// The tokenizer artifact is missing or is not a SentencePiece model.
    #[error("{file}: tokenizer: {msg}")]
    Tokenizer { file: String, msg: String },
    /// A distributed (zarr) checkpoint is malformed or unsupported.
    #[error("{file}: dist checkpoint: {msg}")]
    DistCheckpoint { file: String, msg: String },
    /// The output cannot be written there: it exists (without `--force`), is being
    /// written by another process, is the input or lies inside it, or its folder is missing.
    #[error("{0}")]
    Output(String),
    /// The user asked for something that cannot be done (flags, values, the wrong input
    /// for a command).
    #[error("{0}")]
    Usage(String),
    /// The GPU failed during a run (a driver call, a launch, an allocation).
    #[error("cuda: {0}")]
    Device(String),
    /// Ctrl-C was pressed; partial output was removed.
    #[error("interrupted; partial output removed")]
    Interrupted,
}

impl Error {
    /// Prefixes the member of a zip, pickle or tensor error with the archive's path, so
    /// that the message names both the file and the member inside it.
    pub fn in_file(self, file: &str) -> Self {
        match self {
            Error::Zip {
                member,
                offset,
                msg,
            } => Error::Zip {
                member: format!("{file}:{member}"),
                offset,
                msg,
            },
            Error::Pickle {
                member,
                offset,
                msg,
            } => Error::Pickle {
                member: format!("{file}:{member}"),
                offset,
                msg,
            },
            Error::Tensor {
                member,
                tensor,
                msg,
            } => Error::Tensor {
                member: format!("{file}:{member}"),
                tensor,
                msg,
            },
            other => other,
        }
    }

    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
