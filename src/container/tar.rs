//! A tar index over bytes already in memory (the mapped `.nemo`): member name → byte range.
//!
//! Headers are read by the `tar` crate (ustar and GNU headers, PAX `path`/`size` records for
//! members over 8 GiB and long names, GNU long names, base-256 sizes), seeking over member
//! data; this module adds what reading in place needs: every member's data must lie inside
//! the file, sparse members are refused, names are normalised and may not escape.
//! Nothing is copied: every member is an offset and a length into the archive.

use tar::EntryType;

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
    let corrupt = |pos: u64, e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof || len - pos.min(len) < BLOCK {
            err(
                pos,
                format!("truncated header block ({e}): the file is truncated"),
            )
        } else {
            err(pos, format!("{e}: not a tar archive, or a corrupt one"))
        }
    };
    let mut archive = tar::Archive::new(std::io::Cursor::new(data));
    let entries = archive.entries_with_seek().map_err(|e| corrupt(0, e))?;
    let mut members = Vec::new();
    // Where the next header is expected: the end of the last member's padded data.
    let mut pos = 0u64;
    for entry in entries {
        let entry = entry.map_err(|e| corrupt(pos, e))?;
        let at = entry.raw_header_position();
        let offset = entry.raw_file_position();
        let size = entry.size();
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(err(
                at,
                format!(
                    "member data ({size} bytes) runs past the end of the archive ({len} bytes): the file is truncated"
                ),
            ));
        }
        pos = offset + size.div_ceil(BLOCK) * BLOCK;
        let raw_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = match entry.header().entry_type() {
            EntryType::Regular | EntryType::Continuous => MemberKind::File,
            EntryType::Directory => MemberKind::Dir,
            EntryType::GNUSparse => {
                return Err(err(
                    at,
                    format!("member `{raw_name}` is a sparse file, which cannot be read in place"),
                ))
            }
            EntryType::XGlobalHeader => continue,
            _ => MemberKind::Other,
        };
        let name = normalise_name(&raw_name).map_err(|m| err(at, m))?;
        members.push(Member {
            name,
            kind,
            offset,
            size,
        });
    }
    if members.is_empty() {
        return Err(err(0, "the archive holds no members".into()));
    }
    Ok(members)
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
}
