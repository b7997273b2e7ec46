//! The CPU twins of the GPU runtime's kernels (`kernels/runtime.cu`). Each makes its
//! kernel's operations in its order (per-thread strided sums, then the block's tree or the
//! warp's xor butterfly; no fused multiply-adds, as NVRTC is told `--fmad=false`), so a
//! kernel and its twin agree bit for bit, except where the kernel calls `expf` (attention,
//! SwiGLU), whose last bits the GPU's library may round otherwise. `xtask gpu-check`
//! compares each kernel with its twin; the tests here compare each twin with the CPU
//! runtime.

use crate::runtime::cpu::WType;
use crate::runtime::llama::QkvOrder;

/// Threads per block, as `common.cuh`'s `BLOCK`.
pub const BLOCK: usize = 256;
/// Tokens per pass of `matvec` over a row (`TOK`).
pub const TOK: usize = 4;

/// The kernels' code for a weight type (`wt`).
pub fn wt_code(t: WType) -> i32 {
    match t {
        WType::F32 => 0,
        WType::F16 => 1,
        WType::BF16 => 2,
        WType::U8Offset => 3,
        WType::I8 => 4,
    }
}

/// `block_sum`: the 256 per-thread values added by halves.
fn block_sum(mut p: [f32; BLOCK]) -> f32 {
    let mut s = BLOCK / 2;
    while s > 0 {
        for i in 0..s {
            p[i] += p[i + s];
        }
        s /= 2;
    }
    p[0]
}

/// `block_max` (`fmaxf`, which ignores a NaN as `f32::max` does).
fn block_max(mut p: [f32; BLOCK]) -> f32 {
    let mut s = BLOCK / 2;
    while s > 0 {
        for i in 0..s {
            p[i] = p[i].max(p[i + s]);
        }
        s /= 2;
    }
    p[0]
}

/// `wload`: element `e` as f32 (int8 without its scale).
pub fn wload(t: WType, w: &[u8], e: usize) -> f32 {
    match t {
        WType::F32 => f32::from_le_bytes(w[4 * e..4 * e + 4].try_into().expect("4 bytes")),
        WType::F16 => half::f16::from_le_bytes([w[2 * e], w[2 * e + 1]]).to_f32(),
        WType::BF16 => half::bf16::from_le_bytes([w[2 * e], w[2 * e + 1]]).to_f32(),
        WType::U8Offset => (w[e] as i32 - 128) as f32,
        WType::I8 => w[e] as i8 as f32,
    }
}

/// `vals` (rows of `cols`) stored as type `t`, as the runtime reads weights: the bytes,
/// and for int8 `q` in -127..=127 per value with one scale (amax / 127) per group of
/// `group`. For tests and `xtask gpu-check`, which feed kernels and twins the same rows.
pub fn stored(t: WType, vals: &[f32], cols: usize, group: usize) -> (Vec<u8>, Vec<f32>) {
    let mut scales = Vec::new();
    let bytes = match t {
        WType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        WType::F16 => vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        WType::BF16 => vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        WType::U8Offset | WType::I8 => {
            let mut out = Vec::with_capacity(vals.len());
            for row in vals.chunks(cols) {
                for g in row.chunks(group) {
                    let amax = g.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let s = (amax / 127.0).max(1e-8);
                    scales.push(s);
                    for v in g {
                        let q = (v / s).round().clamp(-127.0, 127.0) as i32;
                        out.push(if t == WType::I8 {
                            q as i8 as u8
                        } else {
                            (q + 128) as u8
                        });
                    }
                }
            }
            out
        }
    };
    (bytes, scales)
}

/// `embed_rows`: `out[i]` = row `tokens[i]` of the `h`-wide table.
pub fn embed_rows(
    t: WType,
    table: &[u8],
    scales: &[f32],
    group: usize,
    tokens: &[u32],
    h: usize,
    out: &mut [f32],
) {
    let ng = h.div_ceil(group);
    for (i, &tok) in tokens.iter().enumerate() {
        let row = tok as usize;
        for j in 0..h {
            let mut v = wload(t, table, row * h + j);
            if t.is_int8() {
                v *= scales[row * ng + j / group];
            }
            out[i * h + j] = v;
        }
    }
}

/// `rms_norm`, every `h`-wide row of `x`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks(h).zip(out.chunks_mut(h)) {
        let mut p = [0f32; BLOCK];
        for (j, v) in xr.iter().enumerate() {
            p[j % BLOCK] += v * v;
        }
        let ss = block_sum(p);
        let r = 1.0 / (ss / h as f32 + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * r);
        }
    }
}

/// The shape of one layer's attention on the device: heads, KV heads, head size, the
/// first query's position, the queries, and the positions per KV head in the cache.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
    pub p0: usize,
    pub t: usize,
    pub cap: usize,
}

