//! `quantize`: int8 weight-only (compressed-tensors `pack-quantized`) or fp16/bf16 casts,
//! from a `.nemo` (merging on the way, one pass), a per-rank folder or a Hugging Face
//! folder, into a Hugging Face folder, streaming a batch of rows at a time from the mapped
//! input through the CPU or GPU engine.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::pipeline::to_hf;
use crate::error::{Error, Result};
use crate::hf::config as hf;
use crate::container::safetensors_write::{self, FileSink, TensorSpec};
use crate::arch::tp::{self, Logical, Seg};
use crate::container::mapped::{Archive, OpenOptions};
use crate::nemo::checkpoint::Checkpoint;
use crate::io::output::{self, AtomicDir};
use crate::io::progress::Progress;
use crate::quant::compressed;
use crate::quant::int8::{self, ErrStats, RowError};
use crate::dtype::{DType, TensorRef};

/// What to produce.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scheme {
    /// int8 weight-only; `group` columns per scale, `None` per output channel.
    Int8 { group: Option<usize> },
    /// Every float tensor cast to this dtype.
    Cast(DType),
}

/// Linear layers that may be quantized (HF module names).
pub const LINEARS: [&str; 8] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
];

/// Options of a run.
pub struct QuantizeOptions<'e> {
    pub scheme: Scheme,
    /// Module names kept in float (`embed`, `lm_head`, `q_proj`, …).
    pub keep: Vec<String>,
    pub force: bool,
    pub progress: bool,
    pub max_shard_bytes: u64,
    pub allow_overflow: bool,
    pub engine: &'e dyn Engine,
    pub open: OpenOptions,
}

/// One output tensor's report.
#[derive(Debug, Clone)]
pub struct TensorReport {
    pub name: String,
    pub shape: Vec<u64>,
    pub source_dtype: DType,
    /// `int8/channel`, `int8/group128`, `bf16`, `copy`, …
    pub written_as: String,
    pub stats: ErrStats,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Report {
    pub files: Vec<String>,
    pub tensors: Vec<TensorReport>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub seconds: f64,
    pub engine: String,
}

impl Report {
    pub fn to_json(&self, out: &Path) -> Value {
        let num = |v: f64| {
            if v.is_finite() {
                json!(v)
            } else if v.is_nan() {
                json!(null)
            } else if v > 0.0 {
                json!("inf")
            } else {
                json!("-inf")
            }
        };
        json!({
            "schema_version": 1,
            "command": "quantize",
            "output": out.display().to_string(),
            "engine": self.engine,
            "tensor_count": self.tensors.len(),
            "files": self.files,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": self.seconds,
            "input_gb_per_s": self.bytes_in as f64 / self.seconds.max(1e-9) / 1e9,
            "peak_rss_bytes": output::peak_rss(),
            "tensors": self.tensors.iter().map(|t| json!({
                "name": t.name,
                "shape": t.shape,
                "source_dtype": t.source_dtype.short_name(),
                "written_as": t.written_as,
                "max_abs_error": num(t.stats.max_abs),
                "rel_rms_error": num(t.stats.rel_rms()),
                "snr_db": num(t.stats.snr_db()),
                "overflowed_values": t.stats.overflow,
            })).collect::<Vec<_>>(),
        })
    }
}

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
    /// Quantizes `rows` rows of `cols` values read by `src`.
    fn quantize(
        &self,
        src: &RowSource<'_>,
        r0: usize,
        rows: usize,
        group: usize,
        scale_dtype: DType,
    ) -> std::result::Result<QBatch, (usize, RowError)>;
    /// Casts rows `r0..r0+rows` to `to`.
    /// Casts rows `r0..r0+rows` to `to`; `Err` is a device failure.
    fn cast(
        &self,
        src: &RowSource<'_>,
        r0: usize,
        rows: usize,
        to: DType,
    ) -> std::result::Result<CastBatch, String>;
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
    pub ar: &'a Archive,
    pub name: String,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    kind: Rows<'a>,
}

enum Rows<'a> {
    /// HF row ranges of a logical (merged) tensor.
    Logical(&'a Logical<'a>, Vec<(u64, u64)>),
    /// A contiguous tensor at this offset.
    Plain(u64),
}

