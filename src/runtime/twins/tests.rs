//! Each twin against the CPU runtime: bit for bit where both make the same operations in
//! the same order, else within a bound on f32 rounding.

use super::*;
use crate::runtime::attention::{self, Shape};
use crate::runtime::cpu;
use crate::runtime::llama::{self, Heads};

struct Rng(u64);

impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

/// Within `tol` of `want`, relative to the larger of |want| and `scale`.
fn close(got: &[f32], want: &[f32], tol: f32, scale: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(scale),
            "{what}: element {i}: twin {g}, CPU runtime {w}"
        );
    }
}

const TYPES: [WType; 5] = [
    WType::F32,
    WType::F16,
    WType::BF16,
    WType::U8Offset,
    WType::I8,
];

#[test]
fn matvec_twin_matches_the_cpu_row_products() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    // Columns that are and are not multiples of 8 and of the block; groups of 32 and 128
    // and whole rows; token counts around TOK.
    for &(rows, cols, t) in &[
        (7usize, 40usize, 1usize),
        (9, 256, 5),
        (3, 300, 4),
        (33, 1024, 2),
        (2, 13, 3),
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
                let vals = rng.vec(rows * cols);
                let (w, scales) = stored(wt, &vals, cols, group);
                let x = rng.vec(t * cols);
                let chunk = chunk_for(wt, cols, group);
                let s = MatShape {
                    t,
                    rows,
                    cols,
                    group,
                    chunk,
                };
                let mut y = vec![0f32; t * rows];
                matvec(wt, &w, &scales, &x, s, &mut y);
                let ng = cols.div_ceil(group);
                let mut want = vec![0f32; t * rows];
                for r in 0..rows {
                    let wr = &w[r * cols * wt.size()..(r + 1) * cols * wt.size()];
                    let sr = if wt.is_int8() {
                        &scales[r * ng..(r + 1) * ng]
                    } else {
                        &[][..]
                    };
                    for i in 0..t {
                        want[i * rows + r] =
                            cpu::row_dot(wt, wr, &x[i * cols..(i + 1) * cols], sr, group);
                    }
                }
                // f32 sums of `cols` products of magnitude <= 1 (times the scale).
                let scale = (cols as f32).sqrt()
                    * if wt.is_int8() {
                        127.0 * scales.iter().fold(0f32, |a, &b| a.max(b))
                    } else {
                        1.0
                    };
                close(
                    &y,
                    &want,
                    1e-5,
                    scale,
                    &format!("matvec {} [{rows}, {cols}] group {group} t {t}", wt.name()),
                );
            }
        }
    }
}

#[test]
fn matvec_reads_rows_in_the_chunk_the_kernel_can_load() {
    assert_eq!(chunk_for(WType::BF16, 5120, 5120), 8);
    assert_eq!(chunk_for(WType::BF16, 300, 300), 1);
    assert_eq!(chunk_for(WType::I8, 5120, 32), 8);
    assert_eq!(chunk_for(WType::U8Offset, 40, 4), 1);
}

#[test]
fn embed_twin_is_the_cpu_dequantized_row() {
    let mut rng = Rng(77);
    let (vocab, h) = (11, 96);
    for wt in TYPES {
        let group = if wt.is_int8() { 32 } else { h };
        let (table, scales) = stored(wt, &rng.vec(vocab * h), h, group);
        let tokens = [3u32, 0, 10, 3];
        let mut out = vec![0f32; tokens.len() * h];
        embed_rows(wt, &table, &scales, group, &tokens, h, &mut out);
        let ng = h / group;
        for (i, &tok) in tokens.iter().enumerate() {
            let r = tok as usize;
            let mut want = vec![0f32; h];
            let sr = if wt.is_int8() {
                &scales[r * ng..(r + 1) * ng]
            } else {
                &[][..]
            };
            cpu::dequant(
                wt,
                &table[r * h * wt.size()..(r + 1) * h * wt.size()],
                sr,
                group,
                &mut want,
            );
            assert_eq!(
                out[i * h..(i + 1) * h],
                want[..],
                "{} token {tok}",
                wt.name()
            );
        }
    }
}

#[test]
fn rms_norm_twin_matches_the_cpu() {
    let mut rng = Rng(5);
    for h in [64usize, 300, 5120] {
        let x: Vec<f32> = rng.vec(3 * h).iter().map(|v| v * 4.0).collect();
        let w = rng.vec(h);
        let mut a = vec![0f32; 3 * h];
        let mut b = vec![0f32; 3 * h];
        rms_norm(&x, &w, 1e-5, &mut a);
        llama::rms_norm(&x, &w, 1e-5, &mut b);
        // Only the order of the sum of squares differs.
        close(&a, &b, 2e-6, 1e-3, &format!("rms_norm h {h}"));
    }
}

