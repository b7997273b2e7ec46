//! The device runtime's [`Ops`] on a CUDA device: the kernels of `kernels/runtime.cu`
//! (launched by `kernels`) over device buffers. The weights go up once, in their stored
//! dtype (bf16 / f16 / f32, or int8 with its scales), streamed from the mapped files
//! through two pinned staging buffers that alternate (gathering rows into one overlaps the
//! copy of the other); a `.nemo` goes up from its TP shards as stored, each row's parts put
//! side by side. The KV cache lives on the device; only the logits come back.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, PinnedHostSlice};

use super::kernels::{Kernels, WeightRef};
use crate::container::mapped::Mapped;
use crate::runtime::device::{DeviceModel, Mat, Ops};
use crate::runtime::linear::Linear;
use crate::runtime::llama::QkvOrder;
use crate::runtime::load::Model;
use crate::runtime::twins::AttnShape;

/// Bytes per staging buffer.
const STAGE: usize = 32 << 20;

type R<T = ()> = std::result::Result<T, String>;

fn derr<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e:?}")
}

/// Device 0, its stream, the kernels, and the staging buffers of uploads.
pub struct CudaOps {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    k: Kernels,
    stage: [PinnedHostSlice<u8>; 2],
    next: usize,
    progress: crate::io::progress::Progress,
    pub name: String,
}

fn weight(m: &Mat<CudaOps>) -> WeightRef<'_> {
    WeightRef {
        wt: m.wt,
        w: m.w.slice(..),
        scales: m.scales.slice(..),
        rows: m.rows,
        cols: m.cols,
        group: m.group,
    }
}

/// Puts `model`'s weights on device 0; the one-line reason when that cannot be done.
pub fn upload(model: &Model, progress: bool) -> R<DeviceModel<CudaOps>> {
    let ctx = crate::gpu::open_context()?;
    let cc = ctx
        .compute_capability()
        .map_err(derr("compute capability"))?;
    let src = crate::gpu::Source::from_env(cc)?;
    let k = Kernels::load(&ctx, &src)?;
    let stream = ctx.default_stream();
    // SAFETY: pinned memory is only read after `as_mut_slice` filled it.
    let [a, b] = [0, 1].map(|_| unsafe { ctx.alloc_pinned_with_flags::<u8>(STAGE, 0) });
    let w = &model.weights;
    let name = format!(
        "cuda ({}, sm_{}{}, {})",
        ctx.name().unwrap_or_else(|_| "GPU".into()),
        cc.0,
        cc.1,
        src.describe()
    );
    let ops = CudaOps {
        ctx,
        stream,
        k,
        stage: [
            a.map_err(derr("pinned alloc"))?,
            b.map_err(derr("pinned alloc"))?,
        ],
        next: 0,
        progress: crate::io::progress::Progress::bytes(
            w.bytes_per_token() + w.embed.bytes(),
            "uploading weights",
            progress,
        ),
        name,
    };
    let m = DeviceModel::upload(ops, w, &model.archive)?;
    m.ops.progress.finish();
    Ok(m)
}

impl Ops for CudaOps {
    type Buf = CudaSlice<f32>;
    type Bytes = CudaSlice<u8>;
    type Ids = CudaSlice<u32>;

    fn zeros(&self, n: usize) -> R<CudaSlice<f32>> {
        self.stream
            .alloc_zeros::<f32>(n.max(1))
            .map_err(|e| format!("allocating {n} floats on the device: {e:?}"))
    }

    fn ids(&self, n: usize) -> R<CudaSlice<u32>> {
        self.stream
            .alloc_zeros::<u32>(n.max(1))
            .map_err(derr("device alloc"))
    }

    fn upload(&self, host: &[f32]) -> R<CudaSlice<f32>> {
        self.stream.clone_htod(host).map_err(derr("upload"))
    }

