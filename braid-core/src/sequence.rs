//! A request in flight: its tokens, KV blocks, sampler and text state.

use std::time::Instant;

use braid_cache::BlockTable;

use crate::detokenizer::IncrementalDetokenizer;
use crate::request::{FinishReason, GenerationParams, RequestId, RequestMetrics};
use crate::sampling::Sampler;
use crate::stop::StopChecker;

pub(crate) struct Sequence {
    pub id: RequestId,
    /// Prompt followed by every generated token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    pub num_computed: usize,
    pub table: BlockTable,
    pub params: GenerationParams,
    pub sampler: Sampler,
    /// Seed of the GPU sampler's random stream (the request's seed, or a random one).
    pub seed: u64,
    pub detok: IncrementalDetokenizer,
    pub stop: StopChecker,
    /// Generation may not run past this many tokens in total (prompt + output).
    pub max_total: usize,
    pub finished: Option<FinishReason>,
    pub arrived: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
    pub cached_prompt_tokens: usize,
    pub preemptions: u32,
}

impl Sequence {
    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// The request's costs so far (complete once it has finished).
    pub fn metrics(&self) -> RequestMetrics {
        let since = |t: Option<Instant>| t.map_or(0.0, |t| (t - self.arrived).as_secs_f64());
        let decode_s = match (self.first_token, self.last_token) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        let gaps = self.num_generated().saturating_sub(1);
        RequestMetrics {
            prompt_tokens: self.prompt_len,
            cached_prompt_tokens: self.cached_prompt_tokens,
            generated_tokens: self.num_generated(),
            queue_s: since(self.first_scheduled),
            time_to_first_token_s: since(self.first_token),
            mean_inter_token_s: if gaps > 0 {
                decode_s / gaps as f64
            } else {
                0.0
            },
            preemptions: self.preemptions,
        }
    }

    /// Tokens still to be run through the model before the next sample.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}
