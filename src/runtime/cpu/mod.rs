//! CPU kernels of the runtime: dot products of weight rows (as stored in the mapped file,
//! any alignment) with f32 activations, one row or a decode task's rows at once
//! ([`rows_dot`], the same values; bf16 rows at decode as pairs, [`rows_dot_pairs`]), and
//! rows dequantized to f32.
//!
//! Every kernel is written once as plain Rust with 16 independent f32 lanes, which the
//! compiler turns into SIMD. On x86-64 there are also AVX2 + FMA + F16C kernels and
//! AVX-512 ones, chosen at run time (`crate::dtype::simd`), so one binary runs everywhere
//! and uses the wide units where they exist. Accumulation is always in f32.

// Kernels index lanes explicitly: that is what lets the compiler vectorize them.
#![allow(clippy::needless_range_loop)]

use std::sync::OnceLock;

use crate::dtype::simd::{self, Level};

/// How a weight row is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WType {
    F32,
    F16,
    BF16,
    /// int8 stored as unsigned bytes `q + 128` (compressed-tensors `pack-quantized`:
    /// four of them per little-endian int32).
    U8Offset,
    /// Plain signed int8.
    I8,
}

impl WType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WType::F32 => 4,
            WType::F16 | WType::BF16 => 2,
            WType::U8Offset | WType::I8 => 1,
        }
    }

    /// Whether rows carry scales.
    pub fn is_int8(self) -> bool {
        matches!(self, WType::U8Offset | WType::I8)
    }

    pub fn name(self) -> &'static str {
        match self {
            WType::F32 => "fp32",
            WType::F16 => "fp16",
            WType::BF16 => "bf16",
            WType::U8Offset | WType::I8 => "int8",
        }
    }
}

const L: usize = 16;

#[inline(always)]
fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

#[inline(always)]
fn bf16_at(b: &[u8], i: usize) -> f32 {
    f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16)
}

#[inline(always)]
fn q_at(b: &[u8], i: usize, offset: bool) -> f32 {
    if offset {
        ((b[i] ^ 0x80) as i8) as f32
    } else {
        (b[i] as i8) as f32
    }
}

#[inline(always)]
fn reduce(acc: [f32; L]) -> f32 {
    let mut a8 = [0f32; 8];
    for l in 0..8 {
        a8[l] = acc[l] + acc[l + 8];
    }
    let a4 = [a8[0] + a8[4], a8[1] + a8[5], a8[2] + a8[6], a8[3] + a8[7]];
    (a4[0] + a4[2]) + (a4[1] + a4[3])
}

/// `Σ conv(w)·x` over `x.len()` values stored `$n` bytes each in `w`, 16 lanes at a time
/// on fixed-size arrays (no bounds checks in the loop, so it vectorizes).
macro_rules! dot_body {
    ($w:expr, $x:expr, $n:literal, $conv:expr) => {{
        let (w, x): (&[u8], &[f32]) = ($w, $x);
        let w = &w[..x.len() * $n];
        let mut acc = [0f32; L];
        let wc = w.chunks_exact($n * L);
        let xc = x.chunks_exact(L);
        let (wr, xr) = (wc.remainder(), xc.remainder());
        for (wb, xb) in wc.zip(xc) {
            let wb: &[u8; $n * L] = wb.try_into().expect("chunk");
            let xb: &[f32; L] = xb.try_into().expect("chunk");
            for l in 0..L {
                let e: &[u8; $n] = wb[$n * l..$n * l + $n].try_into().expect("element");
                acc[l] += $conv(e) * xb[l];
            }
        }
        let mut tail = 0f32;
        for (e, xv) in wr.chunks_exact($n).zip(xr) {
            let e: &[u8; $n] = e.try_into().expect("element");
            tail += $conv(e) * xv;
        }
        reduce(acc) + tail
    }};
}

#[inline(always)]
fn c_f32(e: &[u8; 4]) -> f32 {
    f32::from_le_bytes(*e)
}

#[inline(always)]
fn c_bf16(e: &[u8; 2]) -> f32 {
    f32::from_bits((u16::from_le_bytes(*e) as u32) << 16)
}

