//! The `.nemo` container: one read-only mapping of the file and its tar index.
//!
//! Uncompressed archives (what NeMo writes since 1.7) are mapped in place. Gzip archives
//! (older NeMo) are decompressed once into a scratch file, which is then mapped the same way
//! and deleted when the archive is dropped.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::nemo::tar::{self, Member, MemberKind};
use crate::progress::Progress;

/// An opened archive.
pub struct Archive {
    path: PathBuf,
    display: String,
    map: Mmap,
    members: Vec<Member>,
    by_name: HashMap<String, usize>,
    compressed: bool,
    // Keeps the decompressed copy alive (and deletes it on drop).
    _scratch: Option<tempfile::NamedTempFile>,
}

/// Options for opening an archive.
#[derive(Debug, Default, Clone)]
pub struct OpenOptions {
    /// Where a gzip archive is decompressed; the system temp dir when `None`.
    pub scratch_dir: Option<PathBuf>,
    /// Show a progress bar while decompressing.
    pub progress: bool,
}

impl Archive {
    /// Opens and indexes `path`.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Archive> {
        let display = path.display().to_string();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::Tar {
                file: display,
                offset: 0,
                msg: "the file is empty".into(),
            });
        }
        let mut head = [0u8; 2];
        (&file)
            .read_exact(&mut head)
            .map_err(|e| Error::io(path, e))?;
        let (map, scratch, compressed) = if head == [0x1f, 0x8b] {
            let scratch = decompress(path, &file, len, opts)?;
            let map = map_file(scratch.as_file(), scratch.path())?;
            (map, Some(scratch), true)
        } else {
            (map_file(&file, path)?, None, false)
        };
        let members = tar::index(&map, &display)?;
        let mut by_name = HashMap::new();
        for (i, m) in members.iter().enumerate() {
            if m.kind == MemberKind::File && by_name.insert(m.name.clone(), i).is_some() {
                return Err(Error::Tar {
                    file: display,
                    offset: m.offset,
                    msg: format!("member `{}` appears twice", m.name),
                });
            }
        }
        Ok(Archive {
            path: path.to_path_buf(),
            display,
            map,
            members,
            by_name,
            compressed,
            _scratch: scratch,
        })
    }

    /// The path the archive was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The archive's path as shown in messages.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// True when the file was gzip-compressed.
    pub fn was_compressed(&self) -> bool {
        self.compressed
    }

    /// The whole mapped (decompressed) archive.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Every member, in archive order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// A regular-file member by normalised name.
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.by_name.get(name).map(|&i| &self.members[i])
    }

    /// The bytes of a member.
    pub fn data(&self, m: &Member) -> &[u8] {
        &self.map[m.offset as usize..(m.offset + m.size) as usize]
    }

    /// Drops our mapping's resident pages (they stay in the page cache), so that the
    /// process's resident memory does not grow with the bytes read so far.
    pub fn release_all(&self) {
        // SAFETY: the mapping is read-only and file-backed: DONTNEED only unmaps pages,
        // which are read again from the file on the next access.
        let _ = unsafe {
            self.map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        };
    }

    /// Names of regular-file members, in archive order.
    pub fn file_names(&self) -> impl Iterator<Item = &str> {
        self.members
            .iter()
            .filter(|m| m.kind == MemberKind::File)
            .map(|m| m.name.as_str())
    }
}

fn map_file(file: &File, path: &Path) -> Result<Mmap> {
    // SAFETY: the mapping is read-only; the file is opened by us and not modified while
    // mapped (a user truncating the input under us is the one case mmap cannot defend).
    unsafe { Mmap::map(file) }.map_err(|e| Error::io(path, e))
}

fn decompress(
    path: &Path,
    file: &File,
    len: u64,
    opts: &OpenOptions,
) -> Result<tempfile::NamedTempFile> {
    let dir = opts.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::Builder::new()
        .prefix(".steerlm-convert-gunzip-")
        .tempfile_in(&dir)
        .map_err(|e| Error::io(&dir, e))?;
    let bar = Progress::bytes(len, "decompressing", opts.progress);
    // A fresh handle: the caller's has already read the magic bytes.
    let _ = file;
    let input = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = bar.wrap_read(BufReader::with_capacity(1 << 20, input));
    let mut gz = flate2::read::MultiGzDecoder::new(reader);
    let mut out = BufWriter::with_capacity(1 << 20, scratch.as_file());
    std::io::copy(&mut gz, &mut out).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput
        | std::io::ErrorKind::InvalidData
        | std::io::ErrorKind::UnexpectedEof => Error::Tar {
            file: path.display().to_string(),
            offset: 0,
            msg: format!("gzip stream is corrupt or truncated: {e}"),
        },
        _ => Error::io(scratch.path(), e),
    })?;
    out.flush().map_err(|e| Error::io(scratch.path(), e))?;
    drop(out);
    bar.finish();
    Ok(scratch)
}
