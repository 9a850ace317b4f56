//! What a caller asks for and what the engine reports back.

use serde::Serialize;

use crate::sampling::SamplingParams;

pub type RequestId = u64;

/// How to generate, beyond the prompt.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    /// Most tokens to generate (the context window may end generation sooner).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Keep generating past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Keep the request's KV (prompt and generated tokens) after it finishes, as a retained
    /// output under the request's id, so a follow-up prompt that starts with those tokens
    /// computes only what is new (see [`crate::Engine::retained`]).
    pub retain: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            retain: false,
        }
    }
}

impl GenerationParams {
    /// Greedy decoding of exactly `max_tokens` tokens, end-of-sequence tokens ignored: the
    /// requests of benchmarks and of comparisons against reference outputs.
    pub fn greedy_exact(max_tokens: usize) -> Self {
        GenerationParams {
            max_tokens,
            sampling: SamplingParams::greedy(),
            ignore_eos: true,
            ..GenerationParams::default()
        }
    }

    /// Check every field, returning one sentence about the first bad one. `max_tokens` 0 is
    /// valid: the request only computes (and caches) its prompt's KV.
    pub fn validate(&self) -> Result<(), String> {
        if self.stop.iter().any(String::is_empty) {
            return Err("stop strings must not be empty".into());
        }
        self.sampling.validate()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// max_tokens or the context window was reached.
    Length,
    /// An end-of-sequence token or a stop string.
    Stop,
    /// The caller aborted the request.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Abort => "abort",
        }
    }
}

/// One request's progress in one engine step.
#[derive(Debug, Clone)]
pub struct StepEvent {
    pub request: RequestId,
    /// The token sampled this step (absent when the step only advanced a chunked prefill or the
    /// request ended without a new token).
    pub token: Option<u32>,
    /// Text that became final this step (may be empty while a character or stop string is pending).
    pub text: String,
    pub finished: Option<FinishReason>,
    /// Set on the event that finishes the request.
    pub metrics: Option<RequestMetrics>,
}

/// What one request cost, reported when it finishes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RequestMetrics {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Arrival to first scheduling.
    pub queue_s: f64,
    /// Arrival to the first generated token.
    pub time_to_first_token_s: f64,
    /// Mean time between generated tokens after the first.
    pub mean_inter_token_s: f64,
    /// Times the request was preempted and recomputed.
    pub preemptions: u32,
}