impl<'a> RowSource<'a> {
    /// A contiguous `[rows, cols]` tensor of `dtype` at archive offset `offset`.
    pub fn plain(
        ar: &'a Archive,
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
            kind: Rows::Plain(offset),
        }
    }

    /// Byte ranges of row `i`, in column order.
    pub fn row_segs(&self, i: usize, out: &mut Vec<Seg>) {
        match &self.kind {
            Rows::Plain(off) => {
                let rb = (self.cols * self.dtype.size()) as u64;
                out.push((off + i as u64 * rb, rb));
            }
            Rows::Logical(l, ranges) => {
                let mut i = i as u64;
                for &(a, b) in ranges {
                    if i < b - a {
                        l.row_segments(a + i, out);
                        return;
                    }
                    i -= b - a;
                }
                unreachable!("row within the tensor");
            }
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

    fn segs_of(&self, r0: usize, rows: usize) -> Vec<Seg> {
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

/// Converts stored values to f32.
pub fn to_f32(b: &[u8], dt: DType, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn wide(b: &[u8], dt: DType, out: &mut [f32]) {
            to_f32_body(b, dt, out)
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
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
    ) -> std::result::Result<QBatch, (usize, RowError)> {
        let cols = src.cols;
        let ng = cols.div_ceil(group);
        let mut q = vec![0u8; rows * cols];
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
    ) -> std::result::Result<CastBatch, String> {
        let cols = src.cols;
        let osz = to.size();
        let mut bytes = vec![0u8; rows * cols * osz];
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
fn f16_simd(x: &[f32], h: &mut [u16], back: &mut [f32]) -> bool {
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
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has AVX2 and F16C.
            unsafe { go(x, h, back) };
            return true;
        }
    }
    let _ = (x, h, back);
    false
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
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
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
                if !f16_simd(xb, &mut hb[..k], &mut back[..k]) {
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

/// What to do with one input tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Job {
    Copy,
    Cast(DType),
    Int8 { group: usize },
}

/// Runs a quantization from `input` into `out`.
pub fn quantize(input: &Path, out: &Path, opts: &QuantizeOptions) -> Result<Report> {
    check_keep(&opts.keep)?;
    if input.is_dir() && input.join("config.json").is_file() {
        let ar = Archive::open(input, &opts.open)?;
        return from_hf(&ar, out, opts);
    }
    let ck = Checkpoint::open(input, &opts.open)?;
    from_nemo(&ck, out, opts)
}

fn check_keep(keep: &[String]) -> Result<()> {
    for k in keep {
        if k != "embed" && !LINEARS.contains(&k.as_str()) {
            return Err(Error::Usage(format!(
                "--keep `{k}` is not one of embed, {}",
                LINEARS.join(", ")
            )));
        }
    }
    Ok(())
}

/// Module name (`q_proj`, `lm_head`, …) of a weight name.
fn module_of(name: &str) -> Option<&str> {
    let base = name.strip_suffix(".weight")?;
    Some(base.rsplit('.').next().unwrap_or(base))
}

fn job_for(name: &str, shape: &[u64], dtype: DType, opts: &QuantizeOptions) -> Job {
    match opts.scheme {
        Scheme::Cast(to) if to == dtype => Job::Copy,
        Scheme::Cast(to) => Job::Cast(to),
        Scheme::Int8 { group } => {
            let m = module_of(name);
            let linear = shape.len() == 2
                && m.is_some_and(|m| LINEARS.contains(&m) && !opts.keep.iter().any(|k| k == m));
            if linear {
                Job::Int8 {
                    group: group.unwrap_or(shape[1] as usize),
                }
            } else {
                Job::Copy
            }
        }
    }
}

fn from_nemo(ck: &Checkpoint, out: &Path, opts: &QuantizeOptions) -> Result<Report> {
    let tok = ck.tokenizer()?;
    let sp = &tok.model;
    let vocab = sp.vocab_size() as u64;
    let logicals = tp::logical_tensors(ck)?;
    tp::check_vocab(ck, &logicals, vocab)?;
    let plan = hf::plan(&logicals, &ck.config, vocab);
    let mut sources = Vec::new();
    for t in &plan {
        let l = &logicals[&t.key];
        let (rows, cols) = if t.shape.len() == 1 {
            (1, t.shape[0] as usize)
        } else {
            (t.shape[0] as usize, t.shape[1] as usize)
        };
        sources.push(RowSource {
            ar: &ck.archive,
            name: t.name.clone(),
            dtype: l.dtype,
            rows,
            cols,
            kind: Rows::Logical(l, t.rows.clone()),
        });
    }
    let float_dtype = plan
        .first()
        .map(|t| logicals[&t.key].dtype)
        .unwrap_or(DType::F32);
    let file = ck.archive.display().to_string();
    run(
        &sources,
        &plan_shapes(&plan),
        &file,
        out,
        opts,
        |dir, dtype, qc| {
            let mut cfg = hf::config_json(&ck.config, sp, dtype.unwrap_or(float_dtype));
            if let Some(q) = qc {
                cfg["quantization_config"] = q;
            }
            to_hf::write_side_files(dir, ck, cfg)
        },
    )
}

fn plan_shapes(plan: &[hf::HfTensor]) -> Vec<Vec<u64>> {
    plan.iter().map(|t| t.shape.clone()).collect()
}

fn from_hf(ar: &Archive, out: &Path, opts: &QuantizeOptions) -> Result<Report> {
    let file = ar.display().to_string();
    let cfg_member = ar.member("config.json").expect("checked");
    let mut cfg: Value =
        serde_json::from_slice(ar.data(cfg_member)).map_err(|e| Error::Config {
            file: format!("{file}/config.json"),
            msg: format!("not JSON: {e}"),
        })?;
    if !cfg["quantization_config"].is_null() {
        return Err(Error::Usage(format!(
            "{file}: already quantized (config.json has a quantization_config)"
        )));
    }
    let mut sources = Vec::new();
    let mut shapes = Vec::new();
    let mut names: Vec<String> = ar
        .file_names()
        .filter(|n| n.ends_with(".safetensors") && !n.contains('/'))
        .map(str::to_string)
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(Error::Layout {
            file,
            msg: "no .safetensors files in the folder".into(),
        });
    }
    let mut all: Vec<(String, TensorRef, String)> = Vec::new();
    for n in &names {
        let m = ar.member(n).expect("listed");
        let sd = crate::container::safetensors::read_state_dict(ar.data(m), m.offset, n)
            .map_err(|e| e.in_file(&file))?;
        for (name, t) in sd.tensors() {
            all.push((name.to_string(), t.clone(), n.clone()));
        }
    }
    // Written in a stable order: the files' order, then offsets.
    all.sort_by_key(|(_, t, _)| t.offset);
    for (name, t, member) in &all {
        if name.ends_with(".weight_packed") || name.ends_with(".weight_scale") {
            return Err(Error::Usage(format!(
                "{file}/{member}: tensor `{name}`: already quantized"
            )));
        }
        if !matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::Tensor {
                member: format!("{file}/{member}"),
                tensor: name.clone(),
                msg: format!("stored as {}, not a float dtype", t.dtype),
            });
        }
        if !t.is_contiguous() || t.shape.len() > 2 {
            return Err(Error::Tensor {
                member: format!("{file}/{member}"),
                tensor: name.clone(),
                msg: "not a contiguous vector or matrix".into(),
            });
        }
        let (rows, cols) = match t.shape.len() {
            0 => (1, 1),
            1 => (1, t.shape[0] as usize),
            _ => (t.shape[0] as usize, t.shape[1] as usize),
        };
        sources.push(RowSource {
            ar,
            name: name.clone(),
            dtype: t.dtype,
            rows,
            cols,
            kind: Rows::Plain(t.offset),
        });
        shapes.push(t.shape.clone());
    }
    let side: Vec<String> = ar
        .file_names()
        .filter(|n| {
            !n.contains('/')
                && !n.ends_with(".safetensors")
                && *n != "model.safetensors.index.json"
                && *n != "config.json"
        })
        .map(str::to_string)
        .collect();
    run(&sources, &shapes, &file, out, opts, |dir, dtype, qc| {
        if let Some(d) = dtype {
            cfg["torch_dtype"] = json!(hf::torch_dtype_name(d));
        }
        if let Some(q) = qc {
            cfg["quantization_config"] = q;
        }
        to_hf::write_json(dir, "config.json", &cfg)?;
        let mut files = vec!["config.json".to_string()];
        for n in &side {
            let p = dir.join(n);
            std::fs::write(&p, ar.data(ar.member(n).expect("listed")))
                .map_err(|e| Error::io(&p, e))?;
            files.push(n.clone());
        }
        Ok(files)
    })
}

/// An output tensor: which source, which part.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Out {
    /// The source as copied, cast or packed.
    Main(usize),
    Scale(usize),
    Shape(usize),
}

