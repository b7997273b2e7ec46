//! The tensor-parallel rules, merge and split side by side, implemented once per role.
//!
//! Merge: every logical tensor of the model (in the TP = 1 Megatron layout, vocabulary
//! still padded) is described as rows, each row a list of byte ranges of the mapped input
//! ([`Logical::row_segments`]). Split: the rows or columns rank `r` of `n` holds
//! ([`split`]). Nothing is copied until a sink asks for rows.

use std::sync::Arc;

use crate::arch::roles::{Kind, Role};
use crate::container::mapped::Mapped;
pub use crate::container::mapped::Seg;
use crate::container::zarr::ZarrArray;
use crate::dtype::{Checksummed, DType, TensorRef};

/// A logical tensor: a kind at a global layer, merged over TP ranks.
#[derive(Debug, Clone)]
pub struct Logical {
    pub kind: Kind,
    /// Global layer for per-layer tensors.
    pub layer: Option<u64>,
    pub dtype: DType,
    /// Shape in the TP = 1 layout (vocabulary padded as stored).
    pub shape: Vec<u64>,
    rows: Backing,
}

#[derive(Debug, Clone)]
enum Backing {
    /// One part per TP rank, in rank order, merged by `role`.
    Ranks { role: Role, parts: Vec<TensorRef> },
    /// A zarr array (layers stacked on axis 0 when `layer` is set), already in TP = 1 layout.
    Zarr {
        array: Arc<ZarrArray>,
        layer: Option<u64>,
    },
}

impl Logical {
    /// A tensor merged from one part per TP rank (in rank order) by its kind's role.
    pub fn from_ranks(
        kind: Kind,
        layer: Option<u64>,
        shape: Vec<u64>,
        parts: Vec<TensorRef>,
    ) -> Logical {
        Logical {
            kind,
            layer,
            dtype: parts[0].dtype,
            shape,
            rows: Backing::Ranks {
                role: crate::arch::roles::role_of(kind),
                parts,
            },
        }
    }

    /// A tensor of a zarr array already in the TP = 1 layout (layer `layer` of a stacked one).
    pub fn from_zarr(
        kind: Kind,
        layer: Option<u64>,
        shape: Vec<u64>,
        array: Arc<ZarrArray>,
        stacked: bool,
    ) -> Logical {
        Logical {
            kind,
            layer,
            dtype: array.dtype,
            shape,
            rows: Backing::Zarr {
                array,
                layer: if stacked { layer } else { None },
            },
        }
    }

