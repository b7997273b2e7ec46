//! `gpu-check`'s runtime-kernel checks: each kernel of `kernels/runtime.cu` against its CPU
//! twin (`runtime::twins`) on random inputs at several sizes, sizes that are not multiples
//! of the block or warp included. One PASS/FAIL line per check; a failure names the first
//! differing index, what it was computed from, and both outputs.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use steerlm_convert::runtime::cpu::WType;
use steerlm_convert::runtime::cuda::kernels::{Kernels, WeightRef};
use steerlm_convert::runtime::llama::QkvOrder;
use steerlm_convert::runtime::twins::{self, AttnShape, MatShape};

use crate::gpu_check::{Log, Rng};

type R<T> = Result<T, String>;

fn up<T: cudarc::driver::DeviceRepr>(st: &Arc<CudaStream>, v: &[T]) -> R<CudaSlice<T>> {
    st.clone_htod(v).map_err(|e| format!("upload: {e:?}"))
}

fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(
    st: &Arc<CudaStream>,
    d: &CudaSlice<T>,
) -> R<Vec<T>> {
    st.clone_dtoh(d).map_err(|e| format!("download: {e:?}"))
}

fn zeros(st: &Arc<CudaStream>, n: usize) -> R<CudaSlice<f32>> {
    st.alloc_zeros::<f32>(n.max(1))
        .map_err(|e| format!("alloc: {e:?}"))
}

/// The first index where `gpu` and `cpu` differ by more than `tol` relative (0: bit for
/// bit), with `context(i)` saying what element `i` was computed from.
fn compare(
    gpu: &[f32],
    cpu: &[f32],
    tol: f32,
    context: &dyn Fn(usize) -> String,
) -> Result<(), String> {
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let same = if tol == 0.0 {
            g.to_bits() == c.to_bits()
        } else {
            (g - c).abs() <= tol * c.abs().max(1e-3) || (g.is_nan() && c.is_nan())
        };
        if !same {
            return Err(format!(
                "first difference at index {i} ({}): gpu {g:e} ({:#010x}), cpu twin {c:e} ({:#010x})",
                context(i),
                g.to_bits(),
                c.to_bits()
            ));
        }
    }
    if gpu.len() < cpu.len() {
        return Err(format!(
            "gpu gave {} values, the twin {}",
            gpu.len(),
            cpu.len()
        ));
    }
    Ok(())
}

const TYPES: [WType; 5] = [
    WType::F32,
    WType::F16,
    WType::BF16,
    WType::U8Offset,
    WType::I8,
];

/// Every runtime kernel against its twin.
pub fn check(log: &mut Log, ctx: &Arc<CudaContext>) {
    let src =
        match steerlm_convert::gpu::Source::from_env(ctx.compute_capability().unwrap_or((7, 5))) {
            Ok(s) => s,
            Err(e) => return log.fail("runtime kernels: load", &e),
        };
    let k = match Kernels::load(ctx, &src) {
        Ok(k) => k,
        Err(e) => return log.fail("runtime kernels: load", &e),
    };
    let st = ctx.default_stream();
    let mut rng = Rng(0x5eed_0fc0_ffee);
    for &(rows, cols, t) in &[
        (5usize, 40usize, 1usize),
        (13, 300, 3),
        (257, 5120, 1),
        (64, 13824, 5),
        (9, 1024, 4),
    ] {
        for wt in TYPES {
            let groups: Vec<usize> = if wt.is_int8() {
                [cols, 128, 32]
                    .into_iter()
                    .filter(|g| cols % g == 0)
                    .collect()
            } else {
                vec![cols]
            };
            for group in groups {
                let name = format!(
                    "matvec {} [{rows} x {cols}] group {group} tokens {t}",
                    wt.name()
                );
                let r = matvec(&k, &st, &mut rng, wt, (rows, cols, t, group));
                log.result(&name, r);
            }
        }
    }
    for wt in TYPES {
        let r = embed(&k, &st, &mut rng, wt);
        log.result(&format!("embed_rows {}", wt.name()), r);
    }
    for h in [40usize, 300, 5120] {
        log.result(&format!("rms_norm hidden {h}"), rms(&k, &st, &mut rng, h));
    }
    for order in [QkvOrder::Separate, QkvOrder::Grouped] {
        for &(nh, nkv, hd, p0, t) in &[
            (8usize, 2usize, 16usize, 5usize, 3usize),
            (40, 40, 128, 0, 7),
        ] {
            let s = AttnShape {
                heads: nh,
                kv_heads: nkv,
                hd,
                p0,
                t,
                cap: p0 + t + 3,
            };
            log.result(
                &format!("rope_qkv {order:?} {s:?}"),
                rope(&k, &st, &mut rng, s, order),
            );
        }
    }
    for &(nh, nkv, hd, p0, t) in &[
        (8usize, 2usize, 32usize, 300usize, 1usize),
        (40, 40, 128, 0, 17),
        (4, 1, 64, 513, 1),
        (40, 8, 128, 1000, 1),
    ] {
        let s = AttnShape {
            heads: nh,
            kv_heads: nkv,
            hd,
            p0,
            t,
            cap: p0 + t + 5,
        };
        log.result(&format!("attention {s:?}"), attention(&k, &st, &mut rng, s));
    }
    for &(t, ffn) in &[(1usize, 13824usize), (3, 50)] {
        log.result(
            &format!("silu_mul tokens {t} ffn {ffn}"),
            silu(&k, &st, &mut rng, t, ffn),
        );
    }
    for n in [1usize, 255, 257, 32000] {
        log.result(
            &format!("add_into and argmax n {n}"),
            add_argmax(&k, &st, &mut rng, n),
        );
    }
}

