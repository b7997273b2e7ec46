//! Command-line definitions: one struct per subcommand.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Convert NeMo `.nemo` checkpoints of Megatron-GPT / Llama-2 models (such as SteerLM
/// Llama-2 13B) into what people deploy, in bounded memory, without Python or a GPU.
#[derive(Debug, Parser)]
#[command(name = "steerlm-convert", version, about, long_about = None, term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what a .nemo archive holds: layout, architecture, vocabulary, dtypes, tokenizer.
    ///
    /// Reads only headers, the config, the tokenizer and the pickles: never tensor data,
    /// so it takes well under a second even for a 50 GB archive. Exit code 2 on a
    /// malformed archive, with one line naming the file, member and offset.
    Inspect(InspectArgs),
    /// Merge all TP/PP shards into a Hugging Face LlamaForCausalLM folder (safetensors).
    ///
    /// Writes model.safetensors (or shards plus model.safetensors.index.json), config.json,
    /// generation_config.json, tokenizer.model, tokenizer_config.json and
    /// special_tokens_map.json. Tensors are bit-exact copies of the source weights (or
    /// exact casts with --dtype), produced one at a time from the mapped archive, so memory
    /// stays bounded by one batch of rows whatever the model size. The output is written
    /// into a temporary sibling and renamed at the end: on error or Ctrl-C nothing is left.
    NemoToSafetensors(NemoToSafetensorsArgs),
    /// Re-shard for another tensor/pipeline-parallel layout (e.g. the 13B's TP 4 to TP 1, 2
    /// or 8), as per-rank safetensors folders or a .nemo archive that NeMo loads.
    ///
    /// Every output rank is written from the slices it needs, straight from the mapped
    /// input: memory stays bounded whatever the model size. Split rules are the exact
    /// inverses of the merge rules (whole query groups per rank, fused gate/up re-interleaved
    /// per rank, vocabulary re-padded with zeros to make_vocab_size_divisible_by x TP).
    Reshard(ReshardArgs),
    /// Run the model with greedy decoding and stream the completion to stdout.
    ///
    /// MODEL is a .nemo archive (computed on its tensor-parallel shards as stored, no
    /// merged copy), a per-rank folder written by `reshard`, or a Hugging Face folder
    /// (float, or int8 from `quantize`). By default the prompt is wrapped in the SteerLM
    /// template of the model card (system turn, user turn, attribute line after
    /// <extra_id_2>) and generation stops at the card's end strings (<extra_id_1>,
    /// quality:, ...); --raw sends the text untouched and applies no end strings. BOS is
    /// prepended unless --no-bos. Runs on the CPU with all cores (--threads to change).
    Generate(GenerateArgs),
    /// Quantize to int8 weight-only, or cast to fp16 / bf16, in one streaming pass.
    ///
    /// IN is a .nemo (quantized while merging, no intermediate copy), a per-rank folder, or
    /// a Hugging Face folder; OUT is a Hugging Face folder. int8 is symmetric and
    /// weight-only: scale = absmax/127 per output channel (or per group of --group-size
    /// input columns), stored in the model's float dtype, values rounded half to even with
    /// that stored scale. It applies to the linear layers (q/k/v/o, gate/up/down; lm_head
    /// unless kept); embeddings and norms stay in float. The output is the
    /// compressed-tensors `pack-quantized` W8A16 layout that vLLM and transformers (with
    /// the compressed-tensors package) load. A per-tensor error table (max abs error,
    /// relative RMS error, SNR) goes to stderr, and to a JSON file with --report.
    Quantize(QuantizeArgs),
    /// Prove a conversion right: is CANDIDATE the same model as REFERENCE?
    ///
    /// Either side is anything this tool reads (.nemo, per-rank folder, Hugging Face
    /// folder: float or int8). Checks, in order: integrity (the CRC-32 of every torch
    /// record on both sides), config (dims, heads, groups, vocab, rope, eps, tied),
    /// tokenizer (pieces, scores, special ids; every prompt encodes the same), layout
    /// (each side's tensors are those its config calls for), tensors (every canonical
    /// tensor hashed while streamed and checked by the rule that produced it: the same
    /// bits, an exact widening, nearest-even narrowing, or the int8 rule with the
    /// candidate's own scales, exactly), then generation: the reference generates greedily
    /// on each prompt, then the candidate is run teacher-forced on those tokens and its
    /// logits compared at every position (max |Δ|, cosine, KL, top-1). Only one model is
    /// run at a time. Without --against: a self-check (integrity, layout, special ids have
    /// embedding rows, every weight finite, generation without NaN). Prints a table; exit 0
    /// when everything passes, 1 when a check fails (named on the FAIL line), 2 on bad
    /// input.
    Verify(VerifyArgs),
    /// Serve the model over HTTP: NeMo's `PUT /generate` (the model card's client works
    /// unchanged) and an OpenAI-compatible API.
    ///
    /// Endpoints: PUT /generate (NeMo's fields and defaults: sentences, tokens_to_generate,
    /// temperature, add_BOS, top_k, top_p, greedy, all_probs, repetition_penalty,
    /// min_tokens_to_generate, end_strings, compute_logprob, random_seed), POST
    /// /v1/completions, POST /v1/chat/completions (stream: true for server-sent events;
    /// messages rendered with the SteerLM template, attributes in `steerlm_attributes`),
    /// GET /v1/models, GET /health. The model is loaded once and runs one generation at a
    /// time from a bounded queue (503 when full). A bad request gets 400 with a JSON error.
    /// Ctrl-C or SIGTERM stops accepting, answers every request already accepted, then
    /// exits. One log line per request on stderr.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A .nemo archive, a per-rank folder or a Hugging Face folder.
    pub model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (1427 is the one the model card's client uses; 0 picks a free one, printed).
    #[arg(long, default_value_t = 1427)]
    pub port: u16,
    /// Where the model runs: cpu, cuda (the GPU, or an error saying why not), or auto
    /// (the GPU when one can be used). The default stays cpu until the CUDA runtime has
    /// passed `xtask gpu-check` on a GPU.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Worker threads of the model (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Requests that may wait while one runs; more are answered 503.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest request body, e.g. 1MB; a bigger one is answered 400.
    #[arg(long, default_value = "1MB", value_parser = parse_size)]
    pub max_body: u64,
    #[command(flatten)]
    pub io: ReadArgs,
    #[command(flatten)]
    pub crc: CrcArg,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The model to check: a .nemo archive, a per-rank folder or a Hugging Face folder.
    pub candidate: PathBuf,
    /// The model it was converted from (usually the source .nemo). Without it, a
    /// self-check of CANDIDATE.
    #[arg(long, value_name = "REFERENCE")]
    pub against: Option<PathBuf>,
    /// Prompts to generate on, one JSON object per line: {"prompt": …, "attrs": {…},
    /// "system": …, "raw": false}. Default: the built-in set of 8 (the model card's
    /// question, attribute settings, a multi-turn chat, non-ASCII text, a long prompt, a
    /// raw text).
    #[arg(long, value_name = "FILE.jsonl")]
    pub prompts: Option<PathBuf>,
    /// Tokens generated per prompt; 0 skips the generation check. A prompt longer than the
    /// context allows is cut from the front (after BOS), and marked so.
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    /// Where the model runs: cpu, cuda (the GPU, or an error saying why not), or auto
    /// (the GPU when one can be used). The default stays cpu until the CUDA runtime has
    /// passed `xtask gpu-check` on a GPU.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Write the full report (every tensor's hashes and verdict, every prompt's metrics,
    /// timing; schema in the README) to FILE, replaced if it exists. Written whether the
    /// checks pass or fail; never on bad input.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Largest |Δ logit| allowed at any position (default: lossless 1e-4 of the largest
    /// |reference logit|; not checked for casts and int8).
    #[arg(long, value_name = "X")]
    pub max_logit_diff: Option<f64>,
    /// Largest KL divergence (nats) allowed at any position (default: lossless not
    /// checked, cast 5e-3, int8 5e-2).
    #[arg(long, value_name = "X")]
    pub max_kl: Option<f64>,
    /// Smallest fraction of positions whose argmax must agree (default: lossless 1, and
    /// the tokens must be identical; cast 0.9; int8 0.8).
    #[arg(long, value_name = "Y")]
    pub min_top1: Option<f64>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub io: ReadArgs,
}

