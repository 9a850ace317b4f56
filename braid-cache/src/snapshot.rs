//! Prefix cache snapshots: the file format that carries every registered full block (its place in
//! the prefix tree, its token ids, its KV bytes) across restarts, and the verified, all-or-nothing
//! load that puts such a file back into a [`crate::BlockManager`].
//!
//! # File format, version 1
//!
//! Every integer is little-endian.
//!
//! | field | bytes |
//! |---|---|
//! | magic `BRAIDPFX` | 8 |
//! | format version (`1`) | 4 (u32) |
//! | fingerprint: model and dtype identity, from [`SnapshotMeta`] | 32 |
//! | dtype name length `n` (1 to 64) | 4 (u32) |
//! | dtype name, UTF-8 | `n` |
//! | `num_layers`, `num_kv_heads`, `head_dim`, `block_size` | 4 × 8 (u64) |
//! | KV bytes per block, as the backend's [`BlockContents::block_bytes`] | 8 (u64) |
//! | entry count | 8 (u64) |
//! | entries, each: parent (u64: index of an earlier entry, or `u64::MAX` for the root), `block_size` token ids (u32 each), the block's KV bytes | count × (8 + 4·`block_size` + KV bytes) |
//! | SHA-256 of every byte before it | 32 |
//!
//! Entries come parents first: they are written in registration order, and a block is always
//! registered after its parent. Registered blocks whose ancestor was evicted are unreachable by
//! any prompt and are left out.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::prefix::{Link, PrefixIndex};
use crate::{BlockId, BlockPool, CacheError, KvLayout};

/// Reads and writes one block's KV (all layers, K and V) as bytes, in the backend's own dtype.
///
/// The byte order within a block is the backend's choice, but backends that share a dtype should
/// agree so their snapshots are interchangeable: [`crate::KvStorage`] writes layer by layer, K
/// before V, each as `[block_size, num_kv_heads, head_dim]` little-endian values.
pub trait BlockContents {
    /// Bytes of one block's KV over all layers.
    fn block_bytes(&self) -> usize;
    /// Copies block `id`'s KV into `out`, which holds exactly [`BlockContents::block_bytes`] bytes.
    fn read_block(&mut self, id: BlockId, out: &mut [u8]) -> Result<(), CacheError>;
    /// Overwrites block `id`'s KV with `data`, which holds exactly [`BlockContents::block_bytes`]
    /// bytes.
    fn write_block(&mut self, id: BlockId, data: &[u8]) -> Result<(), CacheError>;
}

/// What a snapshot must have been saved for to be loaded: the same model, in the same dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Identity of the model and its KV dtype, computed by the engine (see
    /// [`SnapshotMeta::fingerprint_of`]). Loading refuses a snapshot whose fingerprint differs.
    pub fingerprint: [u8; 32],
    /// Name of the dtype the KV bytes are in, e.g. `"bf16"`; 1 to 64 bytes.
    pub dtype: String,
}

impl SnapshotMeta {
    /// A fingerprint over `parts` (for instance the weights' hash, the architecture name and
    /// the dtype): SHA-256 of each part preceded by its length, so no two lists of parts give
    /// the same input.
    pub fn fingerprint_of(parts: &[&[u8]]) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        hasher.finalize().into()
    }
}

/// What a save or a load did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// Blocks written to the snapshot (save) or newly placed in the cache (load).
    pub blocks: usize,
    /// Tokens those blocks hold.
    pub tokens: usize,
    /// Load: snapshot blocks the cache already held, left as they were. Zero for a save.
    pub already_cached_blocks: usize,
    /// Load: snapshot blocks not loaded, for want of free blocks or because their parent was not
    /// loaded. Save: registered blocks left out because an ancestor was evicted.
    pub skipped_blocks: usize,
    /// Tokens the skipped blocks hold.
    pub skipped_tokens: usize,
    /// Bytes of the snapshot written or read, checksum included.
    pub bytes: u64,
}

