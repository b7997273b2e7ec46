//! The forward pass of a device runtime, written once over [`Ops`]: the kernels of
//! `kernels/runtime.cu` on a CUDA device (`runtime::cuda`), or their CPU twins
//! ([`TwinOps`]). With the twins the whole pass (weights laid out as they are uploaded, the
//! KV cache, the order of the kernels, every size and offset) runs and is tested on any
//! machine against the CPU runtime; on a GPU only the kernels themselves differ, and
//! `xtask gpu-check` compares each with its twin.

use std::ops::Range;

use crate::container::mapped::Mapped;
use crate::runtime::backend::Session;
use crate::runtime::cpu::WType;
use crate::runtime::linear::Linear;
use crate::runtime::llama::{Dims, QkvOrder, Weights};
use crate::runtime::twins::{self, AttnShape, MatShape};
use crate::{Error, Result};

type R<T = ()> = std::result::Result<T, String>;

/// A weight matrix as the kernels read it: `rows × cols` values of type `wt`, and for
/// int8 `rows × ceil(cols / group)` scales.
pub struct Mat<O: Ops + ?Sized> {
    pub wt: WType,
    pub w: O::Bytes,
    pub scales: O::Buf,
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
}

/// The kernels of a device, over its buffers of f32 (`Buf`), of weight bytes (`Bytes`)
/// and of token ids (`Ids`). Ranges select the values of a buffer a call reads.
pub trait Ops {
    type Buf;
    type Bytes;
    type Ids;

    fn zeros(&self, n: usize) -> R<Self::Buf>;
    fn ids(&self, n: usize) -> R<Self::Ids>;
    fn upload(&self, host: &[f32]) -> R<Self::Buf>;
    /// Rows `0..rows` of `lin` as stored ([`Linear::raw_row`]).
    fn upload_linear(&mut self, ar: &Mapped, lin: &Linear, rows: usize) -> R<Mat<Self>>;
    fn write(&self, host: &[f32], dst: &mut Self::Buf) -> R;
    fn read(&self, src: &Self::Buf, host: &mut [f32]) -> R;
    /// Waits for the queued work and reports any failure it had.
    fn finish(&self) -> R;

    fn embed_rows(
        &self,
        table: &Mat<Self>,
        tokens: &[u32],
        ids: &mut Self::Ids,
        out: &mut Self::Buf,
    ) -> R;
    fn rms_norm(
        &self,
        x: &Self::Buf,
        rows: Range<usize>,
        w: &Self::Buf,
        eps: f32,
        out: &mut Self::Buf,
    ) -> R;
    fn matvec(&self, w: &Mat<Self>, x: &Self::Buf, t: usize, y: &mut Self::Buf) -> R;
    #[allow(clippy::too_many_arguments)]
    fn rope_qkv(
        &self,
        qkv: &Self::Buf,
        s: AttnShape,
        order: QkvOrder,
        cos: &Self::Buf,
        sin: &Self::Buf,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &mut Self::Buf,
    ) -> R;
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: AttnShape,
        scores: &mut Self::Buf,
        out: &mut Self::Buf,
    ) -> R;
    fn silu_mul(&self, gu: &Self::Buf, t: usize, ffn: usize, act: &mut Self::Buf) -> R;
    fn add_into(&self, x: &mut Self::Buf, o: &Self::Buf, n: usize) -> R;
}

struct Layer<O: Ops> {
    attn_norm: O::Buf,
    qkv: Mat<O>,
    o: Mat<O>,
    mlp_norm: O::Buf,
    gate_up: Mat<O>,
    down: Mat<O>,
}

/// A model's weights on a device.
pub struct DeviceModel<O: Ops> {
    pub ops: O,
    embed: Mat<O>,
    layers: Vec<Layer<O>>,
    norm: O::Buf,
    lm_head: Mat<O>,
    dims: Dims,
    order: QkvOrder,
}

