//! The tensor-parallel rules, merge and split side by side, implemented once per role.
//!
//! Merge: every logical tensor of the model (in the TP = 1 Megatron layout, vocabulary
//! still padded) is described as rows, each row a list of byte ranges of the mapped input
//! ([`Logical::row_segments`]). Split: the rows or columns rank `r` of `n` holds
//! ([`split`]). Nothing is copied until a sink asks for rows.

use std::sync::Arc;

use crate::arch::roles::{Kind, Role};
use crate::container::dist::{Band, DistArray};
use crate::container::mapped::Mapped;
pub use crate::container::mapped::Seg;
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
    /// A distributed-checkpoint array (layers stacked on axis 0 when `layer` is set),
    /// already in the TP = 1 layout: the chunks holding this slice, as row bands.
    Dist {
        array: Arc<DistArray>,
        layer: Option<u64>,
        bands: Arc<Vec<Band>>,
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

    /// A tensor of a distributed-checkpoint array already in the TP = 1 layout (layer
    /// `layer` of a stacked one); the message says why its chunks cannot be read by rows.
    pub fn from_dist(
        kind: Kind,
        layer: Option<u64>,
        shape: Vec<u64>,
        array: Arc<DistArray>,
        stacked: bool,
    ) -> Result<Logical, String> {
        let lead = if stacked { layer } else { None };
        let bands = Arc::new(array.bands(lead)?);
        Ok(Logical {
            kind,
            layer,
            dtype: array.dtype,
            shape,
            rows: Backing::Dist {
                array,
                layer: lead,
                bands,
            },
        })
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
            Backing::Dist {
                array,
                layer,
                bands,
            } => {
                let b = &bands[bands.partition_point(|b| b.end <= i)];
                let nd = array.shape.len();
                let lead = usize::from(layer.is_some());
                for &ci in &b.chunks {
                    let c = &array.chunks[ci];
                    let mut elem = 0;
                    if let Some(l) = layer {
                        elem += (l - c.offsets[0]) * c.data.stride[0];
                    }
                    if nd - lead == 2 {
                        elem += (i - c.offsets[lead]) * c.data.stride[lead];
                    }
                    push(out, c.data.offset + elem * esz, c.sizes[nd - 1] * esz);
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
            Backing::Dist { array, bands, .. } => bands
                .iter()
                .flat_map(|b| &b.chunks)
                .map(|&ci| (array.chunks[ci].data.offset, array.chunks[ci].data.span))
                .collect(),
        }
    }

    /// The checksummed container records this tensor is read from (torch zip records).
    pub fn records(&self) -> Vec<&Checksummed> {
        match &self.rows {
            Backing::Ranks { parts, .. } => {
                parts.iter().filter_map(|p| p.record.as_ref()).collect()
            }
            Backing::Dist { array, bands, .. } => bands
                .iter()
                .flat_map(|b| &b.chunks)
                .filter_map(|&ci| array.chunks[ci].data.record.as_ref())
                .collect(),
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
