//! The CUDA engine: batches of rows go up as stored (f32/f16/bf16), the kernels of
//! `kernels/` quantize or cast them, results come down; two streams alternate so that
//! gathering and uploading one chunk overlaps computing and downloading the previous one.

use std::sync::{Arc, Mutex};

use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};

use super::status::ChunkError;
use crate::dtype::DType;
use crate::quant::engine::{recycled, CastBatch, Engine, QBatch, RowSource};
use crate::quant::int8::{ErrStats, RowError};

pub(super) const BLOCK: u32 = 256;
/// Input bytes per chunk (a batch is split into chunks that alternate between streams).
const CHUNK_BYTES: usize = 4 << 20;

fn code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        _ => unreachable!("float dtypes only"),
    }
}

/// Buffers of one stream, grown as needed.
struct Lane {
    stream: Arc<CudaStream>,
    h_in: Option<PinnedHostSlice<u8>>,
    h_out: Option<PinnedHostSlice<u8>>,
    d_in: Option<CudaSlice<u8>>,
    d_out: Option<CudaSlice<u8>>,
}

/// A CUDA device with the kernels loaded.
pub struct CudaEngine {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) quantize: CudaFunction,
    pub(super) cast: CudaFunction,
    name: String,
    lanes: Mutex<Vec<Lane>>,
}

pub(super) fn derr<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}

impl CudaEngine {
    /// Opens device 0 and compiles (or loads from the cache) the kernels.
    pub fn open() -> Result<CudaEngine, String> {
        let ctx = super::open_context()?;
        let (ma, mi) = ctx
            .compute_capability()
            .map_err(derr("reading the compute capability"))?;
        let source = super::module::Source::from_env((ma, mi))?;
        let quantize =
            super::functions(&ctx, "quantize.cu", &["quantize_int8"], &source)?.remove(0);
        let cast = super::functions(&ctx, "cast.cu", &["cast_float"], &source)?.remove(0);
        let name = ctx.name().unwrap_or_else(|_| "GPU".into());
        let mut lanes = Vec::new();
        for _ in 0..2 {
            lanes.push(Lane {
                stream: ctx.new_stream().map_err(derr("creating a stream"))?,
                h_in: None,
                h_out: None,
                d_in: None,
                d_out: None,
            });
        }
        Ok(CudaEngine {
            ctx,
            quantize,
            cast,
            name: format!("cuda ({name}, sm_{ma}{mi}, {})", source.describe()),
            lanes: Mutex::new(lanes),
        })
    }

    fn ensure(&self, lane: &mut Lane, inb: usize, outb: usize) -> Result<(), String> {
        let grow = |have: Option<usize>, need: usize| have.is_none_or(|h| h < need);
        // The CPU only writes the input buffer: write-combined is fastest for that. It reads
        // the output buffer, which must then be ordinary cached memory (flags 0).
        if grow(lane.h_in.as_ref().map(|b| b.len()), inb) {
            let (h, d) = self.buffers(&lane.stream, inb, sys::CU_MEMHOSTALLOC_WRITECOMBINED)?;
            (lane.h_in, lane.d_in) = (Some(h), Some(d));
        }
        if grow(lane.h_out.as_ref().map(|b| b.len()), outb) {
            let (h, d) = self.buffers(&lane.stream, outb, 0)?;
            (lane.h_out, lane.d_out) = (Some(h), Some(d));
        }
        Ok(())
    }

    /// A pinned host buffer (allocated with `flags`) and a device buffer of `n` bytes, both
    /// allocated before either replaces a lane's, so that a failed allocation leaves the
    /// lane as it was.
    fn buffers(
        &self,
        stream: &Arc<CudaStream>,
        n: usize,
        flags: u32,
    ) -> Result<(PinnedHostSlice<u8>, CudaSlice<u8>), String> {
        // SAFETY: pinned memory is only read after being fully written (by `gather`, or by
        // device copies).
        let h = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(n, flags) }
            .map_err(derr("pinned alloc"))?;
        let d = stream.alloc_zeros::<u8>(n).map_err(derr("device alloc"))?;
        Ok((h, d))
    }
}

