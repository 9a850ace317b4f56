//! Braid's model assets: configs, the architecture registry, weight loading (safetensors and GGUF),
//! the tokenizer and chat template, and the forward pass of every supported architecture.

pub mod chat_template;
pub mod error;
pub mod source;
pub mod tokenizer;

pub use error::{ModelError, Result};