/// Why a snapshot could not be saved or loaded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SnapshotError {
    /// The file system or the stream failed.
    #[error("could not {action}: {message}")]
    Io {
        /// What was being done, naming the file where known.
        action: String,
        /// The kind of failure, so a caller can tell a missing file from a broken one.
        kind: io::ErrorKind,
        /// The operating system's description.
        message: String,
    },
    /// The file does not start with the snapshot magic bytes.
    #[error("the file is not a Braid prefix cache snapshot: it does not start with the bytes `BRAIDPFX`")]
    NotASnapshot,
    /// The file was written by a format this build does not read.
    #[error("the prefix cache snapshot has format version {found}, this build reads version {supported}")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version this build reads and writes.
        supported: u32,
    },
    /// The file ends before the end its header describes.
    #[error("the prefix cache snapshot is truncated: it ends after {len} bytes, before the end of its {section}")]
    Truncated {
        /// Bytes the file holds.
        len: u64,
        /// The part of the file that was being read: header, entries or checksum.
        section: &'static str,
    },
    /// The file holds more bytes than its header describes.
    #[error("the prefix cache snapshot has bytes after its checksum, so it is not a file this engine wrote")]
    TrailingBytes,
    /// The checksum at the end of the file does not match the bytes before it.
    #[error(
        "the prefix cache snapshot's checksum does not match its contents, so the file is corrupt"
    )]
    ChecksumMismatch,
    /// The checksum matches but the contents break the format's rules.
    #[error("the prefix cache snapshot is malformed: {reason}")]
    Malformed {
        /// The rule broken, in words.
        reason: String,
    },
    /// The snapshot's KV bytes are in another dtype.
    #[error("the prefix cache snapshot was saved for dtype {saved}, this engine runs {running}")]
    DtypeMismatch {
        /// Dtype named in the file.
        saved: String,
        /// Dtype of this engine.
        running: String,
    },
    /// The snapshot was saved for a KV cache of another shape.
    #[error("the prefix cache snapshot was saved for a KV cache with {field} = {saved}, this engine's has {running}")]
    LayoutMismatch {
        /// The [`KvLayout`] field that differs.
        field: &'static str,
        /// Value in the file.
        saved: u64,
        /// Value of this engine's cache.
        running: u64,
    },
    /// The snapshot's blocks hold another number of KV bytes than this engine's backend uses.
    #[error("the prefix cache snapshot holds {saved} bytes of KV per block, this engine's KV storage uses {running}")]
    BlockBytesMismatch {
        /// Bytes per block in the file.
        saved: u64,
        /// Bytes per block of this engine's backend.
        running: u64,
    },
    /// The snapshot was saved for another model.
    #[error(
        "the prefix cache snapshot was saved for a different model (fingerprint {}…, this engine's is {}…)",
        short_hex(.saved),
        short_hex(.running)
    )]
    ModelMismatch {
        /// Fingerprint in the file.
        saved: [u8; 32],
        /// Fingerprint of this engine.
        running: [u8; 32],
    },
    /// The dtype name given to a save cannot be stored.
    #[error(
        "a prefix cache snapshot's dtype name must be 1 to {MAX_DTYPE_LEN} bytes long, got {len}"
    )]
    InvalidDtype {
        /// Length of the name given.
        len: usize,
    },
}

/// The first eight bytes of a fingerprint in hex: enough to tell two apart in a message.
fn short_hex(bytes: &[u8; 32]) -> String {
    bytes[..8].iter().map(|b| format!("{b:02x}")).collect()
}

const MAGIC: [u8; 8] = *b"BRAIDPFX";
const VERSION: u32 = 1;
/// Parent index of an entry whose block starts a prompt.
const ROOT_PARENT: u64 = u64::MAX;
const MAX_DTYPE_LEN: usize = 64;
/// Chunk in which bytes that need only hashing are read.
const SKIP_CHUNK: usize = 64 * 1024;

fn io_error(action: impl Into<String>, err: &io::Error) -> SnapshotError {
    SnapshotError::Io {
        action: action.into(),
        kind: err.kind(),
        message: err.to_string(),
    }
}

fn malformed(reason: String) -> SnapshotError {
    SnapshotError::Malformed { reason }
}

