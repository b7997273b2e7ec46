//! bf16 and int8 weight rows against a prompt's activations rounded to bf16
//! (`--bf16-activations`, opt-in), the rounding llama.cpp's bf16 path makes. The product
//! of two bf16 values is exact in f32, and so is an int8 `q` in bf16, so the activations'
//! rounding is the only difference from the exact path; sums stay in f32, int8 group sums
//! scaled in f32.
//!
//! It is a prompt path: where the CPU has AVX-512 BF16, the products are `vdpbf16ps`, two
//! products per f32 lane and instruction, twice the rate of the f32 FMAs the exact prompt
//! path is bound by. bf16 rows and tokens meet in blocks of 4 rows × 4 tokens (16
//! accumulators), the rows read as stored (no conversion, no packing) and the tokens in
//! chunks that stay in L2. int8 rows are packed 32 at a time as bf16 column pairs, one
//! row a lane, so that a group's sums are scaled 16 rows at once with no horizontal sum.
//! Elsewhere (or with `STEERLM_ISA` below `avx512`) a portable kernel sums the same
//! products in 16 f32 lanes. Decode stays exact: it is bound by
//! memory, not by the multiplies (on a Zen 4 a `vdpbf16ps` decode kernel ran at 86 tok/s
//! against the exact AVX2 kernel's 96, 134M model, one thread).

use super::*;

