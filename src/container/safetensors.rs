//! Reading safetensors files in place, through the `safetensors` crate's header reader
//! (which checks the header and that the data offsets tile the file with no gap or overlap).

use safetensors::{Dtype, SafeTensors};

use crate::dtype::{contiguous_strides, DType, TensorRef};
use crate::error::{Error, Result};

fn dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F8_E4M3 => DType::F8E4M3,
        Dtype::F8_E5M2 => DType::F8E5M2,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U8 => DType::U8,
        Dtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// The tensors of the safetensors file `bytes` (member `member`, whose data starts at
/// offset `offset` of the mapping), in data order; each tensor's offset is absolute.
pub fn read(bytes: &[u8], offset: u64, member: &str) -> Result<Vec<(String, TensorRef)>> {
    let (n, meta) = SafeTensors::read_metadata(bytes).map_err(|e| Error::Tensor {
        member: member.to_string(),
        tensor: "(header)".into(),
        msg: e.to_string(),
    })?;
    let data_start = offset + 8 + n as u64;
    let infos = meta.tensors();
    let mut out = Vec::with_capacity(infos.len());
    for name in meta.offset_keys() {
        let info = infos[&name];
        let d = dtype(info.dtype).ok_or_else(|| Error::Tensor {
            member: member.to_string(),
            tensor: name.clone(),
            msg: format!("dtype {:?} is not supported", info.dtype),
        })?;
        let shape: Vec<u64> = info.shape.iter().map(|&s| s as u64).collect();
        let (a, b) = info.data_offsets;
        out.push((
            name,
            TensorRef {
                dtype: d,
                stride: contiguous_strides(&shape),
                shape,
                offset: data_start + a as u64,
                span: (b - a) as u64,
                record: None,
            },
        ));
    }
    Ok(out)
}
