//! The zip container of a torch checkpoint, read in place.
//!
//! torch writes every record *stored* (uncompressed) and pads local headers so that record
//! data starts on a 64-byte boundary; a record's bytes are therefore a slice of the file.
//! Sizes come from the central directory (ZIP64 included); local headers are only used for
//! the lengths that locate the data.

use crate::error::{Error, Result};

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CDH_SIG: u32 = 0x0201_4b50;
const LFH_SIG: u32 = 0x0403_4b50;

/// One record of the zip: its full name and where its data lies in the zip bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    /// Offset of the data relative to the start of the zip.
    pub offset: u64,
    pub size: u64,
}

/// The records of a zip held in `data`; `member` names the zip in errors.
pub fn read_records(data: &[u8], member: &str) -> Result<Vec<Record>> {
    let err = |offset: u64, msg: String| Error::Zip {
        member: member.to_string(),
        offset,
        msg,
    };
    let r = Reader { data };
    let eocd = find_eocd(data).ok_or_else(|| {
        err(
            data.len() as u64,
            "no end-of-central-directory record: not a zip file, or a truncated one".into(),
        )
    })?;
    let mut entries = r
        .u16(eocd + 10)
        .ok_or_else(|| err(eocd, "truncated end record".into()))? as u64;
    let mut cd_size = r
        .u32(eocd + 12)
        .ok_or_else(|| err(eocd, "truncated end record".into()))? as u64;
    let mut cd_offset = r
        .u32(eocd + 16)
        .ok_or_else(|| err(eocd, "truncated end record".into()))? as u64;
    if entries == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
        let loc = eocd
            .checked_sub(20)
            .filter(|&l| r.u32(l) == Some(ZIP64_LOCATOR_SIG))
            .ok_or_else(|| err(eocd, "ZIP64 sizes without a ZIP64 locator".into()))?;
        let z = r
            .u64(loc + 8)
            .ok_or_else(|| err(loc, "truncated ZIP64 locator".into()))?;
        if r.u32(z) != Some(ZIP64_EOCD_SIG) {
            return Err(err(
                z,
                "ZIP64 end record missing where the locator points".into(),
            ));
        }
        entries = r
            .u64(z + 32)
            .ok_or_else(|| err(z, "truncated ZIP64 end record".into()))?;
        cd_size = r
            .u64(z + 40)
            .ok_or_else(|| err(z, "truncated ZIP64 end record".into()))?;
        cd_offset = r
            .u64(z + 48)
            .ok_or_else(|| err(z, "truncated ZIP64 end record".into()))?;
    }
    if cd_offset
        .checked_add(cd_size)
        .is_none_or(|e| e > data.len() as u64)
    {
        return Err(err(
            cd_offset,
            format!("central directory ({cd_size} bytes at {cd_offset}) lies outside the file"),
        ));
    }
    // Each central entry is at least 46 bytes: a count larger than that is a lie.
    if entries > cd_size / 46 + 1 {
        return Err(err(
            cd_offset,
            format!("central directory claims {entries} entries in {cd_size} bytes"),
        ));
    }
    let mut records = Vec::with_capacity(entries as usize);
    let mut p = cd_offset;
    for _ in 0..entries {
        let rec = central_entry(&r, p, member)?;
        p = rec.1;
        records.push(rec.0);
    }
    Ok(records)
}

