//! Atomic output: everything is written into a temporary sibling (`OUT.partial-<pid>`),
//! synced, then renamed over OUT. On any error, Ctrl-C, SIGTERM or SIGHUP the partial
//! output is removed and an existing OUT is left untouched unless `--force` was given.
//!
//! Each output is guarded by a lock (`.OUT.lock` beside it, `flock`ed for the run and
//! removed at the end): a second run writing the same OUT is refused with the pid of the
//! first, and partial outputs left by runs that were killed (SIGKILL, OOM) are removed by
//! the next run under that lock.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs a handler for SIGINT, SIGTERM and SIGHUP that makes [`check_interrupted`]
/// fail, so that every command that writes cleans up alike; idempotent.
pub fn install_interrupt_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    });
}

/// Fails with [`Error::Interrupted`] once a termination signal arrived.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

/// The absolute, symlink-free form of `p`, which need not exist yet (its parent must).
fn resolved(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Some(c);
    }
    let name = p.file_name()?;
    let parent = match p.parent() {
        Some(q) if !q.as_os_str().is_empty() => q.canonicalize().ok()?,
        _ => std::env::current_dir().ok()?,
    };
    Some(parent.join(name))
}

/// True when `a` and `b` name the same path once resolved.
pub fn same_path(a: &Path, b: &Path) -> bool {
    matches!((resolved(a), resolved(b)), (Some(x), Some(y)) if x == y)
}

/// Refuses an output that is an input, lies inside one, or holds one (writing it would
/// destroy what is being read), as `cp` refuses to copy a file onto itself.
pub fn check_not_input(out: &Path, inputs: &[&Path]) -> Result<()> {
    let Some(o) = resolved(out) else {
        return Ok(());
    };
    for input in inputs {
        let Some(i) = resolved(input) else {
            continue;
        };
        let what = if o == i {
            "is the input"
        } else if o.starts_with(&i) {
            "lies inside the input"
        } else if i.starts_with(&o) {
            "holds the input"
        } else {
            continue;
        };
        return Err(Error::Output(format!(
            "{}: the output {what} {}; write it somewhere else",
            out.display(),
            input.display()
        )));
    }
    Ok(())
}