#[inline(always)]
fn c_f16(e: &[u8; 2]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes(*e)).to_f32()
}

#[inline(always)]
fn c_u8off(e: &[u8; 1]) -> f32 {
    ((e[0] ^ 0x80) as i8) as f32
}

#[inline(always)]
fn c_i8(e: &[u8; 1]) -> f32 {
    (e[0] as i8) as f32
}

#[inline(always)]
fn dot_generic(t: WType, w: &[u8], x: &[f32]) -> f32 {
    match t {
        WType::F32 => dot_body!(w, x, 4, c_f32),
        WType::BF16 => dot_body!(w, x, 2, c_bf16),
        WType::F16 => dot_body!(w, x, 2, c_f16),
        WType::U8Offset => dot_body!(w, x, 1, c_u8off),
        WType::I8 => dot_body!(w, x, 1, c_i8),
    }
}

#[inline(always)]
fn dot_f32_generic(w: &[f32], x: &[f32]) -> f32 {
    let n = x.len().min(w.len());
    let (w, x) = (&w[..n], &x[..n]);
    let mut acc = [0f32; L];
    let wc = w.chunks_exact(L);
    let xc = x.chunks_exact(L);
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (wb, xb) in wc.zip(xc) {
        let wb: &[f32; L] = wb.try_into().expect("chunk");
        let xb: &[f32; L] = xb.try_into().expect("chunk");
        for l in 0..L {
            acc[l] += wb[l] * xb[l];
        }
    }
    let mut tail = 0f32;
    for (a, b) in wr.iter().zip(xr) {
        tail += a * b;
    }
    reduce(acc) + tail
}

#[inline(always)]
fn dequant_generic(t: WType, w: &[u8], scales: &[f32], group: usize, out: &mut [f32]) {
    let n = out.len();
    match t {
        WType::F32 => out
            .iter_mut()
            .enumerate()
            .for_each(|(i, o)| *o = f32_at(w, i)),
        WType::BF16 => out
            .iter_mut()
            .enumerate()
            .for_each(|(i, o)| *o = bf16_at(w, i)),
        WType::F16 => out
            .iter_mut()
            .zip(w[..2 * n].chunks_exact(2))
            .for_each(|(o, e)| *o = c_f16(&[e[0], e[1]])),
        WType::U8Offset | WType::I8 => {
            let off = t == WType::U8Offset;
            for (g, chunk) in out.chunks_mut(group).enumerate() {
                let s = scales[g];
                let base = g * group;
                for (j, o) in chunk.iter_mut().enumerate() {
                    *o = q_at(w, base + j, off) * s;
                }
            }
        }
    }
}

#[inline(always)]
fn row_dot_generic(t: WType, w: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
    if !t.is_int8() {
        return dot_generic(t, w, x);
    }
    let mut total = 0f32;
    for (g, xs) in x.chunks(group).enumerate() {
        let base = g * group;
        total += dot_generic(t, &w[base..base + xs.len()], xs) * scales[g];
    }
    total
}

/// The public kernels of one x86 level, made from its module's `dot`, `dot_scaled` and
/// `convert` (generic over that module's load trait: `F32`, `Bf16`, `F16`, `I8`, `U8`)
/// with the level's target features enabled.
#[cfg(target_arch = "x86_64")]
macro_rules! entry_points {
    ($features:literal) => {
        #[target_feature(enable = $features)]
        pub unsafe fn row_dot(t: WType, w: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
            match t {
                WType::F32 => dot::<F32>(w, x),
                WType::BF16 => dot::<Bf16>(w, x),
                WType::F16 => dot::<F16>(w, x),
                WType::I8 => dot_scaled::<I8>(w, x, scales, group),
                WType::U8Offset => dot_scaled::<U8>(w, x, scales, group),
            }
        }

        #[target_feature(enable = $features)]
        pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
            let n = x.len().min(w.len());
            // SAFETY: `w` holds n f32 values, i.e. 4n bytes.
            let wb = std::slice::from_raw_parts(w.as_ptr() as *const u8, 4 * n);
            dot::<F32>(wb, &x[..n])
        }

        #[target_feature(enable = $features)]
        pub unsafe fn dequant(t: WType, w: &[u8], scales: &[f32], group: usize, out: &mut [f32]) {
            match t {
                WType::F32 => convert::<F32>(w, 1.0, out),
                WType::BF16 => convert::<Bf16>(w, 1.0, out),
                WType::F16 => convert::<F16>(w, 1.0, out),
                WType::I8 | WType::U8Offset => {
                    for (g, chunk) in out.chunks_mut(group).enumerate() {
                        let b = &w[g * group..g * group + chunk.len()];
                        if t == WType::I8 {
                            convert::<I8>(b, scales[g], chunk)
                        } else {
                            convert::<U8>(b, scales[g], chunk)
                        }
                    }
                }
            }
        }
    };
}

