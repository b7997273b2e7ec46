//! The Llama decoder on the CPU: embeddings, RMSNorm, RoPE, grouped-query attention with a
//! KV cache, SwiGLU MLP, final norm and `lm_head`, with weights used in place from the
//! mapped files.
//!
//! A linear layer is a set of *bands* (row ranges) each made of *parts* (column ranges),
//! every part a strided block of the mapped file. A Hugging Face tensor is one band of one
//! part; a column-parallel NeMo tensor is one band per TP rank; a row-parallel one is one
//! band with a part per rank, whose partial products are summed. So a `.nemo` runs on its
//! shards as stored, with no merged copy.

use rayon::prelude::*;

use crate::container::mapped::Mapped;
use crate::runtime::attention::{self, SendPtr};
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
        if p.scales.is_empty() {
            return &[];
        }
        let g = p.cols.div_ceil(self.group);
        let local = r - b.row0;
        &p.scales[local * g..(local + 1) * g]
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

    /// Row ranges of about 128 KiB of weights, each within one band: the unit of
    /// parallel work for one token.
    fn tasks(&self, rows: usize) -> Vec<(usize, usize, usize)> {
        self.tasks_of(rows, 128 << 10)
    }

    /// Row ranges of about `bytes` of weights (fewer where that leaves the threads too few
    /// tasks to share evenly), each within one band, of equal size within a band.
    fn tasks_of(&self, rows: usize, bytes: usize) -> Vec<(usize, usize, usize)> {
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

    /// f32 rows `r0..r1` of band `b` as they lie in the mapping (pointer, row stride in
    /// values) when the band is one part of whole rows, aligned for f32: a prompt's
    /// product then reads them in place instead of copying them to a tile.
    fn f32_in_place(
        &self,
        ar: &Mapped,
        b: &Band,
        r0: usize,
        r1: usize,
    ) -> Option<(*const f32, usize)> {
        let [p] = &b.parts[..] else { return None };
        if self.wtype != WType::F32 || p.col0 != 0 || p.cols != self.inp || p.stride % 4 != 0 {
            return None;
        }
        let ptr = self.part_rows(ar, b, p, r0, r1).as_ptr() as *const f32;
        ptr.is_aligned().then_some((ptr, (p.stride / 4) as usize))
    }

    /// The bytes of part `p`'s rows `r0..r1` of band `b`, from the first row's start to the
    /// last row's end.
    fn part_rows<'a>(&self, ar: &'a Mapped, b: &Band, p: &Part, r0: usize, r1: usize) -> &'a [u8] {
        let first = (r0 - b.row0) as u64;
        let len = (r1 - r0 - 1) as u64 * p.stride + (p.cols * self.wtype.size()) as u64;
        ar.slice(p.offset + first * p.stride, len)
    }

    /// Runs `f(row, [(part, bytes of the row in that part)])` over rows `r0..r1` of band
    /// `bi`, slicing each part's rows from the archive once.
    fn for_rows(
        &self,
        ar: &Mapped,
        bi: usize,
        r0: usize,
        r1: usize,
        mut f: impl FnMut(usize, &[(&Part, &[u8])]),
    ) {
        let b = &self.bands[bi];
        let bases: Vec<(&Part, &[u8])> = b
            .parts
            .iter()
            .map(|p| (p, self.part_rows(ar, b, p, r0, r1)))
            .collect();
        let mut row: Vec<(&Part, &[u8])> = bases.clone();
        for r in r0..r1 {
            let k = (r - r0) as u64;
            for (slot, (p, base)) in row.iter_mut().zip(&bases) {
                let at = (k * p.stride) as usize;
                *slot = (p, &base[at..at + p.cols * self.wtype.size()]);
            }
            f(r, &row);
        }
    }

    /// `y[r] = Σ_parts dot(part, row r of the part, its scales)` for rows `0..rows`, in
    /// parallel over row tasks: one token's product.
    fn decode_rows(
        &self,
        ar: &Mapped,
        rows: usize,
        y: &mut [f32],
        dot: impl Fn(&Part, &[u8], &[f32]) -> f32 + Sync,
    ) {
        let tasks = self.tasks(rows);
        let mut outs: Vec<&mut [f32]> = Vec::with_capacity(tasks.len());
        let mut rest = &mut y[..];
        for &(_, r0, r1) in &tasks {
            let (a, b) = rest.split_at_mut(r1 - r0);
            outs.push(a);
            rest = b;
        }
        tasks
            .par_iter()
            .zip(outs.into_par_iter())
            .for_each(|(&(bi, r0, r1), ys)| {
                let b = &self.bands[bi];
                self.for_rows(ar, bi, r0, r1, |r, parts| {
                    let mut acc = 0f32;
                    for (p, w) in parts {
                        acc += dot(p, w, self.scales(p, b, r));
                    }
                    ys[r - r0] = acc;
                });
            });
    }

    /// `y[t] = W x[t]` for `t` tokens (`x`: `t × inp`, `y`: `t × rows`), rows
    /// `0..rows` only (`rows ≤ out`: the vocabulary without its padding).
    pub fn matmul(&self, ar: &Mapped, x: &[f32], t: usize, rows: usize, y: &mut [f32]) {
        self.matmul_a(ar, x, t, rows, y, false)
    }

    /// [`Linear::matmul`]; with `a8`, int8 weights meet int8 activations when decoding
    /// (`cpu::QAct`, opt-in: a different rounding).
    pub fn matmul_a(&self, ar: &Mapped, x: &[f32], t: usize, rows: usize, y: &mut [f32], a8: bool) {
        debug_assert_eq!(x.len(), t * self.inp);
        debug_assert_eq!(y.len(), t * rows);
        let parts = || self.bands.iter().flat_map(|b| &b.parts);
        if t == 1
            && a8
            && parts().all(|p| {
                p.col0.is_multiple_of(32) && cpu::a8_applies(self.wtype, p.cols, self.group)
            })
        {
            let qa = cpu::QAct::of(x);
            return self.decode_rows(ar, rows, y, |p, w, sc| {
                let c = p.col0..p.col0 + p.cols;
                let s = p.col0 / 32..(p.col0 + p.cols) / 32;
                cpu::row_dot_a8(self.wtype, w, &qa.q[c], &qa.s[s], sc, self.group)
            });
        }
        if t == 1 {
            // int8: the activations in the order the kernel unpacks bytes, once per product.
            if parts().all(|p| {
                p.col0.is_multiple_of(32) && cpu::permuted_applies(self.wtype, p.cols, self.group)
            }) {
                let mut xp = Vec::new();
                cpu::permute32(x, &mut xp);
                return self.decode_rows(ar, rows, y, |p, w, sc| {
                    let c = p.col0..p.col0 + p.cols;
                    cpu::row_dot_permuted(self.wtype, w, &xp[c], sc, self.group)
                });
            }
            return self.decode_rows(ar, rows, y, |p, w, sc| {
                cpu::row_dot(self.wtype, w, &x[p.col0..p.col0 + p.cols], sc, self.group)
            });
        }
        // A batch: each tile of rows is read and converted to f32 once, then multiplied
        // with every token at once by the `gemm` crate (cache blocking, SIMD, f32
        // accumulation).
        let tasks = self.tasks_of(rows, BATCH_TILE_BYTES);
        // Each task writes its rows' column of every token straight into y (token-major);
        // the tasks' rows are disjoint.
        let dst = SendPtr(y.as_mut_ptr());
        tasks
            .par_iter()
            .for_each_init(Vec::new, |tile: &mut Vec<f32>, &(bi, r0, r1)| {
                let b = &self.bands[bi];
                let n = r1 - r0;
                let d = dst;
                if let Some((w, stride)) = self.f32_in_place(ar, b, r0, r1) {
                    // SAFETY: as below, with the rows read in place: n rows of inp f32
                    // values, `stride` apart, inside the mapping.
                    unsafe {
                        cpu::gemm_f32(
                            (n, t, self.inp),
                            (d.0.add(r0), rows as isize, 1),
                            (w, 1, stride as isize),
                            (x.as_ptr(), self.inp as isize, 1),
                        )
                    }
                    return;
                }
                tile.resize(n * self.inp, 0.0);
                self.for_rows(ar, bi, r0, r1, |r, parts| {
                    let row = &mut tile[(r - r0) * self.inp..(r - r0 + 1) * self.inp];
                    for (p, w) in parts {
                        cpu::dequant(
                            self.wtype,
                            w,
                            self.scales(p, b, r),
                            self.group,
                            &mut row[p.col0..p.col0 + p.cols],
                        );
                    }
                });
                // y[tok·rows + r0 + i] (i < n) = Σ_k tile[i, k] · x[tok, k]: dst (n × t) with
                // row stride 1 and column stride rows, tile (n × inp) row-major, xᵀ (inp × t).
                // SAFETY: every pointer covers its matrix with the strides given (tile n·inp,
                // x t·inp, y t·rows from row r0 on, r0 + n <= rows), and no other task writes
                // rows r0..r1 of y.
                unsafe {
                    cpu::gemm_f32(
                        (n, t, self.inp),
                        (d.0.add(r0), rows as isize, 1),
                        (tile.as_ptr(), 1, self.inp as isize),
                        (x.as_ptr(), self.inp as isize, 1),
                    )
                }
            });
    }
}

