//! The AVX2 + FMA + F16C kernels, chosen at run time (`crate::dtype::simd`).

use super::*;
use std::arch::x86_64::*;

/// Loads 8 stored elements as f32. One type per weight format, so that each kernel is
/// compiled for one format with no branch in its loop.
trait Load {
    const SIZE: usize;
    const TYPE: WType;
    /// SAFETY: 8 elements of the format are readable at `p`; AVX2 + F16C are present.
    unsafe fn load8(p: *const u8) -> __m256;
}
struct F32;
struct Bf16;
struct F16;
struct I8;
struct U8;
impl Load for F32 {
    const SIZE: usize = 4;
    const TYPE: WType = WType::F32;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_loadu_ps(p as *const f32)
    }
}
impl Load for Bf16 {
    const SIZE: usize = 2;
    const TYPE: WType = WType::BF16;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
}
impl Load for F16 {
    const SIZE: usize = 2;
    const TYPE: WType = WType::F16;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}
impl Load for I8 {
    const SIZE: usize = 1;
    const TYPE: WType = WType::I8;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
}
impl Load for U8 {
    const SIZE: usize = 1;
    const TYPE: WType = WType::U8Offset;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        let b = _mm_xor_si128(_mm_loadl_epi64(p as *const __m128i), _mm_set1_epi8(-128));
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))
    }
}

/// `Σ w·x` over `n` elements (a multiple of 8) as 8 lanes, with four FMA chains.
/// SAFETY: `n` elements of `w` (format `T`) and `x` are readable.
#[inline(always)]
unsafe fn span<T: Load>(wp: *const u8, xp: *const f32, n: usize, ahead: usize) -> __m256 {
    let es = T::SIZE;
    let [mut a0, mut a1, mut a2, mut a3] = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        // Streams cross 4 KiB pages of the mapped file, where the hardware prefetcher
        // stops: ask for the bytes ahead explicitly, into L2 (a prefetch never faults).
        // None where `ahead` is 0 (a single stream left to the hardware).
        if ahead != 0 {
            _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(i * es + ahead) as *const i8);
            if es == 4 {
                _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(i * es + ahead + 64) as *const i8);
            }
        }
        a0 = _mm256_fmadd_ps(T::load8(wp.add(i * es)), _mm256_loadu_ps(xp.add(i)), a0);
        a1 = _mm256_fmadd_ps(
            T::load8(wp.add((i + 8) * es)),
            _mm256_loadu_ps(xp.add(i + 8)),
            a1,
        );
        a2 = _mm256_fmadd_ps(
            T::load8(wp.add((i + 16) * es)),
            _mm256_loadu_ps(xp.add(i + 16)),
            a2,
        );
        a3 = _mm256_fmadd_ps(
            T::load8(wp.add((i + 24) * es)),
            _mm256_loadu_ps(xp.add(i + 24)),
            a3,
        );
        i += 32;
    }
    while i + 8 <= n {
        a0 = _mm256_fmadd_ps(T::load8(wp.add(i * es)), _mm256_loadu_ps(xp.add(i)), a0);
        i += 8;
    }
    _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))
}

#[inline(always)]
unsafe fn hsum(s: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    _mm_cvtss_f32(h)
}

/// `Σ w·x` over `x.len()` elements.
#[inline(always)]
unsafe fn dot<T: Load>(w: &[u8], x: &[f32]) -> f32 {
    dot_ahead::<T>(w, x, prefetch_distance())
}

/// [`dot`], asking for the weights `ahead` bytes on (none where 0): the same value.
#[inline(always)]
unsafe fn dot_ahead<T: Load>(w: &[u8], x: &[f32], ahead: usize) -> f32 {
    let n = x.len();
    assert!(w.len() >= n * T::SIZE);
    let n8 = n / 8 * 8;
    // SAFETY: n8 <= n elements of both are in bounds (asserted above).
    let mut total = hsum(span::<T>(w.as_ptr(), x.as_ptr(), n8, ahead));
    if n8 < n {
        total += dot_generic(T::TYPE, &w[n8 * T::SIZE..n * T::SIZE], &x[n8..n]);
    }
    total
}