fn matvec(
    k: &Kernels,
    st: &Arc<CudaStream>,
    rng: &mut Rng,
    wt: WType,
    (rows, cols, t, group): (usize, usize, usize, usize),
) -> R<()> {
    let vals: Vec<f32> = (0..rows * cols).map(|_| rng.value()).collect();
    let (w, scales) = twins::stored(wt, &vals, cols, group);
    let x: Vec<f32> = (0..t * cols).map(|_| rng.value()).collect();
    let (dw, ds, dx) = (up(st, &w)?, up(st, &scales_or_one(&scales))?, up(st, &x)?);
    let mut dy = zeros(st, t * rows)?;
    let wr = WeightRef {
        wt,
        w: dw.slice(..),
        scales: ds.slice(..),
        rows,
        cols,
        group,
    };
    k.matvec(st, &wr, &dx.slice(..), t, &mut dy.slice_mut(..))?;
    let gpu = down(st, &dy)?;
    let chunk = twins::chunk_for(wt, cols, group);
    let mut cpu = vec![0f32; t * rows];
    twins::matvec(
        wt,
        &w,
        &scales,
        &x,
        MatShape {
            t,
            rows,
            cols,
            group,
            chunk,
        },
        &mut cpu,
    );
    compare(&gpu, &cpu, 0.0, &|i| {
        format!("token {}, row {}, chunk {chunk}", i / rows, i % rows)
    })
}

fn scales_or_one(s: &[f32]) -> Vec<f32> {
    if s.is_empty() {
        vec![0.0]
    } else {
        s.to_vec()
    }
}

fn embed(k: &Kernels, st: &Arc<CudaStream>, rng: &mut Rng, wt: WType) -> R<()> {
    let (vocab, h) = (37usize, 320usize);
    let group = if wt.is_int8() { 32 } else { h };
    let vals: Vec<f32> = (0..vocab * h).map(|_| rng.value()).collect();
    let (w, scales) = twins::stored(wt, &vals, h, group);
    let tokens = [0u32, 36, 5, 5, 17];
    let (dw, ds) = (up(st, &w)?, up(st, &scales_or_one(&scales))?);
    let mut dt = st.alloc_zeros::<u32>(8).map_err(|e| format!("{e:?}"))?;
    let mut out = zeros(st, tokens.len() * h)?;
    let wr = WeightRef {
        wt,
        w: dw.slice(..),
        scales: ds.slice(..),
        rows: vocab,
        cols: h,
        group,
    };
    k.embed_rows(
        st,
        &wr,
        &tokens,
        &mut dt.slice_mut(..),
        &mut out.slice_mut(..),
    )?;
    let gpu = down(st, &out)?;
    let mut cpu = vec![0f32; tokens.len() * h];
    twins::embed_rows(wt, &w, &scales, group, &tokens, h, &mut cpu);
    compare(&gpu, &cpu, 0.0, &|i| {
        format!("token id {}, column {}", tokens[i / h], i % h)
    })?;
    // An id outside the table is refused before any launch.
    match k.embed_rows(
        st,
        &wr,
        &[vocab as u32],
        &mut dt.slice_mut(..),
        &mut out.slice_mut(..),
    ) {
        Err(_) => Ok(()),
        Ok(()) => Err("an out-of-range token id was launched".into()),
    }
}

fn rms(k: &Kernels, st: &Arc<CudaStream>, rng: &mut Rng, h: usize) -> R<()> {
    let rows = 3;
    let x: Vec<f32> = (0..rows * h).map(|_| rng.value() * 8.0).collect();
    let w: Vec<f32> = (0..h).map(|_| rng.value()).collect();
    let (dx, dw) = (up(st, &x)?, up(st, &w)?);
    let mut out = zeros(st, rows * h)?;
    k.rms_norm(
        st,
        &dx.slice(..),
        &dw.slice(..),
        1e-5,
        rows,
        &mut out.slice_mut(..),
    )?;
    let gpu = down(st, &out)?;
    let mut cpu = vec![0f32; rows * h];
    twins::rms_norm(&x, &w, 1e-5, &mut cpu);
    compare(&gpu, &cpu, 0.0, &|i| {
        format!("row {}, column {}, x {}", i / h, i % h, x[i])
    })
}

