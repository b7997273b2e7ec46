//! Output sinks: a buffered file that can also take byte ranges straight from another file
//! with `copy_file_range` (a kernel-side copy, as `cp` does), and plain writers.

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

/// A buffered output file that also copies file ranges with `copy_file_range`.
pub struct FileSink {
    file: std::fs::File,
    buf: Vec<u8>,
    pub written: u64,
    /// Bytes of `written` that the kernel copied (`copy_file_range`).
    pub copied: u64,
}

impl FileSink {
    pub fn new(file: std::fs::File) -> FileSink {
        FileSink {
            file,
            buf: Vec::with_capacity(8 << 20),
            written: 0,
            copied: 0,
        }
    }

    /// Flushes and returns the file.
    pub fn into_file(mut self) -> std::io::Result<std::fs::File> {
        self.flush()?;
        Ok(self.file)
    }
}

impl Write for FileSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.buf.capacity() {
            self.flush()?;
        }
        if data.len() >= self.buf.capacity() {
            self.file.write_all(data)?;
        } else {
            self.buf.extend_from_slice(data);
        }
        self.written += data.len() as u64;
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
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
        self.written += len;
        self.copied += len;
        Ok(true)
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
