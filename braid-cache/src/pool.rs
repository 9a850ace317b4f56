//! The state of every KV block: free, referenced by block tables (counted), or cached-evictable
//! in least-recently-released order.

use std::collections::BTreeMap;

use crate::BlockId;

/// Where one block stands, as seen from outside the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// On the free list; its contents mean nothing.
    Free,
    /// Held by this many block tables (at least one).
    Referenced(u32),
    /// Held by no table, but kept with its contents for prefix reuse until it is evicted.
    Evictable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    Referenced(u32),
    /// `tick` orders evictable blocks by the moment their last reference went away.
    Evictable {
        tick: u64,
    },
}

/// A fixed set of blocks with reference counts.
///
/// A block is free, referenced by one or more block tables, or evictable: unreferenced but kept
/// because its contents may be reused. [`BlockPool::allocate`] takes only free blocks;
/// [`BlockPool::evict_oldest`] reclaims the evictable block released longest ago. On a fresh
/// pool the lowest-numbered blocks come first, so a run is reproducible. Misuse (retaining a free
/// block, releasing an unreferenced one) is a caller bug: it trips a debug assertion and is
/// otherwise ignored, so the accounting never goes negative or lists a block twice.
#[derive(Debug, Clone)]
pub struct BlockPool {
    /// Free blocks; allocation pops from the end.
    free: Vec<BlockId>,
    slots: Vec<Slot>,
    /// Evictable blocks by release tick, oldest first.
    lru: BTreeMap<u64, BlockId>,
    next_tick: u64,
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
            slots: vec![Slot::Free; num_blocks],
            lru: BTreeMap::new(),
            next_tick: 0,
        }
    }

    /// Takes one free block with a reference count of one, or `None` when no block is free
    /// (evictable blocks are not touched).
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = self.free.pop()?;
        self.slots[id as usize] = Slot::Referenced(1);
        Some(id)
    }

    /// Takes the evictable block released longest ago, now with a reference count of one, or
    /// `None` when none is evictable. Its old contents are the caller's to forget.
    pub fn evict_oldest(&mut self) -> Option<BlockId> {
        let (_, id) = self.lru.pop_first()?;
        self.slots[id as usize] = Slot::Referenced(1);
        Some(id)
    }

    /// Adds one reference to a referenced or evictable block (an evictable one leaves the
    /// eviction order).
    pub fn retain(&mut self, id: BlockId) {
        match self.slots.get_mut(id as usize) {
            Some(Slot::Referenced(count)) => *count = count.saturating_add(1),
            Some(slot @ Slot::Evictable { .. }) => {
                if let Slot::Evictable { tick } = *slot {
                    self.lru.remove(&tick);
                }
                *slot = Slot::Referenced(1);
            }
            _ => debug_assert!(false, "block {id} retained but it is free or out of range"),
        }
    }

    /// Drops one reference. When none is left the block becomes evictable if `keep_contents`
    /// (youngest in the eviction order), else free. Returns whether that was the last reference.
    pub fn release(&mut self, id: BlockId, keep_contents: bool) -> bool {
        match self.slots.get_mut(id as usize) {
            Some(Slot::Referenced(count)) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(slot @ Slot::Referenced(_)) => {
                if keep_contents {
                    let tick = self.next_tick;
                    self.next_tick += 1;
                    *slot = Slot::Evictable { tick };
                    self.lru.insert(tick, id);
                } else {
                    *slot = Slot::Free;
                    self.free.push(id);
                }
                true
            }
            _ => {
                debug_assert!(false, "block {id} released but no table references it");
                false
            }
        }
    }

    /// The state of `id`, or `None` when it is not a block of this pool.
    pub fn state(&self, id: BlockId) -> Option<BlockState> {
        self.slots.get(id as usize).map(|slot| match *slot {
            Slot::Free => BlockState::Free,
            Slot::Referenced(count) => BlockState::Referenced(count),
            Slot::Evictable { .. } => BlockState::Evictable,
        })
    }

    /// Block tables holding `id` (zero for free, evictable or unknown blocks).
    pub fn ref_count(&self, id: BlockId) -> u32 {
        match self.slots.get(id as usize) {
            Some(Slot::Referenced(count)) => *count,
            _ => 0,
        }
    }

    /// Whether at least one block table holds `id`.
    pub fn is_allocated(&self, id: BlockId) -> bool {
        self.ref_count(id) > 0
    }

    /// Blocks on the free list.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Unreferenced blocks kept for their contents.
    pub fn num_evictable(&self) -> usize {
        self.lru.len()
    }

    /// Blocks a caller can obtain now: free plus evictable.
    pub fn num_available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Blocks in the pool, whatever their state.
    pub fn num_total(&self) -> usize {
        self.slots.len()
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
        assert!(pool.release(1, false));
        assert!(!pool.is_allocated(1));
        assert_eq!(pool.state(1), Some(BlockState::Free));
        assert_eq!(pool.allocate(), Some(1));
        assert_eq!(pool.num_total(), 3);
        assert_eq!(pool.state(3), None);
    }

    #[test]
    fn reference_counts_and_eviction_order() {
        let mut pool = BlockPool::new(4);
        let ids: Vec<_> = (0..3).filter_map(|_| pool.allocate()).collect();
        assert_eq!(ids, [0, 1, 2]);
        pool.retain(0);
        assert_eq!(pool.ref_count(0), 2);
        assert!(!pool.release(0, true), "one reference is left");
        // Released in the order 2, 0, 1: that is the eviction order.
        assert!(pool.release(2, true));
        assert!(pool.release(0, true));
        assert!(pool.release(1, true));
        assert_eq!(pool.num_evictable(), 3);
        assert_eq!(pool.num_available(), 4);
        // Retaining 0 takes it out of the order; the others keep theirs.
        pool.retain(0);
        assert_eq!(pool.state(0), Some(BlockState::Referenced(1)));
        assert_eq!(pool.evict_oldest(), Some(2));
        assert_eq!(pool.evict_oldest(), Some(1));
        assert_eq!(pool.evict_oldest(), None);
        assert_eq!(pool.ref_count(1), 1);
        assert_eq!(pool.allocate(), Some(3));
        assert_eq!(pool.num_available(), 0);
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "no table references it"))]
    fn double_release_does_not_corrupt() {
        let mut pool = BlockPool::new(2);
        let id = pool.allocate().unwrap_or(0);
        pool.release(id, false);
        pool.release(id, false);
        // Release builds ignore the second release: the block is listed once.
        assert_eq!(pool.num_free(), 2);
        assert_eq!(pool.allocate(), Some(id));
        assert_ne!(pool.allocate(), Some(id));
    }
}
