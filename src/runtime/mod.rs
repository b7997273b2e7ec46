//! The built-in runtime: tokenizer (more to come: SteerLM prompts, the Llama forward pass).

pub mod tokenizer;
