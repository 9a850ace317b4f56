//! Braid's model assets: configs, the architecture registry, weight loading (safetensors and GGUF),
//! the tokenizer and chat template, and the forward pass of every supported architecture.
//!
//! ```no_run
//! use braid_models::{load, source};
//! let location = source::resolve("smollm2-135m")?;
//! let loaded = load(&location)?;
//! println!("{} layers", loaded.info.config.num_layers);
//! # Ok::<(), braid_models::ModelError>(())
//! ```

pub mod arch;
pub mod chat_template;
mod checkpoint;
pub mod config;
mod cuda_inputs;
pub mod cuda_model;
pub mod error;
mod graph_cache;
mod loader;
pub mod model;
pub mod source;
pub mod tokenizer;
pub mod weights;

pub use arch::Architecture;
pub use config::ModelConfig;
pub use cuda_model::{CudaCacheConfig, CudaModel, FusedNormStatus};
pub use error::{ModelError, Result};
pub use loader::{inspect, load, load_on, Backend, LoadedModel, ModelInfo};
pub use model::{Model, SeqInput, SharedPrefixGroup};