/// Everything before the entries.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    fingerprint: [u8; 32],
    dtype: Vec<u8>,
    num_layers: u64,
    num_kv_heads: u64,
    head_dim: u64,
    block_size: u64,
    block_bytes: u64,
    entries: u64,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 4 + 32 + 4 + self.dtype.len() + 6 * 8);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.fingerprint);
        // The length was checked against MAX_DTYPE_LEN, so it fits.
        out.extend_from_slice(&(self.dtype.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.dtype);
        for value in [
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.block_size,
            self.block_bytes,
            self.entries,
        ] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out
    }

    fn decode<R: Read>(reader: &mut HashingReader<R>) -> Result<Header, SnapshotError> {
        const SECTION: &str = "header";
        let mut magic = [0u8; 8];
        reader.fill(&mut magic, SECTION)?;
        if magic != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        let version = reader.u32(SECTION)?;
        if version != VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        let mut fingerprint = [0u8; 32];
        reader.fill(&mut fingerprint, SECTION)?;
        let dtype_len = reader.u32(SECTION)? as usize;
        if dtype_len == 0 || dtype_len > MAX_DTYPE_LEN {
            return Err(malformed(format!(
                "its dtype name is {dtype_len} bytes long, expected 1 to {MAX_DTYPE_LEN}"
            )));
        }
        let mut dtype = vec![0u8; dtype_len];
        reader.fill(&mut dtype, SECTION)?;
        Ok(Header {
            fingerprint,
            dtype,
            num_layers: reader.u64(SECTION)?,
            num_kv_heads: reader.u64(SECTION)?,
            head_dim: reader.u64(SECTION)?,
            block_size: reader.u64(SECTION)?,
            block_bytes: reader.u64(SECTION)?,
            entries: reader.u64(SECTION)?,
        })
    }

    /// Bytes of one entry, or `None` when the header's sizes overflow.
    fn entry_len(&self) -> Option<u64> {
        self.block_size
            .checked_mul(4)?
            .checked_add(8)?
            .checked_add(self.block_bytes)
    }

    /// Whether this engine can use the snapshot; the most specific difference is named.
    fn check_compatible(
        &self,
        meta: &SnapshotMeta,
        layout: &KvLayout,
        block_bytes: usize,
    ) -> Result<(), SnapshotError> {
        if self.dtype != meta.dtype.as_bytes() {
            return Err(SnapshotError::DtypeMismatch {
                saved: String::from_utf8_lossy(&self.dtype).into_owned(),
                running: meta.dtype.clone(),
            });
        }
        let fields = [
            ("num_layers", self.num_layers, layout.num_layers),
            ("num_kv_heads", self.num_kv_heads, layout.num_kv_heads),
            ("head_dim", self.head_dim, layout.head_dim),
            ("block_size", self.block_size, layout.block_size),
        ];
        for (field, saved, running) in fields {
            if saved != running as u64 {
                return Err(SnapshotError::LayoutMismatch {
                    field,
                    saved,
                    running: running as u64,
                });
            }
        }
        if self.block_bytes != block_bytes as u64 {
            return Err(SnapshotError::BlockBytesMismatch {
                saved: self.block_bytes,
                running: block_bytes as u64,
            });
        }
        if self.fingerprint != meta.fingerprint {
            return Err(SnapshotError::ModelMismatch {
                saved: self.fingerprint,
                running: meta.fingerprint,
            });
        }
        Ok(())
    }
}

fn check_dtype(meta: &SnapshotMeta) -> Result<(), SnapshotError> {
    let len = meta.dtype.len();
    if len == 0 || len > MAX_DTYPE_LEN {
        return Err(SnapshotError::InvalidDtype { len });
    }
    Ok(())
}

/// A writer that hashes what passes through and counts it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.inner
            .write_all(bytes)
            .map_err(|err| io_error("write the prefix cache snapshot", &err))?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Appends the checksum, flushes, and returns the bytes written in all.
    fn finish(mut self) -> Result<u64, SnapshotError> {
        let digest: [u8; 32] = self.hasher.finalize().into();
        self.inner
            .write_all(&digest)
            .and_then(|()| self.inner.flush())
            .map_err(|err| io_error("write the prefix cache snapshot", &err))?;
        Ok(self.written + digest.len() as u64)
    }
}

