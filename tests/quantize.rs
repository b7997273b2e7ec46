//! `quantize`: the int8 scheme's error bound (property tests), the compressed-tensors
//! layout written from every kind of input, fp16/bf16 casts, the runtime on int8 weights,
//! and bad input.

mod common;

use std::path::Path;

use common::*;
use proptest::prelude::*;
use serde_json::Value;
use steerlm_convert::container::mapped::OpenOptions;
use steerlm_convert::dtype::DType;
use steerlm_convert::quant::int8::{self, ErrStats, RowError};
use steerlm_convert::runtime::load::Model;

/// Checks the half-step bound of one quantized row against the stored scales.
fn check_bound(x: &[f32], group: usize, dt: DType) -> Result<(), TestCaseError> {
    let mut q = vec![0u8; x.len()];
    let mut s = vec![0f32; x.len().div_ceil(group)];
    let mut st = ErrStats::default();
    int8::quantize_row(x, group, dt, &mut q, &mut s, &mut st).unwrap();
    for (g, xs) in x.chunks(group).enumerate() {
        let sc = s[g] as f64;
        // The stored scale is what the dtype holds.
        prop_assert_eq!(int8::round_scale(s[g], dt), s[g]);
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        if amax == 0.0 {
            prop_assert_eq!(sc, 0.0);
        } else {
            prop_assert!(sc > 0.0);
        }
        for (j, &v) in xs.iter().enumerate() {
            let qi = q[g * group + j] as i32 - 128;
            prop_assert!((-127..=127).contains(&qi));
            let deq = qi as f64 * sc;
            let err = (deq - v as f64).abs();
            if sc == 0.0 {
                prop_assert_eq!(qi, 0);
                continue;
            }
            let ratio = (v as f64 / sc).abs();
            if ratio > 127.5 {
                // Rounding the scale down forced the clamp: within the clamp distance.
                prop_assert_eq!(qi.abs(), 127);
                prop_assert!(err <= (v.abs() as f64 - 127.0 * sc) * (1.0 + 1e-6) + 1e-30);
            } else {
                prop_assert!(
                    err <= sc / 2.0 * (1.0 + 1e-6) + 1e-45,
                    "x {} q {} s {} err {}",
                    v,
                    qi,
                    sc,
                    err
                );
            }
        }
    }
    Ok(())
}

fn dtypes() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)]
}

fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -2.0f32..2.0,
        1 => -1e-3f32..1e-3,
        1 => (0u32..0x0080_0000).prop_map(f32::from_bits), // f32 subnormals
        1 => (0u32..0x0080_0000).prop_map(|b| -f32::from_bits(b)),
        1 => Just(0.0f32),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn int8_channel_and_group_within_half_a_step(
        row in prop::collection::vec(value(), 1..300),
        group in prop_oneof![Just(4usize), Just(32), Just(128), Just(usize::MAX)],
        dt in dtypes(),
    ) {
        let g = group.min(row.len());
        check_bound(&row, g, dt)?;
    }

    #[test]
    fn int8_outliers_and_zero_rows(
        len in 8usize..256,
        at in 0usize..256,
        big in prop_oneof![Just(1e4f32), Just(6e4f32), Just(-3e4f32), Just(1e-30f32)],
        dt in dtypes(),
    ) {
        let mut row = vec![0f32; len];
        check_bound(&row, len, dt)?;
        for (i, v) in row.iter_mut().enumerate() {
            *v = ((i * 7919) % 13) as f32 * 1e-3 - 6e-3;
        }
        row[at % len] = big;
        check_bound(&row, len, dt)?;
        check_bound(&row, 4, dt)?;
    }
}

#[test]
fn tiny_scales_that_round_to_zero_and_non_finite_input() {
    // absmax/127 underflows fp16: the smallest fp16 is stored, and everything clamps.
    let row = [1e-9f32, -2e-9, 0.0, 5e-10];
    check_bound(&row, 4, DType::F16).unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut q = vec![0u8; 4];
        let mut s = vec![0f32; 1];
        let r = int8::quantize_row(
            &[1.0, 2.0, bad, 3.0],
            4,
            DType::BF16,
            &mut q,
            &mut s,
            &mut ErrStats::default(),
        );
        assert!(
            matches!(r, Err(RowError::NonFinite { col: 2, .. })),
            "{r:?}"
        );
    }
    // A scale that overflows fp16 is refused.
    let mut q = vec![0u8; 1];
    let mut s = vec![0f32; 1];
    let r = int8::quantize_row(
        &[1e9],
        1,
        DType::F16,
        &mut q,
        &mut s,
        &mut ErrStats::default(),
    );
    assert!(matches!(r, Err(RowError::ScaleOverflow { .. })), "{r:?}");
}

