//! The README's GitHub Actions recipe for `verify` works as written: its Convert and
//! Verify steps are run here, word for word, with `bash -e` (as Actions runs `run:`
//! blocks), on a fixture archive, with the binary under test first on PATH. The install
//! step is the one not run: it builds this binary.

mod common;

use std::path::Path;

fn recipe() -> String {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let a = text.find("<!-- ci-recipe -->").expect("recipe start");
    let b = text.find("<!-- /ci-recipe -->").expect("recipe end");
    text[a..b].to_string()
}

/// The `run: |` block of the step named `name`.
fn step(recipe: &str, name: &str) -> String {
    let at = recipe
        .find(&format!("- name: {name}\n"))
        .unwrap_or_else(|| panic!("no step {name}"));
    let rest = &recipe[at..];
    let run = rest.find("run: |\n").expect("a run block") + "run: |\n".len();
    let mut out = String::new();
    let mut indent = None;
    for line in rest[run..].lines() {
        let n = line.len() - line.trim_start().len();
        let i = *indent.get_or_insert(n);
        if line.trim().is_empty() || n < i {
            break;
        }
        out.push_str(&line[i..]);
        out.push('\n');
    }
    out
}

#[test]
fn the_readme_ci_recipe_converts_and_verifies() {
    let r = recipe();
    assert!(r.contains("cargo install --locked"), "an install step");
    assert!(
        r.contains("path: out/verify-*.json"),
        "the reports are kept"
    );
    let dir = tempfile::tempdir().unwrap();
    let bin = assert_cmd::cargo::cargo_bin("steerlm-convert");
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let model = common::fixtures().join("archives/nemo_legacy_tp4.nemo");
    for name in ["Convert", "Verify"] {
        let script = step(&r, name);
        assert!(script.contains("steerlm-convert"), "{script}");
        let out = std::process::Command::new("bash")
            .args(["-e", "-c", &script])
            .current_dir(dir.path())
            .env("PATH", &path)
            .env("MODEL", &model)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}:\n{script}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for report in ["out/verify-hf.json", "out/verify-tp2.json"] {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(report)).unwrap()).unwrap();
        assert_eq!(v["pass"], true, "{report}");
        assert_eq!(v["mode"], "compare");
    }
}
