//! What `quantize` reports: per tensor, how it was written and its error against the
//! source (max abs, relative RMS, SNR; overflow counts as infinite error).

use std::path::Path;

use serde_json::{json, Value};

use crate::dtype::DType;
use crate::io::output;
use crate::quant::int8::ErrStats;

/// One output tensor's report.
#[derive(Debug, Clone)]
pub struct TensorReport {
    pub name: String,
    pub shape: Vec<u64>,
    pub source_dtype: DType,
    /// `int8/channel`, `int8/group128`, `bf16`, `copy`, …
    pub written_as: String,
    pub stats: ErrStats,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub files: Vec<String>,
    pub tensors: Vec<TensorReport>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub seconds: f64,
    pub engine: String,
}

impl QuantizeReport {
    pub fn to_json(&self, out: &Path) -> Value {
        let num = |v: f64| {
            if v.is_finite() {
                json!(v)
            } else if v.is_nan() {
                json!(null)
            } else if v > 0.0 {
                json!("inf")
            } else {
                json!("-inf")
            }
        };
        json!({
            "schema_version": 1,
            "command": "quantize",
            "output": out.display().to_string(),
            "engine": self.engine,
            "tensor_count": self.tensors.len(),
            "files": self.files,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": self.seconds,
            "input_gb_per_s": self.bytes_in as f64 / self.seconds.max(1e-9) / 1e9,
            "peak_rss_bytes": output::peak_rss(),
            "tensors": self.tensors.iter().map(|t| json!({
                "name": t.name,
                "shape": t.shape,
                "source_dtype": t.source_dtype.short_name(),
                "written_as": t.written_as,
                "max_abs_error": num(t.stats.max_abs),
                "rel_rms_error": num(t.stats.rel_rms()),
                "snr_db": num(t.stats.snr_db()),
                "overflowed_values": t.stats.overflow,
            })).collect::<Vec<_>>(),
        })
    }
}
