//! Weight quantization: the int8 scheme (defined once, shared by the CPU and GPU paths),
//! the compressed-tensors `pack-quantized` layout, and error metrics.

pub mod compressed;
pub mod engine;
pub mod int8;
pub mod report;
