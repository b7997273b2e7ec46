//! The SteerLM chat template, attribute line and end strings, exactly as the model card's
//! client builds them (`nemo-format.md` §8).
//!
//! ```text
//! <extra_id_0>System\n{system}\n\n
//! <extra_id_1>User\n{turn}\n
//! <extra_id_1>Assistant\n<extra_id_2>{attributes}\n{turn}\n    (earlier turns)
//! <extra_id_1>User\n{prompt}\n
//! <extra_id_1>Assistant\n<extra_id_2>{attributes}\n            (generation starts here)
//! ```

/// The model card's system text. The template follows any system text with a blank line,
/// as the card's f-string does.
pub const DEFAULT_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// The model card's attribute set, in its order.
pub const DEFAULT_ATTRIBUTES: [(&str, &str); 7] = [
    ("quality", "9"),
    ("toxicity", "0"),
    ("humor", "0"),
    ("creativity", "0"),
    ("violence", "0"),
    ("helpfulness", "9"),
    ("not_appropriate", "0"),
];

/// The end strings the model card's client sends.
pub const END_STRINGS: [&str; 4] = ["<extra_id_1>", "quality:", "quality:9", "quality:0"];

/// Attributes in order. `--attr name=value` overrides a default in place or appends.
#[derive(Debug, Clone, PartialEq)]
pub struct Attributes(pub Vec<(String, String)>);

