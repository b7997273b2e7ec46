//! A linear layer over the mapped files, and its products: one token (decode) or a batch
//! of tokens (a prompt).
//!
//! A linear layer is a set of *bands* (row ranges) each made of *parts* (column ranges),
//! every part a strided block of the mapped file. A Hugging Face tensor is one band of one
//! part; a column-parallel NeMo tensor is one band per TP rank; a row-parallel one is one
//! band with a part per rank, whose partial products are summed. So a `.nemo` runs on its
//! shards as stored, with no merged copy.
//!
//! A decode product allocates nothing: its split into row tasks is worked out on the first
//! token and kept ([`Plan`]), each task writes its own rows of the output, and the
//! activations' reordered or quantized copies live in per-thread buffers that are reused.

use std::cell::Cell;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::container::mapped::Mapped;
use crate::runtime::attention::SendPtr;
use crate::runtime::cpu::{self, WType};

/// A strided block of a linear layer's weight: columns `col0..col0 + cols` of the band's
/// rows, row `r` of the band at `offset + r·stride`.
#[derive(Debug, Clone)]
pub struct Part {
    pub col0: usize,
    pub cols: usize,
    pub offset: u64,
    pub stride: u64,
    /// int8 only: `rows × cols/group` scales, row-major.
    pub scales: Vec<f32>,
}

/// Rows `row0..row0 + rows`, their columns split into parts.
#[derive(Debug, Clone)]
pub struct Band {
    pub row0: usize,
    pub rows: usize,
    pub parts: Vec<Part>,
}

/// A row task: rows `r0..r1` of band `band`.
type Task = (usize, usize, usize);

/// How one token's product over rows `0..rows` is split into tasks for `threads` threads:
/// worked out once, then reused by every token.
#[derive(Debug, Clone)]
pub struct Plan {
    threads: usize,
    rows: usize,
    tasks: Vec<Task>,
}

/// A weight matrix `[out, inp]` (or an embedding table) laid over the mapped file.
#[derive(Debug, Clone)]
pub struct Linear {
    pub name: String,
    pub out: usize,
    pub inp: usize,
    pub wtype: WType,
    /// Columns per scale (int8).
    pub group: usize,
    pub bands: Vec<Band>,
    /// The decode split, made on first use.
    pub plan: OnceLock<Plan>,
}

thread_local! {
    /// The activations in [`cpu::permute32`] order, kept between products.
    static PERMUTED: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The activations copied for each part of a float or int8 product, placed to meet
    /// the part's weights on vector boundaries, and where each copy starts.
    static ALIGNED: Cell<(Vec<f32>, Vec<usize>)> = const { Cell::new((Vec::new(), Vec::new())) };
    /// The activations quantized for `--int8-activations`, kept between products.
    static QUANTIZED: Cell<cpu::QAct> = const { Cell::new(cpu::QAct::new()) };
    /// A prompt's activations rounded to bf16 for `--bf16-activations`, kept between
    /// products.
    static ROUNDED: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
}

/// How activations meet the weights in a product: as computed, in f32 (the default, and
/// what `verify` uses), or first rounded the way llama.cpp rounds them, where an opt-in
/// flag asks, for speed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acts {
    /// int8 weights meet int8 activations (blocks of 32) when decoding
    /// (`--int8-activations`).
    pub int8: bool,
    /// bf16 and int8 weights meet bf16 activations in a prompt (`--bf16-activations`).
    pub bf16: bool,
}

impl Linear {
    /// Bytes of weights (and scales) one pass over every row reads.
    pub fn bytes(&self) -> u64 {
        let w = (self.out * self.inp * self.wtype.size()) as u64;
        let s: usize = self
            .bands
            .iter()
            .flat_map(|b| b.parts.iter().map(|p| p.scales.len() * 4))
            .sum();
        w + s as u64
    }

    fn band(&self, r: usize) -> &Band {
        let i = self.bands.partition_point(|b| b.row0 + b.rows <= r);
        &self.bands[i]
    }

