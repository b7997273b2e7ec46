//! The summary table `verify` prints, and its one-line summary.

use std::fmt::Write;

use crate::verify::Report;

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// The table: one row per check (check, subject, figures, verdict), then the detail of
/// every failing check, then the summary line.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let w0 = r
        .checks
        .iter()
        .map(|c| c.check.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let w1 = r
        .checks
        .iter()
        .map(|c| clip(&c.subject, 40).chars().count())
        .max()
        .unwrap_or(7)
        .max(7);
    let _ = writeln!(
        out,
        "{:<w0$}  {:<w1$}  {:<7}  figures",
        "check", "subject", "verdict"
    );
    for c in &r.checks {
        let _ = writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<7}  {}",
            c.check,
            clip(&c.subject, 40),
            if c.pass { "pass" } else { "FAIL" },
            c.figures
        );
    }
    for c in r.checks.iter().filter(|c| !c.pass) {
        let _ = writeln!(
            out,
            "FAIL {} ({}): {}",
            c.check,
            c.subject,
            c.detail.as_deref().unwrap_or("fails")
        );
    }
    out.push_str(&summary(r));
    out.push('\n');
    out
}

/// `verify: PASS (lossless), 14 checks; 3.1 s: …`.
pub fn summary(r: &Report) -> String {
    let t = &r.timing;
    let failed = r.checks.iter().filter(|c| !c.pass).count();
    let run = if r.mode == "self" {
        format!(
            "prefill {:.1} s + decode {:.1} s",
            t.reference_prefill_s, t.reference_decode_s
        )
    } else {
        format!(
            "reference prefill {:.1} s + decode {:.1} s, candidate prefill {:.1} s + decode {:.1} s",
            t.reference_prefill_s, t.reference_decode_s, t.candidate_prefill_s, t.candidate_decode_s
        )
    };
    format!(
        "verify: {} ({}), {} checks{}; {:.1} s: integrity {:.1} s, hashing {:.1} s ({:.0} MB/s), {run}; {} threads",
        if r.pass { "PASS" } else { "FAIL" },
        r.class,
        r.checks.len(),
        if failed > 0 { format!(", {failed} failed") } else { String::new() },
        t.total_s,
        t.integrity_s,
        t.hashing_s,
        t.hash_bytes_per_s / 1e6,
        t.threads
    )
}
