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
}
