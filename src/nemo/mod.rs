//! NeMo `.nemo` archives: the container, the config, the rank layout, the tokenizer
//! artifact and distributed checkpoints.

pub mod archive;
pub mod checkpoint;
pub mod config;
pub mod layout;
pub mod tar;
pub mod tar_write;
pub mod tokenizer;
pub mod zarr;
