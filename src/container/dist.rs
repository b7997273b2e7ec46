//! Distributed checkpoints (`model_weights/`, megatron-core `dist_checkpointing`), whatever
//! the backend: every key is one global array, stored as chunks (boxes of the global
//! array), each chunk a tensor in place in the mapped input. The zarr backend
//! ([`crate::container::zarr`]) gives a regular grid of chunks; `torch_dist`
//! (`torch::distcp`) gives the boxes its `.metadata` lists.
//!
//! [`DistArray::new`] checks that the chunks tile the array exactly (no chunk outside it,
//! none overlapping another, nothing missing), so readers can trust every element has
//! exactly one home.

use std::collections::BTreeMap;

use crate::dtype::{DType, TensorRef};

/// One chunk: the box `offsets .. offsets + sizes` of the global array, stored as `data`
/// (whose shape may be larger, as zarr's edge chunks are; the box is its leading corner).
#[derive(Debug, Clone)]
pub struct DistChunk {
    pub offsets: Vec<u64>,
    pub sizes: Vec<u64>,
    pub data: TensorRef,
}

/// One global array of a distributed checkpoint.
#[derive(Debug, Clone)]
pub struct DistArray {
    pub key: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub chunks: Vec<DistChunk>,
}

/// A distributed checkpoint found in the input.
#[derive(Debug, Clone)]
pub struct DistCheckpoint {
    /// `zarr` or `torch_dist`.
    pub backend: String,
    /// The `.metadata` format (`torch_dist`: the torch release line it matches), if known.
    pub format: Option<String>,
    /// The folder it was read from (`model_weights` in a `.nemo`, `weights` in NeMo 2.0).
    pub dir: String,
    pub arrays: Vec<DistArray>,
    /// Keys stored as pickled objects (e.g. TransformerEngine `_extra_state`), with item count.
    pub objects: Vec<(String, usize)>,
    pub has_common: bool,
}

/// Most cells the exact tiling check may need (distinct chunk boundaries, multiplied over
/// the axes); real checkpoints need a few thousand.
const MAX_CELLS: u64 = 1 << 24;

impl DistArray {
    /// Checks that `chunks` tile `shape` exactly and that each chunk's data holds its box
    /// with contiguous rows; the message names the key.
    pub fn new(
        key: &str,
        dtype: DType,
        shape: Vec<u64>,
        chunks: Vec<DistChunk>,
    ) -> std::result::Result<DistArray, String> {
        let a = DistArray {
            key: key.to_string(),
            dtype,
            shape,
            chunks,
        };
        a.check().map_err(|m| format!("array `{key}`: {m}"))?;
        Ok(a)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let nd = self.shape.len();
        if nd == 0 {
            return Err("a scalar, not a weight".into());
        }
        if self.chunks.is_empty() {
            return Err("no chunks".into());
        }
        for (i, c) in self.chunks.iter().enumerate() {
            let bad = c.offsets.len() != nd
                || c.sizes.len() != nd
                || c.data.shape.len() != nd
                || c.data.stride.len() != nd;
            if bad {
                return Err(format!(
                    "chunk {i} has {} dims, the array {nd}",
                    c.offsets.len()
                ));
            }
            for d in 0..nd {
                let end = c.offsets[d].checked_add(c.sizes[d]);
                if end.is_none_or(|e| e > self.shape[d]) {
                    return Err(format!(
                        "chunk {i} (offsets {:?}, sizes {:?}) lies outside the global shape {}",
                        c.offsets,
                        c.sizes,
                        crate::dtype::fmt_shape(&self.shape)
                    ));
                }
                if c.sizes[d] == 0 || c.sizes[d] > c.data.shape[d] {
                    return Err(format!(
                        "chunk {i}: its data {} does not hold its box {:?}",
                        crate::dtype::fmt_shape(&c.data.shape),
                        c.sizes
                    ));
                }
            }
            if c.data.dtype != self.dtype {
                return Err(format!(
                    "chunk {i} is {}, the array {}",
                    c.data.dtype.short_name(),
                    self.dtype.short_name()
                ));
            }
            if c.data.stride[nd - 1] != 1 && c.sizes[nd - 1] > 1 {
                return Err(format!("chunk {i} is not stored row-major"));
            }
        }
        self.check_tiling()
    }