fn quantize(input: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "quantize",
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    if !extra.contains(&"--scheme") {
        args.extend(["--scheme", "int8"]);
    }
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{args:?}: {err}");
}

fn load(dir: &Path) -> (Vec<u8>, Value) {
    let data = std::fs::read(dir.join("model.safetensors")).unwrap();
    let cfg = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    (data, cfg)
}

fn floats(v: &safetensors::tensor::TensorView) -> Vec<f32> {
    match v.dtype() {
        safetensors::Dtype::F32 => v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::BF16 => v
            .data()
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::F16 => v
            .data()
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        d => panic!("{d:?}"),
    }
}

/// Checks an int8 folder against the model's ground-truth weights: the layout, and every
/// packed value and scale recomputed here from the transformers tensors.
fn check_int8(dir: &Path, model: &str, dtype: DType, group: Option<usize>) {
    let truth = hf_tensors(model);
    let (data, cfg) = load(dir);
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    let qc = &cfg["quantization_config"];
    assert_eq!(qc["quant_method"], "compressed-tensors");
    assert_eq!(qc["format"], "pack-quantized");
    assert_eq!(qc["quantization_status"], "compressed");
    // Every linear layer left in float is listed: the untied `lm_head` is copied, and a
    // tied model's `lm_head` (the embedding, not stored) must be listed too, or
    // compressed-tensors makes it a quantized layer with no weights.
    assert_eq!(qc["ignore"], serde_json::json!(["lm_head"]));
    if !truth.contains_key("lm_head.weight") {
        assert_eq!(cfg["tie_word_embeddings"], true);
        assert!(
            st.tensor("lm_head.weight").is_err(),
            "a tied model writes no lm_head"
        );
    }
    let w = &qc["config_groups"]["group_0"]["weights"];
    assert_eq!(w["num_bits"], 8);
    assert_eq!(w["symmetric"], true);
    assert_eq!(
        w["strategy"],
        if group.is_some() { "group" } else { "channel" }
    );
    let mut n_quant = 0;
    for (name, (shape, vals)) in &truth {
        let m = name.strip_suffix(".weight").unwrap();
        let linear = steerlm_convert::hf::names::linear_modules()
            .iter()
            .any(|p| p != "lm_head" && m.ends_with(p.as_str()));
        if !linear {
            let t = st.tensor(name).unwrap();
            assert_eq!(floats(&t), *vals, "{name} kept in float");
            continue;
        }
        n_quant += 1;
        assert!(
            st.tensor(name).is_err(),
            "{name} must not be written in float"
        );
        let packed = st.tensor(&format!("{m}.weight_packed")).unwrap();
        let scale = st.tensor(&format!("{m}.weight_scale")).unwrap();
        let wshape = st.tensor(&format!("{m}.weight_shape")).unwrap();
        let (rows, cols) = (shape[0], shape[1]);
        assert_eq!(packed.dtype(), safetensors::Dtype::I32);
        assert_eq!(packed.shape(), &[rows, cols / 4]);
        assert_eq!(wshape.dtype(), safetensors::Dtype::I64);
        let ws: Vec<i64> = wshape
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(ws, vec![rows as i64, cols as i64]);
        let g = group.unwrap_or(cols);
        assert_eq!(scale.shape(), &[rows, cols / g]);
        let sdt = match scale.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            d => panic!("{d:?}"),
        };
        assert_eq!(sdt, dtype, "{m}: scale in the model's dtype");
        let scales = floats(&scale);
        // Unpack int32 words: value j of a word in bits 8j..8j+8, offset by 128.
        let words: Vec<u32> = packed
            .data()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        for r in 0..rows {
            for gi in 0..cols / g {
                let xs = &vals[r * cols + gi * g..r * cols + (gi + 1) * g];
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                let want_s = int8::round_scale(amax / 127.0, dtype);
                assert_eq!(scales[r * (cols / g) + gi], want_s, "{m} scale {r},{gi}");
                for (j, &x) in xs.iter().enumerate() {
                    let c = gi * g + j;
                    let word = words[r * cols / 4 + c / 4];
                    let q = ((word >> (8 * (c % 4))) & 0xff) as i32 - 128;
                    let want = (x / want_s).round_ties_even().clamp(-127.0, 127.0) as i32;
                    assert_eq!(q, want, "{m} [{r},{c}]");
                }
            }
        }
    }
    assert_eq!(n_quant, 28);
}

