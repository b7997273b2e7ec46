//! The AVX-512 (F + BW + VL) kernels, chosen at run time (`crate::dtype::simd`): the AVX2
//! loops 16 lanes wide, with f32 accumulation as everywhere. On the cores that have it,
//! the int8 sign extension (`vpmovsxbd`) is one uop, so int8 rows need no permuted
//! activations here.

use super::*;
use std::arch::x86_64::*;

/// Loads 16 stored elements as f32, one type per weight format (as in the AVX2 kernels).
trait Load16 {
    const SIZE: usize;
    const TYPE: WType;
    /// SAFETY: 16 elements of the format are readable at `p`; AVX-512 F/BW/VL are present.
    unsafe fn load16(p: *const u8) -> __m512;
}
struct F32;
struct Bf16;
struct F16;
struct I8;
struct U8;
impl Load16 for F32 {
    const SIZE: usize = 4;
    const TYPE: WType = WType::F32;
    #[inline(always)]
    unsafe fn load16(p: *const u8) -> __m512 {
        _mm512_loadu_ps(p as *const f32)
    }
}
impl Load16 for Bf16 {
    const SIZE: usize = 2;
    const TYPE: WType = WType::BF16;
    #[inline(always)]
    unsafe fn load16(p: *const u8) -> __m512 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}
impl Load16 for F16 {
    const SIZE: usize = 2;
    const TYPE: WType = WType::F16;
    #[inline(always)]
    unsafe fn load16(p: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}
impl Load16 for I8 {
    const SIZE: usize = 1;
    const TYPE: WType = WType::I8;
    #[inline(always)]
    unsafe fn load16(p: *const u8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }
}
impl Load16 for U8 {
    const SIZE: usize = 1;
    const TYPE: WType = WType::U8Offset;
    #[inline(always)]
    unsafe fn load16(p: *const u8) -> __m512 {
        let b = _mm_xor_si128(_mm_loadu_si128(p as *const __m128i), _mm_set1_epi8(-128));
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))
    }
}

/// `Σ w·x` over `n` elements (a multiple of 16) as 16 lanes, with four FMA chains.
/// SAFETY: `n` elements of `w` (format `T`) and `x` are readable.
#[inline(always)]
unsafe fn span<T: Load16>(wp: *const u8, xp: *const f32, n: usize, ahead: usize) -> __m512 {
    let es = T::SIZE;
    let [mut a0, mut a1, mut a2, mut a3] = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        // One prefetch per cache line of this step's weights (64 elements: 1 to 4 lines),
        // past the page boundaries where the hardware prefetcher stops; none where `ahead`
        // is 0 (a single stream left to the hardware).
        let mut line = 0;
        while line < 64 * es && ahead != 0 {
            _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(i * es + ahead + line) as *const i8);
            line += 64;
        }
        a0 = _mm512_fmadd_ps(T::load16(wp.add(i * es)), _mm512_loadu_ps(xp.add(i)), a0);
        a1 = _mm512_fmadd_ps(
            T::load16(wp.add((i + 16) * es)),
            _mm512_loadu_ps(xp.add(i + 16)),
            a1,
        );
        a2 = _mm512_fmadd_ps(
            T::load16(wp.add((i + 32) * es)),
            _mm512_loadu_ps(xp.add(i + 32)),
            a2,
        );
        a3 = _mm512_fmadd_ps(
            T::load16(wp.add((i + 48) * es)),
            _mm512_loadu_ps(xp.add(i + 48)),
            a3,
        );
        i += 64;
    }
    while i + 16 <= n {
        a0 = _mm512_fmadd_ps(T::load16(wp.add(i * es)), _mm512_loadu_ps(xp.add(i)), a0);
        i += 16;
    }
    _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))
}

/// `Σ w·x` over `x.len()` elements.
#[inline(always)]
unsafe fn dot<T: Load16>(w: &[u8], x: &[f32]) -> f32 {
    dot_ahead::<T>(w, x, prefetch_distance())
}

/// [`dot`], asking for the weights `ahead` bytes on (none where 0): the same value.
#[inline(always)]
unsafe fn dot_ahead<T: Load16>(w: &[u8], x: &[f32], ahead: usize) -> f32 {
    assert!(w.len() >= x.len() * T::SIZE);
    // The elements before the weights' first vector boundary are summed apart, so that no
    // load of the loop straddles two cache lines (stored rows lie at any offset).
    let head = aligned_head(T::SIZE, w.as_ptr() as usize).min(x.len());
    let mut total = 0f32;
    if head > 0 {
        total = dot_generic(T::TYPE, &w[..head * T::SIZE], &x[..head]);
    }
    let (w, x) = (&w[head * T::SIZE..], &x[head..]);
    let n = x.len();
    let n16 = n / 16 * 16;
    // SAFETY: n16 <= n elements of both are in bounds (asserted above).
    let s = span::<T>(w.as_ptr(), x.as_ptr(), n16, ahead);
    total += _mm512_reduce_add_ps(s);
    if n16 < n {
        total += dot_generic(T::TYPE, &w[n16 * T::SIZE..n * T::SIZE], &x[n16..n]);
    }
    total
}

