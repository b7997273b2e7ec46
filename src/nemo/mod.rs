//! NeMo checkpoints (`.nemo` 1.x archives and NeMo 2.0 folders): the config, the rank
//! layout, the tokenizer artifact and the opened checkpoint.

pub mod checkpoint;
pub mod config;
pub mod hf_tokenizer;
pub mod layout;
pub mod logical;
pub mod nemo2;
pub mod tokenizer;
