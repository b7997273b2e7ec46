//! Producing a tensor's bytes from pieces of a logical tensor, one batch of rows at a
//! time, cast on the way when asked. Shared by every sink.

use rayon::prelude::*;

use crate::arch::tp::{Logical, Seg, Slice};
use crate::container::mapped::Mapped;
use crate::dtype::{self, DType};
use crate::io::progress::Progress;
use crate::io::sink::Sink;

/// The rule every narrowing cast of every command follows: values that overflow the
/// output dtype to ±inf are refused, naming the tensor and how many, unless the user
/// passed `--allow-overflow`.
pub fn check_overflow(
    file: &str,
    tensor: &str,
    count: u64,
    to: DType,
    allow: bool,
) -> crate::Result<()> {
    if count > 0 && !allow {
        return Err(crate::Error::Tensor {
            member: file.to_string(),
            tensor: tensor.to_string(),
            msg: format!(
                "{count} values overflow {to} (pass --allow-overflow to write them as ±inf)"
            ),
        });
    }
    Ok(())
}

/// Output shape of `pieces` of `l`.
pub fn shape_of(l: &Logical, pieces: &[Slice]) -> Vec<u64> {
    if l.shape.len() == 1 {
        return l.shape.clone();
    }
    let mut rows = 0;
    let mut cols = l.shape[1];
    for p in pieces {
        match p {
            Slice::Rows(a, b) => rows += b - a,
            Slice::ZeroRows(n) => rows += n,
            Slice::Cols(c0, c1) => {
                rows = l.shape[0];
                cols = c1 - c0;
            }
            Slice::Raw(_) | Slice::Values(_) => {}
        }
    }
    vec![rows, cols]
}

/// Writes `pieces` of a tensor whose source dtype is `from` as `to`; returns how many values
/// overflowed. `l` is needed for every piece but `Raw`.
pub fn write_pieces(
    archive: &Mapped,
    l: Option<&Logical>,
    from: DType,
    pieces: &[Slice],
    to: DType,
    w: &mut dyn Sink,
    bar: &Progress,
) -> std::io::Result<u64> {
    let mut overflow = 0;
    let mut segs: Vec<Seg> = Vec::new();
    let mut emit = |segs: &[Seg], w: &mut dyn Sink| -> std::io::Result<()> {
        // Large ranges are mapped in one call instead of a page fault per 64 KiB.
        for &(o, n) in segs.iter().filter(|s| s.1 >= 256 << 10) {
            archive.populate(o, n);
        }
        if to == from {
            for &(o, n) in segs {
                // Large contiguous ranges are copied by the kernel, as `cp` does.
                let copied = match archive.file_at(o) {
                    Some((f, fo)) if n >= 1 << 20 => w.copy_from(f, fo, n)?,
                    _ => false,
                };
                if !copied {
                    w.write_all(archive.slice(o, n))?;
                }
                bar.inc(n);
            }
            return Ok(());
        }
        let parts: Vec<Result<(Vec<u8>, u64), String>> = segs
            .par_iter()
            .map(|&(o, n)| {
                let mut v = Vec::new();
                let c = dtype::convert(archive.slice(o, n), from, to, &mut v)?;
                Ok((v, c))
            })
            .collect();
        for p in parts {
            let (v, c) = p.map_err(std::io::Error::other)?;
            overflow += c;
            bar.inc(v.len() as u64);
            w.write_all(&v)?;
        }
        Ok(())
    };
    for p in pieces {
        match (p, l) {
            (Slice::Raw(seg), _) => emit(std::slice::from_ref(seg), w)?,
            (Slice::Values(v), _) => {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                let mut out = Vec::new();
                // Frequencies are below 1: no cast of them overflows.
                dtype::convert(&bytes, DType::F32, to, &mut out).map_err(std::io::Error::other)?;
                w.write_all(&out)?;
                bar.inc(out.len() as u64);
            }
            (Slice::Rows(a, b), Some(l)) => {
                // Batches of about 8 MiB of source rows.
                let batch = (8u64 << 20).div_ceil(l.row_bytes()).max(1);
                let mut r = *a;
                while r < *b {
                    let stop = (r + batch).min(*b);
                    segs.clear();
                    for i in r..stop {
                        l.row_segments(i, &mut segs);
                    }
                    emit(&segs, w)?;
                    r = stop;
                }
            }
            (Slice::ZeroRows(n), Some(l)) => {
                let bytes = n * l.row_bytes() / from.size() as u64 * to.size() as u64;
                let zeros = vec![0u8; bytes.min(8 << 20) as usize];
                let mut left = bytes;
                while left > 0 {
                    let k = left.min(zeros.len() as u64) as usize;
                    w.write_all(&zeros[..k])?;
                    bar.inc(k as u64);
                    left -= k as u64;
                }
            }
            (Slice::Cols(c0, c1), Some(l)) => {
                let esz = from.size() as u64;
                let (lo, hi) = (c0 * esz, c1 * esz);
                let mut row = Vec::new();
                let batch = (8u64 << 20).div_ceil(hi - lo).max(1);
                let mut r = 0;
                while r < l.rows() {
                    let stop = (r + batch).min(l.rows());
                    segs.clear();
                    for i in r..stop {
                        row.clear();
                        l.row_segments(i, &mut row);
                        sub_range(&row, lo, hi, &mut segs);
                    }
                    emit(&segs, w)?;
                    r = stop;
                }
            }
            (_, None) => return Err(std::io::Error::other("a piece without its tensor")),
        }
    }
    match l {
        Some(l) => l
            .source_ranges()
            .into_iter()
            .for_each(|(o, n)| archive.release(o, n)),
        None => pieces.iter().for_each(|p| {
            if let Slice::Raw((o, n)) = p {
                archive.release(*o, *n)
            }
        }),
    }
    Ok(overflow)
}

/// Appends the byte range `lo..hi` of the concatenation of `row` to `out`.
fn sub_range(row: &[Seg], lo: u64, hi: u64, out: &mut Vec<Seg>) {
    let mut pos = 0;
    for &(o, n) in row {
        let (s, e) = (pos.max(lo), (pos + n).min(hi));
        if s < e {
            let off = o + (s - pos);
            match out.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += e - s,
                _ => out.push((off, e - s)),
            }
        }
        pos += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_ranges_of_a_row() {
        let row = [(100, 10), (200, 10), (300, 10)];
        let mut out = Vec::new();
        sub_range(&row, 5, 25, &mut out);
        assert_eq!(out, vec![(105, 5), (200, 10), (300, 5)]);
        out.clear();
        sub_range(&row, 10, 20, &mut out);
        assert_eq!(out, vec![(200, 10)]);
    }
}
