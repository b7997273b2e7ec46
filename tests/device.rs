//! `--device` of the runtime commands. Where no GPU can be used (CI), `cuda` is refused
//! at once with one line naming the reason and exit 2, and `auto` says why it falls back
//! to the CPU and gives the CPU's tokens. Where a GPU can be used, `cuda` must give the
//! CPU's greedy tokens.

mod common;
use common::{fixtures, quantize_int8, run};

fn gpu_usable() -> bool {
    steerlm_convert::gpu::open_context().is_ok()
}

fn generate(model: &str, device: &str) -> (i32, String, String) {
    run(&[
        "generate",
        model,
        "--prompt",
        "hi",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--json",
        "--device",
        device,
    ])
}

fn ids(out: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["generated_ids"].clone()
}

#[test]
fn generate_on_each_device_gives_the_cpus_greedy_tokens_or_says_why_not() {
    for f in [
        "archives/legacy_tp2_bf16.nemo",
        "archives/gqa_mcore_tp2_bf16.nemo",
    ] {
        let m = fixtures().join(f);
        let m = m.to_str().unwrap();
        let (code, cpu_out, err) = generate(m, "cpu");
        assert_eq!(code, 0, "{err}");
        let (code, out, err) = generate(m, "cuda");
        if gpu_usable() {
            assert_eq!(code, 0, "{f}: {err}");
            assert_eq!(ids(&out), ids(&cpu_out), "{f}: cuda against cpu");
        } else {
            assert_eq!(code, 2, "{f}: {err}");
            assert!(out.is_empty(), "{out}");
            let line = err.trim();
            assert!(!line.contains('\n'), "one line: {line}");
            assert!(line.contains("--device cuda: "), "{line}");
            let (code, out, err) = generate(m, "auto");
            assert_eq!(code, 0, "{err}");
            assert!(err.contains("no GPU used ("), "{err}");
            assert_eq!(ids(&out), ids(&cpu_out), "{f}: auto against cpu");
        }
    }
}

#[test]
fn verify_and_serve_refuse_an_unusable_gpu_before_any_work() {
    let m = fixtures().join("archives/legacy_tp2_bf16.nemo");
    let m = m.to_str().unwrap();
    if gpu_usable() {
        // Then verify runs on it and passes.
        let (code, _, err) = run(&["verify", m, "--tokens", "4", "--device", "cuda", "-q"]);
        assert_eq!(code, 0, "{err}");
        return;
    }
    for args in [
        vec!["verify", m, "--device", "cuda"],
        vec!["serve", m, "--port", "0", "--device", "cuda"],
    ] {
        let (code, out, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("--device cuda: "), "{err}");
    }
}

#[test]
fn int8_activations_stay_on_the_cpu() {
    let m = fixtures().join("archives/legacy_tp2_bf16.nemo");
    let (code, _, err) = run(&[
        "generate",
        m.to_str().unwrap(),
        "--prompt",
        "hi",
        "--int8-activations",
        "--device",
        "cuda",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--int8-activations runs on the CPU only"),
        "{err}"
    );
}

/// The device runtime's forward pass with every kernel replaced by its CPU twin, on the
/// fixtures as their TP shards lie (and int8 from `quantize`): logits within 1e-4 of the
/// CPU runtime (relative to the largest), and the same greedy tokens, through a prompt
/// and decode steps.
#[test]
fn the_device_forward_pass_on_twins_matches_the_cpu_runtime() {
    use steerlm_convert::container::mapped::OpenOptions;
    use steerlm_convert::runtime::backend::Session;
    use steerlm_convert::runtime::device::{DeviceModel, TwinOps};
    use steerlm_convert::runtime::load::Model;

    let tmp = tempfile::tempdir().unwrap();
    let mut models: Vec<std::path::PathBuf> = [
        "archives/legacy_tp2_bf16.nemo",
        "archives/gqa_mcore_tp2_bf16.nemo",
        "archives/legacy_tp4_fp16.nemo",
        "archives/legacy_swiglu_tp2_fp32.nemo",
        "archives/legacy_tp2_pp2_bf16.nemo",
    ]
    .iter()
    .map(|f| fixtures().join(f))
    .collect();
    for (name, group) in [("int8-channel", None), ("int8-g32", Some("32"))] {
        let out = tmp.path().join(name);
        let src = fixtures().join("archives/gqa_mcore_tp2_bf16.nemo");
        quantize_int8(&src, &out, group);
        models.push(out);
    }
    for path in &models {
        let m = Model::open(path, &OpenOptions::default()).unwrap();
        let dev = DeviceModel::upload(TwinOps, &m.weights, &m.archive)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let vocab = m.weights.dims.vocab;
        let prompt = [1u32, 17, 42, 99, 5, 7, 250];
        let mut cpu = m.session(prompt.len() + 8).unwrap();
        let mut twin = dev.session(prompt.len() + 8).unwrap();
        let (mut a, mut b) = (vec![0f32; vocab], vec![0f32; vocab]);
        let mut next = prompt.to_vec();
        for step in 0..6 {
            cpu.forward_into(&next, &mut a).unwrap();
            twin.forward_into(&next, &mut b).unwrap();
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-4 * scale,
                    "{} step {step}: logit {i}: cpu {x}, twins {y}",
                    path.display()
                );
            }
            let ta = steerlm_convert::runtime::compare::argmax(&a).unwrap();
            let tb = steerlm_convert::runtime::compare::argmax(&b).unwrap();
            assert_eq!(ta, tb, "{} step {step}: greedy token", path.display());
            next = vec![ta as u32];
        }
        assert_eq!(twin.len(), prompt.len() + 5);
    }
}
