//! Braid's paged KV cache: a pool of fixed-size token blocks, per-sequence block tables, the
//! per-layer key/value storage those blocks index into, exact automatic prefix caching, and
//! snapshots that carry the cached prefixes across restarts.
//!
//! The engine holds one [`BlockManager`]; the CPU backend keeps the blocks' contents in a
//! [`KvStorage`]. Each running sequence owns a [`BlockTable`]; before a forward step writes `n`
//! more tokens, the engine calls [`BlockManager::reserve`] (all-or-nothing, so a failed admission
//! leaves nothing half-allocated), the forward pass maps token positions to storage slots with
//! [`BlockTable::slot`] and writes them through [`KvStorage::write`], and
//! [`BlockManager::set_len`] records how many tokens are now valid. A finished sequence gives its
//! blocks back with [`BlockManager::release`].
//!
//! # Prefix caching
//!
//! Blocks are reference-counted in the [`BlockPool`]: a full block may sit in several tables at
//! once when their prompts share a prefix. Each full block can be registered in a prefix index
//! under a [`PrefixKey`], a fixed 64-bit hash of its parent block's key and its own token ids
//! (the first block's parent is [`PrefixKey::ROOT`]); keys depend on token ids alone and are the
//! same in every run. The index also stores each block's token ids and the identity of the exact
//! registration it follows, and every lookup compares both, so a hash collision can never hand
//! out a block whose tokens, or whose earlier tokens, differ.
//!
//! - [`BlockManager::match_prefix`] attaches to a new, empty table the longest run of cached
//!   blocks equal to the prompt's leading full blocks, leaving at least one token to compute.
//! - [`BlockManager::commit`] registers a table's full blocks once their KV is computed. Where
//!   another block already holds the same prefix, that one stays the cached copy.
//! - When its last table lets go, a registered block becomes *evictable*: kept with its contents,
//!   in least-recently-released order (a table's tail before its head); an unregistered one is
//!   freed. [`BlockManager::reserve`] takes free blocks first, then evicts the oldest evictable
//!   block, dropping its index entry. A referenced block is never reused.
//! - Only full, committed blocks are shared by matching, so appending never writes into a shared
//!   block. [`BlockManager::fork`] shares a whole table, partial last block included; before
//!   writing to a forked (or shrunk) table, [`BlockManager::prepare_append`] gives it private
//!   copies of the blocks it will write and names the block whose KV the backend must copy.
//!
//! [`BlockManager::stats`] reports cached, evictable and free blocks, hit tokens and evictions.
//!
//! # Saving and loading the prefix cache
//!
//! A long system prompt or document need not be prefilled again after a restart.
//! [`BlockManager::save_snapshot`] writes every cached full block (its parent in the prefix tree,
//! its token ids, and its KV for every layer, read through the [`BlockContents`] trait that the
//! backend holding the blocks implements; [`KvStorage`] does on the CPU) to a checksummed file;
//! [`BlockManager::load_snapshot`] puts such a file back at the next start. A [`SnapshotMeta`]
//! names the model (a fingerprint the engine computes) and the KV dtype; the layout is checked
//! too. A load reads and verifies the whole file before changing anything, so a corrupt,
//! truncated or mismatched file is refused with one [`SnapshotError`] sentence and leaves the
//! cache as it was. Loaded blocks fill free blocks only, as cached evictable blocks that
//! [`BlockManager::match_prefix`] finds like computed ones; what does not fit is skipped and
//! counted in the [`SnapshotSummary`]. The `_file` variants write atomically (a `.partial` file
//! renamed into place) and name the path in their errors. The format is described in
//! [`snapshot`].
//!
//! ```
//! use braid_cache::{BlockManager, BlockTable, KvLayout, KvStorage};
//!
//! let layout = KvLayout { num_layers: 2, num_kv_heads: 1, head_dim: 4, block_size: 16, num_blocks: 8 };
//! let mut cache = BlockManager::new(layout);
//! let mut storage = KvStorage::new(layout);
//! let prompt: Vec<u32> = (0..40).collect();
//!
//! // First request: nothing cached; compute all 40 tokens in 3 blocks.
//! let mut first = BlockTable::new();
//! assert_eq!(cache.match_prefix(&mut first, &prompt), 0);
//! cache.reserve(&mut first, prompt.len()).unwrap();
//! let slot = first.slot(39, layout.block_size);
//! storage.write(0, &[slot], &[1.0; 4], &[2.0; 4]); // ... the forward pass writes every token
//! BlockManager::set_len(&mut first, prompt.len());
//! cache.commit(&mut first, &prompt); // the two full blocks become reusable
//! cache.release(&mut first);
//! assert_eq!(cache.stats().evictable_blocks, 2);
//!
//! // Second request with the same start: its first 32 tokens come from the cache.
//! let mut second = BlockTable::new();
//! assert_eq!(cache.match_prefix(&mut second, &prompt[..35]), 32);
//! cache.reserve(&mut second, 35).unwrap(); // only the last block is new
//! BlockManager::set_len(&mut second, 35);
//! cache.release(&mut second);
//! assert_eq!(cache.num_free_blocks(), 8, "cached blocks count as available");
//!
//! // Save the cache; a restarted engine loads it and skips the prefill again.
//! use braid_cache::SnapshotMeta;
//! let meta = SnapshotMeta {
//!     fingerprint: SnapshotMeta::fingerprint_of(&[b"my-model", KvStorage::DTYPE.as_bytes()]),
//!     dtype: KvStorage::DTYPE.into(),
//! };
//! let mut file = Vec::new();
//! let saved = cache.save_snapshot(&mut storage, &meta, &mut file).unwrap();
//! assert_eq!((saved.blocks, saved.tokens), (2, 32));
//!
//! let mut restarted = BlockManager::new(layout);
//! let mut restarted_storage = KvStorage::new(layout);
//! let loaded = restarted.load_snapshot(&mut restarted_storage, &meta, &file[..]).unwrap();
//! assert_eq!(loaded.blocks, 2);
//! let mut third = BlockTable::new();
//! assert_eq!(restarted.match_prefix(&mut third, &prompt), 32);
//! ```

mod cache;
mod error;
mod layout;
mod pool;
mod prefix;
pub mod snapshot;
mod storage;
mod table;

pub use cache::{BlockManager, CacheStats};
pub use error::CacheError;
pub use layout::{KvLayout, DEFAULT_BLOCK_SIZE};
pub use pool::{BlockPool, BlockState};
pub use prefix::PrefixKey;
pub use snapshot::{BlockContents, SnapshotError, SnapshotMeta, SnapshotSummary};
pub use storage::KvStorage;
pub use table::BlockTable;

/// Index of one block in the pool and in every layer's storage.
pub type BlockId = u32;
