//! The zip container of a torch checkpoint, read in place.
//!
//! torch writes every record *stored* (uncompressed) and pads local headers so that record
//! data starts on a 64-byte boundary; a record's bytes are therefore a slice of the file.
//! The `zip` crate reads the central directory (ZIP64 included) and each local header;
//! this module refuses what cannot be read in place and checks every record lies inside
//! the file.

use std::io::Cursor;

use zip::result::ZipError;
use zip::{CompressionMethod, ZipArchive};

use crate::error::{Error, Result};

/// One record of the zip: its full name and where its data lies in the zip bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    /// Offset of the data relative to the start of the zip.
    pub offset: u64,
    pub size: u64,
    /// The CRC-32 the central directory stores for the record's bytes.
    pub crc32: u32,
}

/// The records of a zip held in `data`; `member` names the zip in errors.
pub fn read_records(data: &[u8], member: &str) -> Result<Vec<Record>> {
    let err = |offset: u64, msg: String| Error::Zip {
        member: member.to_string(),
        offset,
        msg,
    };
    let len = data.len() as u64;
    let mut z = ZipArchive::new(Cursor::new(data)).map_err(|e| {
        let text = e.to_string();
        let lower = text.to_lowercase();
        if lower.contains("eocd") || lower.contains("end of central directory") {
            err(
                len,
                format!("no end-of-central-directory record: not a zip file, or a truncated one ({text})"),
            )
        } else {
            err(0, format!("corrupt central directory ({text})"))
        }
    })?;
    let mut records = Vec::with_capacity(z.len());
    for i in 0..z.len() {
        let f = z.by_index_raw(i).map_err(|e| match e {
            ZipError::Io(e) => err(
                0,
                format!("record {i} lies outside the file ({e}): truncated file"),
            ),
            e => err(0, format!("record {i}: {e}")),
        })?;
        let name = f
            .name()
            .map_err(|e| err(0, format!("record {i}: {e}")))?
            .into_owned();
        if f.encrypted() {
            return Err(err(0, format!("record `{name}` is encrypted")));
        }
        let method = f.compression();
        if method != CompressionMethod::Stored || f.compressed_size() != f.size() {
            return Err(err(
                0,
                format!("record `{name}` is compressed ({method}); torch checkpoints store records uncompressed"),
            ));
        }
        let size = f.compressed_size();
        let crc32 = f.crc32();
        let offset = f
            .data_start()
            .ok_or_else(|| err(0, format!("no local header for `{name}`")))?;
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(err(
                offset,
                format!(
                    "data of `{name}` ({size} bytes) runs past the end of the zip: truncated file"
                ),
            ));
        }
        records.push(Record {
            name,
            offset,
            size,
            crc32,
        });
    }
    Ok(records)
}