/// Quantization scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchemeArg {
    /// int8 weight-only (W8A16), compressed-tensors pack-quantized.
    Int8,
    /// Cast every float tensor to float16 (overflow refused unless --allow-overflow).
    Fp16,
    /// Cast every float tensor to bfloat16.
    Bf16,
}

/// Scale granularity of int8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GranularityArg {
    /// One scale per output channel (row).
    Channel,
    /// One scale per group of --group-size input columns of each row.
    Group,
}

/// Where to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// The GPU when a CUDA driver and device are present, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// A .nemo archive, a per-rank folder, or a Hugging Face folder.
    pub input: PathBuf,
    /// The Hugging Face folder to write (must not exist, unless --force).
    pub output: PathBuf,
    /// What to write: int8 weight-only linear layers, or every float tensor cast to
    /// fp16 or bf16.
    #[arg(long, value_enum)]
    pub scheme: SchemeArg,
    /// int8 only (default channel).
    #[arg(long, value_enum)]
    pub granularity: Option<GranularityArg>,
    /// Input columns per scale with --granularity group (default 128); must divide every
    /// quantized layer's input dimension.
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Modules kept in float, comma-separated: embed, lm_head, q_proj, k_proj, v_proj,
    /// o_proj, gate_proj, up_proj, down_proj. Embeddings are always kept.
    #[arg(long, value_delimiter = ',', default_value = "embed,lm_head")]
    pub keep: Vec<String>,
    /// Where to compute.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Write the per-tensor error report as JSON to this file (replaced if it exists;
    /// its folder is checked before any work starts).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Print the same JSON report on stdout.
    #[arg(long)]
    pub json: bool,
    /// Largest safetensors file, e.g. 5GB.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
    /// Replace OUT if it exists (only once the new output is complete).
    #[arg(long)]
    pub force: bool,
    /// Write values that overflow fp16 as ±inf instead of refusing (they are counted
    /// and reported as infinite error).
    #[arg(long)]
    pub allow_overflow: bool,
    /// Rows of the error table on stderr (the worst tensors by relative RMS error).
    #[arg(long, default_value_t = 10)]
    pub worst: usize,
    #[command(flatten)]
    pub io: IoArgs,
}

