//! The conversions: NeMo to Hugging Face, re-sharding, quantization, and the writer of
//! merged or split tensors they share.

pub mod emit;
pub mod quantize;
pub mod reshard;
pub mod to_hf;
