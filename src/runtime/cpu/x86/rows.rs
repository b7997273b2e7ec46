//! The AVX2 decode kernel over several rows at once ([`rows_dot`]).

use super::*;

/// [`span`] over `R` rows at once, row `k` at `wp + k·stride`: each vector of `x` is
/// loaded once for all of them, and each row's sum runs in the same four chains in the
/// same order as [`span`]'s, so each result is [`span`]'s bit for bit.
/// SAFETY: `n` elements of each row (format `T`) and of `x` are readable.
#[inline(always)]
unsafe fn span_rows<T: Load, const R: usize>(
    wp: *const u8,
    stride: usize,
    xp: *const f32,
    n: usize,
    ahead: usize,
) -> [__m256; R] {
    let es = T::SIZE;
    let mut a = [[_mm256_setzero_ps(); 4]; R];
    let mut i = 0;
    while i + 32 <= n {
        for r in 0..R {
            let at = r * stride + i * es + ahead;
            _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(at) as *const i8);
            if es == 4 {
                _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(at + 64) as *const i8);
            }
        }
        for j in 0..4 {
            let xv = _mm256_loadu_ps(xp.add(i + 8 * j));
            for r in 0..R {
                let w = T::load8(wp.add(r * stride + (i + 8 * j) * es));
                a[r][j] = _mm256_fmadd_ps(w, xv, a[r][j]);
            }
        }
        i += 32;
    }
    while i + 8 <= n {
        let xv = _mm256_loadu_ps(xp.add(i));
        for r in 0..R {
            a[r][0] = _mm256_fmadd_ps(T::load8(wp.add(r * stride + i * es)), xv, a[r][0]);
        }
        i += 8;
    }
    let mut s = [_mm256_setzero_ps(); R];
    for r in 0..R {
        s[r] = _mm256_add_ps(
            _mm256_add_ps(a[r][0], a[r][1]),
            _mm256_add_ps(a[r][2], a[r][3]),
        );
    }
    s
}

/// Rows taken together by [`rows_dot`].
const ROWS: usize = 3;

/// `done(r, dot(row r of b, x))` ([`dot`]'s value) for every row of `b`, [`ROWS`] rows at
/// a time, or one after another with no software prefetch ([`stream_float_rows`]).
#[inline(always)]
unsafe fn dot_rows<T: Load>(b: &Rows, x: &[f32], stream: bool, mut done: impl FnMut(usize, f32)) {
    if stream {
        for r in 0..b.rows {
            done(r, dot_ahead::<T>(b.row(r).0, x, 0));
        }
        return;
    }
    let n = x.len();
    let n8 = n / 8 * 8;
    let ahead = prefetch_distance();
    let mut r = 0;
    while r + ROWS <= b.rows {
        assert!(b.row(r + ROWS - 1).0.len() >= n * T::SIZE);
        let wp = b.w.as_ptr().add(r * b.stride);
        // SAFETY: the ROWS rows' n elements are in bounds (the last one asserted).
        let s = span_rows::<T, ROWS>(wp, b.stride, x.as_ptr(), n8, ahead);
        for (k, &sk) in s.iter().enumerate() {
            let mut total = hsum(sk);
            if n8 < n {
                let w = b.row(r + k).0;
                total += dot_generic(T::TYPE, &w[n8 * T::SIZE..n * T::SIZE], &x[n8..n]);
            }
            done(r + k, total);
        }
        r += ROWS;
    }
    for r in r..b.rows {
        done(r, dot::<T>(b.row(r).0, x));
    }
}

