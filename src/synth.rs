//! Synthetic `.nemo` archives with real shapes (e.g. Llama-2 13B at TP 4) written by the
//! project's own torch and tar writers, for benchmarks and writer → reader tests.
//! Weights are deterministic pseudo-random values; the archive is laid out as NeMo
//! writes legacy checkpoints (`mp_rank_XX/`, `inv_freq`, `_extra_state: None`).

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::Path;

use crate::container::tar_write::TarWriter;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::nemo::layout::rank_member;
use crate::nemo::tokenizer::{write_bpe_model, Piece, PieceType};
use crate::torch::save::{SaveEntry, TorchFile};

/// Shape of the synthetic model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub layers: u64,
    pub hidden: u64,
    pub heads: u64,
    /// Query groups (KV heads); `heads` for multi-head attention.
    pub groups: u64,
    pub ffn: u64,
    pub vocab: u64,
    pub tp: u64,
    pub pp: u64,
    pub dtype: DType,
    pub make_vocab_size_divisible_by: u64,
}

impl SynthSpec {
    /// Llama-2 13B shapes at TP 4 with `layers` layers.
    pub fn llama2_13b(layers: u64) -> SynthSpec {
        SynthSpec {
            layers,
            hidden: 5120,
            heads: 40,
            groups: 40,
            ffn: 13824,
            vocab: 32000,
            tp: 4,
            pp: 1,
            dtype: DType::BF16,
            make_vocab_size_divisible_by: 128,
        }
    }

    fn padded_vocab(&self) -> u64 {
        let unit = self.make_vocab_size_divisible_by * self.tp;
        self.vocab.div_ceil(unit) * unit
    }

    /// The state dict of rank (`tp`, `pp`): names and shapes.
    fn rank_entries(&self, pp: u64) -> Vec<(String, SaveEntry)> {
        let t = |shape: Vec<u64>| SaveEntry::Tensor {
            dtype: self.dtype,
            shape,
        };
        let (h, tp) = (self.hidden, self.tp);
        let hd = h / self.heads;
        let per_stage = self.layers / self.pp;
        let mut e = Vec::new();
        let lm = "model.language_model";
        if pp == 0 {
            e.push((
                format!("{lm}.embedding.word_embeddings.weight"),
                t(vec![self.padded_vocab() / tp, h]),
            ));
        }
        e.push((format!("{lm}.rotary_pos_emb.inv_freq"), t(vec![hd / 2])));
        for l in 0..per_stage {
            let p = format!("{lm}.encoder.layers.{l}");
            e.push((format!("{p}.input_layernorm.weight"), t(vec![h])));
            e.push((
                format!("{p}.self_attention.query_key_value.weight"),
                t(vec![(self.heads + 2 * self.groups) * hd / tp, h]),
            ));
            e.push((
                format!("{p}.self_attention.query_key_value._extra_state"),
                SaveEntry::None,
            ));
            e.push((
                format!("{p}.self_attention.dense.weight"),
                t(vec![h, h / tp]),
            ));
            e.push((
                format!("{p}.self_attention.dense._extra_state"),
                SaveEntry::None,
            ));
            e.push((format!("{p}.post_attention_layernorm.weight"), t(vec![h])));
            e.push((
                format!("{p}.mlp.dense_h_to_4h.weight"),
                t(vec![2 * self.ffn / tp, h]),
            ));
            e.push((
                format!("{p}.mlp.dense_h_to_4h._extra_state"),
                SaveEntry::None,
            ));
            e.push((
                format!("{p}.mlp.dense_4h_to_h.weight"),
                t(vec![h, self.ffn / tp]),
            ));
            e.push((
                format!("{p}.mlp.dense_4h_to_h._extra_state"),
                SaveEntry::None,
            ));
        }
        if pp == self.pp - 1 {
            e.push((format!("{lm}.encoder.final_layernorm.weight"), t(vec![h])));
            e.push((
                format!("{lm}.output_layer.weight"),
                t(vec![self.padded_vocab() / tp, h]),
            ));
            e.push((format!("{lm}.output_layer._extra_state"), SaveEntry::None));
        }
        e
    }

