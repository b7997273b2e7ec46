//! The runtime on a CUDA device: the kernels of `kernels/runtime.cu`, launched with their
//! buffers checked.

pub mod kernels;
pub mod model;
