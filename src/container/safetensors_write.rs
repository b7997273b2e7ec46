//! A streaming safetensors writer: headers are built from known names, dtypes and shapes,
//! then each tensor's bytes are produced and written one at a time.

use std::io::Write;

use serde_json::{json, Map, Value};

use crate::dtype::DType;
use crate::io::sink::FileSink;

/// A tensor to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

impl TensorSpec {
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size() as u64
    }
}

/// Groups tensors (in order) into shards of at most `max_bytes` of tensor data each
/// (a tensor larger than the limit gets a shard of its own), as `transformers` does.
pub fn plan_shards(tensors: &[TensorSpec], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let n = t.nbytes();
        if shards.is_empty() || (size + n > max_bytes && size > 0) {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("pushed").push(i);
        size += n;
    }
    shards
}

/// File names: `model.safetensors` for one shard, else `model-0000K-of-0000N.safetensors`.
pub fn shard_names(n: usize) -> Vec<String> {
    if n == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=n)
            .map(|k| format!("model-{k:05}-of-{n:05}.safetensors"))
            .collect()
    }
}

/// The 8-byte length plus the JSON header (space-padded to a multiple of 8), for tensors
/// whose data follows in the given order.
pub fn header(tensors: &[&TensorSpec]) -> Vec<u8> {
    let mut map = Map::new();
    map.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0u64;
    for t in tensors {
        let n = t.nbytes();
        map.insert(
            t.name.clone(),
            json!({"dtype": t.dtype.safetensors_name(), "shape": t.shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut text = serde_json::to_vec(&Value::Object(map)).expect("JSON of plain values");
    while !(text.len() + 8).is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out
}

/// `model.safetensors.index.json` for sharded output.
pub fn index_json(tensors: &[TensorSpec], shards: &[Vec<usize>], names: &[String]) -> Value {
    let mut map = Map::new();
    for (shard, name) in shards.iter().zip(names) {
        for &i in shard {
            map.insert(tensors[i].name.clone(), Value::String(name.clone()));
        }
    }
    let total: u64 = tensors.iter().map(TensorSpec::nbytes).sum();
    json!({"metadata": {"total_size": total}, "weight_map": map})
}

/// Creates shard file `dir/name` holding `shard` (indices into `specs`) and writes its
/// header; the tensors' bytes follow through the returned sink.
pub fn create_shard(
    dir: &std::path::Path,
    name: &str,
    specs: &[TensorSpec],
    shard: &[usize],
) -> crate::error::Result<(std::path::PathBuf, FileSink)> {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).map_err(|e| crate::error::Error::io(&path, e))?;
    let mut w = FileSink::new(f);
    let refs: Vec<&TensorSpec> = shard.iter().map(|&i| &specs[i]).collect();
    w.write_all(&header(&refs))
        .map_err(|e| crate::error::Error::io(&path, e))?;
    Ok((path, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, n: u64) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: DType::BF16,
            shape: vec![n],
        }
    }

    #[test]
    fn shards_and_header() {
        let t = vec![spec("a", 10), spec("b", 10), spec("c", 30), spec("d", 5)];
        assert_eq!(plan_shards(&t, 40), vec![vec![0, 1], vec![2], vec![3]]);
        assert_eq!(plan_shards(&t, 1000), vec![vec![0, 1, 2, 3]]);
        assert_eq!(plan_shards(&t, 1), vec![vec![0], vec![1], vec![2], vec![3]]);
        assert_eq!(shard_names(2)[1], "model-00002-of-00002.safetensors");
        let refs: Vec<&TensorSpec> = t.iter().collect();
        let h = header(&refs);
        assert_eq!(h.len() % 8, 0);
        let n = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
        let v: Value = serde_json::from_slice(&h[8..8 + n]).unwrap();
        assert_eq!(v["c"]["data_offsets"], json!([40, 100]));
    }
}
