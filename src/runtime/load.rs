//! Laying a model's weights over its files: a `.nemo` (or per-rank folder) through the
//! merge rules' logical tensors, computing on the shards as stored; or a Hugging Face
//! folder (float, or int8 in the compressed-tensors `pack-quantized` layout).

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::arch::roles::Kind;
use crate::arch::tp::{self, Logical};
use crate::container::mapped::{Archive, OpenOptions};
use crate::nemo::checkpoint::Checkpoint;
use crate::nemo::tokenizer::SpModel;
use crate::quant;
use crate::runtime::cpu::WType;
use crate::runtime::llama::{Band, Dims, Layer, Linear, Part, QkvOrder, Weights};
use crate::runtime::tokenizer::Tokenizer;
use crate::dtype::{DType, TensorRef};

/// Where the weights came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A `.nemo` archive or a per-rank folder, computed on its TP shards.
    Nemo { tp: u64, pp: u64 },
    /// A Hugging Face folder.
    HuggingFace,
}

/// A model ready to run: its mapped files, weights laid over them, tokenizer.
pub struct Model {
    pub archive: Archive,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    pub source: SourceKind,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

fn wtype(d: DType, what: &str, file: &str) -> Result<WType> {
    Ok(match d {
        DType::F32 => WType::F32,
        DType::F16 => WType::F16,
        DType::BF16 => WType::BF16,
        other => {
            return Err(Error::Tensor {
                member: file.to_string(),
                tensor: what.to_string(),
                msg: format!("dtype {} cannot be run", other.short_name()),
            })
        }
    })
}

fn to_f32(bytes: &[u8], d: DType) -> Vec<f32> {
    let mut v = vec![0f32; bytes.len() / d.size()];
    crate::pipeline::quantize::to_f32(bytes, d, &mut v);
    v
}

impl Model {
    /// Opens a `.nemo`, a per-rank folder or a Hugging Face folder.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Model> {
        if path.is_dir() && path.join("config.json").is_file() {
            return open_hf(path);
        }
        let ck = Checkpoint::open(path, opts)?;
        open_nemo(ck)
    }

    /// Logits of the last of `ids`, from a fresh cache.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        let mut cache = self.weights.new_cache();
        Ok(self.weights.forward(&self.archive, &mut cache, ids))
    }

    /// Every id must have an embedding row, and the prompt must fit the context.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::Usage("the prompt has no tokens".into()));
        }
        let d = &self.weights.dims;
        if ids.len() > d.max_positions {
            return Err(Error::Usage(format!(
                "the prompt has {} tokens but the model's context is {} positions",
                ids.len(),
                d.max_positions
            )));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.weights.embed.out) {
            return Err(Error::Usage(format!(
                "token id {bad} is outside the embedding ({} rows)",
                self.weights.embed.out
            )));
        }
        Ok(())
    }
}

/// Lays a logical tensor's rows over the archive: consecutive rows whose byte ranges
/// have the same shape and advance by a constant stride form one band.
fn linear_from_logical(l: &Logical<'_>, name: &str, file: &str) -> Result<Linear> {
    let wt = wtype(l.dtype, name, file)?;
    let esz = wt.size() as u64;
    let (rows, cols) = (l.shape[0] as usize, l.shape[1] as usize);
    let mut bands: Vec<Band> = Vec::new();
    let mut segs = Vec::new();
    for i in 0..rows {
        segs.clear();
        l.row_segments(i as u64, &mut segs);
        let fits = bands.last_mut().is_some_and(|b| {
            if b.parts.len() != segs.len()
                || b.parts
                    .iter()
                    .zip(&segs)
                    .any(|(p, s)| p.cols as u64 * esz != s.1)
            {
                return false;
            }
            if b.rows == 1 {
                if segs.iter().zip(&b.parts).any(|(s, p)| s.0 <= p.offset) {
                    return false;
                }
                for (p, s) in b.parts.iter_mut().zip(&segs) {
                    p.stride = s.0 - p.offset;
                }
                true
            } else {
                b.parts
                    .iter()
                    .zip(&segs)
                    .all(|(p, s)| p.offset + b.rows as u64 * p.stride == s.0)
            }
        });
        if fits {
            bands.last_mut().expect("checked").rows += 1;
            continue;
        }
        let mut col0 = 0usize;
        let mut parts = Vec::with_capacity(segs.len());
        for s in &segs {
            let c = (s.1 / esz) as usize;
            parts.push(Part {
                col0,
                cols: c,
                offset: s.0,
                stride: s.1,
                scales: Vec::new(),
            });
            col0 += c;
        }
        if col0 != cols {
            return Err(Error::Tensor {
                member: file.to_string(),
                tensor: name.to_string(),
                msg: format!("row {i} spans {col0} columns, not {cols}"),
            });
        }
        bands.push(Band {
            row0: i,
            rows: 1,
            parts,
        });
    }
    Ok(Linear {
        name: name.to_string(),
        out: rows,
        inp: cols,
        wtype: wt,
        group: cols,
        bands,
    })
}

