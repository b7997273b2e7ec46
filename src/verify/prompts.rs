//! The prompts `verify` generates on: a built-in set, or one JSON object per line of a
//! `--prompts` file.

use serde::Deserialize;

use crate::runtime::steerlm::{self, Attributes};

/// One prompt, as the text the model is given.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// How the report names it (`builtin:<name>` or `<file>:<line>`).
    pub name: String,
    /// The whole text (after the template, unless raw).
    pub text: String,
    /// Sent untouched: no template and no end strings.
    pub raw: bool,
}

impl Prompt {
    /// The end strings generation stops at (the card's, unless raw).
    pub fn end_strings(&self) -> Vec<String> {
        if self.raw {
            Vec::new()
        } else {
            steerlm::END_STRINGS.iter().map(|s| s.to_string()).collect()
        }
    }
}

fn templated(name: &str, history: &[(&str, &str)], user: &str, attrs: &[&str]) -> Prompt {
    let attrs: Vec<String> = attrs.iter().map(|s| s.to_string()).collect();
    let attrs = Attributes::with_overrides(&attrs).expect("built-in attributes are valid");
    let history: Vec<(String, String)> = history
        .iter()
        .map(|(u, a)| (u.to_string(), a.to_string()))
        .collect();
    Prompt {
        name: format!("builtin:{name}"),
        text: steerlm::chat(steerlm::DEFAULT_SYSTEM, &history, user, &attrs),
        raw: false,
    }
}

const LONG: &str = "Here are my notes from a week of reading about the history of electronic \
music. Summarize them in three sentences. Monday: early synthesizers were large modular \
machines wired with patch cables, and musicians had to tune each oscillator by ear before \
every session. Tuesday: drum machines made repeating rhythms cheap, and producers in \
several cities began building whole tracks around them. Wednesday: samplers let people \
record short pieces of existing songs and play them back at any pitch, which changed how \
melodies were written. Thursday: affordable home studios meant that a single person \
could write, record and mix an album without renting time anywhere. Friday: software \
instruments replaced much of the hardware, and the laptop became the studio. Saturday: \
streaming changed how listeners found new music, and playlists replaced albums for many \
of them. Sunday: I still wonder which of these changes mattered most.";

/// The built-in set: the model card's example question, several attribute settings, a
/// multi-turn chat, non-ASCII text, a long prompt and a raw (untemplated) text.
pub fn builtin() -> Vec<Prompt> {
    vec![
        templated(
            "card",
            &[],
            "Where and when did techno music originate?",
            &[],
        ),
        templated(
            "humor",
            &[],
            "Tell me a joke about computers.",
            &["humor=9", "creativity=9"],
        ),
        templated(
            "low-quality",
            &[],
            "Explain what a GPU is.",
            &["quality=2", "helpfulness=2"],
        ),
        templated(
            "toxicity",
            &[],
            "What do you think of people who are late?",
            &["toxicity=4", "not_appropriate=2"],
        ),
        templated(
            "multi-turn",
            &[
                (
                    "What is the capital of France?",
                    "The capital of France is Paris.",
                ),
                ("And of Italy?", "The capital of Italy is Rome."),
            ],
            "Which of the two cities is older?",
            &[],
        ),
        templated(
            "non-ascii",
            &[],
            "Traduis en français : « Où est la gare ? » — 東京駅はどこですか？ Ελληνικά, ß, 🙂",
            &[],
        ),
        templated("long", &[], LONG, &[]),
        Prompt {
            name: "builtin:raw".into(),
            text: "The three primary colors are".into(),
            raw: true,
        },
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    prompt: String,
    #[serde(default)]
    attrs: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    raw: bool,
}

/// Reads a `--prompts` file: one JSON object per line (`prompt`, optional `attrs` as an
/// object of name → value, `system`, `raw`); blank lines are skipped. `file` names it in
/// errors, which give the line.
pub fn parse_jsonl(text: &str, file: &str) -> Result<Vec<Prompt>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{file}:{}", i + 1);
        let l: Line = serde_json::from_str(line).map_err(|e| format!("{at}: {e}"))?;
        if l.raw && (l.attrs.is_some() || l.system.is_some()) {
            return Err(format!(
                "{at}: `attrs` and `system` apply to the template; a raw prompt has none"
            ));
        }
        let text = if l.raw {
            l.prompt
        } else {
            let items: Vec<String> = l
                .attrs
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => format!("{k}={s}"),
                    other => format!("{k}={other}"),
                })
                .collect();
            let attrs = Attributes::with_overrides(&items).map_err(|e| format!("{at}: {e}"))?;
            let system = l.system.as_deref().unwrap_or(steerlm::DEFAULT_SYSTEM);
            steerlm::prompt(system, &l.prompt, &attrs)
        };
        out.push(Prompt {
            name: at,
            text,
            raw: l.raw,
        });
    }
    if out.is_empty() {
        return Err(format!("{file}: no prompts (one JSON object per line)"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_set_and_jsonl() {
        let b = builtin();
        assert_eq!(b.len(), 8);
        assert!(b[0]
            .text
            .contains("User\nWhere and when did techno music originate?\n"));
        assert!(b[1].text.contains("humor:9,creativity:9"));
        assert_eq!(b[4].text.matches("<extra_id_1>Assistant").count(), 3);
        let p = parse_jsonl(
            "{\"prompt\": \"Hi\", \"attrs\": {\"humor\": 5}}\n\n{\"prompt\": \"x y\", \"raw\": true}\n",
            "p.jsonl",
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert!(p[0].text.contains("humor:5") && p[0].name == "p.jsonl:1");
        assert!(p[1].raw && p[1].text == "x y" && p[1].end_strings().is_empty());
        assert!(parse_jsonl("{\"text\": 1}", "f")
            .unwrap_err()
            .starts_with("f:1:"));
        assert!(parse_jsonl("", "f").is_err());
    }
}