/// `rope_qkv`: `t` fused QKV rows to rotated queries `q` and the layer's cache.
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv(
    qkv: &[f32],
    s: AttnShape,
    order: QkvOrder,
    cos: &[f32],
    sin: &[f32],
    q: &mut [f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
) {
    let (nh, nkv, hd) = (s.heads, s.kv_heads, s.hd);
    let per = nh / nkv;
    let width = (nh + 2 * nkv) * hd;
    let half = hd / 2;
    for i in 0..s.t {
        for slot in 0..nh + 2 * nkv {
            let (kind, idx) = if slot < nh {
                (0, slot)
            } else if slot < nh + nkv {
                (1, slot - nh)
            } else {
                (2, slot - nh - nkv)
            };
            let at = match order {
                QkvOrder::Separate => [idx, nh + idx, nh + nkv + idx][kind] * hd,
                QkvOrder::Grouped => {
                    [
                        (idx / per) * (per + 2) + idx % per,
                        idx * (per + 2) + per,
                        idx * (per + 2) + per + 1,
                    ][kind]
                        * hd
                }
            };
            let src = &qkv[i * width + at..][..hd];
            let dst = match kind {
                0 => &mut q[(i * nh + idx) * hd..][..hd],
                1 => &mut k_cache[(idx * s.cap + s.p0 + i) * hd..][..hd],
                _ => &mut v_cache[(idx * s.cap + s.p0 + i) * hd..][..hd],
            };
            if kind == 2 {
                dst.copy_from_slice(src);
                continue;
            }
            let (c, sn) = (&cos[i * half..][..half], &sin[i * half..][..half]);
            for j in 0..half {
                let (a, b) = (src[j], src[j + half]);
                dst[j] = a * c[j] - b * sn[j];
                dst[j + half] = b * c[j] + a * sn[j];
            }
        }
    }
}

/// `attention`: `out` (`t × heads × hd`) from the queries and the layer's cache.
pub fn attention(q: &[f32], k_cache: &[f32], v_cache: &[f32], s: AttnShape, out: &mut [f32]) {
    let (nh, hd) = (s.heads, s.hd);
    let scale = (hd as f32).sqrt();
    let mut sc = vec![0f32; s.p0 + s.t];
    for i in 0..s.t {
        for hh in 0..nh {
            let g = hh / (nh / s.kv_heads);
            let n = s.p0 + i + 1;
            let qv = &q[(i * nh + hh) * hd..][..hd];
            let kg = &k_cache[g * s.cap * hd..];
            let vg = &v_cache[g * s.cap * hd..];
            let mut mx = [f32::NEG_INFINITY; BLOCK];
            for p in 0..n {
                let mut d = 0f32;
                for j in 0..hd {
                    d += qv[j] * kg[p * hd + j];
                }
                sc[p] = d / scale;
                mx[p % BLOCK] = mx[p % BLOCK].max(sc[p]);
            }
            let m = block_max(mx);
            let mut sums = [0f32; BLOCK];
            for p in 0..n {
                sc[p] = (sc[p] - m).exp();
                sums[p % BLOCK] += sc[p];
            }
            let sum = block_sum(sums);
            for d in 0..hd {
                let mut o = 0f32;
                for p in 0..n {
                    o += sc[p] / sum * vg[p * hd + d];
                }
                out[(i * nh + hh) * hd + d] = o;
            }
        }
    }
}

/// `silu_mul`: rows of `[gate (ffn); up (ffn)]` to `silu(gate) · up`.
pub fn silu_mul(gu: &[f32], ffn: usize, act: &mut [f32]) {
    for (a, row) in act.chunks_mut(ffn).zip(gu.chunks(2 * ffn)) {
        for j in 0..ffn {
            let g = row[j];
            a[j] = g / (1.0 + (-g).exp()) * row[ffn + j];
        }
    }
}

/// `add_into`: `x += o`.
pub fn add_into(x: &mut [f32], o: &[f32]) {
    x.iter_mut().zip(o).for_each(|(a, b)| *a += b);
}

/// The chunk `matvec` reads a row in: 8 values (wide loads) when the columns and the
/// group are multiples of 8, else 1.
pub fn chunk_for(t: WType, cols: usize, group: usize) -> usize {
    if cols.is_multiple_of(8) && (!t.is_int8() || group.is_multiple_of(8)) {
        8
    } else {
        1
    }
}

/// The dimensions of a `matvec`: tokens, weight rows, columns, columns per scale (int8)
/// and the chunk of [`chunk_for`].
#[derive(Debug, Clone, Copy)]
pub struct MatShape {
    pub t: usize,
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    pub chunk: usize,
}

/// `matvec`: `y[i][r]` = row `r` of `w` times token `i` of `x`.
pub fn matvec(wt: WType, w: &[u8], scales: &[f32], x: &[f32], s: MatShape, y: &mut [f32]) {
    let ng = s.cols.div_ceil(s.group);
    let chunks = s.cols / s.chunk;
    for r in 0..s.rows {
        for i in 0..s.t {
            let xi = &x[i * s.cols..][..s.cols];
            let mut lanes = [0f32; 32];
            for c in 0..chunks {
                let c0 = c * s.chunk;
                let mut d = 0f32;
                for j in 0..s.chunk {
                    d += wload(wt, w, r * s.cols + c0 + j) * xi[c0 + j];
                }
                if wt.is_int8() {
                    d *= scales[r * ng + c0 / s.group];
                }
                lanes[c % 32] += d;
            }
            // The xor butterfly: every lane ends with the same sum; lane 0's is kept.
            let mut off = 16;
            while off > 0 {
                let before = lanes;
                for (l, v) in lanes.iter_mut().enumerate() {
                    *v += before[l ^ off];
                }
                off /= 2;
            }
            y[i * s.rows + r] = lanes[0];
        }
    }
}

/// `argmax`: the index of the largest value, the lowest of equals (`-1` for none).
pub fn argmax(x: &[f32]) -> i32 {
    let mut v = [f32::NEG_INFINITY; BLOCK];
    let mut idx = [-1i32; BLOCK];
    for (j, &e) in x.iter().enumerate() {
        let k = j % BLOCK;
        if idx[k] < 0 || e > v[k] {
            v[k] = e;
            idx[k] = j as i32;
        }
    }
    let mut s = BLOCK / 2;
    while s > 0 {
        for k in 0..s {
            let (ov, oi, mi) = (v[k + s], idx[k + s], idx[k]);
            if oi >= 0 && (mi < 0 || ov > v[k] || (ov == v[k] && oi < mi)) {
                v[k] = ov;
                idx[k] = oi;
            }
        }
        s /= 2;
    }
    idx[0]
}

#[cfg(test)]
mod tests;