    fn config_yaml(&self) -> String {
        format!(
            "mcore_gpt: false\nprecision: bf16\nmegatron_amp_O2: true\nencoder_seq_length: 4096\nmax_position_embeddings: ${{.encoder_seq_length}}\nnum_layers: {}\nhidden_size: {}\nffn_hidden_size: {}\nnum_attention_heads: {}\nnum_query_groups: {}\nkv_channels: null\ninit_method_std: 0.02\nlayernorm_epsilon: 1.0e-05\nmake_vocab_size_divisible_by: {}\nactivation: fast-swiglu\nnormalization: rmsnorm\nposition_embedding_type: rope\nrotary_percentage: 1.0\nbias: false\nshare_embeddings_and_output_weights: false\ntensor_model_parallel_size: {}\npipeline_model_parallel_size: {}\ntokenizer:\n  library: sentencepiece\n  type: null\n  model: nemo:{TOKENIZER}\n  vocab_file: null\n  merge_file: null\n  sentencepiece_legacy: false\n",
            self.layers, self.hidden, self.ffn, self.heads, self.groups, self.make_vocab_size_divisible_by, self.tp, self.pp
        )
    }

    fn tokenizer(&self) -> Vec<u8> {
        let mut pieces = Piece::llama_specials();
        for b in 0..256 {
            pieces.push(Piece {
                piece: format!("<0x{b:02X}>"),
                score: 0.0,
                kind: PieceType::Byte,
            });
        }
        let mut i = 0u64;
        while (pieces.len() as u64) < self.vocab {
            pieces.push(Piece {
                piece: format!("▁w{i}"),
                score: -(i as f32),
                kind: PieceType::Normal,
            });
            i += 1;
        }
        write_bpe_model(&pieces, true)
    }
}

const TOKENIZER: &str = "5f2ed0c0a1b24c6c9f3e8d7a6b5c4d3e_tokenizer.model";

