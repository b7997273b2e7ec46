//! Element types and zero-copy tensor descriptions.

use std::fmt;

mod convert;
pub mod simd;

pub use convert::{bf16_bits, cast_mismatch, cast_value, convert, f16_round_trip, to_f32};

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    F8E4M3,
    F8E5M2,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    /// Bytes per element.
    /// f32, f16 or bf16: the types [`convert`] reads and writes.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::F8E4M3 | DType::F8E5M2 | DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The dtype torch's legacy `<Name>Storage` class stands for.
    pub fn from_storage_class(name: &str) -> Option<DType> {
        Some(match name {
            "DoubleStorage" => DType::F64,
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    }

    /// torch's legacy storage class name for this dtype, where one exists.
    pub fn storage_class(self) -> Option<&'static str> {
        Some(match self {
            DType::F64 => "DoubleStorage",
            DType::F32 => "FloatStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::I64 => "LongStorage",
            DType::I32 => "IntStorage",
            DType::I16 => "ShortStorage",
            DType::I8 => "CharStorage",
            DType::U8 => "ByteStorage",
            DType::Bool => "BoolStorage",
            DType::F8E4M3 | DType::F8E5M2 => return None,
        })
    }

    /// The dtype named by a `torch.<name>` dtype object (as `_rebuild_tensor_v3` gets it).
    pub fn from_torch_name(name: &str) -> Option<DType> {
        Some(match name {
            "float64" | "double" => DType::F64,
            "float32" | "float" => DType::F32,
            "float16" | "half" => DType::F16,
            "bfloat16" => DType::BF16,
            "float8_e4m3fn" => DType::F8E4M3,
            "float8_e5m2" => DType::F8E5M2,
            "int64" | "long" => DType::I64,
            "int32" | "int" => DType::I32,
            "int16" | "short" => DType::I16,
            "int8" => DType::I8,
            "uint8" => DType::U8,
            "bool" => DType::Bool,
            _ => return None,
        })
    }

    /// The dtype of a zarr v2 `.zarray` dtype string (`<f4`, `<f2`, `bfloat16`, …).
    pub fn from_zarr(s: &str) -> Option<DType> {
        Some(match s {
            "bfloat16" | "<bf16" => DType::BF16,
            "<f8" => DType::F64,
            "<f4" => DType::F32,
            "<f2" => DType::F16,
            "<i8" => DType::I64,
            "<i4" => DType::I32,
            "<i2" => DType::I16,
            "|i1" | "<i1" => DType::I8,
            "|u1" | "<u1" => DType::U8,
            "|b1" => DType::Bool,
            _ => return None,
        })
    }

    /// The name safetensors uses for this dtype.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// Short lower-case name used in reports (`bf16`, `fp32`, …).
    pub fn short_name(self) -> &'static str {
        match self {
            DType::F64 => "fp64",
            DType::F32 => "fp32",
            DType::F16 => "fp16",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "fp8_e4m3",
            DType::F8E5M2 => "fp8_e5m2",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

/// A tensor stored somewhere in the mapped archive: its element type, shape and strides
/// (in elements) and the absolute byte range of the elements it spans. Nothing is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
    /// Absolute offset in the archive of the tensor's first element.
    pub offset: u64,
    /// Bytes from `offset` to one past the last element the tensor can address.
    pub span: u64,
    /// The container record holding the tensor, when the container stores its CRC-32.
    pub record: Option<Checksummed>,
}

/// A record of the mapping whose CRC-32 its container stores (a torch zip record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksummed {
    /// The member the record is in (`mp_rank_00/model_weights.ckpt`).
    pub member: String,
    /// The record's name in its zip (`model_weights/data/3`).
    pub name: String,
    /// Where the record's bytes are in the mapping.
    pub offset: u64,
    pub len: u64,
    pub crc32: u32,
}

impl TensorRef {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Bytes of the elements (not of the span).
    pub fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }

    /// True when the elements are laid out densely in C order.
    pub fn is_contiguous(&self) -> bool {
        self.stride == contiguous_strides(&self.shape) || self.numel() <= 1
    }
}

/// C-order strides (in elements) for a shape.
pub fn contiguous_strides(shape: &[u64]) -> Vec<u64> {
    let mut strides = vec![1u64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(shape[i + 1]);
    }
    strides
}

/// Number of elements a strided view addresses from its first element (0 when empty),
/// or `None` on overflow.
pub fn strided_extent(shape: &[u64], stride: &[u64]) -> Option<u64> {
    if shape.contains(&0) {
        return Some(0);
    }
    let mut last = 0u64;
    for (&n, &s) in shape.iter().zip(stride) {
        last = last.checked_add((n - 1).checked_mul(s)?)?;
    }
    last.checked_add(1)
}

/// Formats a shape as `[a, b]`.
pub fn fmt_shape(shape: &[u64]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_and_extent() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(strided_extent(&[2, 3], &[3, 1]), Some(6));
        assert_eq!(strided_extent(&[2, 3], &[1, 2]), Some(6));
        assert_eq!(strided_extent(&[0, 3], &[3, 1]), Some(0));
        assert_eq!(strided_extent(&[], &[]), Some(1));
        assert_eq!(strided_extent(&[u64::MAX, 2], &[u64::MAX, 1]), None);
    }

    #[test]
    fn storage_names_round_trip() {
        for d in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::I8,
            DType::U8,
            DType::I64,
        ] {
            assert_eq!(
                DType::from_storage_class(d.storage_class().unwrap()),
                Some(d)
            );
        }
    }

    #[test]
    fn conversions_are_exact_and_count_fp16_overflow() {
        let mut out = Vec::new();
        let bf = [
            half::bf16::from_f32(1.5),
            half::bf16::from_f32(-3.0e38),
            half::bf16::from_f32(0.25),
        ];
        let src: Vec<u8> = bf.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(convert(&src, DType::BF16, DType::F16, &mut out), Ok(1));
        let back: Vec<f32> = out
            .chunks(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert_eq!(back[0], 1.5);
        assert!(back[1].is_infinite());
        out.clear();
        assert_eq!(convert(&src, DType::BF16, DType::F32, &mut out), Ok(0));
        assert_eq!(&out[..4], &1.5f32.to_le_bytes());
        assert!(convert(&src, DType::I8, DType::F32, &mut out).is_err());
    }
}
