//! bf16 and int8 weight rows against a prompt's activations rounded to bf16
//! (`--bf16-activations`, opt-in), the rounding llama.cpp's bf16 path makes. The product
//! of two bf16 values is exact in f32, and so is an int8 `q` in bf16, so the activations'
//! rounding is the only difference from the exact path; sums stay in f32, int8 group sums
//! scaled in f32.
//!
//! It is a prompt path: where the CPU has AVX-512 BF16, the products are `vdpbf16ps`, two
//! products per f32 lane and instruction, twice the rate of the f32 FMAs the exact prompt
//! path is bound by. Rows are packed 32 at a time as bf16 column pairs (gathered 16 rows
//! at once; int8 `q` converted exactly), one row a lane, against 6 tokens' pairs
//! broadcast, so that no horizontal sum is needed and an int8 group's sums are scaled 16
//! rows at once. (A kernel over bf16 rows as stored, 4 rows × 4 tokens of dot products,
//! ran no faster: 134M pp256 at a median 630 tok/s against the packed kernel's 636, Zen 4,
//! one thread, six alternated runs.) Elsewhere (or with `STEERLM_ISA` below `avx512`) a
//! portable kernel sums the same products in 16 f32 lanes. Decode stays exact: it is bound by
//! memory, not by the multiplies (on a Zen 4 a `vdpbf16ps` decode kernel ran at 86 tok/s
//! against the exact AVX2 kernel's 96, 134M model, one thread).

use super::*;

/// Activations rounded to bf16 (to nearest, ties to even, as `vcvtne2ps2bf16` and the
/// `half` crate do; NaN stays NaN), as bits, into `out` (its memory reused). Branch-free
/// per value, so that it vectorizes: a prompt's activations are rounded before every
/// product, on one thread.
pub fn round_bf16(x: &[f32], out: &mut Vec<u16>) {
    out.clear();
    out.extend(x.iter().map(|&v| {
        let b = v.to_bits();
        let rounded = (b + 0x7fff + ((b >> 16) & 1)) >> 16;
        let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
        (if nan { (b >> 16) | 0x40 } else { rounded }) as u16
    }));
}

/// Whether rows of type `t` take the bf16-activation kernels: bf16, and int8 (whose
/// values are exact in bf16; their scales are applied in f32 per group).
pub fn bf16a_applies(t: WType) -> bool {
    matches!(t, WType::BF16 | WType::I8 | WType::U8Offset)
}

/// Whether the CPU has AVX-512 BF16 (`vdpbf16ps`).
fn bf16_units() -> bool {
    static B: OnceLock<bool> = OnceLock::new();
    *B.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        return std::is_x86_feature_detected!("avx512bf16");
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Which kernels run: `vdpbf16ps` at the AVX-512 level where the CPU has it; the portable
/// sums (compiled for AVX2 at that level or above) otherwise.
pub fn bf16a_isa() -> &'static str {
    match simd::level() {
        Level::Avx512 if bf16_units() => "avx512-bf16",
        Level::Avx512 | Level::Avx2 => "avx2 (portable sums)",
        Level::Generic => "generic",
    }
}

#[inline(always)]
fn bf(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// The bf16 or int8 rows `b` against `t` tokens of bf16 activations, token `j`'s at
/// `x[j · ldx..][..b.cols]`: `out[j · ldo + r] = Σ_c w_r[c]·x_j[c]` for every row `r` and
/// token `j` (int8: `Σ_g scale_g · Σ_{c in g} q_c·x_j[c]`), or `+=` that sum with `add`.
#[derive(Clone, Copy)]
pub struct Tile<'a> {
    pub rows: &'a Rows<'a>,
    pub x: &'a [u16],
    pub ldx: usize,
    pub t: usize,
    pub ldo: usize,
    pub add: bool,
}

impl Tile<'_> {
    fn check(&self, out_len: usize) {
        let b = self.rows;
        assert!(bf16a_applies(b.t), "bf16-activation tile of {:?} rows", b.t);
        if b.rows == 0 || b.cols == 0 || self.t == 0 {
            return;
        }
        let es = b.t.size();
        assert!(
            b.w.len() >= (b.rows - 1) * b.stride + es * b.cols,
            "tile rows"
        );
        assert!(b.rows == 1 || b.stride >= es * b.cols, "tile stride");
        if b.t.is_int8() {
            assert!(b.group > 0, "tile group");
            assert!(
                b.scales.len() >= b.rows * b.cols.div_ceil(b.group),
                "tile scales"
            );
        }
        assert!(
            self.ldx >= b.cols && self.x.len() >= (self.t - 1) * self.ldx + b.cols,
            "tile activations"
        );
        assert!(
            self.ldo >= b.rows && out_len >= (self.t - 1) * self.ldo + b.rows,
            "tile output"
        );
    }
}