#[test]
fn int8_from_every_kind_of_input() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, DType, Option<usize>); 8] = [
        ("archives/legacy_tp4_fp16.nemo", "mha", DType::F16, None),
        (
            "archives/nemo_legacy_tp2_pp2.nemo",
            "mha",
            DType::F16,
            Some(32),
        ),
        ("archives/gqa_dist_zarr_bf16.nemo", "gqa", DType::BF16, None),
        ("models/gqa/hf", "gqa", DType::F32, Some(16)),
        ("models/mha/hf", "mha", DType::F32, None),
        // Tied embeddings (no lm_head stored) from each kind of source.
        ("models/tied/hf", "tied", DType::F32, Some(16)),
        (
            "archives/tied_llama3_mcore_tp2_bf16.nemo",
            "tied",
            DType::BF16,
            None,
        ),
        (
            "archives/tied_llama3_torch_dist_tp1_fp32.nemo",
            "tied",
            DType::F32,
            Some(32),
        ),
    ];
    for (i, (src, model, dt, group)) in cases.iter().enumerate() {
        let out = tmp.path().join(format!("q{i}"));
        let g = group.map(|g| g.to_string());
        let mut extra = vec![];
        if let Some(g) = &g {
            extra.extend(["--granularity", "group", "--group-size", g.as_str()]);
        }
        quantize(&fixtures().join(src), &out, &extra);
        check_int8(&out, model, *dt, *group);
    }
    // A per-rank folder written by reshard is an input too.
    let ranks = tmp.path().join("ranks");
    reshard_to_ranks("archives/mcore_tp2_bf16.nemo", &ranks, 4);
    let out = tmp.path().join("from-ranks");
    quantize(&ranks, &out, &[]);
    check_int8(&out, "mha", DType::BF16, None);
}

#[test]
fn casts_are_exact_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    for (scheme, dt) in [("bf16", DType::BF16), ("fp16", DType::F16)] {
        for src in ["archives/legacy_tp1_fp32.nemo", "models/gqa/hf"] {
            let out = tmp
                .path()
                .join(format!("{scheme}-{}", src.replace('/', "_")));
            let report = tmp.path().join(format!("{scheme}.json"));
            quantize(
                &fixtures().join(src),
                &out,
                &["--scheme", scheme, "--report", report.to_str().unwrap()],
            );
            let model = if src.contains("gqa") { "gqa" } else { "mha" };
            let (data, cfg) = load(&out);
            assert_eq!(
                cfg["torch_dtype"],
                if dt == DType::BF16 {
                    "bfloat16"
                } else {
                    "float16"
                }
            );
            let st = safetensors::SafeTensors::deserialize(&data).unwrap();
            for (name, (_, vals)) in hf_tensors(model) {
                let t = st.tensor(&name).unwrap();
                assert_eq!(t.data(), cast(&vals, dt).as_slice(), "{name}");
            }
            let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
            for t in r["tensors"].as_array().unwrap() {
                // The fixture weights are exact in both dtypes: no error.
                assert_eq!(t["max_abs_error"], 0.0, "{t}");
            }
        }
    }
}

fn args_with(base: &[&str], more: &[&str]) -> Vec<String> {
    base.iter().chain(more).map(|s| s.to_string()).collect()
}

fn fails(args: &[String], needle: &str, out: &Path) {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stdout, err) = run(&a);
    assert_eq!(code, 2, "{a:?}: {err}");
    assert!(stdout.is_empty());
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(needle), "{a:?}: {err}");
    assert!(!out.exists(), "nothing written");
    let parent = out.parent().unwrap();
    for e in std::fs::read_dir(parent).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.contains("partial"), "leftover {n}");
    }
}

