//! Where quantization and casting arithmetic runs: the [`Engine`] interface, the rows it
//! reads ([`RowSource`]), and the CPU engine. The GPU engine (`gpu`) implements the same
//! scheme bit for bit.

use rayon::prelude::*;

use crate::container::mapped::{Mapped, Seg};
use crate::dtype::{bf16_bits, to_f32, DType};
use crate::quant::int8::{self, ErrStats, RowError};

/// A batch of quantized rows.
pub struct QBatch {
    /// `q + 128` per value, row-major.
    pub q: Vec<u8>,
    /// One stored scale per group, row-major.
    pub scales: Vec<f32>,
    pub stats: ErrStats,
}

/// Where the arithmetic runs. Both engines implement the same scheme bit for bit.
pub trait Engine: Sync {
    fn name(&self) -> String;
    /// Quantizes `rows` rows of `cols` values read by `src`. `reuse` is an earlier
    /// batch's buffer, taken for this batch's bytes (see [`recycled`]).
    fn quantize(
        &self,
        src: &RowSource<'_>,
        r0: usize,
        rows: usize,
        group: usize,
        scale_dtype: DType,
        reuse: Vec<u8>,
    ) -> std::result::Result<QBatch, (usize, RowError)>;
    /// Casts rows `r0..r0+rows` to `to`, into `reuse` (as for `quantize`); `Err` is a
    /// device failure.
    fn cast(
        &self,
        src: &RowSource<'_>,
        r0: usize,
        rows: usize,
        to: DType,
        reuse: Vec<u8>,
    ) -> std::result::Result<CastBatch, String>;
}

/// `v` as a buffer of `n` bytes whose contents the caller overwrites. Batches pass their
/// buffers on, so that each batch does not map, zero and unmap fresh pages of its own
/// (with several threads, each unmapping also interrupts the others to flush their TLBs).
pub fn recycled(mut v: Vec<u8>, n: usize) -> Vec<u8> {
    v.resize(n, 0);
    v
}

/// A batch of cast rows.
pub struct CastBatch {
    pub bytes: Vec<u8>,
    /// Finite values that became infinite.
    pub overflow: u64,
    pub stats: ErrStats,
    /// The first non-finite input (row, column), if any.
    pub non_finite: Option<(usize, usize)>,
}

/// The rows of one input tensor over the mapped input.
pub struct RowSource<'a> {
    pub ar: &'a Mapped,
    pub name: String,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    kind: SegSource<'a>,
}

/// Where the rows of a tensor are (implemented by the model view's tensors).
pub trait RowSegs: Sync {
    /// Appends the byte ranges of row `i`, in column order.
    fn row_segs(&self, i: usize, out: &mut Vec<Seg>);
    /// Checks the stored checksums of the bytes the rows are read from.
    fn check(&self, _files: &Mapped) -> crate::Result<()> {
        Ok(())
    }
}

enum SegSource<'a> {
    /// Rows located by their tensor.
    Located(&'a dyn RowSegs),
    /// A contiguous tensor at this offset.
    Plain(u64),
}

impl<'a> RowSource<'a> {
    /// A contiguous `[rows, cols]` tensor of `dtype` at archive offset `offset`.
    pub fn plain(
        ar: &'a Mapped,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        offset: u64,
    ) -> RowSource<'a> {
        RowSource {
            ar,
            name: name.to_string(),
            dtype,
            rows,
            cols,
            kind: SegSource::Plain(offset),
        }
    }

    /// `rows × cols` values of `dtype` located by `segs`.
    pub fn located(
        ar: &'a Mapped,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        segs: &'a dyn RowSegs,
    ) -> RowSource<'a> {
        RowSource {
            ar,
            name: name.to_string(),
            dtype,
            rows,
            cols,
            kind: SegSource::Located(segs),
        }
    }

    /// Checks the stored checksums of what the rows are read from (where the container
    /// stores them).
    pub fn check(&self) -> crate::Result<()> {
        match &self.kind {
            SegSource::Located(t) => t.check(self.ar),
            SegSource::Plain(_) => Ok(()),
        }
    }

    /// Byte ranges of row `i`, in column order.
    pub fn row_segs(&self, i: usize, out: &mut Vec<Seg>) {
        match &self.kind {
            SegSource::Plain(off) => {
                let rb = (self.cols * self.dtype.size()) as u64;
                out.push((off + i as u64 * rb, rb));
            }
            SegSource::Located(t) => t.row_segs(i, out),
        }
    }

    /// Row `i` as f32.
    pub fn row_f32(&self, i: usize, segs: &mut Vec<Seg>, out: &mut [f32]) {
        segs.clear();
        self.row_segs(i, segs);
        let mut at = 0;
        for &(o, n) in segs.iter() {
            let b = self.ar.slice(o, n);
            let k = n as usize / self.dtype.size();
            to_f32(b, self.dtype, &mut out[at..at + k]);
            at += k;
        }
    }

    /// Rows `r0..r0+rows` as stored, contiguous, into `out` (exactly their size).
    pub fn gather(&self, r0: usize, rows: usize, out: &mut [u8]) {
        let mut segs = Vec::new();
        let mut at = 0;
        for i in r0..r0 + rows {
            segs.clear();
            self.row_segs(i, &mut segs);
            for &(o, n) in &segs {
                out[at..at + n as usize].copy_from_slice(self.ar.slice(o, n));
                at += n as usize;
            }
        }
    }

    pub fn segs_of(&self, r0: usize, rows: usize) -> Vec<Seg> {
        let mut segs = Vec::new();
        for i in r0..r0 + rows {
            self.row_segs(i, &mut segs);
        }
        // Merge contiguous ranges.
        let mut merged: Vec<Seg> = Vec::new();
        for s in segs {
            match merged.last_mut() {
                Some(l) if l.0 + l.1 == s.0 => l.1 += s.1,
                _ => merged.push(s),
            }
        }
        merged
    }
}

