//! `nemo-to-safetensors`: merge every rank into a Hugging Face Llama folder, one tensor at a
//! time, straight from the mapped archive into the output files.

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::arch::roles::Role;
use crate::arch::tp::Slice;
use crate::container::safetensors_write::{self, TensorSpec};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::hf::config as hf;
use crate::hf::files::{nemo_side_files, write_json};
use crate::io::output::{self, AtomicDir};
use crate::io::progress::Progress;
use crate::model::View;
use crate::nemo::checkpoint::{Checkpoint, Storage};
use crate::nemo::logical::Logicals;
use crate::pipeline::emit;

/// What to write.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// `None` keeps the stored dtype.
    pub dtype: Option<DType>,
    pub max_shard_bytes: u64,
    pub force: bool,
    pub allow_overflow: bool,
    pub progress: bool,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub files: Vec<String>,
    pub tensors: Vec<(TensorSpec, DType)>,
    pub dropped: Vec<String>,
    pub overflow: Vec<(String, u64)>,
    pub bytes: u64,
    /// Bytes the kernel copied (`copy_file_range`) rather than this process.
    pub kernel_copied: u64,
    pub seconds: f64,
}

impl ConvertReport {
    pub fn to_json(&self, out: &Path) -> Value {
        json!({
            "schema_version": 1,
            "command": "nemo-to-safetensors",
            "output": out.display().to_string(),
            "files": self.files,
            "tensor_count": self.tensors.len(),
            "tensors": self.tensors.iter().map(|(t, src)| json!({
                "name": t.name, "shape": t.shape, "dtype": t.dtype.short_name(), "source_dtype": src.short_name(),
            })).collect::<Vec<_>>(),
            "dropped": self.dropped,
            "overflow": self.overflow.iter().map(|(n, c)| json!({"tensor": n, "count": c})).collect::<Vec<_>>(),
            "bytes": self.bytes,
            "kernel_copied_bytes": self.kernel_copied,
            "seconds": self.seconds,
            "peak_rss_bytes": output::peak_rss(),
        })
    }
}

/// Converts the NeMo input `view` into the HF folder `out`.
pub fn nemo_to_safetensors(
    view: &View,
    out: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertReport> {
    let start = Instant::now();
    let (ck, logicals) = view.nemo_parts("nemo-to-safetensors")?;
    let sp = view.tokenizer()?;
    let specs: Vec<TensorSpec> = view
        .tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: opts.dtype.unwrap_or(t.dtype),
            shape: t.shape.clone(),
        })
        .collect();
    let written_dtype = specs.first().map(|s| s.dtype).unwrap_or(DType::F32);
    for t in &view.tensors {
        if !t.dtype.is_float() {
            return Err(Error::Tensor {
                member: view.display().to_string(),
                tensor: t.name.clone(),
                msg: format!("stored as {}, not a float dtype", t.dtype),
            });
        }
    }
    check_replicas(ck, logicals)?;
    let dir = AtomicDir::create(out, opts.force)?;
    let shards = safetensors_write::plan_shards(&specs, opts.max_shard_bytes);
    let names = safetensors_write::shard_names(shards.len());
    let total: u64 = specs.iter().map(TensorSpec::nbytes).sum();
    let bar = Progress::bytes(total, "converting", opts.progress);
    let mut overflow = Vec::new();
    let mut kernel_copied = 0;
    for (shard, name) in shards.iter().zip(&names) {
        let (path, mut w) = safetensors_write::create_shard(dir.path(), name, &specs, shard)?;
        for &i in shard {
            output::check_interrupted()?;
            let (l, rows) = view.tensors[i].logical().expect("a NeMo view's tensors");
            l.check_records(&ck.files, &specs[i].name)?;
            let before = w.written;
            let pieces: Vec<Slice> = rows.iter().map(|&(a, b)| Slice::Rows(a, b)).collect();
            let n = emit::write_pieces(
                &ck.files,
                Some(l),
                l.dtype,
                &pieces,
                specs[i].dtype,
                &mut w,
                &bar,
            )
            .map_err(|e| Error::io(&path, e))?;
            debug_assert_eq!(w.written - before, specs[i].nbytes());
            emit::check_overflow(
                ck.files.display(),
                &specs[i].name,
                n,
                specs[i].dtype,
                opts.allow_overflow,
            )?;
            if n > 0 {
                overflow.push((specs[i].name.clone(), n));
            }
        }
        kernel_copied += w.copied;
        let f = w.into_file().map_err(|e| Error::io(&path, e))?;
        f.sync_all().map_err(|e| Error::io(&path, e))?;
    }
    bar.finish();
    let mut files = names.clone();
    if shards.len() > 1 {
        write_json(
            dir.path(),
            "model.safetensors.index.json",
            &safetensors_write::index_json(&specs, &shards, &names),
        )?;
        files.push("model.safetensors.index.json".into());
    }
    files.extend(nemo_side_files(
        dir.path(),
        ck,
        hf::config_json(&view.arch, sp, written_dtype),
    )?);
    dir.commit()?;
    Ok(ConvertReport {
        files,
        tensors: specs
            .iter()
            .zip(&view.tensors)
            .map(|(s, t)| (s.clone(), t.dtype))
            .collect(),
        dropped: dropped_keys(ck),
        overflow,
        bytes: total,
        kernel_copied,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Keys that are not weights and are not exported.
fn dropped_keys(ck: &Checkpoint) -> Vec<String> {
    let mut v: Vec<String> = match &ck.weights {
        Storage::Ranks(ranks) => ranks
            .iter()
            .flat_map(|r| r.state.entries.iter().map(|(k, _)| k))
            .filter(|k| ck.classify(k).is_some_and(|c| c.role == Role::Skip))
            .cloned()
            .collect(),
        Storage::Distributed(d) => d.objects.iter().map(|(k, _)| k.clone()).collect(),
    };
    v.sort();
    v.dedup();
    v
}

/// Replicated tensors must be identical on every rank.
fn check_replicas(ck: &Checkpoint, logicals: &Logicals) -> Result<()> {
    for ((kind, layer), l) in logicals {
        let reps = l.replicas();
        if let Some(&(o0, n0)) = reps.first() {
            let first = ck.files.slice(o0, n0);
            for (r, &(o, n)) in reps.iter().enumerate().skip(1) {
                if ck.files.slice(o, n) != first {
                    return Err(Error::Layout {
                        file: ck.files.display().to_string(),
                        msg: format!("replicated tensor {kind:?} (layer {layer:?}) differs between TP rank 0 and rank {r}"),
                    });
                }
            }
        }
    }
    Ok(())
}
