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

use crate::tensor::DType;

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
}

impl ErrStats {
    pub fn merge(&mut self, o: &ErrStats) {
        self.max_abs = self.max_abs.max(o.max_abs);
        self.sum_sq_err += o.sum_sq_err;
        self.sum_sq += o.sum_sq;
        self.count += o.count;
    }

    /// `sqrt(Σ err² / Σ x²)`.
    pub fn rel_rms(&self) -> f64 {
        if self.sum_sq == 0.0 {
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
        if self.sum_sq_err == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (self.sum_sq / self.sum_sq_err).log10()
        }
    }
}

/// Why a row could not be quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum RowError {
    NonFinite { col: usize, value: f32 },
    ScaleOverflow { amax: f32 },
}

#[inline(always)]
fn quantize_row_generic(
    x: &[f32],
    group: usize,
    dt: DType,
    q: &mut [u8],
    scales: &mut [f32],
    stats: &mut ErrStats,
) -> Result<(), RowError> {
    for (g, (xs, qs)) in x.chunks(group).zip(q.chunks_mut(group)).enumerate() {
        let mut amax = 0f32;
        let mut finite = true;
        for &v in xs {
            finite &= v.is_finite();
            amax = amax.max(v.abs());
        }
        if !finite {
            let (col, value) = xs
                .iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite())
                .map(|(i, v)| (g * group + i, *v))
                .expect("one is not finite");
            return Err(RowError::NonFinite { col, value });
        }
        let s = scale_for(amax, dt).ok_or(RowError::ScaleOverflow { amax })?;
        scales[g] = s;
        let (mut mx, mut se, mut sx) = (0f32, 0f64, 0f64);
        if s == 0.0 {
            qs.fill(128);
        } else {
            for (o, &v) in qs.iter_mut().zip(xs) {
                let qi = (v / s).round_ties_even().clamp(-127.0, 127.0);
                *o = (qi as i32 + 128) as u8;
            }
        }
        // Error against the dequantized value, in f64 per group.
        let mut acc_e = 0f32;
        let mut acc_x = 0f32;
        for (o, &v) in qs.iter().zip(xs) {
            let d = ((*o as i32 - 128) as f32) * s - v;
            mx = mx.max(d.abs());
            acc_e += d * d;
            acc_x += v * v;
        }
        se += acc_e as f64;
        sx += acc_x as f64;
        stats.max_abs = stats.max_abs.max(mx as f64);
        stats.sum_sq_err += se;
        stats.sum_sq += sx;
        stats.count += xs.len() as u64;
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_avx2(
    x: &[f32],
    group: usize,
    dt: DType,
    q: &mut [u8],
    scales: &mut [f32],
    stats: &mut ErrStats,
) -> Result<(), RowError> {
    quantize_row_generic(x, group, dt, q, scales, stats)
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
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { quantize_row_avx2(x, group, dt, q, scales, stats) };
    }
    quantize_row_generic(x, group, dt, q, scales, stats)
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
}
