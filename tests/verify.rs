//! `verify`: every fixture conversion passes; deliberately broken candidates (made here
//! from real conversions, never committed) fail with exit 1 naming the failing check; bad
//! input exits 2 and leaves no report.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// Runs `verify` with a JSON report; returns (code, stdout, stderr, report).
fn verify(
    candidate: &Path,
    against: Option<&Path>,
    extra: &[&str],
) -> (i32, String, String, Value) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let mut args = vec!["verify", candidate.to_str().unwrap()];
    if let Some(a) = against {
        args.extend(["--against", a.to_str().unwrap()]);
    }
    args.extend(["-q", "--json", report.to_str().unwrap()]);
    args.extend(extra);
    let (code, out, err) = run(&args);
    let r = match std::fs::read(&report) {
        Ok(b) => serde_json::from_slice(&b).expect("report JSON"),
        Err(_) => Value::Null,
    };
    (code, out, err, r)
}

fn ok(args: &[&str]) {
    let (code, _, err) = run(args);
    assert_eq!(code, 0, "{args:?}: {err}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn passes(candidate: &Path, against: &Path, class: &str) -> Value {
    let (code, out, err, r) = verify(candidate, Some(against), &[]);
    assert_eq!(
        code,
        0,
        "{} vs {}: {out}{err}",
        candidate.display(),
        against.display()
    );
    assert_eq!(r["pass"], true);
    assert_eq!(r["class"], class, "{out}");
    assert_eq!(
        r["prompts"].as_array().unwrap().len(),
        8,
        "the built-in set"
    );
    for t in r["tensors"].as_array().unwrap() {
        assert_eq!(t["pass"], true, "{t}");
        assert_eq!(t["reference"]["hash"].as_str().unwrap().len(), 64);
    }
    r
}

#[test]
fn every_fixture_merge_verifies_lossless_against_its_archive() {
    let dir = tempfile::tempdir().unwrap();
    for a in archives() {
        let src = fixtures().join(a["file"].as_str().unwrap());
        let out = dir
            .path()
            .join(a["file"].as_str().unwrap().replace('/', "_"));
        ok(&["nemo-to-safetensors", s(&src), s(&out), "-q"]);
        let r = passes(&out, &src, "lossless");
        // Same dtype: the same bits, so the same hash on both sides.
        for t in r["tensors"].as_array().unwrap() {
            assert_eq!(t["rule"], "identical");
            assert_eq!(t["reference"]["hash"], t["candidate"]["hash"]);
        }
        for p in r["prompts"].as_array().unwrap() {
            assert_eq!(p["tokens_match"], true);
        }
    }
}

#[test]
fn reshards_casts_and_int8_verify() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let tp4 = fixtures().join("archives/legacy_tp4_fp16.nemo");
    let bf16 = fixtures().join("archives/legacy_tp2_bf16.nemo");
    let fp32 = fixtures().join("archives/legacy_tp1_fp32.nemo");
    let gqa = fixtures().join("archives/gqa_mcore_tp2_bf16.nemo");
    ok(&["reshard", s(&tp4), s(&d("ranks")), "--tp", "2", "-q"]);
    passes(&d("ranks"), &tp4, "lossless");
    ok(&["reshard", s(&gqa), s(&d("tp1.nemo")), "--tp", "1", "-q"]);
    passes(&d("tp1.nemo"), &gqa, "lossless");
    // A reshard checked against the conversion of its source: any side can be either.
    ok(&["nemo-to-safetensors", s(&gqa), s(&d("gqa-hf")), "-q"]);
    passes(&d("tp1.nemo"), &d("gqa-hf"), "lossless");
    ok(&[
        "nemo-to-safetensors",
        s(&bf16),
        s(&d("f32")),
        "--dtype",
        "fp32",
        "-q",
    ]);
    let r = passes(&d("f32"), &bf16, "lossless");
    assert_eq!(r["tensors"][0]["rule"], "widened");
    for dt in ["bf16", "fp16"] {
        let out = d(&format!("cast-{dt}"));
        ok(&[
            "nemo-to-safetensors",
            s(&fp32),
            s(&out),
            "--dtype",
            dt,
            "-q",
        ]);
        let r = passes(&out, &fp32, "cast");
        assert_eq!(r["tensors"][0]["rule"], "narrowed");
    }
    for (name, extra) in [
        ("q8", vec![]),
        ("q8g", vec!["--granularity", "group", "--group-size", "16"]),
    ] {
        for src in [&bf16, &gqa] {
            let out = d(&format!(
                "{name}-{}",
                src.file_stem().unwrap().to_str().unwrap()
            ));
            let mut a = vec![
                "quantize",
                s(src),
                s(&out),
                "--scheme",
                "int8",
                "--device",
                "cpu",
                "-q",
            ];
            a.extend(extra.iter().copied());
            ok(&a);
            let r = passes(&out, src, "int8");
            let rules: Vec<&str> = r["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["rule"].as_str().unwrap())
                .collect();
            assert!(rules.contains(&"int8") && rules.contains(&"identical"));
        }
    }
}

/// An fp32 model whose values are not exact in bf16 or fp16 (the fixture's mha model,
/// each value nudged off the bf16 grid by a relative 2^-12 pattern), cast by `quantize`:
/// the casts are checked as nearest-even roundings and pass the cast thresholds.
#[test]
fn casts_of_values_off_the_bf16_grid_pass_the_cast_thresholds() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("fp32");
    copy_dir(&fixtures().join("models/mha/hf"), &src);
    edit_safetensors(&src, |name, t| {
        if t.0 == safetensors::Dtype::F32 && !name.contains("norm") {
            for (i, c) in t.2.chunks_exact_mut(4).enumerate() {
                let v = f32::from_le_bytes(c.try_into().unwrap());
                let nudge = 1.0 + ((i * 2654435761) % 7) as f32 * (1.0 / 4096.0);
                c.copy_from_slice(&(v * nudge).to_le_bytes());
            }
        }
    });
    for dt in ["bf16", "fp16"] {
        let out = dir.path().join(dt);
        ok(&["quantize", s(&src), s(&out), "--scheme", dt, "-q"]);
        let r = passes(&out, &src, "cast");
        let kl = r["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["max_kl"].as_f64().unwrap())
            .fold(0f64, f64::max);
        // Measured 8.9e-5 (bf16) and 6.3e-6 (fp16): inside the cast default of 5e-3, yet
        // not zero, so the values really were rounded.
        assert!(kl > 0.0 && kl < 1e-3, "{dt}: max KL {kl:e}");
    }
}

#[test]
fn self_check_passes_fixtures_and_fails_a_non_finite_weight() {
    let dir = tempfile::tempdir().unwrap();
    for p in ["archives/nemo_mcore_gqa_tp2.nemo", "models/gqa/hf"] {
        let (code, out, err, r) = verify(&fixtures().join(p), None, &[]);
        assert_eq!(code, 0, "{p}: {out}{err}");
        assert_eq!(r["mode"], "self");
    }
    let hf = dir.path().join("nan");
    copy_dir(&fixtures().join("models/gqa/hf"), &hf);
    edit_safetensors(&hf, |name, t| {
        if name == "model.layers.1.mlp.up_proj.weight" {
            t.2[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        }
    });
    let (code, out, _, _) = verify(&hf, None, &["--tokens", "0"]);
    assert_eq!(code, 1, "{out}");
    assert_fail(
        &out,
        "finite",
        &["model.layers.1.mlp.up_proj.weight", "[0, 2]", "NaN"],
    );
}

/// The first FAIL line names `check` and contains every one of `want`.
fn assert_fail(out: &str, check: &str, want: &[&str]) {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("FAIL {check} ")))
        .unwrap_or_else(|| panic!("no FAIL {check} line in:\n{out}"));
    for w in want {
        assert!(line.contains(w), "`{w}` not in `{line}`");
    }
}