#[derive(Debug, Args)]
#[group(id = "prompt_source", required = true, multiple = false)]
pub struct GenerateArgs {
    /// A .nemo archive, a per-rank folder or a Hugging Face folder.
    pub model: PathBuf,
    /// The user's message (or the whole text with --raw).
    #[arg(long, group = "prompt_source")]
    pub prompt: Option<String>,
    /// Read the prompt from a file (`-` for stdin). One trailing newline is dropped and
    /// CRLF line ends become LF, as an editor's file would be meant.
    #[arg(long, value_name = "FILE", group = "prompt_source")]
    pub prompt_file: Option<PathBuf>,
    /// A SteerLM attribute, name=value or name:value (repeatable, order kept). Overrides
    /// the model card's defaults quality:9,toxicity:0,humor:0,creativity:0,violence:0,
    /// helpfulness:9,not_appropriate:0 in place; new names are appended.
    #[arg(long = "attr", value_name = "NAME=VALUE")]
    pub attrs: Vec<String>,
    /// The system turn (default: the model card's). It is followed by a blank line, as
    /// the card's default is.
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Most tokens to generate. Generation also stops when prompt and completion fill
    /// the model's context: their total never exceeds it.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Send the prompt as given: no template and no end strings.
    #[arg(long)]
    pub raw: bool,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Do not prepend the BOS token.
    #[arg(long)]
    pub no_bos: bool,
    /// Print one JSON document instead of streaming the text: prompt ids, generated
    /// ids, text, stop (max_tokens, eos, end_string with the string in stop_detail, or
    /// context) and timing; schema in the README.
    #[arg(long)]
    pub json: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Decode int8 weights against activations rounded to int8 per block of 32 (as
    /// llama.cpp's q8_0 does): faster on the CPU, but the logits move by that rounding
    /// (`cargo xtask bench generate` reports how far). Off by default; the prompt, float
    /// weights and `verify` always use f32 activations.
    #[arg(long)]
    pub int8_activations: bool,
    /// Multiply the prompt by bf16 and int8 weights with its activations rounded to bf16
    /// (as llama.cpp's bf16 path does): about 1.5x faster on a Zen 4 (AVX-512 BF16), but
    /// slower than the exact path on an Intel Xeon with AVX-512 FP16 (0.7-0.8x), and the
    /// logits move by that rounding (`cargo xtask bench generate` reports both). Off by default; decode, f32/f16 weights and `verify` always use f32
    /// activations.
    #[arg(long)]
    pub bf16_activations: bool,
    /// Where the model runs: cpu, cuda (the GPU, or an error saying why not), or auto
    /// (the GPU when one can be used). The default stays cpu until the CUDA runtime has
    /// passed `xtask gpu-check` on a GPU.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Write the logits of the prompt's last position (JSON array) to FILE (replaced if
    /// it exists): for checks against other implementations.
    #[arg(long, value_name = "FILE")]
    pub logits_out: Option<PathBuf>,
    /// Sample instead of greedy decoding, with the logits divided by T (0: greedy).
    #[arg(long, value_name = "T", default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample only among the K most likely tokens (0: all; 1: greedy).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub top_k: usize,
    /// Sample only among the most likely tokens whose probabilities add up to P (1: all).
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    pub top_p: f64,
    /// Divide positive logits (multiply negative ones) of tokens already in the sequence
    /// by R, as transformers and NeMo do (1: none).
    #[arg(long, value_name = "R", default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Seed of the sampler: the same seed, settings and model give the same tokens
    /// (default: drawn from the clock, and printed).
    #[arg(long)]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub io: ReadArgs,
    #[command(flatten)]
    pub crc: CrcArg,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A .nemo archive (plain or gzip-compressed tar), an unpacked .nemo folder, a NeMo
    /// 2.0 checkpoint (folder or tar), or a per-rank folder written by `reshard`.
    pub input: PathBuf,
    /// Also list every tensor with its rank, shape, dtype and role.
    #[arg(long)]
    pub tensors: bool,
    /// Print one JSON document on stdout instead of text (schema in the README).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub io: ReadArgs,
}

/// Output dtype of a conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeArg {
    /// Keep the dtype the archive stores.
    Keep,
    Bf16,
    Fp16,
    Fp32,
}

