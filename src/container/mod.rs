//! Containers: the mapped input (a tar or a folder), tar, zip, safetensors and zarr, each
//! read in place from the mapping.

pub mod mapped;
pub mod safetensors;
pub mod safetensors_write;
pub mod tar;
pub mod tar_write;
pub mod zarr;
pub mod zip;
