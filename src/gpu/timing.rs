//! Kernel-only timings for `cargo xtask bench gpu` (behind the `dev-tools` feature).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::engine::{derr, CudaEngine, BLOCK};

/// Kernel-only timings on data already on the device.
#[derive(Debug, Clone)]
pub struct KernelTimes {
    pub bytes: usize,
    /// Device-to-device copy of `bytes` (read + write).
    pub copy_s: f64,
    /// int8 per-channel quantization of `bytes` of bf16 (reads them, writes half).
    pub quantize_s: f64,
    /// bf16 -> f16 cast of `bytes` (reads and writes them).
    pub cast_s: f64,
}

impl CudaEngine {
    /// Times the kernels on `mib` MiB of bf16 rows of 5120 values, best of 5 launches each.
    pub fn kernel_times(&self, mib: usize) -> Result<KernelTimes, String> {
        let cols = 5120usize;
        let rows = (mib << 20) / (2 * cols);
        let bytes = rows * cols * 2;
        let stream = self.ctx.default_stream();
        let mut host = vec![0u8; bytes];
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        for c in host.chunks_exact_mut(2) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // bf16 values of modest magnitude.
            let v = ((seed as u16) & 0x807f) | 0x3c00;
            c.copy_from_slice(&v.to_le_bytes());
        }
        let d_in = stream.clone_htod(&host).map_err(derr("upload"))?;
        let mut d_copy = stream.alloc_zeros::<u8>(bytes).map_err(derr("alloc"))?;
        let ng = 1usize;
        let out_len = rows * cols + rows * ng * 16 + 64;
        let d_out = stream.alloc_zeros::<u8>(out_len).map_err(derr("alloc"))?;
        let d_cast = stream
            .alloc_zeros::<u8>(bytes + 1024 * 12 + 64)
            .map_err(derr("alloc"))?;
        let time = |f: &mut dyn FnMut() -> Result<(), String>| -> Result<f64, String> {
            f()?;
            stream.synchronize().map_err(derr("synchronize"))?;
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                f()?;
                stream.synchronize().map_err(derr("synchronize"))?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let copy_s = time(&mut || stream.memcpy_dtod(&d_in, &mut d_copy).map_err(derr("copy")))?;
        let (dt, rows_i, cols_i, group_i, sdt) =
            (2i32, rows as i64, cols as i32, cols as i32, 2i32);
        let q_v = d_out.slice(0..rows * cols);
        let s_v = d_out.slice(rows * cols..rows * cols + rows * 4);
        let e_v = d_out.slice(rows * cols + rows * 4..rows * cols + rows * 16);
        let st_v = d_out.slice(out_len - 16..out_len);
        let quantize_s = time(&mut || {
            let mut b = stream.launch_builder(&self.quantize);
            b.arg(&d_in)
                .arg(&dt)
                .arg(&rows_i)
                .arg(&cols_i)
                .arg(&group_i)
                .arg(&sdt);
            b.arg(&q_v).arg(&s_v).arg(&e_v).arg(&st_v);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match `quantize_int8`; buffers hold rows x cols values.
            unsafe { b.launch(cfg) }
                .map(|_| ())
                .map_err(derr("launch quantize_int8"))
        })?;
        let (from, to, n_i) = (2i32, 1i32, (rows * cols) as i64);
        let o_v = d_cast.slice(0..bytes);
        let ce_v = d_cast.slice(bytes..bytes + 1024 * 12);
        let ov_v = d_cast.slice(bytes + 1024 * 12..bytes + 1024 * 12 + 8);
        let cst_v = d_cast.slice(bytes + 1024 * 12 + 8..bytes + 1024 * 12 + 16);
        let cast_s = time(&mut || {
            let mut b = stream.launch_builder(&self.cast);
            b.arg(&d_in)
                .arg(&from)
                .arg(&o_v)
                .arg(&to)
                .arg(&n_i)
                .arg(&ov_v)
                .arg(&ce_v)
                .arg(&cst_v);
            let cfg = LaunchConfig {
                grid_dim: (1024, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match `cast_float`; buffers hold n values.
            unsafe { b.launch(cfg) }
                .map(|_| ())
                .map_err(derr("launch cast_float"))
        })?;
        Ok(KernelTimes {
            bytes,
            copy_s,
            quantize_s,
            cast_s,
        })
    }
}