/// Weight bytes per tile of a batched product: big enough that packing the tokens for
/// `gemm` is a small part of the work, small enough (as f32) to stay in L2/L3.
const BATCH_TILE_BYTES: usize = 1 << 20;

/// How the fused QKV output is ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvOrder {
    /// `[q (all heads); k; v]` (Hugging Face `q_proj`, `k_proj`, `v_proj` stacked).
    Separate,
    /// Per query group `[q heads of the group; k; v]` (Megatron `query_key_value`).
    Grouped,
}

/// Model dimensions and constants.
#[derive(Debug, Clone)]
pub struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub layers: usize,
    /// Logits computed (the tokenizer's vocabulary; padding rows are skipped).
    pub vocab: usize,
    pub eps: f32,
    /// The rotary frequencies of one head, scaling applied (`Arch::scaled_inv_freq`).
    pub inv_freq: Vec<f32>,
    pub max_positions: usize,
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub qkv: Linear,
    pub o: Linear,
    pub mlp_norm: Vec<f32>,
    /// Output `[gate (ffn); up (ffn)]`.
    pub gate_up: Linear,
    pub down: Linear,
}

/// The weights of a Llama model laid over its mapped files.
pub struct Weights {
    pub dims: Dims,
    pub embed: Linear,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    pub lm_head: Linear,
    pub qkv_order: QkvOrder,
    /// Decode int8 layers against int8 activations (`--int8-activations`; opt-in).
    pub a8: bool,
}

