//! A tar writer for archives NeMo and Python's `tarfile` read: ustar headers, a PAX
//! extended header when a name is longer than 100 bytes or a member is 8 GiB or more,
//! fixed modes and mtime (so that output is deterministic).

use std::io::{self, Seek, Write};

const BLOCK: usize = 512;
const MAX_OCTAL_SIZE: u64 = 0o77777777777;

/// Writes members one after another into `w`.
pub struct TarWriter<W: Write + Seek> {
    w: W,
    open: Option<(u64, u64)>,
}

impl<W: Write + Seek> TarWriter<W> {
    pub fn new(w: W) -> Self {
        TarWriter { w, open: None }
    }

    /// A directory member (`name` without the trailing slash).
    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.header(&format!("{name}/"), 0, b'5', 0o755)
    }

    /// A whole file member.
    pub fn file(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.begin_file(name, data.len() as u64)?;
        self.w.write_all(data)?;
        self.end_file()
    }

    /// Starts a file member of `size` bytes; write its data through [`Self::inner`], then
    /// call [`Self::end_file`].
    pub fn begin_file(&mut self, name: &str, size: u64) -> io::Result<()> {
        self.header(name, size, b'0', 0o644)?;
        self.open = Some((self.w.stream_position()?, size));
        Ok(())
    }

    /// The underlying writer, positioned at the open member's data.
    pub fn inner(&mut self) -> &mut W {
        &mut self.w
    }

    /// Ends the open file member: checks its size and pads to the block size.
    pub fn end_file(&mut self) -> io::Result<()> {
        let (start, size) = self
            .open
            .take()
            .ok_or_else(|| io::Error::other("no open tar member"))?;
        let pos = self.w.stream_position()?;
        if pos != start + size {
            return Err(io::Error::other(format!(
                "tar member: wrote {} bytes, declared {size}",
                pos - start
            )));
        }
        let pad = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
        self.w.write_all(&vec![0; pad])
    }

    /// Writes the end-of-archive blocks and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.w.write_all(&[0; 2 * BLOCK])?;
        // Python's tarfile pads archives to a multiple of 10240 bytes; so do we.
        let pos = self.w.stream_position()?;
        let pad = (10240 - pos % 10240) % 10240;
        self.w.write_all(&vec![0; pad as usize])?;
        self.w.flush()?;
        Ok(self.w)
    }

    fn header(&mut self, name: &str, size: u64, kind: u8, mode: u32) -> io::Result<()> {
        let mut pax = String::new();
        if name.len() > 100 {
            pax.push_str(&pax_record("path", name));
        }
        if size > MAX_OCTAL_SIZE {
            pax.push_str(&pax_record("size", &size.to_string()));
        }
        if !pax.is_empty() {
            let short = format!("./PaxHeaders/{}", &name[name.len().saturating_sub(60)..]);
            self.raw_header(&short, pax.len() as u64, b'x', 0o644)?;
            self.w.write_all(pax.as_bytes())?;
            let pad = (BLOCK - pax.len() % BLOCK) % BLOCK;
            self.w.write_all(&vec![0; pad])?;
        }
        let field_size = if size > MAX_OCTAL_SIZE { 0 } else { size };
        let short_name = if name.len() > 100 {
            &name[name.len() - 100..]
        } else {
            name
        };
        self.raw_header(short_name, field_size, kind, mode)
    }

    fn raw_header(&mut self, name: &str, size: u64, kind: u8, mode: u32) -> io::Result<()> {
        let mut h = [0u8; BLOCK];
        let n = name.as_bytes();
        h[..n.len().min(100)].copy_from_slice(&n[..n.len().min(100)]);
        octal(&mut h[100..108], mode as u64);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], 0);
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| b as u64).sum();
        let ck = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(ck.as_bytes());
        self.w.write_all(&h)
    }
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{:0width$o}\0", v, width = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}

/// A PAX record `"<len> key=value\n"`, whose length counts its own digits.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while len.to_string().len() + body.len() != len {
        len = len.to_string().len() + body.len();
    }
    format!("{len}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::tar::{index, MemberKind};

    #[test]
    fn round_trip_with_long_names() {
        let long = format!("./{}/model_weights.ckpt", "x".repeat(120));
        let mut t = TarWriter::new(io::Cursor::new(Vec::new()));
        t.dir(".").unwrap();
        t.file("./model_config.yaml", b"a: 1\n").unwrap();
        t.file(&long, &[7u8; 1000]).unwrap();
        let bytes = t.finish().unwrap().into_inner();
        assert_eq!(bytes.len() % 10240, 0);
        let m = index(&bytes, "t").unwrap();
        assert_eq!(m[0].kind, MemberKind::Dir);
        assert_eq!(m[1].name, "model_config.yaml");
        assert_eq!(m[2].name, long.trim_start_matches("./"));
        assert_eq!(m[2].size, 1000);
        assert_eq!(&bytes[m[2].offset as usize..][..3], &[7, 7, 7]);
        assert_eq!(pax_record("path", "abc"), "12 path=abc\n");
    }

    #[test]
    fn pax_size_overrides_the_header_and_gnu_long_names_are_read() {
        // A PAX `size` record (what Python writes for members of 8 GiB and more) with a
        // zero ustar size field, then a GNU `L` long name for the next member.
        let mut t = TarWriter::new(io::Cursor::new(Vec::new()));
        let pax = pax_record("size", "700");
        t.raw_header("./PaxHeaders/big", pax.len() as u64, b'x', 0o644)
            .unwrap();
        t.w.write_all(pax.as_bytes()).unwrap();
        t.w.write_all(&vec![0; BLOCK - pax.len()]).unwrap();
        t.raw_header("./big.ckpt", 0, b'0', 0o644).unwrap();
        t.w.write_all(&[1u8; 700]).unwrap();
        t.w.write_all(&vec![0; 2 * BLOCK - 700]).unwrap();
        let long = format!("./{}/x.ckpt", "d".repeat(150));
        t.raw_header("././@LongLink", long.len() as u64 + 1, b'L', 0o644)
            .unwrap();
        t.w.write_all(long.as_bytes()).unwrap();
        t.w.write_all(&vec![0; BLOCK - long.len() - 1 + 1]).unwrap();
        t.raw_header("truncated-name", 3, b'0', 0o644).unwrap();
        t.w.write_all(&[2u8; 3]).unwrap();
        t.w.write_all(&vec![0; BLOCK - 3]).unwrap();
        let bytes = t.finish().unwrap().into_inner();
        let m = index(&bytes, "t").unwrap();
        assert_eq!((m[0].name.as_str(), m[0].size), ("big.ckpt", 700));
        assert_eq!(&bytes[m[0].offset as usize..][..700], &[1u8; 700][..]);
        assert_eq!(m[1].name, long.trim_start_matches("./"));
        assert_eq!(m[1].size, 3);
    }
}
