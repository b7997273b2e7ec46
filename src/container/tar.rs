//! A tar index over bytes already in memory (the mapped `.nemo`): member name → byte range.
//!
//! Handles ustar and GNU headers, PAX extended headers (`path`, `size`; needed for members
//! over 8 GiB and long names), GNU long names (`L`), base-256 sizes and `./` prefixes.
//! Nothing is copied: every member is an offset and a length into the archive.

use crate::error::{Error, Result};

const BLOCK: u64 = 512;

/// What a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberKind {
    File,
    Dir,
    /// Links, devices, FIFOs: listed but never read.
    Other,
}

/// One member of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Normalised name: no `./` prefix, no trailing `/`.
    pub name: String,
    pub kind: MemberKind,
    /// Absolute offset of the member's data in the archive.
    pub offset: u64,
    pub size: u64,
}

/// Indexes every member of a tar archive held in `data`. `file` names the archive in errors.
pub fn index(data: &[u8], file: &str) -> Result<Vec<Member>> {
    let err = |offset: u64, msg: String| Error::Tar {
        file: file.to_string(),
        offset,
        msg,
    };
    let len = data.len() as u64;
    let mut members = Vec::new();
    let mut pos = 0u64;
    let mut pax_path: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    let mut long_name: Option<String> = None;
    let mut saw_end = false;
    while pos < len {
        if len - pos < BLOCK {
            return Err(err(pos, "truncated header block".into()));
        }
        let h = &data[pos as usize..(pos + BLOCK) as usize];
        if h.iter().all(|&b| b == 0) {
            saw_end = true;
            break;
        }
        verify_checksum(h).map_err(|m| err(pos, m))?;
        let typeflag = h[156];
        let header_size = parse_size(&h[124..136]).map_err(|m| err(pos + 124, m))?;
        let size = match (typeflag, pax_size) {
            (b'x' | b'g' | b'L' | b'K', _) => header_size,
            (_, Some(s)) => s,
            _ => header_size,
        };
        let data_start = pos + BLOCK;
        let padded = size
            .checked_add(BLOCK - 1)
            .map(|s| s / BLOCK * BLOCK)
            .ok_or_else(|| err(pos, "member size overflows".into()))?;
        if data_start.checked_add(size).is_none_or(|end| end > len) {
            return Err(err(
                pos,
                format!(
                    "member data ({size} bytes) runs past the end of the archive ({len} bytes): the file is truncated"
                ),
            ));
        }
        let body = &data[data_start as usize..(data_start + size) as usize];
        match typeflag {
            b'x' => {
                let (path, sz) = parse_pax(body).map_err(|m| err(data_start, m))?;
                if path.is_some() {
                    pax_path = path;
                }
                if sz.is_some() {
                    pax_size = sz;
                }
            }
            b'g' => {}
            b'L' => long_name = Some(c_string(body)),
            b'K' => {}
            _ => {
                let raw_name = match (pax_path.take(), long_name.take()) {
                    (Some(p), _) => p,
                    (None, Some(l)) => l,
                    (None, None) => header_name(h),
                };
                pax_size = None;
                let kind = match typeflag {
                    b'0' | 0 | b'7' => MemberKind::File,
                    b'5' => MemberKind::Dir,
                    b'S' => {
                        return Err(err(
                            pos,
                            format!(
                            "member `{raw_name}` is a sparse file, which cannot be read in place"
                        ),
                        ))
                    }
                    _ => MemberKind::Other,
                };
                let name = normalise_name(&raw_name).map_err(|m| err(pos, m))?;
                members.push(Member {
                    name,
                    kind,
                    offset: data_start,
                    size,
                });
            }
        }
        pos = data_start
            .checked_add(padded)
            .ok_or_else(|| err(pos, "member size overflows".into()))?;
    }
    if !saw_end && pos > len {
        return Err(err(len, "truncated archive".into()));
    }
    if members.is_empty() {
        return Err(err(0, "the archive holds no members".into()));
    }
    Ok(members)
}

fn verify_checksum(h: &[u8]) -> std::result::Result<(), String> {
    let stored = parse_octal(&h[148..156])
        .ok_or("header checksum field is not a number: not a tar archive, or a corrupt one")?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as u64;
        signed += (b as i8) as i64;
    }
    if stored == unsigned || stored as i64 == signed {
        Ok(())
    } else {
        Err("header checksum mismatch: not a tar archive, or a corrupt one".into())
    }
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let s: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    let mut v: u64 = 0;
    for b in s {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add((b - b'0') as u64)?;
    }
    Some(v)
}

/// A size field: octal, or GNU base-256 when the high bit of the first byte is set.
fn parse_size(field: &[u8]) -> std::result::Result<u64, String> {
    if field[0] & 0x80 != 0 {
        if field[0] & 0x40 != 0 {
            return Err("negative base-256 size".into());
        }
        let mut v: u64 = (field[0] & 0x3f) as u64;
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(b as u64))
                .ok_or("base-256 size overflows")?;
        }
        Ok(v)
    } else {
        parse_octal(field).ok_or_else(|| "size field is not an octal number".into())
    }
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn header_name(h: &[u8]) -> String {
    let name = c_string(&h[0..100]);
    let is_ustar = &h[257..263] == b"ustar\0";
    let prefix = if is_ustar {
        c_string(&h[345..500])
    } else {
        String::new()
    };
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    }
}

/// PAX records are `"<len> <key>=<value>\n"`; only `path` and `size` matter here.
fn parse_pax(body: &[u8]) -> std::result::Result<(Option<String>, Option<u64>), String> {
    let mut path = None;
    let mut size = None;
    let mut rest = body;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or("PAX record without a length")?;
        let n: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("PAX record length is not a number")?;
        if n <= sp + 1 || n > rest.len() {
            return Err("PAX record length out of range".into());
        }
        let rec = &rest[sp + 1..n];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        if let Some(eq) = rec.iter().position(|&b| b == b'=') {
            let (k, v) = (&rec[..eq], &rec[eq + 1..]);
            match k {
                b"path" => path = Some(String::from_utf8_lossy(v).into_owned()),
                b"size" => {
                    size = Some(
                        std::str::from_utf8(v)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .ok_or("PAX size is not a number")?,
                    )
                }
                _ => {}
            }
        }
        rest = &rest[n..];
    }
    Ok((path, size))
}

/// Strips `./` prefixes and a trailing `/`; refuses absolute names and `..` components
/// so that no member can ever name a path outside an output directory.
pub fn normalise_name(raw: &str) -> std::result::Result<String, String> {
    if raw.starts_with('/') || raw.starts_with('\\') {
        return Err(format!("member `{raw}` has an absolute path"));
    }
    let mut parts = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("member `{raw}` escapes the archive with `..`")),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_and_checked() {
        assert_eq!(normalise_name("./a/b").unwrap(), "a/b");
        assert_eq!(normalise_name("./").unwrap(), "");
        assert_eq!(normalise_name("a/").unwrap(), "a");
        assert!(normalise_name("/etc/passwd").is_err());
        assert!(normalise_name("./a/../../b").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size(b"00000001750\0").unwrap(), 1000);
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[7] = 0x02;
        f[11] = 0x01;
        assert_eq!(parse_size(&f).unwrap(), (2u64 << 32) + 1);
    }

    #[test]
    fn pax_records() {
        let body = b"31 path=./mp_rank_00/long.ckpt\n20 size=10000000000\n";
        let (p, s) = parse_pax(body).unwrap();
        assert_eq!(p.as_deref(), Some("./mp_rank_00/long.ckpt"));
        assert_eq!(s, Some(10_000_000_000));
    }
}