type Stored = (safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Rewrites every `*.safetensors` of `dir`: `f(name, tensor)` may change the bytes; renames
/// come from `rename` (old → new).
fn edit_safetensors(dir: &Path, mut f: impl FnMut(&str, &mut Stored)) {
    rename_safetensors(dir, &BTreeMap::new(), &mut f);
}

fn rename_safetensors(
    dir: &Path,
    rename: &BTreeMap<&str, &str>,
    f: &mut dyn FnMut(&str, &mut Stored),
) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut out: Vec<(String, Stored)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                let mut t = (v.dtype(), v.shape().to_vec(), v.data().to_vec());
                f(&n, &mut t);
                (
                    rename.get(n.as_str()).map_or(n.clone(), |r| r.to_string()),
                    t,
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        let views: Vec<(String, safetensors::tensor::TensorView)> = out
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(t.0, t.1.clone(), &t.2).unwrap(),
                )
            })
            .collect();
        let meta = Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]));
        safetensors::serialize_to_file(views, meta, &p).unwrap();
    }
}

/// Swaps the names of two tensors of a folder (a converter that mixed them up).
fn swap_names(dir: &Path, a: &str, b: &str) {
    rename_safetensors(dir, &BTreeMap::from([(a, b), (b, a)]), &mut |_, _| {});
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Swaps two same-length normal pieces in a SentencePiece `tokenizer.model` (each stored
/// as a length-prefixed string field, so the protobuf stays valid).
fn swap_two_pieces(path: &Path) -> (String, String) {
    let mut bytes = std::fs::read(path).unwrap();
    let sp = steerlm_convert::nemo::tokenizer::SpModel::parse(&bytes, "t").unwrap();
    let field = |p: &str| {
        let mut f = vec![0x0a, p.len() as u8];
        f.extend_from_slice(p.as_bytes());
        f
    };
    let find = |hay: &[u8], f: &[u8]| {
        let hits: Vec<usize> = hay
            .windows(f.len())
            .enumerate()
            .filter(|(_, w)| *w == f)
            .map(|(i, _)| i)
            .collect();
        (hits.len() == 1).then(|| hits[0])
    };
    let normal: Vec<&str> = sp
        .pieces
        .iter()
        .skip(10)
        .filter(|p| {
            p.kind == steerlm_convert::nemo::tokenizer::PieceType::Normal && p.piece.len() >= 3
        })
        .map(|p| p.piece.as_str())
        .collect();
    for (i, a) in normal.iter().enumerate() {
        for b in &normal[i + 1..] {
            if a.len() != b.len() {
                continue;
            }
            let (fa, fb) = (field(a), field(b));
            if let (Some(x), Some(y)) = (find(&bytes, &fa), find(&bytes, &fb)) {
                bytes[x..x + fa.len()].copy_from_slice(&fb);
                bytes[y..y + fb.len()].copy_from_slice(&fa);
                std::fs::write(path, &bytes).unwrap();
                return (a.to_string(), b.to_string());
            }
        }
    }
    panic!("no two pieces to swap");
}

/// The gqa fixture's QKV as NeMo fuses it (per query group: its query heads, then k, then
/// v), split naively into all q, then all k, then all v.
fn naive_qkv_split(dir: &Path, layer: usize) {
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let heads = cfg["num_attention_heads"].as_u64().unwrap() as usize;
    let groups = cfg["num_key_value_heads"].as_u64().unwrap() as usize;
    let hd = cfg["hidden_size"].as_u64().unwrap() as usize / heads;
    let p = format!("model.layers.{layer}.self_attn.");
    let mut parts: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    edit_safetensors(dir, |n, t| {
        if let Some(k) = n
            .strip_prefix(&p)
            .filter(|k| ["q_proj.weight", "k_proj.weight", "v_proj.weight"].contains(k))
        {
            parts.insert(k[..1].to_string(), t.2.clone());
        }
    });
    let row = parts["q"].len() / (heads * hd);
    let per = heads / groups;
    let mut fused = Vec::new();
    for g in 0..groups {
        fused.extend_from_slice(&parts["q"][g * per * hd * row..(g + 1) * per * hd * row]);
        fused.extend_from_slice(&parts["k"][g * hd * row..(g + 1) * hd * row]);
        fused.extend_from_slice(&parts["v"][g * hd * row..(g + 1) * hd * row]);
    }
    let (nq, nk) = (heads * hd * row, groups * hd * row);
    edit_safetensors(dir, |n, t| match n.strip_prefix(&p) {
        Some("q_proj.weight") => t.2 = fused[..nq].to_vec(),
        Some("k_proj.weight") => t.2 = fused[nq..nq + nk].to_vec(),
        Some("v_proj.weight") => t.2 = fused[nq + nk..].to_vec(),
        _ => {}
    });
}

#[test]
fn broken_candidates_fail_naming_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("archives/gqa_mcore_tp2_bf16.nemo");
    let good = dir.path().join("good");
    ok(&["nemo-to-safetensors", s(&src), s(&good), "-q"]);
    let int8 = dir.path().join("int8");
    ok(&[
        "quantize",
        s(&src),
        s(&int8),
        "--scheme",
        "int8",
        "--device",
        "cpu",
        "-q",
    ]);
    let case = |name: &str, base: &Path| -> PathBuf {
        let d = dir.path().join(name);
        copy_dir(base, &d);
        d
    };
    let mut cases: Vec<(PathBuf, &str, Vec<String>)> = Vec::new();

    let d = case("gate-up", &good);
    let g = "model.layers.0.mlp.gate_proj.weight";
    swap_names(&d, g, "model.layers.0.mlp.up_proj.weight");
    cases.push((d, "tensors", vec![g.into()]));

    let d = case("qkv", &good);
    naive_qkv_split(&d, 0);
    cases.push((
        d,
        "tensors",
        vec!["model.layers.0.self_attn.q_proj.weight".into()],
    ));

    let d = case("vocab", &good);
    let mut padded = 0;
    edit_safetensors(&d, |n, t| {
        if n == "model.embed_tokens.weight" || n == "lm_head.weight" {
            let rows = t.1[0].div_ceil(128) * 128 + 128;
            t.2.resize(rows * t.1[1] * 2, 0);
            t.1[0] = rows;
            padded = rows;
        }
    });
    edit_config(&d, |c| c["vocab_size"] = padded.into());
    cases.push((d, "config", vec!["vocab".into(), padded.to_string()]));

    let d = case("ulp", &good);
    let o = "model.layers.1.self_attn.o_proj.weight";
    edit_safetensors(&d, |n, t| {
        if n == o {
            let i = 2 * (3 * t.1[1] + 5);
            let v = u16::from_le_bytes([t.2[i], t.2[i + 1]]) + 1;
            t.2[i..i + 2].copy_from_slice(&v.to_le_bytes());
        }
    });
    cases.push((
        d,
        "tensors",
        vec![o.into(), "[3, 5]".into(), "not the same bits".into()],
    ));

    let d = case("norms", &good);
    let a = "model.layers.0.input_layernorm.weight";
    swap_names(&d, a, "model.layers.0.post_attention_layernorm.weight");
    cases.push((d, "tensors", vec![a.into()]));

    let d = case("tokenizer", &good);
    let (p1, _) = swap_two_pieces(&d.join("tokenizer.model"));
    cases.push((d, "tokenizer", vec!["piece".into(), format!("{p1:?}")]));

    let d = case("scale", &int8);
    let sc = "model.layers.2.mlp.down_proj.weight_scale";
    edit_safetensors(&d, |n, t| {
        if n == sc {
            let v = u16::from_le_bytes([t.2[14], t.2[15]]) + 1;
            t.2[14..16].copy_from_slice(&v.to_le_bytes());
        }
    });
    cases.push((
        d,
        "tensors",
        vec![
            "model.layers.2.mlp.down_proj.weight".into(),
            "row 7".into(),
            "scale".into(),
        ],
    ));

    let d = case("rope", &good);
    edit_config(&d, |c| c["rope_theta"] = 12345.0.into());
    cases.push((d, "config", vec!["rope base".into(), "12345".into()]));

    for (d, check, want) in &cases {
        let (code, out, err, r) = verify(d, Some(&src), &[]);
        assert_eq!(code, 1, "{}: {out}{err}", d.display());
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_fail(&out, check, &want);
        assert_eq!(r["pass"], false);
        assert!(r["first_failure"].is_string());
    }
    // The good ones pass, so the failures above are the breakage.
    passes(&good, &src, "lossless");
    passes(&int8, &src, "int8");
}

#[test]
fn a_swap_fails_the_generation_check_too() {
    // Swapped gate/up fail the tensor check; the logits show it as well.
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("archives/gqa_mcore_tp2_bf16.nemo");
    let d = dir.path().join("gate-up");
    ok(&["nemo-to-safetensors", s(&src), s(&d), "-q"]);
    swap_names(
        &d,
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    );
    let (code, out, _, r) = verify(&d, Some(&src), &[]);
    assert_eq!(code, 1);
    assert!(
        out.lines().any(|l| l.starts_with("FAIL generation")),
        "{out}"
    );
    let worst = r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["max_abs_diff"].as_f64().unwrap())
        .fold(0f64, f64::max);
    assert!(worst > 0.1, "{worst}");
}

