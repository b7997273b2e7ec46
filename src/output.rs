//! Atomic output: everything is written into a temporary sibling (`OUT.partial-<pid>`),
//! synced, then renamed over OUT. On any error or Ctrl-C the partial output is removed and
//! an existing OUT is left untouched unless `--force` was given.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs a Ctrl-C handler that makes [`check_interrupted`] fail; idempotent.
pub fn install_interrupt_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    });
}

/// Fails with [`Error::Interrupted`] once Ctrl-C was pressed.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

/// Checks that `target` may be written and returns its `.partial-<pid>` sibling.
fn partial_sibling(target: &Path, force: bool) -> Result<PathBuf> {
    if target.exists() && !force {
        return Err(Error::Usage(format!(
            "{} already exists; pass --force to replace it",
            target.display()
        )));
    }
    let name = target
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{} is not a usable output path", target.display())))?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::Usage(format!(
            "{}: the output's folder does not exist",
            parent.display()
        )));
    }
    Ok(parent.join(format!(
        "{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// A directory being written; removed on drop unless committed.
pub struct AtomicDir {
    target: PathBuf,
    partial: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Prepares to write `target`. Refuses an existing target unless `force`.
    pub fn create(target: &Path, force: bool) -> Result<AtomicDir> {
        let partial = partial_sibling(target, force)?;
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
        }
        std::fs::create_dir(&partial).map_err(|e| Error::io(&partial, e))?;
        Ok(AtomicDir {
            target: target.to_path_buf(),
            partial,
            committed: false,
        })
    }

    /// Where files go while writing.
    pub fn path(&self) -> &Path {
        &self.partial
    }

    /// Syncs the directory and renames it over the target.
    pub fn commit(mut self) -> Result<()> {
        let dir = std::fs::File::open(&self.partial).map_err(|e| Error::io(&self.partial, e))?;
        dir.sync_all().map_err(|e| Error::io(&self.partial, e))?;
        replace(&self.partial, &self.target)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.partial);
        }
    }
}

/// A single file being written; removed on drop unless committed.
pub struct AtomicFile {
    target: PathBuf,
    partial: PathBuf,
    committed: bool,
}

impl AtomicFile {
    /// Prepares to write `target`. Refuses an existing target unless `force`.
    pub fn create(target: &Path, force: bool) -> Result<AtomicFile> {
        let partial = partial_sibling(target, force)?;
        Ok(AtomicFile {
            target: target.to_path_buf(),
            partial,
            committed: false,
        })
    }

    /// Where the file goes while writing (the caller syncs it).
    pub fn path(&self) -> &Path {
        &self.partial
    }

    /// Renames the written file over the target.
    pub fn commit(mut self) -> Result<()> {
        replace(&self.partial, &self.target)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// Renames `partial` over `target`, moving an existing target (file or folder) aside first
/// and deleting it only after the rename.
fn replace(partial: &Path, target: &Path) -> Result<()> {
    if target.exists() {
        let old = partial.with_extension("old");
        std::fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
        std::fs::rename(partial, target).map_err(|e| Error::io(target, e))?;
        let _ = if old.is_dir() {
            std::fs::remove_dir_all(&old)
        } else {
            std::fs::remove_file(&old)
        };
    } else {
        std::fs::rename(partial, target).map_err(|e| Error::io(target, e))?;
    }
    Ok(())
}

/// Peak resident set size of this process so far, in bytes: `VmHWM` of /proc/self/status
/// (getrusage's maxrss survives exec, so it would count a parent's memory).
pub fn peak_rss() -> u64 {
    let from_proc = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        });
    from_proc.unwrap_or_else(|| {
        // SAFETY: getrusage fills a plain struct we own.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } == 0 {
            u.ru_maxrss as u64 * 1024
        } else {
            0
        }
    })
}
