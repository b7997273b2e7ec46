//! The Llama decoder on the CPU: embeddings, RMSNorm, RoPE, grouped-query attention with a
//! KV cache, SwiGLU MLP, final norm and `lm_head`, with weights used in place from the
//! mapped files (`linear`).
//!
//! Decoding allocates nothing per token: the buffers of a forward pass live with the KV
//! cache and are reused, and the products keep their work split (`linear::Plan`).

use rayon::prelude::*;

use crate::container::mapped::Mapped;
use crate::runtime::attention;
pub use crate::runtime::linear::{Acts, Band, Linear, Part};

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
    /// Activations rounded before the products where an opt-in flag asks
    /// (`--int8-activations`, `--bf16-activations`); exact by default.
    pub acts: Acts,
}

/// Keys and values of the positions seen so far, and the buffers a forward pass works in.
/// Head-major: `k[layer][group]` holds `positions × head_dim` values, so attention streams
/// each head's keys and values contiguously.
pub struct Cache {
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
    pub len: usize,
    head_dim: usize,
    work: Scratch,
}

impl Cache {
    /// Room for `positions` positions in all, so that decoding up to there never grows
    /// the cache.
    pub fn reserve(&mut self, positions: usize) {
        let n = positions * self.head_dim;
        for g in self.k.iter_mut().chain(self.v.iter_mut()).flatten() {
            g.reserve(n.saturating_sub(g.len()));
        }
    }
}

/// A forward pass's buffers, sized on each call (they grow to the largest batch seen and
/// are reused, so a decode step allocates nothing).
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    last: Vec<f32>,
    scores: Vec<f32>,
}

/// `v` as `n` zeros, in its own memory where it has room.
fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.clear();
    v.resize(n, 0.0);
    v
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
            head_dim: self.dims.head_dim,
            work: Scratch::default(),
        }
    }

    /// Runs `tokens` (at positions `cache.len..`) through the model and returns the
    /// logits of the last one.
    pub fn forward(&self, ar: &Mapped, cache: &mut Cache, tokens: &[u32]) -> Vec<f32> {
        let mut logits = vec![0f32; self.dims.vocab];
        self.forward_into(ar, cache, tokens, &mut logits);
        logits
    }

    /// [`Weights::forward`] into `logits` (`vocab` values), with the cache's buffers: after
    /// the first call of a given batch size it allocates nothing (the cache aside, which
    /// grows unless [`Cache::reserve`]d).
    pub fn forward_into(&self, ar: &Mapped, cache: &mut Cache, tokens: &[u32], logits: &mut [f32]) {
        let d = &self.dims;
        let t = tokens.len();
        let (h, hd, nh, nkv) = (d.hidden, d.head_dim, d.heads, d.kv_heads);
        let qdim = nh * hd;
        let kvdim = nkv * hd;
        let p0 = cache.len;
        let w = &mut cache.work;
        let x = sized(&mut w.x, t * h);
        for (i, &tok) in tokens.iter().enumerate() {
            self.embed.row(ar, tok as usize, &mut x[i * h..(i + 1) * h]);
        }
        let half = hd / 2;
        let cos = sized(&mut w.cos, t * half);
        let sin = sized(&mut w.sin, t * half);
        rope_tables(&d.inv_freq[..half], p0, cos, sin);
        let hbuf = sized(&mut w.h, t * h);
        let qkv_out = qdim + 2 * kvdim;
        let qkv = sized(&mut w.qkv, t * qkv_out);
        let q = sized(&mut w.q, t * qdim);
        let kt = sized(&mut w.k, hd);
        let attn = sized(&mut w.attn, t * qdim);
        let o = sized(&mut w.o, t * h);
        let gu = sized(&mut w.gu, t * 2 * d.ffn);
        let act = sized(&mut w.act, t * d.ffn);
        let heads = Heads {
            order: self.qkv_order,
            nh,
            nkv,
            hd,
        };
        for (li, l) in self.layers.iter().enumerate() {
            rms_norm(x, &l.attn_norm, d.eps, hbuf);
            l.qkv.matmul_a(ar, hbuf, t, qkv_out, qkv, self.acts);
            let kc = &mut cache.k[li];
            let vc = &mut cache.v[li];
            for g in 0..nkv {
                kc[g].truncate(p0 * hd);
                vc[g].truncate(p0 * hd);
            }
            for i in 0..t {
                let row = &qkv[i * qkv_out..(i + 1) * qkv_out];
                let (c, s) = (
                    &cos[i * half..(i + 1) * half],
                    &sin[i * half..(i + 1) * half],
                );
                let qt = &mut q[i * qdim..(i + 1) * qdim];
                for hh in 0..nh {
                    rope(heads.q(row, hh), c, s, &mut qt[hh * hd..(hh + 1) * hd]);
                }
                for g in 0..nkv {
                    rope(heads.k(row, g), c, s, kt);
                    kc[g].extend_from_slice(kt);
                    vc[g].extend_from_slice(heads.v(row, g));
                }
            }
            let shape = attention::Shape {
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                p0,
                t,
            };
            attention::attend(q, &cache.k[li], &cache.v[li], shape, attn, &mut w.scores);
            l.o.matmul_a(ar, attn, t, h, o, self.acts);
            x.iter_mut().zip(o.iter()).for_each(|(a, b)| *a += b);
            rms_norm(x, &l.mlp_norm, d.eps, hbuf);
            l.gate_up.matmul_a(ar, hbuf, t, 2 * d.ffn, gu, self.acts);
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
            l.down.matmul_a(ar, act, t, h, o, self.acts);
            x.iter_mut().zip(o.iter()).for_each(|(a, b)| *a += b);
        }
        cache.len = p0 + t;
        let normed = sized(&mut w.last, h);
        rms_norm(&x[(t - 1) * h..t * h], &self.norm, d.eps, normed);
        self.lm_head
            .matmul_a(ar, normed, 1, d.vocab, &mut logits[..d.vocab], self.acts);
    }
}

pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// transformers' `LlamaRMSNorm` in f32, row by row (rows in parallel for a prompt).
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
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

/// cos and sin of each position `p0..` (rows of `inv_freq.len()`), as transformers
/// computes them (f32 products).
pub(crate) fn rope_tables(inv_freq: &[f32], p0: usize, cos: &mut [f32], sin: &mut [f32]) {
    let half = inv_freq.len();
    for (i, (c, s)) in cos.chunks_mut(half).zip(sin.chunks_mut(half)).enumerate() {
        let pos = (p0 + i) as f32;
        for (j, f) in inv_freq.iter().enumerate() {
            let a = pos * f;
            c[j] = a.cos();
            s[j] = a.sin();
        }
    }
}

/// Rotate-half RoPE of one head (the convention of both Megatron and Hugging Face Llama).
pub(crate) fn rope(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    for j in 0..half {
        let (a, b) = (x[j], x[j + half]);
        out[j] = a * cos[j] - b * sin[j];
        out[j + half] = b * cos[j] + a * sin[j];
    }
}

/// Where each head's query, key and value lie in a token's fused QKV output.
pub(crate) struct Heads {
    pub order: QkvOrder,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
}

impl Heads {
    /// The start of query head `hh`, key `g` (`which` 1) or value `g` (`which` 2).
    fn at(&self, which: usize, i: usize) -> usize {
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        match self.order {
            QkvOrder::Separate => match which {
                0 => i * hd,
                1 => (nh + i) * hd,
                _ => (nh + nkv + i) * hd,
            },
            QkvOrder::Grouped => {
                let per = nh / nkv;
                match which {
                    0 => ((i / per) * (per + 2) + i % per) * hd,
                    1 => (i * (per + 2) + per) * hd,
                    _ => (i * (per + 2) + per + 1) * hd,
                }
            }
        }
    }

    pub(crate) fn q<'a>(&self, row: &'a [f32], hh: usize) -> &'a [f32] {
        &row[self.at(0, hh)..][..self.hd]
    }

    pub(crate) fn k<'a>(&self, row: &'a [f32], g: usize) -> &'a [f32] {
        &row[self.at(1, g)..][..self.hd]
    }

    pub(crate) fn v<'a>(&self, row: &'a [f32], g: usize) -> &'a [f32] {
        &row[self.at(2, g)..][..self.hd]
    }
}