    fn upload_linear(&mut self, ar: &Mapped, lin: &Linear, rows: usize) -> R<Mat<Self>> {
        let row_bytes = lin.inp * lin.wtype.size();
        let mut w = self
            .stream
            .alloc_zeros::<u8>((rows * row_bytes).max(1))
            .map_err(derr("device alloc"))?;
        let mut scales = Vec::new();
        let mut bytes = Vec::with_capacity(row_bytes);
        // The rows as one stream of bytes: every full staging buffer is copied
        // asynchronously (its event records the copy; filling it again waits for that),
        // the tail synchronously.
        let (mut filled, mut at) = (0usize, 0usize);
        for r in 0..rows {
            bytes.clear();
            lin.raw_row(ar, r, &mut bytes, &mut scales)?;
            if bytes.len() != row_bytes {
                return Err(format!(
                    "{}: row {r} has {} bytes, not {row_bytes}",
                    lin.name,
                    bytes.len()
                ));
            }
            let mut src = &bytes[..];
            while !src.is_empty() {
                let buf = &mut self.stage[self.next];
                let n = (STAGE - filled).min(src.len());
                buf.as_mut_slice().map_err(derr("pinned"))?[filled..filled + n]
                    .copy_from_slice(&src[..n]);
                (filled, src) = (filled + n, &src[n..]);
                if filled == STAGE {
                    self.stream
                        .memcpy_htod(&*buf, &mut w.slice_mut(at..at + STAGE))
                        .map_err(derr("upload"))?;
                    (at, filled) = (at + STAGE, 0);
                    self.next ^= 1;
                }
            }
            self.progress.inc(row_bytes as u64);
        }
        if filled > 0 {
            let h = self.stage[self.next].as_slice().map_err(derr("pinned"))?;
            self.stream
                .memcpy_htod(&h[..filled], &mut w.slice_mut(at..at + filled))
                .map_err(derr("upload"))?;
        }
        if scales.is_empty() {
            scales.push(0.0);
        }
        if scales.is_empty() {
            scales.push(0.0);
        }
        let scales = self.stream.clone_htod(&scales).map_err(derr("upload"))?;
        Ok(Mat {
            wt: lin.wtype,
            w,
            scales,
            rows,
            cols: lin.inp,
            group: lin.group.max(1),
        })
    }

    fn write(&self, host: &[f32], dst: &mut CudaSlice<f32>) -> R {
        self.stream
            .memcpy_htod(host, &mut dst.slice_mut(..host.len()))
            .map_err(derr("upload"))
    }

    fn read(&self, src: &CudaSlice<f32>, host: &mut [f32]) -> R {
        self.stream
            .memcpy_dtoh(&src.slice(..host.len()), host)
            .map_err(derr("download"))
    }

    fn finish(&self) -> R {
        self.stream.synchronize().map_err(derr("synchronize"))?;
        self.ctx.check_err().map_err(derr("a CUDA call"))
    }

    fn embed_rows(
        &self,
        m: &Mat<Self>,
        tokens: &[u32],
        ids: &mut CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
    ) -> R {
        self.k.embed_rows(
            &self.stream,
            &weight(m),
            tokens,
            &mut ids.slice_mut(..),
            &mut out.slice_mut(..),
        )
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        rows: Range<usize>,
        w: &CudaSlice<f32>,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> R {
        let h = w.len();
        let n = rows.len();
        self.k.rms_norm(
            &self.stream,
            &x.slice(rows.start * h..rows.end * h),
            &w.slice(..),
            eps,
            n,
            &mut out.slice_mut(..n * h),
        )
    }

    fn matvec(&self, m: &Mat<Self>, x: &CudaSlice<f32>, t: usize, y: &mut CudaSlice<f32>) -> R {
        self.k.matvec(
            &self.stream,
            &weight(m),
            &x.slice(..),
            t,
            &mut y.slice_mut(..),
        )
    }

    fn rope_qkv(
        &self,
        qkv: &CudaSlice<f32>,
        s: AttnShape,
        order: QkvOrder,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        q: &mut CudaSlice<f32>,
        k: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
    ) -> R {
        self.k.rope_qkv(
            &self.stream,
            &qkv.slice(..),
            s,
            order,
            &cos.slice(..),
            &sin.slice(..),
            &mut q.slice_mut(..),
            &mut k.slice_mut(..),
            &mut v.slice_mut(..),
        )
    }

    fn attention(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        s: AttnShape,
        scores: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> R {
        self.k.attention(
            &self.stream,
            &q.slice(..),
            &k.slice(..),
            &v.slice(..),
            s,
            &mut scores.slice_mut(..),
            &mut out.slice_mut(..),
        )
    }

    fn silu_mul(&self, gu: &CudaSlice<f32>, t: usize, ffn: usize, act: &mut CudaSlice<f32>) -> R {
        self.k
            .silu_mul(&self.stream, &gu.slice(..), t, ffn, &mut act.slice_mut(..))
    }

    fn add_into(&self, x: &mut CudaSlice<f32>, o: &CudaSlice<f32>, n: usize) -> R {
        self.k
            .add_into(&self.stream, &mut x.slice_mut(..n), &o.slice(..n))
    }
}
