//! A torch checkpoint (`model_weights.ckpt`, `common.pt`) located inside the mapped archive:
//! its zip records, its pickle, and every tensor as a byte range of the archive.

use std::collections::HashMap;

use crate::container::zip;
use crate::dtype::{strided_extent, Checksummed, TensorRef};
use crate::error::{Error, Result};
use crate::torch::pickle::{self, Entry, PickledTensor};

/// One entry of a located state dict.
#[derive(Debug, Clone, PartialEq)]
pub enum StateEntry {
    Tensor(TensorRef),
    /// Not a tensor (e.g. `_extra_state` holding None or a BytesIO); says what it was.
    Other(String),
}

/// A state dict whose tensors point into the archive bytes.
#[derive(Debug, Clone)]
pub struct StateDict {
    /// The archive member it was read from.
    pub member: String,
    /// The zip's root folder (torch names it after the file it saved to).
    pub zip_root: String,
    pub entries: Vec<(String, StateEntry)>,
}

impl StateDict {
    /// Reads the torch zip `bytes` (a member named `member` whose data starts at archive
    /// offset `offset`); tensor ranges are archive offsets.
    pub fn read(bytes: &[u8], offset: u64, member: &str) -> Result<StateDict> {
        let (zip_root, records) = open_zip(bytes, member)?;
        let by_name = by_name(&zip_root, &records);
        let pkl_bytes = data_pkl(bytes, &zip_root, &by_name, member)?;
        let raw = pickle::load_state_dict(pkl_bytes, member)?;
        let mut entries = Vec::with_capacity(raw.len());
        for (name, e) in raw {
            let entry = match e {
                Entry::Tensor(t) => {
                    StateEntry::Tensor(locate(&t, &name, &by_name, offset, member)?)
                }
                Entry::Other(what) => StateEntry::Other(what),
            };
            entries.push((name, entry));
        }
        Ok(StateDict {
            member: member.to_string(),
            zip_root,
            entries,
        })
    }

    /// The tensors only, in order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorRef)> {
        self.entries.iter().filter_map(|(n, e)| match e {
            StateEntry::Tensor(t) => Some((n.as_str(), t)),
            StateEntry::Other(_) => None,
        })
    }
}

/// Reads a `torch.save(tensor)` blob (`bytes`, starting at mapping offset `offset`) and
/// locates its tensor; `name` names it in errors.
pub fn read_tensor(bytes: &[u8], offset: u64, member: &str, name: &str) -> Result<TensorRef> {
    let (zip_root, records) = open_zip(bytes, member)?;
    let by_name = by_name(&zip_root, &records);
    let pkl_bytes = data_pkl(bytes, &zip_root, &by_name, member)?;
    let t = pickle::load_tensor(pkl_bytes, member)?;
    locate(&t, name, &by_name, offset, member)
}

/// The zip's records and its root folder (torch names it after the file it saved to).
fn open_zip(bytes: &[u8], member: &str) -> Result<(String, Vec<zip::Record>)> {
    let records = zip::read_records(bytes, member)?;
    let first = records
        .first()
        .ok_or_else(|| zip_err(member, "the zip is empty".into()))?;
    let zip_root = match first.name.split_once('/') {
        Some((root, _)) => root.to_string(),
        None => {
            return Err(zip_err(
                member,
                format!("record `{}` is not under a root folder", first.name),
            ))
        }
    };
    Ok((zip_root, records))
}

fn zip_err(member: &str, msg: String) -> Error {
    Error::Zip {
        member: member.to_string(),
        offset: 0,
        msg,
    }
}

/// The records under the root, by their name below it.
fn by_name<'r>(zip_root: &str, records: &'r [zip::Record]) -> HashMap<&'r str, &'r zip::Record> {
    let mut out = HashMap::new();
    for r in records {
        if let Some(rest) = r
            .name
            .strip_prefix(zip_root)
            .and_then(|s| s.strip_prefix('/'))
        {
            out.insert(rest, r);
        }
    }
    out
}

/// The pickle record, after checking the byte order.
fn data_pkl<'b>(
    bytes: &'b [u8],
    zip_root: &str,
    by_name: &HashMap<&str, &zip::Record>,
    member: &str,
) -> Result<&'b [u8]> {
    if let Some(bo) = by_name.get("byteorder") {
        let v = &bytes[bo.offset as usize..(bo.offset + bo.size) as usize];
        if v != b"little" {
            return Err(zip_err(
                member,
                format!(
                    "byte order `{}` is not supported (only little-endian checkpoints)",
                    String::from_utf8_lossy(v)
                ),
            ));
        }
    }
    let pkl = by_name.get("data.pkl").ok_or_else(|| {
        zip_err(
            member,
            format!("no `{zip_root}/data.pkl` record: not a torch checkpoint"),
        )
    })?;
    Ok(&bytes[pkl.offset as usize..(pkl.offset + pkl.size) as usize])
}

fn locate(
    t: &PickledTensor,
    name: &str,
    records: &HashMap<&str, &zip::Record>,
    member_offset: u64,
    member: &str,
) -> Result<TensorRef> {
    let terr = |msg: String| Error::Tensor {
        member: member.to_string(),
        tensor: name.to_string(),
        msg,
    };
    let key = format!("data/{}", t.storage.key);
    let rec = records.get(key.as_str()).ok_or_else(|| {
        terr(format!(
            "its storage `{}` has no `{key}` record in the zip",
            t.storage.key
        ))
    })?;
    let storage_bytes = t
        .storage
        .nbytes()
        .ok_or_else(|| terr("storage size overflows".into()))?;
    if storage_bytes > rec.size {
        return Err(terr(format!(
            "its storage claims {storage_bytes} bytes but record `{key}` holds {}",
            rec.size
        )));
    }
    let esize = t.dtype.size() as u64;
    let extent = strided_extent(&t.shape, &t.stride)
        .ok_or_else(|| terr("shape × stride overflows".into()))?;
    let first = t
        .storage_offset
        .checked_mul(esize)
        .ok_or_else(|| terr("storage offset overflows".into()))?;
    let span = extent
        .checked_mul(esize)
        .ok_or_else(|| terr("tensor size overflows".into()))?;
    if first.checked_add(span).is_none_or(|end| end > rec.size) {
        return Err(terr(format!(
            "its elements (bytes {first}..{}) run past the end of its storage record `{key}` ({} bytes)",
            first.saturating_add(span),
            rec.size
        )));
    }
    Ok(TensorRef {
        dtype: t.dtype,
        shape: t.shape.clone(),
        stride: t.stride.clone(),
        offset: member_offset + rec.offset + first,
        span,
        record: Some(Checksummed {
            member: member.to_string(),
            name: rec.name.clone(),
            offset: member_offset + rec.offset,
            len: rec.size,
            crc32: rec.crc32,
        }),
    })
}
