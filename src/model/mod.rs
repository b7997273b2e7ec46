//! The canonical Llama model: the role table that says what each stored tensor is.

pub mod emit;
pub mod roles;
pub mod shard;
