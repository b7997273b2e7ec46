//! steerlm-convert: read NeMo `.nemo` checkpoints of Megatron-GPT / Llama-2 models and turn
//! them into what people deploy, proving each conversion right.
//!
//! The data path: [`container::mapped`] maps the input and indexes it in place;
//! [`nemo::checkpoint`] and [`hf::folder`] read configs, tokenizers and located tensors;
//! [`model::View`] gives every input the same canonical tensors over the mapped bytes,
//! through the role table and merge rules of [`arch`]; [`pipeline`] and [`runtime`]
//! consume the view. The README's Architecture section lists the modules bottom up; each
//! uses only those below it (checked by `tests/architecture.rs`).

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
pub mod serve;
#[cfg(feature = "dev-tools")]
pub mod synth;
pub mod torch;
pub mod verify;

pub use error::{Error, Result};
