//! Token sampling for one sequence: repetition penalty, temperature, top-k, top-p and min-p over
//! one position's logits, drawn with a seedable PRNG whose output is the same on every platform.
//!
//! The processors follow Hugging Face transformers' logits processors and run in its order:
//! repetition penalty, temperature, top-k, top-p, min-p, then a draw from the softmax. Greedy
//! decoding is the argmax after the repetition penalty, ties going to the lowest id.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Temperatures below this decode greedily: dividing logits by them would overflow f32.
const MIN_TEMPERATURE: f32 = 1e-5;

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 (or anything below 1e-5) means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 turns the filter off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability sums to at least `top_p`; 1 turns it off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 turns it off.
    pub min_p: f32,
    /// CTRL-style penalty on every token already in the history; 1 turns it off.
    pub repetition_penalty: f32,
    /// Seed for reproducible sampling; `None` seeds from the operating system's entropy.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// Plain sampling from the model's distribution: temperature 1 and every filter off.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), every filter off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether these parameters decode greedily.
    pub fn is_greedy(&self) -> bool {
        self.temperature < MIN_TEMPERATURE
    }

    /// Checks every field's range; the error is one sentence naming the field, the range and the value.
    pub fn validate(&self) -> Result<(), String> {
        // Written as positive range checks so that NaN fails every one of them.
        if !(0.0..=100.0).contains(&self.temperature) {
            return Err(format!(
                "temperature must be between 0 and 100, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!(
                "top_p must be greater than 0 and at most 1, got {}",
                self.top_p
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be between 0 and 1, got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be a positive finite number, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Picks tokens for one sequence; owns that sequence's random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro256StarStar,
    /// Marks ids already penalised this step, so repeated history ids are penalised once.
    seen: Vec<bool>,
    /// Scratch for top-k's selection and top-p's sort, kept to avoid a vocabulary-sized allocation per token.
    scratch_values: Vec<f32>,
    scratch_ids: Vec<u32>,
}

impl Sampler {
    /// A sampler for `params`, seeded from `params.seed` or, without one, from fresh entropy.
    ///
    /// `params` should have passed [`SamplingParams::validate`]; out-of-range values are not rejected
    /// here but behave as the nearest sensible setting (a filter that removes nothing, or greedy).
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(entropy_seed);
        Self {
            params,
            rng: Xoshiro256StarStar::seed_from_u64(seed),
            seen: Vec::new(),
            scratch_values: Vec::new(),
            scratch_ids: Vec::new(),
        }
    }

    /// The parameters this sampler applies.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` of one position; `history` = prompt + generated ids,
    /// for the repetition penalty.
    ///
    /// `logits` is modified in place (it ends holding the processed scores, removed tokens at
    /// negative infinity). NaN logits are never picked; history ids outside the vocabulary are
    /// ignored. Empty logits give id 0.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        for x in logits.iter_mut() {
            if x.is_nan() {
                *x = f32::NEG_INFINITY;
            }
        }
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, history, p.repetition_penalty, &mut self.seen);
        }
        if p.is_greedy() {
            return argmax(logits);
        }
        if p.temperature != 1.0 {
            for x in logits.iter_mut() {
                *x /= p.temperature;
            }
        }
        if p.top_k > 0 {
            apply_top_k(logits, p.top_k, &mut self.scratch_values);
        }
        if p.top_p < 1.0 {
            apply_top_p(logits, p.top_p, &mut self.scratch_ids);
        }
        if p.min_p > 0.0 {
            apply_min_p(logits, p.min_p);
        }
        draw_from_softmax(logits, self.rng.next_f64())
    }
}

/// CTRL-style penalty: a logit below zero is multiplied by `penalty`, one above is divided, once
/// per distinct id in `history`.
fn apply_repetition_penalty(
    logits: &mut [f32],
    history: &[u32],
    penalty: f32,
    seen: &mut Vec<bool>,
) {
    if seen.len() < logits.len() {
        seen.resize(logits.len(), false);
    }
    for &id in history {
        let i = id as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let x = &mut logits[i];
            *x = if *x < 0.0 { *x * penalty } else { *x / penalty };
        }
    }
    // Unmark only what was marked, so a step costs O(history) rather than O(vocabulary).
    for &id in history {
        if let Some(mark) = seen.get_mut(id as usize) {
            *mark = false;
        }
    }
}

