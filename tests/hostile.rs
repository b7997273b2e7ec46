//! Broken and hostile archives: each gives exit code 2 and one line naming the file,
//! member or offset — never a panic, never anything executed.

mod common;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use common::*;
use steerlm_convert::torch::save::{ZipPlan, ZipWriter};

const TP2: &str = "archives/legacy_tp2_bf16.nemo";

/// Runs inspect and checks: exit 2, nothing on stdout, exactly one error line containing `want`.
fn inspect_refuses(path: &Path, want: &str) -> String {
    let (code, stdout, stderr) = run(&["inspect", path.to_str().unwrap()]);
    assert_eq!(code, 2, "exit code for {want}: stderr {stderr}");
    assert!(stdout.is_empty(), "no output on error: {stdout}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("steerlm-convert: error: "), "{stderr}");
    assert!(stderr.contains(want), "expected `{want}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn tmp(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// A zip holding only `root/data.pkl` = `pickle` plus `root/data/<k>` records.
fn torch_zip(pickle: &[u8], storages: &[(&str, usize)]) -> Vec<u8> {
    let root = "mp_rank_01_model_weights";
    let mut records = vec![(format!("{root}/data.pkl"), pickle.len() as u64)];
    for (k, n) in storages {
        records.push((format!("{root}/data/{k}"), *n as u64));
    }
    let plan = ZipPlan::new(&records);
    let mut cur = Cursor::new(Vec::new());
    let mut z = ZipWriter::new(&mut cur, plan).unwrap();
    z.record(|o| o.write_all(pickle)).unwrap();
    for (_, n) in storages {
        z.record(|o| o.write_all(&vec![0u8; *n])).unwrap();
    }
    z.finish().unwrap();
    cur.into_inner()
}

/// Replaces rank 1's checkpoint of the TP2 fixture by `ckpt`.
fn with_rank1(dir: &tempfile::TempDir, name: &str, ckpt: Vec<u8>) -> PathBuf {
    let p = tmp(dir, name);
    rebuild(&fixtures().join(TP2), &p, |n, d| {
        if n == "mp_rank_01/model_weights.ckpt" {
            Some((format!("./{n}"), ckpt.clone()))
        } else {
            keep(n, d)
        }
    });
    p
}

/// A one-tensor state dict pickle: {"w": tensor(storage key `key`, numel, shape)}.
fn tensor_pickle(key: &str, numel: u32, shape: &[u8]) -> Vec<u8> {
    let mut p = b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nBFloat16Storage\n".to_vec();
    p.push(b'X');
    p.extend_from_slice(&(key.len() as u32).to_le_bytes());
    p.extend_from_slice(key.as_bytes());
    p.extend_from_slice(b"X\x03\x00\x00\x00cpuJ");
    p.extend_from_slice(&numel.to_le_bytes());
    p.extend_from_slice(b"tQK\x00(");
    for &s in shape {
        p.extend_from_slice(&[b'K', s]);
    }
    p.extend_from_slice(b"t(");
    let mut stride = 1u8;
    let mut strides = Vec::new();
    for &s in shape.iter().rev() {
        strides.push(stride);
        stride = stride.saturating_mul(s);
    }
    for s in strides.iter().rev() {
        p.extend_from_slice(&[b'K', *s]);
    }
    p.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtRu.");
    p
}

#[test]
fn a_sane_rebuild_is_accepted() {
    // Guards the helpers: rebuilding without changes gives an archive that inspects fine,
    // and a rank holding a hand-made one-tensor pickle parses (then fails on schema only).
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "same.nemo");
    rebuild(&fixtures().join(TP2), &p, keep);
    let (code, stdout, stderr) = run(&["inspect", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("TP 2 x PP 1"));
    let z = torch_zip(&tensor_pickle("0", 6, &[2, 3]), &[("0", 12)]);
    let sd = steerlm_convert::torch::state_dict::StateDict::read(&z, 0, "m").unwrap();
    assert_eq!(sd.tensors().next().unwrap().1.shape, vec![2, 3]);
}

#[test]
fn truncated_tar() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "cut.nemo");
    let b = std::fs::read(fixtures().join(TP2)).unwrap();
    std::fs::write(&p, &b[..b.len() / 2 + 100]).unwrap();
    inspect_refuses(&p, "truncated");
}

#[test]
fn not_an_archive_and_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "junk.nemo");
    std::fs::write(&p, vec![b'x'; 4096]).unwrap();
    inspect_refuses(&p, "not a tar archive, or a corrupt one");
    std::fs::write(&p, b"").unwrap();
    inspect_refuses(&p, "the file is empty");
    inspect_refuses(&tmp(&dir, "absent.nemo"), "absent.nemo");
}

