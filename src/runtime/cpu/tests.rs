//! The kernels of every level this CPU runs against f64 sums and each other.

use super::*;

fn bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn kernels_agree_with_f64_sums() {
    let n = 301;
    let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 19) as f32 - 9.0) / 8.0).collect();
    let w: Vec<f32> = (0..n)
        .map(|i| ((i * 11 % 23) as f32 - 11.0) / 16.0)
        .collect();
    let exact: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
    let bf: Vec<u8> = w
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
        .collect();
    let hf: Vec<u8> = w
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
        .collect();
    for l in simd::available() {
        for (t, b) in [
            (WType::F32, bytes_f32(&w)),
            (WType::BF16, bf.clone()),
            (WType::F16, hf.clone()),
        ] {
            let got = row_dot_on(l, t, &b, &x, &[], 0);
            assert!(
                (got as f64 - exact).abs() < 1e-4,
                "{l:?} {t:?}: {got} vs {exact}"
            );
            let mut row = vec![0f32; n];
            dequant_on(l, t, &b, &[], 0, &mut row);
            assert_eq!(row, w, "{l:?} {t:?}");
        }
    }
    // int8 with groups of 64: q = i % 255 - 127, scales 0.5, 0.25, …
    let q: Vec<i8> = (0..n).map(|i| (i % 255) as i16 as i8).collect();
    let scales: Vec<f32> = (0..n.div_ceil(64)).map(|g| 1.0 / (2 << g) as f32).collect();
    let exact: f64 = (0..n)
        .map(|i| q[i] as f64 * scales[i / 64] as f64 * x[i] as f64)
        .sum();
    let signed: Vec<u8> = q.iter().map(|v| *v as u8).collect();
    let offset: Vec<u8> = q.iter().map(|v| (*v as i16 + 128) as u8).collect();
    for l in simd::available() {
        for (t, b) in [(WType::I8, &signed), (WType::U8Offset, &offset)] {
            let got = row_dot_on(l, t, b, &x, &scales, 64);
            assert!(
                (got as f64 - exact).abs() < 1e-3,
                "{l:?} {t:?}: {got} vs {exact}"
            );
            let mut row = vec![0f32; n];
            dequant_on(l, t, b, &scales, 64, &mut row);
            for i in 0..n {
                assert_eq!(row[i], q[i] as f32 * scales[i / 64], "{l:?} {t:?} {i}");
            }
        }
        let got = dot_f32_on(l, &w, &x) as f64;
        assert!((got - exact_f32(&w, &x)).abs() < 1e-4, "{l:?}");
    }
}

/// Activations and int8 values (every byte value) of a row of `n`.
fn int8_case(n: usize) -> (Vec<f32>, Vec<i8>) {
    let x = (0..n)
        .map(|i| ((i * 29 % 31) as f32 - 15.0) / 7.0)
        .collect();
    let q = (0..n).map(|i| ((i * 97 + 13) % 256) as u8 as i8).collect();
    (x, q)
}

/// Scales of a row of `n` in groups of `group`, and `Σ q·scale·x` in f64.
fn scaled_exact(x: &[f32], q: &[i8], group: usize) -> (Vec<f32>, f64) {
    let n = x.len();
    let scales: Vec<f32> = (0..n.div_ceil(group))
        .map(|g| 0.01 + g as f32 / 64.0)
        .collect();
    let exact = (0..n)
        .map(|i| q[i] as f64 * scales[i / group] as f64 * x[i] as f64)
        .sum();
    (scales, exact)
}

/// The int8 kernels of every level, and the permuted one, against an f64 sum: both
/// formats, groups of 32, 64, 128 and one per row (channel), rows of 32 to 4096
/// columns, a short last group included (96 in groups of 64, 160 and 224 in 128).
#[test]
fn permuted_int8_agrees() {
    for n in [32usize, 96, 128, 160, 200, 224, 768, 4096] {
        let (x, q) = int8_case(n);
        let mut xp = Vec::new();
        permute32(&x, &mut xp);
        for group in [32usize, 64, 128, n] {
            let (scales, exact) = scaled_exact(&x, &q, group);
            let signed: Vec<u8> = q.iter().map(|v| *v as u8).collect();
            let offset: Vec<u8> = q.iter().map(|v| (*v as u8) ^ 0x80).collect();
            for (t, b) in [(WType::I8, signed), (WType::U8Offset, offset)] {
                let tol = 1e-5 * (1.0 + exact.abs());
                for l in simd::available() {
                    let plain = row_dot_on(l, t, &b, &x, &scales, group);
                    let what = format!("{l:?} {t:?} n {n} g {group}");
                    assert!((plain as f64 - exact).abs() < tol, "{what}");
                }
                if permuted_applies(t, n, group) {
                    let got = row_dot_permuted(t, &b, &xp, &scales, group);
                    assert!((got as f64 - exact).abs() < tol, "{t:?} n {n} g {group}");
                }
            }
        }
    }
}