#[test]
fn rope_twin_splits_and_rotates_as_the_cpu_does() {
    let mut rng = Rng(9);
    let (nh, nkv, hd, t, p0, cap) = (8usize, 2usize, 16usize, 3usize, 5usize, 12usize);
    for order in [QkvOrder::Separate, QkvOrder::Grouped] {
        let width = (nh + 2 * nkv) * hd;
        let qkv = rng.vec(t * width);
        let cos = rng.vec(t * hd / 2);
        let sin = rng.vec(t * hd / 2);
        let s = AttnShape {
            heads: nh,
            kv_heads: nkv,
            hd,
            p0,
            t,
            cap,
        };
        let mut q = vec![0f32; t * nh * hd];
        let mut kc = vec![f32::NAN; nkv * cap * hd];
        let mut vc = vec![f32::NAN; nkv * cap * hd];
        rope_qkv(&qkv, s, order, &cos, &sin, &mut q, &mut kc, &mut vc);
        let heads = Heads { order, nh, nkv, hd };
        let mut want = vec![0f32; hd];
        for i in 0..t {
            let row = &qkv[i * width..(i + 1) * width];
            let (c, sn) = (
                &cos[i * hd / 2..(i + 1) * hd / 2],
                &sin[i * hd / 2..(i + 1) * hd / 2],
            );
            for hh in 0..nh {
                llama::rope(heads.q(row, hh), c, sn, &mut want);
                assert_eq!(q[(i * nh + hh) * hd..][..hd], want[..], "{order:?} q {hh}");
            }
            for g in 0..nkv {
                llama::rope(heads.k(row, g), c, sn, &mut want);
                let at = (g * cap + p0 + i) * hd;
                assert_eq!(kc[at..at + hd], want[..], "{order:?} k {g}");
                assert_eq!(vc[at..at + hd], heads.v(row, g)[..], "{order:?} v {g}");
            }
        }
        // Positions before p0 are untouched.
        assert!(kc[..p0 * hd].iter().all(|v| v.is_nan()));
    }
}

#[test]
fn attention_twin_matches_both_cpu_paths() {
    let mut rng = Rng(31);
    let (nh, nkv, hd) = (8usize, 2usize, 32usize);
    // Decode (one query after 300 cached), and prompts through the per-query and the
    // tiled CPU paths.
    for &(p0, t) in &[(300usize, 1usize), (0, 5), (3, 100)] {
        let n = p0 + t;
        let cap = n + 7;
        let q = rng.vec(t * nh * hd);
        let keys: Vec<Vec<f32>> = (0..nkv).map(|_| rng.vec(n * hd)).collect();
        let vals: Vec<Vec<f32>> = (0..nkv).map(|_| rng.vec(n * hd)).collect();
        let mut kc = vec![0f32; nkv * cap * hd];
        let mut vc = vec![0f32; nkv * cap * hd];
        for g in 0..nkv {
            kc[g * cap * hd..][..n * hd].copy_from_slice(&keys[g]);
            vc[g * cap * hd..][..n * hd].copy_from_slice(&vals[g]);
        }
        let s = AttnShape {
            heads: nh,
            kv_heads: nkv,
            hd,
            p0,
            t,
            cap,
        };
        let mut a = vec![0f32; t * nh * hd];
        attention(&q, &kc, &vc, s, &mut a);
        let mut b = vec![0f32; t * nh * hd];
        let shape = Shape {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            p0,
            t,
        };
        attention::attend(&q, &keys, &vals, shape, &mut b, &mut Vec::new());
        close(&a, &b, 1e-5, 1e-2, &format!("attention p0 {p0} t {t}"));
    }
}

#[test]
fn silu_twin_is_the_cpu_swiglu() {
    let mut rng = Rng(3);
    let ffn = 50;
    let gu: Vec<f32> = rng.vec(2 * 2 * ffn).iter().map(|v| v * 9.0).collect();
    let mut a = vec![0f32; 2 * ffn];
    silu_mul(&gu, ffn, &mut a);
    for i in 0..2 {
        for j in 0..ffn {
            let want = llama::silu(gu[i * 2 * ffn + j]) * gu[i * 2 * ffn + ffn + j];
            assert_eq!(a[i * ffn + j], want);
        }
    }
    let mut x = vec![1.0f32, 2.0];
    add_into(&mut x, &[0.5, -2.0]);
    assert_eq!(x, [1.5, 0.0]);
}

#[test]
fn argmax_twin_picks_the_first_of_equals_as_greedy_decoding_does() {
    let mut rng = Rng(11);
    for n in [1usize, 5, 256, 257, 32000] {
        let mut x = rng.vec(n);
        // Ties: the largest value at two places, one in another thread's stride.
        if n > 300 {
            x[299] = 2.0;
            x[43] = 2.0;
            x[300 + 256] = 2.0;
        }
        let want = crate::runtime::compare::argmax(&x).unwrap() as i32;
        assert_eq!(argmax(&x), want, "n {n}");
    }
    assert_eq!(argmax(&[]), -1);
    assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
}
