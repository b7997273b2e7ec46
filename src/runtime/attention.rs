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
            // The scores: the keys as f32 rows, several at a time (`cpu::rows_dot`).
            let keys = cpu::Rows {
                t: cpu::WType::F32,
                w: f32_bytes(&kg[..n * hd]),
                stride: 4 * hd,
                rows: n,
                cols: hd,
                scales: &[],
                group: 0,
            };
            cpu::rows_dot(&keys, qv, row, false);
            row.iter_mut().for_each(|sc| *sc /= scale);
            let sum = exp_shifted(row);
            weighted_sum(row, sum, vg, out);
        });
}

/// `out = Σ_j (row[j] / sum) · v_j` over the first `row.len()` rows `v_j` of `v` (rows of
/// `out.len()`): a query's output from its softmax numerators. On AVX2 where the CPU has
/// it: the same operations in the same order (a multiply, then an add: never fused), 8
/// lanes wide, so the result is the portable code's bit for bit.
fn weighted_sum(row: &[f32], sum: f32, v: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::dtype::simd::level() >= crate::dtype::simd::Level::Avx2 {
        // SAFETY: the level says the CPU has AVX2 and FMA.
        return unsafe { weighted_sum_avx2(row, sum, v, out) };
    }
    weighted_sum_generic(row, sum, v, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_avx2(row: &[f32], sum: f32, v: &[f32], out: &mut [f32]) {
    weighted_sum_generic(row, sum, v, out)
}

#[inline(always)]
fn weighted_sum_generic(row: &[f32], sum: f32, v: &[f32], out: &mut [f32]) {
    out.fill(0.0);
    for (sc, vv) in row.iter().zip(v.chunks_exact(out.len())) {
        let w = sc / sum;
        for (o, x) in out.iter_mut().zip(vv) {
            *o += w * x;
        }
    }
}

/// `v`'s bytes.
fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: any f32 is 4 initialized bytes, and u8 has no alignment to keep.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, 4 * v.len()) }
}

/// `row[i] = e^(row[i] − max(row))`, returning their sum: softmax's numerators, with
/// [`exp_le0`] and 16 lanes (the max and the sum vectorize), on AVX2 where the CPU has it.
fn exp_shifted(row: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::dtype::simd::level() >= crate::dtype::simd::Level::Avx2 {
        // SAFETY: the level says the CPU has AVX2 and FMA.
        return unsafe { exp_shifted_avx2(row) };
    }
    exp_shifted_generic(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(row: &mut [f32]) -> f32 {
    exp_shifted_generic(row)
}

#[inline(always)]
fn exp_shifted_generic(row: &mut [f32]) -> f32 {
    const L: usize = 16;
    let mut m = [f32::NEG_INFINITY; L];
    let chunks = row.chunks_exact(L);
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    for c in chunks {
        for l in 0..L {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    max = m.iter().fold(max, |a, &v| a.max(v));
    let mut acc = [0f32; L];
    let mut chunks = row.chunks_exact_mut(L);
    for c in &mut chunks {
        for l in 0..L {
            c[l] = exp_le0(c[l] - max);
            acc[l] += c[l];
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_le0(*x - max);
        sum += *x;
    }
    acc.iter().sum::<f32>() + sum
}

/// `e^x` for `x ≤ 0` (NaN stays NaN), within 2 ulp of the exact value (Cody–Waite
/// reduction to `r` in ±ln2/2 and Cephes' degree-6 polynomial for `e^r`), branch-free so
/// that it vectorizes; below −87.3365, where `e^x` is no longer a normal f32, it gives
/// about the smallest normal (a softmax term 10⁻³⁸ of the largest, which is 1).
#[inline(always)]
pub(crate) fn exp_le0(x: f32) -> f32 {
    const LO: f32 = -87.336_5; // just above ln(f32::MIN_POSITIVE)
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = if x < LO { LO } else { x };
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    // n as an integer, from the low bits of t (no float-to-int conversion).
    let ni = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * r
        * r
        + r
        + 1.0;
    p * f32::from_bits((ni + 127).wrapping_shl(23) as u32)
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
                live.iter_mut().for_each(|x| *x /= scale);
                let sum = exp_shifted(live);
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

    /// `exp_le0` against f64 `exp` over `[-90, 0]`: within 2 ulp of every normal result,
    /// and about the smallest normal below; NaN stays NaN.
    #[test]
    fn exp_le0_is_within_two_ulp() {
        for i in 0..=2_000_000u32 {
            let x = -(i as f32) * 4.5e-5;
            let got = exp_le0(x);
            let want = (x as f64).exp();
            if x < -87.3365 {
                assert!(got.is_normal() && got < 1.2e-38, "{x}: {got}");
                continue;
            }
            let ulp = f32::EPSILON as f64 * want;
            assert!(
                (got as f64 - want).abs() <= 2.0 * ulp,
                "{x}: {got} vs {want}"
            );
        }
        assert_eq!(exp_le0(0.0), 1.0);
        assert!(exp_le0(f32::NAN).is_nan());
        let mut row = vec![3.0, f32::NEG_INFINITY, 1.0, 2.0];
        let sum = exp_shifted(&mut row);
        assert_eq!(row[0], 1.0);
        assert!(row[1].is_normal() && row[1] < 1.2e-38);
        assert!((sum as f64 - (1.0 + (-2f64).exp() + (-1f64).exp())).abs() < 1e-6);
    }

    /// The AVX2 weighted sum against the plain loop, bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn weighted_sum_on_avx2_is_the_plain_loop_bit_for_bit() {
        for (n, hd) in [(1usize, 64usize), (7, 64), (300, 128), (33, 80)] {
            let row: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).cos().abs()).collect();
            let sum: f32 = row.iter().sum();
            let v: Vec<f32> = (0..n * hd).map(|i| (i as f32 * 0.11).sin()).collect();
            // The plain loop, one row of v after another.
            let mut a = vec![0f32; hd];
            for (sc, vv) in row.iter().zip(v.chunks_exact(hd)) {
                let w = sc / sum;
                for (o, x) in a.iter_mut().zip(vv) {
                    *o += w * x;
                }
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                let mut b = vec![2f32; hd];
                // SAFETY: the CPU has AVX2 and FMA (detected above).
                unsafe { weighted_sum_avx2(&row, sum, &v, &mut b) };
                for (x, y) in a.iter().zip(&b) {
                    assert_eq!(x.to_bits(), y.to_bits(), "{n} × {hd}");
                }
            }
        }
    }

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