/// The int8-activation kernels of every level (portable, AVX2, AVX-512 VNNI where the
/// CPU has it) against the exact sum of the same integer block products, and against the
/// f32 product within the activations' rounding; odd block counts included.
#[test]
fn a8_kernel_agrees() {
    for n in [32usize, 96, 160, 768, 4096] {
        let (x, q) = int8_case(n);
        let a = QAct::of(&x);
        // The same values behind a block of others: a part that starts at column 32.
        let mut wider = vec![0.5f32; 32];
        wider.extend_from_slice(&x);
        let behind = QAct::of(&wider);
        for group in [32usize, 64, 96, 128, n] {
            let (scales, exact) = scaled_exact(&x, &q, group);
            let portable: f64 = (0..n)
                .map(|i| {
                    q[i] as f64 * a.q[i] as f64 * a.s[i / 32] as f64 * scales[i / group] as f64
                })
                .sum();
            let bound: f64 = (0..n)
                .map(|i| (q[i] as f64 * scales[i / group] as f64).abs() * a.s[i / 32] as f64 / 2.0)
                .sum();
            let offset: Vec<u8> = q.iter().map(|v| (*v as u8) ^ 0x80).collect();
            let signed: Vec<u8> = q.iter().map(|v| *v as u8).collect();
            for (t, b) in [(WType::U8Offset, offset), (WType::I8, signed)] {
                for l in simd::available() {
                    let got = row_dot_a8_on(l, t, &b, a.cols(0, n), &scales, group);
                    let later = row_dot_a8_on(l, t, &b, behind.cols(32, n), &scales, group);
                    assert_eq!(got, later, "{l:?} {t:?} {n} {group}");
                    let got = got as f64;
                    assert!(
                        (got - portable).abs() < 1e-4 * (1.0 + portable.abs()),
                        "{l:?} {t:?} {n} {group}"
                    );
                    assert!(
                        (got - exact).abs() <= bound * 1.001 + 1e-4,
                        "{l:?} {t:?} {n} {group}"
                    );
                }
            }
        }
    }
}