#[test]
fn bad_input_is_one_line_exit_2_and_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap().to_string();
    let nemo = fixtures().join("archives/legacy_tp2_bf16.nemo");
    let n = nemo.to_str().unwrap().to_string();
    let base = ["quantize", n.as_str(), o.as_str()];
    fails(
        &args_with(&base, &["--scheme", "int8", "--group-size", "32"]),
        "--granularity group",
        &out,
    );
    fails(
        &args_with(&base, &["--scheme", "bf16", "--granularity", "group"]),
        "int8 only",
        &out,
    );
    // 48 does not divide the hidden size 64.
    fails(
        &args_with(
            &base,
            &[
                "--scheme",
                "int8",
                "--granularity",
                "group",
                "--group-size",
                "48",
            ],
        ),
        "does not divide",
        &out,
    );
    fails(
        &args_with(&base, &["--scheme", "int8", "--keep", "embed,mlp"]),
        "--keep `mlp`",
        &out,
    );
    // An input that is already quantized.
    let q = tmp.path().join("q");
    quantize(&nemo, &q, &["--scheme", "int8"]);
    let qs = q.to_str().unwrap().to_string();
    fails(
        &args_with(
            &["quantize", qs.as_str(), o.as_str()],
            &["--scheme", "int8"],
        ),
        "already quantized",
        &out,
    );
    // Non-finite weights, in a copy of the transformers folder.
    let src = fixtures().join("models/mha/hf");
    for (bad, tensor, scheme) in [
        (f32::NAN, "model.layers.1.self_attn.k_proj.weight", "int8"),
        (f32::INFINITY, "model.layers.0.mlp.up_proj.weight", "int8"),
        (f32::NEG_INFINITY, "model.norm.weight", "fp16"),
        (1e6, "model.layers.0.mlp.up_proj.weight", "fp16"),
    ] {
        let d = tmp.path().join("bad");
        let _ = std::fs::remove_dir_all(&d);
        copy_dir(&src, &d);
        let data = std::fs::read(d.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&data).unwrap();
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, v) in st.tensors() {
            let mut b = v.data().to_vec();
            if name == tensor {
                b[4 * 5..4 * 6].copy_from_slice(&bad.to_le_bytes());
            }
            owned.push((name, v.shape().to_vec(), b));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = owned
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &d.join("model.safetensors")).unwrap();
        let ds = d.to_str().unwrap().to_string();
        let needle = if bad.is_finite() { "overflow" } else { tensor };
        fails(
            &args_with(
                &["quantize", ds.as_str(), o.as_str()],
                &["--scheme", scheme],
            ),
            needle,
            &out,
        );
    }
}

#[test]
fn runtime_on_int8_against_the_float_model() {
    let tmp = tempfile::tempdir().unwrap();
    let mut table = vec!["| model | granularity | scale dtype | prompt | max abs logit error vs float | greedy tokens equal |".to_string(), "|---|---|---|---|---|---|".to_string()];
    for (src, model, tag) in [
        ("models/mha/hf", "mha", "fp32"),
        ("models/gqa/hf", "gqa", "fp32"),
        ("archives/legacy_tp2_bf16.nemo", "mha", "bf16"),
        ("archives/nemo_mcore_gqa_tp2.nemo", "gqa", "fp16"),
    ] {
        for group in [None, Some("32")] {
            let out = tmp.path().join(format!("{tag}-{model}-{group:?}"));
            let mut extra = vec![];
            if let Some(g) = group {
                extra.extend(["--granularity", "group", "--group-size", g]);
            }
            quantize(&fixtures().join(src), &out, &extra);
            let m = Model::open(&out, &OpenOptions::default()).unwrap();
            assert_eq!(m.weights.layers[0].qkv.wtype.name(), "int8");
            let t = truth(model);
            for p in t["prompts"].as_array().unwrap() {
                let ids = ids_of(&p["ids"]);
                let g = steerlm_convert::runtime::generate::generate(
                    &m,
                    &ids,
                    &steerlm_convert::runtime::generate::GenOptions {
                        max_tokens: 16,
                        ignore_eos: true,
                        end_strings: vec![],
                        ..Default::default()
                    },
                    &mut |_| {},
                )
                .unwrap();
                let want = floats_of(&p["last_logits"]);
                let err = g
                    .prompt_logits
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                let greedy = ids_of(&p["greedy"]);
                let same = g.ids.iter().zip(&greedy).filter(|(a, b)| a == b).count();
                // int8 moves the logits, but not far (a tenth on these weights; a wrong
                // scale or column order moves them by whole units).
                assert!(err < 0.5, "{src} {group:?} {}: {err}", p["name"]);
                table.push(format!(
                    "| {model} ({src}) | {} | {tag} | {} | {err:.2e} | {same}/16 |",
                    group
                        .map(|g| format!("group {g}"))
                        .unwrap_or("channel".into()),
                    p["name"].as_str().unwrap()
                ));
            }
        }
    }
    eprintln!("{}", table.join("\n"));
}