/// Keys and values of the positions seen so far.
/// Head-major: `k[layer][group]` holds `positions × head_dim` values, so attention streams
/// each head's keys and values contiguously.
pub struct Cache {
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
    pub len: usize,
}

impl Weights {
    /// Bytes one decode step reads (every weight once, the embedding row aside).
    pub fn bytes_per_token(&self) -> u64 {
        let mut b = self.lm_head.bytes() / self.lm_head.out as u64 * self.dims.vocab as u64;
        for l in &self.layers {
            b += l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes();
            b += 4 * (l.attn_norm.len() + l.mlp_norm.len()) as u64;
        }
        b
    }

    pub fn parameter_count(&self) -> u64 {
        let mut n = (self.embed.out * self.embed.inp + self.lm_head.out * self.lm_head.inp) as u64;
        for l in &self.layers {
            for lin in [&l.qkv, &l.o, &l.gate_up, &l.down] {
                n += (lin.out * lin.inp) as u64;
            }
            n += (l.attn_norm.len() + l.mlp_norm.len()) as u64;
        }
        n + self.norm.len() as u64
    }

    pub fn new_cache(&self) -> Cache {
        let heads = vec![Vec::new(); self.dims.kv_heads];
        Cache {
            k: vec![heads.clone(); self.layers.len()],
            v: vec![heads; self.layers.len()],
            len: 0,
        }
    }