mod tile;
pub use tile::{dequant_cols, Rows};

mod rows;
use rows::{put, stream_float_rows};
pub use rows::{rows_dot, rows_dot_a8};
#[cfg(test)]
use rows::{rows_dot_a8_on, rows_dot_on};

mod pairs;
pub use pairs::{pair32, pairs_apply, rows_dot_pairs};
#[cfg(target_arch = "x86_64")]
use pairs::{pairs_setup, pairs_tail};

mod bf16a;
pub use bf16a::{bf16a_applies, bf16a_isa, round_bf16, tile_bf16, Tile};

#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod x86;

/// How far ahead of the weights being read the kernels ask for them, in bytes: four pages,
/// so that a stream goes on across the 4 KiB page boundaries where the hardware prefetcher
/// stops (`STEERLM_PREFETCH` overrides; `cargo xtask bench kernels` measures the effect).
/// One page ahead was too close on a Zen 4 (one thread, decode of the 134M model, best of
/// 5 alternated: bf16 76.6 tok/s at 4 KiB, 94.4 at 8, 97.6 at 16, no better further out;
/// int8 group 32 106.4, 118.3, 118.2).
/// Every level asks into L2 (T1): into L1 the core's few line-fill buffers run short.
fn prefetch_distance() -> usize {
    static D: OnceLock<usize> = OnceLock::new();
    *D.get_or_init(|| {
        std::env::var("STEERLM_PREFETCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16384)
    })
}

/// Which instruction set the kernels use.
pub fn isa() -> &'static str {
    if simd::row_level(false) != simd::level() {
        return "avx512 (float rows avx2)";
    }
    simd::level().as_str()
}

/// `Σ w[i]·x[i]` over one stored row (`x.len()` elements); int8 rows are scaled per
/// group of `group` columns by `scales`.
#[inline]
pub fn row_dot(t: WType, w: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
    row_dot_on(simd::row_level(t.is_int8()), t, w, x, scales, group)
}

/// [`row_dot`] on level `l`, one this CPU runs (`simd::available`).
#[inline]
fn row_dot_on(l: Level, t: WType, w: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match l {
        // SAFETY: the CPU has the level's features (it is one `simd` detected).
        Level::Avx512 => return unsafe { avx512::row_dot(t, w, x, scales, group) },
        Level::Avx2 => return unsafe { x86::row_dot(t, w, x, scales, group) },
        Level::Generic => {}
    }
    let _ = l;
    row_dot_generic(t, w, x, scales, group)
}

/// How many leading elements [`row_dot`] sums apart for a row of `cols` columns stored
/// at address `at` before its loads fall on vector boundaries (at the AVX-512 level, for
/// rows it sums in one piece); 0 elsewhere. Activations placed so that element `head` is
/// 64-byte aligned then meet aligned weights.
pub fn aligned_head(t: WType, cols: usize, group: usize, at: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if simd::row_level(t.is_int8()) == Level::Avx512 && (!t.is_int8() || group >= cols) {
        return avx512::aligned_head(t.size(), at).min(cols);
    }
    let _ = (t, cols, group, at);
    0
}

/// Activations reordered for [`row_dot_permuted`]: within each block of 32, lane `k` of
/// vector `j` holds element `4k + j` (the order in which the int8 kernel unpacks the
/// block's bytes). Needs `x.len() % 32 == 0`.
pub fn permute32(x: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.resize(x.len(), 0.0);
    for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(32)) {
        for j in 0..4 {
            for k in 0..8 {
                ob[8 * j + k] = xb[4 * k + j];
            }
        }
    }
}

