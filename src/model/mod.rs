//! The model view: every input (a `.nemo` in any layout, an unpacked `.nemo` folder, a
//! per-rank folder, a Hugging Face folder, float or int8) opened to the same thing — one
//! typed architecture and the canonical Hugging Face tensors, each with row-range access
//! to its bytes in the mapped files, whatever its shards. Every command consumes it.

pub mod view;

pub use view::{Int8Parts, Source, Tensor, View};