impl CudaEngine {
    /// Gathers rows `c0..c0+n` into the lane's pinned buffer, uploads them, and sets the
    /// 16 status bytes at `st` of the output buffer to `init`.
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &self,
        lane: &mut Lane,
        src: &RowSource<'_>,
        c0: usize,
        n: usize,
        inb: usize,
        outb: usize,
        st: usize,
        init: [u8; 16],
    ) -> Result<(), String> {
        self.ensure(lane, inb, outb)?;
        {
            let h = lane
                .h_in
                .as_mut()
                .expect("allocated")
                .as_mut_slice()
                .map_err(derr("pinned"))?;
            src.gather(c0, n, &mut h[..inb]);
        }
        let stream = lane.stream.clone();
        stream
            .memcpy_htod(
                lane.h_in.as_ref().expect("allocated"),
                lane.d_in.as_mut().expect("allocated"),
            )
            .map_err(derr("upload"))?;
        let d_out = lane.d_out.as_mut().expect("allocated");
        stream
            .memcpy_htod(&init, &mut d_out.slice_mut(st..st + 16))
            .map_err(derr("upload"))?;
        Ok(())
    }
}

/// Launches a kernel whose arguments are in `b`.
///
/// # Safety
/// The arguments must match the kernel's signature and the buffers hold what it indexes.
unsafe fn launch(
    b: &mut cudarc::driver::LaunchArgs<'_>,
    cfg: LaunchConfig,
    name: &str,
) -> Result<(), String> {
    b.launch(cfg)
        .map(|_| ())
        .map_err(|e| format!("launch {name}: {e:?}"))
}

/// Queues the copy of the first `outb` bytes of the lane's device output to its pinned
/// host buffer.
fn download(lane: &mut Lane, outb: usize) -> Result<(), String> {
    let stream = lane.stream.clone();
    let h_out = lane.h_out.as_mut().expect("allocated");
    stream
        .memcpy_dtoh(
            &lane.d_out.as_ref().expect("allocated").slice(0..outb),
            h_out,
        )
        .map_err(derr("download"))?;
    Ok(())
}

/// Adds the kernels' per-block error triples (max |err|, sum err², sum x²) to `stats`.
fn add_errors(bytes: &[u8], stats: &mut ErrStats) {
    for e in bytes.chunks_exact(12) {
        let f = |k: usize| f32::from_le_bytes([e[k], e[k + 1], e[k + 2], e[k + 3]]) as f64;
        stats.max_abs = stats.max_abs.max(f(0));
        stats.sum_sq_err += f(4);
        stats.sum_sq += f(8);
    }
}

fn status_init(a: u64, b: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&a.to_le_bytes());
    v[8..].copy_from_slice(&b.to_le_bytes());
    v
}

/// Splits `rows` into chunks of about CHUNK_BYTES of input.
fn chunks(src: &RowSource<'_>, r0: usize, rows: usize) -> Vec<(usize, usize)> {
    let per = (CHUNK_BYTES / (src.cols * src.dtype.size()).max(1)).max(1);
    let mut v = Vec::new();
    let mut r = r0;
    while r < r0 + rows {
        let n = per.min(r0 + rows - r);
        v.push((r, n));
        r += n;
    }
    v
}

impl Engine for CudaEngine {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn quantize(
        &self,
        src: &RowSource<'_>,
        r0: usize,
        rows: usize,
        group: usize,
        scale_dtype: DType,
        reuse: Vec<u8>,
    ) -> Result<QBatch, (usize, RowError)> {
        self.quantize_on_device(src, r0, rows, group, scale_dtype, reuse)
            .unwrap_or_else(|msg| Err((r0, RowError::Device(msg))))
    }

    fn cast(
        &self,
        src: &RowSource<'_>,
        r0: usize,
        rows: usize,
        to: DType,
        reuse: Vec<u8>,
    ) -> Result<CastBatch, String> {
        self.cast_on_device(src, r0, rows, to, reuse)
    }
}

