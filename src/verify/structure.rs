//! The structure check: both sides' canonical tensors streamed side by side, each hashed
//! (BLAKE3 of its canonical row-major bytes) and checked by the rule that produced it.
//!
//! | reference → candidate | rule |
//! | --- | --- |
//! | same dtype | `identical`: the same bits |
//! | bf16/f16 → f32 | `widened`: the exact cast |
//! | f32 → bf16/f16, f16 ↔ bf16 | `narrowed` / `cast`: the nearest-even rounding of each value |
//! | float → int8 | `int8`: each scale is the rule's scale, each `q` the rule applied with the stored scale |
//! | int8 → int8 | `identical`: the same `q` bytes and scale bytes |

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::arch::tp::Seg;
use crate::container::mapped::Mapped;
use crate::dtype::{self, DType};
use crate::error::Result;
use crate::io::progress::Progress;
use crate::model::{Tensor, View};
use crate::quant::{compressed, int8};

/// What one side of a tensor is.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub dtype: String,
    /// BLAKE3 of the tensor's canonical bytes (row-major, merged; the `q + 128` bytes of
    /// an int8 linear), hex.
    pub hash: String,
    /// BLAKE3 of an int8 linear's stored scales.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_hash: Option<String>,
}

/// The verdict on one tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorCheck {
    pub name: String,
    pub shape: Vec<u64>,
    /// `identical`, `widened`, `narrowed`, `cast`, `int8`, `finite` (self-check),
    /// `missing`, `unexpected`, `shape` or `unsupported`.
    pub rule: &'static str,
    pub reference: Option<Side>,
    pub candidate: Option<Side>,
    pub pass: bool,
    /// The first departure, when it fails.
    pub detail: Option<String>,
}

/// Every tensor's verdict and what reading them took.
#[derive(Debug, Clone)]
pub struct Structure {
    pub tensors: Vec<TensorCheck>,
    pub bytes: u64,
    pub secs: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    Identical,
    Widened,
    Narrowed,
    Cast,
    Int8,
    Finite,
}

impl Rule {
    fn name(self) -> &'static str {
        match self {
            Rule::Identical => "identical",
            Rule::Widened => "widened",
            Rule::Narrowed => "narrowed",
            Rule::Cast => "cast",
            Rule::Int8 => "int8",
            Rule::Finite => "finite",
        }
    }
}

fn rule_of(r: &Tensor, c: &Tensor) -> std::result::Result<Rule, String> {
    match (r.int8.is_some(), c.int8.is_some()) {
        (true, true) => return Ok(Rule::Identical),
        (true, false) => {
            return Err("the reference is int8: a float candidate cannot be checked against it (verify against the float source)".into())
        }
        (false, true) if r.dtype.is_float() => return Ok(Rule::Int8),
        _ => {}
    }
    let (a, b) = (r.dtype, c.dtype);
    if a == b {
        return Ok(Rule::Identical);
    }
    if !a.is_float() || !b.is_float() {
        return Err(format!(
            "{} cannot become {}",
            a.short_name(),
            b.short_name()
        ));
    }
    Ok(match b.size().cmp(&a.size()) {
        std::cmp::Ordering::Greater => Rule::Widened,
        std::cmp::Ordering::Less => Rule::Narrowed,
        std::cmp::Ordering::Equal => Rule::Cast,
    })
}

/// One side of a tensor being read.
struct Reader<'a> {
    files: &'a Mapped,
    t: &'a Tensor,
    /// Bytes per row as read (`q` bytes for int8).
    row_bytes: usize,
    /// The element type of the bytes read.
    elem: DType,
    hash: blake3::Hasher,
    /// int8: its scales as f32, their group, their dtype and their hash.
    int8: Option<(compressed::Packed, DType, String)>,
    /// The ranges of the rows last read.
    held: Vec<Seg>,
}

fn hex(h: &blake3::Hash) -> String {
    h.to_hex().to_string()
}