fn run(
    sources: &[RowSource<'_>],
    shapes: &[Vec<u64>],
    file: &str,
    out: &Path,
    opts: &QuantizeOptions,
    mut side: impl FnMut(&Path, Option<DType>, Option<Value>) -> Result<Vec<String>>,
) -> Result<Report> {
    let start = Instant::now();
    let jobs: Vec<Job> = sources
        .iter()
        .zip(shapes)
        .map(|(s, sh)| job_for(&s.name, sh, s.dtype, opts))
        .collect();
    // Check everything that can be checked before writing.
    let mut ignore = Vec::new();
    for ((s, sh), j) in sources.iter().zip(shapes).zip(&jobs) {
        match j {
            Job::Int8 { group } => {
                if s.cols % 4 != 0 {
                    return Err(Error::Tensor {
                        member: file.to_string(),
                        tensor: s.name.clone(),
                        msg: format!(
                            "input dimension {} is not a multiple of 4 (pack-quantized packs four int8 per int32)",
                            s.cols
                        ),
                    });
                }
                if s.cols % group != 0 {
                    return Err(Error::Usage(format!(
                        "{file}: tensor `{}`: --group-size {group} does not divide its input dimension {}",
                        s.name, s.cols
                    )));
                }
            }
            Job::Copy
                if matches!(opts.scheme, Scheme::Int8 { .. })
                    && sh.len() == 2
                    && module_of(&s.name).is_some_and(|m| LINEARS.contains(&m)) =>
            {
                let m = s.name.strip_suffix(".weight").unwrap_or(&s.name);
                ignore.push(m.to_string());
            }
            _ => {}
        }
    }
    // Output tensors.
    let mut outs: Vec<(TensorSpec, Out)> = Vec::new();
    for (i, ((s, sh), j)) in sources.iter().zip(shapes).zip(&jobs).enumerate() {
        match *j {
            Job::Copy => outs.push((
                TensorSpec {
                    name: s.name.clone(),
                    dtype: s.dtype,
                    shape: sh.clone(),
                },
                Out::Main(i),
            )),
            Job::Cast(to) => outs.push((
                TensorSpec {
                    name: s.name.clone(),
                    dtype: to,
                    shape: sh.clone(),
                },
                Out::Main(i),
            )),
            Job::Int8 { group } => {
                let base = s.name.strip_suffix(".weight").expect("linear weight");
                outs.push((
                    TensorSpec {
                        name: format!("{base}.weight_packed"),
                        dtype: DType::I32,
                        shape: vec![s.rows as u64, (s.cols / 4) as u64],
                    },
                    Out::Main(i),
                ));
                outs.push((
                    TensorSpec {
                        name: format!("{base}.weight_scale"),
                        dtype: s.dtype,
                        shape: vec![s.rows as u64, (s.cols / group) as u64],
                    },
                    Out::Scale(i),
                ));
                outs.push((
                    TensorSpec {
                        name: format!("{base}.weight_shape"),
                        dtype: DType::I64,
                        shape: vec![2],
                    },
                    Out::Shape(i),
                ));
            }
        }
    }
    let specs: Vec<TensorSpec> = outs.iter().map(|o| o.0.clone()).collect();
    let dir = AtomicDir::create(out, opts.force)?;
    let shards = safetensors_write::plan_shards(&specs, opts.max_shard_bytes);
    let names = safetensors_write::shard_names(shards.len());
    let bytes_in: u64 = sources
        .iter()
        .map(|s| (s.rows * s.cols * s.dtype.size()) as u64)
        .sum();
    let bytes_out: u64 = specs.iter().map(TensorSpec::nbytes).sum();
    let bar = Progress::bytes(bytes_in, "quantizing", opts.progress);
    let mut pending: HashMap<usize, Vec<f32>> = HashMap::new();
    let mut reports: Vec<TensorReport> = Vec::new();
    for (shard, name) in shards.iter().zip(&names) {
        let (path, mut w) = safetensors_write::create_shard(dir.path(), name, &specs, shard)?;
        for &oi in shard {
            output::check_interrupted()?;
            let before = w.written;
            match outs[oi].1 {
                Out::Main(si) => {
                    let s = &sources[si];
                    let st = write_main(s, jobs[si], opts, &mut w, &bar, &mut pending, si, file)
                        .map_err(|e| match e {
                            WriteError::Io(e) => Error::io(&path, e),
                            WriteError::Other(e) => e,
                        })?;
                    let written_as = match jobs[si] {
                        Job::Copy => "copy".to_string(),
                        Job::Cast(d) => d.short_name().to_string(),
                        Job::Int8 { group } if group == s.cols => "int8/channel".to_string(),
                        Job::Int8 { group } => format!("int8/group{group}"),
                    };
                    reports.push(TensorReport {
                        name: s.name.clone(),
                        shape: shapes[si].clone(),
                        source_dtype: s.dtype,
                        written_as,
                        stats: st,
                    });
                }
                Out::Scale(si) => {
                    let sc = pending.remove(&si).expect("packed tensor written first");
                    let mut b = Vec::with_capacity(sc.len() * sources[si].dtype.size());
                    for v in sc {
                        cast_value(v, sources[si].dtype, &mut b);
                    }
                    w.write_all(&b).map_err(|e| Error::io(&path, e))?;
                }
                Out::Shape(si) => {
                    let s = &sources[si];
                    let mut b = Vec::with_capacity(16);
                    b.extend_from_slice(&(s.rows as i64).to_le_bytes());
                    b.extend_from_slice(&(s.cols as i64).to_le_bytes());
                    w.write_all(&b).map_err(|e| Error::io(&path, e))?;
                }
            }
            debug_assert_eq!(w.written - before, specs[oi].nbytes());
        }
        let f = w.into_file().map_err(|e| Error::io(&path, e))?;
        f.sync_all().map_err(|e| Error::io(&path, e))?;
    }
    bar.finish();
    let mut files = names.clone();
    if shards.len() > 1 {
        to_hf::write_json(
            dir.path(),
            "model.safetensors.index.json",
            &safetensors_write::index_json(&specs, &shards, &names),
        )?;
        files.push("model.safetensors.index.json".into());
    }
    let (dtype, qc) = match opts.scheme {
        Scheme::Cast(d) => (Some(d), None),
        Scheme::Int8 { group } => (None, Some(compressed::config(group, &ignore))),
    };
    files.extend(side(dir.path(), dtype, qc)?);
    dir.commit()?;
    Ok(Report {
        files,
        tensors: reports,
        bytes_in,
        bytes_out,
        seconds: start.elapsed().as_secs_f64(),
        engine: opts.engine.name(),
    })
}

/// A computed batch: bytes to write, int8 scales, errors, input ranges to release.
type Batch = (Vec<u8>, Vec<f32>, ErrStats, Vec<Seg>);

enum WriteError {
    Io(std::io::Error),
    Other(Error),
}

impl From<std::io::Error> for WriteError {
    fn from(e: std::io::Error) -> Self {
        WriteError::Io(e)
    }
}

/// Rows per batch: about 16 MiB of input.
fn batch_rows(s: &RowSource<'_>) -> usize {
    ((16usize << 20) / (s.cols * s.dtype.size()).max(1)).clamp(1, s.rows.max(1))
}

#[allow(clippy::too_many_arguments)]
fn write_main(
    s: &RowSource<'_>,
    job: Job,
    opts: &QuantizeOptions,
    w: &mut FileSink,
    bar: &Progress,
    pending: &mut HashMap<usize, Vec<f32>>,
    si: usize,
    file: &str,
) -> std::result::Result<ErrStats, WriteError> {
    let mut stats = ErrStats::default();
    let step = batch_rows(s);
    let mut scales = Vec::new();
    if job == Job::Copy {
        let mut r0 = 0;
        while r0 < s.rows {
            let n = step.min(s.rows - r0);
            let segs = s.segs_of(r0, n);
            for &(o, len) in segs.iter().filter(|x| x.1 >= 256 << 10) {
                s.ar.populate(o, len);
            }
            for &(o, len) in &segs {
                let copied = match s.ar.file_at(o) {
                    Some((f, fo)) if len >= 1 << 20 => {
                        safetensors_write::Sink::copy_from(w, f, fo, len)?
                    }
                    _ => false,
                };
                if !copied {
                    w.write_all(s.ar.slice(o, len))?;
                }
            }
            for &(o, len) in &segs {
                s.ar.release(o, len);
                bar.inc(len);
            }
            r0 += n;
        }
        return Ok(stats);
    }
    let tensor_err = |msg: String| {
        WriteError::Other(Error::Tensor {
            member: file.to_string(),
            tensor: s.name.clone(),
            msg,
        })
    };
    // Compute batch k + 1 while batch k is written: (bytes, input ranges to release).
    let compute = |r0: usize| -> std::result::Result<Batch, WriteError> {
        let n = step.min(s.rows - r0);
        let segs = s.segs_of(r0, n);
        for &(o, len) in segs.iter().filter(|x| x.1 >= 256 << 10) {
            s.ar.populate(o, len);
        }
        match job {
            Job::Cast(to) => {
                let cb = opts
                    .engine
                    .cast(s, r0, n, to)
                    .map_err(|e| tensor_err(format!("GPU failure: {e}")))?;
                if let Some((row, col)) = cb.non_finite {
                    return Err(tensor_err(format!(
                        "non-finite weight at row {row}, column {col}: refusing to cast"
                    )));
                }
                if cb.overflow > 0 && !opts.allow_overflow {
                    return Err(tensor_err(format!(
                        "{} values overflow {to} (pass --allow-overflow to write them as ±inf)",
                        cb.overflow
                    )));
                }
                let mut stats = cb.stats;
                stats.add_overflow(cb.overflow);
                Ok((cb.bytes, Vec::new(), stats, segs))
            }
            Job::Int8 { group } => {
                let qb = opts
                    .engine
                    .quantize(s, r0, n, group, s.dtype)
                    .map_err(|(row, e)| {
                        tensor_err(match e {
                            RowError::NonFinite { col, value } => format!(
                                "non-finite weight {value} at row {row}, column {col}: refusing to quantize"
                            ),
                            RowError::ScaleOverflow { amax } => {
                                format!("row {row}: scale {amax}/127 overflows {}", s.dtype)
                            }
                            RowError::Device(msg) => format!("GPU failure: {msg}"),
                        })
                    })?;
                Ok((qb.q, qb.scales, qb.stats, segs))
            }
            Job::Copy => unreachable!("handled above"),
        }
    };
    let mut written: Option<(Vec<u8>, Vec<Seg>)> = None;
    let mut r0 = 0;
    while r0 < s.rows || written.is_some() {
        let prev = written.take();
        let (next, wrote) = rayon::join(
            || (r0 < s.rows).then(|| compute(r0)),
            || -> std::io::Result<()> {
                if let Some((bytes, segs)) = &prev {
                    w.write_all(bytes)?;
                    for &(o, len) in segs {
                        s.ar.release(o, len);
                        bar.inc(len);
                    }
                }
                Ok(())
            },
        );
        wrote?;
        if let Some(res) = next {
            let (bytes, sc, st, segs) = res?;
            stats.merge(&st);
            scales.extend_from_slice(&sc);
            r0 += step.min(s.rows - r0);
            written = Some((bytes, segs));
        }
    }
    if matches!(job, Job::Int8 { .. }) {
        pending.insert(si, scales);
    }
    Ok(stats)
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
