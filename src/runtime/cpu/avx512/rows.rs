//! The AVX-512 decode kernels over several rows at once ([`rows_dot`]).

use super::*;

/// [`span`] over `R` rows at once, row `k` at `wp + k·stride`: each vector of `x` is
/// loaded once for all of them, and each row's sum runs in the same four chains in the
/// same order as [`span`]'s, so each result is [`span`]'s bit for bit.
/// SAFETY: `n` elements of each row (format `T`) and of `x` are readable.
#[inline(always)]
unsafe fn span_rows<T: Load16, const R: usize>(
    wp: *const u8,
    stride: usize,
    xp: *const f32,
    n: usize,
    ahead: usize,
) -> [__m512; R] {
    let es = T::SIZE;
    let mut a = [[_mm512_setzero_ps(); 4]; R];
    let mut i = 0;
    while i + 64 <= n {
        for r in 0..R {
            let mut line = 0;
            while line < 64 * es {
                let at = r * stride + i * es + ahead + line;
                _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(at) as *const i8);
                line += 64;
            }
        }
        for j in 0..4 {
            let xv = _mm512_loadu_ps(xp.add(i + 16 * j));
            for r in 0..R {
                let w = T::load16(wp.add(r * stride + (i + 16 * j) * es));
                a[r][j] = _mm512_fmadd_ps(w, xv, a[r][j]);
            }
        }
        i += 64;
    }
    while i + 16 <= n {
        let xv = _mm512_loadu_ps(xp.add(i));
        for r in 0..R {
            a[r][0] = _mm512_fmadd_ps(T::load16(wp.add(r * stride + i * es)), xv, a[r][0]);
        }
        i += 16;
    }
    let mut s = [_mm512_setzero_ps(); R];
    for r in 0..R {
        s[r] = _mm512_add_ps(
            _mm512_add_ps(a[r][0], a[r][1]),
            _mm512_add_ps(a[r][2], a[r][3]),
        );
    }
    s
}

/// [`group_sum`] of `R` rows (row `k` at `wp + k·stride`), each vector of `x` loaded once.
/// SAFETY: `G` elements of each row and of `x` are readable.
#[inline(always)]
unsafe fn group_sum_rows<T: Load16, const G: usize, const R: usize>(
    wp: *const u8,
    stride: usize,
    xp: *const f32,
    ahead: usize,
) -> [__m512; R] {
    let es = T::SIZE;
    let mut p = [_mm512_setzero_ps(); R];
    for r in 0..R {
        let mut line = 0;
        while line < G * es {
            _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(r * stride + ahead + line) as *const i8);
            line += 64;
        }
    }
    let x0 = _mm512_loadu_ps(xp);
    for r in 0..R {
        p[r] = _mm512_mul_ps(T::load16(wp.add(r * stride)), x0);
    }
    let mut i = 16;
    while i < G {
        let xv = _mm512_loadu_ps(xp.add(i));
        for r in 0..R {
            p[r] = _mm512_fmadd_ps(T::load16(wp.add(r * stride + i * es)), xv, p[r]);
        }
        i += 16;
    }
    p
}

/// [`groups`] of `R` rows: row `k`'s weights at `wp + k·stride`, its scales at
/// `sp + k·per` (`per` scales a row).
/// SAFETY: `n` elements of each row and of `x`, and `n / G` scales of each row, are
/// readable.
#[inline(always)]
unsafe fn groups_rows<T: Load16, const G: usize, const R: usize>(
    (wp, stride): (*const u8, usize),
    xp: *const f32,
    (sp, per): (*const f32, usize),
    n: usize,
) -> [__m512; R] {
    let es = T::SIZE;
    let ahead = prefetch_distance();
    let full = n / G;
    let mut t = [[_mm512_setzero_ps(); 2]; R];
    let mut g = 0;
    while g < full {
        // Groups g and g + 1 into the two totals, as in `groups`; an odd last group into
        // the first.
        let h = g % 2;
        let s = group_sum_rows::<T, G, R>(wp.add(g * G * es), stride, xp.add(g * G), ahead);
        for r in 0..R {
            let sc = _mm512_set1_ps(*sp.add(r * per + g));
            t[r][h] = _mm512_fmadd_ps(s[r], sc, t[r][h]);
        }
        g += 1;
    }
    let mut s = [_mm512_setzero_ps(); R];
    for r in 0..R {
        s[r] = _mm512_add_ps(t[r][0], t[r][1]);
    }
    s
}

