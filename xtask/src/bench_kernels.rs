//! `bench kernels`: each weight-row kernel of the CPU runtime on its own, as bytes/s of
//! weights read against the measured memory read bandwidth (the decode limit), and the
//! batched product (the prompt's) as GFLOP/s.

use std::time::Instant;

use anyhow::Result;
use steerlm_convert::runtime::cpu::{self, WType};

use crate::bench::{map_copy, read_bandwidth, MappedFile};

/// A matrix's bytes: on the heap (the in-cache case) or in a read-only mapping of a file,
/// as the runtime reads a model's weights.
enum Bytes {
    Heap(Vec<u8>),
    Mapped(MappedFile),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Heap(v) => v,
            Bytes::Mapped(m) => m,
        }
    }
}

/// A weight matrix as the runtime sees it.
struct Matrix {
    t: WType,
    rows: usize,
    cols: usize,
    group: usize,
    bytes: Bytes,
    scales: Vec<f32>,
    /// Against int8 activations (`generate --int8-activations`).
    a8: bool,
}

impl Matrix {
    fn new(t: WType, rows: usize, cols: usize, group: usize, a8: bool) -> Matrix {
        let n = rows * cols * t.size();
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut bytes = vec![0u8; n];
        for b in bytes.chunks_mut(8) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            for (i, v) in b.iter_mut().enumerate() {
                *v = (s >> (8 * i)) as u8;
            }
        }
        // Floats of a trained layer's size, random sign and mantissa, |w| in [2^-7, 2^-5):
        // no subnormal weights or products, which some cores handle in microcode at a
        // fraction of the speed (real weights have none either).
        match t {
            WType::BF16 => bytes
                .chunks_mut(2)
                .for_each(|e| e[1] = (e[1] & 0x81) | 0x3c),
            WType::F32 => bytes
                .chunks_mut(4)
                .for_each(|e| e[3] = (e[3] & 0x81) | 0x3c),
            WType::F16 => bytes
                .chunks_mut(2)
                .for_each(|e| e[1] = (e[1] & 0x87) | 0x20),
            _ => {}
        }
        let group = if t.is_int8() { group } else { 0 };
        let scales = if t.is_int8() {
            vec![1.0 / 127.0; rows * cols.div_ceil(group)]
        } else {
            Vec::new()
        };
        Matrix {
            t,
            rows,
            cols,
            group,
            bytes: Bytes::Heap(bytes),
            scales,
            a8,
        }
    }

    /// The same matrix read from a file in `dir` through a read-only mapping, as decoding
    /// reads a model.
    fn mapped(mut self, dir: &std::path::Path) -> Result<Matrix> {
        self.bytes = Bytes::Mapped(map_copy(dir, &self.bytes)?);
        Ok(self)
    }

    fn row_bytes(&self) -> usize {
        self.cols * self.t.size()
    }

    /// `y = W x` over rows `r0..r1` (`qa`: `x` quantized, for a8).
    fn matvec(&self, x: &[f32], qa: &cpu::QAct, r0: usize, r1: usize, y: &mut [f32]) {
        let rb = self.row_bytes();
        let g = if self.group == 0 {
            0
        } else {
            self.cols.div_ceil(self.group)
        };
        // As the runtime does: int8 rows against activations permuted once per product
        // (quantized once for a8, `qa`), bf16 rows against them in pairs order.
        let mut xp = Vec::new();
        let permuted = !self.a8 && cpu::permuted_applies(self.t, self.cols, self.group);
        let pairs = cpu::pairs_apply(self.t);
        if permuted {
            cpu::permute32(x, &mut xp);
        } else if pairs {
            cpu::pair32(x, &mut xp);
        }
        if !permuted {
            // As the runtime does: a task's rows at once.
            let rows = cpu::Rows {
                t: self.t,
                w: &self.bytes[r0 * rb..r1 * rb],
                stride: rb,
                rows: r1 - r0,
                cols: self.cols,
                scales: if g == 0 {
                    &[]
                } else {
                    &self.scales[r0 * g..r1 * g]
                },
                group: self.group,
            };
            if self.a8 {
                cpu::rows_dot_a8(&rows, qa.cols(0, self.cols), y, false);
            } else if pairs {
                cpu::rows_dot_pairs(&rows, &xp, y, false);
            } else {
                cpu::rows_dot(&rows, x, y, false);
            }
            return;
        }
        for r in r0..r1 {
            let sc = if g == 0 {
                &[][..]
            } else {
                &self.scales[r * g..(r + 1) * g]
            };
            let w = &self.bytes[r * rb..(r + 1) * rb];
            y[r - r0] = if self.a8 {
                cpu::row_dot_a8(self.t, w, qa.cols(0, self.cols), sc, self.group)
            } else if permuted {
                cpu::row_dot_permuted(self.t, w, &xp, sc, self.group)
            } else {
                cpu::row_dot(self.t, w, x, sc, self.group)
            };
        }
    }
}

