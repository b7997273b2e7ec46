//! Shared helpers for integration tests: fixture paths, the manifest, ground-truth tensors,
//! and rebuilding archives with one thing broken.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::Value;
use steerlm_convert::nemo::tar::{self, MemberKind};
use steerlm_convert::nemo::tar_write::TarWriter;
use steerlm_convert::tensor::DType;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Archive entries of `fixtures/manifest.json` and `fixtures/manifest-nemo.json`.
pub fn archives() -> Vec<Value> {
    let mut out = Vec::new();
    for name in ["manifest.json", "manifest-nemo.json"] {
        let p = fixtures().join(name);
        if name == "manifest.json" || p.exists() {
            let m: Value = serde_json::from_slice(&std::fs::read(&p).expect("manifest"))
                .expect("manifest JSON");
            out.extend(m["archives"].as_array().expect("archives").iter().cloned());
        }
    }
    assert!(
        out.len() >= 9,
        "expected at least the 9 hand-written archives"
    );
    out
}

/// The ground-truth HF tensors of a model: name → (shape, f32 values).
pub fn hf_tensors(model: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(
        fixtures()
            .join("models")
            .join(model)
            .join("hf/model.safetensors"),
    )
    .expect("hf model");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let vals = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, (view.shape().to_vec(), vals))
        })
        .collect()
}

/// Little-endian bytes of `vals` cast to `dtype` (ground truth values are exact in bf16/fp16).
pub fn cast(vals: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => vals
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        DType::F16 => vals
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        d => panic!("no cast to {d}"),
    }
}

pub fn dtype_of(name: &str) -> DType {
    match name {
        "fp32" => DType::F32,
        "bf16" => DType::BF16,
        "fp16" => DType::F16,
        other => panic!("dtype {other}"),
    }
}

/// Rewrites a fixture archive member by member: `edit(name, data)` returns the new
/// `(name, data)` or `None` to drop the member. Directories are kept.
pub fn rebuild(
    src: &Path,
    dst: &Path,
    mut edit: impl FnMut(&str, &[u8]) -> Option<(String, Vec<u8>)>,
) {
    let bytes = std::fs::read(src).expect("fixture");
    let members = tar::index(&bytes, "fixture").expect("fixture index");
    let f = std::fs::File::create(dst).expect("create");
    let mut t = TarWriter::new(std::io::BufWriter::new(f));
    for m in &members {
        let data = &bytes[m.offset as usize..(m.offset + m.size) as usize];
        match m.kind {
            MemberKind::Dir => t
                .dir(format!("./{}", m.name).trim_end_matches('/'))
                .unwrap(),
            MemberKind::File => {
                if let Some((name, data)) = edit(&m.name, data) {
                    t.file(&name, &data).unwrap();
                }
            }
            MemberKind::Other => {}
        }
    }
    t.finish().unwrap();
}

/// Keeps a member as it is, with NeMo's `./` prefix.
pub fn keep(name: &str, data: &[u8]) -> Option<(String, Vec<u8>)> {
    Some((format!("./{name}"), data.to_vec()))
}

/// Runs the binary: (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = assert_cmd::Command::cargo_bin("steerlm-convert")
        .unwrap()
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `fixtures/models/<model>/truth.json`.
pub fn truth(model: &str) -> Value {
    let p = fixtures().join("models").join(model).join("truth.json");
    serde_json::from_slice(&std::fs::read(p).expect("truth")).expect("truth JSON")
}

/// A JSON array of token ids.
pub fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// A JSON array of numbers.
pub fn floats_of(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// Copies the files of folder `src` into a new folder `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
    }
}

/// `reshard` of fixture archive `archive` to TP `tp` as per-rank safetensors folders in
/// `out`.
pub fn reshard_to_ranks(archive: &str, out: &Path, tp: u32) {
    let src = fixtures().join(archive);
    let tp = tp.to_string();
    let (code, _, err) = run(&[
        "reshard",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        "--tp",
        &tp,
        "--format",
        "safetensors",
        "--quiet",
    ]);
    assert_eq!(code, 0, "{err}");
}