/// Rows taken together by [`rows_dot`].
const ROWS: usize = 4;

/// `done(r, dot(row r of b, x))` ([`dot`]'s value) for every row of `b`, [`ROWS`] rows at
/// a time where their loads fall alike (rows a multiple of 64 bytes apart).
#[inline(always)]
unsafe fn dot_rows<T: Load16>(b: &Rows, x: &[f32], mut done: impl FnMut(usize, f32)) {
    let n = x.len();
    let mut r = 0;
    if b.stride.is_multiple_of(64) && b.rows >= ROWS {
        let head = aligned_head(T::SIZE, b.w.as_ptr() as usize).min(n);
        let n16 = head + (n - head) / 16 * 16;
        let ahead = prefetch_distance();
        while r + ROWS <= b.rows {
            assert!(b.row(r + ROWS - 1).0.len() >= n * T::SIZE);
            let wp = b.w.as_ptr().add(r * b.stride + head * T::SIZE);
            // SAFETY: the ROWS rows' n elements are in bounds (the last one asserted).
            let s = span_rows::<T, ROWS>(wp, b.stride, x.as_ptr().add(head), n16 - head, ahead);
            for (k, &sk) in s.iter().enumerate() {
                let w = b.row(r + k).0;
                let mut total = 0f32;
                if head > 0 {
                    total = dot_generic(T::TYPE, &w[..head * T::SIZE], &x[..head]);
                }
                total += _mm512_reduce_add_ps(sk);
                if n16 < n {
                    total += dot_generic(T::TYPE, &w[n16 * T::SIZE..n * T::SIZE], &x[n16..n]);
                }
                done(r + k, total);
            }
            r += ROWS;
        }
    }
    for r in r..b.rows {
        done(r, dot::<T>(b.row(r).0, x));
    }
}

/// [`dot_rows`] for int8 rows ([`dot_scaled`]'s value per row): a channel's one scale,
/// and groups of 32, 64 and 128, [`ROWS`] rows at a time.
#[inline(always)]
unsafe fn scaled_rows<T: Load16>(b: &Rows, x: &[f32], mut done: impl FnMut(usize, f32)) {
    let (n, group) = (x.len(), b.group);
    let per = n.div_ceil(group);
    if group >= n {
        return dot_rows::<T>(b, x, |r, v| done(r, 0f32 + v * b.scales[r * per]));
    }
    let full = n / group;
    let mut r = 0;
    if matches!(group, 32 | 64 | 128) {
        assert!(b.scales.len() >= b.rows * per);
        while r + ROWS <= b.rows {
            assert!(b.row(r + ROWS - 1).0.len() >= n * T::SIZE);
            let wp = (b.w.as_ptr().add(r * b.stride), b.stride);
            let sp = (b.scales.as_ptr().add(r * per), per);
            // SAFETY: the ROWS rows' n elements and their scales are in bounds (asserted).
            let t = match group {
                32 => groups_rows::<T, 32, ROWS>(wp, x.as_ptr(), sp, n),
                64 => groups_rows::<T, 64, ROWS>(wp, x.as_ptr(), sp, n),
                _ => groups_rows::<T, 128, ROWS>(wp, x.as_ptr(), sp, n),
            };
            for (k, &tk) in t.iter().enumerate() {
                let mut total = _mm512_reduce_add_ps(tk);
                let end = full * group;
                if end < n {
                    let (w, sc) = b.row(r + k);
                    total += dot::<T>(&w[end * T::SIZE..n * T::SIZE], &x[end..]) * sc[full];
                }
                done(r + k, total);
            }
            r += ROWS;
        }
    }
    for r in r..b.rows {
        let (w, sc) = b.row(r);
        done(r, dot_scaled::<T>(w, x, sc, group));
    }
}

/// `out[r] = ` (`+=` where `add`) row `r` of `b` times `x`, for every row: [`row_dot`]'s
/// value for each, bit for bit.
/// SAFETY: AVX-512 F/BW/VL are present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn rows_dot(b: &Rows, x: &[f32], out: &mut [f32], add: bool) {
    assert!(out.len() >= b.rows);
    let done = |r: usize, v: f32| put(out, r, v, add);
    match b.t {
        WType::F32 => dot_rows::<F32>(b, x, done),
        WType::BF16 => dot_rows::<Bf16>(b, x, done),
        WType::F16 => dot_rows::<F16>(b, x, done),
        WType::I8 => scaled_rows::<I8>(b, x, done),
        WType::U8Offset => scaled_rows::<U8>(b, x, done),
    }
}