/// The CPU engine: rayon over rows, each row converted and quantized in one pass.
pub struct CpuEngine;

impl Engine for CpuEngine {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn quantize(
        &self,
        src: &RowSource<'_>,
        r0: usize,
        rows: usize,
        group: usize,
        scale_dtype: DType,
        reuse: Vec<u8>,
    ) -> std::result::Result<QBatch, (usize, RowError)> {
        let cols = src.cols;
        let ng = cols.div_ceil(group);
        let mut q = recycled(reuse, rows * cols);
        let mut scales = vec![0f32; rows * ng];
        let results: Vec<std::result::Result<ErrStats, (usize, RowError)>> = q
            .par_chunks_mut(cols)
            .zip(scales.par_chunks_mut(ng))
            .enumerate()
            .map_init(
                || (vec![0f32; cols], Vec::new()),
                |(buf, segs), (i, (qr, sr))| {
                    src.row_f32(r0 + i, segs, buf);
                    let mut st = ErrStats::default();
                    int8::quantize_row(buf, group, scale_dtype, qr, sr, &mut st)
                        .map(|_| st)
                        .map_err(|e| (r0 + i, e))
                },
            )
            .collect();
        let mut stats = ErrStats::default();
        for r in results {
            stats.merge(&r?);
        }
        Ok(QBatch { q, scales, stats })
    }

    fn cast(
        &self,
        src: &RowSource<'_>,
        r0: usize,
        rows: usize,
        to: DType,
        reuse: Vec<u8>,
    ) -> std::result::Result<CastBatch, String> {
        let cols = src.cols;
        let osz = to.size();
        let mut bytes = recycled(reuse, rows * cols * osz);
        let parts: Vec<(u64, ErrStats, Option<usize>)> = bytes
            .par_chunks_mut(cols * osz)
            .enumerate()
            .map_init(
                || (vec![0f32; cols], Vec::new()),
                |(buf, segs), (i, out)| {
                    src.row_f32(r0 + i, segs, buf);
                    cast_row(buf, to, out)
                },
            )
            .collect();
        let mut batch = CastBatch {
            bytes,
            overflow: 0,
            stats: ErrStats::default(),
            non_finite: None,
        };
        for (i, (o, s, bad)) in parts.into_iter().enumerate() {
            batch.overflow += o;
            batch.stats.merge(&s);
            if batch.non_finite.is_none() {
                batch.non_finite = bad.map(|c| (r0 + i, c));
            }
        }
        Ok(batch)
    }
}

/// Casts one row to `to` (nearest-even) into `out`; returns the overflow count, the
/// errors and the first non-finite column.
fn cast_row(x: &[f32], to: DType, out: &mut [u8]) -> (u64, ErrStats, Option<usize>) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn wide(x: &[f32], to: DType, out: &mut [u8]) -> (u64, ErrStats, Option<usize>) {
            cast_row_body(x, to, out)
        }
        if crate::dtype::simd::avx2() {
            // SAFETY: the CPU has the features.
            return unsafe { wide(x, to, out) };
        }
    }
    cast_row_body(x, to, out)
}