/// Seconds per pass of `y = W x` over every row, split by rows over `threads` threads
/// that each make `reps` passes over their rows (one start, so that small matrices
/// measure the kernel and not the thread start).
fn time_matvec(m: &Matrix, threads: usize, reps: usize) -> f64 {
    let x: Vec<f32> = (0..m.cols).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let qa = if m.a8 {
        cpu::QAct::of(&x)
    } else {
        cpu::QAct::new()
    };
    let mut y = vec![0f32; m.rows];
    let per = m.rows.div_ceil(threads);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for (i, ys) in y.chunks_mut(per).enumerate() {
            let (x, qa) = (&x, &qa);
            s.spawn(move || {
                for _ in 0..reps {
                    m.matvec(x, qa, i * per, i * per + ys.len(), ys);
                    std::hint::black_box(&ys);
                }
            });
        }
    });
    t0.elapsed().as_secs_f64() / reps as f64
}

pub fn kernels(args: &[String]) -> Result<()> {
    // `--cols N`: the rows' width (4096 by default; the 134M model's are 768 and 2048,
    // where a row's fixed costs weigh more).
    let mut cols = 4096usize;
    let mut names = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--cols" {
            let v = it
                .next()
                .ok_or_else(|| anyhow::anyhow!("--cols needs a value"))?;
            cols = v
                .parse()
                .map_err(|_| anyhow::anyhow!("--cols {v}: not a count"))?;
            anyhow::ensure!(cols >= 16, "--cols {cols}: at least 16");
        } else {
            names.push(a.clone());
        }
    }
    let args = &names[..];
    let max_t = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(2);
    let bws: Vec<f64> = (1..=max_t).map(read_bandwidth).collect();
    println!("kernel isa: {}, rows of {cols} columns", cpu::isa());
    for (i, b) in bws.iter().enumerate() {
        println!("memory read bandwidth: {b:.1} GB/s ({} threads)", i + 1);
    }
    println!(
        "{:<14} {:>7} {:>12} {:>10} {:>14}",
        "weights", "threads", "memory GB/s", "of limit", "in-cache GB/s"
    );
    let kinds: [(&str, WType, usize, bool); 10] = [
        ("f32", WType::F32, 0, false),
        ("bf16", WType::BF16, 0, false),
        ("f16", WType::F16, 0, false),
        ("int8 channel", WType::I8, 4096, false),
        ("int8 g128", WType::I8, 128, false),
        ("int8 g32", WType::I8, 32, false),
        ("int8 u8 g32", WType::U8Offset, 32, false),
        ("a8 channel", WType::I8, 4096, true),
        ("a8 g128", WType::I8, 128, true),
        ("a8 g32", WType::I8, 32, true),
    ];
    let wanted = |name: &str| args.is_empty() || args.iter().any(|a| name.contains(a.as_str()));
    for (name, t, group, a8) in kinds.into_iter().filter(|k| wanted(k.0)) {
        // 1 GiB of weights from memory (well past any L3, as the bandwidth's buffer), read
        // through a file mapping as a model is; 256 KiB (L2) per thread in cache.
        let big = Matrix::new(t, (1 << 30) / (cols * t.size()), cols, group, a8)
            .mapped(std::path::Path::new("target/bench"))?;
        let small = Matrix::new(t, (256 << 10) * max_t / (cols * t.size()), cols, group, a8);
        for th in 1..=max_t {
            let s = (0..3)
                .map(|_| time_matvec(&big, th, 2))
                .fold(f64::MAX, f64::min);
            let gbs = big.bytes.len() as f64 / s / 1e9;
            let sc = (0..20)
                .map(|_| time_matvec(&small, th, 100))
                .fold(f64::MAX, f64::min);
            let gbc = small.bytes.len() as f64 / sc / 1e9;
            println!(
                "{:<14} {:>7} {:>12.1} {:>9.0}% {:>14.1}",
                name,
                th,
                gbs,
                100.0 * gbs / bws[th - 1],
                gbc
            );
        }
    }
    println!(
        "memory GB/s = weight bytes / time of one pass over a matrix far larger than the\n\
         caches, mapped from a file in target/bench (the decode case); of limit = that / the read bandwidth at the same thread\n\
         count; in-cache = the same kernel on 256 KiB of weights per thread (its compute ceiling);\n\
         a8 = int8 rows against int8 activations (--int8-activations, opt-in)."
    );
    Ok(())
}
