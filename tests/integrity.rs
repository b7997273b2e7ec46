//! A byte flipped inside a tensor of a `.nemo`: torch's zip stores a CRC-32 of every record,
//! so every command that reads tensors refuses the file (exit 2, one line naming the member,
//! record and tensor), leaving no output; `--no-crc` reads it as it is.

mod common;

use common::*;

const MEMBER: &str = "mp_rank_01/model_weights.ckpt";

#[test]
fn a_flipped_byte_is_refused_by_every_command_that_reads_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = patched_archive(dir.path(), MEMBER, &[0x5a], false);
    let bad = bad.to_str().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    for args in [
        vec!["nemo-to-safetensors", bad, o],
        vec!["reshard", bad, o, "--tp", "1"],
        vec!["reshard", bad, o, "--tp", "1", "--format", "nemo"],
        vec!["quantize", bad, o, "--scheme", "int8"],
        vec!["quantize", bad, o, "--scheme", "fp16"],
    ] {
        let mut args = args.clone();
        args.push("-q");
        let (code, _, err) = run(&args);
        refused(code, &err, &out, "fails its CRC-32 check");
        assert!(err.contains(MEMBER), "{args:?}: {err}");
        assert!(
            err.contains("self_attn.o_proj") || err.contains("dense"),
            "{err}"
        );
    }
    let (code, stdout, err) = run(&["generate", bad, "--prompt", "hi", "--max-tokens", "1", "-q"]);
    assert_eq!(code, 2, "{err}");
    assert!(stdout.is_empty());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("fails its CRC-32 check") && err.contains(MEMBER),
        "{err}"
    );
    // Opt out: the bytes are read as they are.
    let (code, _, err) = run(&["nemo-to-safetensors", bad, o, "--no-crc", "-q"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_patched_tensor_with_its_crc_updated_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let good = patched_archive(dir.path(), MEMBER, &[0x5a], true);
    let out = dir.path().join("out");
    let (code, _, err) = run(&[
        "nemo-to-safetensors",
        good.to_str().unwrap(),
        out.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn verify_fails_a_flipped_byte_naming_the_member_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let bad = patched_archive(dir.path(), MEMBER, &[0x5a], false);
    let hf = dir.path().join("hf");
    let src = fixtures().join("archives/legacy_tp2_bf16.nemo");
    let (code, _, err) = run(&[
        "nemo-to-safetensors",
        src.to_str().unwrap(),
        hf.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(code, 0, "{err}");
    let report = dir.path().join("r.json");
    for args in [
        vec![hf.to_str().unwrap(), "--against", bad.to_str().unwrap()],
        vec![bad.to_str().unwrap(), "--against", src.to_str().unwrap()],
        vec![bad.to_str().unwrap()],
    ] {
        let mut a = vec!["verify"];
        a.extend(args.iter().copied());
        a.extend(["-q", "--json", report.to_str().unwrap()]);
        let (code, out, err) = run(&a);
        assert_eq!(code, 1, "{a:?}: {out}{err}");
        let fail = out.lines().find(|l| l.starts_with("FAIL")).unwrap_or("");
        assert!(
            fail.starts_with("FAIL integrity")
                && fail.contains(MEMBER)
                && fail.contains("fails its CRC-32 check")
                && fail.contains("self_attn.o_proj"),
            "{out}"
        );
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        assert_eq!(r["pass"], false);
        assert!(r["first_failure"]
            .as_str()
            .unwrap()
            .starts_with("integrity"));
    }
}