#[test]
fn truncated_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "cut.nemo");
    let b = std::fs::read(fixtures().join("archives/legacy_tp2_gzip.nemo")).unwrap();
    std::fs::write(&p, &b[..b.len() / 3]).unwrap();
    inspect_refuses(&p, "gzip stream is corrupt or truncated");
}

#[test]
fn truncated_zip_member() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = std::fs::read(fixtures().join(TP2)).unwrap();
    let members = steerlm_convert::container::tar::index(&ckpt, "f").unwrap();
    let m = members
        .iter()
        .find(|m| m.name == "mp_rank_01/model_weights.ckpt")
        .unwrap();
    let data = &ckpt[m.offset as usize..(m.offset + m.size) as usize];
    let p = with_rank1(&dir, "cutzip.nemo", data[..data.len() / 2].to_vec());
    inspect_refuses(
        &p,
        "mp_rank_01/model_weights.ckpt: zip: no end-of-central-directory record",
    );
}

#[test]
fn corrupt_central_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut z = torch_zip(&tensor_pickle("0", 6, &[2, 3]), &[("0", 12)]);
    let cd = z
        .windows(4)
        .rposition(|w| w == [0x50, 0x4b, 0x01, 0x02])
        .unwrap();
    z[cd] = 0x51;
    let p = with_rank1(&dir, "cd.nemo", z);
    inspect_refuses(&p, "corrupt central directory");
}

#[test]
fn unknown_pickle_opcode() {
    let dir = tempfile::tempdir().unwrap();
    let p = with_rank1(&dir, "op.nemo", torch_zip(b"\x80\x02}q\x00\xfe.", &[]));
    inspect_refuses(
        &p,
        "mp_rank_01/model_weights.ckpt: pickle: unknown opcode 0xfe (at byte 5 of the pickle)",
    );
}

#[test]
fn pickles_that_would_run_code_are_refused_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let cmd = format!("touch {}", marker.display());
    let mut p = b"\x80\x02cos\nsystem\nX".to_vec();
    p.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    p.extend_from_slice(cmd.as_bytes());
    p.extend_from_slice(b"\x85R.");
    let a = with_rank1(&dir, "os.nemo", torch_zip(&p, &[]));
    inspect_refuses(&a, "refused global `os.system`");
    let b = with_rank1(
        &dir,
        "eval.nemo",
        torch_zip(b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.", &[]),
    );
    inspect_refuses(&b, "refused global `builtins.eval`");
    let c = with_rank1(
        &dir,
        "posix.nemo",
        torch_zip(b"\x80\x02\x8c\x05posix\x8c\x06system\x93.", &[]),
    );
    inspect_refuses(&c, "refused global `posix.system`");
    assert!(!marker.exists(), "nothing was executed");
}

#[test]
fn storage_key_without_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let p = with_rank1(
        &dir,
        "key.nemo",
        torch_zip(&tensor_pickle("7", 6, &[2, 3]), &[("0", 12)]),
    );
    inspect_refuses(
        &p,
        "tensor `w`: its storage `7` has no `data/7` record in the zip",
    );
}

#[test]
fn tensor_running_past_its_record() {
    let dir = tempfile::tempdir().unwrap();
    // The storage claims 6 elements (12 bytes) but the record holds 8 bytes.
    let p = with_rank1(
        &dir,
        "short.nemo",
        torch_zip(&tensor_pickle("0", 6, &[2, 3]), &[("0", 8)]),
    );
    inspect_refuses(
        &p,
        "its storage claims 12 bytes but record `data/0` holds 8",
    );
    // The storage fits its record but the view (3×3) runs past it.
    let p = with_rank1(
        &dir,
        "view.nemo",
        torch_zip(&tensor_pickle("0", 6, &[3, 3]), &[("0", 12)]),
    );
    inspect_refuses(&p, "run past the end of its storage record `data/0`");
}

#[test]
fn missing_rank_folder() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "norank.nemo");
    rebuild(&fixtures().join(TP2), &p, |n, d| {
        if n.starts_with("mp_rank_01") {
            None
        } else {
            keep(n, d)
        }
    });
    inspect_refuses(&p, "missing rank folder mp_rank_01");
}