    fn part_row<'a>(&self, ar: &'a Mapped, b: &Band, p: &Part, r: usize) -> &'a [u8] {
        let local = (r - b.row0) as u64;
        ar.slice(
            p.offset + local * p.stride,
            (p.cols * self.wtype.size()) as u64,
        )
    }

    fn scales<'a>(&self, p: &'a Part, b: &Band, r: usize) -> &'a [f32] {
        self.scales_of_rows(p, b, r, r + 1)
    }

    /// The int8 scales of part `p`'s rows `r0..r1` of band `b`, row-major (empty for float
    /// rows).
    fn scales_of_rows<'a>(&self, p: &'a Part, b: &Band, r0: usize, r1: usize) -> &'a [f32] {
        if p.scales.is_empty() {
            return &[];
        }
        let g = p.cols.div_ceil(self.group);
        &p.scales[(r0 - b.row0) * g..(r1 - b.row0) * g]
    }

    /// Appends row `r` as stored (its parts' bytes in column order) to `bytes`, and its
    /// int8 scales to `scales`; `Err` when the parts' groups do not line up into one row
    /// of `ceil(inp / group)` scales (a part whose width is not a multiple of the group).
    pub fn raw_row(
        &self,
        ar: &Mapped,
        r: usize,
        bytes: &mut Vec<u8>,
        scales: &mut Vec<f32>,
    ) -> Result<(), String> {
        let b = self.band(r);
        let n = b.parts.len();
        let mut col = 0;
        for (i, p) in b.parts.iter().enumerate() {
            if p.col0 != col {
                return Err(format!(
                    "{}: its parts do not lie side by side (a part at column {} after {col})",
                    self.name, p.col0
                ));
            }
            col += p.cols;
            if self.wtype.is_int8() && i + 1 < n && p.cols % self.group != 0 {
                return Err(format!(
                    "{}: a part of {} columns is not a whole number of groups of {}",
                    self.name, p.cols, self.group
                ));
            }
            bytes.extend_from_slice(self.part_row(ar, b, p, r));
            scales.extend_from_slice(self.scales(p, b, r));
        }
        if col != self.inp {
            return Err(format!(
                "{}: its parts cover {col} of {} columns",
                self.name, self.inp
            ));
        }
        Ok(())
    }

    /// Row `r` as f32.
    pub fn row(&self, ar: &Mapped, r: usize, out: &mut [f32]) {
        let b = self.band(r);
        for p in &b.parts {
            let w = self.part_row(ar, b, p, r);
            cpu::dequant(
                self.wtype,
                w,
                self.scales(p, b, r),
                self.group,
                &mut out[p.col0..p.col0 + p.cols],
            );
        }
    }

    /// Row ranges of about `bytes` of weights (fewer where that leaves the threads too few
    /// tasks to share evenly), each within one band, of equal size within a band.
    fn tasks_of(&self, rows: usize, bytes: usize) -> Vec<Task> {
        let row_bytes = (self.inp * self.wtype.size()).max(1);
        let per = (bytes / row_bytes).clamp(4, 4096);
        let want = 4 * rayon::current_num_threads();
        let mut v = Vec::new();
        for (bi, b) in self.bands.iter().enumerate() {
            let end = (b.row0 + b.rows).min(rows);
            if end <= b.row0 {
                continue;
            }
            let n = end - b.row0;
            let share = want.div_ceil(self.bands.len());
            let count = n.div_ceil(per).max(share.min(n.div_ceil(4))).max(1);
            let size = n.div_ceil(count);
            let mut r = b.row0;
            while r < end {
                let k = size.min(end - r);
                v.push((bi, r, r + k));
                r += k;
            }
        }
        v
    }

    /// The bytes of part `p`'s rows `r0..r1` of band `b`, from the first row's start to the
    /// last row's end.
    fn part_rows<'a>(&self, ar: &'a Mapped, b: &Band, p: &Part, r0: usize, r1: usize) -> &'a [u8] {
        let first = (r0 - b.row0) as u64;
        let len = (r1 - r0 - 1) as u64 * p.stride + (p.cols * self.wtype.size()) as u64;
        ar.slice(p.offset + first * p.stride, len)
    }

    /// Part `p`'s rows `r0..r1` of band `b` as stored, with their int8 scales: a prompt
    /// task's tile.
    fn rows_of<'a>(
        &self,
        ar: &'a Mapped,
        b: &'a Band,
        p: &'a Part,
        r0: usize,
        r1: usize,
    ) -> cpu::Rows<'a> {
        cpu::Rows {
            t: self.wtype,
            w: self.part_rows(ar, b, p, r0, r1),
            stride: p.stride as usize,
            rows: r1 - r0,
            cols: p.cols,
            scales: self.scales_of_rows(p, b, r0, r1),
            group: self.group,
        }
    }

    /// `y[r] = Σ_parts (row r of the part) · x` for rows `0..rows`, in parallel over the
    /// plan's row tasks: one token's product. `dot(k, part, rows, ys, add)` writes (or,
    /// where `add`, adds) the products of the part's rows (the `k`-th part counting every
    /// band's) into `ys`.
    fn decode_rows(
        &self,
        ar: &Mapped,
        rows: usize,
        y: &mut [f32],
        dot: impl Fn(usize, &Part, &cpu::Rows, &mut [f32], bool) + Sync,
    ) {
        assert_eq!(y.len(), rows);
        let threads = rayon::current_num_threads();
        let plan = self.plan.get_or_init(|| Plan {
            threads,
            rows,
            tasks: self.tasks_of(rows, DECODE_TASK_BYTES),
        });
        let fresh;
        let tasks = if plan.threads == threads && plan.rows == rows {
            &plan.tasks[..]
        } else {
            fresh = self.tasks_of(rows, DECODE_TASK_BYTES);
            &fresh[..]
        };
        let dst = SendPtr(y.as_mut_ptr());
        tasks.par_iter().for_each(|&(bi, r0, r1)| {
            let d = dst;
            // SAFETY: the tasks' row ranges are disjoint and lie within 0..rows, the
            // length of y, which nothing else touches meanwhile.
            let ys = unsafe { std::slice::from_raw_parts_mut(d.0.add(r0), r1 - r0) };
            let b = &self.bands[bi];
            let first = self.bands[..bi]
                .iter()
                .map(|b| b.parts.len())
                .sum::<usize>();
            for (k, p) in b.parts.iter().enumerate() {
                dot(first + k, p, &self.rows_of(ar, b, p, r0, r1), ys, k > 0);
            }
        });
    }

    /// [`Linear::decode_rows`] with a kernel of one row: `dot(part, row, its scales)`.
    fn decode_each_row(
        &self,
        ar: &Mapped,
        rows: usize,
        y: &mut [f32],
        dot: impl Fn(&Part, &[u8], &[f32]) -> f32 + Sync,
    ) {
        self.decode_rows(ar, rows, y, |_, p, rs, ys, add| {
            for (r, slot) in ys.iter_mut().enumerate().take(rs.rows) {
                let (w, sc) = rs.row(r);
                let v = dot(p, w, sc);
                *slot = if add { *slot + v } else { v };
            }
        });
    }

    /// Each part's columns of `x` in [`cpu::pair32`] order, one after another in `xa`,
    /// one copy per part of every band in order (its start in `at`).
    fn pair(&self, x: &[f32], xa: &mut Vec<f32>, at: &mut Vec<usize>) {
        xa.clear();
        at.clear();
        for p in self.bands.iter().flat_map(|b| &b.parts) {
            at.push(xa.len());
            cpu::pair32(&x[p.col0..p.col0 + p.cols], xa);
        }
    }

    /// Copies each part's columns of `x` into `xa`, one copy per part of every band in
    /// order (its start in `at`), each placed so that the element where the kernel's loads
    /// of the band's first row become aligned (`cpu::aligned_head`) lies on a 64-byte
    /// boundary. Rows a multiple of 64 bytes apart then all meet their copy aligned.
    fn place(&self, ar: &Mapped, x: &[f32], xa: &mut Vec<f32>, at: &mut Vec<usize>) {
        let parts = || {
            self.bands
                .iter()
                .flat_map(|b| b.parts.iter().map(move |p| (b, p)))
        };
        xa.clear();
        xa.resize(parts().map(|(_, p)| p.cols + 16).sum(), 0.0);
        at.clear();
        let base = xa.as_ptr() as usize / 4;
        let mut end = 0;
        for (b, p) in parts() {
            let row = self.part_row(ar, b, p, b.row0).as_ptr() as usize;
            let head = cpu::aligned_head(self.wtype, p.cols, self.group, row);
            let s = end + (16 - (base + end + head) % 16) % 16;
            xa[s..s + p.cols].copy_from_slice(&x[p.col0..p.col0 + p.cols]);
            at.push(s);
            end = s + p.cols;
        }
    }

    /// `y[t] = W x[t]` for `t` tokens (`x`: `t × inp`, `y`: `t × rows`), rows
    /// `0..rows` only (`rows ≤ out`: the vocabulary without its padding).
    pub fn matmul(&self, ar: &Mapped, x: &[f32], t: usize, rows: usize, y: &mut [f32]) {
        self.matmul_a(ar, x, t, rows, y, Acts::default())
    }

    /// [`Linear::matmul`], with the activations rounded as `acts` asks where it applies
    /// (opt-in: a different rounding): int8 weights meet int8 activations when decoding
    /// (`cpu::QAct`), bf16 and int8 weights meet bf16 activations in a prompt
    /// (`cpu::round_bf16`).
    pub fn matmul_a(
        &self,
        ar: &Mapped,
        x: &[f32],
        t: usize,
        rows: usize,
        y: &mut [f32],
        acts: Acts,
    ) {
        debug_assert_eq!(x.len(), t * self.inp);
        debug_assert_eq!(y.len(), t * rows);
        let parts = || self.bands.iter().flat_map(|b| &b.parts);
        if t > 1 && acts.bf16 && cpu::bf16a_applies(self.wtype) {
            let mut xb = ROUNDED.take();
            cpu::round_bf16(x, &mut xb);
            self.prompt_rows_bf16a(ar, &xb, t, rows, y);
            ROUNDED.set(xb);
            return;
        }
        if t == 1
            && acts.int8
            && parts().all(|p| {
                p.col0.is_multiple_of(32) && cpu::a8_applies(self.wtype, p.cols, self.group)
            })
        {
            // Taken out of the thread's slot for the product, and put back after it.
            let mut qa = QUANTIZED.take();
            qa.fill(x);
            self.decode_rows(ar, rows, y, |_, p, rs, ys, add| {
                cpu::rows_dot_a8(rs, qa.cols(p.col0, p.cols), ys, add)
            });
            QUANTIZED.set(qa);
            return;
        }
        if t == 1 {
            // int8: the activations in the order the kernel unpacks bytes, once per product.
            if parts().all(|p| {
                p.col0.is_multiple_of(32) && cpu::permuted_applies(self.wtype, p.cols, self.group)
            }) {
                let mut xp = PERMUTED.take();
                cpu::permute32(x, &mut xp);
                self.decode_each_row(ar, rows, y, |p, w, sc| {
                    let c = p.col0..p.col0 + p.cols;
                    cpu::row_dot_permuted(self.wtype, w, &xp[c], sc, self.group)
                });
                PERMUTED.set(xp);
                return;
            }
            let (mut xa, mut at) = ALIGNED.take();
            if cpu::pairs_apply(self.wtype) {
                self.pair(x, &mut xa, &mut at);
                self.decode_rows(ar, rows, y, |k, _, rs, ys, add| {
                    cpu::rows_dot_pairs(rs, &xa[at[k]..at[k] + rs.cols], ys, add)
                });
                ALIGNED.set((xa, at));
                return;
            }
            self.place(ar, x, &mut xa, &mut at);
            self.decode_rows(ar, rows, y, |k, _, rs, ys, add| {
                cpu::rows_dot(rs, &xa[at[k]..at[k] + rs.cols], ys, add)
            });
            ALIGNED.set((xa, at));
            return;
        }
        self.prompt_rows(ar, x, t, rows, y)
    }

    /// A batch: each tile of rows is read and converted to f32 once, then multiplied with
    /// every token at once by the `gemm` crate (cache blocking, SIMD, f32 accumulation).
    fn prompt_rows(&self, ar: &Mapped, x: &[f32], t: usize, rows: usize, y: &mut [f32]) {
        let tasks = self.tasks_of(rows, BATCH_TILE_BYTES);
        // Each task writes its rows' column of every token straight into y (token-major);
        // the tasks' rows are disjoint.
        let dst = SendPtr(y.as_mut_ptr());
        tasks.par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |(tile, scratch): &mut (Vec<f32>, Vec<f32>), &(bi, r0, r1)| {
                let b = &self.bands[bi];
                let n = r1 - r0;
                let d = dst;
                // The tile column-major (`tile[c·n + i]` = row r0 + i at column c), the
                // layout gemm reads without transposing.
                tile.resize(n * self.inp, 0.0);
                for p in &b.parts {
                    let rows = self.rows_of(ar, b, p, r0, r1);
                    cpu::dequant_cols(&rows, &mut tile[p.col0 * n..], n, scratch);
                }
                // y[tok·rows + r0 + i] (i < n) = Σ_k tile[i, k] · x[tok, k]: dst (n × t) with
                // row stride 1 and column stride rows, tile (n × inp) column-major, xᵀ
                // (inp × t).
                // SAFETY: every pointer covers its matrix with the strides given (tile n·inp,
                // x t·inp, y t·rows from row r0 on, r0 + n <= rows), and no other task writes
                // rows r0..r1 of y.
                unsafe {
                    cpu::gemm_f32(
                        (n, t, self.inp),
                        (d.0.add(r0), rows as isize, 1),
                        (tile.as_ptr(), n as isize, 1),
                        (x.as_ptr(), self.inp as isize, 1),
                    )
                }
            },
        );
    }

    /// A batch under `--bf16-activations`: each task's rows (bf16 or int8), as stored,
    /// against every token's bf16 activations (`cpu::tile_bf16`), written straight into
    /// `y` (token-major); a band's later parts add to the first's sums.
    fn prompt_rows_bf16a(&self, ar: &Mapped, xb: &[u16], t: usize, rows: usize, y: &mut [f32]) {
        let tasks = self.tasks_of(rows, BATCH_TILE_BYTES);
        let (dst, len) = (SendPtr(y.as_mut_ptr()), y.len());
        tasks.par_iter().for_each(|&(bi, r0, r1)| {
            let d = dst;
            let b = &self.bands[bi];
            for (k, p) in b.parts.iter().enumerate() {
                let w = self.rows_of(ar, b, p, r0, r1);
                let tile = cpu::Tile {
                    rows: &w,
                    x: &xb[p.col0..],
                    ldx: self.inp,
                    t,
                    ldo: rows,
                    add: k > 0,
                };
                // SAFETY: y from row r0 on holds len - r0 values (the tile checks its
                // reach against that), and rows r0..r1 of every token are this task's
                // alone.
                unsafe { cpu::tile_bf16(&tile, d.0.add(r0), len - r0) }
            }
        });
    }
}

/// Weight bytes per task of a decode product: about 128 KiB, or fewer where that leaves
/// the threads too few tasks.
const DECODE_TASK_BYTES: usize = 128 << 10;

/// Weight bytes per tile of a batched product: big enough that packing the tokens for
/// `gemm` is a small part of the work, small enough (as f32) to stay in L2/L3.
const BATCH_TILE_BYTES: usize = 1 << 20;
