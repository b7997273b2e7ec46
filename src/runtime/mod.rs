//! The built-in runtime: SentencePiece tokenizer, SteerLM prompts, and the Llama forward
//! pass on the CPU over weights used in place from the mapped files.

pub mod attention;
pub mod backend;
pub mod compare;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod generate;
pub mod linear;
pub mod llama;
pub mod load;
pub mod sample;
pub mod steerlm;
pub mod tokenizer;
pub mod twins;