#[test]
fn tp_count_contradicting_the_config() {
    let dir = tempfile::tempdir().unwrap();
    for (tp, want) in [
        (
            "1",
            "has rank folder mp_rank_01 but model_config.yaml says tensor_model_parallel_size: 1",
        ),
        ("4", "missing rank folder mp_rank_02"),
    ] {
        let p = tmp(&dir, &format!("tp{tp}.nemo"));
        rebuild(&fixtures().join(TP2), &p, |n, d| {
            if n == "model_config.yaml" {
                let y = String::from_utf8(d.to_vec()).unwrap();
                assert!(y.contains("tensor_model_parallel_size: 2"));
                Some((
                    format!("./{n}"),
                    y.replace(
                        "tensor_model_parallel_size: 2",
                        &format!("tensor_model_parallel_size: {tp}"),
                    )
                    .into_bytes(),
                ))
            } else {
                keep(n, d)
            }
        });
        inspect_refuses(&p, want);
    }
}

#[test]
fn member_names_that_escape() {
    let dir = tempfile::tempdir().unwrap();
    for (bad, want) in [
        ("./../../etc/evil", "escapes the archive with `..`"),
        ("/etc/evil", "has an absolute path"),
    ] {
        let p = tmp(&dir, "escape.nemo");
        let mut first = true;
        rebuild(&fixtures().join(TP2), &p, |n, d| {
            if first {
                first = false;
                Some((bad.to_string(), d.to_vec()))
            } else {
                keep(n, d)
            }
        });
        inspect_refuses(&p, want);
    }
}

#[test]
fn config_problems() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "nocfg.nemo");
    rebuild(&fixtures().join(TP2), &p, |n, d| {
        if n == "model_config.yaml" {
            None
        } else {
            keep(n, d)
        }
    });
    inspect_refuses(&p, "no model_config.yaml member");
    let p = tmp(&dir, "badcfg.nemo");
    rebuild(&fixtures().join(TP2), &p, |n, d| {
        if n == "model_config.yaml" {
            Some((format!("./{n}"), b"num_layers: [unclosed\n".to_vec()))
        } else {
            keep(n, d)
        }
    });
    inspect_refuses(&p, "model_config.yaml: not valid YAML");
}

#[test]
fn a_tokenizer_that_is_not_sentencepiece_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "tok.nemo");
    rebuild(&fixtures().join(TP2), &p, |n, d| {
        if n.ends_with("_tokenizer.model") {
            Some((format!("./{n}"), b"\x0a\xff\xff\xff".to_vec()))
        } else {
            keep(n, d)
        }
    });
    let (code, stdout, _) = run(&["inspect", p.to_str().unwrap()]);
    assert_eq!(code, 0, "inspect still describes the weights");
    assert!(
        stdout.contains("warning:") && stdout.contains("not a SentencePiece model"),
        "{stdout}"
    );
}

#[test]
fn dist_checkpoints_with_unknown_backends_or_compressed_zarr_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let zarr = fixtures().join("archives/gqa_dist_zarr_bf16.nemo");
    let p = tmp(&dir, "backend.nemo");
    rebuild(&zarr, &p, |n, d| {
        if n == "model_weights/metadata.json" {
            Some((
                format!("./{n}"),
                br#"{"sharded_backend": "tensorstore", "sharded_backend_version": 1}"#.to_vec(),
            ))
        } else {
            keep(n, d)
        }
    });
    inspect_refuses(
        &p,
        "sharded backend `tensorstore` is not supported (zarr and torch_dist are)",
    );
    let p = tmp(&dir, "blosc.nemo");
    rebuild(&zarr, &p, |n, d| {
        if n == "model_weights/model.output_layer.weight/.zarray" {
            let z = String::from_utf8(d.to_vec()).unwrap().replace(
                "\"compressor\": null",
                "\"compressor\": {\"id\": \"blosc\"}",
            );
            Some((format!("./{n}"), z.into_bytes()))
        } else {
            keep(n, d)
        }
    });
    inspect_refuses(
        &p,
        "array `model.output_layer.weight`: compressed or filtered chunks are not supported",
    );
    let p = tmp(&dir, "chunk.nemo");
    rebuild(&zarr, &p, |n, d| {
        if n == "model_weights/model.output_layer.weight/1.0" {
            None
        } else {
            keep(n, d)
        }
    });
    inspect_refuses(
        &p,
        "array `model.output_layer.weight`: 1 of 2 chunks present",
    );
}

const TORCH_DIST: &str = "archives/gqa_torch_dist_tp2_bf16.nemo";

/// The torch_dist fixture with one member replaced (`None`: removed).
fn torch_dist_with(
    dir: &tempfile::TempDir,
    name: &str,
    member: &str,
    bytes: Option<Vec<u8>>,
) -> PathBuf {
    let p = tmp(dir, name);
    let mut seen = false;
    rebuild(&fixtures().join(TORCH_DIST), &p, |n, d| {
        if n == member {
            seen = true;
            bytes.clone().map(|b| (format!("./{n}"), b))
        } else {
            keep(n, d)
        }
    });
    assert!(seen, "{member} is in the fixture");
    p
}

