//! Chunks: named pieces of prompt text (a system prompt, context documents, a query, an earlier
//! output) composed into one prompt through the model's chat template, with statistics on how
//! much of each chunk's KV the cache supplied.
//!
//! A chunk's id is a hash of its role and its text's tokens, so registering the same text twice
//! gives the same chunk. A prompt is composed by rendering the whole conversation through the chat
//! template once and tokenizing it once; each chunk's tokens are then located inside that prompt.
//! Reuse is exact because it goes through the engine's prefix cache: a chunk's KV depends on
//! every token before it, so a cached chunk placed after a different prefix is computed again,
//! and the statistics say so.
//!
//! ```no_run
//! use braid_core::{Braid, ChunkRole, ChunkStore, GenerationParams, Prompt};
//!
//! let mut braid = Braid::load("smollm2-135m")?;
//! let mut chunks = ChunkStore::new();
//! let system = chunks.register(braid.engine(), ChunkRole::System, "Answer in one sentence.")?;
//! let manual = chunks.register(braid.engine(), ChunkRole::Context, "The reset button is red.")?;
//! let query = chunks.register(braid.engine(), ChunkRole::Query, "How do I reset it?")?;
//! let prompt = chunks.compose(braid.engine(), Some(system), &[manual], query)?;
//! println!("{} tokens, {} cached", prompt.tokens.len(), chunks.preview(braid.engine(), &prompt).cached_tokens);
//! let out = braid.generate(Prompt::Ids(prompt.tokens.clone()), &GenerationParams::default())?;
//! chunks.record_use(&prompt, out.timings.cached_prompt_tokens);
//! println!("{} (hit rate {:.0}%)", out.text, 100.0 * chunks.stats().hit_rate());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use braid_models::chat_template::{ChatMessage, ChatTemplate};
use braid_models::tokenizer::Tokenizer;
use braid_models::ModelError;

use crate::engine::Engine;

/// How many earlier prefixes a chunk remembers having been computed after.
const REMEMBERED_PREFIXES: usize = 16;

/// Joins the contexts and the query of one user message.
pub(crate) const PART_SEPARATOR: &str = "\n\n";

/// What a chunk is for; it decides where the chunk goes in a composed prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChunkRole {
    /// The system prompt.
    System,
    /// A document the query is about; goes in the user's message, before the query.
    Context,
    /// The user's question.
    Query,
    /// A model's answer; usable as context for a later query.
    Output,
}

impl ChunkRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkRole::System => "system",
            ChunkRole::Context => "context",
            ChunkRole::Query => "query",
            ChunkRole::Output => "output",
        }
    }
}

impl fmt::Display for ChunkRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ChunkRole {
    type Err = ChunkError;

    fn from_str(s: &str) -> Result<Self, ChunkError> {
        match s {
            "system" => Ok(ChunkRole::System),
            "context" => Ok(ChunkRole::Context),
            "query" => Ok(ChunkRole::Query),
            "output" => Ok(ChunkRole::Output),
            other => Err(ChunkError::UnknownRole(other.to_string())),
        }
    }
}

/// A chunk's id: a 128-bit hash of its role and tokens, written as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(u128);

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl FromStr for ChunkId {
    type Err = ChunkError;

    fn from_str(s: &str) -> Result<Self, ChunkError> {
        if s.len() != 32 {
            return Err(ChunkError::BadId(s.to_string()));
        }
        u128::from_str_radix(s, 16)
            .map(ChunkId)
            .map_err(|_| ChunkError::BadId(s.to_string()))
    }
}

/// One registered chunk.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub id: ChunkId,
    pub role: ChunkRole,
    pub text: String,
    /// The text's own tokens (no special tokens added); the id is their hash.
    pub tokens: Vec<u32>,
    pub metadata: BTreeMap<String, String>,
    /// Compositions this chunk took part in.
    pub uses: u64,
    /// Registration order, for listings.
    registered: u64,
    /// Compositions recorded before registration: a never-used chunk ages from there.
    registered_at: u64,
    last_used: Option<u64>,
    /// Hashes of the prefixes this chunk's KV was computed after, newest last.
    computed_after: Vec<u64>,
}

/// Which chunks [`ChunkStore::list`] returns: all of them by default.
#[derive(Debug, Clone, Default)]
pub struct ChunkFilter {
    pub role: Option<ChunkRole>,
    /// Every (key, value) pair must be in the chunk's metadata.
    pub metadata: Vec<(String, String)>,
}

impl ChunkFilter {
    /// Chunks of one role.
    pub fn role(role: ChunkRole) -> Self {
        ChunkFilter {
            role: Some(role),
            metadata: Vec::new(),
        }
    }

