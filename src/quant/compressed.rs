//! The compressed-tensors `pack-quantized` layout (W8A16): what `transformers` (through the
//! `compressed-tensors` package) and vLLM load as int8 weight-only.
//!
//! Per quantized linear `X`:
//! - `X.weight_packed`: int32 `[out, in/4]`, four int8 values per word, each stored as
//!   `q + 128` (unsigned), value `j` of a word in bits `8j..8j+8`. Little-endian words
//!   therefore hold the columns in order, one byte each.
//! - `X.weight_scale`: the model's float dtype, `[out, 1]` (channel) or
//!   `[out, in/group_size]` (group).
//! - `X.weight_shape`: int64 `[2]` = `[out, in]`.

use serde_json::{json, Value};

use crate::container::mapped::Mapped;
use crate::dtype::{DType, TensorRef};
use crate::error::{Error, Result};

/// The `quantization_config` block for int8 weight-only with `group` (`None`: per
/// channel), leaving `ignore` (full names of linear layers kept in float) as given.
///
/// Only keys of the compressed-tensors 0.8 field set are written: 0.11 and later refuse
/// unknown keys, and 0.8 through 0.12 (the versions that pair with transformers 4.46)
/// load this block.
pub fn config(group: Option<usize>, ignore: &[String]) -> Value {
    let (strategy, group_size) = match group {
        Some(g) => ("group", json!(g)),
        None => ("channel", Value::Null),
    };
    json!({
        "config_groups": {
            "group_0": {
                "input_activations": null,
                "output_activations": null,
                "targets": ["Linear"],
                "weights": {
                    "actorder": null,
                    "block_structure": null,
                    "dynamic": false,
                    "group_size": group_size,
                    "num_bits": 8,
                    "observer": "minmax",
                    "observer_kwargs": {},
                    "strategy": strategy,
                    "symmetric": true,
                    "type": "int"
                }
            }
        },
        "format": "pack-quantized",
        "global_compression_ratio": null,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed"
    })
}

/// Reads a `quantization_config` this runtime can run: int8, symmetric, weight-only,
/// `pack-quantized`, channel or group. Returns the group size (`None` per channel).
pub fn parse_config(q: &Value) -> std::result::Result<Option<usize>, String> {
    let method = q["quant_method"].as_str().unwrap_or("");
    if method != "compressed-tensors" {
        return Err(format!(
            "quantization_config.quant_method `{method}` is not supported (compressed-tensors is)"
        ));
    }
    let format = q["format"].as_str().unwrap_or("");
    if format != "pack-quantized" {
        return Err(format!(
            "quantization_config.format `{format}` is not supported (pack-quantized is)"
        ));
    }
    let groups = q["config_groups"]
        .as_object()
        .filter(|g| g.len() == 1)
        .ok_or("quantization_config must have exactly one config group")?;
    let g = groups.values().next().expect("one");
    if !g["input_activations"].is_null() {
        return Err("activation quantization is not supported (weight-only is)".into());
    }
    let w = &g["weights"];
    if w["num_bits"].as_u64() != Some(8)
        || w["type"].as_str() != Some("int")
        || w["symmetric"].as_bool() != Some(true)
    {
        return Err("only symmetric 8-bit int weights are supported".into());
    }
    match w["strategy"].as_str() {
        Some("channel") => Ok(None),
        Some("group") => match w["group_size"].as_u64() {
            Some(n) if n > 0 => Ok(Some(n as usize)),
            _ => Err("group strategy without a positive group_size".into()),
        },
        other => Err(format!("weight strategy {other:?} is not supported")),
    }
}

/// An int8 linear as stored: `out × inp` bytes (`q + 128`, row-major) at `offset` of the
/// mapping, and its scales as f32 (`out × inp/group`, row-major).
#[derive(Debug, Clone)]
pub struct Packed {
    pub out: usize,
    pub inp: usize,
    pub group: usize,
    pub offset: u64,
    pub scales: Vec<f32>,
}

/// Checks an int8 linear's three stored parts against each other and reads its scales.
pub fn read_packed(
    ar: &Mapped,
    base: &str,
    packed: (&TensorRef, &str),
    scale: (&TensorRef, &str),
    shape: (&TensorRef, &str),
    group: Option<usize>,
) -> Result<Packed> {
    let err = |member: &str, tensor: String, msg: String| Error::Tensor {
        member: member.to_string(),
        tensor,
        msg,
    };
    let (pt, pm) = packed;
    let (st, sm) = scale;
    let (sh, hm) = shape;
    let shape_name = format!("{base}.weight_shape");
    let dims: Vec<u64> = match (sh.dtype, sh.numel()) {
        (DType::I64, 2) | (DType::I32, 2) => {
            let b = ar.slice(sh.offset, sh.nbytes());
            let sz = sh.dtype.size();
            b.chunks_exact(sz)
                .map(|c| {
                    let mut v = [0u8; 8];
                    v[..sz].copy_from_slice(c);
                    u64::from_le_bytes(v)
                })
                .collect()
        }
        _ => return Err(err(hm, shape_name, "must be two integers".into())),
    };
    let (out, inp) = (dims[0] as usize, dims[1] as usize);
    let pname = format!("{base}.weight_packed");
    if pt.dtype != DType::I32
        || pt.shape != [out as u64, inp.div_ceil(4) as u64]
        || !pt.is_contiguous()
        || !inp.is_multiple_of(4)
    {
        return Err(err(
            pm,
            pname,
            format!(
                "must be contiguous int32 [{out}, {}] for weight_shape [{out}, {inp}] (input size a multiple of 4)",
                inp / 4
            ),
        ));
    }
    let g = group.unwrap_or(inp);
    let ng = inp.div_ceil(g);
    let sname = format!("{base}.weight_scale");
    if !matches!(st.dtype, DType::F32 | DType::F16 | DType::BF16)
        || st.numel() != (out * ng) as u64
        || !st.is_contiguous()
    {
        return Err(err(sm, sname, format!("must be float [{out}, {ng}]")));
    }
    let sb = ar.slice(st.offset, st.nbytes());
    let mut scales = vec![0f32; sb.len() / st.dtype.size()];
    crate::dtype::to_f32(sb, st.dtype, &mut scales);
    if scales.iter().any(|s| !s.is_finite()) {
        return Err(err(sm, sname, "holds a non-finite scale".into()));
    }
    Ok(Packed {
        out,
        inp,
        group: g,
        offset: pt.offset,
        scales,
    })
}
