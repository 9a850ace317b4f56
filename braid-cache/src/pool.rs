//! The free list of KV blocks.

use crate::BlockId;

/// A fixed set of blocks, each either free or allocated.
///
/// Allocation hands out the lowest-numbered free blocks first on a fresh pool, so a run is
/// reproducible. Freeing a block that is not allocated is a caller bug: it trips a debug
/// assertion and is otherwise ignored, so the free list never holds a block twice.
#[derive(Debug, Clone)]
pub struct BlockPool {
    /// Free blocks; allocation pops from the end.
    free: Vec<BlockId>,
    /// `allocated[id]` is true while `id` is handed out.
    allocated: Vec<bool>,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks, ids `0..num_blocks`.
    ///
    /// # Panics
    /// If `num_blocks` exceeds `u32::MAX`, the largest pool a [`BlockId`] can address
    /// ([`crate::KvLayout::validate`] rejects such layouts up front).
    pub fn new(num_blocks: usize) -> Self {
        assert!(
            BlockId::try_from(num_blocks).is_ok(),
            "a block pool holds at most {} blocks, got {num_blocks}",
            BlockId::MAX
        );
        let free = (0..num_blocks).rev().map(|id| id as BlockId).collect();
        Self {
            free,
            allocated: vec![false; num_blocks],
        }
    }

    /// Takes one free block, or `None` when the pool is exhausted.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = self.free.pop()?;
        self.allocated[id as usize] = true;
        Some(id)
    }

    /// Returns `id` to the pool.
    pub fn free(&mut self, id: BlockId) {
        match self.allocated.get_mut(id as usize) {
            Some(slot) if *slot => {
                *slot = false;
                self.free.push(id);
            }
            _ => debug_assert!(false, "block {id} freed but it is not allocated"),
        }
    }

    /// Whether `id` is currently handed out.
    pub fn is_allocated(&self, id: BlockId) -> bool {
        self.allocated.get(id as usize).copied().unwrap_or(false)
    }

    /// Blocks available to [`BlockPool::allocate`].
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks in the pool, free or not.
    pub fn num_total(&self) -> usize {
        self.allocated.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_first_and_exhausts() {
        let mut pool = BlockPool::new(3);
        assert_eq!(pool.allocate(), Some(0));
        assert_eq!(pool.allocate(), Some(1));
        assert_eq!(pool.allocate(), Some(2));
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.num_free(), 0);
        pool.free(1);
        assert!(!pool.is_allocated(1));
        assert_eq!(pool.allocate(), Some(1));
        assert_eq!(pool.num_total(), 3);
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "not allocated"))]
    fn double_free_does_not_corrupt() {
        let mut pool = BlockPool::new(2);
        let id = pool.allocate().unwrap_or(0);
        pool.free(id);
        pool.free(id);
        // Release builds ignore the second free: the block is listed once.
        assert_eq!(pool.num_free(), 2);
        assert_eq!(pool.allocate(), Some(id));
        assert_ne!(pool.allocate(), Some(id));
    }
}
