//! PyTorch checkpoints: the zip container, the safe pickle VM, and located state dicts.

pub mod checkpoint;
pub mod pickle;
pub mod save;
pub mod zip;
