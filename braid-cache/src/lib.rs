//! Braid's paged KV cache: a pool of fixed-size token blocks, per-sequence block tables, and the
//! per-layer key/value storage those blocks index into.
//!
//! The engine holds one [`BlockManager`]; the CPU backend keeps the blocks' contents in a [`KvStorage`]. Each running sequence owns a [`BlockTable`]; before a
//! forward step writes `n` more tokens, the engine calls [`BlockManager::reserve`] (all-or-nothing,
//! so a failed admission leaves nothing half-allocated), the forward pass maps token positions to
//! storage slots with [`BlockTable::slot`] and writes them through [`KvStorage::write`], and
//! [`BlockManager::set_len`] records how many tokens are now valid. A finished sequence gives its
//! blocks back with [`BlockManager::release`].
//!
//! ```
//! use braid_cache::{BlockManager, BlockTable, KvLayout, KvStorage};
//!
//! let layout = KvLayout { num_layers: 2, num_kv_heads: 1, head_dim: 4, block_size: 16, num_blocks: 8 };
//! let mut cache = BlockManager::new(layout);
//! let mut storage = KvStorage::new(layout);
//! let mut table = BlockTable::new();
//! cache.reserve(&mut table, 20).unwrap(); // 20 tokens need 2 blocks of 16
//! assert_eq!(table.blocks().len(), 2);
//! BlockManager::set_len(&mut table, 20);
//! let slot = table.slot(19, layout.block_size);
//! storage.write(0, &[slot], &[1.0; 4], &[2.0; 4]);
//! cache.release(&mut table);
//! assert_eq!(cache.num_free_blocks(), 8);
//! ```

mod cache;
mod error;
mod layout;
mod pool;
mod storage;
mod table;

pub use cache::BlockManager;
pub use error::CacheError;
pub use layout::{KvLayout, DEFAULT_BLOCK_SIZE};
pub use pool::BlockPool;
pub use storage::KvStorage;
pub use table::BlockTable;

/// Index of one block in the pool and in every layer's storage.
pub type BlockId = u32;