fn exact_f32(w: &[f32], x: &[f32]) -> f64 {
    w.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Rows stored at every offset within a cache line (the kernels peel the elements before
/// a vector boundary), short and long, float and int8 channel, against f64 sums.
#[test]
fn rows_at_any_offset_agree_with_f64_sums() {
    for n in [5usize, 16, 37, 301] {
        let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 19) as f32 - 9.0) / 8.0).collect();
        let w: Vec<f32> = (0..n)
            .map(|i| ((i * 11 % 23) as f32 - 11.0) / 16.0)
            .collect();
        let exact: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
        let q: Vec<u8> = w.iter().map(|v| (v * 16.0) as i8 as u8).collect();
        let exact_q: f64 = q
            .iter()
            .zip(&x)
            .map(|(a, b)| *a as i8 as f64 * *b as f64)
            .sum();
        let rows = [
            (WType::F32, bytes_f32(&w), exact),
            (
                WType::BF16,
                w.iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
                    .collect(),
                exact,
            ),
            (
                WType::F16,
                w.iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
                    .collect(),
                exact,
            ),
            (WType::I8, q.clone(), exact_q),
        ];
        for l in simd::available() {
            for (t, b, want) in &rows {
                let mut buf = vec![0u8; b.len() + 128];
                let start = (64 - buf.as_ptr() as usize % 64) % 64;
                for off in 0..64 {
                    buf[start + off..start + off + b.len()].copy_from_slice(b);
                    let row = &buf[start + off..start + off + b.len()];
                    let got = row_dot_on(l, *t, row, &x, &[1.0], n);
                    assert!(
                        (got as f64 - want).abs() < 1e-4,
                        "{l:?} {t:?} n {n} offset {off}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// Every stored weight type.
const TYPES: [WType; 5] = [
    WType::F32,
    WType::BF16,
    WType::F16,
    WType::I8,
    WType::U8Offset,
];

/// `n` bytes of rows of type `t`: finite values whatever the byte for floats (a small
/// exponent byte), every byte value for int8.
fn stored_bytes(t: WType, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| match t {
            WType::BF16 | WType::F16 if i % 2 == 1 => 0x3c ^ (i % 3) as u8,
            WType::F32 if i % 4 == 3 => 0x3e ^ (i % 3) as u8,
            _ => (i * 37 % 251) as u8,
        })
        .collect()
}

/// Runs `many(out, add)`, a kernel of several rows, both writing and adding to starting
/// values, and requires each row's value to be `one(r)`, the one-row kernel's, bit for bit.
fn assert_rows_bitwise(
    rows: usize,
    what: &str,
    many: impl Fn(&mut [f32], bool),
    one: impl Fn(usize) -> f32,
) {
    for add in [false, true] {
        let mut out: Vec<f32> = (0..rows).map(|r| r as f32 - 2.5).collect();
        many(&mut out, add);
        for (r, got) in out.iter().enumerate() {
            let v = one(r);
            let want = if add { (r as f32 - 2.5) + v } else { v };
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{what} add {add}: row {r} {got} vs {want}"
            );
        }
    }
}

/// `rows_dot` against `row_dot` row by row, bit for bit, at every level: every type;
/// rows 1 to 9 (whole blocks of rows and the rest); columns short, odd and long; int8
/// groups of 32, 64, 128 (with and without a partial last group), 48 and whole rows;
/// strides a multiple of 64 bytes and not; rows starting anywhere in a cache line;
/// written and added.
#[test]
fn rows_dot_is_row_dot_bit_for_bit() {
    for t in TYPES {
        for cols in [5usize, 37, 256, 301, 768] {
            let groups: &[usize] = if t.is_int8() {
                &[32, 48, 64, 128, 1 << 20]
            } else {
                &[1 << 20]
            };
            // Values whose products and sums round, so that any change in the order of
            // the additions shows.
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.7).sin() * 1.3).collect();
            for &group in groups {
                let g = cols.div_ceil(group);
                let row_bytes = cols * t.size();
                for stride in [row_bytes, row_bytes.next_multiple_of(64), row_bytes + 24] {
                    for rows in [1usize, 4, 5, 9] {
                        let w = stored_bytes(t, rows * stride + 128);
                        let scales: Vec<f32> = (0..rows * g)
                            .map(|i| 0.3 + (i as f32 * 1.1).cos() / 7.0)
                            .collect();
                        let base = (64 - w.as_ptr() as usize % 64) % 64;
                        for off in [0, 2, 4, 12, 40] {
                            let b = Rows {
                                t,
                                w: &w[base + off..base + off + (rows - 1) * stride + row_bytes],
                                stride,
                                rows,
                                cols,
                                scales: &scales,
                                group,
                            };
                            let paths = simd::available().into_iter();
                            for (l, s) in paths.flat_map(|l| [(l, false), (l, true)]) {
                                assert_rows_bitwise(
                                    rows,
                                    &format!(
                                        "{l:?} {t:?} cols {cols} group {group} stride {stride} \
                                         rows {rows} offset {off} stream {s}"
                                    ),
                                    |out, add| rows_dot_on((l, s), &b, &x, out, add),
                                    |r| row_dot_on(l, t, b.row(r).0, &x, b.row(r).1, group),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// After `aligned_head` elements a row's loads start on a vector boundary.
#[cfg(target_arch = "x86_64")]
#[test]
fn aligned_head_reaches_a_vector_boundary() {
    for size in [1usize, 2, 4] {
        for at in 0..256usize {
            let h = avx512::aligned_head(size, at);
            if at.is_multiple_of(size) {
                assert!(
                    h < 16 && (at + h * size).is_multiple_of(16 * size),
                    "{size} {at}"
                );
            } else {
                assert_eq!(h, 0);
            }
        }
    }
}

/// `dequant_cols` against `dequant_generic` row by row, value for value: every type, 1 to
/// 17 rows (blocks of 8 and the rest), columns a multiple of 8 and not, int8 groups of 8,
/// 32, 100 (not a multiple of 8) and whole rows, rows padded apart, a leading dimension
/// past the rows; the tile's other entries untouched.
#[test]
fn tiles_are_the_rows_transposed() {
    for t in TYPES {
        for cols in [8usize, 40, 300, 768] {
            let groups: &[usize] = if t.is_int8() {
                &[8, 32, 100, 1 << 20]
            } else {
                &[1 << 20]
            };
            for &group in groups {
                let g = cols.div_ceil(group);
                for rows in [1usize, 7, 8, 9, 16, 17] {
                    let stride = cols * t.size() + 24;
                    let w = stored_bytes(t, rows * stride);
                    let scales: Vec<f32> = (0..rows * g).map(|i| 0.25 + i as f32 / 32.0).collect();
                    let b = Rows {
                        t,
                        w: &w,
                        stride,
                        rows,
                        cols,
                        scales: &scales,
                        group,
                    };
                    let ld = rows + 3;
                    let mut out = vec![f32::NAN; cols * ld];
                    let mut scratch = Vec::new();
                    dequant_cols(&b, &mut out, ld, &mut scratch);
                    for r in 0..rows {
                        let (row, sc) = b.row(r);
                        let mut want = vec![0f32; cols];
                        dequant_generic(t, row, sc, group, &mut want);
                        for c in 0..cols {
                            let got = out[c * ld + r];
                            assert!(
                                got.to_bits() == want[c].to_bits(),
                                "{t:?} cols {cols} group {group} rows {rows}: ({r}, {c}) {got} vs {}",
                                want[c]
                            );
                        }
                    }
                    for c in 0..cols {
                        for r in rows..ld {
                            assert!(out[c * ld + r].is_nan(), "{t:?} wrote past the rows");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn bf16_rounding_is_to_nearest_even() {
    let mut out = Vec::new();
    let tie_down = 1.0 + 2f32.powi(-8); // halfway between 1 and 1 + 2^-7: to 1 (even)
    let tie_up = 1.0 + 3.0 * 2f32.powi(-8); // halfway between 1 + 2^-7 and 1 + 2^-6: up
    let near = 1.0 + 2f32.powi(-8) + 2f32.powi(-20); // just above the tie: up
    round_bf16(&[tie_down, tie_up, near, -2.5, 0.0], &mut out);
    let back: Vec<f32> = out
        .iter()
        .map(|&b| f32::from_bits((b as u32) << 16))
        .collect();
    assert_eq!(
        back,
        [1.0, 1.0 + 2f32.powi(-6), 1.0 + 2f32.powi(-7), -2.5, 0.0]
    );
}

/// bf16 and int8 rows (signed and offset; one scale a row, and groups of 32 and 64) at an
/// odd byte offset and a stride past their end, against tokens of bf16 activations: every
/// level's tile (both writing and adding; every short block of rows and tokens; full and
/// masked steps; more than one block of packed rows) against f64 sums of the same
/// products, scaled per group, and nothing written outside the tile.
#[test]
fn bf16_activation_kernels_agree_with_f64_sums() {
    let bits = |v: f32| half::bf16::from_f32(v).to_bits();
    let val = |b: u16| f32::from_bits((b as u32) << 16) as f64;
    let kinds = [
        (WType::BF16, 0),
        (WType::I8, 0),
        (WType::U8Offset, 0),
        (WType::I8, 32),
        (WType::U8Offset, 64),
    ];
    // (rows, cols, tokens)
    let shapes: [(usize, usize, usize); 10] = [
        (1, 1, 1),
        (3, 31, 2),
        (4, 32, 4),
        (5, 33, 5),
        (9, 100, 7),
        (8, 768, 9),
        (2, 64, 1),
        (7, 130, 13),
        (37, 192, 8),
        (70, 64, 3),
    ];
    for (rows, cols, t) in shapes {
        for (wt, g) in kinds {
            let group = if g == 0 { cols } else { g };
            let groups = cols.div_ceil(group);
            let es = wt.size();
            let (stride, off, ldx, ldo) = (es * cols + 6, 3, cols + 3, rows + 2);
            // Each weight's value (bf16 bits, or q) and the f64 it stands for, unscaled.
            let raw: Vec<i32> = (0..rows * cols)
                .map(|i| ((i * 37 + 11) % 255) as i32 - 127)
                .collect();
            let mut w = vec![0u8; off + rows * stride];
            let mut wv = vec![0f64; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    let (at, q) = (off + r * stride + es * c, raw[r * cols + c]);
                    match wt {
                        WType::BF16 => {
                            let b = bits(q as f32 / 100.0);
                            w[at..at + 2].copy_from_slice(&b.to_le_bytes());
                            wv[r * cols + c] = val(b);
                        }
                        WType::I8 => {
                            w[at] = q as i8 as u8;
                            wv[r * cols + c] = q as f64;
                        }
                        _ => {
                            w[at] = (q + 128) as u8;
                            wv[r * cols + c] = q as f64;
                        }
                    }
                }
            }
            let scales: Vec<f32> = if wt.is_int8() {
                (0..rows * groups)
                    .map(|i| (1 + i % 7) as f32 / 512.0)
                    .collect()
            } else {
                Vec::new()
            };
            let xf: Vec<f32> = (0..t * ldx)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.3)
                .collect();
            let mut xb = Vec::new();
            round_bf16(&xf, &mut xb);
            // (the sum, the sum of the terms' magnitudes)
            let exact = |r: usize, j: usize| -> (f64, f64) {
                (0..cols)
                    .map(|c| {
                        let s = if wt.is_int8() {
                            scales[r * groups + c / group] as f64
                        } else {
                            1.0
                        };
                        s * wv[r * cols + c] * val(xb[j * ldx + c])
                    })
                    .fold((0.0, 0.0), |(s, a), p| (s + p, a + p.abs()))
            };
            let b = Rows {
                t: wt,
                w: &w[off..],
                stride,
                rows,
                cols,
                scales: &scales,
                group,
            };
            for l in simd::available() {
                for add in [false, true] {
                    let mut out = vec![1.5f32; (t - 1) * ldo + rows + 2];
                    let tile = Tile {
                        rows: &b,
                        x: &xb,
                        ldx,
                        t,
                        ldo,
                        add,
                    };
                    // SAFETY: out covers the tile, and only this thread touches it.
                    unsafe { bf16a::tile_bf16_on(l, &tile, out.as_mut_ptr(), out.len()) };
                    let name = format!("{l:?} {wt:?} g{group} {rows}x{cols} t {t} add {add}");
                    for (i, &got) in out.iter().enumerate() {
                        let (j, r) = (i / ldo, i % ldo);
                        if r >= rows || j >= t {
                            assert_eq!(got, 1.5, "{name}: wrote outside at {i}");
                            continue;
                        }
                        let (s, a) = exact(r, j);
                        let want = s + if add { 1.5 } else { 0.0 };
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * a + 1e-6,
                            "{name}: row {r} token {j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// `rows_dot_a8` against `row_dot_a8` row by row, bit for bit, at every level: rows 1 to
/// 9, columns of an odd and an even count of blocks, a channel's scale and groups of 32,
/// 64, 96 and 128, both int8 layouts, strides with and without padding, written and added.
#[test]
fn rows_dot_a8_is_row_dot_a8_bit_for_bit() {
    for cols in [96usize, 256, 768] {
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.7).sin() * 1.3).collect();
        let a = QAct::of(&x);
        for group in [32usize, 64, 96, 128, cols] {
            if !cols.is_multiple_of(group) && group != cols {
                continue;
            }
            let g = cols.div_ceil(group);
            for t in [WType::I8, WType::U8Offset] {
                for stride in [cols, cols + 24] {
                    for rows in [1usize, 4, 5, 9] {
                        let w: Vec<u8> = (0..rows * stride).map(|i| (i * 37 % 251) as u8).collect();
                        let scales: Vec<f32> = (0..rows * g)
                            .map(|i| 0.3 + (i as f32 * 1.1).cos() / 7.0)
                            .collect();
                        let b = Rows {
                            t,
                            w: &w[..(rows - 1) * stride + cols],
                            stride,
                            rows,
                            cols,
                            scales: &scales,
                            group,
                        };
                        let xa = a.cols(0, cols);
                        for l in simd::available() {
                            assert_rows_bitwise(
                                rows,
                                &format!("{l:?} {t:?} cols {cols} group {group} stride {stride}"),
                                |out, add| rows_dot_a8_on(l, &b, xa, out, add),
                                |r| row_dot_a8_on(l, t, b.row(r).0, xa, b.row(r).1, group),
                            );
                        }
                    }
                }
            }
        }
    }
}