fn rope(k: &Kernels, st: &Arc<CudaStream>, rng: &mut Rng, s: AttnShape, order: QkvOrder) -> R<()> {
    let width = (s.heads + 2 * s.kv_heads) * s.hd;
    let qkv: Vec<f32> = (0..s.t * width).map(|_| rng.value()).collect();
    let cos: Vec<f32> = (0..s.t * s.hd / 2).map(|_| rng.value()).collect();
    let sin: Vec<f32> = (0..s.t * s.hd / 2).map(|_| rng.value()).collect();
    let cache = s.kv_heads * s.cap * s.hd;
    let (dq, dc, ds) = (up(st, &qkv)?, up(st, &cos)?, up(st, &sin)?);
    let (mut q, mut kc, mut vc) = (
        zeros(st, s.t * s.heads * s.hd)?,
        zeros(st, cache)?,
        zeros(st, cache)?,
    );
    k.rope_qkv(
        st,
        &dq.slice(..),
        s,
        order,
        &dc.slice(..),
        &ds.slice(..),
        &mut q.slice_mut(..),
        &mut kc.slice_mut(..),
        &mut vc.slice_mut(..),
    )?;
    let mut cq = vec![0f32; s.t * s.heads * s.hd];
    let (mut ck, mut cv) = (vec![0f32; cache], vec![0f32; cache]);
    twins::rope_qkv(&qkv, s, order, &cos, &sin, &mut cq, &mut ck, &mut cv);
    compare(&down(st, &q)?, &cq, 0.0, &|i| {
        format!(
            "query {}, head {}",
            i / (s.heads * s.hd),
            i / s.hd % s.heads
        )
    })?;
    compare(&down(st, &kc)?, &ck, 0.0, &|i| {
        format!("key cache slot {}", i / s.hd)
    })?;
    compare(&down(st, &vc)?, &cv, 0.0, &|i| {
        format!("value cache slot {}", i / s.hd)
    })
}

fn attention(k: &Kernels, st: &Arc<CudaStream>, rng: &mut Rng, s: AttnShape) -> R<()> {
    let cache = s.kv_heads * s.cap * s.hd;
    let q: Vec<f32> = (0..s.t * s.heads * s.hd).map(|_| rng.value()).collect();
    let kc: Vec<f32> = (0..cache).map(|_| rng.value()).collect();
    let vc: Vec<f32> = (0..cache).map(|_| rng.value()).collect();
    let (dq, dk, dv) = (up(st, &q)?, up(st, &kc)?, up(st, &vc)?);
    let mut scores = zeros(st, s.t * s.heads * (s.p0 + s.t))?;
    let mut out = zeros(st, s.t * s.heads * s.hd)?;
    k.attention(
        st,
        &dq.slice(..),
        &dk.slice(..),
        &dv.slice(..),
        s,
        &mut scores.slice_mut(..),
        &mut out.slice_mut(..),
    )?;
    let mut cpu = vec![0f32; s.t * s.heads * s.hd];
    twins::attention(&q, &kc, &vc, s, &mut cpu);
    // expf may differ in its last bits.
    compare(&down(st, &out)?, &cpu, 1e-5, &|i| {
        format!(
            "query {}, head {}, dim {}",
            i / (s.heads * s.hd),
            i / s.hd % s.heads,
            i % s.hd
        )
    })
}

fn silu(k: &Kernels, st: &Arc<CudaStream>, rng: &mut Rng, t: usize, ffn: usize) -> R<()> {
    let gu: Vec<f32> = (0..2 * t * ffn).map(|_| rng.value() * 20.0).collect();
    let dgu = up(st, &gu)?;
    let mut act = zeros(st, t * ffn)?;
    k.silu_mul(st, &dgu.slice(..), t, ffn, &mut act.slice_mut(..))?;
    let mut cpu = vec![0f32; t * ffn];
    twins::silu_mul(&gu, ffn, &mut cpu);
    compare(&down(st, &act)?, &cpu, 1e-6, &|i| {
        let (r, j) = (i / ffn, i % ffn);
        format!(
            "gate {}, up {}",
            gu[r * 2 * ffn + j],
            gu[r * 2 * ffn + ffn + j]
        )
    })
}

fn add_argmax(k: &Kernels, st: &Arc<CudaStream>, rng: &mut Rng, n: usize) -> R<()> {
    let mut x: Vec<f32> = (0..n).map(|_| rng.value()).collect();
    let o: Vec<f32> = (0..n).map(|_| rng.value()).collect();
    // A tie for the largest, across threads' strides.
    if n > 300 {
        x[n - 1] = 1e30;
        x[7] = 1e30;
    }
    let (mut dx, dox) = (up(st, &x)?, up(st, &o)?);
    k.add_into(st, &mut dx.slice_mut(..), &dox.slice(..))?;
    let mut cpu = x.clone();
    twins::add_into(&mut cpu, &o);
    compare(&down(st, &dx)?, &cpu, 0.0, &|i| {
        format!("{} + {}", x[i], o[i])
    })?;
    let mut di = st.alloc_zeros::<i32>(1).map_err(|e| format!("{e:?}"))?;
    k.argmax(st, &dx.slice(..), &mut di.slice_mut(..))?;
    let (g, c) = (down(st, &di)?[0], twins::argmax(&cpu));
    if g != c {
        return Err(format!("argmax: gpu {g}, cpu twin {c}"));
    }
    Ok(())
}