/// Runs `tile` into `out`, which must cover `(t - 1) · ldo + rows` values from its start.
///
/// # Safety
/// `out` must be valid for reads and writes of those values, and no other thread may touch
/// the ones this tile writes (`out[j · ldo + r]`) meanwhile.
pub unsafe fn tile_bf16(tile: &Tile, out: *mut f32, out_len: usize) {
    tile_bf16_on(simd::level(), tile, out, out_len)
}

/// [`tile_bf16`] at level `l` (one this CPU runs).
///
/// # Safety
/// As for [`tile_bf16`].
pub(super) unsafe fn tile_bf16_on(l: Level, tile: &Tile, out: *mut f32, out_len: usize) {
    tile.check(out_len);
    let b = tile.rows;
    if b.rows == 0 || b.cols == 0 || tile.t == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if l == Level::Avx512 && bf16_units() {
            // SAFETY: AVX-512 F/BW/VL (the level) and BF16 (checked); the bounds were
            // checked above, the exclusivity of `out` is the caller's.
            if packed_applies(b) {
                return unsafe { x86bf::tile_packed(tile, out) };
            }
        }
        if l >= Level::Avx2 {
            // SAFETY: AVX2 + FMA (the level); as above.
            return unsafe { tile_avx2(tile, out) };
        }
    }
    let _ = l;
    unsafe { tile_generic(tile, out) }
}

/// Whether the packed kernel takes rows `b`: an even number of columns and int8 groups of
/// an even size (or one group).
fn packed_applies(b: &Rows) -> bool {
    b.cols.is_multiple_of(2) && (!b.t.is_int8() || b.group >= b.cols || b.group.is_multiple_of(2))
}

/// The value of element `c` of a stored row, unscaled (int8: `q`), as f32: exact.
#[inline(always)]
fn raw_at(t: WType, w: &[u8], c: usize) -> f32 {
    match t {
        WType::BF16 => bf16_at(w, c),
        WType::I8 => q_at(w, c, false),
        WType::U8Offset => q_at(w, c, true),
        WType::F32 | WType::F16 => unreachable!("checked by Tile::check"),
    }
}

