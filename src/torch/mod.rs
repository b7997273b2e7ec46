//! PyTorch checkpoints: the safe pickle VM, located state dicts, distributed checkpoints
//! (`torch.distributed.checkpoint` and zarr, by their `metadata.json`), and the writer.

pub mod distcp;
pub mod pickle;
pub mod save;
pub mod state_dict;
