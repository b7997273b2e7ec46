//! The int8 scheme, defined once. `kernels/quantize.cu` mirrors it operation for operation
//! so that the GPU produces the same bits:
//!
//! 1. `amax = max |x|` over the group (a row for `channel`, `group` columns for `group`),
//!    in f32.
//! 2. `s = amax / 127` (one IEEE f32 division), rounded to nearest-even into the scale's
//!    stored dtype (the model's float dtype). If that rounds a non-zero `amax` to zero, the
//!    smallest positive value of the dtype is stored instead; if it overflows, the tensor is
//!    refused.
//! 3. `q = clamp(round_half_even(x / s_stored), -127, 127)` (one IEEE f32 division), and
//!    `q = 0` when `s_stored = 0`. Quantizing with the *stored* scale keeps every value
//!    within half a step of its dequantization `q · s_stored`, except where rounding the
//!    scale down forces the clamp.
//!
//! Values are written as `q + 128` (the compressed-tensors packing).

// Kernels index lanes explicitly: that is what lets the compiler vectorize them.
#![allow(clippy::needless_range_loop)]

use crate::dtype::DType;

/// Rounds `s` to `dt` (nearest-even) and returns the stored value as f32.
#[inline(always)]
pub fn round_scale(s: f32, dt: DType) -> f32 {
    match dt {
        DType::BF16 => half::bf16::from_f32(s).to_f32(),
        DType::F16 => half::f16::from_f32(s).to_f32(),
        _ => s,
    }
}

/// Smallest positive value of a scale dtype.
fn tiny(dt: DType) -> f32 {
    match dt {
        DType::BF16 => half::bf16::from_bits(1).to_f32(),
        DType::F16 => half::f16::from_bits(1).to_f32(),
        _ => f32::from_bits(1),
    }
}

/// The stored scale for a group whose largest magnitude is `amax`; `None` if it overflows
/// the dtype.
#[inline(always)]
pub fn scale_for(amax: f32, dt: DType) -> Option<f32> {
    let s = round_scale(amax / 127.0, dt);
    if !s.is_finite() {
        return None;
    }
    Some(if s == 0.0 && amax > 0.0 { tiny(dt) } else { s })
}

/// One value, quantized with the stored scale `s`.
#[inline(always)]
pub fn quantize_value(x: f32, s: f32) -> i8 {
    if s == 0.0 {
        return 0;
    }
    (x / s).round_ties_even().clamp(-127.0, 127.0) as i8
}

/// Errors accumulated over a tensor.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrStats {
    pub max_abs: f64,
    pub sum_sq_err: f64,
    pub sum_sq: f64,
    pub count: u64,
    /// Finite values written as ±inf (casts with `--allow-overflow`): their error is
    /// infinite, and so are the tensor's max and RMS errors.
    pub overflow: u64,
}

impl ErrStats {
    pub fn merge(&mut self, o: &ErrStats) {
        self.max_abs = self.max_abs.max(o.max_abs);
        self.sum_sq_err += o.sum_sq_err;
        self.sum_sq += o.sum_sq;
        self.count += o.count;
        self.overflow += o.overflow;
    }

    /// Counts `n` overflowed values: each has an infinite error.
    pub fn add_overflow(&mut self, n: u64) {
        if n > 0 {
            self.overflow += n;
            self.max_abs = f64::INFINITY;
            self.sum_sq_err = f64::INFINITY;
        }
    }

    /// `sqrt(Σ err² / Σ x²)`.
    pub fn rel_rms(&self) -> f64 {
        if self.overflow > 0 {
            f64::INFINITY
        } else if self.sum_sq == 0.0 {
            if self.sum_sq_err == 0.0 {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (self.sum_sq_err / self.sum_sq).sqrt()
        }
    }

    /// `10 log10(Σ x² / Σ err²)`; infinite when exact.
    pub fn snr_db(&self) -> f64 {
        if self.overflow > 0 {
            f64::NEG_INFINITY
        } else if self.sum_sq_err == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (self.sum_sq / self.sum_sq_err).log10()
        }
    }
}

/// Why a row could not be quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum RowError {
    NonFinite {
        col: usize,
        value: f32,
    },
    ScaleOverflow {
        amax: f32,
    },
    /// The GPU failed (driver message).
    Device(String),
}

const L: usize = 16;

