//! The engine-facing block accounting: the pool that hands KV blocks to block tables. The blocks'
//! contents live wherever the backend keeps them ([`crate::KvStorage`] on the CPU, device memory on a GPU).

use crate::{BlockPool, BlockTable, CacheError, KvLayout};

/// The block pool of one KV cache and the layout its blocks follow.
#[derive(Debug, Clone)]
pub struct BlockManager {
    layout: KvLayout,
    pool: BlockPool,
}

impl BlockManager {
    /// An empty cache for `layout`, or an error naming the field when the layout is unusable.
    pub fn try_new(layout: KvLayout) -> Result<Self, CacheError> {
        layout.validate()?;
        Ok(Self {
            layout,
            pool: BlockPool::new(layout.num_blocks),
        })
    }

    /// An empty cache for `layout`.
    ///
    /// # Panics
    /// If the layout fails [`KvLayout::validate`]; use [`BlockManager::try_new`] for layouts
    /// built from user settings.
    pub fn new(layout: KvLayout) -> Self {
        match Self::try_new(layout) {
            Ok(cache) => cache,
            Err(err) => panic!("{err}"),
        }
    }

    /// The cache's layout.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Blocks `table` still lacks to hold `new_len` tokens (zero if it already can).
    pub fn blocks_needed(&self, table: &BlockTable, new_len: usize) -> usize {
        self.layout()
            .blocks_for_tokens(new_len)
            .saturating_sub(table.blocks.len())
    }

    /// Grow `table` so it can hold `new_len` tokens; all-or-nothing: on failure nothing is allocated.
    ///
    /// A `new_len` at or below the table's capacity is a no-op: tables never shrink here.
    pub fn reserve(&mut self, table: &mut BlockTable, new_len: usize) -> Result<(), CacheError> {
        let needed = self.blocks_needed(table, new_len);
        let free = self.pool.num_free();
        if needed > free {
            return Err(CacheError::CacheFull { needed, free });
        }
        table.blocks.reserve(needed);
        for _ in 0..needed {
            match self.pool.allocate() {
                Some(id) => table.blocks.push(id),
                // Unreachable after the count check above; kept total rather than panicking.
                None => return Err(CacheError::CacheFull { needed, free: 0 }),
            }
        }
        table.capacity = table.blocks.len() * self.layout().block_size;
        Ok(())
    }

    /// Record that the table now holds `len` tokens (≤ capacity).
    ///
    /// A `len` beyond the reserved capacity is an engine bug: it trips a debug assertion and is
    /// clamped to the capacity in release builds.
    pub fn set_len(table: &mut BlockTable, len: usize) {
        debug_assert!(
            len <= table.capacity,
            "block table length {len} exceeds its reserved capacity of {} tokens",
            table.capacity
        );
        table.num_tokens = len.min(table.capacity);
    }

    /// Returns every block of `table` to the pool; the table becomes empty.
    pub fn release(&mut self, table: &mut BlockTable) {
        for id in table.blocks.drain(..) {
            self.pool.free(id);
        }
        table.num_tokens = 0;
        table.capacity = 0;
    }

    /// Blocks not owned by any table.
    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// Blocks in the cache.
    pub fn num_total_blocks(&self) -> usize {
        self.pool.num_total()
    }

    /// Whether `extra_blocks` more blocks can be allocated right now.
    pub fn can_fit(&self, extra_blocks: usize) -> bool {
        extra_blocks <= self.pool.num_free()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(num_blocks: usize) -> BlockManager {
        BlockManager::new(KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 2,
            block_size: 4,
            num_blocks,
        })
    }

    #[test]
    fn reserve_grows_by_whole_blocks() {
        let mut cache = cache(4);
        let mut table = BlockTable::new();
        cache.reserve(&mut table, 1).unwrap();
        assert_eq!(table.blocks(), &[0]);
        assert_eq!(table.capacity(), 4);
        cache.reserve(&mut table, 4).unwrap();
        assert_eq!(table.blocks().len(), 1, "still fits in one block");
        cache.reserve(&mut table, 9).unwrap();
        assert_eq!(table.blocks(), &[0, 1, 2]);
        BlockManager::set_len(&mut table, 9);
        assert_eq!(table.num_tokens(), 9);
        assert_eq!(cache.num_free_blocks(), 1);
        assert!(cache.can_fit(1));
        assert!(!cache.can_fit(2));
    }

    #[test]
    fn failed_reserve_allocates_nothing() {
        let mut cache = cache(2);
        let mut table = BlockTable::new();
        cache.reserve(&mut table, 4).unwrap();
        let before = table.clone();
        let err = cache.reserve(&mut table, 12).unwrap_err();
        assert_eq!(err, CacheError::CacheFull { needed: 2, free: 1 });
        assert_eq!(
            err.to_string(),
            "the KV cache needs 2 more blocks but only 1 are free"
        );
        assert_eq!(table, before);
        assert_eq!(cache.num_free_blocks(), 1);
    }

    #[test]
    fn release_returns_every_block() {
        let mut cache = cache(3);
        let mut a = BlockTable::new();
        let mut b = BlockTable::new();
        cache.reserve(&mut a, 5).unwrap();
        cache.reserve(&mut b, 1).unwrap();
        BlockManager::set_len(&mut a, 5);
        cache.release(&mut a);
        assert_eq!(a, BlockTable::new());
        assert_eq!(cache.num_free_blocks(), 2);
        cache.release(&mut b);
        assert_eq!(cache.num_free_blocks(), cache.num_total_blocks());
    }

    #[test]
    fn try_new_rejects_bad_layout() {
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 2,
            block_size: 4,
            num_blocks: 0,
        };
        assert!(matches!(
            BlockManager::try_new(layout),
            Err(CacheError::InvalidLayout {
                field: "num_blocks",
                ..
            })
        ));
    }
}