/// Where `target` is written while in progress: `(folder, name)`.
fn split_target(target: &Path) -> Result<(PathBuf, String)> {
    let name = target
        .file_name()
        .ok_or_else(|| Error::Output(format!("{} is not a usable output path", target.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::Output(format!(
            "{}: the output's folder does not exist",
            parent.display()
        )));
    }
    Ok((parent, name))
}

/// The exclusive lock on one output path, held while it is written.
struct OutputLock {
    path: PathBuf,
    /// Held open: the `flock` lasts as long as this descriptor.
    _file: File,
}

impl OutputLock {
    /// Takes the lock of `parent/name`, or says which process holds it.
    fn take(parent: &Path, name: &str, target: &Path) -> Result<OutputLock> {
        let path = parent.join(format!(".{name}.lock"));
        loop {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                return Err(Error::Output(format!(
                    "{} is being written by process {}; wait for it or write elsewhere",
                    target.display(),
                    if holder.is_empty() { "?" } else { holder }
                )));
            }
            // The holder before us may have removed the file after we opened it: the lock
            // counts only on the file that is still at the path.
            let same = match (file.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            file.set_len(0).map_err(|e| Error::io(&path, e))?;
            write!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
            return Ok(OutputLock { path, _file: file });
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still held (the descriptor closes after this), so that no later
        // run can lock a file about to vanish.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// True when process `pid` exists.
fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes `name.partial-<pid>` (and `.old`) siblings whose process is gone; under the
/// output's lock, so that no live run's partial output can be taken for a stale one.
fn remove_stale_partials(parent: &Path, name: &str) {
    let prefix = format!("{name}.partial-");
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file_name.strip_prefix(&prefix) else {
            continue;
        };
        let Ok(pid) = rest.trim_end_matches(".old").parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || alive(pid) {
            continue;
        }
        let p = e.path();
        let removed = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        if removed.is_ok() {
            eprintln!(
                "removed {}, left by process {pid}, which is no longer running",
                p.display()
            );
        }
    }
}

/// What every output being written holds: the lock, the target and the partial path.
struct Pending {
    target: PathBuf,
    partial: PathBuf,
    committed: bool,
    _lock: OutputLock,
}

impl Pending {
    /// Checks that `target` may be written, takes its lock, clears stale partials and
    /// returns its `.partial-<pid>` sibling.
    fn new(target: &Path, force: bool) -> Result<Pending> {
        let (parent, name) = split_target(target)?;
        let lock = OutputLock::take(&parent, &name, target)?;
        if target.symlink_metadata().is_ok() && !force {
            return Err(Error::Output(format!(
                "{} already exists; pass --force to replace it",
                target.display()
            )));
        }
        remove_stale_partials(&parent, &name);
        let partial = parent.join(format!("{name}.partial-{}", std::process::id()));
        Ok(Pending {
            target: target.to_path_buf(),
            partial,
            committed: false,
            _lock: lock,
        })
    }
}

/// A directory being written; removed on drop unless committed.
pub struct AtomicDir(Pending);

impl AtomicDir {
    /// Prepares to write `target`. Refuses an existing target unless `force`.
    pub fn create(target: &Path, force: bool) -> Result<AtomicDir> {
        let p = Pending::new(target, force)?;
        if p.partial.exists() {
            std::fs::remove_dir_all(&p.partial).map_err(|e| Error::io(&p.partial, e))?;
        }
        std::fs::create_dir(&p.partial).map_err(|e| Error::io(&p.partial, e))?;
        Ok(AtomicDir(p))
    }

    /// Where files go while writing.
    pub fn path(&self) -> &Path {
        &self.0.partial
    }

    /// Syncs the directory and renames it over the target.
    pub fn commit(mut self) -> Result<()> {
        let p = &self.0.partial;
        let dir = File::open(p).map_err(|e| Error::io(p, e))?;
        dir.sync_all().map_err(|e| Error::io(p, e))?;
        replace(p, &self.0.target)?;
        self.0.committed = true;
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.0.committed {
            let _ = std::fs::remove_dir_all(&self.0.partial);
        }
    }
}

/// A single file being written; removed on drop unless committed.
pub struct AtomicFile(Pending);

impl AtomicFile {
    /// Prepares to write `target`. Refuses an existing target unless `force`.
    pub fn create(target: &Path, force: bool) -> Result<AtomicFile> {
        Ok(AtomicFile(Pending::new(target, force)?))
    }

    /// Where the file goes while writing (the caller syncs it).
    pub fn path(&self) -> &Path {
        &self.0.partial
    }

    /// Writes `data` as the whole file, syncs it and renames it over the target.
    pub fn write_all(self, data: &[u8]) -> Result<()> {
        let p = self.path().to_path_buf();
        let mut f = File::create(&p).map_err(|e| Error::io(&p, e))?;
        f.write_all(data).map_err(|e| Error::io(&p, e))?;
        f.sync_all().map_err(|e| Error::io(&p, e))?;
        self.commit()
    }

    /// Renames the written file over the target.
    pub fn commit(mut self) -> Result<()> {
        replace(&self.0.partial, &self.0.target)?;
        self.0.committed = true;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.0.committed {
            let _ = std::fs::remove_file(&self.0.partial);
        }
    }
}

/// Renames `partial` over `target` in one step: `rename` replaces a file atomically, and
/// an existing folder is swapped with the new one (`renameat2(RENAME_EXCHANGE)`) before
/// the old one is deleted. Where the file system cannot swap, the old target is moved
/// aside first.
fn replace(partial: &Path, target: &Path) -> Result<()> {
    let existing = target.symlink_metadata().ok();
    match existing {
        Some(m) if m.is_dir() => {
            if exchange(partial, target).is_ok() {
                // `partial` now holds the old output.
                let _ = std::fs::remove_dir_all(partial);
                return Ok(());
            }
            let old = partial.with_extension("old");
            std::fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
            std::fs::rename(partial, target).map_err(|e| Error::io(target, e))?;
            let _ = std::fs::remove_dir_all(&old);
        }
        _ => std::fs::rename(partial, target).map_err(|e| Error::io(target, e))?,
    }
    Ok(())
}

/// Swaps two paths atomically (Linux `renameat2` with `RENAME_EXCHANGE`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; the call has no other preconditions.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
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