/// `Σ_g scale[g] · Σ_{i∈g} w·x` with groups of `group` columns: each group's sum stays
/// in 8 lanes and is scaled into two running totals, so a group costs no horizontal sum.
#[inline(always)]
unsafe fn dot_scaled<T: Load>(w: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
    let n = x.len();
    if !group.is_multiple_of(8) || group >= n {
        let mut total = 0f32;
        for (g, xs) in x.chunks(group).enumerate() {
            let base = g * group;
            total += dot::<T>(&w[base * T::SIZE..(base + xs.len()) * T::SIZE], xs) * scales[g];
        }
        return total;
    }
    assert!(w.len() >= n * T::SIZE && scales.len() >= n.div_ceil(group));
    let full = n / group;
    let ahead = prefetch_distance();
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let (mut t0, mut t1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut g = 0;
    while g + 2 <= full {
        // SAFETY: groups g and g + 1 lie within the n elements asserted above.
        let s0 = span::<T>(wp.add(g * group * T::SIZE), xp.add(g * group), group, ahead);
        t0 = _mm256_fmadd_ps(s0, _mm256_set1_ps(*scales.get_unchecked(g)), t0);
        let b = (g + 1) * group;
        let s1 = span::<T>(wp.add(b * T::SIZE), xp.add(b), group, ahead);
        t1 = _mm256_fmadd_ps(s1, _mm256_set1_ps(*scales.get_unchecked(g + 1)), t1);
        g += 2;
    }
    if g < full {
        let s0 = span::<T>(wp.add(g * group * T::SIZE), xp.add(g * group), group, ahead);
        t0 = _mm256_fmadd_ps(s0, _mm256_set1_ps(scales[g]), t0);
    }
    let mut total = hsum(_mm256_add_ps(t0, t1));
    let done = full * group;
    if done < n {
        total += dot::<T>(&w[done * T::SIZE..n * T::SIZE], &x[done..]) * scales[full];
    }
    total
}

/// int8 rows against activations in [`permute32`] order: one 32-byte load, and an in-lane
/// byte shuffle per vector of 8 puts byte `4k + j` at the top of lane `k` of vector `j`
/// with zeros below, so that the int-to-float conversion gives `q · 2^24` exactly (the
/// caller scales by 2^-24). A sign extension per 8 bytes would cross lanes, the slow step
/// on these cores.
/// SAFETY: `n` (a multiple of 32) elements of `w` and `xp` are readable.
#[inline(always)]
unsafe fn span_i8x32<const OFFSET: bool>(
    wp: *const u8,
    xp: *const f32,
    n: usize,
    ahead: usize,
) -> __m256 {
    let top = |j: i8| {
        let z = -128i8; // 0x80: a zero byte
        _mm256_setr_epi8(
            z,
            z,
            z,
            j,
            z,
            z,
            z,
            4 + j,
            z,
            z,
            z,
            8 + j,
            z,
            z,
            z,
            12 + j,
            z,
            z,
            z,
            j,
            z,
            z,
            z,
            4 + j,
            z,
            z,
            z,
            8 + j,
            z,
            z,
            z,
            12 + j,
        )
    };
    let (m0, m1, m2, m3) = (top(0), top(1), top(2), top(3));
    let [mut a0, mut a1, mut a2, mut a3] = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < n {
        _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(i + ahead) as *const i8);
        let mut v = _mm256_loadu_si256(wp.add(i) as *const __m256i);
        if OFFSET {
            v = _mm256_xor_si256(v, _mm256_set1_epi8(-128));
        }
        let q0 = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, m0));
        let q1 = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, m1));
        let q2 = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, m2));
        let q3 = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, m3));
        a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xp.add(i)), a0);
        a1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xp.add(i + 8)), a1);
        a2 = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xp.add(i + 16)), a2);
        a3 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xp.add(i + 24)), a3);
        i += 32;
    }
    _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))
}

