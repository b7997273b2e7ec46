//! Causal grouped-query attention over the KV cache, in f32: one query at a time for
//! decoding, and for a prompt tiles of queries per head as two matrix products (`gemm`:
//! scores = Q Kᵀ, then out = P V), so that each key and value is read once per tile rather
//! than once per query.

use rayon::prelude::*;

use crate::runtime::cpu;

/// `ptr` of an output that tasks write in disjoint parts.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: only shared by tasks that write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// The shape of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Position of the first query (keys before it are cached).
    pub p0: usize,
    /// Queries.
    pub t: usize,
}

/// Queries per tile of the prompt path.
const TILE: usize = 64;

/// `out` (`t × heads·head_dim`) = softmax(q kᵀ / √head_dim, causal) v, with `q` laid out
/// like `out` and `k[g]`, `v[g]` the `positions × head_dim` keys and values of group `g`.
/// `scores` is the caller's buffer for the per-query path (decoding), kept between calls
/// and sized once for every position the cache has room for.
pub fn attend(
    q: &[f32],
    k: &[Vec<f32>],
    v: &[Vec<f32>],
    s: Shape,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    // One query, or a few over a short context: one at a time; otherwise the products.
    if s.t == 1 || (s.t < TILE / 4 && s.p0 < 4 * TILE) {
        per_query(q, k, v, s, out, scores)
    } else {
        tiled(q, k, v, s, out)
    }
}

fn per_query(
    q: &[f32],
    k: &[Vec<f32>],
    v: &[Vec<f32>],
    s: Shape,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let (hd, nh) = (s.head_dim, s.heads);
    let qdim = nh * hd;
    let per_group = nh / s.kv_heads;
    let scale = (hd as f32).sqrt();
    // A row of scores per query and head, as long as the longest query's context; room
    // for every position the cache has room for, so decoding does not grow it.
    let n_max = s.p0 + s.t;
    let room = k.first().map_or(0, |g| g.capacity() / hd).max(n_max);
    scores.clear();
    scores.reserve(nh * s.t * room);
    scores.resize(nh * s.t * n_max, 0.0);
    out.par_chunks_mut(hd)
        .zip(scores.par_chunks_mut(n_max))
        .enumerate()
        .for_each(|(idx, (out, row))| {
            let (i, hh) = (idx / nh, idx % nh);
            let g = hh / per_group;
            let qv = &q[i * qdim + hh * hd..i * qdim + (hh + 1) * hd];
            let n = s.p0 + i + 1;
            let (kg, vg) = (&k[g], &v[g]);
            let row = &mut row[..n];
            let mut max = f32::NEG_INFINITY;
            for (sc, kv) in row.iter_mut().zip(kg[..n * hd].chunks_exact(hd)) {
                *sc = cpu::dot_f32(qv, kv) / scale;
                max = max.max(*sc);
            }
            let mut sum = 0f32;
            for sc in row.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            out.fill(0.0);
            for (sc, vv) in row.iter().zip(vg.chunks_exact(hd)) {
                let w = sc / sum;
                for (o, v) in out.iter_mut().zip(vv) {
                    *o += w * v;
                }
            }
        });
}

fn tiled(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], s: Shape, out: &mut [f32]) {
    let (hd, nh) = (s.head_dim, s.heads);
    let qdim = nh * hd;
    assert_eq!(q.len(), s.t * qdim);
    assert_eq!(out.len(), s.t * qdim);
    let per_group = nh / s.kv_heads;
    let scale = (hd as f32).sqrt();
    let tiles = s.t.div_ceil(TILE);
    let dst = SendPtr(out.as_mut_ptr());
    (0..nh * tiles)
        .into_par_iter()
        .for_each_init(Vec::new, |p: &mut Vec<f32>, task| {
            let (hh, tile) = (task / tiles, task % tiles);
            let (i0, i1) = (tile * TILE, ((tile + 1) * TILE).min(s.t));
            let rows = i1 - i0;
            // Keys up to the last query's position.
            let n = s.p0 + i1;
            let g = hh / per_group;
            let (kg, vg) = (&k[g][..n * hd], &v[g][..n * hd]);
            p.clear();
            p.resize(rows * n, 0.0);
            // SAFETY (both products): each pointer covers its matrix with the strides
            // given: q rows i0..i1 of head hh (stride qdim), k and v n × hd, p rows × n,
            // out rows i0..i1 of head hh (stride qdim).
            unsafe {
                cpu::gemm_f32(
                    (rows, n, hd),
                    (p.as_mut_ptr(), 1, n as isize),
                    (q.as_ptr().add(i0 * qdim + hh * hd), 1, qdim as isize),
                    (kg.as_ptr(), hd as isize, 1),
                );
            }
            for (r, row) in p.chunks_exact_mut(n).enumerate() {
                let valid = s.p0 + i0 + r + 1;
                let (live, masked) = row.split_at_mut(valid);
                let mut max = f32::NEG_INFINITY;
                for x in live.iter_mut() {
                    *x /= scale;
                    max = max.max(*x);
                }
                let mut sum = 0f32;
                for x in live.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                live.iter_mut().for_each(|x| *x /= sum);
                masked.fill(0.0);
            }
            let d = dst;
            // SAFETY: as above; no other task writes these rows of head hh.
            unsafe {
                cpu::gemm_f32(
                    (rows, hd, n),
                    (d.0.add(i0 * qdim + hh * hd), 1, qdim as isize),
                    (p.as_ptr(), 1, n as isize),
                    (vg.as_ptr(), 1, hd as isize),
                );
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiled path against the per-query one: grouped heads, a cached prefix, a
    /// ragged last tile, one tile exactly, and one query after a long context (decoding).
    #[test]
    fn tiled_agrees_with_per_query() {
        for (p0, t) in [(5, 150), (0, 64), (300, 1)] {
            let s = Shape {
                heads: 4,
                kv_heads: 2,
                head_dim: 16,
                p0,
                t,
            };
            let n = s.p0 + s.t;
            let f = |i: usize, m: usize| ((i * m % 101) as f32 - 50.0) / 37.0;
            let q: Vec<f32> = (0..s.t * 64).map(|i| f(i, 7)).collect();
            let k: Vec<Vec<f32>> = (0..2)
                .map(|g| (0..n * 16).map(|i| f(i + g, 13)).collect())
                .collect();
            let v: Vec<Vec<f32>> = (0..2)
                .map(|g| (0..n * 16).map(|i| f(i + 3 * g, 29)).collect())
                .collect();
            let (mut a, mut b) = (vec![0f32; s.t * 64], vec![0f32; s.t * 64]);
            per_query(&q, &k, &v, s, &mut a, &mut Vec::new());
            tiled(&q, &k, &v, s, &mut b);
            let d = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "p0 {p0} t {t}: {d}");
        }
    }
}
