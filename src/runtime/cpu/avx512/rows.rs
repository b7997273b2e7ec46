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
unsafe fn dot_rows<T: Load16>(b: &Rows, x: &[f32], stream: bool, mut done: impl FnMut(usize, f32)) {
    if stream {
        for r in 0..b.rows {
            done(r, dot_ahead::<T>(b.row(r).0, x, 0));
        }
        return;
    }
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
        return dot_rows::<T>(b, x, false, |r, v| done(r, 0f32 + v * b.scales[r * per]));
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
pub unsafe fn rows_dot(b: &Rows, x: &[f32], out: &mut [f32], add: bool, stream: bool) {
    assert!(out.len() >= b.rows);
    let done = |r: usize, v: f32| put(out, r, v, add);
    match b.t {
        WType::F32 => dot_rows::<F32>(b, x, stream, done),
        WType::BF16 => dot_rows::<Bf16>(b, x, stream, done),
        WType::F16 => dot_rows::<F16>(b, x, stream, done),
        WType::I8 => scaled_rows::<I8>(b, x, done),
        WType::U8Offset => scaled_rows::<U8>(b, x, done),
    }
}

/// [`dot_a8`] of `R` rows (row `k` at `wp + k·stride`): blocks `b` and `b + 1` of each row
/// against the activations, each vector of activations (and its `128 · Σ x` term and
/// scales) loaded once for all rows; each row's value as [`dot_a8`]'s `pair`.
/// SAFETY: AVX-512 F/BW/VL and VNNI are present; blocks b and b + 1 lie within each row
/// and the activations.
#[inline(always)]
unsafe fn pair_rows<const R: usize>(
    (wp, stride): (*const u8, usize),
    (xp, sp): (*const i8, *const f32),
    flip: __m512i,
    b: usize,
    ahead: usize,
) -> [__m512; R] {
    let x = _mm512_loadu_si512(xp.add(b * 32) as *const _);
    // Each row's sum starts from `-128 · Σ x` (integers: the same value as subtracting it
    // after, one operation less a row).
    let c = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(-128), x);
    let minus_c = _mm512_sub_epi32(_mm512_setzero_si512(), c);
    let s = _mm512_loadu_ps(sp.add(b * 8));
    let mut p = [_mm512_setzero_ps(); R];
    for r in 0..R {
        let w = wp.add(r * stride + b * 32);
        _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(ahead) as *const i8);
        let v = _mm512_xor_si512(_mm512_loadu_si512(w as *const _), flip);
        let d = _mm512_dpbusd_epi32(minus_c, v, x);
        p[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(d), s);
    }
    p
}