/// The portable tile: the tokens' activations as f32 (exact), then a row at a time
/// against each token (int8: per group, scaled).
#[inline(always)]
unsafe fn tile_generic(tile: &Tile, out: *mut f32) {
    let b = tile.rows;
    let group = if b.t.is_int8() {
        b.group.min(b.cols)
    } else {
        b.cols
    };
    let xs: Vec<f32> = (0..tile.t)
        .flat_map(|j| {
            tile.x[j * tile.ldx..j * tile.ldx + b.cols]
                .iter()
                .map(|&v| bf(v))
        })
        .collect();
    let mut vals = vec![0f32; b.cols];
    for r in 0..b.rows {
        let (w, sc) = b.row(r);
        for (c, v) in vals.iter_mut().enumerate() {
            *v = raw_at(b.t, w, c);
        }
        for (j, x) in xs.chunks_exact(b.cols).enumerate() {
            let mut s = 0f32;
            for (g, (wg, xg)) in vals.chunks(group).zip(x.chunks(group)).enumerate() {
                let d = dot_f32_generic(wg, xg);
                s = if b.t.is_int8() { s + d * sc[g] } else { d };
            }
            // SAFETY: within out_len (checked) and ours (the caller's promise).
            let o = unsafe { &mut *out.add(j * tile.ldo + r) };
            *o = if tile.add { *o + s } else { s };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2(tile: &Tile, out: *mut f32) {
    unsafe { tile_generic(tile, out) }
}

#[cfg(target_arch = "x86_64")]
mod x86bf {
    use super::{Rows, Tile, WType};
    use std::arch::x86_64::*;

    /// Tokens per block of the packed kernel.
    const PT: usize = 6;

    /// The 16 × 16 transpose of 32-bit words: lane `j` of `r[i]` to lane `i` of the
    /// result's `[j]`. Pairs of rows interleaved by words, then by double words, then
    /// 128-bit lanes exchanged twice: 64 shuffles, where 16 gathers would take 16 loads
    /// each.
    #[inline(always)]
    unsafe fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // u[4i + c], 128-bit lane l: column 4l + c of rows 4i..4i + 4.
        let mut u = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        let mut out = [_mm512_setzero_si512(); 16];
        for c in 0..4 {
            let (a, b, cc, d) = (u[c], u[4 + c], u[8 + c], u[12 + c]);
            let v0 = _mm512_shuffle_i32x4::<0x44>(a, b);
            let v1 = _mm512_shuffle_i32x4::<0xee>(a, b);
            let v2 = _mm512_shuffle_i32x4::<0x44>(cc, d);
            let v3 = _mm512_shuffle_i32x4::<0xee>(cc, d);
            out[c] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
            out[4 + c] = _mm512_shuffle_i32x4::<0xdd>(v0, v2);
            out[8 + c] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
            out[12 + c] = _mm512_shuffle_i32x4::<0xdd>(v1, v3);
        }
        out
    }

    /// Rows `r0..r0 + 32` of `b` (zeros past its last row) packed for [`tile_packed`]:
    /// column pair `p` as 32 words, row `i`'s pair (two bf16, the lower column in the low
    /// half; int8 `q` exactly) in word `32p + i`; and each group's scales, row `i` of
    /// group `g` at `32g + i` (1 for bf16 rows; 0 past the last row). Each half of 16
    /// rows is read 64 bytes of every row at a time and transposed in registers
    /// ([`transpose16`]): word `k` of each row is a bf16 pair, or two int8 pairs.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL are present; `b` was checked (its rows lie in `b.w`).
    #[inline(always)]
    unsafe fn pack(b: &Rows, r0: usize, groups: usize, w: &mut Vec<u32>, s: &mut Vec<f32>) {
        let pairs = b.cols / 2;
        let nr = (b.rows - r0).min(32);
        w.clear();
        w.resize(pairs * 32, 0);
        s.clear();
        s.resize(groups * 32, 0.0);
        let int8 = b.t.is_int8();
        for i in 0..nr {
            let sc = b.row(r0 + i).1;
            for g in 0..groups {
                s[32 * g + i] = if int8 { sc[g] } else { 1.0 };
            }
        }
        // Words of each row read: a pair each (bf16), two pairs each (int8; an odd last
        // pair alone below).
        let words = if int8 { pairs / 2 } else { pairs };
        let out = w.as_mut_ptr();
        let flip = _mm512_set1_epi32(if b.t == WType::U8Offset {
            0x8080_8080u32 as i32
        } else {
            0
        });
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        // q in lane bits 8k..8k + 8 -> the bf16 bits of q (exact).
        let bf = |v: __m512i| _mm512_castps_si512(_mm512_cvtepi32_ps(v));
        for h in 0..2 {
            let n = nr.saturating_sub(16 * h).min(16);
            if n == 0 {
                break;
            }
            let m = ((1u32 << n) - 1) as __mmask16;
            let base = b.w.as_ptr().wrapping_add((r0 + 16 * h) * b.stride);
            let mut c = 0;
            while c < words {
                let k = (words - c).min(16);
                let lm = ((1u32 << k) - 1) as __mmask16;
                let mut rv = [_mm512_setzero_si512(); 16];
                for (i, v) in rv.iter_mut().enumerate() {
                    let at = base.wrapping_add(i * b.stride + 4 * c) as *const i32;
                    // SAFETY: rows r0 + 16h + i < rows only (the others' mask is empty),
                    // words c..c + k of each, within its first 2·cols (bf16) or cols
                    // (int8) bytes.
                    *v = unsafe { _mm512_maskz_loadu_epi32(if i < n { lm } else { 0 }, at) };
                }
                let cols = transpose16(rv);
                for (j, &v) in cols.iter().enumerate().take(k) {
                    let p = c + j;
                    if !int8 {
                        // SAFETY: pair p < pairs of the packed block.
                        unsafe { _mm512_storeu_si512(out.add(32 * p + 16 * h) as *mut _, v) };
                        continue;
                    }
                    let g = _mm512_xor_si512(v, flip);
                    let q0 = bf(_mm512_srai_epi32::<24>(_mm512_slli_epi32::<24>(g)));
                    let q1 = bf(_mm512_srai_epi32::<24>(_mm512_slli_epi32::<16>(g)));
                    let q2 = bf(_mm512_srai_epi32::<24>(_mm512_slli_epi32::<8>(g)));
                    let q3 = bf(_mm512_srai_epi32::<24>(g));
                    let lo =
                        _mm512_or_si512(_mm512_srli_epi32::<16>(q0), _mm512_and_si512(q1, high));
                    let hi =
                        _mm512_or_si512(_mm512_srli_epi32::<16>(q2), _mm512_and_si512(q3, high));
                    let masked = |v| _mm512_maskz_mov_epi32(m, v);
                    // SAFETY: pairs 2p and 2p + 1 < pairs of the packed block.
                    unsafe {
                        _mm512_storeu_si512(out.add(64 * p + 16 * h) as *mut _, masked(lo));
                        _mm512_storeu_si512(out.add(64 * p + 32 + 16 * h) as *mut _, masked(hi));
                    }
                }
                c += 16;
            }
            if int8 && pairs % 2 == 1 {
                let p = pairs - 1;
                for i in 0..n {
                    let row = b.row(r0 + 16 * h + i).0;
                    let q = |c: usize| super::raw_at(b.t, row, c).to_bits() >> 16;
                    w[32 * p + 16 * h + i] = q(2 * p) | q(2 * p + 1) << 16;
                }
            }
        }
    }

    thread_local! {
        /// The packed rows and scales of [`tile_packed`], kept between products.
        static PACKED: std::cell::Cell<(Vec<u32>, Vec<f32>)> =
            const { std::cell::Cell::new((Vec::new(), Vec::new())) };
    }

    /// The tile (bf16 or int8 rows) as a matrix product: blocks of 32 rows packed
    /// ([`pack`]) so that each `vdpbf16ps` takes a column pair of 16 rows against one
    /// token's pair broadcast, for 2 × 16 rows × 6 tokens at a time; group sums are scaled
    /// into their row's total at each group's end (16 rows' scales a vector; bf16 rows are
    /// one group of scale 1). No horizontal sums.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and BF16 are present; `tile` was checked against `out`, which the
    /// caller owns for the values written; [`super::packed_applies`] holds.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn tile_packed(tile: &Tile, out: *mut f32) {
        let b = tile.rows;
        let pairs = b.cols / 2;
        let (gp, groups) = if b.t.is_int8() && b.group < b.cols {
            (b.group / 2, b.cols.div_ceil(b.group))
        } else {
            (pairs, 1)
        };
        let (mut wbuf, mut sbuf) = PACKED.take();
        let xp = tile.x.as_ptr() as *const u8;
        let mut r0 = 0;
        while r0 < b.rows {
            let nr = (b.rows - r0).min(32);
            // SAFETY: AVX-512 (this function's features); `b` was checked.
            unsafe { pack(b, r0, groups, &mut wbuf, &mut sbuf) };
            let (wp, sp) = (wbuf.as_ptr(), sbuf.as_ptr());
            let masks: [__mmask16; 2] = [
                ((1u32 << nr.min(16)) - 1) as __mmask16,
                ((1u32 << nr.saturating_sub(16)) - 1) as __mmask16,
            ];
            let mut j = 0;
            while j < tile.t {
                let nt = (tile.t - j).min(PT);
                // Token j + k's activations (bf16 pairs as words); a short block repeats
                // its last token.
                let x: [*const u8; PT] =
                    std::array::from_fn(|k| xp.wrapping_add(2 * (j + k.min(nt - 1)) * tile.ldx));
                let mut tot = [[_mm512_setzero_ps(); PT]; 2];
                for g in 0..groups {
                    let (p0, p1) = (g * gp, ((g + 1) * gp).min(pairs));
                    let mut acc = [[_mm512_setzero_ps(); PT]; 2];
                    for p in p0..p1 {
                        // SAFETY: pair p of the packed block (p < pairs) and of every
                        // token's activations (2p + 1 < cols).
                        let w0: __m512bh = unsafe {
                            std::mem::transmute(_mm512_loadu_si512(wp.add(32 * p) as *const _))
                        };
                        let w1: __m512bh = unsafe {
                            std::mem::transmute(_mm512_loadu_si512(wp.add(32 * p + 16) as *const _))
                        };
                        for k in 0..PT {
                            let v = unsafe { (x[k].add(4 * p) as *const i32).read_unaligned() };
                            let xv: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(v)) };
                            acc[0][k] = _mm512_dpbf16_ps(acc[0][k], w0, xv);
                            acc[1][k] = _mm512_dpbf16_ps(acc[1][k], w1, xv);
                        }
                    }
                    // SAFETY: group g's 32 scales.
                    let s = unsafe {
                        [
                            _mm512_loadu_ps(sp.add(32 * g)),
                            _mm512_loadu_ps(sp.add(32 * g + 16)),
                        ]
                    };
                    for h in 0..2 {
                        for k in 0..PT {
                            tot[h][k] = _mm512_fmadd_ps(acc[h][k], s[h], tot[h][k]);
                        }
                    }
                }
                for k in 0..nt {
                    for h in 0..2 {
                        if masks[h] == 0 {
                            continue;
                        }
                        // SAFETY: rows r0 + 16h.. (masked to the tile's) of token j + k lie
                        // within the output and are this tile's.
                        let o = unsafe { out.add((j + k) * tile.ldo + r0 + 16 * h) };
                        let v = if tile.add {
                            _mm512_add_ps(unsafe { _mm512_maskz_loadu_ps(masks[h], o) }, tot[h][k])
                        } else {
                            tot[h][k]
                        };
                        unsafe { _mm512_mask_storeu_ps(o, masks[h], v) };
                    }
                }
                j += PT;
            }
            r0 += 32;
        }
        PACKED.set((wbuf, sbuf));
    }
}
