//! One module per subcommand: each wires the library, prints and reports.

pub mod inspect;
pub mod nemo_to_safetensors;
pub mod reshard;
