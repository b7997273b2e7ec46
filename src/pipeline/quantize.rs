//! `quantize`: int8 weight-only (compressed-tensors `pack-quantized`) or fp16/bf16 casts,
//! from a `.nemo` (merging on the way, one pass), a per-rank folder or a Hugging Face
//! folder, into a Hugging Face folder, streaming a batch of rows at a time from the mapped
//! input through the CPU or GPU engine.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::container::mapped::{OpenOptions, Seg};
use crate::container::safetensors_write::{self, TensorSpec};
use crate::dtype::{cast_value, DType};
use crate::error::{Error, Result};
use crate::hf::config as hf;
use crate::hf::files;
use crate::hf::folder::HfFolder;
use crate::hf::names;
use crate::io::output::{self, AtomicDir};
use crate::io::progress::Progress;
use crate::io::sink::{FileSink, Sink};
use crate::model::{Source, Tensor, View};
use crate::quant::compressed;
use crate::quant::engine::{Engine, RowSource};
use crate::quant::int8::{ErrStats, RowError};
pub use crate::quant::report::{QuantizeReport, TensorReport};

/// What to produce.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scheme {
    /// int8 weight-only; `group` columns per scale, `None` per output channel.
    Int8 { group: Option<usize> },
    /// Every float tensor cast to this dtype.
    Cast(DType),
}

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

/// What to do with one input tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Job {
    Copy,
    Cast(DType),
    Int8 { group: usize },
}

/// Runs a quantization from `input` into `out`.
pub fn quantize(input: &Path, out: &Path, opts: &QuantizeOptions) -> Result<QuantizeReport> {
    check_keep(&opts.keep)?;
    let view = View::open(input, &opts.open)?;
    let file = view.display().to_string();
    if view.hf().is_some_and(|f| f.int8.is_some()) {
        return Err(Error::Usage(format!(
            "{file}: already quantized (config.json has a quantization_config)"
        )));
    }
    for t in &view.tensors {
        check_source(t, &file, view.nemo().is_some())?;
    }
    let sources: Vec<RowSource> = view
        .tensors
        .iter()
        .map(|t| RowSource::located(view.files(), &t.name, t.dtype, t.rows(), t.cols(), t))
        .collect();
    let shapes: Vec<Vec<u64>> = view.tensors.iter().map(|t| t.shape.clone()).collect();
    match &view.source {
        Source::Nemo { checkpoint, .. } => {
            let sp = view.tokenizer()?;
            let float_dtype = view.tensors.first().map(|t| t.dtype).unwrap_or(DType::F32);
            run(
                &sources,
                &shapes,
                &file,
                out,
                opts,
                view.arch.tied,
                |dir, dtype, qc| {
                    let mut cfg = hf::config_json(&view.arch, sp, dtype.unwrap_or(float_dtype));
                    if let Some(q) = qc {
                        cfg["quantization_config"] = q;
                    }
                    files::nemo_side_files(dir, checkpoint, cfg)
                },
            )
        }
        Source::Hf(f) => run(
            &sources,
            &shapes,
            &file,
            out,
            opts,
            view.arch.tied,
            |dir, dtype, qc| hf_side_files(f, dir, dtype, qc),
        ),
    }
}

/// Only float vectors and matrices stored densely can be cast or quantized.
fn check_source(t: &Tensor, file: &str, nemo: bool) -> Result<()> {
    if t.name.ends_with(".weight_packed") || t.name.ends_with(".weight_scale") {
        return Err(Error::Usage(format!(
            "{}: tensor `{}`: already quantized",
            t.file, t.name
        )));
    }
    let member = if nemo {
        file.to_string()
    } else {
        t.file.clone()
    };
    if !t.dtype.is_float() {
        return Err(Error::Tensor {
            member,
            tensor: t.name.clone(),
            msg: format!("stored as {}, not a float dtype", t.dtype),
        });
    }
    if t.stored().is_some_and(|s| !s.is_contiguous()) || t.shape.len() > 2 {
        return Err(Error::Tensor {
            member,
            tensor: t.name.clone(),
            msg: "not a contiguous vector or matrix".into(),
        });
    }
    Ok(())
}

/// The side files of a quantized Hugging Face input: its `config.json` updated, the rest
/// copied.
fn hf_side_files(
    f: &HfFolder,
    dir: &Path,
    dtype: Option<DType>,
    qc: Option<Value>,
) -> Result<Vec<String>> {
    let mut cfg = f.config.clone();
    if let Some(d) = dtype {
        cfg["torch_dtype"] = json!(hf::torch_dtype_name(d));
    }
    if let Some(q) = qc {
        cfg["quantization_config"] = q;
    }
    files::write_json(dir, "config.json", &cfg)?;
    let mut files = vec!["config.json".to_string()];
    let side = f.files.file_names().filter(|n| {
        !n.contains('/')
            && !n.ends_with(".safetensors")
            && *n != "model.safetensors.index.json"
            && *n != "config.json"
    });
    for n in side {
        let p = dir.join(n);
        std::fs::write(&p, f.files.data(f.files.member(n).expect("listed")))
            .map_err(|e| Error::io(&p, e))?;
        files.push(n.to_string());
    }
    Ok(files)
}

fn check_keep(keep: &[String]) -> Result<()> {
    let linears = names::linear_modules();
    for k in keep {
        if k != "embed" && !linears.contains(k) {
            return Err(Error::Usage(format!(
                "--keep `{k}` is not one of embed, {}",
                linears.join(", ")
            )));
        }
    }
    Ok(())
}