/// Stacks linears with the same input size and storage (q, k, v; gate, up) into one.
fn stack(name: &str, parts: Vec<Linear>, file: &str) -> Result<Linear> {
    let mut bands = Vec::new();
    let mut row0 = 0;
    let first = &parts[0];
    let (inp, wtype, group) = (first.inp, first.wtype, first.group);
    if let Some(l) = parts
        .iter()
        .find(|l| l.inp != inp || l.wtype != wtype || l.group != group)
    {
        return Err(Error::Tensor {
            member: file.to_string(),
            tensor: l.name.clone(),
            msg: format!(
                "differs from `{}` in input size or storage; they must match to be stacked",
                first.name
            ),
        });
    }
    for l in parts {
        for mut b in l.bands {
            b.row0 += row0;
            bands.push(b);
        }
        row0 += l.out;
    }
    Ok(Linear {
        name: name.to_string(),
        out: row0,
        inp,
        wtype,
        group,
        bands,
    })
}

fn open_nemo(ck: Checkpoint) -> Result<Model> {
    let file = ck.archive.display().to_string();
    let cfg = &ck.config;
    let cerr = |msg: String| Error::Config {
        file: file.clone(),
        msg,
    };
    if cfg.bias {
        return Err(cerr(
            "linear biases (bias: true) are not supported by the runtime".into(),
        ));
    }
    if cfg.rotary_percentage != 1.0 {
        return Err(cerr(format!(
            "rotary_percentage {} is not supported (Llama rotates whole heads)",
            cfg.rotary_percentage
        )));
    }
    let sp = ck.tokenizer()?.model.clone();
    let vocab = sp.vocab_size() as u64;
    let logicals = tp::logical_tensors(&ck)?;
    tp::check_vocab(&ck, &logicals, vocab)?;
    let get = |k: Kind, layer: Option<u64>| -> Result<&Logical<'_>> {
        logicals.get(&(k, layer)).ok_or_else(|| Error::Tensor {
            member: file.clone(),
            tensor: format!(
                "{k:?}{}",
                layer.map(|l| format!(" of layer {l}")).unwrap_or_default()
            ),
            msg: "missing".into(),
        })
    };
    let vector = |k: Kind, layer: Option<u64>| -> Result<Vec<f32>> {
        let l = get(k, layer)?;
        wtype(l.dtype, &format!("{k:?}"), &file)?;
        let mut segs = Vec::new();
        l.row_segments(0, &mut segs);
        let mut bytes = Vec::new();
        for (o, n) in segs {
            bytes.extend_from_slice(ck.archive.slice(o, n));
        }
        Ok(to_f32(&bytes, l.dtype))
    };
    let lin = |k: Kind, layer: Option<u64>| -> Result<Linear> {
        let name = format!(
            "{k:?}{}",
            layer.map(|l| format!(".{l}")).unwrap_or_default()
        );
        linear_from_logical(get(k, layer)?, &name, &file)
    };
    let mut layers = Vec::new();
    for i in 0..cfg.num_layers {
        let li = Some(i);
        let gate_up = if logicals.contains_key(&(Kind::GateUp, li)) {
            lin(Kind::GateUp, li)?
        } else {
            stack(
                "gate_up",
                vec![lin(Kind::Gate, li)?, lin(Kind::Up, li)?],
                &file,
            )?
        };
        layers.push(Layer {
            attn_norm: vector(Kind::InputNorm, li)?,
            qkv: lin(Kind::Qkv, li)?,
            o: lin(Kind::AttnOut, li)?,
            mlp_norm: vector(Kind::PostAttnNorm, li)?,
            gate_up,
            down: lin(Kind::Down, li)?,
        });
    }
    let embed = lin(Kind::Embedding, None)?;
    let lm_head = if cfg.share_embeddings_and_output_weights {
        embed.clone()
    } else {
        lin(Kind::Output, None)?
    };
    let dims = Dims {
        hidden: cfg.hidden_size as usize,
        heads: cfg.num_attention_heads as usize,
        kv_heads: cfg.num_query_groups as usize,
        head_dim: cfg.head_dim as usize,
        ffn: cfg.ffn_hidden_size as usize,
        layers: cfg.num_layers as usize,
        vocab: vocab as usize,
        eps: cfg.layernorm_epsilon as f32,
        rope_theta: cfg.rotary_base,
        rope_factor: cfg.seq_len_interpolation_factor.unwrap_or(1.0),
        max_positions: cfg.max_position_embeddings as usize,
    };
    let norm = vector(Kind::FinalNorm, None)?;
    let source = SourceKind::Nemo {
        tp: ck.grid.tp,
        pp: ck.grid.pp,
    };
    drop(logicals);
    let weights = Weights {
        dims,
        embed,
        layers,
        norm,
        lm_head,
        qkv_order: QkvOrder::Grouped,
    };
    check_shapes(&weights, &file)?;
    Ok(finish(ck.archive, weights, sp, source))
}

