//! The crate's error type: every way a GGUF file or a quantized buffer can be rejected.

use std::path::PathBuf;

/// Result alias used throughout `braid-quant`.
pub type Result<T> = std::result::Result<T, QuantError>;

/// Why a GGUF file, a tensor or a quantized buffer was rejected.
///
/// Each message is one sentence that names the offending thing and what was expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// The file could not be opened, inspected or mapped.
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A parse error, with the path of the file it came from.
    #[error("{path}: {source}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<QuantError>,
    },

    /// An error about one tensor, with its name.
    #[error("tensor '{name}': {source}")]
    InTensor {
        name: String,
        #[source]
        source: Box<QuantError>,
    },

    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: bad magic \"{found}\", expected \"GGUF\"")]
    BadMagic { found: String },

    /// The version field names a version this reader does not parse.
    #[error("GGUF version {version} is not supported: only versions 2 and 3 are")]
    UnsupportedVersion { version: u32 },

    /// The version field reads as a byte-swapped small number: a big-endian file.
    #[error("GGUF file is big-endian (version field {raw:#010x}); only little-endian files are supported")]
    BigEndian { raw: u32 },

    /// A header field runs past the end of the file.
    #[error(
        "GGUF file is truncated: {what} needs bytes {start}..{end} but the file holds {file_len}"
    )]
    Truncated {
        what: String,
        start: u64,
        end: u64,
        file_len: u64,
    },

    /// A count in the header is larger than the remaining bytes could possibly hold.
    #[error(
        "GGUF file is corrupt: {what} claims {count} entries but only {remaining} bytes remain"
    )]
    CountTooLarge {
        what: String,
        count: u64,
        remaining: u64,
    },

    /// A metadata value type id outside the GGUF specification.
    #[error("GGUF file is corrupt: {what} has unknown value type id {id}, expected 0..=12")]
    UnknownValueType { what: String, id: u32 },

    /// Arrays nested deeper than any real file needs (guards the parser's stack).
    #[error("GGUF file is corrupt: {what} nests arrays more than {max} levels deep")]
    NestingTooDeep { what: String, max: usize },

    /// A key or tensor name that is not UTF-8.
    #[error("GGUF file is corrupt: {what} is not valid UTF-8")]
    InvalidUtf8 { what: String },

    /// The same metadata key appears twice.
    #[error("GGUF file is corrupt: metadata key '{key}' appears more than once")]
    DuplicateKey { key: String },

    /// The same tensor name appears twice.
    #[error("GGUF file is corrupt: tensor '{name}' appears more than once")]
    DuplicateTensor { name: String },

    /// `general.alignment` has the wrong type or is not a power of two.
    #[error("GGUF file is corrupt: general.alignment is {found}, expected a non-zero power of two of type uint32")]
    BadAlignment { found: String },

    /// A tensor's shape is malformed (too many dimensions, overflow, or not whole blocks).
    #[error("GGUF file is corrupt: tensor '{name}' {problem}")]
    BadTensorShape { name: String, problem: String },

    /// A tensor's data offset is not a multiple of the file's alignment.
    #[error("GGUF file is corrupt: tensor '{name}' has offset {offset}, which is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        name: String,
        offset: u64,
        alignment: u64,
    },

    /// A tensor's bytes lie (partly) outside the data section.
    #[error("GGUF file is truncated: tensor '{name}' needs bytes {start}..{end} but the data section holds {data_len}")]
    TensorOutOfBounds {
        name: String,
        start: u64,
        end: u64,
        data_len: u64,
    },

    /// A ggml type id that no ggml version defines.
    #[error("unknown ggml tensor type id {id}")]
    UnknownGgmlType { id: u32 },

    /// A ggml type this crate recognises but cannot dequantize.
    #[error("quant type {name} is not supported")]
    UnsupportedType { name: &'static str },

    /// The element count is not a whole number of blocks.
    #[error("{ty} holds values in blocks of {block_size}, but {n_elements} values were requested")]
    PartialBlock {
        ty: &'static str,
        block_size: usize,
        n_elements: usize,
    },

    /// The byte buffer does not match the element count.
    #[error("{ty} data for {n_elements} values must be {expected} bytes, got {actual}")]
    ByteLength {
        ty: &'static str,
        n_elements: usize,
        expected: usize,
        actual: usize,
    },

    /// A tensor name that the file does not hold.
    #[error("tensor '{name}' is not in the GGUF file")]
    TensorNotFound { name: String },
}
