//! Braid's engine: requests and sequences, a continuous-batching scheduler over the paged KV cache,
//! sampling, stop handling, incremental detokenization and streaming, plus the simple [`Braid`] API.

mod api;
mod cascade;
pub mod detokenizer;
mod engine;
mod error;
mod fingerprint;
mod request;
pub mod sampling;
mod sequence;
pub mod stop;

pub use api::{Braid, Generation, Prompt, Timings};
pub use braid_models::chat_template::ChatMessage;
pub use cascade::{CascadePolicy, AUTO_MIN_SAVED_TOKENS};
pub use braid_cache::SnapshotSummary as CacheFileSummary;
pub use engine::{Engine, EngineConfig, EngineStats, RetainedInfo};
pub use error::EngineError;
pub use request::{FinishReason, GenerationParams, RequestId, RequestMetrics, StepEvent};
pub use sampling::SamplingParams;
