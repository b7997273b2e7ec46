//! `steerlm-convert generate`: greedy decoding (CPU or GPU), streamed to stdout.

use std::io::{Read, Write};
use std::process::ExitCode;

use serde_json::json;
use steerlm_convert::runtime::backend::DeviceChoice;
use steerlm_convert::runtime::generate::{generate, GenOptions};
use steerlm_convert::runtime::llama::Acts;
use steerlm_convert::runtime::load::{Model, SourceKind};
use steerlm_convert::runtime::sample::Sampling;
use steerlm_convert::runtime::{cpu, steerlm};
use steerlm_convert::{io::output, Error};

use crate::cli::GenerateArgs;

pub fn run(args: &GenerateArgs) -> anyhow::Result<ExitCode> {
    let text = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) if f.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| Error::io("<stdin>", e))?;
            steerlm::prompt_file_text(&s)
        }
        (None, Some(f)) => {
            steerlm::prompt_file_text(&std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?)
        }
        (None, None) => unreachable!("clap requires one"),
    };
    if args.raw && (!args.attrs.is_empty() || args.system.is_some()) {
        return Err(Error::Usage(
            "--attr and --system apply to the template; --raw sends the prompt untouched".into(),
        )
        .into());
    }
    Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: 0,
        penalize_prompt: true,
    }
    .check()
    .map_err(|e| Error::Usage(format!("--{}", e.replace('_', "-"))))?;
    let threads = args.threads.unwrap_or(0);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Usage(format!("cannot start {threads} threads: {e}")))?;
    pool.install(|| generate_in_pool(args, &text))
}

/// Where `--device` runs the model: the rounded-activation kernels are the CPU's.
fn device_for(args: &GenerateArgs) -> steerlm_convert::Result<DeviceChoice> {
    let flag = if args.int8_activations {
        "--int8-activations"
    } else if args.bf16_activations {
        "--bf16-activations"
    } else {
        return super::runtime_device(args.device, args.io.quiet);
    };
    if args.device == crate::cli::DeviceArg::Cuda {
        return Err(Error::Usage(format!(
            "{flag} runs on the CPU only; drop it or use --device cpu"
        )));
    }
    Ok(DeviceChoice::Cpu)
}

fn generate_in_pool(args: &GenerateArgs, text: &str) -> anyhow::Result<ExitCode> {
    // Output paths are checked before the model is loaded.
    let logits_file = match &args.logits_out {
        Some(p) => {
            output::check_not_input(p, &[&args.model])?;
            Some(output::AtomicFile::create(p, true)?)
        }
        None => None,
    };
    let device = device_for(args)?;
    let mut model = Model::open(&args.model, &super::read_options(&args.io, &args.crc))?;
    model.weights.acts = Acts {
        int8: args.int8_activations,
        bf16: args.bf16_activations,
    };
    model.select_device(device, !args.io.quiet)?;
    let (prompt, ends) = if args.raw {
        (text.to_string(), Vec::new())
    } else {
        let attrs = steerlm::Attributes::with_overrides(&args.attrs).map_err(Error::Usage)?;
        let system = args.system.as_deref().unwrap_or(steerlm::DEFAULT_SYSTEM);
        (
            steerlm::prompt(system, text, &attrs),
            steerlm::END_STRINGS.iter().map(|s| s.to_string()).collect(),
        )
    };
    let mut ids = Vec::new();
    if !args.no_bos {
        match model.bos {
            Some(b) => ids.push(b),
            None if model.bos_optional => {}
            None => {
                return Err(
                    Error::Usage("the tokenizer has no BOS token; pass --no-bos".into()).into(),
                )
            }
        }
    }
    ids.extend(model.tokenizer.encode(&prompt));
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed,
        penalize_prompt: true,
    };
    let opts = GenOptions {
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        end_strings: ends,
        keep_logits: false,
        sampling,
        min_tokens: 0,
        cancel: None,
    };
    let stream = !args.json;
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let g = generate(&model, &ids, &opts, &mut |s| {
        if stream && write_err.is_none() {
            if let Err(e) = out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
                write_err = Some(e);
            }
        }
    })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    if let Some(f) = logits_file {
        f.write_all(serde_json::to_string(&g.prompt_logits)?.as_bytes())?;
    }
    let prompt_tps = g.prompt_ids.len() as f64 / g.prompt_secs.max(1e-9);
    let decode_tps = g.decode_steps as f64 / g.decode_secs.max(1e-9);
    let source = match model.source {
        SourceKind::Nemo { tp, pp } => format!("nemo tp{tp} pp{pp}"),
        SourceKind::HuggingFace => "hf".to_string(),
    };
    if args.json {
        let doc = json!({
            "schema_version": 1,
            "command": "generate",
            "model": args.model.display().to_string(),
            "source": source,
            "weights": model.weights.layers.first().map(|l| l.qkv.wtype.name()),
            "parameters": model.weights.parameter_count(),
            "weight_bytes_per_token": model.weights.bytes_per_token(),
            "prompt": prompt,
            "prompt_ids": g.prompt_ids,
            "generated_ids": g.ids,
            "text": g.text,
            "stop": g.stop.kind(),
            "stop_detail": g.stop.detail(),
            "sampling": {
                "greedy": sampling.is_greedy(),
                "temperature": sampling.temperature,
                "top_k": sampling.top_k,
                "top_p": sampling.top_p,
                "repetition_penalty": sampling.repetition_penalty,
                "seed": sampling.seed,
            },
            "timing": {
                "prompt_tokens": g.prompt_ids.len(),
                "prompt_seconds": g.prompt_secs,
                "map_seconds": g.map_secs,
                "prompt_tokens_per_s": prompt_tps,
                "decode_steps": g.decode_steps,
                "decode_seconds": g.decode_secs,
                "decode_tokens_per_s": decode_tps,
                "threads": rayon::current_num_threads(),
                "isa": cpu::isa(),
                "int8_activations": args.int8_activations,
                "bf16_activations": args.bf16_activations,
                "bf16_activations_kernel": args.bf16_activations.then(cpu::bf16a_isa),
                "device": model.device_name(),
            },
        });
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
    } else {
        writeln!(out)?;
        if !args.io.quiet {
            eprintln!(
                "[{} tokens, stop: {}{}{}; prompt {} tokens at {:.1} tok/s; decode {:.1} tok/s; {}]",
                g.ids.len(),
                g.stop.kind(),
                g.stop.detail().map(|d| format!(" {d}")).unwrap_or_default(),
                if sampling.is_greedy() {
                    String::new()
                } else {
                    format!("; sampled, seed {seed}")
                },
                g.prompt_ids.len(),
                prompt_tps,
                decode_tps,
                match model.device_name().as_str() {
                    "cpu" => format!("{} threads, {}", rayon::current_num_threads(), cpu::isa()),
                    d => d.to_string(),
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