/// `out[r] = ` (`+=` where `add`) [`dot_a8`] of row `r` of `b` (int8) against `a`, for
/// every row, bit for bit: a channel's scale, groups of 32 and of a multiple of 64 take
/// [`ROWS`] rows at a time ([`pair_rows`]); other groups, and the rows left over, one by one.
/// SAFETY: AVX-512 F/BW/VL and VNNI are present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn rows_dot_a8(b: &Rows, a: QCols, out: &mut [f32], add: bool) {
    let offset = b.t == WType::U8Offset;
    let n = a.q.len();
    let group = b.group.min(n);
    assert!(n.is_multiple_of(32) && group.is_multiple_of(32) && out.len() >= b.rows);
    assert!(a.s.len() >= n / 32 && a.s8.len() >= n / 4);
    let per = n.div_ceil(group);
    let blocks = n / 32;
    let pairs_end = blocks / 2 * 2;
    let mut r = 0;
    if group == n || group == 32 || group.is_multiple_of(64) {
        assert!(b.scales.len() >= b.rows * per);
        let ahead = prefetch_distance();
        let flip = _mm512_set1_epi8(if offset { 0 } else { -128 });
        let xs = (a.q.as_ptr(), a.s8.as_ptr());
        while r + ROWS <= b.rows {
            assert!(b.row(r + ROWS - 1).0.len() >= n);
            let wp = (b.w.as_ptr().add(r * b.stride), b.stride);
            let sc = |k: usize, g: usize| *b.scales.get_unchecked((r + k) * per + g);
            // SAFETY (every pair_rows): blocks below pairs_end lie within the n asserted.
            let pair = |blk: usize| pair_rows::<ROWS>(wp, xs, flip, blk, ahead);
            let mut t = [[_mm512_setzero_ps(); 2]; ROWS];
            if group == n {
                let mut blk = 0;
                while blk + 4 <= pairs_end {
                    let (p0, p1) = (pair(blk), pair(blk + 2));
                    for k in 0..ROWS {
                        t[k][0] = _mm512_add_ps(t[k][0], p0[k]);
                        t[k][1] = _mm512_add_ps(t[k][1], p1[k]);
                    }
                    blk += 4;
                }
                if blk < pairs_end {
                    let p0 = pair(blk);
                    for k in 0..ROWS {
                        t[k][0] = _mm512_add_ps(t[k][0], p0[k]);
                    }
                }
                for (k, tk) in t.iter_mut().enumerate() {
                    let s = _mm512_set1_ps(sc(k, 0));
                    tk[0] = _mm512_mul_ps(_mm512_add_ps(tk[0], tk[1]), s);
                    tk[1] = _mm512_setzero_ps();
                }
            } else if group == 32 {
                let idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
                let mut blk = 0;
                while blk < pairs_end {
                    let p = pair(blk);
                    let mut s = [_mm512_setzero_ps(); ROWS];
                    for (k, sk) in s.iter_mut().enumerate() {
                        let at = b.scales.as_ptr().add((r + k) * per + blk);
                        let two = _mm_castpd_ps(_mm_load_sd(at as *const f64));
                        *sk = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(two));
                    }
                    // Constant indices in each branch, so that the totals stay in registers.
                    if blk % 4 == 0 {
                        for k in 0..ROWS {
                            t[k][0] = _mm512_fmadd_ps(p[k], s[k], t[k][0]);
                        }
                    } else {
                        for k in 0..ROWS {
                            t[k][1] = _mm512_fmadd_ps(p[k], s[k], t[k][1]);
                        }
                    }
                    blk += 2;
                }
            } else {
                let step = group / 32;
                let (mut blk, mut g) = (0, 0);
                while blk < pairs_end {
                    let end = (blk + step).min(pairs_end);
                    let mut u = pair(blk);
                    blk += 2;
                    while blk < end {
                        let p = pair(blk);
                        for k in 0..ROWS {
                            u[k] = _mm512_add_ps(u[k], p[k]);
                        }
                        blk += 2;
                    }
                    let h = g % 2;
                    for k in 0..ROWS {
                        let s = _mm512_set1_ps(sc(k, g));
                        if h == 0 {
                            t[k][0] = _mm512_fmadd_ps(u[k], s, t[k][0]);
                        } else {
                            t[k][1] = _mm512_fmadd_ps(u[k], s, t[k][1]);
                        }
                    }
                    g += 1;
                }
            }
            for (k, tk) in t.iter().enumerate() {
                let mut total = _mm512_reduce_add_ps(_mm512_add_ps(tk[0], tk[1]));
                if pairs_end < blocks {
                    let (w, s) = b.row(r + k);
                    let o = pairs_end * 32;
                    let sum = block_a8(offset, &w[o..o + 32], &a.q[o..o + 32]);
                    total += sum as f32 * (a.s[pairs_end] * s[o / group]);
                }
                put(out, r + k, total, add);
            }
            r += ROWS;
        }
    }
    for r in r..b.rows {
        let (w, s) = b.row(r);
        put(out, r, dot_a8(offset, w, a, s, group), add);
    }
}