impl<'a> Reader<'a> {
    fn new(view: &'a View, t: &'a Tensor) -> Result<Reader<'a>> {
        let files = view.files();
        let int8 = match &t.int8 {
            Some(p) => {
                let base = t.name.strip_suffix(".weight").unwrap_or(&t.name);
                let packed = compressed::read_packed(
                    files,
                    base,
                    (&p.packed, &p.files[0]),
                    (&p.scale, &p.files[1]),
                    (&p.shape, &p.files[2]),
                    p.group,
                )?;
                let sb = files.slice(p.scale.offset, p.scale.nbytes());
                Some((packed, p.scale.dtype, hex(&blake3::hash(sb))))
            }
            None => None,
        };
        let elem = if int8.is_some() { DType::U8 } else { t.dtype };
        Ok(Reader {
            files,
            t,
            row_bytes: t.cols() * elem.size(),
            elem,
            hash: blake3::Hasher::new(),
            int8,
            held: Vec::new(),
        })
    }

    /// Rows `r0..r1` as stored, contiguous: the mapped bytes when they are one range, else
    /// a copy in `buf`. Hashed on the way.
    fn rows<'b>(&mut self, r0: usize, r1: usize, buf: &'b mut Vec<u8>) -> &'b [u8]
    where
        'a: 'b,
    {
        let mut segs: Vec<Seg> = Vec::new();
        for i in r0..r1 {
            self.t.row_segs(i, &mut segs);
        }
        let mut merged: Vec<Seg> = Vec::with_capacity(segs.len());
        for s in segs {
            match merged.last_mut() {
                Some(l) if l.0 + l.1 == s.0 => l.1 += s.1,
                _ => merged.push(s),
            }
        }
        for &(o, n) in &merged {
            self.files.populate(o, n);
        }
        let out: &'b [u8] = if merged.len() == 1 {
            self.files.slice(merged[0].0, merged[0].1)
        } else {
            buf.clear();
            for &(o, n) in &merged {
                buf.extend_from_slice(self.files.slice(o, n));
            }
            &buf[..]
        };
        self.hash.update(out);
        self.held = merged;
        out
    }

    /// Drops the resident pages of the rows last read (they stay in the page cache).
    fn release(&mut self) {
        for &(o, n) in &self.held {
            self.files.release(o, n);
        }
        self.held.clear();
    }

    fn side(&self) -> Side {
        Side {
            dtype: match &self.int8 {
                Some((_, sd, _)) => format!("int8 (scales {})", sd.short_name()),
                None => self.t.dtype.short_name().to_string(),
            },
            hash: hex(&self.hash.finalize()),
            scale_hash: self.int8.as_ref().map(|i| i.2.clone()),
        }
    }
}

fn f32s(b: &[u8], dt: DType) -> Vec<f32> {
    let mut v = vec![0f32; b.len() / dt.size()];
    dtype::to_f32(b, dt, &mut v);
    v
}

