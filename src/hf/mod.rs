//! The Hugging Face `LlamaForCausalLM` folder: tensor names, `config.json` and the
//! tokenizer files.

pub mod config;
pub mod files;
pub mod folder;
pub mod names;
pub mod tokenizer;
