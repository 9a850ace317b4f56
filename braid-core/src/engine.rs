//! The engine: admits requests, schedules every running sequence into one batched forward per step
//! (decodes first, then chunks of waiting prompts up to a token budget), samples, detokenizes and
//! reports. When the KV pool runs out, the newest sequence is preempted and recomputed later, so
//! nothing crashes and nothing is lost.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::time::Instant;

use braid_cache::{
    BlockContents, BlockId, BlockManager, BlockTable, CacheError, KvLayout, KvStorage,
    SnapshotMeta, SnapshotSummary, DEFAULT_BLOCK_SIZE,
};
use braid_models::chat_template::ChatTemplate;
use braid_models::tokenizer::Tokenizer;
use braid_models::{Backend, CudaCacheConfig, CudaModel, LoadedModel, Model, ModelInfo, SeqInput};

use crate::cascade::{self, CascadePolicy};
use crate::detokenizer::{Decode, IncrementalDetokenizer};
use crate::error::EngineError;
use crate::request::{FinishReason, GenerationParams, RequestId, StepEvent};
use crate::sampling::Sampler;
use crate::sequence::Sequence;
use crate::stop::StopChecker;
use braid_kernels::cuda::SamplingRow;

/// Engine sizing.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Tokens the KV pool holds across all sequences; `None` = the model's context window.
    pub kv_cache_tokens: Option<usize>,
    /// Most tokens run in one forward step (long prompts are prefilled in chunks of this size).
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Reuse cached KV of earlier requests' leading tokens (prefix tree and retained outputs).
    pub prefix_caching: bool,
    /// When decode steps read a shared prefix's KV once per group.
    pub cascade: CascadePolicy,
    /// On the GPU, turn each step's tokens into text while the next step computes (see
    /// [`Engine::step`]); off, every step is launched, finished and reported by one call.
    pub overlap_steps: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: DEFAULT_BLOCK_SIZE,
            kv_cache_tokens: None,
            max_batch_tokens: 2048,
            max_running: 64,
            prefix_caching: true,
            cascade: CascadePolicy::Auto,
            overlap_steps: true,
        }
    }
}

/// Counters since the engine started.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub steps: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    /// Prompt tokens whose KV came from the prefix cache instead of being computed.
    pub prefix_hit_tokens: u64,
    /// Decode steps that ran cascade attention.
    pub cascade_steps: u64,
    /// Tokens of KV (per layer) cascade attention did not re-read, summed over steps.
    pub cascade_saved_tokens: u64,
    /// Wall time spent launching the backend's forward passes and waiting for their results
    /// (input upload, compute); the rest is the engine's own host work. With overlapped steps on
    /// the GPU part of that work (the previous step's text) runs while the GPU computes.
    pub forward_seconds: f64,
}

/// Runs forward passes on one backend.
enum Executor {
    Cpu { model: Box<Model>, kv: KvStorage },
    Cuda(Box<CudaModel>),
}

pub struct Engine {
    info: ModelInfo,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    executor: Executor,
    kv: BlockManager,
    config: EngineConfig,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    next_id: RequestId,
    stats: EngineStats,
    /// Finished requests' KV kept for follow-up prompts, oldest first.
    retained: Vec<Retained>,
    /// Block copies (source, destination) the backend must run before the next forward step:
    /// copy-on-write of partly filled blocks shared with a retained output.
    pending_copies: Vec<(u32, u32)>,
    /// The step the last [`Engine::step`] launched.
    in_flight: Option<InFlight>,
    /// Sequences that ended in the step being finished, until their last events are out.
    finishing: Vec<Sequence>,
}

/// A finished request's KV, held by its own block table.
struct Retained {
    id: RequestId,
    /// The tokens whose KV the table holds.
    tokens: Vec<u32>,
    table: BlockTable,
    pinned: bool,
}

/// A retained output as callers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedInfo {
    /// The id of the request that produced it.
    pub id: RequestId,
    /// Tokens whose KV is held (prompt and output, less the last sampled token).
    pub tokens: usize,
    /// Pinned outputs are never dropped to make room.
    pub pinned: bool,
}

struct TokenizerDecode<'a>(&'a Tokenizer);

