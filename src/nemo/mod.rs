//! NeMo `.nemo` checkpoints: the config, the rank layout, the tokenizer artifact and the
//! opened checkpoint.

pub mod checkpoint;
pub mod config;
pub mod layout;
pub mod logical;
pub mod tokenizer;