impl CudaEngine {
    /// The quantization of `Engine::quantize`; the outer error is a device failure.
    fn quantize_on_device(
        &self,
        src: &RowSource<'_>,
        r0: usize,
        rows: usize,
        group: usize,
        scale_dtype: DType,
        reuse: Vec<u8>,
    ) -> Result<Result<QBatch, (usize, RowError)>, String> {
        let cols = src.cols;
        let ng = cols.div_ceil(group);
        let esz = src.dtype.size();
        let mut q = recycled(reuse, rows * cols);
        let mut scales = vec![0f32; rows * ng];
        let mut stats = ErrStats::default();
        let mut lanes = self.lanes.lock().expect("not poisoned");
        let parts = chunks(src, r0, rows);
        // Output layout per chunk: q (n·cols) | scales (n·ng f32) | err (3·n·ng f32) | status (2 i64).
        let layout = |n: usize| {
            let qb = n * cols;
            let sb = qb.next_multiple_of(16);
            let eb = sb + n * ng * 4;
            let st = (eb + 3 * n * ng * 4).next_multiple_of(16);
            (sb, eb, st, st + 16)
        };
        let mut pending: [Option<(usize, usize)>; 2] = [None, None];
        let mut first_bad: Option<(usize, RowError)> = None;
        let finish = |lane: &mut Lane,
                      (c0, n): (usize, usize),
                      q: &mut [u8],
                      scales: &mut [f32],
                      stats: &mut ErrStats| {
            lane.stream.synchronize().map_err(derr("synchronize"))?;
            let (sb, eb, st, _) = layout(n);
            let h = lane
                .h_out
                .as_ref()
                .expect("allocated")
                .as_slice()
                .map_err(derr("pinned"))?;
            let off = c0 - r0;
            q[off * cols..(off + n) * cols].copy_from_slice(&h[..n * cols]);
            for (i, c) in h[sb..eb].chunks_exact(4).enumerate() {
                scales[off * ng + i] = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            add_errors(&h[eb..eb + 3 * n * ng * 4], stats);
            stats.count += (n * cols) as u64;
            let status =
                |k: usize| i64::from_le_bytes(h[st + 8 * k..st + 8 * k + 8].try_into().expect("8"));
            Ok::<_, String>((status(0), status(1)))
        };
        for (k, &(c0, n)) in parts.iter().enumerate() {
            let li = k % 2;
            if let Some(prev) = pending[li].take() {
                let st = finish(&mut lanes[li], prev, &mut q, &mut scales, &mut stats)?;
                note(&mut first_bad, src, prev, group, st)?;
            }
            let (sb, eb, st, outb) = layout(n);
            let lane = &mut lanes[li];
            let max = i64::MAX as u64;
            self.stage(
                lane,
                src,
                c0,
                n,
                n * cols * esz,
                outb,
                st,
                status_init(max, max),
            )?;
            let stream = lane.stream.clone();
            let d_in = lane.d_in.as_mut().expect("allocated");
            let d_out = lane.d_out.as_mut().expect("allocated");
            let (dt, rows_i, cols_i, group_i, sdt) = (
                code(src.dtype),
                n as i64,
                cols as i32,
                group as i32,
                code(scale_dtype),
            );
            let q_v = d_out.slice(0..n * cols);
            let s_v = d_out.slice(sb..eb);
            let e_v = d_out.slice(eb..st);
            let st_v = d_out.slice(st..st + 16);
            let mut b = stream.launch_builder(&self.quantize);
            b.arg(&*d_in)
                .arg(&dt)
                .arg(&rows_i)
                .arg(&cols_i)
                .arg(&group_i)
                .arg(&sdt);
            b.arg(&q_v).arg(&s_v).arg(&e_v).arg(&st_v);
            let cfg = LaunchConfig {
                grid_dim: ((n * ng) as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match `quantize_int8`'s signature and every buffer
            // holds what the kernel indexes (n rows of cols values, n·ng groups).
            unsafe { launch(&mut b, cfg, "quantize_int8") }?;
            download(lane, outb)?;
            pending[li] = Some((c0, n));
        }
        for li in 0..2 {
            if let Some(prev) = pending[li].take() {
                let st = finish(&mut lanes[li], prev, &mut q, &mut scales, &mut stats)?;
                note(&mut first_bad, src, prev, group, st)?;
            }
        }
        // Errors that cudarc met in destructors (freeing, event waits) are kept in the
        // context: a batch that had one is a failed batch.
        self.ctx
            .check_err()
            .map_err(derr("a CUDA call during the batch"))?;
        if let Some(e) = first_bad {
            return Ok(Err(e));
        }
        Ok(Ok(QBatch { q, scales, stats }))
    }

    fn cast_on_device(
        &self,
        src: &RowSource<'_>,
        r0: usize,
        rows: usize,
        to: DType,
        reuse: Vec<u8>,
    ) -> Result<CastBatch, String> {
        let cols = src.cols;
        let n_all = rows * cols;
        let mut bytes = recycled(reuse, n_all * to.size());
        let mut stats = ErrStats::default();
        let mut overflow = 0u64;
        let mut non_finite: Option<(usize, usize)> = None;
        let mut lanes = self.lanes.lock().expect("not poisoned");
        let blocks = 1024usize;
        for (c0, n) in chunks(src, r0, rows) {
            let lane = &mut lanes[0];
            let vals = n * cols;
            let inb = vals * src.dtype.size();
            let ob = (vals * to.size()).next_multiple_of(16);
            let eb = ob + blocks * 12;
            let st = eb.next_multiple_of(16);
            let outb = st + 16;
            self.stage(
                lane,
                src,
                c0,
                n,
                inb,
                outb,
                st,
                status_init(0, i64::MAX as u64),
            )?;
            let stream = lane.stream.clone();
            let d_out = lane.d_out.as_mut().expect("allocated");
            let (from, to_c, n_i) = (code(src.dtype), code(to), vals as i64);
            let o_v = d_out.slice(0..vals * to.size());
            let e_v = d_out.slice(ob..eb);
            let ov_v = d_out.slice(st..st + 8);
            let st_v = d_out.slice(st + 8..st + 16);
            let d_in = lane.d_in.as_ref().expect("allocated");
            let mut b = stream.launch_builder(&self.cast);
            b.arg(d_in)
                .arg(&from)
                .arg(&o_v)
                .arg(&to_c)
                .arg(&n_i)
                .arg(&ov_v)
                .arg(&e_v)
                .arg(&st_v);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match `cast_float`'s signature and sizes.
            unsafe { launch(&mut b, cfg, "cast_float") }?;
            download(lane, outb)?;
            stream.synchronize().map_err(derr("synchronize"))?;
            let h = lane
                .h_out
                .as_ref()
                .expect("allocated")
                .as_slice()
                .map_err(derr("pinned"))?;
            let off = (c0 - r0) * cols * to.size();
            bytes[off..off + vals * to.size()].copy_from_slice(&h[..vals * to.size()]);
            add_errors(&h[ob..eb], &mut stats);
            stats.count += vals as u64;
            overflow += u64::from_le_bytes(h[st..st + 8].try_into().expect("8"));
            let bad = i64::from_le_bytes(h[st + 8..st + 16].try_into().expect("8"));
            if bad != super::status::NONE && non_finite.is_none() {
                let i = usize::try_from(bad)
                    .ok()
                    .filter(|&i| i < vals)
                    .ok_or_else(|| {
                        format!("the cast kernel returned index {bad}, outside its chunk of {vals} values")
                    })?;
                non_finite = Some((c0 + i / cols, i % cols));
            }
        }
        self.ctx
            .check_err()
            .map_err(derr("a CUDA call during the batch"))?;
        Ok(CastBatch {
            bytes,
            overflow,
            stats,
            non_finite,
        })
    }
}

/// Records the first error of a chunk of `n` rows from `c0` (the earliest row, then group,
/// wins); an index from the device outside the chunk is a device failure.
fn note(
    first: &mut Option<(usize, RowError)>,
    src: &RowSource<'_>,
    (c0, n): (usize, usize),
    group: usize,
    (bad, over): (i64, i64),
) -> Result<(), String> {
    let cols = src.cols;
    let Some((r, what)) = super::status::first_error(bad, over, n, cols, group)? else {
        return Ok(());
    };
    let row = c0 + r;
    let mut buf = vec![0f32; cols];
    src.row_f32(row, &mut Vec::new(), &mut buf);
    let err = match what {
        ChunkError::NonFinite { col } => RowError::NonFinite {
            col,
            value: buf[col],
        },
        // The CPU reports the amax of the group whose scale overflows.
        ChunkError::ScaleOverflow { group: g } => RowError::ScaleOverflow {
            amax: buf[g * group..cols.min((g + 1) * group)]
                .iter()
                .fold(0f32, |a, v| a.max(v.abs())),
        },
    };
    if first.as_ref().is_none_or(|f| row < f.0) {
        *first = Some((row, err));
    }
    Ok(())
}
