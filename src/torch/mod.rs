//! PyTorch checkpoints: the safe pickle VM, located state dicts, and the writer.

pub mod pickle;
pub mod save;
pub mod state_dict;
