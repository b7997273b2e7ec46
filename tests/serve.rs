//! `serve` end to end on loopback: the model card's client as printed, the official
//! `openai` client, bad requests, a bounded load test, and SIGTERM under load. The clients
//! are Python (`requests`, `openai`: `cargo xtask test` installs them, and then these
//! checks cannot skip).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::Value;

struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(assert_cmd::cargo::cargo_bin("steerlm-convert"))
            .args(["serve", model.to_str().unwrap(), "-q"])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let first = lines.next().expect("a first line").unwrap();
        let base = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in `{first}`"))
            .to_string();
        let log = Arc::new(Mutex::new(String::new()));
        let l2 = log.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                let mut g = l2.lock().unwrap();
                g.push_str(&l);
                g.push('\n');
            }
        });
        Server { child, base, log }
    }

    /// Waits for the process after SIGTERM (sent by the caller or here).
    fn wait(&mut self) -> (i32, String) {
        let st = self.child.wait().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        (st.code().unwrap_or(-1), self.log.lock().unwrap().clone())
    }

    fn term(&mut self) -> (i32, String) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// The Python that has `requests` and `openai`, or `None` (with the reason) when it is
/// missing and the test command did not require it.
fn python() -> Option<String> {
    let py = std::env::var("STEERLM_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import requests, openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    assert!(
        std::env::var("STEERLM_REQUIRE_PYTHON").is_err(),
        "{py} cannot import requests and openai (cargo xtask test installs them)"
    );
    eprintln!("SKIPPED: {py} cannot import requests and openai; run `cargo xtask test`");
    None
}

