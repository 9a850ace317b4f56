//! placeholder
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QuantError(pub String);
