//! Output formats.

pub mod hf;
pub mod hf_tokenizer;
pub mod safetensors_in;
pub mod safetensors_out;