/// How many elements of `size` bytes at address `at` come before the next boundary of 16
/// of them (a vector's weights): none where `at` is not a multiple of `size`.
pub(super) fn aligned_head(size: usize, at: usize) -> usize {
    let width = 16 * size;
    let mis = at % width;
    if mis.is_multiple_of(size) {
        (width - mis) % width / size
    } else {
        0
    }
}

/// One group's `Σ w·x` (`G` a multiple of 16) as 16 lanes: a product, then FMAs into it,
/// unrolled at compile time. Groups are independent, so the core overlaps their chains.
/// SAFETY: `G` elements of `w` (format `T`) and `x` are readable.
#[inline(always)]
unsafe fn group_sum<T: Load16, const G: usize>(
    wp: *const u8,
    xp: *const f32,
    ahead: usize,
) -> __m512 {
    let es = T::SIZE;
    let mut line = 0;
    while line < G * es {
        _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(ahead + line) as *const i8);
        line += 64;
    }
    let mut p = _mm512_mul_ps(T::load16(wp), _mm512_loadu_ps(xp));
    let mut i = 16;
    while i < G {
        p = _mm512_fmadd_ps(T::load16(wp.add(i * es)), _mm512_loadu_ps(xp.add(i)), p);
        i += 16;
    }
    p
}

/// [`dot_scaled`]'s whole groups for a group size known at compile time: `n / G` groups
/// into two running totals.
/// SAFETY: `n` elements of `w` and `x` and `n / G` scales are readable.
#[inline(always)]
unsafe fn groups<T: Load16, const G: usize>(
    wp: *const u8,
    xp: *const f32,
    sp: *const f32,
    n: usize,
) -> __m512 {
    let ahead = prefetch_distance();
    let full = n / G;
    let (mut t0, mut t1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut g = 0;
    while g + 2 <= full {
        let (w, x) = (wp.add(g * G * T::SIZE), xp.add(g * G));
        let s0 = group_sum::<T, G>(w, x, ahead);
        t0 = _mm512_fmadd_ps(s0, _mm512_set1_ps(*sp.add(g)), t0);
        let s1 = group_sum::<T, G>(w.add(G * T::SIZE), x.add(G), ahead);
        t1 = _mm512_fmadd_ps(s1, _mm512_set1_ps(*sp.add(g + 1)), t1);
        g += 2;
    }
    if g < full {
        let s0 = group_sum::<T, G>(wp.add(g * G * T::SIZE), xp.add(g * G), ahead);
        t0 = _mm512_fmadd_ps(s0, _mm512_set1_ps(*sp.add(g)), t0);
    }
    _mm512_add_ps(t0, t1)
}

/// `Σ_g scale[g] · Σ_{i∈g} w·x` with groups of `group` columns, each group's sum scaled
/// in 16 lanes into two running totals (no horizontal sum per group).
#[inline(always)]
unsafe fn dot_scaled<T: Load16>(w: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
    let n = x.len();
    if !group.is_multiple_of(16) || group >= n {
        let mut total = 0f32;
        for (g, xs) in x.chunks(group).enumerate() {
            let base = g * group;
            total += dot::<T>(&w[base * T::SIZE..(base + xs.len()) * T::SIZE], xs) * scales[g];
        }
        return total;
    }
    assert!(w.len() >= n * T::SIZE && scales.len() >= n.div_ceil(group));
    let full = n / group;
    let (wp, xp, sp) = (w.as_ptr(), x.as_ptr(), scales.as_ptr());
    // SAFETY: the `full` groups lie within the n elements and scales asserted above.
    let t = match group {
        32 => groups::<T, 32>(wp, xp, sp, n),
        64 => groups::<T, 64>(wp, xp, sp, n),
        128 => groups::<T, 128>(wp, xp, sp, n),
        _ => {
            let ahead = prefetch_distance();
            let mut t = _mm512_setzero_ps();
            for g in 0..full {
                let s = span::<T>(wp.add(g * group * T::SIZE), xp.add(g * group), group, ahead);
                t = _mm512_fmadd_ps(s, _mm512_set1_ps(scales[g]), t);
            }
            t
        }
    };
    let mut total = _mm512_reduce_add_ps(t);
    let done = full * group;
    if done < n {
        total += dot::<T>(&w[done * T::SIZE..n * T::SIZE], &x[done..]) * scales[full];
    }
    total
}

/// `out[i] = w[i] · scale`, 16 at a time.
#[inline(always)]
unsafe fn convert<T: Load16>(w: &[u8], scale: f32, out: &mut [f32]) {
    let n = out.len();
    assert!(w.len() >= n * T::SIZE);
    let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
    let sc = _mm512_set1_ps(scale);
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n elements of w and out.
        let v = T::load16(wp.add(i * T::SIZE));
        let v = if T::TYPE.is_int8() {
            _mm512_mul_ps(v, sc)
        } else {
            v
        };
        _mm512_storeu_ps(op.add(i), v);
        i += 16;
    }
    if i < n {
        let scales = [scale];
        dequant_generic(
            T::TYPE,
            &w[i * T::SIZE..n * T::SIZE],
            &scales,
            n - i,
            &mut out[i..],
        );
    }
}

