//! steerlm-convert: read NeMo `.nemo` checkpoints of Megatron-GPT / Llama-2 models and turn
//! them into what people deploy, proving each conversion right.
//!
//! The data path: [`nemo::archive`] maps the file and indexes the tar; [`nemo::checkpoint`]
//! reads the config, tokenizer and rank grid; [`torch`] locates every tensor of every rank
//! through a safe pickle VM; [`model::roles`] says what each tensor is and how it is split.

pub mod arch;
pub mod container;
pub mod dtype;
pub mod error;
pub mod gpu;
pub mod hf;
pub mod io;
pub mod model;
pub mod nemo;
pub mod pipeline;
pub mod quant;
pub mod runtime;
#[cfg(feature = "dev-tools")]
pub mod synth;
pub mod torch;

pub use error::{Error, Result};