    /// Every element of the array is in exactly one chunk: the chunks' boundaries cut each
    /// axis into intervals, and each cell of that grid must be covered once.
    fn check_tiling(&self) -> std::result::Result<(), String> {
        let nd = self.shape.len();
        let mut cuts: Vec<Vec<u64>> = Vec::with_capacity(nd);
        for d in 0..nd {
            let mut v: Vec<u64> = vec![0, self.shape[d]];
            for c in &self.chunks {
                v.push(c.offsets[d]);
                v.push(c.offsets[d] + c.sizes[d]);
            }
            v.sort_unstable();
            v.dedup();
            cuts.push(v);
        }
        let dims: Vec<u64> = cuts.iter().map(|v| v.len() as u64 - 1).collect();
        let cells = dims
            .iter()
            .try_fold(1u64, |a, &n| a.checked_mul(n))
            .filter(|&n| n <= MAX_CELLS)
            .ok_or_else(|| format!("{} chunks cut it too irregularly", self.chunks.len()))?;
        let mut owner = vec![u32::MAX; cells as usize];
        for (i, c) in self.chunks.iter().enumerate() {
            let ranges: Vec<(usize, usize)> = (0..nd)
                .map(|d| {
                    let lo = cuts[d].binary_search(&c.offsets[d]).expect("a cut");
                    let hi = cuts[d]
                        .binary_search(&(c.offsets[d] + c.sizes[d]))
                        .expect("a cut");
                    (lo, hi)
                })
                .collect();
            let mut idx: Vec<usize> = ranges.iter().map(|r| r.0).collect();
            'cells: loop {
                let flat = idx
                    .iter()
                    .zip(&dims)
                    .fold(0usize, |a, (&x, &n)| a * n as usize + x);
                if owner[flat] != u32::MAX {
                    return Err(format!(
                        "chunks {} and {i} overlap (offsets {:?} and {:?})",
                        owner[flat], self.chunks[owner[flat] as usize].offsets, c.offsets
                    ));
                }
                owner[flat] = i as u32;
                for d in (0..nd).rev() {
                    idx[d] += 1;
                    if idx[d] < ranges[d].1 {
                        continue 'cells;
                    }
                    idx[d] = ranges[d].0;
                }
                break;
            }
        }
        if let Some(flat) = owner.iter().position(|&o| o == u32::MAX) {
            let mut at = vec![0u64; nd];
            let mut rest = flat;
            for d in (0..nd).rev() {
                at[d] = cuts[d][rest % dims[d] as usize];
                rest /= dims[d] as usize;
            }
            return Err(format!("no chunk holds the element at {at:?}"));
        }
        Ok(())
    }

    /// Bytes of the whole array.
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size() as u64
    }

    /// The shape of its chunks when they are all alike (the zarr grid), else `None`.
    pub fn uniform_chunk(&self) -> Option<&[u64]> {
        let first = &self.chunks[0].data.shape;
        self.chunks
            .iter()
            .all(|c| &c.data.shape == first)
            .then_some(first.as_slice())
    }

    /// The chunks holding index `i` of axis 0 (a layer of a stacked array, or a row),
    /// as row bands: `(first row, end row, chunks sorted by column)` over the remaining
    /// axes, sorted by row. For a 1-D slice (a stacked vector) there is one band of row 0.
    /// Chunks side by side must cover the same rows (every checkpoint writer cuts so).
    pub fn bands(&self, lead: Option<u64>) -> std::result::Result<Vec<Band>, String> {
        let nd = self.shape.len();
        let row_axis = usize::from(lead.is_some());
        let mut by_row: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, c) in self.chunks.iter().enumerate() {
            if let Some(l) = lead {
                if !(c.offsets[0] <= l && l < c.offsets[0] + c.sizes[0]) {
                    continue;
                }
            }
            let start = if row_axis + 1 < nd {
                c.offsets[row_axis]
            } else {
                0
            };
            by_row.entry(start).or_default().push(i);
        }
        let col_axis = nd - 1;
        let mut out = Vec::with_capacity(by_row.len());
        for (start, mut idx) in by_row {
            idx.sort_by_key(|&i| self.chunks[i].offsets[col_axis]);
            let end = if row_axis + 1 < nd {
                let rows = self.chunks[idx[0]].sizes[row_axis];
                if idx.iter().any(|&i| self.chunks[i].sizes[row_axis] != rows) {
                    return Err("chunks side by side cover different rows".into());
                }
                start + rows
            } else {
                1
            };
            out.push(Band {
                start,
                end,
                chunks: idx,
            });
        }
        Ok(out)
    }
}

/// Chunks covering rows `start .. end` of a slice, in column order.
#[derive(Debug, Clone)]
pub struct Band {
    pub start: u64,
    pub end: u64,
    pub chunks: Vec<usize>,
}
