//! Reading safetensors files in place (the per-rank files `reshard --format safetensors`
//! writes): every header field is checked against the file before use.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::dtype::{contiguous_strides, DType, TensorRef};
use crate::torch::state_dict::{StateDict, StateEntry};

fn dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F64" => DType::F64,
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F8_E4M3" => DType::F8E4M3,
        "F8_E5M2" => DType::F8E5M2,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "I8" => DType::I8,
        "U8" => DType::U8,
        "BOOL" => DType::Bool,
        _ => return None,
    })
}

/// Reads the safetensors file `bytes` (member `member`, data at archive offset `offset`).
pub fn read_state_dict(bytes: &[u8], offset: u64, member: &str) -> Result<StateDict> {
    let err = |msg: String| Error::Tensor {
        member: member.to_string(),
        tensor: "(header)".into(),
        msg,
    };
    if bytes.len() < 8 {
        return Err(err("shorter than a safetensors header".into()));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > bytes.len() as u64 - 8 || n > 100 << 20 {
        return Err(err(format!("header length {n} exceeds the file")));
    }
    let header: Value = serde_json::from_slice(&bytes[8..8 + n as usize])
        .map_err(|e| err(format!("header is not JSON: {e}")))?;
    let map = header
        .as_object()
        .ok_or_else(|| err("header is not an object".into()))?;
    let data_start = 8 + n;
    let data_len = bytes.len() as u64 - data_start;
    let mut entries = Vec::new();
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let terr = |msg: String| Error::Tensor {
            member: member.to_string(),
            tensor: name.clone(),
            msg,
        };
        let d = v["dtype"]
            .as_str()
            .and_then(dtype)
            .ok_or_else(|| terr("missing or unknown dtype".into()))?;
        let shape: Vec<u64> = v["shape"]
            .as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .ok_or_else(|| terr("missing or invalid shape".into()))?;
        let offs: Vec<u64> = v["data_offsets"]
            .as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .filter(|o: &Vec<u64>| o.len() == 2)
            .ok_or_else(|| terr("missing or invalid data_offsets".into()))?;
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| terr("shape overflows".into()))?;
        let nbytes = numel
            .checked_mul(d.size() as u64)
            .ok_or_else(|| terr("size overflows".into()))?;
        if offs[0] > offs[1] || offs[1] > data_len || offs[1] - offs[0] != nbytes {
            return Err(terr(format!(
                "data_offsets {offs:?} do not match its shape and the file ({data_len} data bytes)"
            )));
        }
        entries.push((
            name.clone(),
            StateEntry::Tensor(TensorRef {
                dtype: d,
                stride: contiguous_strides(&shape),
                shape,
                offset: offset + data_start + offs[0],
                span: nbytes,
            }),
        ));
    }
    Ok(StateDict {
        member: member.to_string(),
        zip_root: String::new(),
        entries,
    })
}