fn is_linear(name: &str, shape: &[u64]) -> Option<String> {
    let m = names::module_of(name)?;
    (shape.len() == 2 && names::linear_modules().iter().any(|l| l == m)).then(|| m.to_string())
}

fn job_for(name: &str, shape: &[u64], dtype: DType, opts: &QuantizeOptions) -> Job {
    match opts.scheme {
        Scheme::Cast(to) if to == dtype => Job::Copy,
        Scheme::Cast(to) => Job::Cast(to),
        Scheme::Int8 { group } => match is_linear(name, shape) {
            Some(m) if !opts.keep.contains(&m) => Job::Int8 {
                group: group.unwrap_or(shape[1] as usize),
            },
            _ => Job::Copy,
        },
    }
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
    tied: bool,
    mut side: impl FnMut(&Path, Option<DType>, Option<Value>) -> Result<Vec<String>>,
) -> Result<QuantizeReport> {
    let start = Instant::now();
    let jobs: Vec<Job> = sources
        .iter()
        .zip(shapes)
        .map(|(s, sh)| job_for(&s.name, sh, s.dtype, opts))
        .collect();
    let mut ignore = check_jobs(sources, shapes, &jobs, file, opts)?;
    // A tied model has no `lm_head` tensor, but transformers still builds an `lm_head`
    // Linear (sharing the embedding): it must be listed, or compressed-tensors turns it
    // into a quantized layer with no weights.
    if tied && !sources.iter().any(|s| s.name == "lm_head.weight") {
        ignore.push("lm_head".to_string());
    }
    let outs = output_tensors(sources, shapes, &jobs);
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
    // The batches' byte buffers, passed from batch to batch and tensor to tensor.
    let mut buffers: Vec<Vec<u8>> = Vec::new();
    let mut reports: Vec<TensorReport> = Vec::new();
    for (shard, name) in shards.iter().zip(&names) {
        let (path, mut w) = safetensors_write::create_shard(dir.path(), name, &specs, shard)?;
        for &oi in shard {
            output::check_interrupted()?;
            let before = w.written;
            match outs[oi].1 {
                Out::Main(si) => {
                    let s = &sources[si];
                    let st = write_main(
                        s,
                        jobs[si],
                        opts,
                        &mut w,
                        &bar,
                        &mut pending,
                        si,
                        file,
                        &mut buffers,
                    )
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
        files::write_json(
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
    Ok(QuantizeReport {
        files,
        tensors: reports,
        bytes_in,
        bytes_out,
        seconds: start.elapsed().as_secs_f64(),
        engine: opts.engine.name(),
    })
}

/// Checks everything that can be checked before writing; returns the linear layers kept
/// in float (the `ignore` list of the quantization config).
fn check_jobs(
    sources: &[RowSource<'_>],
    shapes: &[Vec<u64>],
    jobs: &[Job],
    file: &str,
    opts: &QuantizeOptions,
) -> Result<Vec<String>> {
    let mut ignore = Vec::new();
    for ((s, sh), j) in sources.iter().zip(shapes).zip(jobs) {
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
                    && is_linear(&s.name, sh).is_some() =>
            {
                let m = s.name.strip_suffix(".weight").unwrap_or(&s.name);
                ignore.push(m.to_string());
            }
            _ => {}
        }
    }
    Ok(ignore)
}

/// The output tensors, in order: each source copied, cast or packed (with its scales and
/// shape).
fn output_tensors(
    sources: &[RowSource<'_>],
    shapes: &[Vec<u64>],
    jobs: &[Job],
) -> Vec<(TensorSpec, Out)> {
    let mut outs: Vec<(TensorSpec, Out)> = Vec::new();
    for (i, ((s, sh), j)) in sources.iter().zip(shapes).zip(jobs).enumerate() {
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
    outs
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
    buffers: &mut Vec<Vec<u8>>,
) -> std::result::Result<ErrStats, WriteError> {
    s.check().map_err(WriteError::Other)?;
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
                    Some((f, fo)) if len >= 1 << 20 => Sink::copy_from(w, f, fo, len)?,
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
    // Compute batch k + 1 while batch k is written: (bytes, input ranges to release). The
    // written batch's buffer goes back to `buffers` for the next one.
    let compute = |r0: usize, reuse: Vec<u8>| -> std::result::Result<Batch, WriteError> {
        let n = step.min(s.rows - r0);
        let segs = s.segs_of(r0, n);
        for &(o, len) in segs.iter().filter(|x| x.1 >= 256 << 10) {
            s.ar.populate(o, len);
        }
        match job {
            Job::Cast(to) => {
                let cb = opts
                    .engine
                    .cast(s, r0, n, to, reuse)
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
                    .quantize(s, r0, n, group, s.dtype, reuse)
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
        let reuse = buffers.pop().unwrap_or_default();
        let ((next, unused), wrote) = rayon::join(
            || {
                if r0 < s.rows {
                    (Some(compute(r0, reuse)), None)
                } else {
                    (None, Some(reuse))
                }
            },
            || -> std::io::Result<Option<Vec<u8>>> {
                let Some((bytes, segs)) = prev else {
                    return Ok(None);
                };
                w.write_all(&bytes)?;
                for &(o, len) in &segs {
                    s.ar.release(o, len);
                    bar.inc(len);
                }
                Ok(Some(bytes))
            },
        );
        buffers.extend(unused);
        buffers.extend(wrote?);
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
