//! Typed, range-checked fields of a JSON request: each error names the field.

use serde_json::{Map, Value};

/// An integer field in `min..=max`, or `default` when absent or null.
pub fn int(
    o: &Map<String, Value>,
    key: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        }) {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(format!(
                "`{key}` must be an integer from {min} to {max}, not {v}"
            )),
        },
    }
}

/// A number field that `ok` accepts (`what` says which), or `default`.
pub fn num(
    o: &Map<String, Value>,
    key: &str,
    default: f64,
    ok: impl Fn(f64) -> bool,
    what: &str,
) -> Result<f64, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_f64() {
            Some(x) if ok(x) => Ok(x),
            _ => Err(format!("`{key}` must be a number {what}, not {v}")),
        },
    }
}

/// A boolean field, or `default`.
pub fn boolean(o: &Map<String, Value>, key: &str, default: bool) -> Result<bool, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!("`{key}` must be true or false, not {v}")),
    }
}

/// A list of strings (or one string).
pub fn strings(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => a.iter().map(|s| s.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

/// A seed from the clock, for requests that give none.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