impl Decode for TokenizerDecode<'_> {
    fn decode(&self, ids: &[u32]) -> String {
        // Decoding valid ids cannot fail; an id the tokenizer does not know decodes to nothing.
        self.0.decode(ids, true).unwrap_or_default()
    }
}

/// What one scheduled sequence produced in a step.
#[derive(Clone, Copy)]
enum Outcome {
    /// A prefill-only request's prompt is computed.
    Prefilled(RequestId),
    /// A new token; whether it is an end-of-sequence token that ends the output, and whether
    /// the output ends with it (end of sequence or length).
    Token {
        id: RequestId,
        token: u32,
        is_eos: bool,
        ends: bool,
    },
}

/// A step launched on the backend and not yet finished: each sequence's id and the tokens it
/// runs, in step order, and the chosen ids when the backend returned them at launch (the CPU
/// backend, or host sampling).
struct InFlight {
    seqs: Vec<(RequestId, usize)>,
    ids: Option<Vec<u32>>,
}

impl Engine {
    pub fn new(model: LoadedModel, config: EngineConfig) -> Result<Self, EngineError> {
        let LoadedModel {
            info,
            backend,
            tokenizer,
            chat_template,
        } = model;
        let c = &info.config;
        if config.block_size == 0 || config.max_batch_tokens == 0 || config.max_running == 0 {
            return Err(EngineError::InvalidConfig(
                "block_size, max_batch_tokens and max_running must all be at least 1".into(),
            ));
        }
        let tokens = config.kv_cache_tokens.unwrap_or(c.max_position_embeddings);
        let layout = KvLayout {
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            block_size: config.block_size,
            num_blocks: tokens.div_ceil(config.block_size).max(1),
        };
        let kv =
            BlockManager::try_new(layout).map_err(|e| EngineError::InvalidConfig(e.to_string()))?;
        let executor = match backend {
            Backend::Cpu(model) => {
                let storage = KvStorage::try_new(layout)
                    .map_err(|e| EngineError::InvalidConfig(e.to_string()))?;
                Executor::Cpu { model, kv: storage }
            }
            Backend::Cuda(mut model) => {
                model.allocate(CudaCacheConfig {
                    num_blocks: layout.num_blocks,
                    block_size: layout.block_size,
                    max_batch_tokens: config.max_batch_tokens,
                    max_seqs: config.max_running,
                    max_seq_len: c
                        .max_position_embeddings
                        .min(layout.num_blocks * layout.block_size),
                })?;
                Executor::Cuda(model)
            }
        };
        tracing::info!(
            blocks = layout.num_blocks,
            tokens = layout.num_blocks * layout.block_size,
            "KV cache allocated"
        );
        Ok(Engine {
            info,
            tokenizer,
            chat_template,
            executor,
            kv,
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            stats: EngineStats::default(),
            retained: Vec::new(),
            pending_copies: Vec::new(),
            in_flight: None,
            finishing: Vec::new(),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// KV blocks held by running or waiting requests, and blocks in the pool. Blocks kept only as
    /// cached prefixes count as free: they are given up when a request needs them.
    pub fn kv_blocks(&self) -> (usize, usize) {
        (
            self.kv.num_total_blocks() - self.kv.num_free_blocks(),
            self.kv.num_total_blocks(),
        )
    }

    /// Requests waiting to be scheduled and requests running.
    pub fn queue_lengths(&self) -> (usize, usize) {
        (self.waiting.len(), self.running.len())
    }

    /// What runs the model, e.g. "cpu" or the GPU's name.
    pub fn device_name(&mut self) -> String {
        match &mut self.executor {
            Executor::Cpu { .. } => format!("cpu ({} threads)", rayon::current_num_threads()),
            Executor::Cuda(model) => model.device_name(),
        }
    }

    /// Bytes held by the weights and by the KV cache, and (on a GPU) the device memory in use.
    pub fn memory_report(&mut self) -> (usize, usize, Option<usize>) {
        match &mut self.executor {
            Executor::Cpu { model, kv } => (
                model.weight_bytes(),
                kv.layout().num_blocks * kv.layout().block_size * kv.layout().bytes_per_token_f32(),
                None,
            ),
            Executor::Cuda(model) => {
                let (weights, kv) = model.memory_bytes();
                (weights, kv, model.device_memory_used())
            }
        }
    }

    /// Tokens the KV pool can hold.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.kv.num_total_blocks() * self.config.block_size
    }

    /// Retained outputs, oldest first.
    pub fn retained(&self) -> Vec<RetainedInfo> {
        self.retained
            .iter()
            .map(|r| RetainedInfo {
                id: r.id,
                tokens: r.tokens.len(),
                pinned: r.pinned,
            })
            .collect()
    }

    /// The tokens whose KV retained output `id` holds.
    pub fn retained_tokens(&self, id: RequestId) -> Option<&[u32]> {
        self.retained
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.tokens.as_slice())
    }

    /// Pin (never drop to make room) or unpin retained output `id`.
    pub fn pin_retained(&mut self, id: RequestId, pinned: bool) -> Result<(), EngineError> {
        let r = self
            .retained
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or_else(|| {
                EngineError::InvalidRequest(format!("there is no retained output with id {id}"))
            })?;
        r.pinned = pinned;
        Ok(())
    }

    /// Let go of retained output `id`; its full blocks stay in the prefix cache until evicted.
    /// Returns whether it existed.
    pub fn release_retained(&mut self, id: RequestId) -> bool {
        match self.retained.iter().position(|r| r.id == id) {
            Some(i) => {
                let mut r = self.retained.remove(i);
                self.kv.release(&mut r.table);
                true
            }
            None => false,
        }
    }

    /// Leading tokens of `prompt` the cache would supply if it were submitted now: cached full
    /// blocks of the prefix tree, or a retained output's tokens. At least one token is always
    /// left to compute.
    pub fn cached_prefix_len(&self, prompt: &[u32]) -> usize {
        if !self.config.prefix_caching {
            return 0;
        }
        let from_tree = self.kv.cached_prefix_len(prompt);
        best_retained(&self.retained, prompt).map_or(from_tree, |(_, len)| len.max(from_tree))
    }

    /// Drop the oldest unpinned retained output to make room; false when there is none.
    fn drop_retained(&mut self) -> bool {
        match self.retained.iter().position(|r| !r.pinned) {
            Some(i) => {
                let mut r = self.retained.remove(i);
                self.kv.release(&mut r.table);
                tracing::debug!(request = r.id, "retained output dropped: KV cache full");
                true
            }
            None => false,
        }
    }

    /// Write every cached full block (token ids and KV) to `path`, replacing it atomically, so a
    /// later engine for the same model and dtype can load it instead of prefilling again.
    pub fn save_prefix_cache(&mut self, path: &Path) -> Result<SnapshotSummary, EngineError> {
        let meta = self.snapshot_meta()?;
        let summary = match &mut self.executor {
            Executor::Cpu { kv, .. } => self.kv.save_snapshot_file(kv, &meta, path),
            Executor::Cuda(model) => self
                .kv
                .save_snapshot_file(&mut GpuBlocks(model), &meta, path),
        };
        summary.map_err(|e| cache_file_error("save", path, e))
    }

    /// Load cached blocks saved by [`Engine::save_prefix_cache`] into free blocks of the pool.
    /// A file for another model, dtype or cache layout, or a damaged one, is refused with the
    /// cache unchanged.
    pub fn load_prefix_cache(&mut self, path: &Path) -> Result<SnapshotSummary, EngineError> {
        let meta = self.snapshot_meta()?;
        let summary = match &mut self.executor {
            Executor::Cpu { kv, .. } => self.kv.load_snapshot_file(kv, &meta, path),
            Executor::Cuda(model) => self
                .kv
                .load_snapshot_file(&mut GpuBlocks(model), &meta, path),
        };
        summary.map_err(|e| cache_file_error("load", path, e))
    }

    fn snapshot_meta(&self) -> Result<SnapshotMeta, EngineError> {
        let dtype = match &self.executor {
            Executor::Cpu { .. } => KvStorage::DTYPE.to_string(),
            Executor::Cuda(model) => model.dtype().name().to_string(),
        };
        let fingerprint =
            crate::fingerprint::model_fingerprint(&self.info, &dtype).map_err(|e| {
                EngineError::CacheFile(format!(
                    "cannot read the model files at {} to fingerprint them: {e}",
                    self.info.path.display()
                ))
            })?;
        Ok(SnapshotMeta { fingerprint, dtype })
    }

    /// Queue a request. Fails at once, with nothing queued, if the prompt cannot ever run.
    pub fn add_request(
        &mut self,
        prompt_ids: Vec<u32>,
        params: GenerationParams,
    ) -> Result<RequestId, EngineError> {
        params.validate().map_err(EngineError::InvalidRequest)?;
        let c = &self.info.config;
        if prompt_ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(&bad) = prompt_ids.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                c.vocab_size
            )));
        }
        let context = c.max_position_embeddings.min(self.kv_capacity_tokens());
        if prompt_ids.len() >= context {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens but at most {} fit (context window {}, KV cache {} tokens), leaving room for one new token",
                prompt_ids.len(),
                context - 1,
                c.max_position_embeddings,
                self.kv_capacity_tokens()
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        let max_total = (prompt_ids.len() + params.max_tokens).min(context);
        self.waiting.push_back(Sequence {
            id,
            prompt_len: prompt_ids.len(),
            detok: IncrementalDetokenizer::new(&prompt_ids),
            tokens: prompt_ids,
            num_computed: 0,
            table: BlockTable::new(),
            sampler: Sampler::new(params.sampling.clone()),
            // An unseeded request gets a random seed of its own.
            seed: params.sampling.seed.unwrap_or_else(|| {
                std::hash::BuildHasher::hash_one(
                    &std::collections::hash_map::RandomState::new(),
                    id,
                )
            }),
            stop: StopChecker::new(params.stop.clone()),
            params,
            max_total,
            finished: None,
            arrived: Instant::now(),
            first_scheduled: None,
            first_token: None,
            last_token: None,
            cached_prompt_tokens: 0,
            preemptions: 0,
        });
        Ok(id)
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || self.in_flight.is_some()
    }

    /// Drop a request wherever it is; its blocks are free for the next step. Unknown ids are ignored.
    pub fn abort(&mut self, id: RequestId) -> Option<StepEvent> {
        let seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            Some(self.running.remove(i))
        } else {
            self.waiting
                .iter()
                .position(|s| s.id == id)
                .and_then(|i| self.waiting.remove(i))
        };
        seq.map(|mut s| {
            self.kv.release(&mut s.table);
            StepEvent {
                request: id,
                token: None,
                text: String::new(),
                finished: Some(FinishReason::Abort),
                metrics: Some(s.metrics()),
            }
        })
    }

    /// Run one batched forward over everything schedulable and report each request's progress.
    ///
    /// On the GPU, steps are pipelined one deep ([`EngineConfig::overlap_steps`]): a call
    /// finishes the step the previous call launched (waits for its tokens and books them),
    /// launches the next one, and turns the finished step's tokens into text and events while
    /// the GPU computes. So a call's events are those of the step it finished, and a sequence
    /// that a stop string ends has one more token computed and dropped; the output is the same
    /// as one step at a time. A step whose tokens are chosen on the host (the CPU backend, a
    /// repetition penalty) is computed as it is launched and reported by the same call.
    pub fn step(&mut self) -> Result<Vec<StepEvent>, EngineError> {
        let outcomes = match self.in_flight.take() {
            Some(step) => self.finish(step)?,
            None => Vec::new(),
        };
        let mut events = self.launch()?;
        events.extend(self.emit(outcomes));
        let overlap = self.config.overlap_steps;
        if let Some(step) = self
            .in_flight
            .take_if(|step| step.ids.is_some() || !overlap)
        {
            self.retire_finished();
            let outcomes = self.finish(step)?;
            events.extend(self.emit(outcomes));
        }
        self.retire_finished();
        self.finishing.clear();
        Ok(events)
    }

    /// Each running sequence's position in `running`, by id.
    fn running_index(&self) -> HashMap<RequestId, usize> {
        self.running
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id, i))
            .collect()
    }

    /// Moves every finished running sequence to `finishing`, its blocks retained or released
    /// (see [`Engine::retire`]), so the next schedule leaves it out and [`Engine::emit`] still
    /// finds it.
    fn retire_finished(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].finished.is_some() {
                let mut s = self.running.remove(i);
                self.retire(&mut s);
                self.finishing.push(s);
            } else {
                i += 1;
            }
        }
    }

    /// Schedules and launches the next step, leaving it in flight; events only for requests
    /// dropped because they can never fit.
    fn launch(&mut self) -> Result<Vec<StepEvent>, EngineError> {
        let mut scheduled = self.schedule();
        for (src, dst) in std::mem::take(&mut self.pending_copies) {
            match &mut self.executor {
                Executor::Cpu { kv, .. } => copy_block_cpu(kv, src, dst),
                Executor::Cuda(model) => model.copy_block(src, dst)?,
            }
        }
        if scheduled.is_empty() {
            return match self.running.is_empty() {
                true => self.drop_unfittable(),
                false => Ok(Vec::new()),
            };
        }
        // Decode-only steps may read shared prefixes once per group (cascade attention); the
        // plan orders each group's members contiguously.
        let mut groups = Vec::new();
        if scheduled.iter().all(|&(_, n)| n == 1) {
            let tables: Vec<&[u32]> = scheduled
                .iter()
                .map(|&(i, _)| self.running[i].table.blocks())
                .collect();
            let computed: Vec<usize> = scheduled
                .iter()
                .map(|&(i, _)| self.running[i].num_computed)
                .collect();
            if let Some(plan) = cascade::plan(
                &tables,
                &computed,
                self.config.block_size,
                self.config.cascade,
            ) {
                scheduled = plan.order.iter().map(|&k| scheduled[k]).collect();
                groups = plan.groups;
                self.stats.cascade_steps += 1;
                self.stats.cascade_saved_tokens += plan.saved_tokens as u64;
            }
        }
        let inputs: Vec<SeqInput<'_>> = scheduled
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                SeqInput {
                    tokens: &s.tokens[s.num_computed..s.num_computed + n],
                    start_pos: s.num_computed,
                    block_table: s.table.blocks(),
                }
            })
            .collect();
        // Which sequences sample this step: those whose last pending token runs now.
        let samples: Vec<bool> = scheduled
            .iter()
            .map(|&(i, n)| self.running[i].pending() == n)
            .collect();
        // The GPU chooses tokens itself (only ids come back) unless a repetition penalty needs the
        // host sampler, which sees the whole history.
        let on_device = scheduled
            .iter()
            .all(|&(i, _)| self.running[i].params.sampling.repetition_penalty == 1.0);
        let all_greedy = scheduled
            .iter()
            .all(|&(i, _)| self.running[i].params.sampling.is_greedy());
        let forward_start = Instant::now();
        let ids = match &mut self.executor {
            Executor::Cuda(model) if on_device => {
                let rows: Option<Vec<SamplingRow>> = (!all_greedy).then(|| {
                    scheduled
                        .iter()
                        .map(|&(i, _)| device_row(&self.running[i]))
                        .collect()
                });
                model.launch_sample(&inputs, &groups, rows.as_deref())?;
                None
            }
            executor => {
                let logits = match executor {
                    Executor::Cpu { model, kv } => model.forward(&inputs, &groups, kv)?,
                    Executor::Cuda(model) => model.forward_logits(&inputs, &groups)?,
                };
                let mut ids = Vec::with_capacity(logits.len());
                for ((&(i, _), mut logits), &samples) in scheduled.iter().zip(logits).zip(&samples)
                {
                    let seq = &mut self.running[i];
                    ids.push(if samples {
                        seq.sampler.sample(&mut logits, &seq.tokens)
                    } else {
                        0
                    });
                }
                Some(ids)
            }
        };
        self.stats.forward_seconds += forward_start.elapsed().as_secs_f64();
        self.in_flight = Some(InFlight {
            seqs: scheduled
                .iter()
                .map(|&(i, n)| (self.running[i].id, n))
                .collect(),
            ids,
        });
        Ok(Vec::new())
    }

    /// Waits for the step in flight and books what each of its sequences produced, in step
    /// order. Sequences that end here (end of sequence, length, prefill only) leave `running`
    /// at once, their blocks released or retained before the next step is scheduled; their text
    /// comes in [`Engine::emit`]. A sequence no longer running (aborted, or ended by a stop
    /// string after this step was launched) drops its token.
    fn finish(&mut self, step: InFlight) -> Result<Vec<Outcome>, EngineError> {
        let wait_start = Instant::now();
        let sampled = match step.ids {
            Some(ids) => ids,
            None => match &mut self.executor {
                Executor::Cuda(model) => model.sampled(step.seqs.len())?,
                Executor::Cpu { .. } => unreachable!("the CPU backend returns its ids at launch"),
            },
        };
        self.stats.steps += 1;
        self.stats.forward_seconds += wait_start.elapsed().as_secs_f64();

        let index = self.running_index();
        let eos = self.tokenizer.eos_ids();
        let bs = self.config.block_size;
        let mut outcomes = Vec::with_capacity(step.seqs.len());
        for (&(id, n), token) in step.seqs.iter().zip(sampled) {
            let Some(&i) = index.get(&id) else {
                continue;
            };
            let seq = &mut self.running[i];
            if seq.num_computed < seq.prompt_len {
                self.stats.prompt_tokens += n.min(seq.prompt_len - seq.num_computed) as u64;
            }
            seq.num_computed += n;
            BlockManager::set_len(&mut seq.table, seq.num_computed);
            // Full blocks become reusable prefixes for later requests (and for this one after a
            // preemption) as soon as their KV exists. Committing walks the whole table, so it runs
            // only on the steps that fill a block.
            if self.config.prefix_caching && seq.num_computed / bs > (seq.num_computed - n) / bs {
                self.kv.commit(&mut seq.table, &seq.tokens);
            }
            if seq.pending() > 0 {
                continue; // a prompt chunk; the prompt's last chunk samples
            }
            if seq.params.max_tokens == 0 {
                // Prefill only: the prompt's KV is computed and cached; nothing is generated.
                seq.finished = Some(FinishReason::Length);
                outcomes.push(Outcome::Prefilled(id));
                continue;
            }
            seq.tokens.push(token);
            let now = Instant::now();
            seq.first_token.get_or_insert(now);
            seq.last_token = Some(now);
            self.stats.generated_tokens += 1;
            let is_eos = !seq.params.ignore_eos && eos.contains(&token);
            let ends = is_eos
                || seq.num_generated() >= seq.params.max_tokens
                || seq.tokens.len() >= seq.max_total;
            if ends {
                seq.finished = Some(if is_eos {
                    FinishReason::Stop
                } else {
                    FinishReason::Length
                });
            }
            outcomes.push(Outcome::Token {
                id,
                token,
                is_eos,
                ends,
            });
        }
        self.retire_finished();
        Ok(outcomes)
    }

    /// Text, stop strings and events for a finished step's outcomes, in step order. Each new
    /// token is detokenized here, one sequence after another: on a 16-core H100 host a thread
    /// pool over 256 sequences took longer (≈0.15 ms a step) than this loop (≈0.13 ms) once its
    /// wake-ups were counted; pipelining hides it behind the next step instead.
    fn emit(&mut self, outcomes: Vec<Outcome>) -> Vec<StepEvent> {
        let decoder = TokenizerDecode(&self.tokenizer);
        let index = self.running_index();
        let mut events = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            let id = match outcome {
                Outcome::Prefilled(id) | Outcome::Token { id, .. } => id,
            };
            // Still running, ended in `finish`, or preempted by the step launched since.
            let seq = match index.get(&id) {
                Some(&i) => &mut self.running[i],
                None => match self.finishing.iter_mut().find(|s| s.id == id) {
                    Some(s) => s,
                    None => match self.waiting.iter_mut().find(|s| s.id == id) {
                        Some(s) => s,
                        None => continue,
                    },
                },
            };
            let (token, is_eos, ends) = match outcome {
                Outcome::Prefilled(_) => {
                    events.push(StepEvent {
                        request: seq.id,
                        token: None,
                        text: String::new(),
                        finished: seq.finished,
                        metrics: Some(seq.metrics()),
                    });
                    continue;
                }
                Outcome::Token {
                    token,
                    is_eos,
                    ends,
                    ..
                } => (token, is_eos, ends),
            };
            let mut text = String::new();
            let mut stopped = false;
            if !is_eos {
                let piece = seq.detok.push(&decoder, token);
                let decision = seq.stop.push(&piece);
                if decision.is_stop() {
                    seq.finished = Some(FinishReason::Stop);
                    stopped = true;
                }
                text = decision.emit;
            }
            if ends && !stopped {
                // End of output: release text held back for a possible split character or stop string.
                let tail = seq.stop.push(&seq.detok.flush(&decoder));
                if tail.is_stop() {
                    seq.finished = Some(FinishReason::Stop);
                }
                text.push_str(&tail.emit);
                text.push_str(&seq.stop.flush());
            }
            let metrics = seq.finished.map(|_| seq.metrics());
            events.push(StepEvent {
                request: seq.id,
                token: Some(token),
                text,
                finished: seq.finished,
                metrics,
            });
        }
        events
    }

    /// Ends a sequence that left `running`: its blocks kept as a retained output of its computed
    /// tokens, or released. The sequence keeps what its last events need (text state, metrics).
    fn retire(&mut self, s: &mut Sequence) {
        let mut table = std::mem::take(&mut s.table);
        if s.params.retain {
            let tokens = &s.tokens[..s.num_computed];
            if self.config.prefix_caching {
                self.kv.commit(&mut table, tokens);
            }
            self.retained.push(Retained {
                id: s.id,
                tokens: tokens.to_vec(),
                table,
                pinned: false,
            });
        } else {
            self.kv.release(&mut table);
        }
    }

    /// Choose (running index, tokens to run) pairs for this step, reserving their KV blocks.
    fn schedule(&mut self) -> Vec<(usize, usize)> {
        let mut budget = self.config.max_batch_tokens;
        let mut scheduled = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let n = self.running[i].pending().min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            loop {
                let s = &mut self.running[i];
                if self.kv.reserve(&mut s.table, s.num_computed + n).is_ok() {
                    scheduled.push((i, n));
                    budget -= n;
                    break;
                }
                // Out of blocks: drop an idle retained output, else preempt the newest sequence
                // (possibly this one), and retry.
                if self.drop_retained() {
                    continue;
                }
                let victim = self.running.len() - 1;
                self.preempt(victim);
                if victim == i {
                    break;
                }
            }
            i += 1;
        }
        while budget > 0 && self.running.len() < self.config.max_running {
            let Some(s) = self.waiting.front_mut() else {
                break;
            };
            // Exact prefix reuse: take the longest run of cached full blocks holding this
            // sequence's leading tokens, or a retained output's tokens if it covers more, and
            // compute only the rest.
            let mut copy = None;
            let hit = if s.table.blocks().is_empty() && self.config.prefix_caching {
                let tree = self.kv.match_prefix(&mut s.table, &s.tokens);
                match best_retained(&self.retained, &s.tokens) {
                    Some((r, len)) if len > tree => {
                        self.kv.release(&mut s.table);
                        s.table = self.kv.fork_prefix(&self.retained[r].table, len);
                        // The last shared block may be partly filled: give this sequence its
                        // own copy before it writes there.
                        match self.kv.prepare_append(&mut s.table) {
                            Ok(c) => copy = c,
                            Err(_) => {
                                self.kv.release(&mut s.table);
                                break;
                            }
                        }
                        len
                    }
                    _ => tree,
                }
            } else {
                0
            };
            s.num_computed += hit;
            let n = s.pending().min(budget);
            let admitted = loop {
                let s = self.waiting.front_mut().expect("checked above");
                if self.kv.reserve(&mut s.table, s.num_computed + n).is_ok() {
                    break true;
                }
                if !self.drop_retained() {
                    break false;
                }
            };
            let s = self.waiting.front_mut().expect("checked above");
            if !admitted {
                // Not admitted: hand the matched blocks back so they stay evictable.
                self.kv.release(&mut s.table);
                s.num_computed = 0;
                break;
            }
            self.pending_copies.extend(copy);
            self.stats.prefix_hit_tokens += hit as u64;
            if s.first_scheduled.is_none() {
                s.cached_prompt_tokens = hit.min(s.prompt_len);
                s.first_scheduled = Some(Instant::now());
            }
            let Some(s) = self.waiting.pop_front() else {
                break;
            };
            self.running.push(s);
            scheduled.push((self.running.len() - 1, n));
            budget -= n;
        }
        scheduled
    }

    /// Nothing runs, yet the next waiting request could not be admitted: only pinned outputs hold
    /// the pool, so it would wait forever. Drop it with an error naming the shortfall.
    fn drop_unfittable(&mut self) -> Result<Vec<StepEvent>, EngineError> {
        let Some(mut s) = self.waiting.pop_front() else {
            return Ok(Vec::new());
        };
        self.kv.release(&mut s.table);
        let needed = self
            .kv
            .layout()
            .blocks_for_tokens(s.pending().min(self.config.max_batch_tokens) + s.num_computed);
        Err(EngineError::CacheHeld {
            request: s.id,
            needed,
            available: self.kv.num_free_blocks(),
        })
    }

    /// Free a running sequence's blocks and send it back to the front of the queue; it will be
    /// recomputed from its tokens, with its sampler state intact, so its output does not change.
    fn preempt(&mut self, index: usize) {
        let mut s = self.running.remove(index);
        self.kv.release(&mut s.table);
        s.num_computed = 0;
        s.preemptions += 1;
        self.stats.preemptions += 1;
        tracing::debug!(request = s.id, "preempted: KV cache full");
        self.waiting.push_front(s);
    }
}