impl Default for Attributes {
    fn default() -> Self {
        Attributes(
            DEFAULT_ATTRIBUTES
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

impl Attributes {
    /// Applies `name=value` (or SteerLM's own spelling, `name:value`) items over the
    /// defaults: a known name keeps its place, a new one is appended in the order given.
    pub fn with_overrides(items: &[String]) -> Result<Attributes, String> {
        let mut a = Attributes::default();
        for item in items {
            let (k, v) = item
                .split_once('=')
                .or_else(|| item.split_once(':'))
                .ok_or_else(|| format!("--attr `{item}` is not name=value or name:value"))?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() || k.contains([',', ':', '\n']) || v.contains([',', '\n']) {
                return Err(format!(
                    "--attr `{item}`: names cannot be empty or hold `,` `:` or newlines, values cannot hold `,` or newlines"
                ));
            }
            match a.0.iter_mut().find(|(n, _)| n == k) {
                Some(slot) => slot.1 = v.to_string(),
                None => a.0.push((k.to_string(), v.to_string())),
            }
        }
        Ok(a)
    }

    /// `quality:9,toxicity:0,…` as the card's `encode_labels` writes it.
    pub fn line(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Builds the prompt for one user message.
pub fn prompt(system: &str, user: &str, attrs: &Attributes) -> String {
    chat(system, &[], user, attrs)
}

/// Builds the prompt of a conversation: earlier `(user, assistant)` turns, each assistant
/// turn after its attribute line as NeMo's chat format writes it, then the new message.
pub fn chat(system: &str, history: &[(String, String)], user: &str, attrs: &Attributes) -> String {
    let line = attrs.line();
    let mut s = format!("<extra_id_0>System\n{system}\n\n");
    for (u, a) in history {
        s += &format!("<extra_id_1>User\n{u}\n<extra_id_1>Assistant\n<extra_id_2>{line}\n{a}\n");
    }
    s += &format!("<extra_id_1>User\n{user}\n<extra_id_1>Assistant\n<extra_id_2>{line}\n");
    s
}

/// The text of a prompt file as meant: CRLF line ends become LF, and one trailing
/// newline (the one every editor adds) is dropped.
pub fn prompt_file_text(raw: &str) -> String {
    let t = raw.replace("\r\n", "\n");
    match t.strip_suffix('\n') {
        Some(s) => s.to_string(),
        None => t,
    }
}

/// Where the completion `text` ends: the first position where some end string completes
/// (checked after each token, as NeMo's server does: on the text so far), and the end
/// string found. The end string is not part of the completion returned.
pub fn find_end(text: &str, ends: &[&str]) -> Option<(usize, usize)> {
    let mut best: Option<(usize, usize)> = None;
    for (i, e) in ends.iter().enumerate() {
        if e.is_empty() {
            continue;
        }
        if let Some(p) = text.find(e) {
            let end = p + e.len();
            if best.is_none_or(|(bp, bi)| {
                end < bp + ends[bi].len() || (end == bp + ends[bi].len() && p < bp)
            }) {
                best = Some((p, i));
            }
        }
    }
    best
}

/// How much of `text` may be shown while generation goes on: everything but a tail that
/// could still grow into an end string, and never half a character.
pub fn safe_prefix(text: &str, ends: &[&str]) -> usize {
    let mut keep = text.len();
    for e in ends {
        for n in (1..e.len()).rev() {
            if e.is_char_boundary(n) && text.ends_with(&e[..n]) {
                keep = keep.min(text.len() - n);
                break;
            }
        }
    }
    // A trailing U+FFFD may be an incomplete byte sequence still being spelled.
    while keep > 0 && text[..keep].ends_with('\u{FFFD}') {
        keep -= '\u{FFFD}'.len_utf8();
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_prompt_byte_for_byte() {
        // The model card's f-string with its defaults and its example question.
        let q = "Where and when did techno music originate?";
        let card = format!(
            "<extra_id_0>System\nA chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.\n\n<extra_id_1>User\n{q}\n<extra_id_1>Assistant\n<extra_id_2>quality:9,toxicity:0,humor:0,creativity:0,violence:0,helpfulness:9,not_appropriate:0\n"
        );
        assert_eq!(prompt(DEFAULT_SYSTEM, q, &Attributes::default()), card);
    }

    #[test]
    fn template_a_custom_system_text_is_followed_by_a_blank_line() {
        let p = prompt("Be brief.", "Hi", &Attributes::default());
        assert!(
            p.starts_with("<extra_id_0>System\nBe brief.\n\n<extra_id_1>User\nHi\n"),
            "{p:?}"
        );
    }

    /// Reads a prompt file's text as meant: CRLF line ends become LF and one trailing
    /// newline (the one every editor adds) is dropped.
    #[test]
    fn prompt_file_text_is_normalised() {
        assert_eq!(prompt_file_text("a\r\nb\r\n"), "a\nb");
        assert_eq!(prompt_file_text("a\n\n"), "a\n");
        assert_eq!(prompt_file_text("a"), "a");
    }

    #[test]
    fn overrides_keep_order() {
        let a = Attributes::with_overrides(&["humor=4".into(), "verbosity=2".into()]).unwrap();
        assert_eq!(
            a.line(),
            "quality:9,toxicity:0,humor:4,creativity:0,violence:0,helpfulness:9,not_appropriate:0,verbosity:2"
        );
        assert!(Attributes::with_overrides(&["humor".into()]).is_err());
        let colon = Attributes::with_overrides(&["quality:3".into()]).unwrap();
        assert_eq!(colon.0[0], ("quality".to_string(), "3".to_string()));
        assert!(Attributes::with_overrides(&["a,b=1".into()]).is_err());
    }

    #[test]
    fn end_strings() {
        assert_eq!(
            find_end("Detroit, 1980s.<extra_id_1>User", &END_STRINGS),
            Some((15, 0))
        );
        assert_eq!(find_end("ok quality:9", &END_STRINGS), Some((3, 1)));
        assert_eq!(find_end("nothing", &END_STRINGS), None);
        assert_eq!(safe_prefix("abc<extra_", &END_STRINGS), 3);
        assert_eq!(safe_prefix("abc qual", &END_STRINGS), 4);
        assert_eq!(safe_prefix("abc", &END_STRINGS), 3);
        assert_eq!(safe_prefix("ab\u{FFFD}", &END_STRINGS), 2);
    }
}
