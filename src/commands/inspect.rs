//! `steerlm-convert inspect`: what an archive holds.

use std::io::Write;
use std::process::ExitCode;

use serde_json::{json, Value};
use steerlm_convert::arch::roles::Role;
use steerlm_convert::dtype::fmt_shape;
use steerlm_convert::nemo::checkpoint::{Checkpoint, Storage};
use steerlm_convert::torch::state_dict::StateEntry;

use crate::cli::InspectArgs;

pub fn run(args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let ck = super::open_checkpoint(&args.input, &args.io.scratch_dir, args.io.quiet)?;
    let report = report(&ck, args.tensors);
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write_text(&mut out, &report)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn report(ck: &Checkpoint, with_tensors: bool) -> Value {
    let c = &ck.config;
    let tok = ck.tokenizer.as_ref().ok();
    let vocab = tok.map(|t| t.model.vocab_size() as u64);
    let stored_rows = ck.stored_vocab_rows();
    let mut warnings = ck.warnings.clone();
    if let (Some(v), Some(rows)) = (vocab, stored_rows) {
        if let Some(w) = steerlm_convert::nemo::logical::vocab_misfit(c, v, rows) {
            warnings.push(w);
        }
    }
    let tokenizer = tok.map(tokenizer_report);
    let mut tensors = Vec::new();
    let mut non_tensors = Vec::new();
    let mut non_weights = 0usize;
    match &ck.weights {
        Storage::Ranks(ranks) => {
            for r in ranks {
                let rank = r
                    .state
                    .member
                    .trim_end_matches("/model_weights.ckpt")
                    .to_string();
                for (name, e) in &r.state.entries {
                    let cls = ck.classify(name);
                    let role = cls.map(|c| c.role.as_str()).unwrap_or("unknown");
                    let weight = cls.is_none_or(|c| c.role != Role::Skip);
                    if !weight {
                        non_weights += 1;
                    }
                    match e {
                        StateEntry::Tensor(t) if !weight => {
                            if with_tensors {
                                non_tensors.push(json!({
                                    "rank": rank, "name": name, "role": role,
                                    "value": format!("tensor {} {} (not a weight; not counted)", fmt_shape(&t.shape), t.dtype.short_name()),
                                }));
                            }
                        }
                        StateEntry::Tensor(t) => {
                            if with_tensors {
                                tensors.push(json!({
                                    "rank": rank, "tp": r.tp, "pp": r.pp, "name": name,
                                    "shape": t.shape, "dtype": t.dtype.short_name(), "role": role,
                                    "offset": t.offset, "contiguous": t.is_contiguous(),
                                }));
                            }
                        }
                        StateEntry::Other(what) => {
                            if with_tensors || cls.is_none_or(|c| c.role != Role::Skip) {
                                non_tensors.push(json!({"rank": rank, "name": name, "value": what, "role": role}));
                            }
                        }
                    }
                }
            }
        }
        Storage::Distributed(d) => {
            for a in &d.arrays {
                if with_tensors {
                    let role = ck
                        .classify(&a.key)
                        .map(|c| c.role.as_str())
                        .unwrap_or("unknown");
                    tensors.push(json!({
                        "rank": d.dir, "name": a.key, "shape": a.shape, "chunks": a.chunks.len(),
                        "chunk_shape": a.uniform_chunk(), "dtype": a.dtype.short_name(), "role": role,
                    }));
                }
            }
            for (k, n) in &d.objects {
                non_weights += 1;
                if with_tensors {
                    non_tensors.push(json!({"rank": d.dir, "name": k, "value": format!("{n} pickled object file(s)"), "role": "skip"}));
                }
            }
        }
    }
    let mut v = json!({
        "schema_version": 1,
        "command": "inspect",
        "file": ck.files.display(),
        "compressed": ck.files.was_compressed(),
        "layout": ck.grid.kind.as_str(),
        "nemo_format": if ck.nemo2 { "2.0" } else { "1.x" },
        "schema": ck.schema.as_str(),
        "tp": ck.grid.tp,
        "pp": ck.grid.pp,
        "dist": dist_summary(ck),
        "architecture": {
            "num_layers": c.num_layers,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "num_query_groups": c.num_query_groups,
            "head_dim": c.head_dim,
            "ffn_hidden_size": c.ffn_hidden_size,
            "activation": c.activation.as_str(),
            "normalization": c.normalization,
            "layernorm_epsilon": c.layernorm_epsilon,
            "rope_base": c.rotary_base,
            "rope_linear_scaling": c.seq_len_interpolation_factor,
            "rope_llama3": c.rope_llama3.map(|s| json!({
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_positions": s.original_max_positions,
            })),
            "max_position_embeddings": c.max_position_embeddings,
            "tied_embeddings": c.share_embeddings_and_output_weights,
            "bias": c.bias,
        },
        "vocab": {
            "real": vocab,
            "padded": vocab.map(|v| c.padded_vocab(v, ck.grid.tp)),
            "stored_rows": stored_rows,
            "make_vocab_size_divisible_by": c.make_vocab_size_divisible_by,
        },
        "dtypes": ck.stored_dtypes().iter().map(|d| d.short_name()).collect::<Vec<_>>(),
        "tensor_count": ck.weight_count(),
        "non_weight_count": non_weights,
        "parameters": vocab.map(|v| c.parameter_count(v)),
        "stored_bytes": ck.stored_bytes(),
        "tokenizer": tokenizer,
        "warnings": warnings,
    });
    if with_tensors {
        v["tensors"] = Value::Array(tensors);
    }
    v["non_tensors"] = Value::Array(non_tensors);
    v
}

/// What `inspect` says of the tokenizer.
fn tokenizer_report(t: &steerlm_convert::nemo::checkpoint::TokenizerArtifact) -> Value {
    let m = &t.model;
    let extra: Vec<Value> = m
        .extra_id_pieces()
        .iter()
        .map(|(p, id)| json!({"piece": p, "id": id}))
        .collect();
    let sp = m.sp();
    let (bos, eos) = m.bos_eos();
    let id = |v: Option<u32>| v.map_or(-1, i64::from);
    json!({
        "member": t.member,
        "pieces": m.vocab_size(),
        "model_type": m.kind_name(),
        "byte_fallback": sp.is_some_and(|s| s.byte_fallback),
        "add_dummy_prefix": sp.is_some_and(|s| s.add_dummy_prefix),
        "unk_id": sp.map_or(-1, |s| s.unk_id), "bos_id": id(bos), "eos_id": id(eos),
        "bos_piece": m.token(id(bos)), "eos_piece": m.token(id(eos)),
        "extra_id_pieces": extra,
    })
}

/// The backend and chunk counts of a distributed checkpoint (null for rank files).
fn dist_summary(ck: &Checkpoint) -> Value {
    match &ck.weights {
        Storage::Distributed(d) => json!({
            "backend": d.backend,
            "dir": d.dir,
            "arrays": d.arrays.len(),
            "chunks": d.arrays.iter().map(|a| a.chunks.len()).sum::<usize>(),
            "objects": d.objects.iter().map(|(_, n)| n).sum::<usize>(),
        }),
        Storage::Ranks(_) => Value::Null,
    }
}

/// `, llama3 scaling …` or `, linear scaling …` (empty without scaling), and whether the
/// embeddings are tied.
fn rope_scaling_text(a: &Value) -> String {
    let tied = if a["tied_embeddings"] == true {
        ", tied embeddings"
    } else {
        ""
    };
    let scaling = match (&a["rope_llama3"], &a["rope_linear_scaling"]) {
        (Value::Object(l), _) => format!(
            ", llama3 scaling factor {} (frequency factors {} and {}, original {} positions)",
            l["factor"], l["low_freq_factor"], l["high_freq_factor"], l["original_max_positions"]
        ),
        (_, Value::Null) => String::new(),
        (_, f) => format!(", linear scaling {f}"),
    };
    scaling + tied
}

fn write_dist(out: &mut impl Write, d: &Value) -> std::io::Result<()> {
    if d.is_null() {
        return Ok(());
    }
    writeln!(
        out,
        "  dist          {} backend in {}/: {} arrays in {} chunks, {} pickled objects",
        d["backend"].as_str().unwrap_or("?"),
        d["dir"].as_str().unwrap_or("?"),
        d["arrays"],
        d["chunks"],
        d["objects"]
    )
}

fn write_text(out: &mut impl Write, r: &Value) -> std::io::Result<()> {
    let a = &r["architecture"];
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "?".into(),
        other => other.to_string(),
    };
    writeln!(
        out,
        "{}{}",
        s(&r["file"]),
        if r["compressed"] == true {
            " (gzip)"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "  layout        {}{}, TP {} x PP {}, {} keys",
        s(&r["layout"]),
        if r["nemo_format"] == "2.0" {
            " (NeMo 2.0: context/ + weights/)"
        } else {
            ""
        },
        r["tp"],
        r["pp"],
        s(&r["schema"])
    )?;
    write_dist(out, &r["dist"])?;
    writeln!(
        out,
        "  architecture  {} layers, hidden {}, {} heads, {} query groups, head dim {}, ffn {}, {}, {} (eps {})",
        a["num_layers"],
        a["hidden_size"],
        a["num_attention_heads"],
        a["num_query_groups"],
        a["head_dim"],
        a["ffn_hidden_size"],
        s(&a["activation"]),
        s(&a["normalization"]),
        a["layernorm_epsilon"]
    )?;
    let scaling = rope_scaling_text(a);
    writeln!(
        out,
        "  positions     rope base {}{}, {} positions",
        a["rope_base"], scaling, a["max_position_embeddings"]
    )?;
    let v = &r["vocab"];
    writeln!(
        out,
        "  vocab         {} real, {} padded for TP {} (unit {}), {} rows stored",
        s(&v["real"]),
        s(&v["padded"]),
        r["tp"],
        v["make_vocab_size_divisible_by"],
        s(&v["stored_rows"])
    )?;
    let dtypes: Vec<String> = r["dtypes"]
        .as_array()
        .map(|d| d.iter().map(s).collect())
        .unwrap_or_default();
    let not_counted = match r["non_weight_count"].as_u64().unwrap_or(0) {
        0 => String::new(),
        n => format!(" (+{n} non-weight entries, not counted: rotary inv_freq, _extra_state)"),
    };
    writeln!(
        out,
        "  storage       {}, {} weight tensors{not_counted}, {} stored, {} parameters",
        dtypes.join("+"),
        r["tensor_count"],
        human_bytes(r["stored_bytes"].as_u64().unwrap_or(0)),
        s(&r["parameters"])
    )?;
    match &r["tokenizer"] {
        Value::Null => writeln!(out, "  tokenizer     (not readable, see warnings)")?,
        t => {
            let extra: Vec<String> = t["extra_id_pieces"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| format!("{}={}", s(&e["piece"]), e["id"]))
                        .collect()
                })
                .unwrap_or_default();
            let extra = if extra.is_empty() {
                "<extra_id_N> are plain text".to_string()
            } else {
                format!("single pieces {}", extra.join(" "))
            };
            writeln!(
                out,
                "  tokenizer     {} {}, {} pieces{}, bos {} {}, eos {} {}; {}",
                s(&t["member"]),
                s(&t["model_type"]),
                t["pieces"],
                if t["byte_fallback"] == true {
                    ", byte fallback"
                } else {
                    ""
                },
                t["bos_id"],
                s(&t["bos_piece"]),
                t["eos_id"],
                s(&t["eos_piece"]),
                extra
            )?;
        }
    }
    if let Some(ts) = r.get("tensors").and_then(|t| t.as_array()) {
        writeln!(out, "  tensors:")?;
        for t in ts {
            writeln!(
                out,
                "    {:<24} {:<64} {:<16} {:<6} {}",
                s(&t["rank"]),
                s(&t["name"]),
                fmt_shape(
                    &t["shape"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|x| x.as_u64()).collect::<Vec<_>>())
                        .unwrap_or_default()
                ),
                s(&t["dtype"]),
                s(&t["role"])
            )?;
        }
    }
    if let Some(nt) = r["non_tensors"].as_array().filter(|a| !a.is_empty()) {
        writeln!(out, "  non-tensor entries:")?;
        for t in nt {
            writeln!(
                out,
                "    {:<24} {:<64} {} ({})",
                s(&t["rank"]),
                s(&t["name"]),
                s(&t["value"]),
                s(&t["role"])
            )?;
        }
    }
    for w in r["warnings"].as_array().into_iter().flatten() {
        writeln!(out, "  warning: {}", s(w))?;
    }
    Ok(())
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