impl<O: Ops> DeviceModel<O> {
    /// Puts `w`'s weights on the device of `ops`.
    pub fn upload(mut ops: O, w: &Weights, ar: &Mapped) -> R<DeviceModel<O>> {
        let d = &w.dims;
        if !d.head_dim.is_multiple_of(2) || d.kv_heads == 0 || !d.heads.is_multiple_of(d.kv_heads) {
            return Err(format!("unsupported head layout {d:?}"));
        }
        let embed = ops.upload_linear(ar, &w.embed, w.embed.out)?;
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            layers.push(Layer {
                attn_norm: ops.upload(&l.attn_norm)?,
                qkv: ops.upload_linear(ar, &l.qkv, l.qkv.out)?,
                o: ops.upload_linear(ar, &l.o, l.o.out)?,
                mlp_norm: ops.upload(&l.mlp_norm)?,
                gate_up: ops.upload_linear(ar, &l.gate_up, l.gate_up.out)?,
                down: ops.upload_linear(ar, &l.down, l.down.out)?,
            });
        }
        let norm = ops.upload(&w.norm)?;
        // Padding rows of the output layer are never computed.
        let lm_head = ops.upload_linear(ar, &w.lm_head, d.vocab)?;
        ops.finish()?;
        Ok(DeviceModel {
            ops,
            embed,
            layers,
            norm,
            lm_head,
            dims: d.clone(),
            order: w.qkv_order,
        })
    }

    /// A session with a KV cache of `positions` positions on the device.
    pub fn session(&self, positions: usize) -> Result<DeviceSession<'_, O>> {
        let d = &self.dims;
        let per_layer = d.kv_heads * positions * d.head_dim;
        let mut k = Vec::with_capacity(d.layers);
        let mut v = Vec::with_capacity(d.layers);
        for _ in 0..d.layers {
            k.push(self.ops.zeros(per_layer).map_err(Error::Device)?);
            v.push(self.ops.zeros(per_layer).map_err(Error::Device)?);
        }
        Ok(DeviceSession {
            m: self,
            k,
            v,
            cap: positions,
            len: 0,
            s: None,
        })
    }
}

/// A forward pass's buffers, for up to `t` tokens.
struct Scratch<O: Ops> {
    t: usize,
    x: O::Buf,
    h: O::Buf,
    qkv: O::Buf,
    q: O::Buf,
    attn: O::Buf,
    o: O::Buf,
    gu: O::Buf,
    act: O::Buf,
    scores: O::Buf,
    cos: O::Buf,
    sin: O::Buf,
    ids: O::Ids,
    last: O::Buf,
    logits: O::Buf,
    /// The host's cos/sin tables before they go up.
    host_cos: Vec<f32>,
    host_sin: Vec<f32>,
}

/// One sequence on a device.
pub struct DeviceSession<'a, O: Ops> {
    m: &'a DeviceModel<O>,
    k: Vec<O::Buf>,
    v: Vec<O::Buf>,
    cap: usize,
    len: usize,
    s: Option<Scratch<O>>,
}

