//! The Llama architecture: the role table that says what each stored tensor is, and the
//! tensor-parallel merge and split rules.

pub mod roles;
pub mod tp;
