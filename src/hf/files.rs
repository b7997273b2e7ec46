//! Writing the side files of a Hugging Face folder: `config.json`, the generation config
//! and the tokenizer files.

use std::path::Path;

use serde_json::Value;

use super::config;
use crate::error::{Error, Result};
use crate::nemo::checkpoint::Checkpoint;
use crate::nemo::hf_tokenizer::TokenizerModel;

/// Writes `config` as config.json, generation_config.json and the tokenizer files into
/// `dir`: for SentencePiece, its model (whose file is `tok_bytes`) and the files
/// transformers reads beside it; for a `tokenizers` tokenizer, its `tokenizer.json`.
/// Returns their names.
pub fn write_side_files(
    dir: &Path,
    config: Value,
    tok: &TokenizerModel,
    tok_bytes: &[u8],
    max_len: u64,
) -> Result<Vec<String>> {
    write_json(dir, "config.json", &config)?;
    write_json(
        dir,
        "generation_config.json",
        &config::generation_config_json(tok),
    )?;
    let sp = match tok {
        TokenizerModel::SentencePiece(sp) => sp,
        TokenizerModel::Hf(t) => {
            let (cfg, map) = config::fast_tokenizer_configs(t, max_len);
            write_json(dir, "tokenizer_config.json", &cfg)?;
            write_json(dir, "special_tokens_map.json", &map)?;
            let tj = dir.join("tokenizer.json");
            std::fs::write(&tj, &t.json).map_err(|e| Error::io(&tj, e))?;
            return Ok([
                "config.json",
                "generation_config.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "tokenizer.json",
            ]
            .map(String::from)
            .to_vec());
        }
    };
    write_json(
        dir,
        "tokenizer_config.json",
        &config::tokenizer_config_json(sp, max_len),
    )?;
    write_json(
        dir,
        "special_tokens_map.json",
        &config::special_tokens_map_json(sp),
    )?;
    let tm = dir.join("tokenizer.model");
    std::fs::write(&tm, tok_bytes).map_err(|e| Error::io(&tm, e))?;
    let mut files: Vec<String> = [
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
    ]
    .map(String::from)
    .to_vec();
    // Without tokenizer.json, transformers converts the slow tokenizer itself, and that
    // conversion drifts from SentencePiece; a model it cannot express is left to it.
    if let Ok(tj) = super::tokenizer::tokenizer_json(sp) {
        write_json(dir, "tokenizer.json", &tj)?;
        files.push("tokenizer.json".into());
    }
    Ok(files)
}

/// Writes `v` as pretty JSON to `dir/name`.
pub fn write_json(dir: &Path, name: &str, v: &Value) -> Result<()> {
    let p = dir.join(name);
    let mut text = serde_json::to_string_pretty(v).expect("JSON of plain values");
    text.push('\n');
    std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
}

/// [`write_side_files`] with a NeMo checkpoint's tokenizer artifact and context length.
pub fn nemo_side_files(dir: &Path, ck: &Checkpoint, config: Value) -> Result<Vec<String>> {
    let tok = ck.tokenizer()?;
    let member = ck
        .files
        .member(&tok.member)
        .expect("resolved tokenizer member");
    write_side_files(
        dir,
        config,
        &tok.model,
        ck.files.data(member),
        ck.config.max_position_embeddings,
    )
}
