//! Which rows of which logical tensor become which Hugging Face tensor, with the names
//! taken from the role table ([`roles::hf_names`]).

use crate::arch::roles::{self, Kind};
use crate::arch::Arch;

/// One HF tensor: rows `rows` (ranges, in order) of the logical tensor `key`.
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: String,
    pub key: (Kind, Option<u64>),
    pub rows: Vec<(u64, u64)>,
    pub shape: Vec<u64>,
}

/// The HF tensors of a model, in the order they are written. `has(kind, layer)` says
/// whether the source holds that logical tensor (fused gate/up or separate; an output
/// layer or tied embeddings); `vocab` is the tokenizer's size (padding rows are dropped).
pub fn plan(arch: &Arch, vocab: u64, has: impl Fn(Kind, Option<u64>) -> bool) -> Vec<Planned> {
    let mut out = Vec::new();
    let mut add = |kind: Kind, layer: Option<u64>| {
        let g = layer.unwrap_or(0);
        let shape = arch.shape(kind, vocab);
        let names = roles::hf_names(kind, g);
        for (name, rows) in names.into_iter().zip(row_ranges(arch, kind, vocab)) {
            let n: u64 = rows.iter().map(|r| r.1 - r.0).sum();
            let shape = if shape.len() == 1 {
                shape.clone()
            } else {
                vec![n, shape[1]]
            };
            out.push(Planned {
                name,
                key: (kind, layer),
                rows,
                shape,
            });
        }
    };
    add(Kind::Embedding, None);
    for g in 0..arch.layers {
        let l = Some(g);
        add(Kind::InputNorm, l);
        add(Kind::Qkv, l);
        add(Kind::AttnOut, l);
        add(Kind::PostAttnNorm, l);
        if has(Kind::GateUp, l) {
            add(Kind::GateUp, l);
        } else {
            add(Kind::Gate, l);
            add(Kind::Up, l);
        }
        add(Kind::Down, l);
    }
    add(Kind::FinalNorm, None);
    if has(Kind::Output, None) && !arch.tied {
        add(Kind::Output, None);
    }
    out
}

/// The row ranges of a logical tensor each of its HF names takes, in the order of
/// [`roles::hf_names`]: q, k and v from each query group of the fused QKV
/// (`[q heads of the group; k; v]`), gate then up from fused gate/up, the vocabulary without
/// its padding.
pub fn row_ranges(arch: &Arch, kind: Kind, vocab: u64) -> Vec<Vec<(u64, u64)>> {
    let all = |n: u64| vec![vec![(0, n)]];
    match kind {
        Kind::Embedding | Kind::Output => all(vocab),
        Kind::Qkv => {
            let (hd, groups) = (arch.head_dim, arch.groups);
            let qpg = arch.heads / groups;
            let group_rows = |first: u64, count: u64| -> Vec<(u64, u64)> {
                (0..groups)
                    .map(|grp| {
                        let base = (grp * (qpg + 2) + first) * hd;
                        (base, base + count * hd)
                    })
                    .collect()
            };
            vec![
                group_rows(0, qpg),
                group_rows(qpg, 1),
                group_rows(qpg + 1, 1),
            ]
        }
        Kind::GateUp => vec![vec![(0, arch.ffn)], vec![(arch.ffn, 2 * arch.ffn)]],
        k => {
            let s = arch.shape(k, vocab);
            all(if s.len() == 1 { 1 } else { s[0] })
        }
    }
}

/// Module names (`q_proj`, …, `lm_head`) of the linear layers, from the role table.
pub fn linear_modules() -> Vec<String> {
    [
        Kind::Qkv,
        Kind::AttnOut,
        Kind::Gate,
        Kind::Up,
        Kind::Down,
        Kind::Output,
    ]
    .iter()
    .flat_map(|&k| roles::hf_names(k, 0))
    .filter_map(|n| module_of(&n).map(str::to_string))
    .collect()
}

/// Module name (`q_proj`, `lm_head`, …) of a weight name.
pub fn module_of(name: &str) -> Option<&str> {
    let base = name.strip_suffix(".weight")?;
    Some(base.rsplit('.').next().unwrap_or(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_modules_in_order() {
        assert_eq!(
            linear_modules(),
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
                "lm_head"
            ]
        );
    }
}
