//! A request in flight: its tokens, KV blocks, sampler and text state.

use braid_cache::BlockTable;

use crate::detokenizer::IncrementalDetokenizer;
use crate::request::{FinishReason, GenerationParams, RequestId};
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
}

impl Sequence {
    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to be run through the model before the next sample.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}