/// `out[r] = ` (`+=` where `add`) row `r` of `b` times `x`, for every row: [`row_dot`]'s
/// value for each, bit for bit. Float rows go [`ROWS`] at a time; int8 rows one by one
/// (at this level they take [`dot_i8_permuted`] when decoding).
/// SAFETY: AVX2 + FMA + F16C are present.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_dot(b: &Rows, x: &[f32], out: &mut [f32], add: bool, stream: bool) {
    assert!(out.len() >= b.rows);
    let done = |r: usize, v: f32| put(out, r, v, add);
    match b.t {
        WType::F32 => dot_rows::<F32>(b, x, stream, done),
        WType::BF16 => dot_rows::<Bf16>(b, x, stream, done),
        WType::F16 => dot_rows::<F16>(b, x, stream, done),
        WType::I8 | WType::U8Offset => {
            for r in 0..b.rows {
                let (w, sc) = b.row(r);
                put(out, r, row_dot(b.t, w, x, sc, b.group), add);
            }
        }
    }
}

/// [`rows_dot_pairs`]'s sum at this level, 8 lanes wide: each 32-byte load holds 8
/// pairs of bf16 weights, the first of each pair made f32 by a shift, the second by a mask.
/// SAFETY: `n` (a multiple of 32) elements of each row and of `xp` are readable.
#[inline(always)]
unsafe fn bf16_pairs_rows<const R: usize>(
    wp: *const u8,
    stride: usize,
    xp: *const f32,
    n: usize,
    ahead: usize,
) -> [__m256; R] {
    let mut a = [[_mm256_setzero_ps(); 4]; R];
    let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let mut i = 0;
    while i < n {
        for r in 0..R {
            if ahead != 0 {
                let at = r * stride + i * 2 + ahead;
                _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(at) as *const i8);
            }
        }
        // Weights i..i + 16 and i + 16..i + 32 hold the block's pairs 0..8 and 8..16.
        for h in 0..2 {
            let xe = _mm256_loadu_ps(xp.add(i + 8 * h));
            let xo = _mm256_loadu_ps(xp.add(i + 16 + 8 * h));
            for (r, ar) in a.iter_mut().enumerate() {
                let w = _mm256_loadu_si256(wp.add(r * stride + (i + 16 * h) * 2) as *const _);
                let we = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w));
                let wo = _mm256_castsi256_ps(_mm256_and_si256(w, high));
                ar[2 * h] = _mm256_fmadd_ps(we, xe, ar[2 * h]);
                ar[2 * h + 1] = _mm256_fmadd_ps(wo, xo, ar[2 * h + 1]);
            }
        }
        i += 32;
    }
    // A loop, not a closure: a closure would not take this function's target features.
    let mut s = [_mm256_setzero_ps(); R];
    for (sr, ar) in s.iter_mut().zip(&a) {
        *sr = _mm256_add_ps(_mm256_add_ps(ar[0], ar[1]), _mm256_add_ps(ar[2], ar[3]));
    }
    s
}

/// Rows taken together by [`rows_dot_pairs`]: two rows' 8 sums and the operands fit the
/// 16 registers (three spilled: in cache, 768 columns, one thread, 27.5 GB/s against 49
/// on a Zen 4).
const PAIR_ROWS: usize = 2;

/// [`rows_dot_pairs`] at the AVX2 level, [`PAIR_ROWS`] rows at a time, or one after another
/// with no software prefetch ([`stream_float_rows`]).
/// SAFETY: AVX2 + FMA + F16C are present.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_dot_pairs(b: &Rows, xp: &[f32], out: &mut [f32], add: bool, stream: bool) {
    let (n32, ahead) = pairs_setup(b, xp, out, stream);
    let tail = |r: usize| pairs_tail(b, xp, r);
    let mut r = 0;
    // SAFETY (both calls): every row's n elements are in bounds (the last one asserted).
    while r + PAIR_ROWS <= b.rows && !stream {
        let wp = b.w.as_ptr().add(r * b.stride);
        let s = bf16_pairs_rows::<PAIR_ROWS>(wp, b.stride, xp.as_ptr(), n32, ahead);
        for (k, &s) in s.iter().enumerate() {
            put(out, r + k, hsum(s) + tail(r + k), add);
        }
        r += PAIR_ROWS;
    }
    for r in r..b.rows {
        let [s] = bf16_pairs_rows::<1>(b.row(r).0.as_ptr(), 0, xp.as_ptr(), n32, ahead);
        put(out, r, hsum(s) + tail(r), add);
    }
}
