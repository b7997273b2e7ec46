//! Choosing the next token from the logits: greedy, or sampled with temperature, top-k,
//! top-p (nucleus) and a repetition penalty, reproducible from a seed.
//!
//! The order of the rules (as `transformers` and NeMo apply them): the repetition penalty
//! on the raw logits (CTRL's rule: a positive logit of a token already in the sequence is
//! divided by the penalty, a negative one multiplied), then greedy picks the first of the
//! largest; otherwise the logits are divided by the temperature, cut to the `top_k`
//! largest, cut to the smallest set whose probability reaches `top_p` (the most likely
//! token always stays), and one token is drawn from the softmax of what is left.

use crate::runtime::compare::argmax;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0: greedy.
    pub temperature: f64,
    /// 0: no cut.
    pub top_k: usize,
    /// 1: no cut.
    pub top_p: f64,
    /// 1: no penalty.
    pub repetition_penalty: f64,
    pub seed: u64,
    /// The penalty counts the prompt's tokens too (`transformers`); NeMo's server counts
    /// only the generated ones.
    pub penalize_prompt: bool,
}

impl Default for Sampling {
    /// Greedy.
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            penalize_prompt: true,
        }
    }
}

impl Sampling {
    /// Checks the ranges: temperature ≥ 0, top_p in (0, 1], penalty > 0.
    pub fn check(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature {} must be ≥ 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty {} must be > 0",
                self.repetition_penalty
            ));
        }
        Ok(())
    }

    /// Greedy decoding: no randomness at all.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// SplitMix64: a tiny, fixed generator, so that a seed gives the same tokens in every
/// build and version.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks tokens by one [`Sampling`], drawing from its own generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub params: Sampling,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: Sampling) -> Sampler {
        Sampler {
            params,
            rng: Rng::new(params.seed),
        }
    }

    /// The next token after `history` (prompt and generated ids) from `logits`.
    pub fn pick(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = self.params;
        if p.is_greedy() && p.repetition_penalty == 1.0 {
            return argmax(logits).unwrap_or(0) as u32;
        }
        let mut l: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; l.len()];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize) {
                    if !*s {
                        *s = true;
                        let v = &mut l[t as usize];
                        *v = if *v > 0.0 {
                            *v / p.repetition_penalty
                        } else {
                            *v * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.is_greedy() {
            let f: Vec<f32> = l.iter().map(|&x| x as f32).collect();
            return argmax(&f).unwrap_or(0) as u32;
        }
        // Candidates by decreasing logit (ties: lower id first).
        let mut idx: Vec<usize> = (0..l.len()).filter(|&i| !l[i].is_nan()).collect();
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let Some(&top) = idx.first() else { return 0 };
        // Differences first: a tiny temperature gives 0 and -inf exponents, never inf - inf.
        let mut w: Vec<f64> = idx
            .iter()
            .map(|&i| ((l[i] - l[top]) / p.temperature).exp())
            .collect();
        let z: f64 = w.iter().sum();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = w.len();
            for (k, x) in w.iter().enumerate() {
                acc += x / z;
                if acc >= p.top_p {
                    keep = k + 1;
                    break;
                }
            }
            w.truncate(keep);
        }
        let z: f64 = w.iter().sum();
        let mut u = self.rng.next_f64() * z;
        for (k, x) in w.iter().enumerate() {
            if u < *x {
                return idx[k] as u32;
            }
            u -= x;
        }
        idx[w.len() - 1] as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(t: f64, k: usize, p: f64, seed: u64) -> Sampling {
        Sampling {
            temperature: t,
            top_k: k,
            top_p: p,
            repetition_penalty: 1.0,
            seed,
            penalize_prompt: true,
        }
    }

    #[test]
    fn greedy_top1_and_tiny_top_p_are_argmax() {
        let l = [0.5f32, 2.0, 2.0, -1.0];
        for s in [
            Sampling::default(),
            sampling(0.7, 1, 1.0, 3),
            sampling(1.0, 0, 1e-9, 3),
        ] {
            let mut a = Sampler::new(s);
            for _ in 0..50 {
                assert_eq!(a.pick(&l, &[]), 1, "{s:?}");
            }
        }
    }

    #[test]
    fn a_seed_repeats_and_the_draws_follow_the_softmax() {
        let l = [1.0f32, 0.0, 2.0, -0.5];
        let draw = |seed| {
            let mut s = Sampler::new(sampling(1.0, 0, 1.0, seed));
            (0..20000).map(|_| s.pick(&l, &[])).collect::<Vec<_>>()
        };
        let (a, b, c) = (draw(11), draw(11), draw(12));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        for (t, &x) in l.iter().enumerate() {
            let want = (x as f64).exp() / z;
            let got = a.iter().filter(|&&i| i as usize == t).count() as f64 / a.len() as f64;
            assert!((got - want).abs() < 0.015, "token {t}: {got} vs {want}");
        }
        // top_k 2 keeps only tokens 2 and 0; top_p 0.6 keeps only token 2 (p ≈ 0.61).
        let mut s = Sampler::new(sampling(1.0, 2, 1.0, 5));
        assert!((0..2000).all(|_| matches!(s.pick(&l, &[]), 0 | 2)));
        let mut s = Sampler::new(sampling(1.0, 0, 0.6, 5));
        assert!((0..2000).all(|_| s.pick(&l, &[]) == 2));
        // A temperature so small that logit / T overflows still picks the top token.
        let mut s = Sampler::new(sampling(1e-310, 0, 1.0, 5));
        assert!((0..100).all(|_| s.pick(&l, &[]) == 2));
        // Temperature sharpens: at 0.05 the top token wins nearly always.
        let mut s = Sampler::new(sampling(0.05, 0, 1.0, 5));
        assert!((0..2000).filter(|_| s.pick(&l, &[]) == 2).count() > 1990);
    }

    #[test]
    fn repetition_penalty_follows_ctrl() {
        // Token 1 (logit 2.0) is in the history: 2.0 / 4 = 0.5 < 1.0, so greedy picks 0.
        let mut s = Sampler::new(Sampling {
            repetition_penalty: 4.0,
            ..Sampling::default()
        });
        assert_eq!(s.pick(&[1.0, 2.0, -3.0], &[1, 1]), 0);
        // A negative logit is multiplied: -0.1 × 4 = -0.4 < -0.3.
        assert_eq!(s.pick(&[-0.3, -0.1, -9.0], &[1]), 0);
        assert!(Sampling {
            top_p: 0.0,
            ..Sampling::default()
        }
        .check()
        .is_err());
    }
}
