//! The SentencePiece tokenizer against Python `sentencepiece` on the golden tables.

mod common;

use common::*;
use serde_json::Value;
use steerlm_convert::nemo::tokenizer::SpModel;
use steerlm_convert::runtime::tokenizer::Tokenizer;

fn check(variant: &str) {
    let dir = fixtures().join("tokenizers");
    let model = std::fs::read(dir.join(variant).join("tokenizer.model")).unwrap();
    let tok = Tokenizer::new(SpModel::parse(&model, variant).unwrap());
    let golden: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("golden_{variant}.json"))).unwrap())
            .unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    let mut bad = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text);
        if got != want {
            bad.push(format!("encode {text:?}: got {got:?} want {want:?}"));
        }
        let decoded = tok.decode(&want);
        if decoded != c["decoded"].as_str().unwrap() {
            bad.push(format!(
                "decode {text:?}: got {decoded:?} want {:?}",
                c["decoded"]
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{variant}: {} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn extra_id_pieces_tokenizer_matches_sentencepiece() {
    check("extra");
}

#[test]
fn plain_tokenizer_matches_sentencepiece() {
    check("plain");
}

#[test]
fn truth_prompts_tokenize_as_transformers_did() {
    for model in ["mha", "gqa"] {
        let truth: Value = serde_json::from_slice(
            &std::fs::read(fixtures().join("models").join(model).join("truth.json")).unwrap(),
        )
        .unwrap();
        let sp = std::fs::read(
            fixtures()
                .join("models")
                .join(model)
                .join("hf/tokenizer.model"),
        )
        .unwrap();
        let tok = Tokenizer::new(SpModel::parse(&sp, model).unwrap());
        for p in truth["prompts"].as_array().unwrap() {
            let mut ids = vec![1u32];
            ids.extend(tok.encode(p["text"].as_str().unwrap()));
            let want: Vec<u32> = p["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(ids, want, "{model}: {}", p["name"]);
        }
    }
}

#[test]
fn token_texts_put_together_are_the_decoded_text() {
    for variant in ["extra", "plain"] {
        let dir = fixtures().join("tokenizers").join(variant);
        let sp = SpModel::parse(&std::fs::read(dir.join("tokenizer.model")).unwrap(), "t").unwrap();
        let tok = Tokenizer::new(sp);
        for text in [
            "Where and when did techno music originate? In Detroit, in the 1980s.",
            "  two  spaces,\ttab\nline 12345",
            "<extra_id_1>User\nhi\n<extra_id_1>Assistant\n",
        ] {
            let mut ids = vec![1];
            ids.extend(tok.encode(text));
            let whole = tok.decode(&ids);
            assert_eq!(
                tok.token_texts(&ids, 0).concat(),
                whole,
                "{variant}: {text:?}"
            );
            // From the middle: the rest of the text, leading space kept.
            let k = ids.len() / 2;
            let head = tok.decode(&ids[..k]);
            assert_eq!(tok.token_texts(&ids, k).concat(), whole[head.len()..]);
        }
    }
}