entry_points!("avx512f,avx512bw,avx512vl,avx2,fma,f16c");

mod rows;
pub use rows::{rows_dot, rows_dot_a8, rows_dot_pairs};

/// An int8 row against int8 activations (`crate::runtime::cpu::QAct`) with AVX-512 VNNI,
/// two blocks of 32 per step: the row as unsigned bytes `q + 128` (an xor for `i8`; what
/// u8-offset rows store) times the activations, four products summed to 32 bits per lane
/// by `vpdpbusd` (at most 4·255·127, exact), less the lane's `128 · Σ x`: `Σ q·x`
/// exactly. Each lane is then scaled by its block's activation scale (`QAct::s8`)
/// and weight scale in f32. An odd last block is summed alone.
/// SAFETY: AVX-512 F/BW/VL and VNNI are present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_a8(offset: bool, w: &[u8], a: QCols, scales: &[f32], group: usize) -> f32 {
    let n = a.q.len();
    let group = group.min(n);
    assert!(n.is_multiple_of(32) && group.is_multiple_of(32) && w.len() >= n);
    assert!(a.s.len() >= n / 32 && a.s8.len() >= n / 4);
    assert!(scales.len() >= n.div_ceil(group));
    let ahead = prefetch_distance();
    let flip = _mm512_set1_epi8(if offset { 0 } else { -128 });
    let c128 = _mm512_set1_epi8(-128);
    let (wp, xp, sp) = (w.as_ptr(), a.q.as_ptr(), a.s8.as_ptr());
    // Blocks b and b + 1, exact in 16 lanes of f32 (block b in the low 8), each lane times
    // its block's activation scale.
    let pair = |b: usize| {
        _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(b * 32 + ahead) as *const i8);
        // SAFETY: blocks b and b + 1 lie within the n asserted above (the callers' bounds).
        let v = _mm512_xor_si512(_mm512_loadu_si512(wp.add(b * 32) as *const _), flip);
        let x = _mm512_loadu_si512(xp.add(b * 32) as *const _);
        let d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, x);
        // Each lane's 128 · Σ x by the same instruction (cheaper here than loading it).
        let d = _mm512_sub_epi32(d, _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, x));
        _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(sp.add(b * 8)))
    };
    let blocks = n / 32;
    let pairs_end = blocks / 2 * 2;
    let (mut t0, mut t1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    if group == n {
        // Channel: one weight scale, applied once at the end.
        let mut b = 0;
        while b + 4 <= pairs_end {
            t0 = _mm512_add_ps(t0, pair(b));
            t1 = _mm512_add_ps(t1, pair(b + 2));
            b += 4;
        }
        if b < pairs_end {
            t0 = _mm512_add_ps(t0, pair(b));
        }
        let s = _mm512_set1_ps(scales[0]);
        t0 = _mm512_mul_ps(_mm512_add_ps(t0, t1), s);
        t1 = _mm512_setzero_ps();
    } else if group.is_multiple_of(64) {
        // Whole pairs per group: each group's sum, then its scale.
        let per = group / 32;
        let (mut b, mut g) = (0, 0);
        while b < pairs_end {
            let end = (b + per).min(pairs_end);
            let mut u = pair(b);
            b += 2;
            while b < end {
                u = _mm512_add_ps(u, pair(b));
                b += 2;
            }
            let s = _mm512_set1_ps(*scales.get_unchecked(g));
            if g % 2 == 0 {
                t0 = _mm512_fmadd_ps(u, s, t0);
            } else {
                t1 = _mm512_fmadd_ps(u, s, t1);
            }
            g += 1;
        }
    } else if group == 32 {
        // A scale per block: the two of a pair side by side, eight lanes each.
        let idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut b = 0;
        while b < pairs_end {
            let two = _mm_castpd_ps(_mm_load_sd(scales.as_ptr().add(b) as *const f64));
            let s = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(two));
            if b % 4 == 0 {
                t0 = _mm512_fmadd_ps(pair(b), s, t0);
            } else {
                t1 = _mm512_fmadd_ps(pair(b), s, t1);
            }
            b += 2;
        }
    } else {
        // Groups of an odd count of blocks: each block's group counted along.
        let per = group / 32;
        let (mut b, mut g, mut left) = (0, 0, per);
        let mut next = || {
            let s = *scales.get_unchecked(g);
            left -= 1;
            if left == 0 {
                g += 1;
                left = per;
            }
            s
        };
        while b < pairs_end {
            let lo = next();
            let hi = next();
            let s = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(lo), _mm512_set1_ps(hi));
            t0 = _mm512_fmadd_ps(pair(b), s, t0);
            b += 2;
        }
    }
    let mut total = _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
    if pairs_end < blocks {
        let b = pairs_end;
        let o = b * 32;
        let sum = block_a8(offset, &w[o..o + 32], &a.q[o..o + 32]);
        total += sum as f32 * (a.s[b] * scales[o / group]);
    }
    total
}