#[inline(always)]
fn cast_row_body(x: &[f32], to: DType, out: &mut [u8]) -> (u64, ErrStats, Option<usize>) {
    use half::slice::HalfFloatSliceExt;
    const C: usize = 256;
    let mut st = ErrStats {
        count: x.len() as u64,
        ..ErrStats::default()
    };
    let any_bad = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff)) >= 0x7f80_0000;
    let bad = if any_bad {
        x.iter().position(|v| !v.is_finite())
    } else {
        None
    };
    let mut over = 0u64;
    let mut emax = 0u32;
    let mut esum = [0f32; 16];
    let mut xsum = [0f32; 16];
    let mut h = [half::f16::ZERO; C];
    let mut hb = [0u16; C];
    let mut back = [0f32; C];
    for (xb, ob) in x.chunks(C).zip(out.chunks_mut(C * to.size())) {
        let k = xb.len();
        match to {
            DType::F16 => {
                if !crate::dtype::f16_round_trip(xb, &mut hb[..k], &mut back[..k]) {
                    h[..k].convert_from_f32_slice(xb);
                    h[..k].convert_to_f32_slice(&mut back[..k]);
                    for (d, v) in hb.iter_mut().zip(&h[..k]) {
                        *d = v.to_bits();
                    }
                }
                for (o, v) in ob.chunks_exact_mut(2).zip(&hb[..k]) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            DType::BF16 => {
                for j in 0..k {
                    hb[j] = bf16_bits(xb[j]);
                    back[j] = f32::from_bits((hb[j] as u32) << 16);
                }
                for (o, v) in ob.chunks_exact_mut(2).zip(&hb[..k]) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            _ => {
                back[..k].copy_from_slice(xb);
                for (o, v) in ob.chunks_exact_mut(4).zip(xb) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
        let mut em = [0u32; 16];
        let mut ov = [0u32; 16];
        let full = k / 16 * 16;
        for (xc, bc) in xb[..full]
            .chunks_exact(16)
            .zip(back[..full].chunks_exact(16))
        {
            let xc: &[f32; 16] = xc.try_into().expect("chunk");
            let bc: &[f32; 16] = bc.try_into().expect("chunk");
            for j in 0..16 {
                let (v, b) = (xc[j], bc[j]);
                let fin_in = (v.to_bits() & 0x7fff_ffff) < 0x7f80_0000;
                let fin_out = (b.to_bits() & 0x7fff_ffff) < 0x7f80_0000;
                ov[j] += (fin_in & !fin_out) as u32;
                let d = if fin_in & fin_out { b - v } else { 0.0 };
                em[j] = em[j].max(d.to_bits() & 0x7fff_ffff);
                esum[j] += d * d;
                xsum[j] += if fin_in { v * v } else { 0.0 };
            }
        }
        for (v, b) in xb[full..].iter().zip(&back[full..k]) {
            let fin_in = v.is_finite();
            let fin_out = b.is_finite();
            over += (fin_in && !fin_out) as u64;
            let d = if fin_in && fin_out { b - v } else { 0.0 };
            em[0] = em[0].max(d.to_bits() & 0x7fff_ffff);
            esum[0] += d * d;
            xsum[0] += if fin_in { v * v } else { 0.0 };
        }
        over += ov.iter().map(|v| *v as u64).sum::<u64>();
        emax = emax.max(em.iter().copied().max().unwrap_or(0));
    }
    st.max_abs = f32::from_bits(emax) as f64;
    st.sum_sq_err = esum.iter().map(|v| *v as f64).sum();
    st.sum_sq = xsum.iter().map(|v| *v as f64).sum();
    (over, st, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns() -> Vec<f32> {
        let mut v: Vec<f32> = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            65504.0,
            65520.0,
            6.0e-8,
            2.9e-8,
        ]
        .to_vec();
        let mut seed = 0x1234_5678_9abc_def0u64;
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.push(f32::from_bits(seed as u32));
        }
        // Exact ties for bf16 and f16 rounding.
        for m in 0..4096u32 {
            v.push(f32::from_bits(0x3f80_8000 | (m << 16)));
            v.push(f32::from_bits(0x3f80_1000 | (m << 13)));
        }
        v
    }

    #[test]
    fn bf16_bits_is_the_half_crate_rounding() {
        for x in patterns() {
            assert_eq!(
                bf16_bits(x),
                half::bf16::from_f32(x).to_bits(),
                "{x:e} {:#x}",
                x.to_bits()
            );
        }
    }

    #[test]
    fn casts_are_the_half_crate_rounding() {
        let xs: Vec<f32> = patterns().into_iter().filter(|v| !v.is_nan()).collect();
        for chunk in xs.chunks(1000) {
            for to in [DType::F16, DType::BF16] {
                let mut out = vec![0u8; chunk.len() * 2];
                let (over, _, bad) = cast_row(chunk, to, &mut out);
                for (i, &x) in chunk.iter().enumerate() {
                    let want = match to {
                        DType::F16 => half::f16::from_f32(x).to_bits(),
                        _ => half::bf16::from_f32(x).to_bits(),
                    };
                    let got = u16::from_le_bytes([out[2 * i], out[2 * i + 1]]);
                    assert_eq!(got, want, "{to:?} {x:e}");
                }
                let want_over = chunk
                    .iter()
                    .filter(|x| {
                        x.is_finite()
                            && match to {
                                DType::F16 => half::f16::from_f32(**x).is_infinite(),
                                _ => half::bf16::from_f32(**x).is_infinite(),
                            }
                    })
                    .count() as u64;
                assert_eq!(over, want_over);
                assert_eq!(bad, chunk.iter().position(|x| !x.is_finite()));
            }
        }
    }
}