/// A reader that hashes what it hands out and knows how far into the file it is.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> HashingReader<R> {
    /// Fills `buf` from the stream without hashing it, or reports where the file ended.
    fn fill_unhashed(
        &mut self,
        buf: &mut [u8],
        section: &'static str,
    ) -> Result<(), SnapshotError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(io_error("read the prefix cache snapshot", &err)),
            }
        }
        self.read += got as u64;
        if got < buf.len() {
            return Err(SnapshotError::Truncated {
                len: self.read,
                section,
            });
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8], section: &'static str) -> Result<(), SnapshotError> {
        self.fill_unhashed(buf, section)?;
        self.hasher.update(&*buf);
        Ok(())
    }

    fn u32(&mut self, section: &'static str) -> Result<u32, SnapshotError> {
        let mut bytes = [0u8; 4];
        self.fill(&mut bytes, section)?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn u64(&mut self, section: &'static str) -> Result<u64, SnapshotError> {
        let mut bytes = [0u8; 8];
        self.fill(&mut bytes, section)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Hashes the next `len` bytes without keeping them.
    fn skip(&mut self, mut len: u64, section: &'static str) -> Result<(), SnapshotError> {
        let mut chunk = vec![0u8; SKIP_CHUNK.min(usize::try_from(len).unwrap_or(SKIP_CHUNK))];
        while len > 0 {
            let n = chunk.len().min(usize::try_from(len).unwrap_or(usize::MAX));
            self.fill(&mut chunk[..n], section)?;
            len -= n as u64;
        }
        Ok(())
    }

    /// Reads the stored checksum and compares it with the hash of everything before it, then
    /// makes sure nothing follows.
    fn verify_checksum(mut self) -> Result<u64, SnapshotError> {
        let mut stored = [0u8; 32];
        self.fill_unhashed(&mut stored, "checksum")?;
        let computed: [u8; 32] = self.hasher.clone().finalize().into();
        if computed != stored {
            return Err(SnapshotError::ChecksumMismatch);
        }
        let mut probe = [0u8; 1];
        loop {
            match self.inner.read(&mut probe) {
                Ok(0) => return Ok(self.read),
                Ok(_) => return Err(SnapshotError::TrailingBytes),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(io_error("read the prefix cache snapshot", &err)),
            }
        }
    }
}

/// Writes every reachable registered block of `index` to `writer`, parents first.
pub(crate) fn save<W: Write>(
    layout: &KvLayout,
    index: &PrefixIndex,
    contents: &mut dyn BlockContents,
    meta: &SnapshotMeta,
    writer: W,
) -> Result<SnapshotSummary, CacheError> {
    check_dtype(meta)?;
    let block_size = layout.block_size;

    // Registration order lists parents first; an entry is kept when its parent was kept.
    let mut kept: Vec<(BlockId, u64, &[u32])> = Vec::new();
    let mut position_of_serial = HashMap::new();
    let mut skipped_blocks = 0;
    for reg in index.registrations() {
        let parent = if reg.parent_serial == Link::ROOT_SERIAL {
            ROOT_PARENT
        } else if let Some(&position) = position_of_serial.get(&reg.parent_serial) {
            position
        } else {
            skipped_blocks += 1;
            continue;
        };
        if reg.tokens.len() != block_size {
            // Only full blocks are ever registered; anything else could not be stored.
            skipped_blocks += 1;
            continue;
        }
        position_of_serial.insert(reg.serial, kept.len() as u64);
        kept.push((reg.block, parent, reg.tokens));
    }

    let block_bytes = contents.block_bytes();
    let header = Header {
        fingerprint: meta.fingerprint,
        dtype: meta.dtype.as_bytes().to_vec(),
        num_layers: layout.num_layers as u64,
        num_kv_heads: layout.num_kv_heads as u64,
        head_dim: layout.head_dim as u64,
        block_size: block_size as u64,
        block_bytes: block_bytes as u64,
        entries: kept.len() as u64,
    };
    let mut out = HashingWriter {
        inner: writer,
        hasher: Sha256::new(),
        written: 0,
    };
    out.put(&header.encode())?;
    // One buffer per entry keeps the writes few and large.
    let kv_start = 8 + 4 * block_size;
    let mut entry = vec![0u8; kv_start + block_bytes];
    for &(block, parent, tokens) in &kept {
        entry[..8].copy_from_slice(&parent.to_le_bytes());
        for (dst, token) in entry[8..kv_start].chunks_exact_mut(4).zip(tokens) {
            dst.copy_from_slice(&token.to_le_bytes());
        }
        contents.read_block(block, &mut entry[kv_start..])?;
        out.put(&entry)?;
    }
    let bytes = out.finish()?;
    Ok(SnapshotSummary {
        blocks: kept.len(),
        tokens: kept.len() * block_size,
        already_cached_blocks: 0,
        skipped_blocks,
        skipped_tokens: skipped_blocks * block_size,
        bytes,
    })
}

/// What the load does with one entry of the file.
#[derive(Debug, Clone, Copy)]
enum Fate {
    /// The cache already holds this prefix, registered under this link.
    Cached(Link),
    /// Placed in a free block: index into the list of loaded entries.
    Loaded(usize),
    /// Not loaded.
    Skipped,
}

/// Where a loaded entry's parent registration comes from.
#[derive(Debug, Clone, Copy)]
enum ParentLink {
    Existing(Link),
    Loaded(usize),
}

/// An entry that will be registered once the whole file has verified.
struct LoadedEntry {
    block: BlockId,
    parent: ParentLink,
    tokens: Box<[u32]>,
}

/// Reads and verifies a whole snapshot, then registers its new blocks; see
/// [`crate::BlockManager::load_snapshot`].
pub(crate) fn load<R: Read>(
    layout: &KvLayout,
    pool: &mut BlockPool,
    index: &mut PrefixIndex,
    contents: &mut dyn BlockContents,
    meta: &SnapshotMeta,
    reader: R,
) -> Result<SnapshotSummary, CacheError> {
    let mut reader = HashingReader {
        inner: reader,
        hasher: Sha256::new(),
        read: 0,
    };
    let header = Header::decode(&mut reader)?;
    let Some(entry_len) = header.entry_len() else {
        return Err(malformed(
            "its block size and KV bytes per block overflow a 64-bit size".into(),
        )
        .into());
    };
    if header.entries.checked_mul(entry_len).is_none() {
        return Err(malformed(format!(
            "its {} entries of {entry_len} bytes overflow a 64-bit size",
            header.entries
        ))
        .into());
    }

    // The first problem found is reported only once the checksum holds, so a damaged file is
    // called corrupt rather than blamed on a model, dtype or rule it never had.
    let mut problem = header
        .check_compatible(meta, layout, contents.block_bytes())
        .err();
    // Blocks are taken from a copy of the pool; it replaces the real one only after the whole
    // file has verified. KV bytes go into those blocks as they arrive, which is safe because a
    // free block's contents mean nothing until it is registered.
    let mut scratch = pool.clone();
    let mut fates: Vec<Fate> = Vec::new();
    let mut loaded: Vec<LoadedEntry> = Vec::new();
    let mut seen: HashSet<(u64, Box<[u32]>)> = HashSet::new();
    let block_size = layout.block_size;
    let kv_start = 8 + 4 * block_size;
    // Compatible means this entry length is the engine's own, so it fits in memory.
    let mut entry = if problem.is_none() {
        vec![0u8; kv_start + contents.block_bytes()]
    } else {
        Vec::new()
    };
    for i in 0..header.entries {
        if problem.is_some() {
            reader.skip((header.entries - i) * entry_len, "entries")?;
            break;
        }
        reader.fill(&mut entry, "entries")?;
        let mut parent_bytes = [0u8; 8];
        parent_bytes.copy_from_slice(&entry[..8]);
        let parent = u64::from_le_bytes(parent_bytes);
        let tokens: Box<[u32]> = entry[8..kv_start]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let parent_fate = if parent == ROOT_PARENT {
            Fate::Cached(Link::ROOT)
        } else if let Some(&fate) = usize::try_from(parent).ok().and_then(|p| fates.get(p)) {
            fate
        } else {
            problem = Some(malformed(format!(
                "entry {i} names entry {parent} as its parent, which does not come before it"
            )));
            continue;
        };
        if !seen.insert((parent, tokens.clone())) {
            problem = Some(malformed(format!(
                "entry {i} repeats an earlier entry's parent and tokens"
            )));
            continue;
        }
        let parent_link = match parent_fate {
            Fate::Skipped => {
                fates.push(Fate::Skipped);
                continue;
            }
            Fate::Cached(link) => {
                if let Some((_, link)) = index.find(link, &tokens) {
                    fates.push(Fate::Cached(link));
                    continue;
                }
                ParentLink::Existing(link)
            }
            Fate::Loaded(j) => ParentLink::Loaded(j),
        };
        let Some(block) = scratch.allocate() else {
            fates.push(Fate::Skipped);
            continue;
        };
        contents.write_block(block, &entry[kv_start..])?;
        fates.push(Fate::Loaded(loaded.len()));
        loaded.push(LoadedEntry {
            block,
            parent: parent_link,
            tokens,
        });
    }
    let bytes = reader.verify_checksum()?;
    if let Some(problem) = problem {
        return Err(problem.into());
    }

    // Verified: commit. Nothing below can fail.
    *pool = scratch;
    let mut links = Vec::with_capacity(loaded.len());
    for entry in &loaded {
        let parent = match entry.parent {
            ParentLink::Existing(link) => link,
            // Parents come first in the file, so a loaded parent's link already exists.
            ParentLink::Loaded(j) => links[j],
        };
        links.push(index.insert(entry.block, parent, &entry.tokens));
    }
    // Children are released before their parents, so eviction takes leaves first and what stays
    // cached remains reachable from the start of a prompt.
    for entry in loaded.iter().rev() {
        pool.release(entry.block, true);
    }
    let count = |wanted: fn(&Fate) -> bool| fates.iter().filter(|f| wanted(f)).count();
    // A verified file without problems has a fate for every entry.
    let skipped_blocks = count(|f| matches!(f, Fate::Skipped));
    Ok(SnapshotSummary {
        blocks: loaded.len(),
        tokens: loaded.len() * block_size,
        already_cached_blocks: count(|f| matches!(f, Fate::Cached(_))),
        skipped_blocks,
        skipped_tokens: skipped_blocks * block_size,
        bytes,
    })
}

/// `path` with `.partial` appended to its file name: where a save writes before renaming.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Saves through `save` into a file beside `path`, synced, then renamed over `path`, so a
/// crash or a failure never leaves a half-written snapshot under the real name.
pub(crate) fn save_to_path(
    path: &Path,
    save: impl FnOnce(&mut io::BufWriter<&std::fs::File>) -> Result<SnapshotSummary, CacheError>,
) -> Result<SnapshotSummary, CacheError> {
    let partial = partial_path(path);
    let file = std::fs::File::create(&partial)
        .map_err(|err| io_error(format!("create {}", partial.display()), &err))?;
    let result = {
        let mut writer = io::BufWriter::with_capacity(1 << 20, &file);
        save(&mut writer).and_then(|summary| {
            writer
                .flush()
                .and_then(|()| file.sync_all())
                .map_err(|err| io_error(format!("write {}", partial.display()), &err).into())
                .map(|()| summary)
        })
    };
    drop(file);
    let result = result.and_then(|summary| {
        std::fs::rename(&partial, path)
            .map_err(|err| {
                io_error(
                    format!("rename {} to {}", partial.display(), path.display()),
                    &err,
                )
                .into()
            })
            .map(|()| summary)
    });
    if result.is_err() {
        // Best effort: the error that matters is the one being returned.
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Opens `path` for a load, naming it when it cannot be opened.
pub(crate) fn open_for_load(path: &Path) -> Result<io::BufReader<std::fs::File>, CacheError> {
    let file = std::fs::File::open(path).map_err(|err| {
        io_error(
            format!("open the prefix cache snapshot {}", path.display()),
            &err,
        )
    })?;
    Ok(io::BufReader::with_capacity(1 << 20, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            fingerprint: [7; 32],
            dtype: b"bf16".to_vec(),
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 4,
            block_size: 4,
            block_bytes: 64,
            entries: 3,
        }
    }

    #[test]
    fn header_round_trips_and_is_hashed() {
        let bytes = header().encode();
        assert_eq!(bytes.len(), 8 + 4 + 32 + 4 + 4 + 6 * 8);
        assert_eq!(&bytes[..8], b"BRAIDPFX");
        let mut reader = HashingReader {
            inner: &bytes[..],
            hasher: Sha256::new(),
            read: 0,
        };
        assert_eq!(Header::decode(&mut reader), Ok(header()));
        assert_eq!(reader.read, bytes.len() as u64);
        let hashed: [u8; 32] = reader.hasher.finalize().into();
        let expected: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(hashed, expected);
    }

    #[test]
    fn header_rejects_other_files_and_versions() {
        let mut bytes = header().encode();
        bytes[8] = 2;
        let decode = |bytes: &[u8]| {
            Header::decode(&mut HashingReader {
                inner: bytes,
                hasher: Sha256::new(),
                read: 0,
            })
        };
        let err = decode(&bytes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the prefix cache snapshot has format version 2, this build reads version 1"
        );
        assert_eq!(
            decode(b"GGUF\x03\0\0\0\0\0\0\0"),
            Err(SnapshotError::NotASnapshot)
        );
        assert_eq!(
            decode(b"BRAID").unwrap_err().to_string(),
            "the prefix cache snapshot is truncated: it ends after 5 bytes, before the end of its header"
        );
    }

    #[test]
    fn compatibility_names_the_most_specific_difference() {
        let layout = KvLayout {
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 4,
            block_size: 4,
            num_blocks: 9,
        };
        let meta = SnapshotMeta {
            fingerprint: [7; 32],
            dtype: "bf16".into(),
        };
        assert_eq!(header().check_compatible(&meta, &layout, 64), Ok(()));
        let other_dtype = SnapshotMeta {
            fingerprint: [8; 32],
            dtype: "f16".into(),
        };
        assert_eq!(
            header()
                .check_compatible(&other_dtype, &layout, 64)
                .unwrap_err()
                .to_string(),
            "the prefix cache snapshot was saved for dtype bf16, this engine runs f16"
        );
        let wider = KvLayout {
            head_dim: 8,
            ..layout
        };
        assert_eq!(
            header().check_compatible(&meta, &wider, 128).unwrap_err().to_string(),
            "the prefix cache snapshot was saved for a KV cache with head_dim = 4, this engine's has 8"
        );
        assert_eq!(
            header().check_compatible(&meta, &layout, 32),
            Err(SnapshotError::BlockBytesMismatch {
                saved: 64,
                running: 32
            })
        );
        let other_model = SnapshotMeta {
            fingerprint: [0xab; 32],
            ..meta
        };
        assert_eq!(
            header()
                .check_compatible(&other_model, &layout, 64)
                .unwrap_err()
                .to_string(),
            "the prefix cache snapshot was saved for a different model (fingerprint 0707070707070707…, this engine's is abababababababab…)"
        );
    }

    #[test]
    fn fingerprint_separates_parts() {
        let a = SnapshotMeta::fingerprint_of(&[b"ab", b"c"]);
        assert_eq!(a, SnapshotMeta::fingerprint_of(&[b"ab", b"c"]));
        assert_ne!(a, SnapshotMeta::fingerprint_of(&[b"a", b"bc"]));
        assert_ne!(a, SnapshotMeta::fingerprint_of(&[b"abc"]));
    }

    #[test]
    fn partial_path_appends_to_the_name() {
        assert_eq!(
            partial_path(Path::new("/tmp/cache.bin")),
            PathBuf::from("/tmp/cache.bin.partial")
        );
    }
}