/// Regression (`quantize --scheme fp16 --allow-overflow` reported overflowed tensors as
/// lossless): the overflowed values are counted, their error is infinite in the table,
/// the report and the summary line.
#[test]
fn fp16_allow_overflow_reports_overflowed_tensors_as_lossless() {
    let tmp = tempfile::tempdir().unwrap();
    let src = overflowing_archive(tmp.path());
    let out = tmp.path().join("out");
    let report = tmp.path().join("r.json");
    let (code, stdout, err) = run(&[
        "quantize",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        "--scheme",
        "fp16",
        "--device",
        "cpu",
        "--allow-overflow",
        "--report",
        report.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let same: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["tensors"], same["tensors"], "--json prints the report");
    let t = r["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.0.self_attn.o_proj.weight")
        .unwrap();
    assert_eq!(t["overflowed_values"], 1, "{t}");
    assert_eq!(t["max_abs_error"], "inf", "{t}");
    assert_eq!(t["rel_rms_error"], "inf", "{t}");
    assert_eq!(t["snr_db"], "-inf", "{t}");
    let row = err
        .lines()
        .find(|l| l.starts_with("model.layers.0.self_attn.o_proj.weight"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(row.contains("inf"), "{row}");
    assert!(
        err.contains("1 values in 1 tensors overflowed to ±inf"),
        "{err}"
    );
}

/// Regression (`--report FILE` failed only after the model was written): a report path
/// that cannot be written is refused before any work, and nothing is written.
#[test]
fn report_path_fails_only_after_the_model_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let report = tmp.path().join("no/such/folder/r.json");
    let (code, _, err) = run(&[
        "quantize",
        fixtures().join("models/mha/hf").to_str().unwrap(),
        out.to_str().unwrap(),
        "--scheme",
        "int8",
        "--device",
        "cpu",
        "--report",
        report.to_str().unwrap(),
    ]);
    refused(code, &err, &out, "the output's folder does not exist");
}

/// Regression (`quantize X X --force` replaced the source): refused, source intact.
#[test]
fn quantize_onto_its_own_input_replaces_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    copy_dir(&fixtures().join("models/mha/hf"), &hf);
    let before = std::fs::read(hf.join("model.safetensors")).unwrap();
    let h = hf.to_str().unwrap();
    let (code, _, err) = run(&["quantize", h, h, "--scheme", "int8", "--force"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the output is the input"), "{err}");
    assert_eq!(std::fs::read(hf.join("model.safetensors")).unwrap(), before);
}

/// Regression (SIGTERM and SIGHUP left OUT.partial-<pid> behind, 164-191 MB seen for
/// quantize): every termination signal removes the partial output.
#[test]
fn quantize_sigterm_and_sighup_leave_partials() {
    let tmp = tempfile::tempdir().unwrap();
    let src = big_archive(tmp.path());
    for (sig, name) in [(libc::SIGTERM, "term"), (libc::SIGHUP, "hup")] {
        let out = tmp.path().join(name);
        let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("steerlm-convert"))
            .args(["quantize", src.to_str().unwrap(), out.to_str().unwrap()])
            .args(["--scheme", "int8", "--device", "cpu", "-q"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let partial = tmp.path().join(format!("{name}.partial-{}", child.id()));
        let t = std::time::Instant::now();
        while !partial.exists() {
            assert!(t.elapsed().as_secs() < 60, "no partial output appeared");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let st = child.wait_with_output().unwrap();
        assert_eq!(
            st.status.code(),
            Some(130),
            "{name}: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        assert!(!out.exists());
        assert_no_leftovers(&out);
    }
}