/// Whether [`row_dot_permuted`] takes int8 rows of `cols` columns in groups of `group`:
/// at the AVX2 level only (with AVX-512 the sign extension is cheap and [`row_dot`]
/// reads the activations as they are).
pub fn permuted_applies(t: WType, cols: usize, group: usize) -> bool {
    t.is_int8()
        && cols.is_multiple_of(32)
        && group.min(cols).is_multiple_of(32)
        && cfg!(target_arch = "x86_64")
        && simd::level() == Level::Avx2
}

/// [`row_dot`] of an int8 row with activations in [`permute32`] order (same result up to
/// the order of the f32 additions). Only where [`permuted_applies`].
#[inline]
pub fn row_dot_permuted(t: WType, w: &[u8], xp: &[f32], scales: &[f32], group: usize) -> f32 {
    assert!(permuted_applies(t, xp.len(), group));
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX2 + FMA + F16C (checked in `permuted_applies`).
        unsafe { x86::dot_i8_permuted(t == WType::U8Offset, w, xp, scales, group) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("permuted_applies is false off x86-64")
}

/// Activations quantized to int8 per block of 32 values, as llama.cpp's q8_0 does: scale
/// `max |x| / 127`, values rounded to nearest. Only with `--int8-activations` (opt-in:
/// the products then differ from the f32 ones by the activations' rounding).
#[derive(Debug, Default, Clone)]
pub struct QAct {
    pub q: Vec<i8>,
    /// One scale per block of 32.
    pub s: Vec<f32>,
    /// Each block's scale eight times over (one per 32-bit lane of its sums).
    pub s8: Vec<f32>,
}

/// The columns of a [`QAct`] that one part of a product reads (`c0` and the count
/// multiples of 32).
#[derive(Debug, Clone, Copy)]
pub struct QCols<'a> {
    pub q: &'a [i8],
    pub s: &'a [f32],
    pub s8: &'a [f32],
}

impl QAct {
    /// No values yet (a buffer for [`QAct::fill`]).
    pub const fn new() -> QAct {
        QAct {
            q: Vec::new(),
            s: Vec::new(),
            s8: Vec::new(),
        }
    }

    /// Quantizes `x` (`x.len() % 32 == 0`).
    pub fn of(x: &[f32]) -> QAct {
        let mut a = QAct::new();
        a.fill(x);
        a
    }

    /// Quantizes `x` into this buffer, reusing its memory.
    pub fn fill(&mut self, x: &[f32]) {
        self.q.clear();
        self.q.resize(x.len(), 0);
        self.s.clear();
        self.s.resize(x.len() / 32, 0.0);
        for ((xb, qb), s) in x
            .chunks_exact(32)
            .zip(self.q.chunks_exact_mut(32))
            .zip(&mut self.s)
        {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            *s = amax / 127.0;
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (q, v) in qb.iter_mut().zip(xb) {
                *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
            }
        }
        self.s8.clear();
        self.s8
            .extend(self.s.iter().flat_map(|&v| std::iter::repeat_n(v, 8)));
    }

    /// Columns `c0..c0 + n`.
    pub fn cols(&self, c0: usize, n: usize) -> QCols<'_> {
        assert!(c0.is_multiple_of(32) && n.is_multiple_of(32));
        QCols {
            q: &self.q[c0..c0 + n],
            s: &self.s[c0 / 32..(c0 + n) / 32],
            s8: &self.s8[c0 / 4..(c0 + n) / 4],
        }
    }
}

/// Whether [`row_dot_a8`] takes int8 rows of `cols` columns in groups of `group`.
pub fn a8_applies(t: WType, cols: usize, group: usize) -> bool {
    t.is_int8() && cols.is_multiple_of(32) && group.min(cols).is_multiple_of(32)
}