/// One block of 32 bf16 elements of `R` rows (row `k` at `wp + k·stride`) against its
/// activations in [`pair32`] order, into chains `c` and `c + 1` of each row's `a`.
/// SAFETY: 32 elements of each row and of `xp` are readable.
#[inline(always)]
unsafe fn bf16_pairs_block<const R: usize>(
    a: &mut [[__m512; 4]; R],
    (wp, stride): (*const u8, usize),
    xp: *const f32,
    c: usize,
) {
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let xe = _mm512_loadu_ps(xp);
    let xo = _mm512_loadu_ps(xp.add(16));
    for (r, ar) in a.iter_mut().enumerate() {
        let w = _mm512_loadu_si512(wp.add(r * stride) as *const _);
        let we = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w));
        let wo = _mm512_castsi512_ps(_mm512_and_si512(w, high));
        ar[c] = _mm512_fmadd_ps(we, xe, ar[c]);
        ar[c + 1] = _mm512_fmadd_ps(wo, xo, ar[c + 1]);
    }
}

/// Σ over `n` (a multiple of 32) bf16 elements of `R` rows (row `k` at `wp + k·stride`)
/// against activations in [`pair32`] order. Each 64-byte load holds 16 pairs of
/// weights: the pairs' first elements become f32 by a shift, their second by a mask (two
/// operations for 32 weights, where widening 16 at a time takes four).
/// SAFETY: `n` elements of each row and of `xp` are readable.
#[inline(always)]
unsafe fn bf16_pairs_rows<const R: usize>(
    wp: *const u8,
    stride: usize,
    xp: *const f32,
    n: usize,
    ahead: usize,
) -> [__m512; R] {
    let mut a = [[_mm512_setzero_ps(); 4]; R];
    let mut i = 0;
    while i + 64 <= n {
        for r in 0..R {
            if ahead != 0 {
                let at = r * stride + i * 2 + ahead;
                _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(at) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(at + 64) as *const i8);
            }
        }
        bf16_pairs_block::<R>(&mut a, (wp.add(i * 2), stride), xp.add(i), 0);
        bf16_pairs_block::<R>(&mut a, (wp.add(i * 2 + 64), stride), xp.add(i + 32), 2);
        i += 64;
    }
    if i < n {
        bf16_pairs_block::<R>(&mut a, (wp.add(i * 2), stride), xp.add(i), 0);
    }
    // A loop, not a closure: a closure would not take this function's target features.
    let mut s = [_mm512_setzero_ps(); R];
    for (sr, ar) in s.iter_mut().zip(&a) {
        *sr = _mm512_add_ps(_mm512_add_ps(ar[0], ar[1]), _mm512_add_ps(ar[2], ar[3]));
    }
    s
}

/// `out[r] = ` (`+=` where `add`) row `r` of `b` (bf16) times the activations whose
/// [`pair32`] order is `xp`, for every row, [`ROWS`] rows at a time, or one after another
/// with no software prefetch ([`stream_float_rows`]).
/// SAFETY: AVX-512 F/BW/VL are present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn rows_dot_pairs(b: &Rows, xp: &[f32], out: &mut [f32], add: bool, stream: bool) {
    let (n32, ahead) = pairs_setup(b, xp, out, stream);
    let tail = |r: usize| pairs_tail(b, xp, r);
    let mut r = 0;
    // SAFETY (both calls): every row's n elements are in bounds (the last one asserted).
    while r + ROWS <= b.rows && !stream {
        let wp = b.w.as_ptr().add(r * b.stride);
        let s = bf16_pairs_rows::<ROWS>(wp, b.stride, xp.as_ptr(), n32, ahead);
        for (k, &s) in s.iter().enumerate() {
            put(out, r + k, _mm512_reduce_add_ps(s) + tail(r + k), add);
        }
        r += ROWS;
    }
    for r in r..b.rows {
        let [s] = bf16_pairs_rows::<1>(b.row(r).0.as_ptr(), 0, xp.as_ptr(), n32, ahead);
        put(out, r, _mm512_reduce_add_ps(s) + tail(r), add);
    }
}
