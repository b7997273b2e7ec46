//! `bench generate`: decode and prompt tokens/s of the CPU runtime on a synthetic 134M
//! Llama (hidden 768, 12 layers, ffn 2048, vocab 32000) in f32, bf16, f16 and int8
//! (channel, groups of 128 and 32), at 1 and 2 threads, against the memory-bandwidth limit
//! and, given `--llama-bench`, against llama.cpp on the same weights (its GGUF files made
//! from the same Hugging Face folder by its own converter and quantizer), run alternately.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use steerlm_convert::container::mapped::OpenOptions;
use steerlm_convert::dtype::DType;
use steerlm_convert::runtime::load::Model;
use steerlm_convert::synth::{self, SynthSpec};

use crate::bench::read_bandwidth;
use crate::{flag, measure, num, release_binary};

/// The llama.cpp tools of a local build (never fetched or vendored by this task).
struct Peer {
    bench: PathBuf,
    /// GGUF per weight kind: f32, bf16, f16, q8_0.
    gguf: Vec<(&'static str, PathBuf)>,
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<()> {
    let o = cmd.output().with_context(|| what.to_string())?;
    if !o.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// The GGUF files of `hf` (bf16), made with llama.cpp's `convert_hf_to_gguf.py` (found
/// above the llama-bench binary, or `--llama-convert`) and `llama-quantize` (next to it).
fn peer(args: &[String], dir: &Path, hf: &Path) -> Result<Option<Peer>> {
    let Some(bench) = flag(args, "--llama-bench").map(PathBuf::from) else {
        return Ok(None);
    };
    let bench = std::fs::canonicalize(&bench).with_context(|| bench.display().to_string())?;
    let bin = bench.parent().context("llama-bench path")?;
    let quantize = bin.join("llama-quantize");
    let convert = match flag(args, "--llama-convert") {
        Some(c) => PathBuf::from(c),
        None => bin
            .ancestors()
            .map(|a| a.join("convert_hf_to_gguf.py"))
            .find(|p| p.exists())
            .context("convert_hf_to_gguf.py not found above llama-bench; give --llama-convert")?,
    };
    let root = convert.parent().context("convert path")?;
    let python = flag(args, "--python").unwrap_or("python3");
    let mut gguf = Vec::new();
    for kind in ["f32", "bf16", "f16"] {
        let out = dir.join(format!("synth134m-{kind}.gguf"));
        if !out.exists() {
            run_ok(
                Command::new(python)
                    .env("PYTHONPATH", root.join("gguf-py"))
                    .arg(&convert)
                    .arg(hf)
                    .args(["--outtype", kind, "--outfile"])
                    .arg(&out),
                "convert_hf_to_gguf.py",
            )?;
        }
        gguf.push((kind, out));
    }
    let q8 = dir.join("synth134m-q8_0.gguf");
    if !q8.exists() {
        run_ok(
            Command::new(&quantize).arg(&gguf[0].1).arg(&q8).arg("q8_0"),
            "llama-quantize",
        )?;
    }
    gguf.push(("q8_0", q8));
    Ok(Some(Peer { bench, gguf }))
}

/// llama-bench's tokens/s for one test: `-p n` (prompt) or `-n n` (decode).
fn llama_rate(p: &Peer, gguf: &Path, threads: usize, prompt: bool, n: u64) -> Result<f64> {
    let (pp, tg) = if prompt { (n, 0) } else { (0, n) };
    let o = Command::new(&p.bench)
        .arg("-m")
        .arg(gguf)
        .args(["-t", &threads.to_string(), "-r", "1", "-o", "json"])
        .args(["-p", &pp.to_string(), "-n", &tg.to_string()])
        .output()?;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        let last = err.lines().last().unwrap_or("");
        bail!("llama-bench {}: {} ({last})", gguf.display(), o.status);
    }
    let v: Value = serde_json::from_slice(&o.stdout).context("llama-bench JSON")?;
    v[0]["avg_ts"].as_f64().context("llama-bench avg_ts")
}

/// Text whose encoding (with the BOS) is `n` tokens: words of a sentence while they fit,
/// then shorter pieces.
fn prompt_of(model: &Model, n: usize) -> Result<String> {
    let words = [
        "The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog.",
    ];
    let bos = usize::from(model.bos.is_some());
    let len = |t: &str| model.tokenizer.encode(t).len() + bos;
    let mut text = String::new();
    let mut i = 0;
    while len(&text) < n {
        let cur = len(&text);
        let sep = if text.is_empty() { "" } else { " " };
        let next = [words[i % 9], "a", "."]
            .iter()
            .flat_map(|w| [format!("{text}{sep}{w}"), format!("{text}{w}")])
            .find(|t| (cur + 1..=n).contains(&len(t)))
            .with_context(|| format!("no prompt of exactly {n} tokens"))?;
        text = next;
        i += 1;
    }
    Ok(text)
}

/// Our rate: prompt tokens/s of `text`, or decode tokens/s of `n` tokens after "Hi"
/// (with `flag`, an opt-in rounding such as `--int8-activations`); the generated ids; and
/// for a prompt, the logits of its last position.
fn our_rate(
    bin: &Path,
    model: &Path,
    threads: usize,
    prompt: Option<&str>,
    n: u64,
    flag: Option<&str>,
) -> Result<(f64, Vec<u64>, Vec<f32>)> {
    let (text, max) = match prompt {
        Some(t) => (t, 1),
        None => ("Hi", n),
    };
    let logits = std::env::temp_dir().join(format!("steerlm-bench-{}.json", std::process::id()));
    let mut cmd = Command::new(bin);
    cmd.arg("generate")
        .arg(model)
        .args(["--raw", "--ignore-eos", "--json", "-q", "--prompt", text])
        .args(["--max-tokens", &max.to_string()])
        .args(["--threads", &threads.to_string()])
        .arg("--logits-out")
        .arg(&logits);
    cmd.args(flag);
    let (_, _, o) = measure(&mut cmd)?;
    if !o.status.success() {
        bail!("generate failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let v: Value = serde_json::from_slice(&o.stdout)?;
    let key = if prompt.is_some() {
        "prompt_tokens_per_s"
    } else {
        "decode_tokens_per_s"
    };
    let ids = v["generated_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let read = std::fs::read(&logits);
    let _ = std::fs::remove_file(&logits);
    let logits: Vec<f32> = serde_json::from_slice(&read?)?;
    Ok((v["timing"][key].as_f64().context("timing")?, ids, logits))
}

/// How far a rounded run's result lies from the exact run's: its greedy tokens (decode),
/// or its prompt logits and next token (prompt).
fn rounding_note(prompt: bool, (ids, logits): (&[u64], &[f32]), exact: (&[u64], &[f32])) -> String {
    if prompt {
        let d = logits
            .iter()
            .zip(exact.1)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let range = exact.1.iter().fold(0f32, |m, v| m.max(v.abs()));
        let next = if ids.first() == exact.0.first() {
            "same"
        } else {
            "other"
        };
        return format!("  max |dlogit| {d:.1e} of {range:.1}, {next} next token");
    }
    let same = ids.iter().zip(exact.0).filter(|(a, b)| a == b).count();
    format!("  {same}/{} tokens as f32 activations", exact.0.len())
}

/// The folders of the benchmark model, made if absent: (row name, folder, GGUF peer).
fn models(bin: &Path, dir: &Path) -> Result<Vec<(&'static str, PathBuf, &'static str)>> {
    std::fs::create_dir_all(dir)?;
    let nemo = dir.join("synth134m.nemo");
    if !nemo.exists() {
        let spec = SynthSpec {
            layers: 12,
            hidden: 768,
            heads: 12,
            groups: 12,
            ffn: 2048,
            vocab: 32000,
            tp: 1,
            pp: 1,
            dtype: DType::BF16,
            make_vocab_size_divisible_by: 128,
        };
        synth::write(&spec, &nemo, |_| {})?;
    }
    // Each row: its name, the command that writes it (arguments split at spaces), and the
    // GGUF type llama.cpp runs against it.
    let group = "quantize --scheme int8 --granularity group --group-size";
    let rows = [
        ("f32", "nemo-to-safetensors --dtype fp32".to_owned(), "f32"),
        ("bf16", "nemo-to-safetensors".to_owned(), "bf16"),
        ("f16", "nemo-to-safetensors --dtype fp16".to_owned(), "f16"),
        ("int8", "quantize --scheme int8".to_owned(), "q8_0"),
        ("int8 g128", format!("{group} 128"), "q8_0"),
        ("int8 g32", format!("{group} 32"), "q8_0"),
        ("int8 g32h", format!("{group} 32 --keep embed"), "q8_0"),
    ];
    let bf16 = dir.join("synth134m-bf16");
    let mut v = Vec::new();
    for (name, cmd, peer) in rows {
        let cmd: Vec<&str> = cmd.split(' ').collect();
        let out = dir.join(format!("synth134m-{}", name.replace(' ', "-")));
        if !out.exists() {
            let input = if cmd[0] == "quantize" { &bf16 } else { &nemo };
            let st = Command::new(bin)
                .arg(cmd[0])
                .arg(input)
                .arg(&out)
                .args(&cmd[1..])
                .arg("-q")
                .status()?;
            if !st.success() {
                bail!("{cmd:?} failed");
            }
        }
        v.push((name, out, peer));
    }
    Ok(v)
}

pub fn generate(args: &[String]) -> Result<()> {
    let dir = PathBuf::from(flag(args, "--dir").unwrap_or("target/bench"));
    let tokens = num(args, "--tokens", 64)?;
    let runs = num(args, "--runs", 2)?.max(1);
    let bin = release_binary()?;
    let models = models(&bin, &dir)?;
    let peer = peer(args, &dir, &models[1].1)?;
    let m = Model::open(&models[1].1, &OpenOptions::default())?;
    let prompts = [256usize, 1024]
        .into_iter()
        .map(|n| prompt_of(&m, n).map(|t| (n, t)))
        .collect::<Result<Vec<_>>>()?;
    let max_t = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(2);
    // Filters for a quicker run: `--weights bf16,int8` (names as printed), `--threads 1`,
    // `--tests tg` (prefixes of the test names).
    let list =
        |name: &str| flag(args, name).map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>());
    let (only_w, only_t) = (list("--weights"), list("--tests"));
    let threads: Vec<usize> = match flag(args, "--threads") {
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => vec![n],
            _ => bail!("--threads: expected a positive count, got {v:?}"),
        },
        None => (1..=max_t).collect(),
    };
    println!("kernel isa: {}", steerlm_convert::runtime::cpu::isa());
    println!(
        "{:<10} {:>3} {:<8} {:>9} {:>9} {:>9} {:>8} {:>9}",
        "weights", "thr", "test", "ours t/s", "limit", "of limit", "llama", "ours/them"
    );
    let l3 = l3_bytes();
    let mut best_bw = vec![0f64; threads.iter().max().map_or(1, |m| m + 1)];
    let (mut fits_l3, mut failures) = (false, Vec::<String>::new());
    for (name, path, gguf) in &models {
        if only_w
            .as_ref()
            .is_some_and(|w| !w.iter().any(|w| w == name))
        {
            continue;
        }
        let g = peer
            .as_ref()
            .and_then(|p| p.gguf.iter().find(|(k, _)| k == gguf).map(|(_, f)| (p, f)));
        let bpt = Model::open(path, &OpenOptions::default())?
            .weights
            .bytes_per_token() as f64;
        // Weights that fit in the last-level cache are not read from DRAM each token.
        let cached = l3.is_some_and(|c| bpt < c as f64);
        fits_l3 |= cached;
        for &t in &threads {
            // The best the probe has seen in this run at this thread count: on a shared
            // host one probe can come out far low, and a limit that is too low flatters.
            let slot = &mut best_bw[t];
            *slot = slot.max(read_bandwidth(t));
            let bw = *slot;
            // Each test: its name, the prompt (none: decode), the token count, and the
            // opt-in rounding flag (none: exact).
            let mut tests: Vec<(String, Option<&str>, u64, Option<&str>)> =
                vec![(format!("tg{tokens}"), None, tokens, None)];
            for p in &prompts {
                tests.push((format!("pp{}", p.0), Some(p.1.as_str()), p.0 as u64, None));
            }
            if name.starts_with("int8") {
                tests.push((
                    format!("tg{tokens}a8"),
                    None,
                    tokens,
                    Some("--int8-activations"),
                ));
            }
            if *name == "bf16" || name.starts_with("int8") {
                let b = Some("--bf16-activations");
                for p in &prompts {
                    tests.push((format!("pp{}b16", p.0), Some(p.1.as_str()), p.0 as u64, b));
                }
            }
            if let Some(only) = &only_t {
                tests.retain(|(test, ..)| only.iter().any(|o| test.starts_with(o.as_str())));
            }
            // The exact runs' ids and logits, by token count, for the rounded runs.
            let mut exact = std::collections::HashMap::<u64, (Vec<u64>, Vec<f32>)>::new();
            for (test, text, n, flag) in &tests {
                let (mut ours, mut theirs) = (0f64, 0f64);
                let (mut ids, mut logits) = (Vec::new(), Vec::new());
                for _ in 0..runs {
                    let (r, i, l) = our_rate(&bin, path, t, *text, *n, *flag)?;
                    (ours, ids, logits) = (ours.max(r), i, l);
                    if let Some((p, f)) = g {
                        match llama_rate(p, f, t, text.is_some(), *n) {
                            Ok(r) => theirs = theirs.max(r),
                            Err(e) => failures.push(format!("{e:#}")),
                        }
                    }
                }
                let limit = bw * 1e9 / bpt;
                let (lim, of) = if text.is_none() {
                    (
                        format!("{limit:.1}{}", if cached { "*" } else { "" }),
                        format!("{:.0}%", 100.0 * ours / limit),
                    )
                } else {
                    ("-".into(), "-".into())
                };
                let (them, ratio) = if g.is_some() && theirs > 0.0 {
                    (format!("{theirs:.1}"), format!("{:.2}", ours / theirs))
                } else if g.is_some() {
                    ("failed".into(), "-".into())
                } else {
                    ("n/a".into(), "n/a".into())
                };
                let note = match (flag, exact.get(n)) {
                    (Some(_), Some((ei, el))) => {
                        rounding_note(text.is_some(), (&ids, &logits), (ei, el))
                    }
                    (Some(_), None) => "  (no exact run to compare with)".into(),
                    (None, _) => {
                        exact.insert(*n, (ids, logits));
                        String::new()
                    }
                };
                println!(
                    "{:<10} {:>3} {:<8} {:>9.1} {:>9} {:>9} {:>8} {:>9}{note}",
                    name, t, test, ours, lim, of, them, ratio
                );
            }
        }
    }
    println!(
        "best of {runs} alternated runs each. limit = memory read bandwidth at that thread count\n\
         (the best probe so far in this run) / weight bytes read per decoded token. llama:\n\
         llama-bench on the GGUF of the same bf16 folder (f32/bf16/f16 by convert_hf_to_gguf.py;\n\
         every int8 row against its q8_0 by llama-quantize), same threads and token counts;\n\
         tg = decode, pp = prompt; a8 = generate --int8-activations, b16 = --bf16-activations\n\
         (opt-in roundings): greedy tokens (tg) or prompt logits (pp) against the exact run's. int8 g32h: group 32 with lm_head int8 too (quantize\n\
         --keep embed), the tensors q8_0 quantizes; the other int8 rows keep lm_head bf16."
    );
    if fits_l3 {
        println!(
            "* the weights ({} MiB L3 here) fit in the last-level cache, so they need not come\n\
             from DRAM each token: that limit does not bind there.",
            l3.unwrap_or(0) >> 20
        );
    }
    failures.sort();
    failures.dedup();
    for f in &failures {
        println!("llama.cpp failed: {f}");
    }
    Ok(())
}

/// The size of CPU 0's level-3 cache, where Linux says it.
fn l3_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size").ok()?;
    let s = s.trim();
    let (n, mult) = match s.strip_suffix('K') {
        Some(n) => (n, 1 << 10),
        None => match s.strip_suffix('M') {
            Some(n) => (n, 1 << 20),
            None => (s, 1),
        },
    };
    n.parse::<u64>().ok().map(|v| v * mult)
}
