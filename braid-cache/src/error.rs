//! Errors of the KV cache.

use thiserror::Error;

use crate::SnapshotError;

/// What can go wrong when sizing, growing, saving or loading the KV cache.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CacheError {
    /// Growing a block table needs more blocks than the pool has free.
    #[error("the KV cache needs {needed} more blocks but only {free} are free")]
    CacheFull {
        /// Blocks the request would have allocated.
        needed: usize,
        /// Blocks free in the pool at the time.
        free: usize,
    },
    /// A layout field is out of range.
    #[error("KV cache layout field `{field}` must be {expected}, got {got}")]
    InvalidLayout {
        /// Name of the offending [`crate::KvLayout`] field.
        field: &'static str,
        /// The accepted range, in words.
        expected: &'static str,
        /// The value given.
        got: usize,
    },
    /// The layout's storage size does not fit in the address space.
    #[error("KV cache layout of {num_blocks} blocks is too large to address: its element count overflows usize")]
    TooLarge {
        /// Blocks requested.
        num_blocks: usize,
    },
    /// The code that holds the blocks' contents (host memory, a GPU) could not read or write them.
    #[error("the KV cache backend failed: {message}")]
    Backend {
        /// The backend's own description of the failure.
        message: String,
    },
    /// A prefix cache snapshot could not be saved or loaded.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}
