//! Output and progress: atomic files and folders, the output lock, signal cleanup, sinks
//! that write (or `copy_file_range`) bytes, and progress bars.

pub mod output;
pub mod progress;
pub mod sink;