/// The retained output sharing the longest run of leading tokens with `prompt` (leaving at least
/// one token to compute), and that length; the newest wins a tie.
fn best_retained(retained: &[Retained], prompt: &[u32]) -> Option<(usize, usize)> {
    let limit = prompt.len().saturating_sub(1);
    retained
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let common = r
                .tokens
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count();
            (i, common.min(limit))
        })
        .filter(|&(_, len)| len > 0)
        .max_by_key(|&(i, len)| (len, i))
}

/// The GPU's KV blocks as the cache snapshot reads and writes them.
struct GpuBlocks<'a>(&'a mut CudaModel);

impl BlockContents for GpuBlocks<'_> {
    fn block_bytes(&self) -> usize {
        self.0.block_bytes()
    }

    fn read_block(&mut self, id: BlockId, out: &mut [u8]) -> Result<(), CacheError> {
        self.0.read_block(id, out).map_err(|e| CacheError::Backend {
            message: e.to_string(),
        })
    }

    fn write_block(&mut self, id: BlockId, data: &[u8]) -> Result<(), CacheError> {
        self.0
            .write_block(id, data)
            .map_err(|e| CacheError::Backend {
                message: e.to_string(),
            })
    }
}

fn cache_file_error(action: &str, path: &Path, e: CacheError) -> EngineError {
    EngineError::CacheFile(format!(
        "cannot {action} the prefix cache file {}: {e}",
        path.display()
    ))
}

/// Copy one block's keys and values, in every layer, within the CPU cache.
fn copy_block_cpu(kv: &mut KvStorage, src: u32, dst: u32) {
    let layout = *kv.layout();
    let elems = layout.block_size * layout.kv_dim();
    let (src, dst) = (src as usize * elems, dst as usize * elems);
    for l in 0..layout.num_layers {
        let (k, v) = kv.layer_mut(l);
        k.copy_within(src..src + elems, dst);
        v.copy_within(src..src + elems, dst);
    }
}

/// A sequence's sampling parameters as the GPU sampler reads them. The draw is a function of the
/// seed and the number of tokens generated, so a preempted and recomputed sequence draws the same.
fn device_row(seq: &Sequence) -> SamplingRow {
    let p = &seq.params.sampling;
    SamplingRow {
        temperature: p.temperature,
        top_k: p.top_k.min(u32::MAX as usize) as u32,
        top_p: p.top_p,
        min_p: p.min_p,
        seed: seq.seed,
        step: seq.num_generated() as u64,
    }
}