    /// Number of rows (1 for vectors).
    pub fn rows(&self) -> u64 {
        if self.shape.len() == 1 {
            1
        } else {
            self.shape[0]
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> u64 {
        let cols = if self.shape.len() == 1 {
            self.shape[0]
        } else {
            self.shape[1]
        };
        cols * self.dtype.size() as u64
    }

    /// Appends the byte ranges of row `i` to `out`, merging with the previous range
    /// when contiguous.
    pub fn row_segments(&self, i: u64, out: &mut Vec<Seg>) {
        let esz = self.dtype.size() as u64;
        match &self.rows {
            Backing::Ranks { role, parts } => {
                let t = parts.len() as u64;
                match role {
                    Role::Replicated => push(out, parts[0].offset, parts[0].nbytes()),
                    Role::VocabRows | Role::ColumnRows | Role::QkvGrouped => {
                        let rpr = parts[0].shape[0];
                        let p = &parts[(i / rpr) as usize];
                        let rb = p.shape[1] * esz;
                        push(out, p.offset + (i % rpr) * rb, rb);
                    }
                    Role::GateUpFused => {
                        let half = parts[0].shape[0] / 2;
                        let f = half * t;
                        let (j, second) = if i < f { (i, 0) } else { (i - f, half) };
                        let p = &parts[(j / half) as usize];
                        let rb = p.shape[1] * esz;
                        push(out, p.offset + (second + j % half) * rb, rb);
                    }
                    Role::RowCols => {
                        for p in parts {
                            let rb = p.shape[1] * esz;
                            push(out, p.offset + i * rb, rb);
                        }
                    }
                    Role::Skip => {}
                }
            }
            Backing::Zarr { array, layer } => {
                let chunks = &array.chunks;
                let (lead, dims) = match layer {
                    Some(l) => (vec![*l / chunks[0]], &array.shape[1..]),
                    None => (Vec::new(), &array.shape[..]),
                };
                let cdims = &chunks[chunks.len() - dims.len()..];
                let in_layer = layer.map(|l| l % chunks[0]).unwrap_or(0);
                if dims.len() == 1 {
                    let mut idx = lead.clone();
                    for j in 0..dims[0].div_ceil(cdims[0]) {
                        idx.push(j);
                        let c = &array.chunk_refs[&idx];
                        let n = cdims[0].min(dims[0] - j * cdims[0]);
                        push(out, c.offset + in_layer * cdims[0] * esz, n * esz);
                        idx.pop();
                    }
                } else {
                    let (cr, cc) = (cdims[0], cdims[1]);
                    for j in 0..dims[1].div_ceil(cc) {
                        let mut idx = lead.clone();
                        idx.push(i / cr);
                        idx.push(j);
                        let c = &array.chunk_refs[&idx];
                        let n = cc.min(dims[1] - j * cc);
                        let local = in_layer * cr * cc + (i % cr) * cc;
                        push(out, c.offset + local * esz, n * esz);
                    }
                }
            }
        }
    }

    /// Byte ranges of everything this tensor reads (whole rank parts or chunks).
    pub fn source_ranges(&self) -> Vec<Seg> {
        match &self.rows {
            Backing::Ranks {
                role: Role::Replicated,
                parts,
            } => vec![(parts[0].offset, parts[0].nbytes())],
            Backing::Ranks { parts, .. } => parts.iter().map(|p| (p.offset, p.nbytes())).collect(),
            Backing::Zarr { array, layer } => array
                .chunk_refs
                .iter()
                .filter(|(idx, _)| layer.is_none_or(|l| idx.first() == Some(&l)))
                .map(|(_, c)| (c.offset, c.span))
                .collect(),
        }
    }

    /// The checksummed container records this tensor is read from (torch zip records).
    pub fn records(&self) -> Vec<&Checksummed> {
        match &self.rows {
            Backing::Ranks { parts, .. } => {
                parts.iter().filter_map(|p| p.record.as_ref()).collect()
            }
            Backing::Zarr { .. } => Vec::new(),
        }
    }

    /// Checks the CRC-32 of every record this tensor is read from (once per record; a
    /// no-op under `--no-crc`), naming the member, record and `tensor` when one fails.
    pub fn check_records(&self, files: &Mapped, tensor: &str) -> crate::Result<()> {
        for rec in self.records() {
            files
                .check_record(rec)
                .map_err(|msg| crate::Error::Tensor {
                    member: format!("{}:{}", files.display(), rec.member),
                    tensor: tensor.to_string(),
                    msg,
                })?;
        }
        Ok(())
    }

    /// For replicated tensors: the copies on the other ranks (to check they are equal).
    pub fn replicas(&self) -> Vec<Seg> {
        match &self.rows {
            Backing::Ranks {
                role: Role::Replicated,
                parts,
            } => parts.iter().map(|p| (p.offset, p.nbytes())).collect(),
            _ => Vec::new(),
        }
    }
}

fn push(out: &mut Vec<Seg>, off: u64, len: u64) {
    if let Some(last) = out.last_mut() {
        if last.0 + last.1 == off {
            last.1 += len;
            return;
        }
    }
    out.push((off, len));
}

/// A part of an output tensor, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Slice {
    /// Rows `a..b` of the logical tensor.
    Rows(u64, u64),
    /// `n` rows of zeros (vocabulary padding).
    ZeroRows(u64),
    /// Columns `c0..c1` of every row (row-parallel splits).
    Cols(u64, u64),
    /// Raw bytes of the mapped input in the logical tensor's dtype (e.g. `inv_freq`).
    Raw(Seg),
    /// Values computed here, written in the output dtype.
    Values(Vec<f32>),
}

/// Split: the pieces of the logical tensor that rank `r` of `n` holds, the inverse of
/// [`Logical::row_segments`]. Vocabulary tensors get `new_rows` rows in all (`vocab`
/// real ones, then zero padding).
pub fn split(l: &Logical, role: Role, r: u64, n: u64, vocab: u64, new_rows: u64) -> Vec<Slice> {
    match role {
        Role::Replicated | Role::Skip => vec![Slice::Rows(0, 1)],
        Role::VocabRows => {
            let per = new_rows / n;
            let (a, b) = (r * per, (r + 1) * per);
            let real_end = b.min(vocab).max(a);
            let mut p = Vec::new();
            if real_end > a {
                p.push(Slice::Rows(a, real_end));
            }
            if b > real_end {
                p.push(Slice::ZeroRows(b - real_end));
            }
            p
        }
        Role::ColumnRows | Role::QkvGrouped => {
            let per = l.rows() / n;
            vec![Slice::Rows(r * per, (r + 1) * per)]
        }
        Role::GateUpFused => {
            let f = l.rows() / 2;
            let per = f / n;
            vec![
                Slice::Rows(r * per, (r + 1) * per),
                Slice::Rows(f + r * per, f + (r + 1) * per),
            ]
        }
        Role::RowCols => {
            let per = l.shape[1] / n;
            vec![Slice::Cols(r * per, (r + 1) * per)]
        }
    }
}
