//! The engine's error type.

/// A request or engine failure, as one sentence.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] braid_models::ModelError),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("invalid engine configuration: {0}")]
    InvalidConfig(String),
    /// A prefix cache file could not be saved or loaded.
    #[error("{0}")]
    CacheFile(String),
    /// A request was dropped because its KV can never fit beside the pinned outputs.
    #[error("request {request} needs {needed} KV blocks but only {available} are not held by pinned outputs; it was dropped")]
    CacheHeld {
        request: crate::RequestId,
        needed: usize,
        available: usize,
    },
}
