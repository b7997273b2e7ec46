//! Byte-based progress bars on stderr, hidden when stderr is not a terminal.

use std::io::{IsTerminal, Read};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar counting bytes, or nothing when disabled.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar of `total` bytes labelled `what`; drawn only when `enabled` and stderr is a TTY.
    pub fn bytes(total: u64, what: &str, enabled: bool) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        if enabled && std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>14} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("static template is valid")
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        Progress { bar }
    }

    /// A bar of `total` steps (tokens, prompts) labelled `what`, drawn as [`Progress::bytes`].
    pub fn count(total: u64, what: &str, enabled: bool) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        if enabled && std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        bar.set_style(
            ProgressStyle::with_template("{msg:>14} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .expect("static template is valid")
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        Progress { bar }
    }

    /// Relabels the bar.
    pub fn set_message(&self, what: &str) {
        self.bar.set_message(what.to_string());
    }

    /// Counts `n` more bytes.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Wraps a reader so that everything read through it is counted.
    pub fn wrap_read<R: Read>(&self, r: R) -> impl Read {
        self.bar.wrap_read(r)
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