#[derive(Debug, Args)]
pub struct NemoToSafetensorsArgs {
    /// A .nemo archive (any layout `inspect` reads), an unpacked .nemo folder, a NeMo 2.0
    /// checkpoint (folder or tar), or a per-rank folder written by `reshard`.
    pub input: PathBuf,
    /// The Hugging Face folder to write (must not exist, unless --force).
    pub output: PathBuf,
    /// dtype of the written weights. Casting to fp16 refuses values that overflow
    /// unless --allow-overflow.
    #[arg(long, value_enum, default_value = "keep")]
    pub dtype: DTypeArg,
    /// Largest safetensors file, e.g. 5GB, 500MB, 2GiB; bigger models are sharded with
    /// model.safetensors.index.json, as transformers does.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
    /// Replace OUT if it exists (it is replaced only once the new output is complete).
    #[arg(long)]
    pub force: bool,
    /// Write values that overflow fp16 as ±inf instead of refusing.
    #[arg(long)]
    pub allow_overflow: bool,
    /// Print a JSON report (tensors, dropped keys, casts, timing) on stdout (schema in
    /// the README).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub io: IoArgs,
}

/// Parses `5GB`, `500MB`, `2GiB`, `1024`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 5GB"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}`")),
    };
    let v = n * mult;
    if v < 1.0 {
        return Err(format!("`{s}` is too small"));
    }
    Ok(v as u64)
}

/// Container of `reshard` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// A folder with one model.safetensors per rank folder (NeMo key names), the updated
    /// model_config.yaml and the tokenizer artifact; reshard and nemo-to-safetensors read it.
    Safetensors,
    /// A .nemo archive as NeMo writes it (torch checkpoints per rank).
    Nemo,
}

#[derive(Debug, Args)]
pub struct ReshardArgs {
    /// A .nemo archive, or a folder written by `reshard --format safetensors`.
    pub input: PathBuf,
    /// Output folder (--format safetensors) or .nemo file (--format nemo).
    pub output: PathBuf,
    /// Tensor-parallel degree to write; must divide the query groups, heads and ffn size.
    #[arg(long)]
    pub tp: u64,
    /// Pipeline-parallel degree to write; must divide the layer count.
    #[arg(long, default_value_t = 1)]
    pub pp: u64,
    /// Output container (default: nemo when OUT ends in .nemo, else safetensors).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// dtype of the written weights. A narrowing cast refuses values that overflow
    /// unless --allow-overflow.
    #[arg(long, value_enum, default_value = "keep")]
    pub dtype: DTypeArg,
    /// Replace OUT if it exists (only once the new output is complete). OUT = IN is
    /// allowed for a .nemo file only: the new archive replaces it in one rename.
    #[arg(long)]
    pub force: bool,
    /// Write values that overflow the --dtype as ±inf instead of refusing.
    #[arg(long)]
    pub allow_overflow: bool,
    /// Print a JSON report (ranks, tensors, timing) on stdout (schema in the README).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub io: IoArgs,
}

/// Options of the commands that write a model.
#[derive(Debug, Args)]
pub struct IoArgs {
    /// Where a gzip-compressed input archive is decompressed once, and deleted after
    /// (default: the output's folder).
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// Hide progress bars and notes on stderr (errors and the summary line stay).
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub crc: CrcArg,
}

/// The integrity check of the commands that read tensors.
#[derive(Debug, Args)]
pub struct CrcArg {
    /// Do not check the CRC-32 that torch checkpoints store for every record (it catches
    /// a corrupt or truncated file; it costs a hash of each record as it is read).
    #[arg(long)]
    pub no_crc: bool,
}

/// Options of the commands that only read a model.
#[derive(Debug, Args)]
pub struct ReadArgs {
    /// Where a gzip-compressed input archive is decompressed once, and deleted after
    /// (default: the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// Hide progress bars and notes on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

impl DTypeArg {
    /// The dtype to write, `None` to keep the stored one.
    pub fn dtype(self) -> Option<steerlm_convert::dtype::DType> {
        use steerlm_convert::dtype::DType;
        match self {
            DTypeArg::Keep => None,
            DTypeArg::Bf16 => Some(DType::BF16),
            DTypeArg::Fp16 => Some(DType::F16),
            DTypeArg::Fp32 => Some(DType::F32),
        }
    }
}