/// Index of the largest logit, the lowest index among equals.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Removes every logit below the `k`-th largest; like transformers, ties with the `k`-th are kept.
fn apply_top_k(logits: &mut [f32], k: usize, scratch: &mut Vec<f32>) {
    if k >= logits.len() {
        return;
    }
    scratch.clear();
    scratch.extend_from_slice(logits);
    let (_, &mut threshold, _) = scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    for x in logits.iter_mut() {
        if *x < threshold {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Keeps the smallest set of most likely tokens whose probability reaches `top_p` (at least one).
fn apply_top_p(logits: &mut [f32], top_p: f32, order: &mut Vec<u32>) {
    order.clear();
    order.extend((0..logits.len() as u32).filter(|&i| logits[i as usize] > f32::NEG_INFINITY));
    if order.is_empty() {
        return;
    }
    // Stable sort over ascending ids: equal logits keep the lower id first.
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    let max = logits[order[0] as usize];
    let total: f64 = order
        .iter()
        .map(|&i| f64::from(logits[i as usize] - max).exp())
        .sum();
    let target = f64::from(top_p) * total;
    let mut mass_before = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        // A token stays while the more likely ones before it have not yet reached top_p.
        if rank > 0 && mass_before >= target {
            logits[i as usize] = f32::NEG_INFINITY;
        } else {
            mass_before += f64::from(logits[i as usize] - max).exp();
        }
    }
}

/// Removes tokens whose probability is below `min_p` times the top token's.
fn apply_min_p(logits: &mut [f32], min_p: f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    for x in logits.iter_mut() {
        // p / p_max = exp(x - max); the top token has ratio 1 and always survives.
        if f64::from(*x - max).exp() < f64::from(min_p) {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Draws an index from softmax(`logits`) using `u` uniform in [0, 1).
fn draw_from_softmax(logits: &[f32], u: f64) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max.is_infinite() {
        // Nothing finite to weigh (all removed), or an infinite logit that takes all the mass.
        return argmax(logits);
    }
    let weight = |x: f32| {
        if x == f32::NEG_INFINITY {
            0.0
        } else {
            f64::from(x - max).exp()
        }
    };
    let total: f64 = logits.iter().map(|&x| weight(x)).sum();
    let target = u * total;
    let mut cumulative = 0.0;
    let mut last_candidate = 0;
    for (i, &x) in logits.iter().enumerate() {
        let w = weight(x);
        if w > 0.0 {
            cumulative += w;
            last_candidate = i;
            if target < cumulative {
                return i as u32;
            }
        }
    }
    // Rounding left `target` at the very top of the range: the last candidate owns it.
    last_candidate as u32
}

/// A seed for samplers without one: differs between samplers and between runs.
fn entropy_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(since_epoch) = SystemTime::now().duration_since(UNIX_EPOCH) {
        hasher.write_u128(since_epoch.as_nanos());
    }
    hasher.finish()
}

/// xoshiro256** (Blackman and Vigna), seeded through splitmix64: small, fast, and bit-identical
/// everywhere, so a seeded request gives the same tokens on any machine.
#[derive(Debug, Clone)]
struct Xoshiro256StarStar {
    s: [u64; 4],
}

impl Xoshiro256StarStar {
    fn seed_from_u64(seed: u64) -> Self {
        let mut state = seed;
        Self {
            s: std::array::from_fn(|_| splitmix64(&mut state)),
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEG_INF: f32 = f32::NEG_INFINITY;

    fn ln(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn kept(logits: &[f32]) -> Vec<usize> {
        logits
            .iter()
            .enumerate()
            .filter(|(_, &x)| x > NEG_INF)
            .map(|(i, _)| i)
            .collect()
    }

    fn frequencies(params: SamplingParams, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut sampler = Sampler::new(params);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            let id = sampler.sample(&mut logits.to_vec(), &[]);
            counts[id as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    #[test]
    fn prng_matches_reference_outputs() {
        // Reference values of the published algorithms.
        let mut state = 0;
        assert_eq!(splitmix64(&mut state), 0xE220_A839_7B1D_CDAF);
        let mut rng = Xoshiro256StarStar { s: [1, 2, 3, 4] };
        let outputs: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert_eq!(outputs, [11520, 0, 1509978240, 1215971899390074240]);
        let u = Xoshiro256StarStar::seed_from_u64(1).next_f64();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn validate_names_field_and_value() {
        assert_eq!(SamplingParams::default().validate(), Ok(()));
        assert_eq!(SamplingParams::greedy().validate(), Ok(()));
        let bad = SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        };
        assert_eq!(
            bad.validate(),
            Err("temperature must be between 0 and 100, got -1".to_string())
        );
        let bad = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        };
        assert_eq!(
            bad.validate(),
            Err("top_p must be greater than 0 and at most 1, got 0".to_string())
        );
        let bad = SamplingParams {
            min_p: 1.5,
            ..SamplingParams::default()
        };
        assert_eq!(
            bad.validate(),
            Err("min_p must be between 0 and 1, got 1.5".to_string())
        );
        let bad = SamplingParams {
            repetition_penalty: 0.0,
            ..SamplingParams::default()
        };
        assert!(bad
            .validate()
            .is_err_and(|e| e.starts_with("repetition_penalty must be")));
        let bad = SamplingParams {
            temperature: f32::NAN,
            ..SamplingParams::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn greedy_takes_argmax_lowest_id_on_ties() {
        let mut sampler = Sampler::new(SamplingParams::greedy());
        assert_eq!(sampler.sample(&mut [0.1, 3.0, -2.0, 2.9], &[]), 1);
        assert_eq!(sampler.sample(&mut [1.0, 5.0, 5.0, 5.0], &[]), 1);
        assert_eq!(sampler.sample(&mut [f32::NAN, 1.0, f32::NAN], &[]), 1);
        assert_eq!(sampler.sample(&mut [NEG_INF, NEG_INF], &[]), 0);
        assert_eq!(sampler.sample(&mut [], &[]), 0);
    }

    #[test]
    fn repetition_penalty_divides_positive_multiplies_negative_once_per_id() {
        let mut logits = vec![2.0, 1.9, -1.0, 0.5];
        apply_repetition_penalty(&mut logits, &[0, 2, 0, 0, 2, 99], 2.0, &mut Vec::new());
        assert_eq!(logits, vec![1.0, 1.9, -2.0, 0.5]);

        // The penalty runs before greedy's argmax.
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut sampler = Sampler::new(params);
        assert_eq!(sampler.sample(&mut [2.0, 1.9, -1.0], &[0]), 1);
        assert_eq!(
            sampler.sample(&mut [2.0, 1.9, -1.0], &[]),
            0,
            "scratch marks are cleared between steps"
        );
    }

    #[test]
    fn temperature_divides_logits() {
        let params = SamplingParams {
            temperature: 2.0,
            seed: Some(1),
            ..SamplingParams::default()
        };
        let mut logits = vec![1.0, -3.0, 4.0];
        Sampler::new(params).sample(&mut logits, &[]);
        assert_eq!(logits, vec![0.5, -1.5, 2.0]);
    }

    #[test]
    fn top_k_keeps_k_largest_and_ties_at_threshold() {
        let mut logits = vec![1.0, 5.0, 3.0, 4.0, 2.0];
        apply_top_k(&mut logits, 2, &mut Vec::new());
        assert_eq!(kept(&logits), vec![1, 3]);

        let mut logits = vec![1.0, 3.0, 3.0, 0.0];
        apply_top_k(&mut logits, 1, &mut Vec::new());
        assert_eq!(
            kept(&logits),
            vec![1, 2],
            "ties with the k-th value survive, as in transformers"
        );

        let mut logits = vec![1.0, 2.0];
        apply_top_k(&mut logits, 5, &mut Vec::new());
        assert_eq!(kept(&logits), vec![0, 1]);
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        let probs = [0.15, 0.5, 0.05, 0.3];
        let run = |top_p: f32| {
            let mut logits = ln(&probs);
            apply_top_p(&mut logits, top_p, &mut Vec::new());
            kept(&logits)
        };
        assert_eq!(run(0.1), vec![1], "always keeps the top token");
        assert_eq!(run(0.45), vec![1]);
        assert_eq!(run(0.75), vec![1, 3]);
        assert_eq!(run(0.9), vec![0, 1, 3]);
        assert_eq!(run(0.99), vec![0, 1, 2, 3]);
    }

    #[test]
    fn min_p_drops_tokens_below_fraction_of_top() {
        let probs = [0.15, 0.5, 0.05, 0.3];
        let run = |min_p: f32| {
            let mut logits = ln(&probs);
            apply_min_p(&mut logits, min_p);
            kept(&logits)
        };
        assert_eq!(run(0.2), vec![0, 1, 3]);
        assert_eq!(run(0.5), vec![1, 3]);
        assert_eq!(run(1.0), vec![1]);
    }

    #[test]
    fn filters_run_in_order_top_k_before_top_p() {
        // After top-k keeps {0.4, 0.3}, renormalised 0.57 already reaches top_p = 0.5, so only id 0
        // survives; top-p on the raw distribution would have kept two tokens.
        let params = SamplingParams {
            top_k: 2,
            top_p: 0.5,
            seed: Some(3),
            ..SamplingParams::default()
        };
        let freq = frequencies(params, &ln(&[0.4, 0.3, 0.2, 0.1]), 300);
        assert_eq!(freq, vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            seed: Some(42),
            ..SamplingParams::default()
        };
        let run = |params: SamplingParams| {
            let mut sampler = Sampler::new(params);
            (0..200)
                .map(|_| sampler.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(params.clone()), run(params.clone()));
        assert_ne!(
            run(params),
            run(SamplingParams {
                seed: Some(43),
                ..SamplingParams::default()
            })
        );
        // Unseeded samplers draw fresh entropy each.
        assert_ne!(
            run(SamplingParams::default()),
            run(SamplingParams::default())
        );
    }

    #[test]
    fn empirical_distribution_matches_softmax() {
        let probs = [0.1, 0.2, 0.3, 0.4];
        let params = SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        };
        for (got, want) in frequencies(params, &ln(&probs), 20_000).iter().zip(probs) {
            assert!(
                (got - f64::from(want)).abs() < 0.015,
                "frequency {got} for probability {want}"
            );
        }

        // Temperature 0.5 squares the probabilities before renormalising.
        let params = SamplingParams {
            temperature: 0.5,
            seed: Some(8),
            ..SamplingParams::default()
        };
        let total: f32 = probs.iter().map(|p| p * p).sum();
        for (got, p) in frequencies(params, &ln(&probs), 20_000).iter().zip(probs) {
            let want = f64::from(p * p / total);
            assert!(
                (got - want).abs() < 0.015,
                "frequency {got} for probability {want}"
            );
        }
    }
}