/// `Σ_b xs[b] · scale[g(b)] · Σ_{i∈b} q_i · xq_i` over blocks of 32: an int8 row against
/// quantized activations, the block sums in exact integers. Only where [`a8_applies`].
#[inline]
pub fn row_dot_a8(t: WType, w: &[u8], a: QCols, scales: &[f32], group: usize) -> f32 {
    assert!(a8_applies(t, a.q.len(), group) && w.len() >= a.q.len());
    row_dot_a8_on(simd::level(), t, w, a, scales, group)
}

/// Whether the CPU has AVX-512 VNNI (the a8 kernel's `vpdpbusd`).
fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx512vnni");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`row_dot_a8`] on level `l`: VNNI at the AVX-512 level where the CPU has it, the AVX2
/// kernel otherwise, or portable.
fn row_dot_a8_on(l: Level, t: WType, w: &[u8], a: QCols, scales: &[f32], group: usize) -> f32 {
    let off = t == WType::U8Offset;
    let (xq, xs) = (a.q, a.s);
    #[cfg(target_arch = "x86_64")]
    {
        if l == Level::Avx512 && vnni() {
            // SAFETY: AVX-512 F/BW/VL (the level) and VNNI (checked just now).
            return unsafe { avx512::dot_a8(off, w, a, scales, group) };
        }
        if l >= Level::Avx2 {
            // SAFETY: AVX2 + FMA + F16C (the level).
            return unsafe { x86::dot_a8(off, w, xq, xs, scales, group) };
        }
    }
    let _ = l;
    let group = group.min(xq.len());
    let mut total = 0f32;
    for (b, (wb, xb)) in w.chunks_exact(32).zip(xq.chunks_exact(32)).enumerate() {
        total += block_a8(off, wb, xb) as f32 * (xs[b] * scales[b * 32 / group]);
    }
    total
}

/// `Σ q·x` over one block of int8 weights (`off`: stored as `q + 128`) and activations,
/// in exact integers: the portable a8 kernel's block, and the SIMD kernels' odd one.
fn block_a8(off: bool, w: &[u8], x: &[i8]) -> i32 {
    w.iter()
        .zip(x)
        .map(|(&u, &x)| {
            let q = if off { (u ^ 0x80) as i8 } else { u as i8 };
            q as i32 * x as i32
        })
        .sum()
}

/// A matrix: its pointer and (column, row) strides in elements.
pub type Mat<T> = (T, isize, isize);

/// `dst (m × n) = lhs (m × k) · rhs (k × n)` in f32 on the calling thread (`gemm`: cache
/// blocking, SIMD, f32 accumulation); each matrix given by pointer and strides.
///
/// # Safety
/// Every pointer must cover its matrix with the strides given, and `dst` must not overlap
/// the others or be written by another thread meanwhile.
pub unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: Mat<*mut f32>,
    lhs: Mat<*const f32>,
    rhs: Mat<*const f32>,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.1,
        dst.2,
        false,
        lhs.0,
        lhs.1,
        lhs.2,
        rhs.0,
        rhs.1,
        rhs.2,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// `Σ w[i]·x[i]` over f32 slices.
#[inline]
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    dot_f32_on(simd::level(), w, x)
}

#[inline]
fn dot_f32_on(l: Level, w: &[f32], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match l {
        // SAFETY: as in `row_dot_on`.
        Level::Avx512 => return unsafe { avx512::dot_f32(w, x) },
        Level::Avx2 => return unsafe { x86::dot_f32(w, x) },
        Level::Generic => {}
    }
    let _ = l;
    dot_f32_generic(w, x)
}

/// One stored row as f32 (`out.len()` elements), int8 multiplied by its scales.
#[inline]
pub fn dequant(t: WType, w: &[u8], scales: &[f32], group: usize, out: &mut [f32]) {
    dequant_on(simd::level(), t, w, scales, group, out)
}

#[inline]
fn dequant_on(l: Level, t: WType, w: &[u8], scales: &[f32], group: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match l {
        // SAFETY: as in `row_dot_on`.
        Level::Avx512 => return unsafe { avx512::dequant(t, w, scales, group, out) },
        Level::Avx2 => return unsafe { x86::dequant(t, w, scales, group, out) },
        Level::Generic => {}
    }
    let _ = l;
    dequant_generic(t, w, scales, group, out)
}

#[cfg(test)]
mod tests;