fn finish(archive: Archive, weights: Weights, sp: SpModel, source: SourceKind) -> Model {
    let id = |i: i64| (i >= 0 && (i as usize) < sp.pieces.len()).then_some(i as u32);
    let (bos, eos) = (id(sp.bos_id), id(sp.eos_id));
    Model {
        archive,
        weights,
        tokenizer: Tokenizer::new(sp),
        source,
        bos,
        eos,
    }
}

fn check_shapes(w: &Weights, file: &str) -> Result<()> {
    let d = &w.dims;
    let terr = |name: &str, msg: String| Error::Tensor {
        member: file.to_string(),
        tensor: name.to_string(),
        msg,
    };
    if d.kv_heads == 0 || !d.heads.is_multiple_of(d.kv_heads) || !d.head_dim.is_multiple_of(2) {
        return Err(Error::Config {
            file: file.to_string(),
            msg: format!(
                "{} heads in {} query groups of head size {} cannot be run",
                d.heads, d.kv_heads, d.head_dim
            ),
        });
    }
    let qkv = (d.heads + 2 * d.kv_heads) * d.head_dim;
    let want = |l: &Linear, out: usize, inp: usize| -> Result<()> {
        if l.out != out || l.inp != inp {
            return Err(terr(
                &l.name,
                format!("shape [{}, {}], expected [{out}, {inp}]", l.out, l.inp),
            ));
        }
        Ok(())
    };
    if w.embed.inp != d.hidden || w.embed.out < d.vocab {
        return Err(terr(
            &w.embed.name,
            format!("shape [{}, {}]", w.embed.out, w.embed.inp),
        ));
    }
    if w.lm_head.inp != d.hidden || w.lm_head.out < d.vocab {
        return Err(terr(
            &w.lm_head.name,
            format!("shape [{}, {}]", w.lm_head.out, w.lm_head.inp),
        ));
    }
    for l in &w.layers {
        want(&l.qkv, qkv, d.hidden)?;
        want(&l.o, d.hidden, d.heads * d.head_dim)?;
        want(&l.gate_up, 2 * d.ffn, d.hidden)?;
        want(&l.down, d.hidden, d.ffn)?;
        if l.attn_norm.len() != d.hidden || l.mlp_norm.len() != d.hidden {
            return Err(terr(
                &l.qkv.name,
                "norm weights are not hidden-sized".into(),
            ));
        }
    }
    if w.norm.len() != d.hidden {
        return Err(terr("model.norm.weight", "not hidden-sized".into()));
    }
    Ok(())
}

