//! The `.nemo` container: one read-only mapping of the file and its tar index.
//!
//! Uncompressed archives (what NeMo writes since 1.7) are mapped in place. Gzip archives
//! (older NeMo) are decompressed once into a scratch file, which is then mapped the same way
//! and deleted when the archive is dropped. A folder (what `reshard --format safetensors`
//! writes) is opened as an archive too: each file is mapped on its own at a virtual offset,
//! so that every byte range the rest of the code holds means the same in both cases.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::container::tar::{self, Member, MemberKind};
use crate::dtype::Checksummed;
use crate::error::{Error, Result};
use crate::io::progress::Progress;

/// A byte range `(offset, len)` of the mapped input.
pub type Seg = (u64, u64);

/// An opened archive.
pub struct Mapped {
    path: PathBuf,
    display: String,
    /// Mappings at virtual offsets: one for a tar, one per file for a folder.
    maps: Vec<(u64, Mmap)>,
    /// The open files behind `maps` (same order), for kernel-side copies.
    files: Vec<File>,
    members: Vec<Member>,
    is_dir: bool,
    by_name: HashMap<String, usize>,
    compressed: bool,
    /// Whether stored CRC-32s are checked (`--no-crc` turns it off).
    crc: bool,
    /// Records whose CRC-32 has been checked (by offset).
    checked: std::sync::Mutex<std::collections::HashSet<u64>>,
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
    /// Do not check the CRC-32 of the records tensors are read from.
    pub no_crc: bool,
}

impl Mapped {
    /// Opens and indexes `path`.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Mapped> {
        let display = path.display().to_string();
        if path.is_dir() {
            return Mapped::open_dir(path, !opts.no_crc);
        }
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
        let (map, scratch, compressed, source) = if head == [0x1f, 0x8b] {
            let scratch = decompress(path, &file, len, opts)?;
            let map = map_file(scratch.as_file(), scratch.path())?;
            let source = scratch.reopen().map_err(|e| Error::io(scratch.path(), e))?;
            (map, Some(scratch), true, source)
        } else {
            (map_file(&file, path)?, None, false, file)
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
        Ok(Mapped {
            path: path.to_path_buf(),
            display,
            maps: vec![(0, map)],
            files: vec![source],
            members,
            is_dir: false,
            by_name,
            compressed,
            crc: !opts.no_crc,
            checked: Default::default(),
            _scratch: scratch,
        })
    }

