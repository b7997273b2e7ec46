//! bf16 rows at decode, read as pairs: a 32-bit word of a bf16 row holds two weights, and
//! each becomes f32 in one operation (the first shifted into the word's top half, the
//! second masked in place). The activations are reordered once per product to meet them
//! ([`pair32`]). Same f32 products and sums as [`rows_dot`], in a different order.

use super::*;

/// Activations reordered for [`rows_dot_pairs`]: within each full block of 32, the 16
/// even-indexed elements, then the 16 odd-indexed ones; the last `x.len() % 32` as they
/// are. Appended to `out`.
pub fn pair32(x: &[f32], out: &mut Vec<f32>) {
    let n32 = x.len() / 32 * 32;
    for b in x[..n32].chunks_exact(32) {
        out.extend(b.iter().step_by(2));
        out.extend(b.iter().skip(1).step_by(2));
    }
    out.extend_from_slice(&x[n32..]);
}

/// Whether a decode product over rows of type `t` takes [`rows_dot_pairs`]: bf16 rows
/// where the CPU has AVX2 (the vector kernels); [`rows_dot`] elsewhere.
pub fn pairs_apply(t: WType) -> bool {
    t == WType::BF16 && cfg!(target_arch = "x86_64") && simd::row_level(false) >= Level::Avx2
}

/// `out[r] = ` (`+=` where `add`) row `r` of `b` (bf16) times the activations `x`, for
/// every row, given `xp`, the [`pair32`] order of `x`: [`rows_dot`]'s value up to the
/// order of the f32 additions.
pub fn rows_dot_pairs(b: &Rows, xp: &[f32], out: &mut [f32], add: bool) {
    let l = simd::row_level(false);
    rows_dot_pairs_on((l, stream_float_rows()), b, xp, out, add)
}

/// [`rows_dot_pairs`] on level `l`, one this CPU runs, rows one after another where
/// `stream` ([`stream_float_rows`]).
pub(super) fn rows_dot_pairs_on(
    (l, stream): (Level, bool),
    b: &Rows,
    xp: &[f32],
    out: &mut [f32],
    add: bool,
) {
    assert!(b.t == WType::BF16 && xp.len() == b.cols && out.len() >= b.rows);
    if b.rows == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    match l {
        // SAFETY: the CPU has the level's features (it is one `simd` detected).
        Level::Avx512 => return unsafe { avx512::rows_dot_pairs(b, xp, out, add, stream) },
        Level::Avx2 => return unsafe { x86::rows_dot_pairs(b, xp, out, add, stream) },
        Level::Generic => {}
    }
    let _ = (l, stream);
    let n32 = xp.len() / 32 * 32;
    let bf = |w: &[u8], i: usize| {
        f32::from_bits((u16::from_le_bytes([w[2 * i], w[2 * i + 1]]) as u32) << 16)
    };
    for r in 0..b.rows {
        let w = b.row(r).0;
        let mut s = 0f32;
        for blk in (0..n32).step_by(32) {
            for k in 0..16 {
                s += bf(w, blk + 2 * k) * xp[blk + k] + bf(w, blk + 2 * k + 1) * xp[blk + 16 + k];
            }
        }
        for i in n32..xp.len() {
            s += bf(w, i) * xp[i];
        }
        put(out, r, s, add);
    }
}

/// What each vector level's [`rows_dot_pairs`] checks and needs first: the full blocks of
/// 32 (as elements) and how far ahead to prefetch (0: none, where `stream`).
#[cfg(target_arch = "x86_64")]
pub(super) fn pairs_setup(b: &Rows, xp: &[f32], out: &[f32], stream: bool) -> (usize, usize) {
    let n = xp.len();
    assert!(b.t == WType::BF16 && out.len() >= b.rows && b.rows > 0);
    assert!(b.row(b.rows - 1).0.len() >= n * 2);
    (n / 32 * 32, if stream { 0 } else { prefetch_distance() })
}

/// Row `r`'s sum past its last full block of 32 (0 where there is none).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(super) fn pairs_tail(b: &Rows, xp: &[f32], r: usize) -> f32 {
    let (n, n32) = (xp.len(), xp.len() / 32 * 32);
    if n32 == n {
        return 0.0;
    }
    dot_generic(WType::BF16, &b.row(r).0[n32 * 2..n * 2], &xp[n32..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every level, rows 1 to 9 at several strides and offsets, columns on both sides of
    /// the blocks of 32 and 64, written and added: within f32 rounding of an f64 sum.
    #[test]
    fn pairs_agree_with_f64_sums() {
        for cols in [1usize, 31, 32, 33, 64, 95, 96, 100, 768, 770] {
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.7).sin() * 1.3).collect();
            let mut xp = Vec::new();
            pair32(&x, &mut xp);
            for stride in [cols * 2, (cols * 2).next_multiple_of(64), cols * 2 + 24] {
                for rows in [1usize, 3, 4, 5, 9] {
                    let w: Vec<u8> = (0..rows * stride + 64)
                        .flat_map(|i| {
                            half::bf16::from_f32(((i * 7919 % 211) as f32 - 105.0) / 64.0)
                                .to_bits()
                                .to_le_bytes()
                        })
                        .collect();
                    for off in [0usize, 2, 6, 40] {
                        let b = Rows {
                            t: WType::BF16,
                            w: &w[off..off + (rows - 1) * stride + cols * 2],
                            stride,
                            rows,
                            cols,
                            scales: &[],
                            group: 0,
                        };
                        for l in simd::available() {
                            for (add, stream) in [(false, false), (true, false), (true, true)] {
                                let mut out = vec![0.5f32; rows];
                                rows_dot_pairs_on((l, stream), &b, &xp, &mut out, add);
                                for (r, &got) in out.iter().enumerate() {
                                    let (row, _) = b.row(r);
                                    let (mut exact, mut mag) =
                                        (if add { 0.5f64 } else { 0.0 }, 0f64);
                                    for (i, &xi) in x.iter().enumerate() {
                                        let wi = f32::from_bits(
                                            (u16::from_le_bytes([row[2 * i], row[2 * i + 1]])
                                                as u32)
                                                << 16,
                                        );
                                        exact += wi as f64 * xi as f64;
                                        mag += (wi as f64 * xi as f64).abs();
                                    }
                                    assert!(
                                        (got as f64 - exact).abs() <= 1e-6 * (mag + 1.0),
                                        "{l:?} cols {cols} stride {stride} rows {rows} offset {off} \
                                         add {add} row {r}: {got} vs {exact}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn pair32_is_evens_then_odds_per_block() {
        let x: Vec<f32> = (0..70).map(|i| i as f32).collect();
        let mut xp = Vec::new();
        pair32(&x, &mut xp);
        for blk in [0usize, 32] {
            for k in 0..16 {
                assert_eq!(xp[blk + k], (blk + 2 * k) as f32);
                assert_eq!(xp[blk + 16 + k], (blk + 2 * k + 1) as f32);
            }
        }
        assert_eq!(&xp[64..], &x[64..]);
    }
}
