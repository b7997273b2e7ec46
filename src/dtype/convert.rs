//! The one conversion between the float storage types: stored bytes to f32, and f32 to
//! bf16/f16 with nearest-even rounding and overflow counted. Every command, the runtime and
//! the quantizer use these.

use super::DType;

/// Converts little-endian elements of `from` in `src` to `to`, appending to `out`.
/// Returns how many finite values overflowed to ±inf (casting to fp16 narrows the range).
pub fn convert(src: &[u8], from: DType, to: DType, out: &mut Vec<u8>) -> Result<u64, String> {
    use half::{bf16, f16};
    if from == to {
        out.extend_from_slice(src);
        return Ok(0);
    }
    if !from.is_float() {
        return Err(format!("cannot convert from {from}"));
    }
    let n = src.len() / from.size();
    let mut vals = vec![0f32; n];
    to_f32(src, from, &mut vals);
    let mut overflow = 0u64;
    out.reserve(n * to.size());
    match to {
        DType::F32 => vals
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => {
            for &v in &vals {
                let h = f16::from_f32(v);
                if h.is_infinite() && v.is_finite() {
                    overflow += 1;
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        DType::BF16 => {
            for &v in &vals {
                let h = bf16::from_f32(v);
                if h.is_infinite() && v.is_finite() {
                    overflow += 1;
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        d => return Err(format!("cannot convert to {d}")),
    }
    Ok(overflow)
}

/// The first element of `candidate` (stored as `to`) that is not `reference` (stored as
/// `from`) converted by the one rule: the same bits for the same dtype, an exact cast when
/// widening, the nearest-even rounding when narrowing. `None` when every element matches.
pub fn cast_mismatch(
    reference: &[u8],
    from: DType,
    candidate: &[u8],
    to: DType,
) -> Result<Option<usize>, String> {
    let n = reference.len() / from.size();
    if candidate.len() != n * to.size() {
        return Err(format!(
            "{} bytes of {to} cannot hold {n} values",
            candidate.len()
        ));
    }
    const CHUNK: usize = 1 << 16;
    let mut want = Vec::with_capacity(CHUNK * to.size());
    for c in 0..n.div_ceil(CHUNK) {
        let (a, b) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
        want.clear();
        convert(
            &reference[a * from.size()..b * from.size()],
            from,
            to,
            &mut want,
        )?;
        let got = &candidate[a * to.size()..b * to.size()];
        if let Some(i) = got
            .chunks_exact(to.size())
            .zip(want.chunks_exact(to.size()))
            .position(|(g, w)| g != w)
        {
            return Ok(Some(a + i));
        }
    }
    Ok(None)
}

/// Converts stored values to f32.
pub fn to_f32(b: &[u8], dt: DType, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn wide(b: &[u8], dt: DType, out: &mut [f32]) {
            to_f32_body(b, dt, out)
        }
        if super::simd::avx2() {
            // SAFETY: the CPU has the features.
            return unsafe { wide(b, dt, out) };
        }
    }
    to_f32_body(b, dt, out)
}

#[inline(always)]
fn to_f32_body(b: &[u8], dt: DType, out: &mut [f32]) {
    match dt {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        _ => unreachable!("float dtypes only"),
    }
}

/// One f32 value cast to `to` (nearest-even), as little-endian bytes appended to `out`;
/// returns whether a finite value overflowed.
#[inline]
pub fn cast_value(v: f32, to: DType, out: &mut Vec<u8>) -> (f32, bool) {
    match to {
        DType::BF16 => {
            let h = half::bf16::from_f32(v);
            out.extend_from_slice(&h.to_bits().to_le_bytes());
            (h.to_f32(), v.is_finite() && h.is_infinite())
        }
        DType::F16 => {
            let h = half::f16::from_f32(v);
            out.extend_from_slice(&h.to_bits().to_le_bytes());
            (h.to_f32(), v.is_finite() && h.is_infinite())
        }
        _ => {
            out.extend_from_slice(&v.to_le_bytes());
            (v, false)
        }
    }
}

/// `half::bf16::from_f32`'s bits (nearest-even, NaN kept quiet), written without branches
/// so that a loop of it vectorizes.
#[inline(always)]
pub fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let nan = (x & 0x7fff_ffff) > 0x7f80_0000;
    let up = ((x & 0x8000) != 0) & ((x & 0x17fff) != 0);
    let r = ((x >> 16) as u16).wrapping_add(up as u16);
    if nan {
        ((x >> 16) | 0x40) as u16
    } else {
        r
    }
}

/// f32 to f16 (nearest-even) and back with F16C, 8 at a time; false when the CPU lacks it.
pub fn f16_round_trip(x: &[f32], h: &mut [u16], back: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn go(x: &[f32], h: &mut [u16], back: &mut [f32]) {
            use std::arch::x86_64::*;
            let n = x.len().min(h.len()).min(back.len());
            let mut i = 0;
            while i + 8 <= n {
                // SAFETY: i + 8 <= n for all three slices.
                let v = _mm256_loadu_ps(x.as_ptr().add(i));
                let p = _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(v);
                _mm_storeu_si128(h.as_mut_ptr().add(i) as *mut __m128i, p);
                _mm256_storeu_ps(back.as_mut_ptr().add(i), _mm256_cvtph_ps(p));
                i += 8;
            }
            for j in i..n {
                let v = half::f16::from_f32(x[j]);
                h[j] = v.to_bits();
                back[j] = v.to_f32();
            }
        }
        if super::simd::avx2() {
            // SAFETY: the CPU has AVX2 and F16C.
            unsafe { go(x, h, back) };
            return true;
        }
    }
    let _ = (x, h, back);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_f32(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn cast_mismatch_is_the_one_rounding_rule() {
        let x = [1.0f32, 1.0 + 1.0 / 256.0, -3.3e38, 0.1, 65520.0];
        let src = bytes_f32(&x);
        for to in [DType::F32, DType::BF16, DType::F16] {
            let mut out = Vec::new();
            convert(&src, DType::F32, to, &mut out).unwrap();
            assert_eq!(cast_mismatch(&src, DType::F32, &out, to), Ok(None));
            let k = to.size();
            out[3 * k] ^= 1;
            assert_eq!(cast_mismatch(&src, DType::F32, &out, to), Ok(Some(3)));
        }
        // Widening is exact, and truncating instead of rounding is caught.
        let bf: Vec<u8> = x
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let mut wide = Vec::new();
        convert(&bf, DType::BF16, DType::F32, &mut wide).unwrap();
        assert_eq!(cast_mismatch(&bf, DType::BF16, &wide, DType::F32), Ok(None));
        let truncated: Vec<u8> = x
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        // 1 + 2^-8 is a tie that rounds to even (as truncation gives); 0.1 rounds up.
        assert_eq!(
            cast_mismatch(&src, DType::F32, &truncated, DType::BF16),
            Ok(Some(3))
        );
        assert!(cast_mismatch(&src, DType::F32, &truncated[..4], DType::BF16).is_err());
    }
}
