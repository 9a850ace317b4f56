//! The GGUF container (versions 2 and 3, little-endian): header, metadata, tensor table, data.
//!
//! Parsing validates every length and count against the file size before allocating, so a
//! corrupt or hostile file yields an error, never a panic or a huge allocation. After a
//! successful parse every tensor's bytes are known to lie inside the data section.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use crate::error::{QuantError, Result};
use crate::ggml::{self, GgmlType};

/// Data alignment when the file has no `general.alignment` key.
const DEFAULT_ALIGNMENT: u64 = 32;

/// Maximum tensor rank ggml supports.
const MAX_DIMS: u32 = 4;

/// Arrays of arrays are rare; this bound keeps a crafted file from exhausting the stack.
const MAX_ARRAY_NESTING: usize = 16;

/// Smallest encodings, used to reject counts the remaining bytes cannot hold.
const MIN_KV_BYTES: u64 = 8 + 4 + 1; // key length, value type, smallest value
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8; // name length, n_dims, type, offset

/// One metadata value, typed as the file stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer type whose value is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(u64::from(v)),
            GgufValue::U16(v) => Some(u64::from(v)),
            GgufValue::U32(v) => Some(u64::from(v)),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type whose value fits in an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(v) => Some(i64::from(v)),
            GgufValue::U16(v) => Some(i64::from(v)),
            GgufValue::U32(v) => Some(i64::from(v)),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(i64::from(v)),
            GgufValue::I16(v) => Some(i64::from(v)),
            GgufValue::I32(v) => Some(i64::from(v)),
            GgufValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Floats, and integers converted to the nearest `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(f64::from(v)),
            GgufValue::F64(v) => Some(v),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The boolean, if this is a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The GGUF name of this value's type (`"uint32"`, `"string"`, `"array"`, …).
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "uint8",
            GgufValue::I8(_) => "int8",
            GgufValue::U16(_) => "uint16",
            GgufValue::I16(_) => "int16",
            GgufValue::U32(_) => "uint32",
            GgufValue::I32(_) => "int32",
            GgufValue::U64(_) => "uint64",
            GgufValue::I64(_) => "int64",
            GgufValue::F32(_) => "float32",
            GgufValue::F64(_) => "float64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }
}

/// Where one tensor lives and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the contiguous (innermost) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Number of values (1 for a tensor with no dimensions).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }

    /// Number of bytes the tensor occupies in the data section.
    pub fn n_bytes(&self) -> u64 {
        let blocks = self.n_elements() / self.ggml_type.block_size() as u64;
        blocks.saturating_mul(self.ggml_type.type_size() as u64)
    }

    /// Row-major (PyTorch) shape: the GGUF dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
            .collect()
    }
}

/// The file's bytes: mapped from disk, or owned.
enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(map) => map,
            Storage::Owned(bytes) => bytes,
        }
    }
}

/// A parsed GGUF file: metadata and tensor table in memory, tensor data left in place.
pub struct GgufFile {
    storage: Storage,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("len", &self.storage.bytes().len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps the file at `path` read-only and parses it; errors name the path.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io_err = |source| QuantError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        let storage = if len == 0 {
            // Mapping an empty file fails on some platforms; it is simply a truncated file.
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and private to this value. Another process
            // truncating or rewriting the file while it is mapped is outside what a reader can
            // guard against; every inference engine that maps weights shares this contract.
            Storage::Mapped(unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)?)
        };
        Self::from_storage(storage).map_err(|source| QuantError::InFile {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// Parses a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile> {
        Self::from_storage(Storage::Owned(bytes))
    }

    fn from_storage(storage: Storage) -> Result<GgufFile> {
        let header = parse(storage.bytes())?;
        Ok(GgufFile {
            storage,
            version: header.version,
            alignment: header.alignment,
            data_offset: header.data_offset,
            metadata: header.metadata,
            tensors: header.tensors,
            by_name: header.by_name,
        })
    }

    /// The format version: 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section and of every tensor in it.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset where the data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The string under `key`.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(GgufValue::as_str)
    }

    /// The integer under `key`, of any integer type, if non-negative.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(GgufValue::as_u64)
    }

    /// The number under `key`: a float, or an integer converted.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(GgufValue::as_f64)
    }

    /// The boolean under `key`.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(GgufValue::as_bool)
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor of this file.
    ///
    /// Bounds were checked at parse time; an info that does not come from this file and points
    /// outside it yields an empty slice.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        let bytes = self.storage.bytes();
        let range = self
            .data_offset
            .checked_add(info.offset)
            .and_then(|start| Some((start, start.checked_add(info.n_bytes())?)))
            .and_then(|(start, end)| {
                Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
            });
        range.and_then(|r| bytes.get(r)).unwrap_or(&[])
    }

    /// The tensor named `name`, dequantized to f32 in GGUF element order.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let info = self
            .tensor(name)
            .ok_or_else(|| QuantError::TensorNotFound {
                name: name.to_string(),
            })?;
        // Parsing bounded n_bytes by the file size, so the count fits whenever the bytes do.
        let n_elements = usize::try_from(info.n_elements()).unwrap_or(usize::MAX);
        ggml::dequantize(info.ggml_type, self.tensor_bytes(info), n_elements).map_err(|source| {
            QuantError::InTensor {
                name: name.to_string(),
                source: Box::new(source),
            }
        })
    }
}

/// Everything the header says, before it is paired with its storage.
struct Header {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
}

/// A bounds-checked little-endian reader over the whole file.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    /// The next `n` bytes; `what` names the field for the error and is only built on failure.
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(QuantError::Truncated {
                what: what(),
                start: self.pos as u64,
                end: (self.pos as u64).saturating_add(n),
                file_len: self.bytes.len() as u64,
            });
        }
        // n <= remaining, so it fits in usize and the slice is in bounds.
        let n = n as usize;
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn raw_string(&mut self, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let len = self.u64(what)?;
        self.take(len, what)
    }

    /// A string that must be UTF-8 (keys and tensor names identify things).
    fn strict_string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let raw = self.raw_string(what)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| QuantError::InvalidUtf8 { what: what() })
    }

    /// Rejects `count` entries of at least `min_bytes` each that cannot fit in what is left.
    fn check_count(&self, count: u64, min_bytes: u64, what: &dyn Fn() -> String) -> Result<usize> {
        let fits = count
            .checked_mul(min_bytes)
            .is_some_and(|needed| needed <= self.remaining());
        match usize::try_from(count) {
            Ok(count) if fits => Ok(count),
            _ => Err(QuantError::CountTooLarge {
                what: what(),
                count,
                remaining: self.remaining(),
            }),
        }
    }

    fn value(
        &mut self,
        type_id: u32,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> Result<GgufValue> {
        Ok(match type_id {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => {
                // Values are text for people (tokens, templates); a stray invalid byte in one
                // vocabulary entry should not make the whole model unloadable.
                let raw = self.raw_string(what)?;
                GgufValue::String(String::from_utf8_lossy(raw).into_owned())
            }
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(QuantError::NestingTooDeep {
                        what: what(),
                        max: MAX_ARRAY_NESTING,
                    });
                }
                let elem_type = self.u32(what)?;
                let min_bytes =
                    min_value_bytes(elem_type).ok_or_else(|| QuantError::UnknownValueType {
                        what: what(),
                        id: elem_type,
                    })?;
                let count = self.u64(what)?;
                let count = self.check_count(count, min_bytes, what)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(elem_type, depth + 1, what)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            id => return Err(QuantError::UnknownValueType { what: what(), id }),
        })
    }
}

/// A short human description of a value for error messages, e.g. `uint32 48`.
fn describe(value: &GgufValue) -> String {
    let shown = match value {
        GgufValue::String(s) => format!("{s:?}"),
        GgufValue::Array(items) => format!("of {} items", items.len()),
        GgufValue::Bool(b) => b.to_string(),
        GgufValue::F32(v) => v.to_string(),
        GgufValue::F64(v) => v.to_string(),
        other => other
            .as_i64()
            .map(|v| v.to_string())
            .or_else(|| other.as_u64().map(|v| v.to_string()))
            .unwrap_or_default(),
    };
    format!("{} {shown}", value.type_name())
}

/// Fewest bytes one value of GGUF type `type_id` can occupy; `None` for an unknown type.
fn min_value_bytes(type_id: u32) -> Option<u64> {
    match type_id {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        8 => Some(8),     // length prefix
        9 => Some(4 + 8), // element type and count
        10..=12 => Some(8),
        _ => None,
    }
}

fn parse(bytes: &[u8]) -> Result<Header> {
    let mut r = Reader { bytes, pos: 0 };

    let magic: [u8; 4] = r.array(&|| "the magic number".to_string())?;
    if &magic != b"GGUF" {
        return Err(QuantError::BadMagic {
            found: magic.escape_ascii().to_string(),
        });
    }
    let version = r.u32(&|| "the version".to_string())?;
    match version {
        2 | 3 => {}
        // A big-endian writer stores 3 as 0x03000000.
        v if (1..=3).contains(&v.swap_bytes()) => return Err(QuantError::BigEndian { raw: v }),
        v => return Err(QuantError::UnsupportedVersion { version: v }),
    }
    let tensor_count = r.u64(&|| "the tensor count".to_string())?;
    let kv_count = r.u64(&|| "the metadata count".to_string())?;

    let kv_count = r.check_count(kv_count, MIN_KV_BYTES, &|| {
        "the metadata section".to_string()
    })?;
    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = r.strict_string(&|| format!("metadata key #{i}"))?;
        let what = || format!("metadata key '{key}'");
        let type_id = r.u32(&what)?;
        let value = r.value(type_id, 0, &what)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(QuantError::DuplicateKey { key });
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(other) => {
            return Err(QuantError::BadAlignment {
                found: describe(other),
            })
        }
    };

    let tensor_count = r.check_count(tensor_count, MIN_TENSOR_INFO_BYTES, &|| {
        "the tensor table".to_string()
    })?;
    let mut tensors = Vec::with_capacity(tensor_count);
    let mut by_name = HashMap::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let name = r.strict_string(&|| format!("the name of tensor #{i}"))?;
        let info = tensor_info(&mut r, name)?;
        if by_name.insert(info.name.clone(), tensors.len()).is_some() {
            return Err(QuantError::DuplicateTensor { name: info.name });
        }
        tensors.push(info);
    }

    // The data section starts at the first aligned offset after the header.
    let header_end = r.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let data_len = (bytes.len() as u64).saturating_sub(data_offset);
    for info in &tensors {
        check_placement(info, alignment, data_len)?;
    }

    Ok(Header {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
        by_name,
    })
}

/// Reads and validates one tensor table entry after its name.
fn tensor_info(r: &mut Reader<'_>, name: String) -> Result<GgufTensorInfo> {
    let what = || format!("tensor '{name}'");
    let bad_shape = |problem: String| QuantError::BadTensorShape {
        name: name.clone(),
        problem,
    };

    let n_dims = r.u32(&what)?;
    if n_dims > MAX_DIMS {
        return Err(bad_shape(format!(
            "has {n_dims} dimensions, expected at most {MAX_DIMS}"
        )));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(r.u64(&what)?);
    }
    let type_id = r.u32(&what)?;
    let ggml_type = GgmlType::from_id(type_id).map_err(|source| QuantError::InTensor {
        name: name.clone(),
        source: Box::new(source),
    })?;
    let offset = r.u64(&what)?;

    // ggml counts elements in i64; anything larger cannot describe a real tensor.
    let n_elements = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .filter(|&n| i64::try_from(n).is_ok());
    if n_elements.is_none() {
        return Err(bad_shape(format!(
            "has dimensions {dims:?} whose element count overflows"
        )));
    }
    let block_size = ggml_type.block_size() as u64;
    let row = dims.first().copied().unwrap_or(1);
    if row % block_size != 0 {
        return Err(bad_shape(format!(
            "has {row} values per row, which is not a multiple of the {} block size {block_size}",
            ggml_type.name()
        )));
    }

    Ok(GgufTensorInfo {
        name,
        dims,
        ggml_type,
        offset,
    })
}

/// Checks that a tensor's bytes are aligned and inside the data section.
fn check_placement(info: &GgufTensorInfo, alignment: u64, data_len: u64) -> Result<()> {
    let misalignment = info.offset % alignment;
    if misalignment != 0 {
        return Err(QuantError::MisalignedTensor {
            name: info.name.clone(),
            offset: info.offset,
            alignment,
        });
    }
    let end = info.offset.checked_add(info.n_bytes());
    match end {
        Some(end) if end <= data_len => Ok(()),
        _ => Err(QuantError::TensorOutOfBounds {
            name: info.name.clone(),
            start: info.offset,
            end: end.unwrap_or(u64::MAX),
            data_len,
        }),
    }
}
