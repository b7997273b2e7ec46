//! A decode task's product: several weight rows against one token's activations.

use super::*;

/// `out[r] = v`, or `out[r] += v` where `add`.
#[inline(always)]
pub(super) fn put(out: &mut [f32], r: usize, v: f32, add: bool) {
    out[r] = if add { out[r] + v } else { v };
}

/// `out[r] = ` (`+=` where `add`: the next part of a row-parallel weight) the product of
/// row `r` of `b` with `x`, for every row of `b`: a decode task. Each value is
/// [`row_dot`]'s bit for bit; the kernels take several rows at once, so that a vector of
/// `x` is loaded once for all of them and a row's fixed costs (call, checks, the
/// horizontal sum's setup) are shared.
pub fn rows_dot(b: &Rows, x: &[f32], out: &mut [f32], add: bool) {
    let l = simd::row_level(b.t.is_int8());
    rows_dot_on((l, stream_float_rows()), b, x, out, add)
}

/// [`rows_dot`] on level `l`, one this CPU runs (`simd::available`), float rows one after
/// another where `stream` ([`stream_float_rows`]).
pub(super) fn rows_dot_on(
    (l, stream): (Level, bool),
    b: &Rows,
    x: &[f32],
    out: &mut [f32],
    add: bool,
) {
    assert!(x.len() == b.cols && out.len() >= b.rows);
    #[cfg(target_arch = "x86_64")]
    match l {
        // SAFETY: the CPU has the level's features (it is one `simd` detected).
        Level::Avx512 => return unsafe { avx512::rows_dot(b, x, out, add, stream) },
        Level::Avx2 => return unsafe { x86::rows_dot(b, x, out, add, stream) },
        Level::Generic => {}
    }
    let _ = (l, stream);
    for r in 0..b.rows {
        let (w, sc) = b.row(r);
        put(out, r, row_dot_generic(b.t, w, x, sc, b.group), add);
    }
}

/// [`rows_dot`] of int8 rows against quantized activations (`--int8-activations`): each
/// value is [`row_dot_a8`]'s bit for bit; with AVX-512 VNNI several rows at a time. Only
/// where [`a8_applies`].
pub fn rows_dot_a8(b: &Rows, a: QCols, out: &mut [f32], add: bool) {
    rows_dot_a8_on(simd::level(), b, a, out, add)
}

/// [`rows_dot_a8`] on level `l`, one this CPU runs.
pub(super) fn rows_dot_a8_on(l: Level, b: &Rows, a: QCols, out: &mut [f32], add: bool) {
    assert!(a8_applies(b.t, a.q.len(), b.group) && b.cols == a.q.len() && out.len() >= b.rows);
    #[cfg(target_arch = "x86_64")]
    if l == Level::Avx512 && vnni() {
        // SAFETY: AVX-512 F/BW/VL (the level) and VNNI (checked just now).
        return unsafe { avx512::rows_dot_a8(b, a, out, add) };
    }
    for r in 0..b.rows {
        let (w, s) = b.row(r);
        put(out, r, row_dot_a8_on(l, b.t, w, a, s, b.group), add);
    }
}

/// Whether decode reads float weight rows (f32, f16, bf16) one after another with no
/// software prefetch, leaving the stream to the hardware prefetcher, instead of several
/// rows at once each asked for [`prefetch_distance`] ahead. Several rows at once are
/// several streams a row apart, which the hardware prefetcher does not follow, hence the
/// prefetches; one row after another is a single stream through the matrix.
/// On a Zen 4 the single stream read faster (134M model, one thread, medians of 3–4
/// alternated runs: f32 50 → 62 tok/s, f16 96 → 110, bf16 97 → 107; two threads alike);
/// int8 rows, bound by their arithmetic there, stay several at a time (one at a time:
/// channel 138 → 121). It is the default on AMD CPUs. On the Intel Xeon measured
/// earlier the interleaved rows read f32 at the probe's bandwidth, so it stays there.
/// `STEERLM_FLOAT_ROWS=stream` or `=interleave` chooses.
pub(crate) fn stream_float_rows() -> bool {
    static S: OnceLock<bool> = OnceLock::new();
    *S.get_or_init(|| match std::env::var("STEERLM_FLOAT_ROWS").as_deref() {
        Ok("stream") => true,
        Ok("interleave") => false,
        _ => simd::amd(),
    })
}