    /// Also require a metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    fn matches(&self, chunk: &Chunk) -> bool {
        self.role.is_none_or(|r| r == chunk.role)
            && self
                .metadata
                .iter()
                .all(|(k, v)| chunk.metadata.get(k) == Some(v))
    }
}

/// A prompt composed from chunks.
#[derive(Debug, Clone, PartialEq)]
pub struct Composition {
    /// The conversation the chat template rendered.
    pub messages: Vec<ChatMessage>,
    /// The prompt: the rendered conversation, tokenized once.
    pub tokens: Vec<u32>,
    /// Where each chunk's tokens lie in `tokens`, in prompt order. A chunk whose text the template
    /// changed beyond recognition has no span.
    pub spans: Vec<ChunkSpan>,
}

/// One chunk's place in a composed prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSpan {
    pub chunk: ChunkId,
    pub role: ChunkRole,
    /// The prompt tokens wholly inside the chunk's text. A token that joins the chunk's end to
    /// what follows (BPE vocabularies often write ".\n\n" as one token) belongs to no span.
    pub tokens: Range<usize>,
}

/// How much of a composed prompt the cache supplies (or supplied), chunk by chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompositionReport {
    pub tokens: usize,
    /// Leading prompt tokens whose KV comes from the cache.
    pub cached_tokens: usize,
    pub chunks: Vec<ChunkReport>,
}

/// One chunk's part of a [`CompositionReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkReport {
    pub chunk: ChunkId,
    pub role: ChunkRole,
    pub tokens: usize,
    pub cached_tokens: usize,
    /// The chunk's KV was computed before, but only after other prefixes: here it is computed
    /// again, because a token's KV depends on every token before it.
    pub after_different_prefix: bool,
}

/// Counters over every recorded composition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkStats {
    /// Chunk uses whose every token came from the cache.
    pub hits: u64,
    /// Chunk uses that computed at least one token.
    pub misses: u64,
    /// Misses of chunks computed before, but only after other prefixes.
    pub different_prefix: u64,
    /// Misses of chunks computed before after this very prefix, whose KV the cache has since
    /// given up for other requests.
    pub kv_evicted: u64,
    /// Chunks removed by [`ChunkStore::evict_unused`].
    pub evictions: u64,
    /// Chunk tokens whose KV came from the cache.
    pub tokens_saved: u64,
    /// Chunk tokens computed.
    pub tokens_computed: u64,
}

impl ChunkStats {
    /// Hits over all chunk uses (0 before any use).
    pub fn hit_rate(&self) -> f64 {
        let uses = self.hits + self.misses;
        if uses == 0 {
            0.0
        } else {
            self.hits as f64 / uses as f64
        }
    }
}

/// A chunk store or composition failure, as one sentence.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("no chunk has id {0}")]
    UnknownChunk(ChunkId),
    #[error("'{0}' is not a chunk id; expected 32 hex digits")]
    BadId(String),
    #[error("'{0}' is not a chunk role; expected system, context, query or output")]
    UnknownRole(String),
    #[error("chunk {chunk} is a {role} chunk, but a {expected} chunk goes there")]
    WrongRole {
        chunk: ChunkId,
        role: ChunkRole,
        expected: &'static str,
    },
    #[error("a chunk's text must not be empty")]
    EmptyText,
    #[error("this model has no chat template, so chunks cannot be composed into a prompt")]
    NoChatTemplate,
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Registered chunks and their statistics.
#[derive(Debug, Clone, Default)]
pub struct ChunkStore {
    chunks: HashMap<ChunkId, Chunk>,
    /// Registrations so far; orders listings.
    registrations: u64,
    /// Recorded compositions so far; measures idleness.
    compositions: u64,
    stats: ChunkStats,
}