impl<O: Ops> DeviceSession<'_, O> {
    /// Buffers for `t` tokens (attention scores for the session's whole room), reused
    /// while they are large enough: decoding allocates nothing.
    fn scratch(&mut self, t: usize) -> R<Scratch<O>> {
        if let Some(s) = self.s.take() {
            if s.t >= t {
                return Ok(s);
            }
        }
        let o = &self.m.ops;
        let d = &self.m.dims;
        let (h, qdim, kv) = (d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim);
        Ok(Scratch {
            t,
            x: o.zeros(t * h)?,
            h: o.zeros(t * h)?,
            qkv: o.zeros(t * (qdim + 2 * kv))?,
            q: o.zeros(t * qdim)?,
            attn: o.zeros(t * qdim)?,
            o: o.zeros(t * h)?,
            gu: o.zeros(t * 2 * d.ffn)?,
            act: o.zeros(t * d.ffn)?,
            scores: o.zeros(t * d.heads * self.cap)?,
            cos: o.zeros(t * d.head_dim / 2)?,
            sin: o.zeros(t * d.head_dim / 2)?,
            ids: o.ids(t)?,
            last: o.zeros(h)?,
            logits: o.zeros(d.vocab)?,
            host_cos: Vec::with_capacity(t * d.head_dim / 2),
            host_sin: Vec::with_capacity(t * d.head_dim / 2),
        })
    }

    fn run(&mut self, tokens: &[u32], logits: &mut [f32]) -> R {
        let m = self.m;
        let (o, d) = (&m.ops, &m.dims);
        let (t, p0) = (tokens.len(), self.len);
        if t == 0 || p0 + t > self.cap {
            return Err(format!(
                "{t} tokens after {p0} positions do not fit the session's {} positions",
                self.cap
            ));
        }
        let mut s = self.scratch(t)?;
        // cos/sin per position, as the CPU runtime computes them.
        let half = d.head_dim / 2;
        let (cos, sin) = (&mut s.host_cos, &mut s.host_sin);
        cos.clear();
        cos.resize(t * half, 0.0);
        sin.clear();
        sin.resize(t * half, 0.0);
        crate::runtime::llama::rope_tables(&d.inv_freq[..half], p0, cos, sin);
        o.write(&s.host_cos, &mut s.cos)?;
        o.write(&s.host_sin, &mut s.sin)?;
        o.embed_rows(&m.embed, tokens, &mut s.ids, &mut s.x)?;
        let shape = AttnShape {
            heads: d.heads,
            kv_heads: d.kv_heads,
            hd: d.head_dim,
            p0,
            t,
            cap: self.cap,
        };
        let h = d.hidden;
        for (li, l) in m.layers.iter().enumerate() {
            o.rms_norm(&s.x, 0..t, &l.attn_norm, d.eps, &mut s.h)?;
            o.matvec(&l.qkv, &s.h, t, &mut s.qkv)?;
            o.rope_qkv(
                &s.qkv,
                shape,
                m.order,
                &s.cos,
                &s.sin,
                &mut s.q,
                &mut self.k[li],
                &mut self.v[li],
            )?;
            o.attention(
                &s.q,
                &self.k[li],
                &self.v[li],
                shape,
                &mut s.scores,
                &mut s.attn,
            )?;
            o.matvec(&l.o, &s.attn, t, &mut s.o)?;
            o.add_into(&mut s.x, &s.o, t * h)?;
            o.rms_norm(&s.x, 0..t, &l.mlp_norm, d.eps, &mut s.h)?;
            o.matvec(&l.gate_up, &s.h, t, &mut s.gu)?;
            o.silu_mul(&s.gu, t, d.ffn, &mut s.act)?;
            o.matvec(&l.down, &s.act, t, &mut s.o)?;
            o.add_into(&mut s.x, &s.o, t * h)?;
        }
        o.rms_norm(&s.x, t - 1..t, &m.norm, d.eps, &mut s.last)?;
        o.matvec(&m.lm_head, &s.last, 1, &mut s.logits)?;
        o.read(&s.logits, &mut logits[..d.vocab])?;
        o.finish()?;
        self.len = p0 + t;
        self.s = Some(s);
        Ok(())
    }
}

