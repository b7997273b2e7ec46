//! The rank grid of an archive's torch checkpoints, from member names alone.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// How the weights are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutKind {
    /// One `model_weights.ckpt` at the root (TP = PP = 1).
    Single,
    /// `mp_rank_XX/model_weights.ckpt` (PP = 1).
    TensorParallel,
    /// `tp_rank_XX_pp_rank_YYY/model_weights.ckpt`.
    TensorPipeline,
    /// `model_weights/` distributed checkpoint.
    Distributed,
}

impl LayoutKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            LayoutKind::Single => "single file",
            LayoutKind::TensorParallel => "mp_rank folders",
            LayoutKind::TensorPipeline => "tp_rank/pp_rank folders",
            LayoutKind::Distributed => "distributed checkpoint",
        }
    }
}

/// The grid found in the archive: member name of each (tp, pp) rank.
#[derive(Debug, Clone)]
pub struct RankGrid {
    pub kind: LayoutKind,
    pub tp: u64,
    pub pp: u64,
    /// (tp rank, pp rank) → member name.
    pub files: BTreeMap<(u64, u64), String>,
}

/// The member name NeMo uses for rank (`tp`, `pp`) of a `tp_size` × `pp_size` grid.
pub fn rank_member(tp: u64, pp: u64, tp_size: u64, pp_size: u64) -> String {
    if pp_size > 1 {
        format!("tp_rank_{tp:02}_pp_rank_{pp:03}/model_weights.ckpt")
    } else if tp_size > 1 {
        format!("mp_rank_{tp:02}/model_weights.ckpt")
    } else {
        "model_weights.ckpt".into()
    }
}

/// The weight file names a rank folder can hold: NeMo's torch checkpoint, or the
/// safetensors file `reshard --format safetensors` writes.
pub const WEIGHT_FILES: [&str; 2] = ["model_weights.ckpt", "model.safetensors"];

fn parse_rank_folder(name: &str) -> Option<(LayoutKind, u64, u64)> {
    let (folder, file) = name.rsplit_once('/')?;
    if !WEIGHT_FILES.contains(&file) {
        return None;
    }
    if let Some(tp) = folder.strip_prefix("mp_rank_") {
        return Some((LayoutKind::TensorParallel, tp.parse().ok()?, 0));
    }
    let rest = folder.strip_prefix("tp_rank_")?;
    let (tp, pp) = rest.split_once("_pp_rank_")?;
    Some((
        LayoutKind::TensorPipeline,
        tp.parse().ok()?,
        pp.parse().ok()?,
    ))
}

/// Detects the grid from member names and checks it against the config's sizes.
pub fn detect<'a>(
    names: impl Iterator<Item = &'a str>,
    cfg_tp: u64,
    cfg_pp: u64,
    file: &str,
) -> Result<RankGrid> {
    let err = |msg: String| Error::Layout {
        file: file.to_string(),
        msg,
    };
    let mut found: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut kinds = Vec::new();
    let mut has_root = false;
    let mut root_name = "";
    let mut has_dist = false;
    for n in names {
        if WEIGHT_FILES.contains(&n) {
            has_root = true;
            root_name = n;
        } else if n == "model_weights/metadata.json" {
            has_dist = true;
        } else if let Some((kind, tp, pp)) = parse_rank_folder(n) {
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
            found.insert((tp, pp), n.to_string());
        }
    }
    if has_dist {
        return Ok(RankGrid {
            kind: LayoutKind::Distributed,
            tp: cfg_tp,
            pp: cfg_pp,
            files: BTreeMap::new(),
        });
    }
    if kinds.len() > 1 || (has_root && !kinds.is_empty()) {
        return Err(err("the archive mixes rank folder styles (model_weights.ckpt, mp_rank_*, tp_rank_*_pp_rank_*)".into()));
    }
    let kind = match kinds.first() {
        Some(k) => k.clone(),
        None if has_root => {
            if cfg_tp != 1 || cfg_pp != 1 {
                return Err(err(format!(
                    "the archive holds one model_weights.ckpt but model_config.yaml says tensor_model_parallel_size: {cfg_tp}, pipeline_model_parallel_size: {cfg_pp}"
                )));
            }
            found.insert((0, 0), root_name.to_string());
            return Ok(RankGrid {
                kind: LayoutKind::Single,
                tp: 1,
                pp: 1,
                files: found,
            });
        }
        None => return Err(err("no model weights: neither model_weights.ckpt, mp_rank_*/, tp_rank_*_pp_rank_*/ nor model_weights/".into())),
    };
    if kind == LayoutKind::TensorParallel && cfg_pp != 1 {
        return Err(err(format!(
            "the archive has mp_rank_* folders (pipeline size 1) but model_config.yaml says pipeline_model_parallel_size: {cfg_pp}"
        )));
    }
    for &(tp, pp) in found.keys() {
        if tp >= cfg_tp || pp >= cfg_pp {
            return Err(err(format!(
                "the archive has rank folder {} but model_config.yaml says tensor_model_parallel_size: {cfg_tp}, pipeline_model_parallel_size: {cfg_pp}",
                found[&(tp, pp)].rsplit_once('/').map(|p| p.0).unwrap_or("")
            )));
        }
    }
    for pp in 0..cfg_pp {
        for tp in 0..cfg_tp {
            if !found.contains_key(&(tp, pp)) {
                let want = rank_member(
                    tp,
                    pp,
                    cfg_tp.max(2),
                    if kind == LayoutKind::TensorPipeline {
                        cfg_pp.max(2)
                    } else {
                        1
                    },
                );
                return Err(err(format!(
                    "missing rank folder {} (model_config.yaml says tensor_model_parallel_size: {cfg_tp}, pipeline_model_parallel_size: {cfg_pp})",
                    want.trim_end_matches("/model_weights.ckpt")
                )));
            }
        }
    }
    Ok(RankGrid {
        kind,
        tp: cfg_tp,
        pp: cfg_pp,
        files: found,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids() {
        let names = [
            "model_config.yaml",
            "mp_rank_00/model_weights.ckpt",
            "mp_rank_01/model_weights.ckpt",
        ];
        let g = detect(names.into_iter(), 2, 1, "f").unwrap();
        assert_eq!((g.kind, g.tp, g.pp), (LayoutKind::TensorParallel, 2, 1));
        let e = detect(names.into_iter(), 4, 1, "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing rank folder mp_rank_02"), "{e}");
        let e = detect(names.into_iter(), 1, 1, "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("has rank folder mp_rank_01"), "{e}");
        let names = [
            "tp_rank_00_pp_rank_000/model_weights.ckpt",
            "tp_rank_00_pp_rank_001/model_weights.ckpt",
        ];
        let g = detect(names.into_iter(), 1, 2, "f").unwrap();
        assert_eq!((g.kind, g.tp, g.pp), (LayoutKind::TensorPipeline, 1, 2));
        assert_eq!(
            rank_member(1, 1, 2, 2),
            "tp_rank_01_pp_rank_001/model_weights.ckpt"
        );
        assert_eq!(rank_member(3, 0, 4, 1), "mp_rank_03/model_weights.ckpt");
    }
}