/// Activations rounded to bf16 (to nearest, ties to even, as `vcvtne2ps2bf16` does), as
/// bits, into `out` (its memory reused).
pub fn round_bf16(x: &[f32], out: &mut Vec<u16>) {
    out.clear();
    out.extend(x.iter().map(|&v| half::bf16::from_f32(v).to_bits()));
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
            if b.t == WType::BF16 {
                return unsafe { x86bf::tile(tile, out, prefetch_distance()) };
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

/// Whether the packed kernel takes rows `b`: int8 rows of an even number of columns, in
/// groups of an even size or one group. (bf16 rows take the dot-product tile: through the
/// packed kernel, 134M pp256 ran at 670–680 tok/s against its 700–788, Zen 4, one thread,
/// alternated; their packing is a cost the tile does not have.)
fn packed_applies(b: &Rows) -> bool {
    b.t.is_int8() && b.cols.is_multiple_of(2) && (b.group >= b.cols || b.group.is_multiple_of(2))
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

/// `Σ w[i]·x[i]` over f32 weights and bf16 activations, in 16 f32 lanes.
#[inline(always)]
fn dot_fx(w: &[f32], x: &[u16]) -> f32 {
    let mut acc = [0f32; L];
    let wc = w.chunks_exact(L);
    let xc = x.chunks_exact(L);
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (wb, xb) in wc.zip(xc) {
        let wb: &[f32; L] = wb.try_into().expect("chunk");
        let xb: &[u16; L] = xb.try_into().expect("chunk");
        for l in 0..L {
            acc[l] += wb[l] * bf(xb[l]);
        }
    }
    let mut tail = 0f32;
    for (&a, &xv) in wr.iter().zip(xr) {
        tail += a * bf(xv);
    }
    reduce(acc) + tail
}

/// The portable tile: a row at a time against each token (int8: per group, scaled).
#[inline(always)]
unsafe fn tile_generic(tile: &Tile, out: *mut f32) {
    let b = tile.rows;
    let group = if b.t.is_int8() {
        b.group.min(b.cols)
    } else {
        b.cols
    };
    let mut vals = vec![0f32; b.cols];
    for r in 0..b.rows {
        let (w, sc) = b.row(r);
        for (c, v) in vals.iter_mut().enumerate() {
            *v = raw_at(b.t, w, c);
        }
        for j in 0..tile.t {
            let x = &tile.x[j * tile.ldx..j * tile.ldx + b.cols];
            let mut s = 0f32;
            for (g, (wg, xg)) in vals.chunks(group).zip(x.chunks(group)).enumerate() {
                let d = dot_fx(wg, xg);
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

    /// Bytes of one chunk of tokens' activations: a chunk is walked once per block of four
    /// rows, so it is sized to stay in L2 (1 MiB a core or more where AVX-512 BF16 is).
    const CHUNK_BYTES: usize = 256 << 10;

    #[inline(always)]
    unsafe fn ld(p: *const u16) -> __m512bh {
        // SAFETY: the caller's bounds; any alignment.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _)) }
    }

    /// The first `popcount(m)` values at `p`, zeros after; nothing past them is read.
    #[inline(always)]
    unsafe fn ldm(m: __mmask32, p: *const u16) -> __m512bh {
        // SAFETY: the caller's bounds for the unmasked values.
        unsafe {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(m, p as *const i16))
        }
    }

    /// `[Σa0, Σa1, Σa2, Σa3]`, each over its 16 lanes.
    #[inline(always)]
    unsafe fn reduce4(a: [__m512; 4]) -> __m128 {
        // Per 128-bit lane: [a0 0+2, a1 0+2, a0 1+3, a1 1+3], and the same for a2, a3.
        let s01 = _mm512_add_ps(
            _mm512_unpacklo_ps(a[0], a[1]),
            _mm512_unpackhi_ps(a[0], a[1]),
        );
        let s23 = _mm512_add_ps(
            _mm512_unpacklo_ps(a[2], a[3]),
            _mm512_unpackhi_ps(a[2], a[3]),
        );
        // Per 128-bit lane: [Σa0, Σa1, Σa2, Σa3] over its four values.
        let s = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(s01, s23),
            _mm512_shuffle_ps::<0b11_10_11_10>(s01, s23),
        );
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)));
        let h = _mm256_add_ps(_mm512_castps512_ps256(s), hi);
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
    }

    /// `acc[j][i] = Σ_c w_i[c]·x_j[c]` over `steps` full steps of 32 values and a masked
    /// last one (`mask`, 0 for none); each row's line `ahead` bytes on is asked for into L2
    /// when `ahead > 0`.
    #[inline(always)]
    unsafe fn block<const T: usize>(
        w: [*const u16; 4],
        x: [*const u16; T],
        steps: usize,
        mask: __mmask32,
        ahead: usize,
    ) -> [[__m512; 4]; T] {
        let mut acc = [[_mm512_setzero_ps(); 4]; T];
        for s in 0..steps {
            let o = s * 32;
            if ahead > 0 {
                for p in w {
                    _mm_prefetch::<_MM_HINT_T1>((p as *const i8).wrapping_add(2 * o + ahead));
                }
            }
            // SAFETY: o + 32 <= cols for every row and token (the callers' bounds).
            let wv = unsafe {
                [
                    ld(w[0].add(o)),
                    ld(w[1].add(o)),
                    ld(w[2].add(o)),
                    ld(w[3].add(o)),
                ]
            };
            for j in 0..T {
                let xv = unsafe { ld(x[j].add(o)) };
                for i in 0..4 {
                    acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv[i], xv);
                }
            }
        }
        if mask != 0 {
            let o = steps * 32;
            // SAFETY: the unmasked values lie before cols.
            let wv = unsafe {
                [
                    ldm(mask, w[0].add(o)),
                    ldm(mask, w[1].add(o)),
                    ldm(mask, w[2].add(o)),
                    ldm(mask, w[3].add(o)),
                ]
            };
            for j in 0..T {
                let xv = unsafe { ldm(mask, x[j].add(o)) };
                for i in 0..4 {
                    acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv[i], xv);
                }
            }
        }
        acc
    }

    /// Writes (or adds) the sums of rows `r..r + nr` for the `nt` tokens from `j`.
    #[inline(always)]
    unsafe fn store<const T: usize>(
        acc: [[__m512; 4]; T],
        out: *mut f32,
        tile: &Tile,
        (r, nr): (usize, usize),
        (j, nt): (usize, usize),
    ) {
        for (k, a) in acc.into_iter().enumerate().take(nt) {
            let s = unsafe { reduce4(a) };
            // SAFETY: rows r..r + nr of token j + k lie within the output (the caller's
            // bounds) and are this tile's.
            let p = unsafe { out.add((j + k) * tile.ldo + r) };
            if nr == 4 {
                let v = if tile.add {
                    _mm_add_ps(unsafe { _mm_loadu_ps(p) }, s)
                } else {
                    s
                };
                unsafe { _mm_storeu_ps(p, v) };
            } else {
                let mut v = [0f32; 4];
                unsafe { _mm_storeu_ps(v.as_mut_ptr(), s) };
                for (i, v) in v.iter().enumerate().take(nr) {
                    let o = unsafe { &mut *p.add(i) };
                    *o = if tile.add { *o + v } else { *v };
                }
            }
        }
    }

    /// The tile: chunks of tokens that stay in L2; in each, blocks of 4 rows (read once
    /// per chunk) against blocks of 4 tokens. A short last block of rows or tokens repeats
    /// its last row or token and drops the repeats' sums.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and BF16 are present; `tile` was checked against `out`, which the
    /// caller owns for the values written.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn tile(tile: &Tile, out: *mut f32, ahead: usize) {
        let b = tile.rows;
        let cols = b.cols;
        let (steps, rem) = (cols / 32, cols % 32);
        let mask: __mmask32 = if rem == 0 { 0 } else { (1u32 << rem) - 1 };
        let wp = b.w.as_ptr();
        let row = |r: usize| wp.wrapping_add(r.min(b.rows - 1) * b.stride) as *const u16;
        let xp = tile.x.as_ptr();
        let chunk = (CHUNK_BYTES / (2 * cols)).max(4) / 4 * 4;
        let mut j0 = 0;
        while j0 < tile.t {
            let j1 = (j0 + chunk).min(tile.t);
            let tok = |j: usize| xp.wrapping_add(j.min(j1 - 1) * tile.ldx);
            let mut r = 0;
            while r < b.rows {
                let w = [row(r), row(r + 1), row(r + 2), row(r + 3)];
                let nr = (b.rows - r).min(4);
                let mut j = j0;
                while j < j1 {
                    let nt = (j1 - j).min(4);
                    // Only the first pass over the rows reads them from memory.
                    let pf = if j == j0 { ahead } else { 0 };
                    if nt == 1 {
                        let acc = unsafe { block::<1>(w, [tok(j)], steps, mask, pf) };
                        unsafe { store(acc, out, tile, (r, nr), (j, 1)) };
                    } else {
                        let x = [tok(j), tok(j + 1), tok(j + 2), tok(j + 3)];
                        let acc = unsafe { block::<4>(w, x, steps, mask, pf) };
                        unsafe { store(acc, out, tile, (r, nr), (j, nt)) };
                    }
                    j += 4;
                }
                r += 4;
            }
            j0 = j1;
        }
    }

    /// Tokens per block of the packed kernel.
    const PT: usize = 6;

    /// int8 rows `r0..r0 + 32` of `b` (zeros past its last row) packed for
    /// [`tile_packed`]: column pair `p` as 32 words, row `i`'s pair (`q` as two bf16,
    /// exact; the lower column in the low half) in word `32p + i`; and each group's
    /// scales, row `i` of group `g` at `32g + i` (0 past the last row).
    fn pack(b: &Rows, r0: usize, groups: usize, w: &mut Vec<u32>, s: &mut Vec<f32>) {
        let pairs = b.cols / 2;
        w.clear();
        w.resize(pairs * 32, 0);
        s.clear();
        s.resize(groups * 32, 0.0);
        // int8 byte -> the bf16 bits of q.
        let off = b.t == WType::U8Offset;
        let lut: [u32; 256] = std::array::from_fn(|v| {
            let q = if off {
                (v as u8 ^ 0x80) as i8
            } else {
                v as u8 as i8
            };
            (q as f32).to_bits() >> 16
        });
        for i in 0..32.min(b.rows - r0) {
            let (row, sc) = b.row(r0 + i);
            for (p, e) in row.chunks_exact(2).enumerate() {
                w[32 * p + i] = lut[e[0] as usize] | lut[e[1] as usize] << 16;
            }
            for g in 0..groups {
                s[32 * g + i] = sc[g];
            }
        }
    }

    thread_local! {
        /// The packed rows and scales of [`tile_packed`], kept between products.
        static PACKED: std::cell::Cell<(Vec<u32>, Vec<f32>)> =
            const { std::cell::Cell::new((Vec::new(), Vec::new())) };
    }

    /// An int8 tile as a matrix product: blocks of 32 rows packed ([`pack`]) so that each
    /// `vdpbf16ps` takes a column pair of 16 rows against one token's pair broadcast, for
    /// 2 × 16 rows × 6 tokens at a time; group sums are scaled into their row's total at
    /// each group's end (16 rows' scales a vector). No horizontal sums.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and BF16 are present; `tile` was checked against `out`, which the
    /// caller owns for the values written; [`super::packed_applies`] holds.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn tile_packed(tile: &Tile, out: *mut f32) {
        let b = tile.rows;
        let pairs = b.cols / 2;
        let (gp, groups) = if b.group < b.cols {
            (b.group / 2, b.cols.div_ceil(b.group))
        } else {
            (pairs, 1)
        };
        let (mut wbuf, mut sbuf) = PACKED.take();
        let xp = tile.x.as_ptr() as *const u8;
        let mut r0 = 0;
        while r0 < b.rows {
            let nr = (b.rows - r0).min(32);
            pack(b, r0, groups, &mut wbuf, &mut sbuf);
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
