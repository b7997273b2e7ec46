//! The zarr backend of distributed checkpoints: one zarr v2 array per key, layers
//! stacked on axis 0, chunks uncompressed.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::container::dist::{DistArray, DistCheckpoint, DistChunk};
use crate::container::mapped::Mapped;
use crate::dtype::{contiguous_strides, DType, TensorRef};
use crate::error::{Error, Result};

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

/// Reads the zarr arrays under `dir/` of `archive`; `err` builds the error.
pub fn read(archive: &Mapped, dir: &str, err: &dyn Fn(String) -> Error) -> Result<DistCheckpoint> {
    // Group members by key directory.
    let mut dirs: BTreeMap<&str, Vec<(&str, u64, u64)>> = BTreeMap::new();
    for m in archive.members() {
        if m.kind != crate::container::tar::MemberKind::File {
            continue;
        }
        let Some(rest) = m.name.strip_prefix(dir).and_then(|r| r.strip_prefix('/')) else {
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
            Some(&(_, off, size)) => {
                arrays.push(read_array(archive, dir, key, off, size, files, err)?)
            }
            None => objects.push((key.to_string(), files.len())),
        }
    }
    if arrays.is_empty() {
        return Err(err(format!("no zarr arrays under {dir}/")));
    }
    Ok(DistCheckpoint {
        backend: "zarr".into(),
        format: Some("zarr v2".into()),
        dir: dir.to_string(),
        arrays,
        objects,
        has_common: archive.member(&format!("{dir}/common.pt")).is_some(),
    })
}

fn read_array(
    archive: &Mapped,
    dir: &str,
    key: &str,
    off: u64,
    size: u64,
    files: &[(&str, u64, u64)],
    err: &dyn Fn(String) -> Error,
) -> Result<DistArray> {
    let bytes = archive.slice(off, size);
    let za: ZArray =
        serde_json::from_slice(bytes).map_err(|e| err(format!("{dir}/{key}/.zarray: {e}")))?;
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
    let mut chunk_refs: BTreeMap<Vec<u64>, DistChunk> = BTreeMap::new();
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
        // Edge chunks are stored whole; their box is the part inside the array.
        let offsets: Vec<u64> = idx.iter().zip(&za.chunks).map(|(&i, &c)| i * c).collect();
        let sizes = offsets
            .iter()
            .zip(&za.chunks)
            .zip(&za.shape)
            .map(|((&o, &c), &s)| c.min(s - o))
            .collect();
        let data = TensorRef {
            dtype,
            shape: za.chunks.clone(),
            stride: contiguous_strides(&za.chunks),
            offset: coff,
            span: csize,
            record: None,
        };
        chunk_refs.insert(
            idx,
            DistChunk {
                offsets,
                sizes,
                data,
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
    DistArray::new(key, dtype, za.shape, chunk_refs.into_values().collect()).map_err(err)
}
