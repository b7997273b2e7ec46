//! The runtime against transformers: every fixture model, from every `.nemo` (run on its
//! shards as stored), from the transformers-written folder and from our converted folder.
//! Prompt ids equal the ground truth, last-position logits within 1e-4 of transformers
//! float32, and 16 greedy tokens identical.

mod common;

use std::path::Path;

use common::*;
use steerlm_convert::container::mapped::OpenOptions;
use steerlm_convert::runtime::generate::{generate, GenOptions};
use steerlm_convert::runtime::load::Model;

/// Checks every truth prompt on `path`; returns the worst logit difference.
fn check_model(path: &Path, model: &str) -> f32 {
    let m = Model::open(path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let t = truth(model);
    let mut worst = 0f32;
    for p in t["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        // SentencePiece models start with BOS; a GPT-2 tokenizer adds none.
        let mut prompt: Vec<u32> = m.bos.into_iter().collect();
        prompt.extend(m.tokenizer.encode(p["text"].as_str().unwrap()));
        assert_eq!(
            prompt,
            ids_of(&p["ids"]),
            "{}: {name}: prompt ids",
            path.display()
        );
        let g = generate(
            &m,
            &prompt,
            &GenOptions {
                max_tokens: 16,
                ignore_eos: true,
                end_strings: Vec::new(),
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
        let want = floats_of(&p["last_logits"]);
        assert_eq!(g.prompt_logits.len(), want.len(), "{name}: vocab");
        let diff = g
            .prompt_logits
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-4,
            "{}: {name}: logits differ by {diff}",
            path.display()
        );
        worst = worst.max(diff);
        assert_eq!(
            g.ids,
            ids_of(&p["greedy"]),
            "{}: {name}: greedy tokens",
            path.display()
        );
    }
    worst
}

#[test]
fn every_archive_runs_on_its_shards_like_transformers() {
    let mut report = Vec::new();
    for a in archives() {
        let file = fixtures().join(a["file"].as_str().unwrap());
        let model = a["model"].as_str().unwrap();
        let worst = check_model(&file, model);
        report.push(format!("{}: max |Δlogit| {worst:.2e}", a["file"]));
    }
    assert_eq!(report.len(), 22);
    eprintln!("{}", report.join("\n"));
}

#[test]
fn transformers_folders_run_like_transformers() {
    for model in ["mha", "gqa"] {
        let dir = fixtures().join("models").join(model).join("hf");
        let worst = check_model(&dir, model);
        eprintln!("{model} hf: max |Δlogit| {worst:.2e}");
    }
}
