//! Shared helpers for integration tests: fixture paths, the manifest, ground-truth tensors,
//! and rebuilding archives with one thing broken.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::Value;
use steerlm_convert::container::tar::{self, MemberKind};
use steerlm_convert::container::tar_write::TarWriter;
use steerlm_convert::dtype::DType;

/// The fixtures folder: `STEERLM_FIXTURES` when set (test binaries run from a bundle on
/// another machine, `cargo xtask gpu-bundle`), else this checkout's.
pub fn fixtures() -> PathBuf {
    match std::env::var_os("STEERLM_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
    }
}

/// Mapped entries of `fixtures/manifest.json`, `manifest-nemo.json`, `manifest-torch-dist.json`
/// `manifest-tied.json`, `manifest-nemo2.json` and `manifest-bpe.json`.
pub fn archives() -> Vec<Value> {
    let mut out = Vec::new();
    for name in [
        "manifest.json",
        "manifest-nemo.json",
        "manifest-torch-dist.json",
        "manifest-tied.json",
        "manifest-nemo2.json",
        "manifest-bpe.json",
    ] {
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
/// `quantize SRC OUT --scheme int8 --device cpu` (groups of `group` columns where given),
/// asserted to succeed.
pub fn quantize_int8(src: &Path, out: &Path, group: Option<&str>) {
    let mut args = vec![
        "quantize",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        "--scheme",
        "int8",
        "--device",
        "cpu",
        "-q",
    ];
    if let Some(g) = group {
        args.extend(["--granularity", "group", "--group-size", g]);
    }
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
}

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

/// Runs `fixtures/check_tokenizer.py` on the HF folder `dir` for `texts`: the ids that
/// transformers (slow and fast) and `sentencepiece` give. `None` (with the reason printed)
/// when no Python with transformers is found, which `cargo xtask test` never allows: it
/// installs them and sets `STEERLM_REQUIRE_PYTHON=1`, so that under the README's test
/// command this check cannot be skipped.
pub fn transformers_ids(dir: &Path, texts: &[&str]) -> Option<Value> {
    use std::io::Write;
    let python = std::env::var("STEERLM_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&python)
        .args(["-c", "import transformers, sentencepiece, google.protobuf"])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        let why = format!(
            "{python} cannot import transformers, sentencepiece and protobuf (fixtures/requirements-tokenizer.txt)"
        );
        if std::env::var("STEERLM_REQUIRE_PYTHON").is_ok_and(|v| v == "1") {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}; `cargo xtask test` installs them");
        return None;
    }
    let mut child = std::process::Command::new(&python)
        .arg(fixtures().join("check_tokenizer.py"))
        .arg(dir)
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("HF_HUB_OFFLINE", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(texts).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("python");
    assert!(
        out.status.success(),
        "check_tokenizer.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("check_tokenizer.py JSON"))
}

/// Exit 2, one line containing `want`, and no output or partial output left beside `out`.
pub fn refused(code: i32, err: &str, out: &Path, want: &str) {
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(want), "expected `{want}` in: {err}");
    assert!(!out.exists(), "no output");
    assert_no_leftovers(out);
}

/// Nothing named after `out` is left beside it: no `.partial-<pid>`, `.old` or lock.
pub fn assert_no_leftovers(out: &Path) {
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    let parent = out.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-") || *n == format!(".{name}.lock"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

/// A copy of `legacy_tp2_bf16.nemo` in `dir` whose rank-0 o_proj of layer 0 holds bf16
/// 3.0e38 (0x7f62) in its first element: it overflows fp16. The record's CRC-32 is
/// updated, as torch would have written it.
pub fn overflowing_archive(dir: &Path) -> PathBuf {
    patched_archive(dir, "mp_rank_00/model_weights.ckpt", &[0x62, 0x7f], true)
}

/// A copy of `legacy_tp2_bf16.nemo` in `dir` whose o_proj of layer 0 in `member` (a rank's
/// checkpoint) starts with `bytes`; with `fix_crc` the record's stored CRC-32 (local header
/// and central directory) is recomputed, without it the file is corrupt.
pub fn patched_archive(dir: &Path, member: &str, bytes: &[u8], fix_crc: bool) -> PathBuf {
    use steerlm_convert::nemo::checkpoint::{Checkpoint, Storage};
    let fixture = fixtures().join("archives/legacy_tp2_bf16.nemo");
    let src = dir.join("patched.nemo");
    let archive = std::fs::read(&fixture).unwrap();
    let ck = Checkpoint::open(&fixture, &Default::default()).unwrap();
    let Storage::Ranks(ranks) = &ck.weights else {
        panic!("rank archive")
    };
    let rank = ranks.iter().find(|r| r.state.member == member).unwrap();
    let (_, t) = rank
        .state
        .tensors()
        .find(|(n, _)| n.ends_with("layers.0.self_attention.dense.weight"))
        .unwrap();
    let members = tar::index(&archive, "f").unwrap();
    let m = members.iter().find(|m| m.name == member).unwrap();
    let at = (t.offset - m.offset) as usize;
    let record = t.record.clone().unwrap();
    let rec_at = (record.offset - m.offset) as usize;
    let member = member.to_string();
    rebuild(&fixture, &src, |n, d| {
        let mut d = d.to_vec();
        if n == member {
            d[at..at + bytes.len()].copy_from_slice(bytes);
            if fix_crc {
                let crc = crc32fast::hash(&d[rec_at..rec_at + record.len as usize]);
                set_zip_crc(&mut d, &record.name, crc);
            }
        }
        Some((format!("./{n}"), d))
    });
    src
}

/// Sets the CRC-32 of record `name` in a (non-ZIP64) zip, in its central-directory entry
/// and its local header.
fn set_zip_crc(zip: &mut [u8], name: &str, crc: u32) {
    let u16_at = |z: &[u8], i: usize| u16::from_le_bytes([z[i], z[i + 1]]) as usize;
    let mut found = false;
    let mut p = 0;
    while p + 46 <= zip.len() {
        if zip[p..p + 4] == [0x50, 0x4b, 0x01, 0x02] {
            let n = u16_at(zip, p + 28);
            if &zip[p + 46..p + 46 + n] == name.as_bytes() {
                let lho = u32::from_le_bytes(zip[p + 42..p + 46].try_into().unwrap()) as usize;
                zip[p + 16..p + 20].copy_from_slice(&crc.to_le_bytes());
                zip[lho + 14..lho + 18].copy_from_slice(&crc.to_le_bytes());
                found = true;
            }
        }
        p += 1;
    }
    assert!(found, "no central-directory entry for {name}");
}

/// A synthetic archive big enough (about 300 MB) that a command on it can be caught and
/// signalled mid-write.
pub fn big_archive(dir: &Path) -> PathBuf {
    let mut spec = steerlm_convert::synth::SynthSpec::llama2_13b(2);
    spec.hidden = 2048;
    spec.heads = 16;
    spec.groups = 16;
    spec.ffn = 5504;
    let p = dir.join("big.nemo");
    steerlm_convert::synth::write(&spec, &p, |_| {}).unwrap();
    p
}