/// Where `c` (rows `r0..` of the candidate) departs from `a` (the reference's) by `rule`.
fn departure(rule: Rule, r: &Reader, c: &Reader, r0: usize, a: &[u8], b: &[u8]) -> Option<String> {
    let cols = r.t.cols();
    let at = |e: usize| format!("[{}, {}]", r0 + e / cols, e % cols);
    match rule {
        Rule::Identical => {
            if a == b {
                // int8 on both sides: the scales are compared once, at the end.
                return None;
            }
            let e = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0) / r.elem.size();
            let w = r.elem.size();
            let (x, y) = (&a[e * w..(e + 1) * w], &b[e * w..(e + 1) * w]);
            Some(if r.elem.is_float() {
                format!(
                    "element {} is {:e} in the candidate, {:e} in the reference (not the same bits)",
                    at(e),
                    f32s(y, r.elem)[0],
                    f32s(x, r.elem)[0]
                )
            } else {
                format!("element {} differs (bytes {y:02x?} vs {x:02x?})", at(e))
            })
        }
        Rule::Widened | Rule::Narrowed | Rule::Cast => {
            match dtype::cast_mismatch(a, r.elem, b, c.elem) {
                Ok(None) => None,
                Ok(Some(e)) => {
                    let (w, v) = (r.elem.size(), c.elem.size());
                    Some(format!(
                        "element {} is {:e} in the candidate, but the reference's {:e} {} to {}",
                        at(e),
                        f32s(&b[e * v..(e + 1) * v], c.elem)[0],
                        f32s(&a[e * w..(e + 1) * w], r.elem)[0],
                        if rule == Rule::Widened {
                            "casts exactly"
                        } else {
                            "rounds (nearest even)"
                        },
                        f32s(&dtype_round(&a[e * w..(e + 1) * w], r.elem, c.elem), c.elem)[0]
                    ))
                }
                Err(e) => Some(e),
            }
        }
        Rule::Int8 => {
            let (packed, sd, _) = c.int8.as_ref().expect("int8 side");
            let ng = packed.inp.div_ceil(packed.group);
            for (k, (x, q)) in a.chunks(r.row_bytes).zip(b.chunks(c.row_bytes)).enumerate() {
                let row = r0 + k;
                let x = f32s(x, r.elem);
                let scales = &packed.scales[row * ng..(row + 1) * ng];
                match int8::check_row(&x, q, scales, packed.group, *sd) {
                    Ok(None) => {}
                    Ok(Some(int8::RowMismatch::Scale { group, stored, rule })) => {
                        return Some(format!(
                            "row {row}: scale of group {group} is {stored:e}, the rule gives {rule:e}"
                        ))
                    }
                    Ok(Some(int8::RowMismatch::Value { col, stored, rule })) => {
                        return Some(format!(
                            "element [{row}, {col}]: q is {stored}, the rule with the stored scale gives {rule}"
                        ))
                    }
                    Err(e) => return Some(format!("row {row} of the reference: {e:?}")),
                }
            }
            None
        }
        Rule::Finite => {
            let v = f32s(a, r.elem);
            v.iter()
                .position(|x| !x.is_finite())
                .map(|e| format!("element {} is {}", at(e), v[e]))
        }
    }
}

fn dtype_round(x: &[u8], from: DType, to: DType) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = dtype::convert(x, from, to, &mut out);
    out
}

/// Bytes per chunk of rows read at once.
const CHUNK: usize = 4 << 20;

/// Streams `r` (and `c`, when comparing) in chunks of rows; returns the verdict.
fn stream(
    rv: &View,
    r: &Tensor,
    cv: Option<(&View, &Tensor)>,
    rule: Rule,
    bar: &Progress,
) -> TensorCheck {
    let fail = |detail: String| TensorCheck {
        name: r.name.clone(),
        shape: r.shape.clone(),
        rule: rule.name(),
        reference: None,
        candidate: None,
        pass: false,
        detail: Some(detail),
    };
    let mut rr = match Reader::new(rv, r) {
        Ok(x) => x,
        Err(e) => return fail(format!("reference: {e}")),
    };
    let mut cr = match cv.map(|(v, t)| Reader::new(v, t)).transpose() {
        Ok(x) => x,
        Err(e) => return fail(format!("candidate: {e}")),
    };
    let rows = r.rows();
    let step = (CHUNK / rr.row_bytes.max(1)).clamp(1, rows.max(1));
    let (mut ba, mut bb) = (Vec::new(), Vec::new());
    let mut detail = None;
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + step).min(rows);
        let a = rr.rows(r0, r1, &mut ba);
        let b = cr.as_mut().map(|c| c.rows(r0, r1, &mut bb));
        if detail.is_none() {
            detail = match (&cr, b) {
                (Some(c), Some(b)) => departure(rule, &rr, c, r0, a, b),
                _ => departure(rule, &rr, &rr, r0, a, a),
            };
        }
        bar.inc((a.len() + b.map_or(0, <[u8]>::len)) as u64);
        rr.release();
        if let Some(c) = cr.as_mut() {
            c.release();
        }
        r0 = r1;
    }
    if let (None, Some(c), Rule::Identical) = (&detail, &cr, rule) {
        if let (Some(x), Some(y)) = (&rr.int8, &c.int8) {
            if x.0.scales != y.0.scales || x.1 != y.1 || x.0.group != y.0.group {
                detail = Some("the int8 scales differ".into());
            }
        }
    }
    let (reference, candidate) = match &cr {
        Some(c) => (Some(rr.side()), Some(c.side())),
        None => (None, Some(rr.side())),
    };
    TensorCheck {
        name: r.name.clone(),
        shape: r.shape.clone(),
        rule: rule.name(),
        reference,
        candidate,
        pass: detail.is_none(),
        detail,
    }
}