/// Writes the archive to `out` (through a `.partial` sibling renamed at the end).
/// `on_bytes` is told how many tensor bytes were written, for progress.
pub fn write(spec: &SynthSpec, out: &Path, mut on_bytes: impl FnMut(u64)) -> Result<u64> {
    if !spec.layers.is_multiple_of(spec.pp)
        || !spec.groups.is_multiple_of(spec.tp)
        || !spec.heads.is_multiple_of(spec.groups)
        || !spec.ffn.is_multiple_of(spec.tp)
        || !spec.hidden.is_multiple_of(spec.heads)
    {
        return Err(Error::Usage(
            "synthetic shapes must divide by TP, PP and the head count".into(),
        ));
    }
    let partial = out.with_extension("nemo.partial");
    let result = write_to(spec, &partial, &mut on_bytes);
    match result {
        Ok(n) => {
            std::fs::rename(&partial, out).map_err(|e| Error::io(out, e))?;
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

fn write_to(spec: &SynthSpec, path: &Path, on_bytes: &mut dyn FnMut(u64)) -> Result<u64> {
    let io_err = |e: io::Error| Error::io(path, e);
    let f = File::create(path).map_err(io_err)?;
    let mut t = TarWriter::new(BufWriter::with_capacity(8 << 20, f));
    t.dir(".").map_err(io_err)?;
    t.file("./model_config.yaml", spec.config_yaml().as_bytes())
        .map_err(io_err)?;
    t.file(&format!("./{TOKENIZER}"), &spec.tokenizer())
        .map_err(io_err)?;
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for pp in 0..spec.pp {
        let entries = spec.rank_entries(pp);
        // (bytes, replicated on every TP rank) of each storage, in order.
        let sizes: Vec<(u64, bool)> = entries
            .iter()
            .filter_map(|(name, e)| match e {
                SaveEntry::Tensor { dtype, shape } => Some((
                    shape.iter().product::<u64>() * dtype.size() as u64,
                    name.contains("layernorm") || name.ends_with("inv_freq"),
                )),
                SaveEntry::None => None,
            })
            .collect();
        for tp in 0..spec.tp {
            let member = rank_member(tp, pp, spec.tp, spec.pp);
            let folder = member.trim_end_matches("/model_weights.ckpt");
            let root = if member == "model_weights.ckpt" {
                "model_weights".to_string()
            } else {
                format!("{folder}_model_weights")
            };
            if member != "model_weights.ckpt" {
                t.dir(&format!("./{folder}")).map_err(io_err)?;
            }
            let file = TorchFile::new(&root, &entries);
            t.begin_file(&format!("./{member}"), file.size())
                .map_err(io_err)?;
            file.write(t.inner(), |i, o| {
                let (n, replicated) = sizes[i];
                let rank_salt = if replicated { 0 } else { tp * 1_000_003 };
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ ((rank_salt + pp * 7919 + i as u64) << 1);
                let mut left = n;
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    fill_random_halves(&mut buf[..k], &mut seed);
                    o.write_all(&buf[..k])?;
                    left -= k as u64;
                }
                on_bytes(n);
                Ok(())
            })
            .map_err(io_err)?;
            t.end_file().map_err(io_err)?;
            total += sizes.iter().map(|s| s.0).sum::<u64>();
        }
    }
    let w = t.finish().map_err(io_err)?;
    let f = w.into_inner().map_err(|e| io_err(e.into_error()))?;
    f.sync_all().map_err(io_err)?;
    Ok(total)
}

/// Fills `buf` with 16-bit words that are finite bf16 (and fp16) values of moderate size.
fn fill_random_halves(buf: &mut [u8], seed: &mut u64) {
    for w in buf.chunks_exact_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        // Sign and mantissa random, exponent fixed near 2^-6: bf16 0x3c80.. range.
        let v = (*seed & 0x807f_807f_807f_807f) | 0x3c80_3c80_3c80_3c80;
        w.copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::mapped::OpenOptions;
    use crate::nemo::checkpoint::{Checkpoint, Storage};

    #[test]
    fn small_synthetic_archive_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s.nemo");
        for (tp, pp) in [(1, 1), (2, 1), (2, 2)] {
            let spec = SynthSpec {
                layers: 4,
                hidden: 64,
                heads: 4,
                groups: 4,
                ffn: 96,
                vocab: 300,
                tp,
                pp,
                dtype: DType::F16,
                make_vocab_size_divisible_by: 8,
            };
            let mut seen = 0;
            let n = write(&spec, &out, |b| seen += b).unwrap();
            assert_eq!(n, seen);
            let ck = Checkpoint::open(&out, &OpenOptions::default()).unwrap();
            assert_eq!((ck.grid.tp, ck.grid.pp), (tp, pp));
            assert!(ck.unknown_keys().is_empty());
            assert_eq!(ck.tokenizer().unwrap().model.vocab_size(), 300);
            assert_eq!(ck.stored_vocab_rows(), Some(spec.padded_vocab()));
            let Storage::Ranks(r) = &ck.weights else {
                panic!()
            };
            assert_eq!(r.len() as u64, tp * pp);
            assert!(!out.with_extension("nemo.partial").exists());
            let hf = dir.path().join(format!("hf{tp}{pp}"));
            let opts = crate::pipeline::to_hf::ConvertOptions {
                dtype: None,
                max_shard_bytes: u64::MAX,
                force: false,
                allow_overflow: false,
                progress: false,
            };
            let report = crate::pipeline::to_hf::nemo_to_safetensors(
                &crate::model::View::from_nemo(ck).unwrap(),
                &hf,
                &opts,
            )
            .unwrap();
            assert_eq!(report.tensors.len(), 2 + 4 * 9 + 1);
        }
    }
}