/// Largest magnitude of `xs` as f32 bits, 16 lanes at a time: for non-negative floats the
/// order of the bit patterns is the order of the values, and integer max vectorizes. A
/// result of `0x7f80_0000` or more means an infinity or NaN is present.
#[inline(always)]
fn amax_bits(xs: &[f32]) -> u32 {
    let mut m = [0u32; L];
    let c = xs.chunks_exact(L);
    let r = c.remainder();
    for b in c {
        let b: &[f32; L] = b.try_into().expect("chunk");
        for l in 0..L {
            m[l] = m[l].max(b[l].to_bits() & 0x7fff_ffff);
        }
    }
    let mut best = m.iter().copied().max().unwrap_or(0);
    for v in r {
        best = best.max(v.to_bits() & 0x7fff_ffff);
    }
    best
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Step 3 of the scheme on one group with a non-zero stored scale `s`, 8 lanes at a
    /// time: `q = clamp(round_half_even(x / s), -127, 127) + 128`, plus the error sums.
    /// The same IEEE operations as the generic path, so the same bits.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_group(xs: &[f32], s: f32, qs: &mut [u8]) -> (f32, f64, f64, usize) {
        let n = xs.len().min(qs.len());
        let full = n / 8 * 8;
        let sv = _mm256_set1_ps(s);
        let lo = _mm256_set1_ps(-127.0);
        let hi = _mm256_set1_ps(127.0);
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let flip = _mm_set1_epi8(-128);
        let (mut emax, mut esum, mut xsum) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 <= n, within both slices.
            let x = _mm256_loadu_ps(xs.as_ptr().add(i));
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_div_ps(x, sv),
            );
            let qf = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
            let qi = _mm256_cvtps_epi32(qf);
            let p16 = _mm_packs_epi32(
                _mm256_castsi256_si128(qi),
                _mm256_extracti128_si256::<1>(qi),
            );
            let p8 = _mm_xor_si128(_mm_packs_epi16(p16, p16), flip);
            _mm_storel_epi64(qs.as_mut_ptr().add(i) as *mut __m128i, p8);
            let d = _mm256_sub_ps(_mm256_mul_ps(qf, sv), x);
            emax = _mm256_max_ps(emax, _mm256_and_ps(d, abs_mask));
            esum = _mm256_fmadd_ps(d, d, esum);
            xsum = _mm256_fmadd_ps(x, x, xsum);
            i += 8;
        }
        let mut e = [0f32; 8];
        let mut a = [0f32; 8];
        let mut b = [0f32; 8];
        _mm256_storeu_ps(e.as_mut_ptr(), emax);
        _mm256_storeu_ps(a.as_mut_ptr(), esum);
        _mm256_storeu_ps(b.as_mut_ptr(), xsum);
        (
            e.iter().fold(0f32, |m, v| m.max(*v)),
            a.iter().map(|v| *v as f64).sum(),
            b.iter().map(|v| *v as f64).sum(),
            full,
        )
    }
}

