//! A prompt's tile of weight rows converted to f32 column-major (each column's rows
//! contiguous), the layout in which `gemm` reads its left-hand matrix without
//! transposing it: packing row-major rows cost more than the product itself for prompts
//! of tens of tokens (measured on 13B-shaped rows: 204 × 5120 against 43 tokens took
//! 2.47 ms row-major, 1.56 ms column-major).

use super::*;

/// `rows` stored rows of `cols` elements of type `t`, row `r` at `w[r · stride..]`, with
/// their int8 scales (`ceil(cols / group)` per row, row-major).
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    pub t: WType,
    pub w: &'a [u8],
    pub stride: usize,
    pub rows: usize,
    pub cols: usize,
    pub scales: &'a [f32],
    pub group: usize,
}

impl Rows<'_> {
    /// Scales per row (0 for float rows).
    fn groups(&self) -> usize {
        if self.t.is_int8() {
            self.cols.div_ceil(self.group)
        } else {
            0
        }
    }

    /// Row `r` as stored, and its scales.
    #[inline]
    pub fn row(&self, r: usize) -> (&[u8], &[f32]) {
        let g = self.groups();
        let w = &self.w[r * self.stride..r * self.stride + self.cols * self.t.size()];
        (w, &self.scales[r * g..(r + 1) * g])
    }
}

/// `out[c · ld + r]` = row `r`'s value at column `c` (int8 scaled by its group), for every
/// row and column of `b`; `scratch` holds a row where the rows go one at a time. Eight
/// rows at a time are converted and transposed in registers on x86-64 with AVX2 (columns
/// a multiple of 8, int8 groups a multiple of 8 or the whole row); the rest a row at a
/// time. Panics unless `b`'s slices cover it, `ld ≥ rows` and `out` covers the tile.
pub fn dequant_cols(b: &Rows, out: &mut [f32], ld: usize, scratch: &mut Vec<f32>) {
    if b.rows == 0 || b.cols == 0 {
        return;
    }
    let es = b.t.size();
    assert!(
        b.w.len() >= (b.rows - 1) * b.stride + b.cols * es,
        "tile rows"
    );
    assert!(b.rows == 1 || b.stride >= b.cols * es, "tile stride");
    assert!(b.scales.len() >= b.rows * b.groups(), "tile scales");
    assert!(
        ld >= b.rows && out.len() >= (b.cols - 1) * ld + b.rows,
        "tile output"
    );
    let fast = cfg!(target_arch = "x86_64")
        && simd::level() >= Level::Avx2
        && b.cols.is_multiple_of(8)
        && (!b.t.is_int8() || b.group >= b.cols || b.group.is_multiple_of(8));
    let full = if fast { b.rows / 8 * 8 } else { 0 };
    #[cfg(target_arch = "x86_64")]
    if full > 0 {
        // SAFETY: AVX2 + FMA + F16C are present (the level), rows 0..full and every
        // column lie in `b.w` and `out` (asserted above), the groups fit the kernel.
        unsafe { x86::dequant_cols8(b, full, out, ld) };
    }
    scratch.resize(b.cols, 0.0);
    for r in full..b.rows {
        let (w, sc) = b.row(r);
        dequant(b.t, w, sc, b.group, &mut scratch[..b.cols]);
        for (c, v) in scratch[..b.cols].iter().enumerate() {
            out[c * ld + r] = *v;
        }
    }
}