#[test]
fn bad_input_exits_2_with_one_line_and_no_report() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("archives/legacy_tp2_bf16.nemo");
    let report = dir.path().join("r.json");
    let no_tok = dir.path().join("no-tok");
    copy_dir(&fixtures().join("models/mha/hf"), &no_tok);
    std::fs::remove_file(no_tok.join("tokenizer.model")).unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"hi\"}\nnot json\n").unwrap();
    let missing = dir.path().join("missing.nemo");
    for (args, want) in [
        (vec![s(&missing)], "missing.nemo"),
        (vec![s(&src), "--against", s(&missing)], "missing.nemo"),
        (vec![s(&src), "--against", s(&no_tok)], "tokenizer"),
        (vec![s(&src), "--prompts", s(&prompts)], "p.jsonl:2"),
        (vec![s(&src), "--device", "cuda"], "--device cuda"),
        (vec![s(&src), "--min-top1", "2"], "--min-top1"),
        (vec![s(&src), "--json", s(&src)], "input"),
    ] {
        let mut a = vec!["verify"];
        a.extend(args.iter().copied());
        if !a.contains(&"--json") {
            a.extend(["--json", s(&report)]);
        }
        a.push("-q");
        let (code, out, err) = run(&a);
        assert_eq!(code, 2, "{a:?}: {out}{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(want), "`{want}` not in {err}");
        assert!(!report.exists(), "{a:?} left a report");
        assert_no_leftovers(&report);
    }
}
