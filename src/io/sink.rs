//! Output sinks: a buffered file that can also take byte ranges straight from another file
//! with `copy_file_range` (a kernel-side copy, as `cp` does), and plain writers.
//!
//! A [`FileSink`] starts the disk writing its bytes as it goes: every [`WINDOW`] written
//! are handed to the kernel's writeback at once (`sync_file_range(WRITE)`), and once more
//! than [`IN_FLIGHT`] are on their way, the oldest window is waited for. Left to itself,
//! the kernel starts writing only when a tenth of memory is dirty, so the disk idles while
//! the first gigabytes are produced and the final `fsync` waits for all of them; and a
//! producer faster than the disk fills memory with dirty pages. Here the disk is busy from
//! the first window, the final `fsync` finds little left, and at most `IN_FLIGHT` bytes are
//! dirty at a time.

use std::io::Write;

/// A destination that can take bytes straight from another file (a kernel-side copy, as
/// `cp` does), besides ordinary writes.
pub trait Sink: Write {
    /// Copies `len` bytes of `src` at `offset` to the end of the output; returns false
    /// (having written nothing) when this sink cannot do a kernel-side copy.
    fn copy_from(&mut self, src: &std::fs::File, offset: u64, len: u64) -> std::io::Result<bool>;
}

/// Any writer: never copies kernel-side.
pub struct Plain<W: Write>(pub W);

impl<W: Write> Write for Plain<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write> Sink for Plain<W> {
    fn copy_from(&mut self, _: &std::fs::File, _: u64, _: u64) -> std::io::Result<bool> {
        Ok(false)
    }
}

/// Bytes handed to the kernel's writeback at a time.
pub const WINDOW: u64 = 32 << 20;
/// Bytes that may be on their way to the disk before the oldest window is waited for.
pub const IN_FLIGHT: u64 = 256 << 20;

/// A buffered output file that also copies file ranges with `copy_file_range`, and
/// writes itself back to the disk as it grows (see the module's text).
pub struct FileSink {
    file: std::fs::File,
    buf: Vec<u8>,
    pub written: u64,
    /// Bytes of `written` that the kernel copied (`copy_file_range`).
    pub copied: u64,
    /// File offset of the first byte written through this sink.
    base: u64,
    /// The file's position past `base` (bytes in `buf` not counted), and the furthest
    /// it has been: a sink that seeks back to patch a header writes back only once.
    pos: u64,
    high: u64,
    /// Bytes past `base` handed to writeback, and those waited for.
    started: u64,
    waited: u64,
    /// False once the file system refused `sync_file_range`: then the kernel decides.
    writeback: bool,
    /// [`WINDOW`] and [`IN_FLIGHT`] (smaller in tests).
    window: u64,
    in_flight: u64,
}

impl FileSink {
    pub fn new(file: std::fs::File) -> FileSink {
        FileSink::with_windows(file, WINDOW, IN_FLIGHT)
    }

    /// A sink handing `window` bytes at a time to writeback, with at most `in_flight`
    /// of them on their way.
    pub fn with_windows(mut file: std::fs::File, window: u64, in_flight: u64) -> FileSink {
        use std::io::Seek;
        let base = file.stream_position().unwrap_or(0);
        FileSink {
            file,
            buf: Vec::with_capacity(8 << 20),
            written: 0,
            copied: 0,
            base,
            pos: 0,
            high: 0,
            started: 0,
            waited: 0,
            writeback: true,
            window,
            in_flight,
        }
    }

    /// Flushes and returns the file.
    pub fn into_file(mut self) -> std::io::Result<std::fs::File> {
        self.flush()?;
        Ok(self.file)
    }

    /// The file's position moved on by `n` bytes just written to it.
    fn advance(&mut self, n: u64) {
        self.pos += n;
        self.high = self.high.max(self.pos);
    }

    /// Bytes handed to writeback, and bytes waited for, so far.
    pub fn written_back(&self) -> (u64, u64) {
        (self.started, self.waited)
    }

    /// Hands what was written since the last call to writeback once it is a window or
    /// more, and waits for the oldest windows while more than `in_flight` bytes are on
    /// their way.
    fn write_back(&mut self) -> std::io::Result<()> {
        let end = self.high;
        if !self.writeback || end - self.started < self.window {
            return Ok(());
        }
        if let Err(e) = self.range(self.started, end, libc::SYNC_FILE_RANGE_WRITE) {
            // Not every file system can: then the kernel's own writeback does the job.
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::ESPIPE)
            ) {
                self.writeback = false;
                return Ok(());
            }
            return Err(e);
        }
        self.started = end;
        while self.started - self.waited > self.in_flight {
            let to = self.waited + self.window;
            let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            self.range(self.waited, to, wait)?;
            self.waited = to;
        }
        Ok(())
    }

    /// `sync_file_range` over the sink's bytes `from..to`.
    fn range(&self, from: u64, to: u64, flags: libc::c_uint) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let (off, len) = (
            (self.base + from) as libc::off64_t,
            (to - from) as libc::off64_t,
        );
        // SAFETY: a valid descriptor; the call only reads its arguments.
        if unsafe { libc::sync_file_range(self.file.as_raw_fd(), off, len, flags) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Write for FileSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.buf.capacity() {
            self.flush()?;
        }
        if data.len() >= self.buf.capacity() {
            self.file.write_all(data)?;
            self.advance(data.len() as u64);
            self.written += data.len() as u64;
            self.write_back()?;
        } else {
            self.buf.extend_from_slice(data);
            self.written += data.len() as u64;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.write_all(&self.buf)?;
        self.advance(self.buf.len() as u64);
        self.buf.clear();
        self.write_back()
    }
}