impl ChunkStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `text` as a chunk of `role`; the same role and text give the same id again.
    pub fn register(
        &mut self,
        engine: &Engine,
        role: ChunkRole,
        text: &str,
    ) -> Result<ChunkId, ChunkError> {
        self.register_with_tokenizer(engine.tokenizer(), role, text)
    }

    pub(crate) fn register_with_tokenizer(
        &mut self,
        tokenizer: &Tokenizer,
        role: ChunkRole,
        text: &str,
    ) -> Result<ChunkId, ChunkError> {
        if text.is_empty() {
            return Err(ChunkError::EmptyText);
        }
        let tokens = tokenizer.encode(text, false)?;
        let id = ChunkId(chunk_hash(role, &tokens));
        if !self.chunks.contains_key(&id) {
            self.registrations += 1;
            self.chunks.insert(
                id,
                Chunk {
                    id,
                    role,
                    text: text.to_string(),
                    tokens,
                    metadata: BTreeMap::new(),
                    uses: 0,
                    registered: self.registrations,
                    registered_at: self.compositions,
                    last_used: None,
                    computed_after: Vec::new(),
                },
            );
        }
        Ok(id)
    }

    /// Sets one metadata entry of a chunk (used by [`ChunkFilter`]).
    pub fn set_metadata(
        &mut self,
        id: ChunkId,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<(), ChunkError> {
        let chunk = self
            .chunks
            .get_mut(&id)
            .ok_or(ChunkError::UnknownChunk(id))?;
        chunk.metadata.insert(key.into(), value.into());
        Ok(())
    }

    pub fn get(&self, id: ChunkId) -> Option<&Chunk> {
        self.chunks.get(&id)
    }

    /// The chunks `filter` selects, oldest registration first.
    pub fn list(&self, filter: &ChunkFilter) -> Vec<&Chunk> {
        let mut out: Vec<&Chunk> = self.chunks.values().filter(|c| filter.matches(c)).collect();
        out.sort_by_key(|c| c.registered);
        out
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Forgets a chunk; whether it existed. Its KV stays in the engine's cache until evicted.
    pub fn delete(&mut self, id: ChunkId) -> bool {
        self.chunks.remove(&id).is_some()
    }

    /// Forgets every chunk and resets the statistics.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Forgets every chunk that none of the last `max_idle` recorded compositions used (a chunk
    /// never used counts from its registration); returns how many went.
    pub fn evict_unused(&mut self, max_idle: u64) -> usize {
        let now = self.compositions;
        let before = self.chunks.len();
        self.chunks.retain(|_, c| {
            let since = c.last_used.unwrap_or(c.registered_at);
            now - since < max_idle
        });
        let evicted = before - self.chunks.len();
        self.stats.evictions += evicted as u64;
        evicted
    }

    pub fn stats(&self) -> &ChunkStats {
        &self.stats
    }

    /// Composes system prompt, contexts and query into one prompt: the system prompt as the
    /// system message, then one user message holding the contexts and the query, each separated
    /// by a blank line. Contexts may be context or output chunks.
    pub fn compose(
        &self,
        engine: &Engine,
        system: Option<ChunkId>,
        contexts: &[ChunkId],
        query: ChunkId,
    ) -> Result<Composition, ChunkError> {
        let template = engine.chat_template().ok_or(ChunkError::NoChatTemplate)?;
        let mut messages = Vec::new();
        let mut order = Vec::new();
        if let Some(id) = system {
            let chunk = self.expect(id, &[ChunkRole::System], "system")?;
            messages.push(ChatMessage::new("system", chunk.text.clone()));
            order.push(id);
        }
        let user = self.user_message(contexts, query, &mut order)?;
        messages.push(ChatMessage::new("user", user));
        self.compose_messages(
            engine.tokenizer(),
            template,
            &serde_json::Map::new(),
            messages,
            &order,
        )
    }

    /// What the cache would supply for `composition` now, chunk by chunk.
    pub fn preview(&self, engine: &Engine, composition: &Composition) -> CompositionReport {
        let cached = engine.cached_prefix_len(&composition.tokens);
        self.report(composition, cached)
    }

    /// Records that `composition` ran with its first `cached_prompt_tokens` tokens from the cache
    /// (the request's [`crate::RequestMetrics::cached_prompt_tokens`]); updates the statistics.
    pub fn record_use(
        &mut self,
        composition: &Composition,
        cached_prompt_tokens: usize,
    ) -> CompositionReport {
        let report = self.report(composition, cached_prompt_tokens);
        self.compositions += 1;
        let now = self.compositions;
        for (span, r) in composition.spans.iter().zip(&report.chunks) {
            let prefix = token_hash(&composition.tokens[..span.tokens.start]);
            let Some(chunk) = self.chunks.get_mut(&span.chunk) else {
                continue;
            };
            chunk.uses += 1;
            chunk.last_used = Some(now);
            if r.tokens == 0 {
                continue;
            }
            self.stats.tokens_saved += r.cached_tokens as u64;
            self.stats.tokens_computed += (r.tokens - r.cached_tokens) as u64;
            if r.cached_tokens == r.tokens {
                self.stats.hits += 1;
            } else {
                self.stats.misses += 1;
                if r.after_different_prefix {
                    self.stats.different_prefix += 1;
                } else if chunk.computed_after.contains(&prefix) {
                    self.stats.kv_evicted += 1;
                }
            }
            chunk.computed_after.retain(|&p| p != prefix);
            chunk.computed_after.push(prefix);
            if chunk.computed_after.len() > REMEMBERED_PREFIXES {
                chunk.computed_after.remove(0);
            }
        }
        report
    }

    fn report(&self, composition: &Composition, cached: usize) -> CompositionReport {
        let cached = cached.min(composition.tokens.len());
        let chunks = composition
            .spans
            .iter()
            .map(|span| {
                let r = &span.tokens;
                let cached_tokens = cached.clamp(r.start, r.end) - r.start;
                let after_different_prefix = cached_tokens < r.len()
                    && self.chunks.get(&span.chunk).is_some_and(|c| {
                        let prefix = token_hash(&composition.tokens[..r.start]);
                        !c.computed_after.is_empty() && !c.computed_after.contains(&prefix)
                    });
                ChunkReport {
                    chunk: span.chunk,
                    role: span.role,
                    tokens: r.len(),
                    cached_tokens,
                    after_different_prefix,
                }
            })
            .collect();
        CompositionReport {
            tokens: composition.tokens.len(),
            cached_tokens: cached,
            chunks,
        }
    }

    /// The text of one user message: contexts then the query, a blank line apart.
    pub(crate) fn user_message(
        &self,
        contexts: &[ChunkId],
        query: ChunkId,
        order: &mut Vec<ChunkId>,
    ) -> Result<String, ChunkError> {
        let mut parts = Vec::with_capacity(contexts.len() + 1);
        for &id in contexts {
            let chunk = self.expect(id, &[ChunkRole::Context, ChunkRole::Output], "context")?;
            parts.push(chunk.text.as_str());
            order.push(id);
        }
        let chunk = self.expect(query, &[ChunkRole::Query], "query")?;
        parts.push(chunk.text.as_str());
        order.push(query);
        Ok(parts.join(PART_SEPARATOR))
    }

    pub(crate) fn expect(
        &self,
        id: ChunkId,
        roles: &[ChunkRole],
        expected: &'static str,
    ) -> Result<&Chunk, ChunkError> {
        let chunk = self.chunks.get(&id).ok_or(ChunkError::UnknownChunk(id))?;
        if !roles.contains(&chunk.role) {
            return Err(ChunkError::WrongRole {
                chunk: id,
                role: chunk.role,
                expected,
            });
        }
        Ok(chunk)
    }

    /// Renders `messages` (with the generation prompt) once, tokenizes the text once, and finds
    /// the chunks of `order` in it, in that order.
    pub(crate) fn compose_messages(
        &self,
        tokenizer: &Tokenizer,
        template: &ChatTemplate,
        extra: &serde_json::Map<String, serde_json::Value>,
        messages: Vec<ChatMessage>,
        order: &[ChunkId],
    ) -> Result<Composition, ChunkError> {
        let text = template.render_with(&messages, true, extra)?;
        // The template writes the special tokens itself.
        let tokens = tokenizer.encode(&text, false)?;
        let mut spans = Vec::with_capacity(order.len());
        let mut from = 0;
        let boundary_at = |chars: usize| -> Result<usize, ChunkError> {
            let prefix = tokenizer.encode(&text[..chars], false)?;
            Ok(common_prefix_len(&prefix, &tokens))
        };
        for &id in order {
            let chunk = self.chunks.get(&id).ok_or(ChunkError::UnknownChunk(id))?;
            // Some templates trim message text; a chunk is found as written or trimmed.
            let found = [chunk.text.as_str(), chunk.text.trim()]
                .into_iter()
                .filter(|needle| !needle.is_empty())
                .find_map(|needle| {
                    text[from..]
                        .find(needle)
                        .map(|at| (from + at, needle.len()))
                });
            let Some((start, len)) = found else {
                continue;
            };
            from = start + len;
            let tokens = boundary_at(start)?..boundary_at(start + len)?;
            spans.push(ChunkSpan {
                chunk: id,
                role: chunk.role,
                tokens,
            });
        }
        Ok(Composition {
            messages,
            tokens,
            spans,
        })
    }
}

/// Length of the longest common prefix of two token lists.
pub(crate) fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// FNV-1a over the little-endian bytes of `tokens`, 64-bit.
fn token_hash(tokens: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tokens.iter().flat_map(|t| t.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// FNV-1a, 128-bit, over the role and the tokens: stable across runs and platforms, so ids saved
/// to disk stay valid.
fn chunk_hash(role: ChunkRole, tokens: &[u32]) -> u128 {
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    let bytes = std::iter::once(role as u8).chain(tokens.iter().flat_map(|t| t.to_le_bytes()));
    for b in bytes {
        h ^= u128::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h
}