fn script(py: &str, args: &[&str]) -> String {
    let out = Command::new(py)
        .args(args)
        .current_dir(fixtures().join("serve"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `fixtures/serve/check_serve.py WHAT BASE ARGS…` against `s`: its JSON.
fn check(py: &str, s: &Server, what: &str, args: &[&str]) -> Value {
    let mut a = vec!["check_serve.py", what, &s.base];
    a.extend_from_slice(args);
    serde_json::from_str(&script(py, &a)).unwrap()
}

fn generate_text(model: &Path, args: &[&str]) -> String {
    let mut a = vec!["generate", model.to_str().unwrap(), "--json", "-q"];
    a.extend_from_slice(args);
    let (code, out, err) = run(&a);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut t = v["text"].as_str().unwrap().to_string();
    if let Some(end) = v["stop_detail"].as_str() {
        t.push_str(end);
    }
    t
}

const QUESTION: &str = "Where and when did techno music originate?";

#[test]
fn the_model_cards_client_gets_what_generate_gives() {
    let Some(py) = python() else { return };
    let model = fixtures().join("archives/legacy_tp2_bf16.nemo");
    // The card's client talks to port 1427, as printed.
    let mut s = Server::start(&model, &["--port", "1427"]);
    let got = script(&py, &["card_client.py"]);
    // Same prompt and settings: the card's template and attributes, no BOS (add_BOS
    // defaults to false), greedy, its end strings, 4096 tokens (more than the context).
    let want = generate_text(
        &model,
        &["--prompt", QUESTION, "--no-bos", "--max-tokens", "4096"],
    );
    assert_eq!(got, format!("{want}\n"));
    let (code, log) = s.term();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("PUT /generate 200 prompt_tokens="), "{log}");
}

#[test]
fn the_openai_client_gets_what_generate_gives() {
    let Some(py) = python() else { return };
    let model = fixtures().join("archives/nemo_mcore_gqa.nemo");
    let s = Server::start(&model, &["--port", "0"]);
    let v: Value = check(&py, &s, "openai", &[]);
    let chat = generate_text(&model, &["--prompt", QUESTION, "--max-tokens", "24"]);
    let want_chat = chat.clone();
    assert_eq!(v["chat"], Value::String(strip_end(&want_chat)));
    assert_eq!(v["stream"], v["chat"], "streamed and whole chat agree");
    let comp = generate_text(
        &model,
        &[
            "--raw",
            "--prompt",
            "The quick brown fox",
            "--max-tokens",
            "12",
        ],
    );
    assert_eq!(v["completion"], Value::String(comp.clone()));
    // The log-prob tokens, spaces included, put together are the text.
    assert_eq!(v["completion_tokens_joined"], Value::String(comp));
    assert_eq!(v["models"], serde_json::json!(["nemo_mcore_gqa.nemo"]));
    // Sampling: the same seed gives the same text, another seed another, and both
    // equal `generate`'s with that seed.
    let seeded = v["seeded"].as_array().unwrap();
    assert_eq!(seeded[0], seeded[1]);
    assert_ne!(seeded[0], seeded[2]);
    let want = generate_text(
        &model,
        &[
            "--raw",
            "--prompt",
            "The quick brown fox",
            "--max-tokens",
            "12",
            "--temperature",
            "0.9",
            "--seed",
            "3",
        ],
    );
    assert_eq!(seeded[0], Value::String(want));
}

/// OpenAI's text leaves the end string out.
fn strip_end(t: &str) -> String {
    for e in steerlm_convert::runtime::steerlm::END_STRINGS {
        if let Some(s) = t.strip_suffix(e) {
            return s.to_string();
        }
    }
    t.to_string()
}

#[test]
fn end_strings_stay_in_the_text_and_a_budget_past_the_context_fills_it() {
    let Some(py) = python() else { return };
    let model = fixtures().join("archives/nemo_mcore_gqa.nemo");
    let s = Server::start(&model, &["--port", "0"]);
    let v: Value = check(&py, &s, "nemo", &[]);
    let (plain, end) = (v["plain"].as_str().unwrap(), v["end"].as_str().unwrap());
    assert!(!end.is_empty(), "{v}");
    // Stopped where the end string completes, the end string kept, as NeMo does.
    let at = plain.find(end).unwrap() + end.len();
    assert_eq!(v["stopped"], Value::String(plain[..at].to_string()), "{v}");
    // 100000 tokens asked: prompt and completion fill the 512-position context.
    assert_eq!(v["full_ids"], 512, "{v}");
    let lp = v["logprob"][0].as_array().unwrap();
    assert_eq!(lp.len(), 5);
    assert!(lp.iter().all(|x| x.as_f64().unwrap() <= 0.0));
    assert_eq!(v["has_full_logprob"], false);
    assert_eq!(v["full_logprob_shape"], serde_json::json!([3, 400]));
    let n = v["token_ids"].as_array().unwrap().len();
    assert_eq!(v["tokens"].as_array().unwrap().len(), n);
    let offs: Vec<u64> = v["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(offs.len(), n);
    assert!(offs.windows(2).all(|w| w[0] <= w[1]), "{offs:?}");
}

#[test]
fn a_stream_whose_client_leaves_stops_generating() {
    let Some(py) = python() else { return };
    let model = fixtures().join("archives/nemo_mcore_gqa.nemo");
    let mut s = Server::start(&model, &["--port", "0"]);
    let v: Value = check(&py, &s, "cancel", &[]);
    assert_eq!(v["after"], 200, "{v}");
    let (code, log) = s.term();
    assert_eq!(code, 0, "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("(client gone, stopped)"))
        .unwrap_or_else(|| panic!("no stopped stream in\n{log}"));
    // The context leaves about 260 tokens after the chat prompt: it stopped well before.
    let n: u64 = line
        .split("generated_tokens=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(n < 200, "{line}");
}

#[test]
fn bad_requests_get_400_and_the_server_keeps_serving() {
    let Some(py) = python() else { return };
    let model = fixtures().join("archives/nemo_mcore_gqa.nemo");
    let mut s = Server::start(&model, &["--port", "0"]);
    let v: Value = check(&py, &s, "bad", &[]);
    for (name, r) in v.as_object().unwrap() {
        let want = match name.as_str() {
            "unknown_route" => 404,
            "still_serving" => 200,
            _ => 400,
        };
        assert_eq!(r[0], want, "{name}: {r}");
        if want != 200 {
            let body: Value = serde_json::from_str(r[1].as_str().unwrap()).unwrap();
            assert!(body["error"].is_string(), "{name}: {r}");
        }
    }
    let (code, log) = s.term();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("PUT /generate 400"), "{log}");
}

#[test]
fn a_bounded_load_loses_nothing_and_sigterm_answers_what_was_accepted() {
    let Some(py) = python() else { return };
    let model = fixtures().join("archives/nemo_mcore_gqa.nemo");
    let mut s = Server::start(&model, &["--port", "0", "--queue", "1"]);
    let v: Value = check(&py, &s, "load", &["300", "8"]);
    eprintln!("load: {v}");
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["refused"], 0, "{v}");
    assert_eq!(
        v["ok"].as_u64().unwrap() + v["busy"].as_u64().unwrap(),
        300,
        "{v}"
    );
    assert!(
        v["busy"].as_u64().unwrap() > 0,
        "the queue of 1 overflowed: {v}"
    );
    let (code, _) = s.term();
    assert_eq!(code, 0);

    // SIGTERM once 20 requests were answered, with 8 clients still sending.
    let mut s = Server::start(&model, &["--port", "0", "--queue", "8"]);
    let pid = s.child.id().to_string();
    let v: Value = check(&py, &s, "load", &["200", "8", &pid, "20"]);
    eprintln!("load with SIGTERM: {v}");
    let (code, log) = s.wait();
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("shutting down") && log.contains("stopped"),
        "{log}"
    );
    assert_eq!(v["lost"], 0, "{v}");
    let ok = v["ok"].as_u64().unwrap();
    assert!(ok >= 20, "{v}");
    // Every request the server answered reached its client, and the other way round.
    assert_eq!(
        log.matches("PUT /generate 200").count() as u64,
        ok,
        "{v}\n{log}"
    );
}
