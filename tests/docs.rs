//! The README cannot drift from the binary: its CLI reference is the `--help` of every
//! command, and its `--json` schema lists exactly the fields every command prints, with
//! their types. `STEERLM_UPDATE_README=1 cargo test --test docs` rewrites the CLI
//! reference from the binary.

mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::Value;

const COMMANDS: [&str; 5] = [
    "inspect",
    "nemo-to-safetensors",
    "reshard",
    "quantize",
    "generate",
];

fn readme() -> String {
    std::fs::read_to_string(fixtures().join("../README.md")).unwrap()
}

fn section<'a>(text: &'a str, start: &str, end: &str) -> (usize, usize, &'a str) {
    let a = text
        .find(start)
        .unwrap_or_else(|| panic!("README lacks {start}"))
        + start.len();
    let b = a + text[a..]
        .find(end)
        .unwrap_or_else(|| panic!("README lacks {end}"));
    (a, b, &text[a..b])
}

#[test]
fn readme_cli_reference_is_the_help_of_every_command() {
    let mut want = String::from("\n");
    for cmd in [None].into_iter().chain(COMMANDS.map(Some)) {
        let args: Vec<&str> = cmd.into_iter().chain(["--help"]).collect();
        let (code, help, err) = run(&args);
        assert_eq!(code, 0, "{err}");
        let title = match cmd {
            Some(c) => format!("steerlm-convert {c} --help"),
            None => "steerlm-convert --help".into(),
        };
        want.push_str(&format!(
            "#### `{title}`\n\n```text\n{}\n```\n\n",
            help.trim_end()
        ));
    }
    let text = readme();
    let (a, b, have) = section(
        &text,
        "<!-- cli-reference:start -->",
        "<!-- cli-reference:end -->",
    );
    if have != want && std::env::var("STEERLM_UPDATE_README").is_ok_and(|v| v == "1") {
        let new = format!("{}{want}{}", &text[..a], &text[b..]);
        std::fs::write(fixtures().join("../README.md"), new).unwrap();
        return;
    }
    assert!(
        have == want,
        "the README's CLI reference differs from --help; rerun with STEERLM_UPDATE_README=1"
    );
}

/// `name` → type, from every `` `name` (type) `` in the README's section of one command.
fn documented(command: &str) -> BTreeMap<String, String> {
    let text = readme();
    let (_, _, s) = section(&text, &format!("<!-- json:{command} -->"), "<!-- /json -->");
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some(a) = rest.find('`') {
        let after = &rest[a + 1..];
        let Some(b) = after.find('`') else { break };
        let name = &after[..b];
        let tail = &after[b + 1..];
        if let Some(t) = tail.strip_prefix(" (") {
            let end = t.find([')', ':']).unwrap_or(t.len());
            out.insert(name.to_string(), t[..end].to_string());
        }
        rest = tail;
    }
    out
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every field of `v` (objects by `a.b`, the elements of arrays of objects by `a[].b`).
fn fields(prefix: &str, v: &Value, out: &mut BTreeMap<String, Vec<&'static str>>) {
    if let Value::Object(m) = v {
        for (k, x) in m {
            let name = format!("{prefix}{k}");
            out.entry(name.clone()).or_default().push(type_of(x));
            match x {
                Value::Object(_) => fields(&format!("{name}."), x, out),
                Value::Array(a) => {
                    for e in a.iter().filter(|e| e.is_object()) {
                        fields(&format!("{name}[]."), e, out);
                    }
                }
                _ => {}
            }
        }
    }
}

fn check_schema(command: &str, docs: &[Value]) {
    let want = documented(command);
    let mut seen = BTreeMap::new();
    for d in docs {
        fields("", d, &mut seen);
    }
    for (name, types) in &seen {
        let ty = want
            .get(name)
            .unwrap_or_else(|| panic!("{command} --json: `{name}` is not documented"));
        for t in types {
            assert!(
                ty.split('|').any(|x| x == *t),
                "{command} --json: `{name}` is {t}, documented as {ty}"
            );
        }
    }
    for name in want.keys().filter(|n| !n.contains('.')) {
        assert!(
            seen.contains_key(name),
            "{command} --json: documented `{name}` is never printed"
        );
    }
    for d in docs {
        assert_eq!(d["schema_version"], 1, "{command}");
        assert_eq!(d["command"], command);
    }
}

fn json_of(args: &[&str]) -> Value {
    let (code, out, err) = run(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

#[test]
fn json_output_of_every_command_matches_the_documented_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let a = |p: &str| fixtures().join(p).to_str().unwrap().to_string();
    let o = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let tp2 = a("archives/legacy_tp2_bf16.nemo");
    let zarr = a("archives/gqa_dist_zarr_bf16.nemo");
    check_schema(
        "inspect",
        &[
            json_of(&["inspect", &tp2, "--json", "--tensors"]),
            json_of(&["inspect", &zarr, "--json", "--tensors"]),
            json_of(&["inspect", &tp2, "--json"]),
        ],
    );
    check_schema(
        "nemo-to-safetensors",
        &[json_of(&[
            "nemo-to-safetensors",
            &tp2,
            &o("hf"),
            "--json",
            "-q",
            "--dtype",
            "fp16",
        ])],
    );
    check_schema(
        "reshard",
        &[
            json_of(&["reshard", &tp2, &o("r"), "--tp", "1", "--json", "-q"]),
            json_of(&["reshard", &zarr, &o("r.nemo"), "--tp", "2", "--json", "-q"]),
        ],
    );
    let report = o("report.json");
    let q = json_of(&[
        "quantize",
        &tp2,
        &o("q"),
        "--scheme",
        "int8",
        "--device",
        "cpu",
        "--json",
        "-q",
        "--report",
        &report,
    ]);
    let from_file: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    check_schema("quantize", &[q, from_file]);
    let vr = o("verify.json");
    let q8 = o("q");
    let verify_doc = |args: &[&str], want: i32| -> Value {
        let mut a = vec!["verify"];
        a.extend_from_slice(args);
        a.extend(["-q", "--json", &vr, "--tokens", "2"]);
        let (code, out, err) = run(&a);
        assert_eq!(code, want, "{a:?}: {out}{err}");
        serde_json::from_slice(&std::fs::read(&vr).unwrap()).unwrap()
    };
    check_schema(
        "verify",
        &[
            verify_doc(&[&q8, "--against", &tp2], 0),
            verify_doc(&[&tp2], 0),
            verify_doc(&[&tp2, "--against", &zarr], 1),
        ],
    );
    check_schema(
        "generate",
        &[
            json_of(&[
                "generate",
                &tp2,
                "--prompt",
                "hi",
                "--max-tokens",
                "4",
                "--json",
                "-q",
            ]),
            json_of(&[
                "generate",
                &zarr,
                "--prompt",
                "hi",
                "--raw",
                "--max-tokens",
                "2",
                "--json",
                "-q",
            ]),
        ],
    );
}
