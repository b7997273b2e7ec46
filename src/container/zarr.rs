//! Distributed checkpoints (`model_weights/`, megatron-core `dist_checkpointing`) with the
//! zarr backend: one zarr v2 array per key, layers stacked on axis 0, chunks uncompressed.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::container::mapped::Mapped;
use crate::dtype::{contiguous_strides, DType, TensorRef};
use crate::error::{Error, Result};

/// One zarr array of a distributed checkpoint.
#[derive(Debug, Clone)]
pub struct ZarrArray {
    pub key: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub chunks: Vec<u64>,
    /// Chunk grid index → the chunk's bytes (a C-order block of `chunks` shape).
    pub chunk_refs: BTreeMap<Vec<u64>, TensorRef>,
}

impl ZarrArray {
    /// Number of chunks along each axis.
    pub fn grid(&self) -> Vec<u64> {
        self.shape
            .iter()
            .zip(&self.chunks)
            .map(|(&s, &c)| s.div_ceil(c))
            .collect()
    }

    /// Bytes of the whole array.
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size() as u64
    }
}

/// A distributed checkpoint found in the archive.
#[derive(Debug, Clone)]
pub struct DistCheckpoint {
    pub backend: String,
    pub arrays: Vec<ZarrArray>,
    /// Keys stored as pickled objects (e.g. TransformerEngine `_extra_state`), with file count.
    pub objects: Vec<(String, usize)>,
    pub has_common: bool,
}

#[derive(Deserialize)]
struct Metadata {
    sharded_backend: String,
}

#[derive(Deserialize)]
struct ZArray {
    zarr_format: u64,
    shape: Vec<u64>,
    chunks: Vec<u64>,
    dtype: String,
    compressor: Option<serde_json::Value>,
    #[serde(default)]
    filters: Option<serde_json::Value>,
    #[serde(default = "c_order")]
    order: String,
    #[serde(default = "dot")]
    dimension_separator: String,
}

fn c_order() -> String {
    "C".into()
}
fn dot() -> String {
    ".".into()
}

/// Reads `model_weights/` of `archive`. Only the zarr backend is supported.
pub fn read(archive: &Mapped) -> Result<DistCheckpoint> {
    let file = archive.display().to_string();
    let err = |msg: String| Error::DistCheckpoint {
        file: file.clone(),
        msg,
    };
    let meta_member = archive
        .member("model_weights/metadata.json")
        .ok_or_else(|| err("model_weights/metadata.json is missing".into()))?;
    let meta: Metadata = serde_json::from_slice(archive.data(meta_member))
        .map_err(|e| err(format!("model_weights/metadata.json: {e}")))?;
    if meta.sharded_backend != "zarr" {
        return Err(err(format!(
            "sharded backend `{}` is not supported yet (only `zarr`); NeMo 2.0 `torch_dist` checkpoints need conversion with NeMo first",
            meta.sharded_backend
        )));
    }
    // Group members by key directory.
    let mut dirs: BTreeMap<&str, Vec<(&str, u64, u64)>> = BTreeMap::new();
    for m in archive.members() {
        if m.kind != crate::container::tar::MemberKind::File {
            continue;
        }
        let Some(rest) = m.name.strip_prefix("model_weights/") else {
            continue;
        };
        if let Some((key, file)) = rest.split_once('/') {
            dirs.entry(key).or_default().push((file, m.offset, m.size));
        }
    }
    let mut arrays = Vec::new();
    let mut objects = Vec::new();
    for (key, files) in &dirs {
        match files.iter().find(|(f, _, _)| *f == ".zarray") {
            Some(&(_, off, size)) => arrays.push(read_array(archive, key, off, size, files, &err)?),
            None => objects.push((key.to_string(), files.len())),
        }
    }
    if arrays.is_empty() {
        return Err(err("no zarr arrays under model_weights/".into()));
    }
    Ok(DistCheckpoint {
        backend: meta.sharded_backend,
        arrays,
        objects,
        has_common: archive.member("model_weights/common.pt").is_some(),
    })
}

fn read_array(
    archive: &Mapped,
    key: &str,
    off: u64,
    size: u64,
    files: &[(&str, u64, u64)],
    err: &dyn Fn(String) -> Error,
) -> Result<ZarrArray> {
    let bytes = archive.slice(off, size);
    let za: ZArray = serde_json::from_slice(bytes)
        .map_err(|e| err(format!("model_weights/{key}/.zarray: {e}")))?;
    let aerr = |msg: String| err(format!("array `{key}`: {msg}"));
    if za.zarr_format != 2 {
        return Err(aerr(format!("zarr format {} (only v2)", za.zarr_format)));
    }
    if za.compressor.as_ref().is_some_and(|c| !c.is_null())
        || za.filters.as_ref().is_some_and(|f| !f.is_null())
    {
        return Err(aerr(
            "compressed or filtered chunks are not supported".into(),
        ));
    }
    if za.order != "C" {
        return Err(aerr(format!("order `{}` (only C)", za.order)));
    }
    let dtype = DType::from_zarr(&za.dtype)
        .ok_or_else(|| aerr(format!("unsupported dtype `{}`", za.dtype)))?;
    if za.shape.len() != za.chunks.len() || za.chunks.contains(&0) {
        return Err(aerr("chunk shape does not match the array shape".into()));
    }
    let chunk_bytes = za
        .chunks
        .iter()
        .try_fold(dtype.size() as u64, |a, &c| a.checked_mul(c))
        .ok_or_else(|| aerr("chunk size overflows".into()))?;
    let grid: Vec<u64> = za
        .shape
        .iter()
        .zip(&za.chunks)
        .map(|(&s, &c)| s.div_ceil(c))
        .collect();
    let mut chunk_refs = BTreeMap::new();
    for &(name, coff, csize) in files {
        if name.starts_with('.') {
            continue;
        }
        let idx: Option<Vec<u64>> = name
            .split(za.dimension_separator.as_str())
            .map(|p| p.parse().ok())
            .collect();
        let idx = match idx {
            Some(i) if i.len() == grid.len() && i.iter().zip(&grid).all(|(a, g)| a < g) => i,
            _ => return Err(aerr(format!("unexpected chunk file `{name}`"))),
        };
        if csize != chunk_bytes {
            return Err(aerr(format!(
                "chunk `{name}` holds {csize} bytes, expected {chunk_bytes}"
            )));
        }
        chunk_refs.insert(
            idx,
            TensorRef {
                dtype,
                shape: za.chunks.clone(),
                stride: contiguous_strides(&za.chunks),
                offset: coff,
                span: csize,
                record: None,
            },
        );
    }
    let expected: u64 = grid.iter().product();
    if chunk_refs.len() as u64 != expected {
        return Err(aerr(format!(
            "{} of {expected} chunks present",
            chunk_refs.len()
        )));
    }
    Ok(ZarrArray {
        key: key.to_string(),
        dtype,
        shape: za.shape,
        chunks: za.chunks,
        chunk_refs,
    })
}
