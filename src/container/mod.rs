//! Containers: the mapped input (a tar or a folder), tar, zip, safetensors, and the
//! distributed checkpoints (zarr, torch_dist), each read in place from the mapping.

pub mod dist;
pub mod mapped;
pub mod safetensors;
pub mod safetensors_write;
pub mod tar;
pub mod tar_write;
pub mod zarr;
pub mod zip;