/// The int8 scheme of an HF folder's `quantization_config`, if any.
struct Int8 {
    group: Option<usize>,
}

fn open_hf(dir: &Path) -> Result<Model> {
    let archive = Archive::open(dir, &OpenOptions::default())?;
    let file = archive.display().to_string();
    let cfg_text = archive
        .member("config.json")
        .map(|m| archive.data(m).to_vec())
        .unwrap_or_default();
    let cfg: Value = serde_json::from_slice(&cfg_text).map_err(|e| Error::Config {
        file: format!("{file}/config.json"),
        msg: format!("not JSON: {e}"),
    })?;
    let cerr = |msg: String| Error::Config {
        file: format!("{file}/config.json"),
        msg,
    };
    let num = |k: &str| -> Result<usize> {
        cfg[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| cerr(format!("`{k}` is missing or not an integer")))
    };
    let arch = cfg["model_type"].as_str().unwrap_or("");
    if arch != "llama" {
        return Err(cerr(format!("model_type `{arch}` is not llama")));
    }
    if cfg["attention_bias"].as_bool() == Some(true) || cfg["mlp_bias"].as_bool() == Some(true) {
        return Err(cerr("biases are not supported by the runtime".into()));
    }
    let heads = num("num_attention_heads")?;
    let hidden = num("hidden_size")?;
    let rope_factor = match &cfg["rope_scaling"] {
        Value::Null => 1.0,
        v => {
            let t = v["rope_type"].as_str().or(v["type"].as_str()).unwrap_or("");
            if t != "linear" {
                return Err(cerr(format!(
                    "rope_scaling type `{t}` is not supported (linear is)"
                )));
            }
            v["factor"]
                .as_f64()
                .ok_or_else(|| cerr("rope_scaling has no factor".into()))?
        }
    };
    let int8 = match &cfg["quantization_config"] {
        Value::Null => None,
        q => Some(Int8 {
            group: quant::compressed::parse_config(q).map_err(cerr)?,
        }),
    };
    let sp_member = archive
        .member("tokenizer.model")
        .ok_or_else(|| Error::Tokenizer {
            file: file.clone(),
            msg: "no tokenizer.model in the folder".into(),
        })?;
    let sp = SpModel::parse(archive.data(sp_member), &format!("{file}/tokenizer.model"))?;
    let dims = Dims {
        hidden,
        heads,
        kv_heads: cfg["num_key_value_heads"]
            .as_u64()
            .map(|v| v as usize)
            .unwrap_or(heads),
        head_dim: cfg["head_dim"]
            .as_u64()
            .map(|v| v as usize)
            .unwrap_or(hidden / heads.max(1)),
        ffn: num("intermediate_size")?,
        layers: num("num_hidden_layers")?,
        vocab: num("vocab_size")?,
        eps: cfg["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
        rope_theta: cfg["rope_theta"].as_f64().unwrap_or(10000.0),
        rope_factor,
        max_positions: num("max_position_embeddings")?,
    };
    if sp.vocab_size() > dims.vocab {
        return Err(Error::Tokenizer {
            file: format!("{file}/tokenizer.model"),
            msg: format!(
                "{} pieces but vocab_size is {}",
                sp.vocab_size(),
                dims.vocab
            ),
        });
    }
    // Every tensor of every safetensors file, by name.
    let mut tensors: HashMap<String, (TensorRef, String)> = HashMap::new();
    let names: Vec<String> = archive
        .file_names()
        .filter(|n| n.ends_with(".safetensors") && !n.contains('/'))
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        return Err(Error::Layout {
            file,
            msg: "no .safetensors files in the folder".into(),
        });
    }
    for n in &names {
        let m = archive.member(n).expect("listed");
        let sd = crate::container::safetensors::read_state_dict(archive.data(m), m.offset, n)
            .map_err(|e| e.in_file(&file))?;
        for (name, t) in sd.tensors() {
            if tensors
                .insert(name.to_string(), (t.clone(), n.clone()))
                .is_some()
            {
                return Err(Error::Tensor {
                    member: format!("{file}/{n}"),
                    tensor: name.to_string(),
                    msg: "appears in two files".into(),
                });
            }
        }
    }
    let missing = |name: &str| Error::Tensor {
        member: file.clone(),
        tensor: name.to_string(),
        msg: "missing from the folder".into(),
    };
    let get = |name: &str| -> Result<&(TensorRef, String)> {
        tensors.get(name).ok_or_else(|| missing(name))
    };
    let plain = |name: &str| -> Result<Linear> {
        let (t, member) = get(name)?;
        let where_ = format!("{file}/{member}");
        let wt = wtype(t.dtype, name, &where_)?;
        if t.shape.len() != 2 || !t.is_contiguous() {
            return Err(Error::Tensor {
                member: where_,
                tensor: name.to_string(),
                msg: "not a contiguous matrix".into(),
            });
        }
        let (out, inp) = (t.shape[0] as usize, t.shape[1] as usize);
        Ok(Linear {
            name: name.to_string(),
            out,
            inp,
            wtype: wt,
            group: inp,
            bands: vec![Band {
                row0: 0,
                rows: out,
                parts: vec![Part {
                    col0: 0,
                    cols: inp,
                    offset: t.offset,
                    stride: (inp * wt.size()) as u64,
                    scales: Vec::new(),
                }],
            }],
        })
    };
    let linear = |base: &str| -> Result<Linear> {
        let w = format!("{base}.weight");
        match &int8 {
            Some(q) if !tensors.contains_key(&w) => {
                let packed = format!("{base}.weight_packed");
                let scale = format!("{base}.weight_scale");
                let shape = format!("{base}.weight_shape");
                let (pt, pm) = get(&packed)?;
                let (st, sm) = get(&scale)?;
                let (sh, hm) = get(&shape)?;
                quant::compressed::linear(
                    &archive,
                    base,
                    (pt, &format!("{file}/{pm}")),
                    (st, &format!("{file}/{sm}")),
                    (sh, &format!("{file}/{hm}")),
                    q.group,
                )
            }
            _ => plain(&w),
        }
    };
    let vector = |name: &str| -> Result<Vec<f32>> {
        let (t, member) = get(name)?;
        wtype(t.dtype, name, &format!("{file}/{member}"))?;
        Ok(to_f32(archive.slice(t.offset, t.nbytes()), t.dtype))
    };
    let mut layers = Vec::new();
    for i in 0..dims.layers {
        let p = format!("model.layers.{i}");
        layers.push(Layer {
            attn_norm: vector(&format!("{p}.input_layernorm.weight"))?,
            qkv: stack(
                &format!("{p}.self_attn.qkv"),
                vec![
                    linear(&format!("{p}.self_attn.q_proj"))?,
                    linear(&format!("{p}.self_attn.k_proj"))?,
                    linear(&format!("{p}.self_attn.v_proj"))?,
                ],
                &file,
            )?,
            o: linear(&format!("{p}.self_attn.o_proj"))?,
            mlp_norm: vector(&format!("{p}.post_attention_layernorm.weight"))?,
            gate_up: stack(
                &format!("{p}.mlp.gate_up"),
                vec![
                    linear(&format!("{p}.mlp.gate_proj"))?,
                    linear(&format!("{p}.mlp.up_proj"))?,
                ],
                &file,
            )?,
            down: linear(&format!("{p}.mlp.down_proj"))?,
        });
    }
    let embed = linear("model.embed_tokens")?;
    let lm_head = if cfg["tie_word_embeddings"].as_bool() == Some(true)
        && !tensors.contains_key("lm_head.weight")
    {
        embed.clone()
    } else {
        linear("lm_head")?
    };
    let norm = vector("model.norm.weight")?;
    let weights = Weights {
        dims,
        embed,
        layers,
        norm,
        lm_head,
        qkv_order: QkvOrder::Separate,
    };
    check_shapes(&weights, &file)?;
    Ok(finish(archive, weights, sp, SourceKind::HuggingFace))
}
