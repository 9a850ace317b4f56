//! One sequence's view of the cache: its blocks in order and how many tokens they hold.

use crate::prefix::Link;
use crate::BlockId;

/// The blocks of one sequence, in token order, and the number of tokens stored in them.
///
/// Token `pos` lives in block `blocks()[pos / block_size]` at offset `pos % block_size`.
/// Tables are grown, shared and emptied only through [`crate::BlockManager`], which keeps the
/// pool's reference counts in step: a block may appear in several tables when they share a
/// prefix. A clone is a view, not a second holder; release a table once. Two tables are equal
/// when they hold the same blocks and lengths.
#[derive(Debug, Clone, Default)]
pub struct BlockTable {
    pub(crate) blocks: Vec<BlockId>,
    pub(crate) num_tokens: usize,
    /// Tokens the reserved blocks can hold; kept so `set_len` can check its argument.
    pub(crate) capacity: usize,
    /// Where the last [`crate::BlockManager::commit`] of this table stopped, so the next one
    /// hashes only the blocks filled since.
    pub(crate) committed: Option<CommitMark>,
}

/// A point up to which a table's blocks are registered in the prefix index: the first `blocks`
/// blocks, each its own registration's home, the last (`home`) registered as `link`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CommitMark {
    pub(crate) blocks: usize,
    pub(crate) home: BlockId,
    pub(crate) link: Link,
}

/// The commit mark is bookkeeping of the prefix index, not part of what a table holds.
impl PartialEq for BlockTable {
    fn eq(&self, other: &Self) -> bool {
        (&self.blocks, self.num_tokens, self.capacity)
            == (&other.blocks, other.num_tokens, other.capacity)
    }
}

impl Eq for BlockTable {}

impl BlockTable {
    /// An empty table owning no blocks.
    pub fn new() -> Self {
        Self::default()
    }

    /// The blocks, in token order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Tokens whose K and V are stored.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// Tokens the reserved blocks can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Flat slot index of token `pos` in the storage: `block * block_size + pos % block_size`.
    ///
    /// # Panics
    /// If `pos` lies beyond the reserved blocks, or `block_size` is zero; both are engine bugs,
    /// since positions come from the engine's own bookkeeping.
    pub fn slot(&self, pos: usize, block_size: usize) -> usize {
        let block = self.blocks[pos / block_size] as usize;
        block * block_size + pos % block_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_mapping_follows_blocks() {
        let table = BlockTable {
            blocks: vec![7, 2, 5],
            num_tokens: 40,
            capacity: 48,
            committed: None,
        };
        assert_eq!(table.slot(0, 16), 7 * 16);
        assert_eq!(table.slot(15, 16), 7 * 16 + 15);
        assert_eq!(table.slot(16, 16), 2 * 16);
        assert_eq!(table.slot(33, 16), 5 * 16 + 1);
        assert_eq!(table.slot(47, 16), 5 * 16 + 15);
    }

    #[test]
    #[should_panic]
    fn slot_beyond_reserved_blocks_panics() {
        let table = BlockTable {
            blocks: vec![0],
            num_tokens: 1,
            capacity: 16,
            committed: None,
        };
        table.slot(16, 16);
    }
}
