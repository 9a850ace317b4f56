//! Braid's engine: requests and sequences, a continuous-batching scheduler over the paged KV cache,
//! sampling, stop handling, incremental detokenization and streaming, plus the simple [`Braid`] API.

mod api;
mod cascade;
pub mod chunks;
pub mod conversation;
pub mod detokenizer;
mod engine;
mod error;
mod fingerprint;
pub mod reasoning;
mod request;
pub mod sampling;
mod sequence;
pub mod stop;

pub use api::{Braid, Generation, Prompt, Timings};
pub use braid_cache::SnapshotSummary as CacheFileSummary;
pub use braid_models::chat_template::ChatMessage;
pub use cascade::{CascadePolicy, AUTO_MIN_SAVED_TOKENS, AUTO_MIN_SHARED_TOKENS};
pub use chunks::{
    Chunk, ChunkError, ChunkFilter, ChunkId, ChunkRole, ChunkStats, ChunkStore, Composition,
    CompositionReport,
};
pub use conversation::{Conversation, ConversationError, ConversationStats, Turn};
pub use engine::{Engine, EngineConfig, EngineStats, RetainedInfo};
pub use error::EngineError;
pub use reasoning::{OutputPiece, ReasoningParser, ThinkTags};
pub use request::{FinishReason, GenerationParams, RequestId, RequestMetrics, StepEvent};
pub use sampling::SamplingParams;
