//! The `torch_dist` backend of distributed checkpoints (megatron-core on
//! `torch.distributed.checkpoint`): a `.metadata` pickle and `__<rank>_<n>.distcp` files.
//!
//! `.metadata` maps every key to its global shape, dtype and chunks, and every chunk to
//! `(file, offset, length)`. Each tensor chunk is a `torch.save(tensor)` blob (a torch zip)
//! at that offset, read in place with the torch zip reader; torch's raw-bytes format (no
//! zip) is taken when the item is exactly the chunk's bytes. Byte items (TransformerEngine
//! `_extra_state`, keys `<key>/shard_<i>_<n>`) are listed, never unpickled. Items saved
//! with stream transforms (torch ≥ 2.7 extensions such as compression) are refused.
//!
//! [`read`] reads either backend, as `metadata.json` names it.

use std::collections::HashMap;

use serde::Deserialize;

use crate::container::dist::{DistArray, DistCheckpoint, DistChunk};
use crate::container::mapped::Mapped;
use crate::dtype::{contiguous_strides, TensorRef};
use crate::error::{Error, Result};
use crate::torch::pickle::{self, DcpStorage};

#[derive(Deserialize)]
struct Metadata {
    sharded_backend: String,
}

/// Reads the distributed checkpoint under `dir/` of `archive` (`dir/metadata.json` names
/// its backend).
pub fn read(archive: &Mapped, dir: &str) -> Result<DistCheckpoint> {
    let file = archive.display().to_string();
    let err = |msg: String| Error::DistCheckpoint {
        file: file.clone(),
        msg,
    };
    let name = format!("{dir}/metadata.json");
    let meta = archive
        .member(&name)
        .ok_or_else(|| err(format!("{name} is missing")))?;
    let meta: Metadata =
        serde_json::from_slice(archive.data(meta)).map_err(|e| err(format!("{name}: {e}")))?;
    match meta.sharded_backend.as_str() {
        "zarr" => crate::container::zarr::read(archive, dir, &err),
        "torch_dist" => read_torch_dist(archive, dir, &err),
        other => Err(err(format!(
            "sharded backend `{other}` is not supported (zarr and torch_dist are)"
        ))),
    }
}

/// Reads the `torch_dist` checkpoint under `dir/` of `archive`; `err` builds the error.
fn read_torch_dist(
    archive: &Mapped,
    dir: &str,
    err: &dyn Fn(String) -> Error,
) -> Result<DistCheckpoint> {
    let file = archive.display().to_string();
    let meta_name = format!("{dir}/.metadata");
    let meta = archive
        .member(&meta_name)
        .ok_or_else(|| err(format!("{meta_name} is missing")))?;
    let md =
        pickle::load_dcp_metadata(archive.data(meta), &meta_name).map_err(|e| e.in_file(&file))?;

    let mut storage: HashMap<(&str, Option<&[u64]>), &DcpStorage> = HashMap::new();
    for s in &md.storage {
        if storage
            .insert((s.fqn.as_str(), s.chunk.as_deref()), s)
            .is_some()
        {
            return Err(err(format!(
                "{meta_name}: `{}` chunk {:?} is stored twice",
                s.fqn,
                s.chunk.as_deref().unwrap_or_default()
            )));
        }
    }

    let mut arrays = Vec::new();
    let mut objects: Vec<(String, usize)> = Vec::new();
    let mut note_object = |key: &str| {
        let base = key.split_once("/shard_").map_or(key, |(b, _)| b);
        match objects.iter_mut().find(|(k, _)| k == base) {
            Some((_, n)) => *n += 1,
            None => objects.push((base.to_string(), 1)),
        }
    };
    for key in &md.bytes {
        note_object(key);
    }
    for t in &md.tensors {
        // Optimizer state of a training checkpoint is not part of the model.
        if t.key.starts_with("optimizer.") {
            note_object(&t.key);
            continue;
        }
        let mut chunks = Vec::with_capacity(t.chunks.len());
        for (offsets, sizes) in &t.chunks {
            let s = storage
                .get(&(t.key.as_str(), Some(offsets.as_slice())))
                .ok_or_else(|| {
                    err(format!(
                        "{meta_name}: chunk {offsets:?} of `{}` has no storage entry",
                        t.key
                    ))
                })?;
            let data = read_chunk(archive, dir, s, &t.key, sizes, t.dtype, err)?;
            chunks.push(DistChunk {
                offsets: offsets.clone(),
                sizes: sizes.clone(),
                data,
            });
        }
        arrays.push(DistArray::new(&t.key, t.dtype, t.size.clone(), chunks).map_err(err)?);
    }
    if arrays.is_empty() {
        return Err(err(format!("{meta_name} lists no tensors")));
    }
    Ok(DistCheckpoint {
        backend: "torch_dist".into(),
        format: Some("torch.distributed.checkpoint".into()),
        dir: dir.to_string(),
        arrays,
        objects,
        has_common: archive.member(&format!("{dir}/common.pt")).is_some(),
    })
}

/// Locates one chunk's tensor in its `.distcp` file and checks it is the chunk.
fn read_chunk(
    archive: &Mapped,
    dir: &str,
    s: &DcpStorage,
    key: &str,
    sizes: &[u64],
    dtype: crate::dtype::DType,
    err: &dyn Fn(String) -> Error,
) -> Result<TensorRef> {
    let file = archive.display().to_string();
    let name = format!("{dir}/{}", s.relative_path);
    let what = format!(
        "chunk {:?} of `{key}`",
        s.chunk.as_deref().unwrap_or_default()
    );
    if !s.transforms.is_empty() {
        return Err(err(format!(
            "{what} was saved through stream transforms ({}), which are not supported",
            s.transforms.join(", ")
        )));
    }
    let m = archive
        .member(&name)
        .filter(|m| m.kind == crate::container::tar::MemberKind::File)
        .ok_or_else(|| err(format!("{what} is in `{name}`, which is missing")))?;
    if s.offset.checked_add(s.length).is_none_or(|e| e > m.size) {
        return Err(err(format!(
            "{what} (bytes {}..{}) runs past the end of `{name}` ({} bytes)",
            s.offset,
            s.offset.saturating_add(s.length),
            m.size
        )));
    }
    let at = m.offset + s.offset;
    let bytes = archive.slice(at, s.length);
    let numel = sizes
        .iter()
        .try_fold(1u64, |a, &n| a.checked_mul(n))
        .ok_or_else(|| err(format!("{what}: its size overflows")))?;
    let raw_len = numel.checked_mul(dtype.size() as u64);
    let t = if bytes.starts_with(b"PK\x03\x04") {
        let member = format!("{name}@{}", s.offset);
        crate::torch::state_dict::read_tensor(bytes, at, &member, key)
            .map_err(|e| e.in_file(&file))?
    } else if raw_len == Some(s.length) {
        TensorRef {
            dtype,
            shape: sizes.to_vec(),
            stride: contiguous_strides(sizes),
            offset: at,
            span: s.length,
            record: None,
        }
    } else {
        return Err(err(format!(
            "{what} in `{name}` at byte {} is neither a torch.save blob nor its raw bytes",
            s.offset
        )));
    };
    if t.shape != sizes || t.dtype != dtype {
        return Err(err(format!(
            "{what}: `{name}` holds a {} {} tensor, the metadata says {} {}",
            t.dtype.short_name(),
            crate::dtype::fmt_shape(&t.shape),
            dtype.short_name(),
            crate::dtype::fmt_shape(sizes)
        )));
    }
    Ok(t)
}
