//! Braid's quantized weights: the GGUF container and ggml's block formats, dequantized on the CPU.
//!
//! - [`GgufFile`] parses a GGUF v2/v3 file (memory-mapped with [`GgufFile::open`], or from a
//!   buffer with [`GgufFile::from_bytes`]): typed metadata ([`GgufValue`]) and a tensor table
//!   ([`GgufTensorInfo`]) whose byte ranges are checked against the file at parse time.
//! - [`GgmlType`] names ggml's tensor types with their real ids and block geometry.
//! - [`dequantize`] turns a tensor's bytes into f32 values, in parallel over blocks, bit-exact
//!   with ggml's reference decoders for F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
//!   Q4_K, Q5_K, Q6_K, Q8_K, IQ4_NL, IQ4_XS and MXFP4. Other recognised types are reported as
//!   not supported.
//!
//! ```no_run
//! # fn main() -> braid_quant::Result<()> {
//! let file = braid_quant::GgufFile::open(std::path::Path::new("model.gguf"))?;
//! let arch = file.get_str("general.architecture");
//! let embeddings = file.dequantize("token_embd.weight")?;
//! # Ok(()) }
//! ```

mod error;
pub mod ggml;
pub mod gguf;

pub use error::{QuantError, Result};
pub use ggml::{dequantize, dequantize_into, GgmlType};
pub use gguf::{GgufFile, GgufTensorInfo, GgufValue};