impl<O: Ops> Session for DeviceSession<'_, O> {
    fn forward_into(&mut self, tokens: &[u32], logits: &mut [f32]) -> Result<()> {
        self.run(tokens, logits).map_err(Error::Device)
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// The CPU twins as a device: every kernel is its twin, every buffer a `Vec`.
pub struct TwinOps;

fn need(what: &str, have: usize, n: usize) -> R {
    if have < n {
        return Err(format!("{what}: {have} values where {n} are read"));
    }
    Ok(())
}

impl Ops for TwinOps {
    type Buf = Vec<f32>;
    type Bytes = Vec<u8>;
    type Ids = Vec<u32>;

    fn zeros(&self, n: usize) -> R<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn ids(&self, n: usize) -> R<Vec<u32>> {
        Ok(vec![0; n])
    }
    fn upload(&self, host: &[f32]) -> R<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn upload_linear(&mut self, ar: &Mapped, lin: &Linear, rows: usize) -> R<Mat<Self>> {
        let (mut w, mut scales) = (Vec::new(), Vec::new());
        for r in 0..rows {
            lin.raw_row(ar, r, &mut w, &mut scales)?;
        }
        Ok(Mat {
            wt: lin.wtype,
            w,
            scales,
            rows,
            cols: lin.inp,
            group: lin.group.max(1),
        })
    }
    fn write(&self, host: &[f32], dst: &mut Vec<f32>) -> R {
        need("write", dst.len(), host.len())?;
        dst[..host.len()].copy_from_slice(host);
        Ok(())
    }
    fn read(&self, src: &Vec<f32>, host: &mut [f32]) -> R {
        need("read", src.len(), host.len())?;
        host.copy_from_slice(&src[..host.len()]);
        Ok(())
    }
    fn finish(&self) -> R {
        Ok(())
    }
    fn embed_rows(
        &self,
        m: &Mat<Self>,
        tokens: &[u32],
        ids: &mut Vec<u32>,
        out: &mut Vec<f32>,
    ) -> R {
        need("embed ids", ids.len(), tokens.len())?;
        ids[..tokens.len()].copy_from_slice(tokens);
        if let Some(bad) = tokens.iter().find(|&&v| v as usize >= m.rows) {
            return Err(format!(
                "token id {bad} is outside the embedding's {} rows",
                m.rows
            ));
        }
        need("embed out", out.len(), tokens.len() * m.cols)?;
        twins::embed_rows(m.wt, &m.w, &m.scales, m.group, tokens, m.cols, out);
        Ok(())
    }
    fn rms_norm(
        &self,
        x: &Vec<f32>,
        rows: Range<usize>,
        w: &Vec<f32>,
        eps: f32,
        out: &mut Vec<f32>,
    ) -> R {
        let h = w.len();
        need("rms_norm x", x.len(), rows.end * h)?;
        need("rms_norm out", out.len(), rows.len() * h)?;
        twins::rms_norm(
            &x[rows.start * h..rows.end * h],
            w,
            eps,
            &mut out[..rows.len() * h],
        );
        Ok(())
    }
    fn matvec(&self, m: &Mat<Self>, x: &Vec<f32>, t: usize, y: &mut Vec<f32>) -> R {
        need("matvec x", x.len(), t * m.cols)?;
        need("matvec y", y.len(), t * m.rows)?;
        let chunk = twins::chunk_for(m.wt, m.cols, m.group);
        let s = MatShape {
            t,
            rows: m.rows,
            cols: m.cols,
            group: m.group,
            chunk,
        };
        twins::matvec(m.wt, &m.w, &m.scales, x, s, y);
        Ok(())
    }
    fn rope_qkv(
        &self,
        qkv: &Vec<f32>,
        s: AttnShape,
        order: QkvOrder,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        q: &mut Vec<f32>,
        k: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> R {
        need(
            "rope qkv",
            qkv.len(),
            s.t * (s.heads + 2 * s.kv_heads) * s.hd,
        )?;
        need(
            "rope cache",
            k.len().min(v.len()),
            s.kv_heads * s.cap * s.hd,
        )?;
        twins::rope_qkv(qkv, s, order, cos, sin, q, k, v);
        Ok(())
    }
    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        s: AttnShape,
        _scores: &mut Vec<f32>,
        out: &mut Vec<f32>,
    ) -> R {
        need("attention out", out.len(), s.t * s.heads * s.hd)?;
        twins::attention(q, k, v, s, out);
        Ok(())
    }
    fn silu_mul(&self, gu: &Vec<f32>, t: usize, ffn: usize, act: &mut Vec<f32>) -> R {
        need("silu gu", gu.len(), 2 * t * ffn)?;
        twins::silu_mul(&gu[..2 * t * ffn], ffn, &mut act[..t * ffn]);
        Ok(())
    }
    fn add_into(&self, x: &mut Vec<f32>, o: &Vec<f32>, n: usize) -> R {
        need("add", x.len().min(o.len()), n)?;
        twins::add_into(&mut x[..n], &o[..n]);
        Ok(())
    }
}