impl Sink for FileSink {
    fn copy_from(&mut self, src: &std::fs::File, offset: u64, len: u64) -> std::io::Result<bool> {
        use std::os::fd::AsRawFd;
        self.flush()?;
        let mut off = offset as libc::loff_t;
        let mut left = len;
        while left > 0 {
            // SAFETY: valid descriptors; the kernel reads `off` and advances our file position.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off,
                    self.file.as_raw_fd(),
                    std::ptr::null_mut(),
                    left as usize,
                    0,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                let unsupported = matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                );
                if unsupported && left == len {
                    return Ok(false);
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "source file shorter than expected",
                ));
            }
            left -= n as u64;
        }
        self.advance(len);
        self.written += len;
        self.copied += len;
        self.write_back()?;
        Ok(true)
    }
}

/// Seeking flushes the buffer first; asking for the position does not.
impl std::io::Seek for FileSink {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        if to == std::io::SeekFrom::Current(0) {
            return Ok(self.base + self.pos + self.buf.len() as u64);
        }
        self.flush()?;
        let at = self.file.seek(to)?;
        // Before `base` (where writeback does not look) counts as its start.
        self.pos = at.saturating_sub(self.base);
        Ok(at)
    }
}

/// Counts bytes written through it.
pub struct Counting<W: Write> {
    pub inner: W,
    pub written: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_the_default_windows_a_few_mib_are_left_to_the_kernel() {
        let mut w = FileSink::new(tempfile::tempfile().unwrap());
        w.write_all(&[7u8; 3 << 20]).unwrap();
        w.flush().unwrap();
        assert_eq!(w.written_back(), (0, 0));
    }

    #[test]
    fn a_file_sink_seeks_back_to_patch_and_writes_back_once() {
        use std::io::{Seek, SeekFrom};
        let f = tempfile::tempfile().unwrap();
        let (window, in_flight) = (4 << 10, 16 << 10);
        let mut w = FileSink::with_windows(f, window, in_flight);
        let mut expect = Vec::new();
        for i in 0..40u32 {
            // A record: a header to patch, its data, then the patch.
            let at = w.stream_position().unwrap();
            assert_eq!(at, expect.len() as u64);
            w.write_all(&[0u8; 4]).unwrap();
            let data: Vec<u8> = (0..3001 + i * 97).map(|j| (j % 241) as u8).collect();
            w.write_all(&data).unwrap();
            let end = w.stream_position().unwrap();
            w.seek(SeekFrom::Start(at)).unwrap();
            w.write_all(&i.to_le_bytes()).unwrap();
            assert_eq!(w.stream_position().unwrap(), at + 4);
            w.seek(SeekFrom::Start(end)).unwrap();
            expect.extend_from_slice(&i.to_le_bytes());
            expect.extend_from_slice(&data);
            let (started, waited) = w.written_back();
            assert!(started <= expect.len() as u64 && waited <= started);
            assert!(started - waited <= in_flight);
        }
        w.flush().unwrap();
        let len = expect.len() as u64;
        assert!(w.written_back().0 + window > len);
        let mut f = w.into_file().unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut got).unwrap();
        assert_eq!(got, expect);
    }

    #[test]
    fn a_file_sink_writes_itself_back_by_windows_and_keeps_every_byte() {
        use std::io::Seek;
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
        std::fs::write(&src_path, &data).unwrap();
        let src = std::fs::File::open(&src_path).unwrap();
        let out = dir.path().join("out");
        // The sink starts after a header written by someone else: its windows are file
        // offsets from there.
        let mut f = std::fs::File::create(&out).unwrap();
        f.write_all(b"header").unwrap();
        assert_eq!(f.stream_position().unwrap(), 6);
        let (window, in_flight) = (64 << 10, 256 << 10);
        let mut w = FileSink::with_windows(f, window, in_flight);
        let mut expect = b"header".to_vec();
        for (i, chunk) in data.chunks(300_001).enumerate() {
            if i % 3 == 1 {
                assert!(w
                    .copy_from(&src, (i * 300_001) as u64, chunk.len() as u64)
                    .unwrap());
            } else {
                // Small writes through the buffer and one large one straight to the file.
                for piece in chunk.chunks(if i % 3 == 0 { 1000 } else { chunk.len() }) {
                    w.write_all(piece).unwrap();
                }
            }
            expect.extend_from_slice(chunk);
            let (started, waited) = w.written_back();
            assert!(waited <= started && started <= w.written);
            assert!(started - waited <= in_flight, "{started} - {waited}");
            assert_eq!(waited % window, 0);
        }
        w.flush().unwrap();
        let (started, waited) = w.written_back();
        assert!(started + window > w.written, "{started} of {}", w.written);
        assert!(
            waited + in_flight + window > w.written,
            "{waited} of {}",
            w.written
        );
        w.into_file().unwrap().sync_all().unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), expect);
    }

    #[test]
    fn a_file_sink_copies_kernel_side_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src_path, &data).unwrap();
        let src = std::fs::File::open(&src_path).unwrap();
        let out = dir.path().join("out");
        let mut w = FileSink::new(std::fs::File::create(&out).unwrap());
        w.write_all(b"head").unwrap();
        assert!(
            w.copy_from(&src, 5, 2 << 20).unwrap(),
            "copy_file_range was not used"
        );
        w.write_all(b"tail").unwrap();
        assert_eq!((w.written, w.copied), (8 + (2 << 20), 2 << 20));
        w.into_file().unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(&got[..4], b"head");
        assert_eq!(&got[4..4 + (2 << 20)], &data[5..5 + (2 << 20)]);
        assert_eq!(&got[4 + (2 << 20)..], b"tail");
        let mut plain = Plain(Vec::new());
        assert!(!plain.copy_from(&src, 0, 10).unwrap());
        assert!(plain.0.is_empty());
    }
}
