//! How far a candidate's logits are from a reference's at one position: the figures
//! `verify` reports for every teacher-forced position (computed in f64).

/// The distance between two logit vectors of the same vocabulary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitDiff {
    /// Largest |reference − candidate|.
    pub max_abs: f64,
    /// Cosine similarity of the two vectors.
    pub cosine: f64,
    /// KL(softmax(reference) ‖ softmax(candidate)), in nats.
    pub kl: f64,
    /// Both vectors have the same argmax (the lowest index on ties, as greedy decoding
    /// picks).
    pub top1_agree: bool,
}

/// The index of the largest value (the first of equals); `None` for an empty slice.
pub fn argmax(v: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in v.iter().enumerate() {
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|b| b.0)
}

fn log_softmax(v: &[f32]) -> Vec<f64> {
    let m = v.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    v.iter().map(|&x| x as f64 - lse).collect()
}

/// Compares `candidate` with `reference` (same length).
pub fn compare(reference: &[f32], candidate: &[f32]) -> LogitDiff {
    assert_eq!(reference.len(), candidate.len(), "same vocabulary");
    let (mut max_abs, mut dot, mut nr, mut nc) = (0f64, 0f64, 0f64, 0f64);
    for (&r, &c) in reference.iter().zip(candidate) {
        let (r, c) = (r as f64, c as f64);
        max_abs = max_abs.max((r - c).abs());
        dot += r * c;
        nr += r * r;
        nc += c * c;
    }
    let cosine = if nr == 0.0 || nc == 0.0 {
        if nr == nc {
            1.0
        } else {
            0.0
        }
    } else {
        dot / (nr.sqrt() * nc.sqrt())
    };
    let (lr, lc) = (log_softmax(reference), log_softmax(candidate));
    let kl = lr
        .iter()
        .zip(&lc)
        .map(|(&a, &b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0);
    LogitDiff {
        max_abs,
        cosine,
        kl,
        top1_agree: argmax(reference) == argmax(candidate),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_shifted_and_swapped_logits() {
        let r = [1.0f32, 3.0, -2.0, 0.5];
        let same = compare(&r, &r);
        assert_eq!((same.max_abs, same.kl, same.top1_agree), (0.0, 0.0, true));
        assert!((same.cosine - 1.0).abs() < 1e-12);
        // A constant shift changes no probability.
        let shifted: Vec<f32> = r.iter().map(|x| x + 2.0).collect();
        let d = compare(&r, &shifted);
        assert!((d.max_abs - 2.0).abs() < 1e-12 && d.kl < 1e-12 && d.top1_agree);
        // Swapping the top two: KL by hand, and the argmax moves.
        let swapped = [3.0f32, 1.0, -2.0, 0.5];
        let d = compare(&r, &swapped);
        let p = |v: &[f32]| {
            let z: f64 = v.iter().map(|&x| (x as f64).exp()).sum();
            v.iter().map(|&x| (x as f64).exp() / z).collect::<Vec<_>>()
        };
        let (pr, pc) = (p(&r), p(&swapped));
        let want: f64 = pr.iter().zip(&pc).map(|(a, b)| a * (a / b).ln()).sum();
        assert!((d.kl - want).abs() < 1e-12, "{} vs {want}", d.kl);
        assert!(!d.top1_agree);
        assert_eq!(argmax(&[2.0, 5.0, 5.0]), Some(1));
        assert_eq!(argmax(&[]), None);
    }
}
