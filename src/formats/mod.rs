//! Output formats.

pub mod hf;
pub mod safetensors_in;
pub mod safetensors_out;