/// Broken `.metadata` files written by fixtures/make_torch_dist.py (the real Metadata
/// object with one thing changed), and broken `.distcp` files: one line, exit 2, and no
/// output from a conversion.
#[test]
fn hostile_torch_dist_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = fixtures().join("hostile/torch_dist");
    for (variant, want) in [
        ("runs_code", "model_weights/.metadata: pickle: refused global `posix.system`"),
        ("overlap", "array `model.output_layer.weight`: chunks 0 and 1 overlap"),
        ("missing", "array `model.output_layer.weight`: no chunk holds the element at [208, 0]"),
        ("past_end", "chunk [0, 0] of `model.output_layer.weight` (bytes"),
        (
            "shape",
            "array `model.decoder.layers.self_attention.linear_qkv.layer_norm_weight`: shape [3, 64] contradicts the config (expected [4, 64])",
        ),
    ] {
        let md = std::fs::read(hostile.join(format!("{variant}.metadata"))).unwrap();
        let p = torch_dist_with(&dir, &format!("{variant}.nemo"), "model_weights/.metadata", Some(md));
        let err = inspect_refuses(&p, want);
        if variant == "runs_code" {
            assert!(err.contains("refused global `posix.system`"), "{err}");
        }
        if variant == "past_end" {
            assert!(err.contains("runs past the end of `model_weights/__"), "{err}");
        }
        let out = dir.path().join(format!("{variant}-out"));
        let (code, _, err) = run(&["nemo-to-safetensors", p.to_str().unwrap(), out.to_str().unwrap()]);
        refused(code, &err, &out, want);
    }
    // A .distcp file cut short, and one missing.
    let p = torch_dist_with(
        &dir,
        "cut.nemo",
        "model_weights/__0_0.distcp",
        Some(vec![0u8; 100]),
    );
    inspect_refuses(
        &p,
        "runs past the end of `model_weights/__0_0.distcp` (100 bytes)",
    );
    let p = torch_dist_with(&dir, "gone.nemo", "model_weights/__1_1.distcp", None);
    inspect_refuses(&p, "is in `model_weights/__1_1.distcp`, which is missing");
    // Bytes that are not a torch.save blob where the chunks should be.
    let p = torch_dist_with(
        &dir,
        "junk.nemo",
        "model_weights/__0_0.distcp",
        Some(vec![7u8; 1 << 20]),
    );
    inspect_refuses(&p, "in `model_weights/__0_0.distcp` at byte 14592 is neither a torch.save blob nor its raw bytes");
}

/// NeMo 2.0: a model.yaml that is not a Llama, one without its config block, and weights
/// whose shapes contradict it are each refused in one line.
#[test]
fn hostile_nemo2_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("archives/nemo2_gqa_tp2_bf16.nemo");
    let with_yaml = |name: &str, edit: &dyn Fn(&str) -> String| {
        let p = tmp(&dir, name);
        rebuild(&src, &p, |n, d| {
            if n == "context/model.yaml" {
                let text = edit(std::str::from_utf8(d).unwrap());
                Some((format!("./{n}"), text.into_bytes()))
            } else {
                keep(n, d)
            }
        });
        p
    };
    let p = with_yaml("gelu.nemo", &|t| {
        t.replace("torch.nn.functional.silu", "torch.nn.functional.gelu")
    });
    inspect_refuses(
        &p,
        "context/model.yaml: activation `gelu (gated)` is not a Llama activation",
    );
    let p = with_yaml("noconfig.nemo", &|_| {
        "_target_: nemo.collections.llm.gpt.model.llama.LlamaModel\n".into()
    });
    inspect_refuses(
        &p,
        "context/model.yaml: no `config` block: not a NeMo 2.0 model.yaml",
    );
    let p = with_yaml("layers.nemo", &|t| {
        t.replace("num_layers: 4", "num_layers: 2")
    });
    inspect_refuses(&p, "array `module.decoder.layers.self_attention.linear_proj.weight`: shape [4, 64, 64] contradicts the config (expected [2, 64, 64])");
    let p = with_yaml("tok.nemo", &|t| {
        t.replace("artifacts/tokenizer.model", "artifacts/missing.model")
    });
    let (code, _, err) = run(&["generate", p.to_str().unwrap(), "--prompt", "hi", "--raw"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("tokenizer artifact `context/artifacts/missing.model` is not in the archive"),
        "{err}"
    );
}