/// One group with a non-zero stored scale: quantized values into `qs`, errors into
/// `stats`.
#[inline(always)]
fn quantize_group(xs: &[f32], s: f32, qs: &mut [u8], stats: &mut ErrStats, wide: bool) {
    let (mut mx, mut se, mut sx, done) = {
        #[cfg(target_arch = "x86_64")]
        {
            if wide {
                // SAFETY: the caller checked AVX2 and FMA.
                unsafe { x86::quantize_group(xs, s, qs) }
            } else {
                (0f32, 0f64, 0f64, 0)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = wide;
            (0f32, 0f64, 0f64, 0)
        }
    };
    for (o, &v) in qs[done..].iter_mut().zip(&xs[done..]) {
        let qi = quantize_value(v, s) as f32;
        *o = (qi as i32 + 128) as u8;
        let d = qi * s - v;
        mx = mx.max(d.abs());
        se += (d * d) as f64;
        sx += (v * v) as f64;
    }
    stats.max_abs = stats.max_abs.max(mx as f64);
    stats.sum_sq_err += se;
    stats.sum_sq += sx;
    stats.count += xs.len() as u64;
}

fn wide() -> bool {
    crate::dtype::simd::avx2()
}

/// The rule's stored scale for the group `xs` (whose first column is `col0`), or why
/// there is none.
fn group_scale(xs: &[f32], col0: usize, dt: DType) -> Result<f32, RowError> {
    let bits = amax_bits(xs);
    if bits >= 0x7f80_0000 {
        let (col, value) = xs
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
            .map(|(i, v)| (col0 + i, *v))
            .expect("one is not finite");
        return Err(RowError::NonFinite { col, value });
    }
    let amax = f32::from_bits(bits);
    scale_for(amax, dt).ok_or(RowError::ScaleOverflow { amax })
}

/// Quantizes one row `x` in groups of `group` columns: `q` gets `q + 128` per value,
/// `scales` one stored scale (as f32) per group, `stats` the errors.
pub fn quantize_row(
    x: &[f32],
    group: usize,
    dt: DType,
    q: &mut [u8],
    scales: &mut [f32],
    stats: &mut ErrStats,
) -> Result<(), RowError> {
    let wide = wide();
    for (g, (xs, qs)) in x.chunks(group).zip(q.chunks_mut(group)).enumerate() {
        let s = group_scale(xs, g * group, dt)?;
        scales[g] = s;
        if s == 0.0 {
            qs.fill(128);
            stats.sum_sq += xs.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>();
            stats.count += xs.len() as u64;
        } else {
            quantize_group(xs, s, qs, stats, wide);
        }
    }
    Ok(())
}

/// Where a stored int8 row departs from the rule applied to its reference row `x`.
#[derive(Debug, Clone, PartialEq)]
pub enum RowMismatch {
    /// Group `group`'s stored scale is not the rule's scale for `x`.
    Scale {
        group: usize,
        stored: f32,
        rule: f32,
    },
    /// Column `col` holds `stored` where the rule, with the stored scale, gives `rule`.
    Value { col: usize, stored: i8, rule: i8 },
}

/// Checks a stored int8 row exactly against the rule: each scale must be the rule's scale
/// for its group of `x` (stored as `dt`), and each `q` (stored as `q + 128`) the rule
/// applied to `x` with the row's own stored scale. Returns the first departure.
pub fn check_row(
    x: &[f32],
    q: &[u8],
    scales: &[f32],
    group: usize,
    dt: DType,
) -> Result<Option<RowMismatch>, RowError> {
    for (g, (xs, qs)) in x.chunks(group).zip(q.chunks(group)).enumerate() {
        let rule = group_scale(xs, g * group, dt)?;
        let stored = scales[g];
        if stored.to_bits() != rule.to_bits() {
            return Ok(Some(RowMismatch::Scale {
                group: g,
                stored,
                rule,
            }));
        }
        for (i, (&v, &b)) in xs.iter().zip(qs).enumerate() {
            let want = quantize_value(v, stored);
            let got = (b as i16 - 128) as i8;
            if got != want {
                return Ok(Some(RowMismatch::Value {
                    col: g * group + i,
                    stored: got,
                    rule: want,
                }));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_step_bound_and_clamp() {
        let x: Vec<f32> = (0..256).map(|i| (i as f32 - 100.0) * 0.37).collect();
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let mut q = vec![0u8; 256];
            let mut s = vec![0f32; 2];
            let mut st = ErrStats::default();
            quantize_row(&x, 128, dt, &mut q, &mut s, &mut st).unwrap();
            for (i, &v) in x.iter().enumerate() {
                let qi = q[i] as i32 - 128;
                let sc = s[i / 128] as f64;
                let err = (qi as f64 * sc - v as f64).abs();
                if qi.abs() < 127 {
                    assert!(err <= sc / 2.0 * (1.0 + 1e-6), "{dt:?} {i}");
                }
            }
        }
        let mut q = vec![0u8; 3];
        let mut s = vec![0f32; 1];
        let mut st = ErrStats::default();
        let r = quantize_row(
            &[1.0, f32::NAN, 2.0],
            3,
            DType::F32,
            &mut q,
            &mut s,
            &mut st,
        );
        assert!(
            matches!(r, Err(RowError::NonFinite { col: 1, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn wide_path_equals_the_scalar_rule_bit_for_bit() {
        // Scale exactly 1/8 (amax 127/8): x = (k + 0.5)/8 are exact ties.
        let mut x: Vec<f32> = (-127..127).map(|k| (k as f32 + 0.5) / 8.0).collect();
        x.push(127.0 / 8.0);
        let mut seed = 7u64;
        for _ in 0..1000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            x.push(((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 31.0);
        }
        for dt in [DType::F32, DType::BF16, DType::F16] {
            for group in [x.len(), 64, 16, 8] {
                let mut q = vec![0u8; x.len()];
                let mut s = vec![0f32; x.len().div_ceil(group)];
                quantize_row(&x, group, dt, &mut q, &mut s, &mut ErrStats::default()).unwrap();
                for (i, &v) in x.iter().enumerate() {
                    let want = quantize_value(v, s[i / group]) as i32 + 128;
                    assert_eq!(q[i] as i32, want, "{dt:?} group {group} x {v}");
                }
                let amax = x[..group].iter().fold(0f32, |a, v| a.max(v.abs()));
                assert_eq!(s[0], scale_for(amax, dt).unwrap());
            }
        }
    }

    #[test]
    fn check_row_accepts_the_rule_and_names_the_first_departure() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.113)
            .collect();
        for (group, dt) in [(64, DType::BF16), (32, DType::F16), (16, DType::F32)] {
            let mut q = vec![0u8; 64];
            let mut s = vec![0f32; 64 / group];
            quantize_row(&x, group, dt, &mut q, &mut s, &mut ErrStats::default()).unwrap();
            assert_eq!(check_row(&x, &q, &s, group, dt).unwrap(), None);
            let mut q2 = q.clone();
            q2[5] = q2[5].wrapping_add(1);
            assert!(matches!(
                check_row(&x, &q2, &s, group, dt).unwrap(),
                Some(RowMismatch::Value { col: 5, .. })
            ));
            let mut s2 = s.clone();
            s2[0] = f32::from_bits(s2[0].to_bits() + 1);
            assert!(matches!(
                check_row(&x, &q, &s2, group, dt).unwrap(),
                Some(RowMismatch::Scale { group: 0, .. })
            ));
        }
    }
}
