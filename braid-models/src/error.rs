//! The error type of model loading: every failure is one sentence naming the file or value at fault.

use std::path::PathBuf;

/// Everything that can go wrong while finding, reading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("unknown architecture '{found}'; supported: {supported}")]
    UnknownArchitecture { found: String, supported: String },
    #[error("{0}")]
    Weights(String),
    #[error("{0}")]
    Gguf(#[from] braid_quant::QuantError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("{0}")]
    Source(String),
    #[error("{0}")]
    Forward(String),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
