//! Launches of the runtime's kernels (`kernels/runtime.cu`). Each wrapper checks that the
//! buffers hold what its kernel indexes, so that a wrong size is an error here rather than
//! a stray access on the device; the shapes are those of the CPU twins
//! (`runtime::twins`).

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
};

use crate::gpu::Source;
use crate::runtime::cpu::WType;
use crate::runtime::llama::QkvOrder;
use crate::runtime::twins::{self, AttnShape, MatShape, BLOCK};

/// The runtime's kernels, loaded into one context.
pub struct Kernels {
    embed: CudaFunction,
    rms: CudaFunction,
    rope: CudaFunction,
    attn: CudaFunction,
    silu: CudaFunction,
    add: CudaFunction,
    matvec: CudaFunction,
    argmax: CudaFunction,
}

/// An input of `n` elements, or why not.
fn need<T>(what: &str, have: usize, n: usize) -> Result<(), String> {
    if have < n {
        return Err(format!(
            "{what}: a buffer of {have} {} where the kernel reads {n}",
            std::any::type_name::<T>()
        ));
    }
    Ok(())
}

fn cfg(grid: (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0.max(1), grid.1.max(1), 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn i32_of(v: usize, what: &str) -> Result<i32, String> {
    i32::try_from(v).map_err(|_| format!("{what} {v} is too large for the kernels"))
}

/// Blocks of a grid-stride loop over `n` elements.
fn stride_blocks(n: usize) -> u32 {
    n.div_ceil(BLOCK).clamp(1, 4096) as u32
}

/// A weight matrix on the device, as `matvec` and `embed_rows` read it.
pub struct WeightRef<'a> {
    pub wt: WType,
    pub w: CudaView<'a, u8>,
    /// int8: `rows × ceil(cols / group)` scales; otherwise at least one (unread) value.
    pub scales: CudaView<'a, f32>,
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
}

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>, src: &Source) -> Result<Kernels, String> {
        // The entry points in the order `gpu::KERNELS` lists them for runtime.cu.
        let file = crate::gpu::KERNELS
            .iter()
            .find(|k| k.file == "runtime.cu")
            .ok_or("no runtime.cu kernels")?;
        let mut f = crate::gpu::functions(ctx, file.file, file.entries, src)?.into_iter();
        let mut next = || f.next().ok_or("runtime.cu lacks an entry point");
        Ok(Kernels {
            embed: next()?,
            rms: next()?,
            rope: next()?,
            attn: next()?,
            silu: next()?,
            add: next()?,
            matvec: next()?,
            argmax: next()?,
        })
    }

    /// `out` (`tokens × cols`) = the rows `tokens` of `table`; the ids are checked
    /// against its rows and go up through `dev_tokens`.
    pub fn embed_rows(
        &self,
        st: &Arc<CudaStream>,
        table: &WeightRef<'_>,
        tokens: &[u32],
        dev_tokens: &mut CudaViewMut<'_, u32>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), String> {
        let (t, h) = (tokens.len(), table.cols);
        if let Some(bad) = tokens.iter().find(|&&v| v as usize >= table.rows) {
            return Err(format!(
                "token id {bad} is outside the embedding's {} rows",
                table.rows
            ));
        }
        need::<u32>("embed_rows tokens", dev_tokens.len(), t)?;
        st.memcpy_htod(tokens, &mut dev_tokens.slice_mut(0..t))
            .map_err(|e| format!("uploading tokens: {e:?}"))?;
        let tokens = dev_tokens.slice(0..t);
        need::<u8>(
            "embed_rows table",
            table.w.len(),
            table.rows * h * table.wt.size(),
        )?;
        if table.wt.is_int8() {
            need::<f32>(
                "embed_rows scales",
                table.scales.len(),
                table.rows * h.div_ceil(table.group),
            )?;
        }
        need::<f32>("embed_rows out", out.len(), t * h)?;
        let (wt, group, h_i) = (
            twins::wt_code(table.wt),
            i32_of(table.group, "group")?,
            i32_of(h, "hidden")?,
        );
        let mut b = st.launch_builder(&self.embed);
        b.arg(&table.w)
            .arg(&wt)
            .arg(&table.scales)
            .arg(&group)
            .arg(&tokens)
            .arg(&h_i)
            .arg(out);
        // SAFETY: the arguments are `embed_rows`'s; the sizes and token ids were checked.
        unsafe { b.launch(cfg((t as u32, 1), BLOCK as u32)) }
            .map(|_| ())
            .map_err(|e| format!("embed_rows: {e:?}"))
    }

    /// `out` = RMSNorm of each `w.len()`-wide row of `x`.
    pub fn rms_norm(
        &self,
        st: &Arc<CudaStream>,
        x: &CudaView<'_, f32>,
        w: &CudaView<'_, f32>,
        eps: f32,
        rows: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), String> {
        let h = w.len();
        need::<f32>("rms_norm x", x.len(), rows * h)?;
        need::<f32>("rms_norm out", out.len(), rows * h)?;
        let h_i = i32_of(h, "hidden")?;
        let mut b = st.launch_builder(&self.rms);
        b.arg(x).arg(w).arg(&h_i).arg(&eps).arg(out);
        // SAFETY: `rms_norm`'s arguments; sizes checked.
        unsafe { b.launch(cfg((rows as u32, 1), BLOCK as u32)) }
            .map(|_| ())
            .map_err(|e| format!("rms_norm: {e:?}"))
    }

    /// Rotated queries into `q` and keys and values into one layer's cache.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_qkv(
        &self,
        st: &Arc<CudaStream>,
        qkv: &CudaView<'_, f32>,
        s: AttnShape,
        order: QkvOrder,
        cos: &CudaView<'_, f32>,
        sin: &CudaView<'_, f32>,
        q: &mut CudaViewMut<'_, f32>,
        k_cache: &mut CudaViewMut<'_, f32>,
        v_cache: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), String> {
        let (nh, nkv, hd) = (s.heads, s.kv_heads, s.hd);
        if nkv == 0 || nh % nkv != 0 || hd % 2 != 0 || s.p0 + s.t > s.cap {
            return Err(format!("rope_qkv: bad shape {s:?}"));
        }
        need::<f32>("rope_qkv qkv", qkv.len(), s.t * (nh + 2 * nkv) * hd)?;
        need::<f32>("rope_qkv cos", cos.len().min(sin.len()), s.t * hd / 2)?;
        need::<f32>("rope_qkv q", q.len(), s.t * nh * hd)?;
        need::<f32>(
            "rope_qkv cache",
            k_cache.len().min(v_cache.len()),
            nkv * s.cap * hd,
        )?;
        let ord = i32::from(order == QkvOrder::Grouped);
        let (nh_i, nkv_i, hd_i) = (
            i32_of(nh, "heads")?,
            i32_of(nkv, "kv heads")?,
            i32_of(hd, "head size")?,
        );
        let (p0, cap) = (i32_of(s.p0, "position")?, i32_of(s.cap, "cache")?);
        let mut b = st.launch_builder(&self.rope);
        b.arg(qkv)
            .arg(&nh_i)
            .arg(&nkv_i)
            .arg(&hd_i)
            .arg(&ord)
            .arg(cos)
            .arg(sin);
        b.arg(&p0).arg(&cap).arg(q).arg(k_cache).arg(v_cache);
        let grid = (s.t as u32, (nh + 2 * nkv) as u32);
        // SAFETY: `rope_qkv`'s arguments; sizes and positions checked.
        unsafe { b.launch(cfg(grid, BLOCK as u32)) }
            .map(|_| ())
            .map_err(|e| format!("rope_qkv: {e:?}"))
    }

    /// `out` = causal attention of `q` against the layer's cache; `scores` is scratch of
    /// at least `t × heads × (p0 + t)` floats.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        st: &Arc<CudaStream>,
        q: &CudaView<'_, f32>,
        k_cache: &CudaView<'_, f32>,
        v_cache: &CudaView<'_, f32>,
        s: AttnShape,
        scores: &mut CudaViewMut<'_, f32>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), String> {
        let (nh, nkv, hd) = (s.heads, s.kv_heads, s.hd);
        if nkv == 0 || nh % nkv != 0 || s.p0 + s.t > s.cap {
            return Err(format!("attention: bad shape {s:?}"));
        }
        need::<f32>("attention q", q.len(), s.t * nh * hd)?;
        need::<f32>(
            "attention cache",
            k_cache.len().min(v_cache.len()),
            nkv * s.cap * hd,
        )?;
        need::<f32>("attention scores", scores.len(), s.t * nh * (s.p0 + s.t))?;
        need::<f32>("attention out", out.len(), s.t * nh * hd)?;
        let (nh_i, nkv_i, hd_i) = (
            i32_of(nh, "heads")?,
            i32_of(nkv, "kv heads")?,
            i32_of(hd, "head size")?,
        );
        let (p0, t, cap) = (
            i32_of(s.p0, "position")?,
            i32_of(s.t, "tokens")?,
            i32_of(s.cap, "cache")?,
        );
        let mut b = st.launch_builder(&self.attn);
        b.arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(&nh_i)
            .arg(&nkv_i)
            .arg(&hd_i);
        b.arg(&p0).arg(&t).arg(&cap).arg(scores).arg(out);
        // SAFETY: `attention`'s arguments; sizes checked.
        unsafe { b.launch(cfg((nh as u32, s.t as u32), BLOCK as u32)) }
            .map(|_| ())
            .map_err(|e| format!("attention: {e:?}"))
    }

    /// `act` (`t × ffn`) = SwiGLU of `gu` (`t × 2·ffn`).
    pub fn silu_mul(
        &self,
        st: &Arc<CudaStream>,
        gu: &CudaView<'_, f32>,
        t: usize,
        ffn: usize,
        act: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), String> {
        need::<f32>("silu_mul gu", gu.len(), 2 * t * ffn)?;
        need::<f32>("silu_mul act", act.len(), t * ffn)?;
        let (t_i, ffn_i) = (t as i64, i32_of(ffn, "ffn")?);
        let mut b = st.launch_builder(&self.silu);
        b.arg(gu).arg(&t_i).arg(&ffn_i).arg(act);
        // SAFETY: `silu_mul`'s arguments; sizes checked.
        unsafe { b.launch(cfg((stride_blocks(t * ffn), 1), BLOCK as u32)) }
            .map(|_| ())
            .map_err(|e| format!("silu_mul: {e:?}"))
    }

    /// `x += o` over `o.len()` values.
    pub fn add_into(
        &self,
        st: &Arc<CudaStream>,
        x: &mut CudaViewMut<'_, f32>,
        o: &CudaView<'_, f32>,
    ) -> Result<(), String> {
        need::<f32>("add_into x", x.len(), o.len())?;
        let n = o.len() as i64;
        let mut b = st.launch_builder(&self.add);
        b.arg(x).arg(o).arg(&n);
        // SAFETY: `add_into`'s arguments; sizes checked.
        unsafe { b.launch(cfg((stride_blocks(o.len()), 1), BLOCK as u32)) }
            .map(|_| ())
            .map_err(|e| format!("add_into: {e:?}"))
    }

    /// `y` (`t × rows`) = `w` times each of the `t` rows of `x`.
    pub fn matvec(
        &self,
        st: &Arc<CudaStream>,
        w: &WeightRef<'_>,
        x: &CudaView<'_, f32>,
        t: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), String> {
        let s = MatShape {
            t,
            rows: w.rows,
            cols: w.cols,
            group: w.group,
            chunk: twins::chunk_for(w.wt, w.cols, w.group),
        };
        need::<u8>("matvec weights", w.w.len(), s.rows * s.cols * w.wt.size())?;
        if w.wt.is_int8() {
            need::<f32>(
                "matvec scales",
                w.scales.len(),
                s.rows * s.cols.div_ceil(s.group),
            )?;
        }
        need::<f32>("matvec x", x.len(), t * s.cols)?;
        need::<f32>("matvec y", y.len(), t * s.rows)?;
        let (wt, group, chunk) = (
            twins::wt_code(w.wt),
            i32_of(s.group, "group")?,
            s.chunk as i32,
        );
        let (t_i, rows, cols) = (
            i32_of(t, "tokens")?,
            s.rows as i64,
            i32_of(s.cols, "columns")?,
        );
        let mut b = st.launch_builder(&self.matvec);
        b.arg(&w.w).arg(&wt).arg(&w.scales).arg(&group).arg(&chunk);
        b.arg(x).arg(&t_i).arg(&rows).arg(&cols).arg(y);
        let blocks = s.rows.div_ceil(BLOCK / 32) as u32;
        // SAFETY: `matvec`'s arguments; sizes checked. Wide loads need 16-byte aligned rows,
        // which `chunk_for` gives only for columns that are multiples of 8 (device
        // allocations are 256-byte aligned and each weight starts its own).
        unsafe { b.launch(cfg((blocks, 1), BLOCK as u32)) }
            .map(|_| ())
            .map_err(|e| format!("matvec: {e:?}"))
    }

    /// The index of the largest of `x`, written to `out[0]`.
    pub fn argmax(
        &self,
        st: &Arc<CudaStream>,
        x: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, i32>,
    ) -> Result<(), String> {
        need::<i32>("argmax out", out.len(), 1)?;
        let n = i32_of(x.len(), "values")?;
        let mut b = st.launch_builder(&self.argmax);
        b.arg(x).arg(&n).arg(out);
        // SAFETY: `argmax`'s arguments; sizes checked.
        unsafe { b.launch(cfg((1, 1), BLOCK as u32)) }
            .map(|_| ())
            .map_err(|e| format!("argmax: {e:?}"))
    }
}