    /// Runs `tokens` (at positions `cache.len..`) through the model and returns the
    /// logits of the last one.
    pub fn forward(&self, ar: &Mapped, cache: &mut Cache, tokens: &[u32]) -> Vec<f32> {
        let d = &self.dims;
        let t = tokens.len();
        let (h, hd, nh, nkv) = (d.hidden, d.head_dim, d.heads, d.kv_heads);
        let qdim = nh * hd;
        let kvdim = nkv * hd;
        let p0 = cache.len;
        let mut x = vec![0f32; t * h];
        for (i, &tok) in tokens.iter().enumerate() {
            self.embed.row(ar, tok as usize, &mut x[i * h..(i + 1) * h]);
        }
        let inv_freq = &d.inv_freq;
        // cos/sin per position, as transformers computes them (f32 products).
        let half = hd / 2;
        let mut cos = vec![0f32; t * half];
        let mut sin = vec![0f32; t * half];
        for i in 0..t {
            let pos = (p0 + i) as f32;
            for j in 0..half {
                let a = pos * inv_freq[j];
                cos[i * half + j] = a.cos();
                sin[i * half + j] = a.sin();
            }
        }
        let mut hbuf = vec![0f32; t * h];
        let qkv_out = qdim + 2 * kvdim;
        let mut qkv = vec![0f32; t * qkv_out];
        let mut attn = vec![0f32; t * qdim];
        let mut o = vec![0f32; t * h];
        let mut gu = vec![0f32; t * 2 * d.ffn];
        let mut act = vec![0f32; t * d.ffn];
        for (li, l) in self.layers.iter().enumerate() {
            rms_norm(&x, &l.attn_norm, d.eps, &mut hbuf);
            l.qkv.matmul_a(ar, &hbuf, t, qkv_out, &mut qkv, self.a8);
            let mut q = vec![0f32; t * qdim];
            let kc = &mut cache.k[li];
            let vc = &mut cache.v[li];
            for g in 0..nkv {
                kc[g].truncate(p0 * hd);
                vc[g].truncate(p0 * hd);
            }
            for i in 0..t {
                let row = &qkv[i * qkv_out..(i + 1) * qkv_out];
                let (qr, kr, vr) = split_qkv(row, self.qkv_order, nh, nkv, hd);
                let (c, s) = (
                    &cos[i * half..(i + 1) * half],
                    &sin[i * half..(i + 1) * half],
                );
                let qt = &mut q[i * qdim..(i + 1) * qdim];
                for hh in 0..nh {
                    rope(qr[hh], c, s, &mut qt[hh * hd..(hh + 1) * hd]);
                }
                let mut kt = vec![0f32; hd];
                for g in 0..nkv {
                    rope(kr[g], c, s, &mut kt);
                    kc[g].extend_from_slice(&kt);
                    vc[g].extend_from_slice(vr[g]);
                }
            }
            let shape = attention::Shape {
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                p0,
                t,
            };
            attention::attend(&q, &cache.k[li], &cache.v[li], shape, &mut attn);
            l.o.matmul_a(ar, &attn, t, h, &mut o, self.a8);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            rms_norm(&x, &l.mlp_norm, d.eps, &mut hbuf);
            l.gate_up
                .matmul_a(ar, &hbuf, t, 2 * d.ffn, &mut gu, self.a8);
            // Per token, in parallel for a prompt (the exponentials are a serial tail).
            act.par_chunks_mut(d.ffn)
                .zip(gu.par_chunks(2 * d.ffn))
                .with_min_len(8)
                .for_each(|(a, row)| {
                    let (g, u) = row.split_at(d.ffn);
                    for j in 0..d.ffn {
                        a[j] = silu(g[j]) * u[j];
                    }
                });
            l.down.matmul_a(ar, &act, t, h, &mut o, self.a8);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        cache.len = p0 + t;
        let last = &x[(t - 1) * h..t * h];
        let mut normed = vec![0f32; h];
        rms_norm(last, &self.norm, d.eps, &mut normed);
        let mut logits = vec![0f32; d.vocab];
        self.lm_head
            .matmul_a(ar, &normed, 1, d.vocab, &mut logits, self.a8);
        logits
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// transformers' `LlamaRMSNorm` in f32, row by row (rows in parallel for a prompt).
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    x.par_chunks(h)
        .zip(out.par_chunks_mut(h))
        .with_min_len(16)
        .for_each(|(xr, or)| {
            let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let r = 1.0 / (ss + eps).sqrt();
            for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
                *o = g * (v * r);
            }
        });
}

/// Rotate-half RoPE of one head (the convention of both Megatron and Hugging Face Llama).
fn rope(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    for j in 0..half {
        let (a, b) = (x[j], x[j + half]);
        out[j] = a * cos[j] - b * sin[j];
        out[j + half] = b * cos[j] + a * sin[j];
    }
}

type Heads<'a> = Vec<&'a [f32]>;

fn split_qkv(
    row: &[f32],
    order: QkvOrder,
    nh: usize,
    nkv: usize,
    hd: usize,
) -> (Heads<'_>, Heads<'_>, Heads<'_>) {
    let mut q = Vec::with_capacity(nh);
    let mut k = Vec::with_capacity(nkv);
    let mut v = Vec::with_capacity(nkv);
    match order {
        QkvOrder::Separate => {
            for hh in 0..nh {
                q.push(&row[hh * hd..(hh + 1) * hd]);
            }
            let kb = nh * hd;
            let vb = kb + nkv * hd;
            for g in 0..nkv {
                k.push(&row[kb + g * hd..kb + (g + 1) * hd]);
                v.push(&row[vb + g * hd..vb + (g + 1) * hd]);
            }
        }
        QkvOrder::Grouped => {
            let per = nh / nkv;
            let gsz = (per + 2) * hd;
            for g in 0..nkv {
                let base = g * gsz;
                for j in 0..per {
                    q.push(&row[base + j * hd..base + (j + 1) * hd]);
                }
                k.push(&row[base + per * hd..base + (per + 1) * hd]);
                v.push(&row[base + (per + 1) * hd..base + (per + 2) * hd]);
            }
        }
    }
    (q, k, v)
}