fn central_entry(r: &Reader, p: u64, member: &str) -> Result<(Record, u64)> {
    let err = |offset: u64, msg: String| Error::Zip {
        member: member.to_string(),
        offset,
        msg,
    };
    let trunc = || err(p, "truncated central directory entry".into());
    if r.u32(p) != Some(CDH_SIG) {
        return Err(err(
            p,
            "corrupt central directory (bad entry signature)".into(),
        ));
    }
    let flags = r.u16(p + 8).ok_or_else(trunc)?;
    let method = r.u16(p + 10).ok_or_else(trunc)?;
    let mut csize = r.u32(p + 20).ok_or_else(trunc)? as u64;
    let mut usize_ = r.u32(p + 24).ok_or_else(trunc)? as u64;
    let name_len = r.u16(p + 28).ok_or_else(trunc)? as u64;
    let extra_len = r.u16(p + 30).ok_or_else(trunc)? as u64;
    let comment_len = r.u16(p + 32).ok_or_else(trunc)? as u64;
    let mut lho = r.u32(p + 42).ok_or_else(trunc)? as u64;
    let name_bytes = r.slice(p + 46, name_len).ok_or_else(trunc)?;
    let name = String::from_utf8_lossy(name_bytes).into_owned();
    let extra = r.slice(p + 46 + name_len, extra_len).ok_or_else(trunc)?;
    // ZIP64 extended information: the 64-bit values present are exactly those whose
    // 32-bit fields are saturated, in the order usize, csize, offset.
    let mut e = 0usize;
    while e + 4 <= extra.len() {
        let id = u16::from_le_bytes([extra[e], extra[e + 1]]);
        let len = u16::from_le_bytes([extra[e + 2], extra[e + 3]]) as usize;
        let body = extra
            .get(e + 4..e + 4 + len)
            .ok_or_else(|| err(p, format!("extra field of `{name}` overruns")))?;
        if id == 0x0001 {
            let mut q = 0usize;
            let mut take = |field: &mut u64| -> Result<()> {
                if *field == 0xFFFF_FFFF {
                    let v = body
                        .get(q..q + 8)
                        .ok_or_else(|| err(p, format!("short ZIP64 field in `{name}`")))?;
                    *field = u64::from_le_bytes(v.try_into().expect("8 bytes"));
                    q += 8;
                }
                Ok(())
            };
            take(&mut usize_)?;
            take(&mut csize)?;
            take(&mut lho)?;
        }
        e += 4 + len;
    }
    if flags & 1 != 0 {
        return Err(err(p, format!("record `{name}` is encrypted")));
    }
    if method != 0 || csize != usize_ {
        return Err(err(
            p,
            format!("record `{name}` is compressed (method {method}); torch checkpoints store records uncompressed"),
        ));
    }
    let lh_trunc = || {
        err(
            lho,
            format!("local header of `{name}` lies outside the file"),
        )
    };
    if r.u32(lho) != Some(LFH_SIG) {
        return Err(err(lho, format!("bad local header signature for `{name}`")));
    }
    let lname = r.u16(lho + 26).ok_or_else(lh_trunc)? as u64;
    let lextra = r.u16(lho + 28).ok_or_else(lh_trunc)? as u64;
    let offset = lho + 30 + lname + lextra;
    if offset
        .checked_add(csize)
        .is_none_or(|end| end > r.data.len() as u64)
    {
        return Err(err(
            offset,
            format!(
                "data of `{name}` ({csize} bytes) runs past the end of the zip: truncated file"
            ),
        ));
    }
    let next = p + 46 + name_len + extra_len + comment_len;
    Ok((
        Record {
            name,
            offset,
            size: csize,
        },
        next,
    ))
}

fn find_eocd(data: &[u8]) -> Option<u64> {
    if data.len() < 22 {
        return None;
    }
    let lowest = data.len().saturating_sub(22 + 0xFFFF);
    (lowest..=data.len() - 22)
        .rev()
        .find(|&i| data[i..i + 4] == EOCD_SIG.to_le_bytes())
        .map(|i| i as u64)
}

struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn slice(&self, at: u64, n: u64) -> Option<&[u8]> {
        let end = at.checked_add(n)?;
        self.data
            .get(usize::try_from(at).ok()?..usize::try_from(end).ok()?)
    }
    fn u16(&self, at: u64) -> Option<u16> {
        self.slice(at, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&self, at: u64) -> Option<u32> {
        self.slice(at, 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&self, at: u64) -> Option<u64> {
        self.slice(at, 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}