/// One block of 32 permuted int8 weights as four vectors of 8 values `q · 2^24`: lane `k`
/// of vector `j` is byte `4k + j` at the top of its lane, zeros below.
#[inline(always)]
unsafe fn q32<const OFFSET: bool>(wp: *const u8, m: &[__m256i; 4]) -> [__m256; 4] {
    let mut v = _mm256_loadu_si256(wp as *const __m256i);
    if OFFSET {
        v = _mm256_xor_si256(v, _mm256_set1_epi8(-128));
    }
    [
        _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, m[0])),
        _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, m[1])),
        _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, m[2])),
        _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, m[3])),
    ]
}

/// The shuffles of [`q32`].
#[inline(always)]
unsafe fn q32_masks() -> [__m256i; 4] {
    let top = |j: i8| {
        let z = -128i8; // 0x80: a zero byte
        let l = [z, z, z, j, z, z, z, 4 + j, z, z, z, 8 + j, z, z, z, 12 + j];
        let mut b = [0i8; 32];
        b[..16].copy_from_slice(&l);
        b[16..].copy_from_slice(&l);
        _mm256_loadu_si256(b.as_ptr() as *const __m256i)
    };
    [top(0), top(1), top(2), top(3)]
}

/// Groups of `G` columns (a multiple of 32, below 128): each group's products summed in
/// one chain of FMAs in 8 lanes (no tree of adds per group), then scaled into two running
/// totals. Groups are independent, so the core overlaps their chains.
/// SAFETY: `n` (a multiple of `G`) elements of `w` and `xp`, and `n / G` scales.
#[inline(always)]
unsafe fn i8_groups<const OFFSET: bool, const G: usize>(
    wp: *const u8,
    xp: *const f32,
    sp: *const f32,
    n: usize,
    ahead: usize,
) -> __m256 {
    let m = q32_masks();
    let (mut t0, mut t1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut g = 0;
    let mut b = 0;
    while b < n {
        let mut p = _mm256_setzero_ps();
        let mut i = 0;
        while i < G {
            _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(b + i + ahead) as *const i8);
            let q = q32::<OFFSET>(wp.add(b + i), &m);
            let x = xp.add(b + i);
            p = _mm256_fmadd_ps(q[0], _mm256_loadu_ps(x), p);
            p = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(x.add(8)), p);
            p = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(x.add(16)), p);
            p = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(x.add(24)), p);
            i += 32;
        }
        // The sum is `q · 2^24`: a power of two, so this scaling is exact.
        let sc = _mm256_set1_ps(*sp.add(g) * (1.0 / 16_777_216.0));
        if g % 2 == 0 {
            t0 = _mm256_fmadd_ps(p, sc, t0);
        } else {
            t1 = _mm256_fmadd_ps(p, sc, t1);
        }
        g += 1;
        b += G;
    }
    _mm256_add_ps(t0, t1)
}