    /// Opens a folder: every regular file below it becomes a member.
    fn open_dir(root: &Path, crc: bool) -> Result<Mapped> {
        let mut files = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
            for e in rd {
                let e = e.map_err(|e| Error::io(&dir, e))?;
                let ft = e.file_type().map_err(|err| Error::io(e.path(), err))?;
                if ft.is_dir() {
                    stack.push(e.path());
                } else if ft.is_file() {
                    files.push(e.path());
                }
            }
        }
        files.sort();
        let mut maps = Vec::new();
        let mut handles = Vec::new();
        let mut members = Vec::new();
        let mut by_name = HashMap::new();
        let mut base = 0u64;
        for f in files {
            let name = f
                .strip_prefix(root)
                .expect("below root")
                .to_string_lossy()
                .replace('\\', "/");
            let file = File::open(&f).map_err(|e| Error::io(&f, e))?;
            let size = file.metadata().map_err(|e| Error::io(&f, e))?.len();
            if size > 0 {
                maps.push((base, map_file(&file, &f)?));
                handles.push(file);
            }
            by_name.insert(name.clone(), members.len());
            members.push(Member {
                name,
                kind: MemberKind::File,
                offset: base,
                size,
            });
            base += size.div_ceil(4096) * 4096 + 4096;
        }
        Ok(Mapped {
            path: root.to_path_buf(),
            display: root.display().to_string(),
            maps,
            files: handles,
            members,
            is_dir: true,
            by_name,
            compressed: false,
            crc,
            checked: Default::default(),
            _scratch: None,
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

    /// True when opened from a folder rather than a tar.
    pub fn is_dir(&self) -> bool {
        self.is_dir
    }

    /// `len` bytes at `offset`. Every range handed out by the reader lies inside one
    /// member, so it is always inside one mapping; anything else is an internal bug.
    pub fn slice(&self, offset: u64, len: u64) -> &[u8] {
        match self.locate(offset) {
            Some((i, start)) => &self.maps[i].1[start..start + len as usize],
            None => {
                assert_eq!(len, 0, "byte range outside the archive");
                &[]
            }
        }
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
        self.slice(m.offset, m.size)
    }

    /// The mapping holding archive offset `offset` and the offset within it.
    fn locate(&self, offset: u64) -> Option<(usize, usize)> {
        let i = self
            .maps
            .partition_point(|(base, _)| *base <= offset)
            .saturating_sub(1);
        let (base, _) = self.maps.get(i)?;
        (offset >= *base).then(|| (i, (offset - base) as usize))
    }

    /// The file holding archive offset `offset`, and the offset within that file.
    pub fn file_at(&self, offset: u64) -> Option<(&File, u64)> {
        self.locate(offset)
            .map(|(i, start)| (&self.files[i], start as u64))
    }

    /// The page-aligned range of one mapping covering `offset..offset + len`.
    fn pages(&self, offset: u64, len: u64) -> Option<(&Mmap, usize, usize)> {
        let (i, start) = self.locate(offset).filter(|_| len > 0)?;
        let map = &self.maps[i].1;
        let page = start & !4095;
        let end = (start + len as usize).min(map.len());
        Some((map, page, end - page))
    }

    /// Checks a record's stored CRC-32 against its bytes, once per record (never under
    /// `no_crc`). The bytes are hashed from the mapping in 8 MiB chunks, in parallel, and
    /// combined: each chunk is mapped in one call and unmapped once hashed, so resident
    /// memory does not grow, nothing is copied, and the pages stay in the page cache for the
    /// copy that follows.
    pub fn check_record(&self, rec: &Checksummed) -> std::result::Result<(), String> {
        if !self.crc
            || self
                .checked
                .lock()
                .expect("not poisoned")
                .contains(&rec.offset)
        {
            return Ok(());
        }
        use rayon::prelude::*;
        const CHUNK: u64 = 8 << 20;
        let inside = self
            .locate(rec.offset)
            .is_some_and(|(i, start)| start as u64 + rec.len <= self.maps[i].1.len() as u64);
        if !inside {
            return Err(format!("record `{}` lies outside the input", rec.name));
        }
        let parts: Vec<crc32fast::Hasher> = (0..rec.len.div_ceil(CHUNK))
            .into_par_iter()
            .map(|c| {
                let at = rec.offset + c * CHUNK;
                let n = CHUNK.min(rec.len - c * CHUNK);
                self.populate(at, n);
                let mut h = crc32fast::Hasher::new();
                h.update(self.slice(at, n));
                self.release(at, n);
                h
            })
            .collect();
        let mut h = crc32fast::Hasher::new();
        for p in &parts {
            h.combine(p);
        }
        let got = h.finalize();
        if got != rec.crc32 {
            return Err(format!(
                "record `{}` fails its CRC-32 check (stored {:08x}, computed {got:08x}): the file is corrupt",
                rec.name, rec.crc32
            ));
        }
        self.checked
            .lock()
            .expect("not poisoned")
            .insert(rec.offset);
        Ok(())
    }

    /// Maps the pages of `offset..offset + len` in one call (instead of one page fault per
    /// 64 KiB while copying); a hint, so failure (old kernels) is ignored.
    pub fn populate(&self, offset: u64, len: u64) {
        if let Some((map, at, n)) = self.pages(offset, len) {
            let _ = map.advise_range(memmap2::Advice::PopulateRead, at, n);
        }
    }

    /// Maps every page of every file ahead of use ([`Mapped::populate`], 8 MiB chunks over
    /// the pool's threads) where the files take at most half of the memory the kernel
    /// reports available (`MemAvailable`), and says whether it did. Larger inputs are left
    /// to be faulted in as they are read: mapping them all would evict the first pages.
    pub fn populate_if_fits(&self) -> bool {
        use rayon::prelude::*;
        const CHUNK: u64 = 8 << 20;
        let total: u64 = self.maps.iter().map(|(_, m)| m.len() as u64).sum();
        if total == 0 || mem_available().is_none_or(|a| total > a / 2) {
            return false;
        }
        let chunks: Vec<(u64, u64)> = self
            .maps
            .iter()
            .flat_map(|(base, m)| {
                let len = m.len() as u64;
                (0..len.div_ceil(CHUNK))
                    .map(move |c| (base + c * CHUNK, CHUNK.min(len - c * CHUNK)))
            })
            .collect();
        chunks.par_iter().for_each(|&(at, n)| self.populate(at, n));
        true
    }

    /// Drops the resident pages of `offset..offset + len` from our mapping (they stay in
    /// the page cache), so that resident memory does not grow with the bytes read.
    pub fn release(&self, offset: u64, len: u64) {
        if let Some((map, at, n)) = self.pages(offset, len) {
            // SAFETY: read-only, file-backed mapping: DONTNEED only unmaps pages, which
            // are read again from the file on the next access.
            let _ =
                unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at, n) };
        }
    }

    /// Names of regular-file members, in archive order.
    pub fn file_names(&self) -> impl Iterator<Item = &str> {
        self.members
            .iter()
            .filter(|m| m.kind == MemberKind::File)
            .map(|m| m.name.as_str())
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (None where there is no such file).
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
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