fn tensor_bytes(t: &Tensor) -> u64 {
    t.rows() as u64
        * t.cols() as u64
        * if t.int8.is_some() {
            1
        } else {
            t.dtype.size() as u64
        }
}

fn unmatched(t: &Tensor, rule: &'static str, detail: String) -> TensorCheck {
    TensorCheck {
        name: t.name.clone(),
        shape: t.shape.clone(),
        rule,
        reference: None,
        candidate: None,
        pass: false,
        detail: Some(detail),
    }
}

/// Checks every tensor of `cand` against `reference` by name, shape and rule.
pub fn compare(reference: &View, cand: &View, progress: bool) -> Structure {
    let t0 = Instant::now();
    let pairs: Vec<(&Tensor, Option<&Tensor>)> = reference
        .tensors
        .iter()
        .map(|t| (t, cand.get(&t.name)))
        .collect();
    let total: u64 = pairs
        .iter()
        .map(|(r, c)| tensor_bytes(r) + c.map_or(0, tensor_bytes))
        .sum();
    let bar = Progress::bytes(total, "hashing", progress);
    let mut tensors: Vec<TensorCheck> = pairs
        .par_iter()
        .map(|&(r, c)| match c {
            None => unmatched(
                r,
                "missing",
                format!("not in the candidate ({})", cand.display()),
            ),
            Some(c) if c.shape != r.shape => unmatched(
                r,
                "shape",
                format!(
                    "shape {:?} in the candidate, {:?} in the reference",
                    c.shape, r.shape
                ),
            ),
            Some(c) => match rule_of(r, c) {
                Ok(rule) => stream(reference, r, Some((cand, c)), rule, &bar),
                Err(why) => unmatched(r, "unsupported", why),
            },
        })
        .collect();
    for c in &cand.tensors {
        if reference.get(&c.name).is_none() {
            tensors.push(unmatched(
                c,
                "unexpected",
                format!("not in the reference ({})", reference.display()),
            ));
        }
    }
    bar.finish();
    Structure {
        tensors,
        bytes: total,
        secs: t0.elapsed().as_secs_f64(),
    }
}

/// Self-check: every tensor hashed, every float value finite (an int8 linear's scales
/// are checked finite when they are read).
pub fn finite(view: &View, progress: bool) -> Structure {
    let t0 = Instant::now();
    let total: u64 = view.tensors.iter().map(tensor_bytes).sum();
    let bar = Progress::bytes(total, "hashing", progress);
    let tensors = view
        .tensors
        .par_iter()
        .map(|t| {
            let rule = if t.int8.is_some() || !t.dtype.is_float() {
                Rule::Identical
            } else {
                Rule::Finite
            };
            let mut c = stream(view, t, None, rule, &bar);
            c.rule = Rule::Finite.name();
            c
        })
        .collect();
    bar.finish();
    Structure {
        tensors,
        bytes: total,
        secs: t0.elapsed().as_secs_f64(),
    }
}