/// [`dot_scaled`] for groups that are whole blocks of 32, over permuted activations.
/// Groups of 32 and 64 sum in chains ([`i8_groups`]); larger groups (a channel's, 128,
/// ...) in spans of at most 128 columns, each into four fresh accumulators. The group
/// of each span is counted, never divided out: a division per span costs as much as the
/// span's arithmetic on some cores.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_i8_permuted(
    offset: bool,
    w: &[u8],
    xp: &[f32],
    scales: &[f32],
    group: usize,
) -> f32 {
    let n = xp.len();
    let group = group.min(n);
    assert!(n.is_multiple_of(32) && group.is_multiple_of(32) && w.len() >= n);
    let groups = n.div_ceil(group);
    assert!(scales.len() >= groups);
    let (wp, xq, sp) = (w.as_ptr(), xp.as_ptr(), scales.as_ptr());
    let ahead = prefetch_distance();
    // SAFETY (all arms): the groups lie within the n elements and scales asserted above.
    let t = match (offset, group) {
        (true, 32) => i8_groups::<true, 32>(wp, xq, sp, n, ahead),
        (false, 32) => i8_groups::<false, 32>(wp, xq, sp, n, ahead),
        (true, 64) if n.is_multiple_of(64) => i8_groups::<true, 64>(wp, xq, sp, n, ahead),
        (false, 64) if n.is_multiple_of(64) => i8_groups::<false, 64>(wp, xq, sp, n, ahead),
        _ => {
            let sub = if group.is_multiple_of(128) {
                128
            } else {
                group
            };
            let (mut t0, mut t1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut k = 0;
            let mut b = 0;
            for g in 0..groups {
                let end = (b + group).min(n);
                // The sums are `q · 2^24`: a power of two, so this scaling is exact.
                let sc = _mm256_set1_ps(*sp.add(g) * (1.0 / 16_777_216.0));
                while b < end {
                    let len = sub.min(end - b);
                    let s = if offset {
                        span_i8x32::<true>(wp.add(b), xq.add(b), len, ahead)
                    } else {
                        span_i8x32::<false>(wp.add(b), xq.add(b), len, ahead)
                    };
                    if k % 2 == 0 {
                        t0 = _mm256_fmadd_ps(s, sc, t0);
                    } else {
                        t1 = _mm256_fmadd_ps(s, sc, t1);
                    }
                    b += len;
                    k += 1;
                }
            }
            _mm256_add_ps(t0, t1)
        }
    };
    hsum(t)
}

/// An int8 row against int8 activations (`crate::runtime::cpu::QAct`): per block of 32,
/// `|q|` (unsigned) times the activations with `q`'s sign, multiplied and added in pairs
/// to 16 bits (at most 2·128·127, no saturation), then to 32 bits, then scaled in f32.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_a8(
    offset: bool,
    w: &[u8],
    xq: &[i8],
    xs: &[f32],
    scales: &[f32],
    group: usize,
) -> f32 {
    let n = xq.len();
    let group = group.min(n);
    assert!(w.len() >= n && xs.len() >= n / 32 && scales.len() >= n.div_ceil(group));
    let ones = _mm256_set1_epi16(1);
    let (mut t0, mut t1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (wp, xp) = (w.as_ptr(), xq.as_ptr());
    let ahead = prefetch_distance();
    // Blocks of 32 in pairs (one per running total), the weight group counted along
    // (groups are whole blocks: `a8_applies`), never divided out.
    let per = group / 32;
    let (mut b, mut blk, mut g, mut left) = (0, 0, 0, per);
    let block = |b: usize, blk: usize, g: usize| {
        _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(b + ahead) as *const i8);
        // SAFETY: b + 32 <= n bytes of w and xq; block blk and group g exist (asserted).
        let mut v = _mm256_loadu_si256(wp.add(b) as *const __m256i);
        if offset {
            v = _mm256_xor_si256(v, _mm256_set1_epi8(-128));
        }
        let xv = _mm256_loadu_si256(xp.add(b) as *const __m256i);
        let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(xv, v));
        let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        (
            p,
            _mm256_set1_ps(*xs.get_unchecked(blk) * *scales.get_unchecked(g)),
        )
    };
    let next = |g: &mut usize, left: &mut usize| {
        *left -= 1;
        if *left == 0 {
            *g += 1;
            *left = per;
        }
    };
    while b + 64 <= n {
        let (p, sc) = block(b, blk, g);
        t0 = _mm256_fmadd_ps(p, sc, t0);
        next(&mut g, &mut left);
        let (p, sc) = block(b + 32, blk + 1, g);
        t1 = _mm256_fmadd_ps(p, sc, t1);
        next(&mut g, &mut left);
        b += 64;
        blk += 2;
    }
    if b + 32 <= n {
        let (p, sc) = block(b, blk, g);
        t0 = _mm256_fmadd_ps(p, sc, t0);
    }
    hsum(_mm256_add_ps(t0, t1))
}

/// `out[i] = w[i] · scale`, 8 at a time.
#[inline(always)]
unsafe fn convert<T: Load>(w: &[u8], scale: f32, out: &mut [f32]) {
    let n = out.len();
    assert!(w.len() >= n * T::SIZE);
    let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
    let sc = _mm256_set1_ps(scale);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n elements of w and out.
        let v = T::load8(wp.add(i * T::SIZE));
        let v = if T::TYPE.is_int8() {
            _mm256_mul_ps(v, sc)
        } else {
            v
        };
        _mm256_storeu_ps(op.add(i), v);
        i += 8;
    }
    for j in i..n {
        let mut one = [0f32; 1];
        dequant_generic(
            T::TYPE,
            &w[j * T::SIZE..(j + 1) * T::SIZE],
            &[scale],
            1,
            &mut one,
        );
        out[j] = one[0];
    }
}

