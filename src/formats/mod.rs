//! Output formats.

pub mod hf;
pub mod safetensors_out;