/// The 8 × 8 transpose of `v` (row `i` in `v[i]`): column `j` in the result's `[j]`.
#[inline(always)]
unsafe fn transpose8(v: [__m256; 8]) -> [__m256; 8] {
    let lo = |a, b| _mm256_unpacklo_ps(a, b);
    let hi = |a, b| _mm256_unpackhi_ps(a, b);
    let (t0, t1, t2, t3) = (
        lo(v[0], v[1]),
        hi(v[0], v[1]),
        lo(v[2], v[3]),
        hi(v[2], v[3]),
    );
    let (t4, t5, t6, t7) = (
        lo(v[4], v[5]),
        hi(v[4], v[5]),
        lo(v[6], v[7]),
        hi(v[6], v[7]),
    );
    let a0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let a1 = _mm256_shuffle_ps::<0xee>(t0, t2);
    let a2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let a3 = _mm256_shuffle_ps::<0xee>(t1, t3);
    let a4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let a5 = _mm256_shuffle_ps::<0xee>(t4, t6);
    let a6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let a7 = _mm256_shuffle_ps::<0xee>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(a0, a4),
        _mm256_permute2f128_ps::<0x20>(a1, a5),
        _mm256_permute2f128_ps::<0x20>(a2, a6),
        _mm256_permute2f128_ps::<0x20>(a3, a7),
        _mm256_permute2f128_ps::<0x31>(a0, a4),
        _mm256_permute2f128_ps::<0x31>(a1, a5),
        _mm256_permute2f128_ps::<0x31>(a2, a6),
        _mm256_permute2f128_ps::<0x31>(a3, a7),
    ]
}

/// Rows `0..rows` (a multiple of 8) of `b`, every column (a multiple of 8), to f32 at
/// `out[c · ld + r]`: eight rows' 8 values converted, scaled, transposed, stored as 8
/// columns of 8.
/// SAFETY: as [`dequant_cols8`].
#[inline(always)]
unsafe fn cols8<T: Load>(b: &Rows, rows: usize, out: *mut f32, ld: usize) {
    let int8 = T::TYPE.is_int8();
    let g = if int8 { b.cols.div_ceil(b.group) } else { 0 };
    let wp = b.w.as_ptr();
    for r0 in (0..rows).step_by(8) {
        for c0 in (0..b.cols).step_by(8) {
            let mut v = [_mm256_setzero_ps(); 8];
            for (i, vi) in v.iter_mut().enumerate() {
                *vi = T::load8(wp.add((r0 + i) * b.stride + c0 * T::SIZE));
                if int8 {
                    let s = *b.scales.get_unchecked((r0 + i) * g + c0 / b.group);
                    *vi = _mm256_mul_ps(*vi, _mm256_set1_ps(s));
                }
            }
            for (j, col) in transpose8(v).into_iter().enumerate() {
                _mm256_storeu_ps(out.add((c0 + j) * ld + r0), col);
            }
        }
    }
}

/// [`dequant_cols`](super::dequant_cols)'s rows `0..rows` (a multiple of 8).
/// SAFETY: AVX2 + FMA + F16C are present; rows `0..rows` of `b` and their scales are
/// readable, `b.cols` is a multiple of 8, int8 groups are a multiple of 8 or the whole
/// row, and `out` covers `(b.cols - 1) · ld + rows` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequant_cols8(b: &Rows, rows: usize, out: &mut [f32], ld: usize) {
    let o = out.as_mut_ptr();
    match b.t {
        WType::F32 => cols8::<F32>(b, rows, o, ld),
        WType::BF16 => cols8::<Bf16>(b, rows, o, ld),
        WType::F16 => cols8::<F16>(b, rows, o, ld),
        WType::I8 => cols8::<I8>(b, rows, o, ld),
        WType::U8Offset => cols8::<U8>(b, rows, o, ld),
    }
}

entry_points!("avx2,fma,f16c");

mod rows;
pub use rows::{rows_dot, rows_dot_pairs};
