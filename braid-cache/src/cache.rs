//! The engine-facing block manager: hands KV blocks to block tables, shares full blocks between
//! tables through the exact prefix index, and evicts cached blocks in least-recently-released order.
//! The blocks' contents live wherever the backend keeps them ([`crate::KvStorage`] on the CPU,
//! device memory on a GPU).

use std::io::{Read, Write};
use std::path::Path;

use crate::prefix::{KeyFn, Link, PrefixIndex};
use crate::snapshot;
use crate::table::CommitMark;
use crate::{
    BlockContents, BlockId, BlockPool, BlockTable, CacheError, KvLayout, PrefixKey, SnapshotMeta,
    SnapshotSummary,
};

/// Counters of the block manager, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Blocks registered in the prefix index, held by tables or evictable.
    pub cached_blocks: usize,
    /// Blocks no table holds that are kept for their contents (a subset of `cached_blocks`).
    pub evictable_blocks: usize,
    /// Blocks on the free list.
    pub free_blocks: usize,
    /// Tokens [`BlockManager::match_prefix`] found cached, summed over its calls.
    pub hits_tokens: u64,
    /// Calls of [`BlockManager::match_prefix`] on an empty table.
    pub queries: u64,
    /// Prompt tokens those calls looked up, so `hits_tokens / queried_tokens` is the hit rate.
    pub queried_tokens: u64,
    /// Cached blocks dropped to make room.
    pub evictions: u64,
}

/// The block pool of one KV cache, its prefix index, and the layout its blocks follow.
#[derive(Debug, Clone)]
pub struct BlockManager {
    layout: KvLayout,
    pool: BlockPool,
    index: PrefixIndex,
    hits_tokens: u64,
    queries: u64,
    queried_tokens: u64,
    evictions: u64,
}

impl BlockManager {
    /// An empty cache for `layout`, or an error naming the field when the layout is unusable.
    pub fn try_new(layout: KvLayout) -> Result<Self, CacheError> {
        Self::with_key_fn(layout, PrefixKey::child)
    }

    fn with_key_fn(layout: KvLayout, key_fn: KeyFn) -> Result<Self, CacheError> {
        layout.validate()?;
        Ok(Self {
            layout,
            pool: BlockPool::new(layout.num_blocks),
            index: PrefixIndex::new(layout.num_blocks, key_fn),
            hits_tokens: 0,
            queries: 0,
            queried_tokens: 0,
            evictions: 0,
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

    /// The pool, for inspecting block states and reference counts.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// The tokens block `id` is registered with in the prefix index, or `None` when it is not
    /// registered.
    pub fn cached_tokens(&self, id: BlockId) -> Option<&[u32]> {
        self.index.tokens(id)
    }

    /// Blocks `table` still lacks to hold `new_len` tokens (zero if it already can).
    pub fn blocks_needed(&self, table: &BlockTable, new_len: usize) -> usize {
        self.layout()
            .blocks_for_tokens(new_len)
            .saturating_sub(table.blocks.len())
    }

    /// Grow `table` so it can hold `new_len` tokens; all-or-nothing: on failure nothing is
    /// allocated or evicted.
    ///
    /// Blocks come from the free list first, then from the cached block released longest ago,
    /// whose index entry is dropped. A `new_len` at or below the table's capacity is a no-op:
    /// tables never shrink here.
    pub fn reserve(&mut self, table: &mut BlockTable, new_len: usize) -> Result<(), CacheError> {
        let needed = self.blocks_needed(table, new_len);
        let available = self.pool.num_available();
        if needed > available {
            return Err(CacheError::CacheFull {
                needed,
                free: available,
            });
        }
        table.blocks.reserve(needed);
        for _ in 0..needed {
            match self.take_block() {
                Some(id) => table.blocks.push(id),
                // Unreachable after the count check above; kept total rather than panicking.
                None => return Err(CacheError::CacheFull { needed, free: 0 }),
            }
        }
        table.capacity = table.blocks.len() * self.layout.block_size;
        Ok(())
    }

    /// One block for exclusive use: a free one, else the oldest evictable one, unregistered.
    fn take_block(&mut self) -> Option<BlockId> {
        let id = match self.pool.allocate() {
            Some(id) => id,
            None => {
                let id = self.pool.evict_oldest()?;
                self.evictions += 1;
                id
            }
        };
        // A free block is never registered; dropping the entry here keeps that true even if a
        // caller released a stale copy of a table.
        self.index.remove(id);
        Some(id)
    }

    /// Record that the table now holds `len` tokens (≤ capacity).
    ///
    /// A `len` beyond the reserved capacity is an engine bug: it trips a debug assertion and is
    /// clamped to the capacity in release builds. After shrinking a table, call
    /// [`BlockManager::prepare_append`] before writing again.
    pub fn set_len(table: &mut BlockTable, len: usize) {
        debug_assert!(
            len <= table.capacity,
            "block table length {len} exceeds its reserved capacity of {} tokens",
            table.capacity
        );
        table.num_tokens = len.min(table.capacity);
    }

    /// Drops `table`'s hold on each of its blocks; the table becomes empty.
    ///
    /// A block no other table holds becomes evictable if it is registered in the prefix index,
    /// free otherwise. Blocks are released from the table's tail to its head, so the tail is
    /// evicted first and the surviving cached blocks stay reachable from the start of a prompt.
    pub fn release(&mut self, table: &mut BlockTable) {
        for id in table.blocks.drain(..).rev() {
            let registered = self.index.contains(id);
            self.pool.release(id, registered);
        }
        table.num_tokens = 0;
        table.capacity = 0;
        table.committed = None;
    }

    /// Attaches to the empty `table` the longest run of cached full blocks that hold `tokens`'
    /// leading blocks, sets its length to the tokens they cover, and returns that count.
    ///
    /// The match stops at the largest multiple of the block size that is at most
    /// `tokens.len() - 1`: the caller must run at least one token to get logits. Matched blocks
    /// gain a reference (and leave the eviction order). A table that already holds blocks is left
    /// as it is and 0 comes back.
    pub fn match_prefix(&mut self, table: &mut BlockTable, tokens: &[u32]) -> usize {
        if !table.blocks.is_empty() || table.num_tokens != 0 {
            return 0;
        }
        self.queries += 1;
        self.queried_tokens += tokens.len() as u64;
        let block_size = self.layout.block_size;
        let max_blocks = tokens.len().saturating_sub(1) / block_size;
        let mut parent = Link::ROOT;
        for block in tokens.chunks_exact(block_size).take(max_blocks) {
            let Some((id, link)) = self.index.find(parent, block) else {
                break;
            };
            self.pool.retain(id);
            table.blocks.push(id);
            parent = link;
        }
        let matched = table.blocks.len() * block_size;
        table.num_tokens = matched;
        table.capacity = matched;
        self.hits_tokens += matched as u64;
        matched
    }

    /// Registers every full block of `table` whose key is not cached yet, once the KV of
    /// `tokens[..table.num_tokens()]` is computed; idempotent. `tokens` are the ones the table's
    /// KV was computed from, the same on every call for the same table.
    ///
    /// Where another block already holds a block's prefix, that one stays registered and this
    /// one is not. `tokens` shorter than the table commits only the blocks it covers.
    ///
    /// The table remembers how far its blocks are registered as their own homes, so a sequence
    /// that commits after every filled block hashes only the new ones, not its whole prefix
    /// again. That mark is trusted only while its block is still the table's and still carries
    /// the same registration: a block the table holds cannot be evicted, and its ancestors are
    /// the table's earlier blocks, held too.
    pub fn commit(&mut self, table: &mut BlockTable, tokens: &[u32]) {
        let block_size = self.layout.block_size;
        let computed = table.num_tokens.min(tokens.len());
        let full = (computed / block_size).min(table.blocks.len());
        let resume = table.committed.filter(|mark| {
            mark.blocks <= full
                && table.blocks.get(mark.blocks.wrapping_sub(1)) == Some(&mark.home)
                && self.index.link(mark.home) == Some(mark.link)
        });
        let (start, mut parent) = resume.map_or((0, Link::ROOT), |mark| (mark.blocks, mark.link));
        // The mark advances while every block so far is its own registration's home.
        let mut mark = resume;
        let mut owned = true;
        for (i, (block, &id)) in tokens[..full * block_size]
            .chunks_exact(block_size)
            .zip(&table.blocks)
            .enumerate()
            .skip(start)
        {
            let home = if let Some((home, link)) = self.index.find(parent, block) {
                parent = link;
                home
            } else {
                // A block of a stale table copy may be free by now; registering it would let a
                // later allocation overwrite a cached prefix.
                if !self.pool.is_allocated(id) {
                    break;
                }
                // Nobody holds this prefix, so this block becomes its home. A registration it
                // already had is stale (an ancestor was evicted and recomputed since) and is
                // replaced.
                parent = self.index.insert(id, parent, block);
                id
            };
            owned &= home == id;
            if owned {
                mark = Some(CommitMark {
                    blocks: i + 1,
                    home: id,
                    link: parent,
                });
            }
        }
        table.committed = mark;
    }

    /// A new table sharing `table`'s blocks that hold tokens (each gains a reference), with the
    /// same length. Reserved blocks past the length are not shared.
    pub fn fork(&mut self, table: &BlockTable) -> BlockTable {
        self.fork_prefix(table, table.num_tokens)
    }

    /// A new table sharing the blocks that hold `table`'s first `len` tokens (each gains a
    /// reference), with length `len`; `len` above the table's length is clamped to it. The last
    /// shared block may be partly filled: call [`BlockManager::prepare_append`] on the new table
    /// before writing to it.
    pub fn fork_prefix(&mut self, table: &BlockTable, len: usize) -> BlockTable {
        let len = len.min(table.num_tokens);
        let used = self.layout.blocks_for_tokens(len).min(table.blocks.len());
        let blocks = table.blocks[..used].to_vec();
        for &id in &blocks {
            self.pool.retain(id);
        }
        BlockTable {
            blocks,
            num_tokens: len,
            capacity: used * self.layout.block_size,
            committed: None,
        }
    }

    /// Leading tokens of `tokens` that [`BlockManager::match_prefix`] would attach now, without
    /// taking anything or counting a query.
    pub fn cached_prefix_len(&self, tokens: &[u32]) -> usize {
        let block_size = self.layout.block_size;
        let max_blocks = tokens.len().saturating_sub(1) / block_size;
        let mut parent = Link::ROOT;
        let mut matched = 0;
        for block in tokens.chunks_exact(block_size).take(max_blocks) {
            let Some((_, link)) = self.index.find(parent, block) else {
                break;
            };
            parent = link;
            matched += block_size;
        }
        matched
    }

    /// Makes every block the table's next tokens will be written to private to it; call before
    /// writing at position `table.num_tokens()`.
    ///
    /// A block there that another table shares is replaced by a fresh one (copy-on-write); a
    /// private one registered in the prefix index is unregistered, since writing would change the
    /// contents its entry describes. When the replaced block holds some of this table's tokens,
    /// returns `(old, new)`: the backend must copy the block's KV from `old` to `new` before
    /// writing. All-or-nothing: when too few blocks are available, nothing changes.
    pub fn prepare_append(
        &mut self,
        table: &mut BlockTable,
    ) -> Result<Option<(BlockId, BlockId)>, CacheError> {
        let block_size = self.layout.block_size;
        let first = table.num_tokens / block_size;
        let Some(writable) = table.blocks.get(first..) else {
            return Ok(None);
        };
        let needed = writable
            .iter()
            .filter(|&&id| self.pool.ref_count(id) > 1)
            .count();
        let available = self.pool.num_available();
        if needed > available {
            return Err(CacheError::CacheFull {
                needed,
                free: available,
            });
        }
        let mut copy = None;
        for i in first..table.blocks.len() {
            let old = table.blocks[i];
            if self.pool.ref_count(old) <= 1 {
                self.index.remove(old);
                continue;
            }
            let Some(new) = self.take_block() else {
                // Unreachable after the count check above; kept total rather than panicking.
                return Err(CacheError::CacheFull { needed, free: 0 });
            };
            self.pool.release(old, self.index.contains(old));
            table.blocks[i] = new;
            if i == first && !table.num_tokens.is_multiple_of(block_size) {
                copy = Some((old, new));
            }
        }
        Ok(copy)
    }

    /// Blocks [`BlockManager::reserve`] can hand out now: free ones plus cached ones no table
    /// holds.
    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_available()
    }

    /// Blocks in the cache.
    pub fn num_total_blocks(&self) -> usize {
        self.pool.num_total()
    }

    /// Whether `extra_blocks` more blocks can be allocated right now (evicting cached ones if
    /// need be).
    pub fn can_fit(&self, extra_blocks: usize) -> bool {
        extra_blocks <= self.pool.num_available()
    }

    /// Writes every cached full block (its place in the prefix tree, its tokens, and its KV read
    /// through `contents`) to `writer` as a snapshot for [`BlockManager::load_snapshot`].
    ///
    /// Blocks held by tables are saved as well as evictable ones: a registered block's KV no
    /// longer changes. Registered blocks whose ancestor was evicted can be reached by no prompt;
    /// they are left out and counted as skipped. `writer` sees few, large writes; the snapshot
    /// format is described in the [`crate::snapshot`] module. Nothing in the cache changes.
    pub fn save_snapshot(
        &self,
        contents: &mut dyn BlockContents,
        meta: &SnapshotMeta,
        writer: impl Write,
    ) -> Result<SnapshotSummary, CacheError> {
        snapshot::save(&self.layout, &self.index, contents, meta, writer)
    }

    /// [`BlockManager::save_snapshot`] into the file at `path`, replaced atomically: the snapshot
    /// is written and synced beside it (`<path>.partial`) and renamed over it only when complete.
    pub fn save_snapshot_file(
        &self,
        contents: &mut dyn BlockContents,
        meta: &SnapshotMeta,
        path: &Path,
    ) -> Result<SnapshotSummary, CacheError> {
        snapshot::save_to_path(path, |writer| self.save_snapshot(contents, meta, writer))
    }

    /// Loads a snapshot written by [`BlockManager::save_snapshot`] for the same model, dtype and
    /// KV layout (the pool size may differ), so its prompts' cached prefixes need no prefill.
    ///
    /// The whole stream is read and verified (magic, version, dtype, layout, bytes per block,
    /// fingerprint, sizes, checksum, no bytes after it) before the cache changes; a refused
    /// snapshot leaves every block's state, registration and meaningful contents as they were.
    /// Only KV bytes of free blocks, which mean nothing, may have been overwritten.
    ///
    /// Each snapshot block whose prefix is not cached yet goes into a free block and becomes a
    /// cached, evictable block that [`BlockManager::match_prefix`] finds like a computed one.
    /// Blocks already cached are left as they are. A load never evicts: when free blocks run
    /// out, the remaining blocks are skipped, as are blocks whose parent was not loaded; the
    /// summary counts them.
    pub fn load_snapshot(
        &mut self,
        contents: &mut dyn BlockContents,
        meta: &SnapshotMeta,
        reader: impl Read,
    ) -> Result<SnapshotSummary, CacheError> {
        snapshot::load(
            &self.layout,
            &mut self.pool,
            &mut self.index,
            contents,
            meta,
            reader,
        )
    }

    /// [`BlockManager::load_snapshot`] from the file at `path`. A missing file is a
    /// [`crate::SnapshotError::Io`] of kind [`std::io::ErrorKind::NotFound`].
    pub fn load_snapshot_file(
        &mut self,
        contents: &mut dyn BlockContents,
        meta: &SnapshotMeta,
        path: &Path,
    ) -> Result<SnapshotSummary, CacheError> {
        let reader = snapshot::open_for_load(path)?;
        self.load_snapshot(contents, meta, reader)
    }

    /// The manager's counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            cached_blocks: self.index.len(),
            evictable_blocks: self.pool.num_evictable(),
            free_blocks: self.pool.num_free(),
            hits_tokens: self.hits_tokens,
            queries: self.queries,
            queried_tokens: self.queried_tokens,
            evictions: self.evictions,
        }
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

    /// Block size 4; `num_blocks` blocks.
    fn layout(num_blocks: usize) -> KvLayout {
        KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 2,
            block_size: 4,
            num_blocks,
        }
    }

    /// Runs `tokens` as a new sequence: match, reserve the rest, mark computed, commit.
    /// Returns the table and the matched token count.
    fn run(cache: &mut BlockManager, tokens: &[u32]) -> (BlockTable, usize) {
        let mut table = BlockTable::new();
        let matched = cache.match_prefix(&mut table, tokens);
        cache.reserve(&mut table, tokens.len()).unwrap();
        BlockManager::set_len(&mut table, tokens.len());
        cache.commit(&mut table, tokens);
        (table, matched)
    }

    #[test]
    fn reuses_a_three_block_prefix_exactly() {
        let mut cache = cache(10);
        let prompt: Vec<u32> = (100..114).collect(); // 3 full blocks and 2 tokens
        let (mut first, matched) = run(&mut cache, &prompt);
        assert_eq!(matched, 0);
        let first_blocks = first.blocks().to_vec();
        assert_eq!(
            cache.stats().cached_blocks,
            3,
            "the partial block is not cached"
        );

        // Same first 12 tokens, different tail: the 3 full blocks are shared while both run.
        let mut other = prompt[..12].to_vec();
        other.extend([7, 8, 9]);
        let mut second = BlockTable::new();
        assert_eq!(cache.match_prefix(&mut second, &other), 12);
        assert_eq!(second.blocks(), &first_blocks[..3]);
        assert_eq!((second.num_tokens(), second.capacity()), (12, 12));
        for &id in second.blocks() {
            assert_eq!(cache.pool().ref_count(id), 2);
        }
        for (i, &id) in second.blocks().iter().enumerate() {
            assert_eq!(cache.cached_tokens(id), Some(&prompt[i * 4..i * 4 + 4]));
        }
        cache.reserve(&mut second, other.len()).unwrap();
        assert!(
            !first_blocks.contains(&second.blocks()[3]),
            "the tail block is new"
        );

        // A prompt differing in its second block reuses only the first.
        let mut third = BlockTable::new();
        let mut diverging = prompt.clone();
        diverging[5] = 0;
        assert_eq!(cache.match_prefix(&mut third, &diverging), 4);
        assert_eq!(third.blocks(), &first_blocks[..1]);

        let stats = cache.stats();
        assert_eq!(stats.queries, 3);
        assert_eq!(stats.hits_tokens, 16);
        assert_eq!(stats.queried_tokens, 14 + 15 + 14);

        for table in [&mut first, &mut second, &mut third] {
            cache.release(table);
        }
        let stats = cache.stats();
        assert_eq!(stats.evictable_blocks, 3);
        assert_eq!(stats.free_blocks, 7);
        assert_eq!(cache.num_free_blocks(), 10);
    }

    #[test]
    fn never_matches_every_token() {
        let mut cache = cache(10);
        let prompt: Vec<u32> = (0..12).collect(); // exactly 3 blocks
        let (mut first, _) = run(&mut cache, &prompt);
        cache.release(&mut first);
        assert_eq!(cache.stats().cached_blocks, 3);

        let mut table = BlockTable::new();
        assert_eq!(
            cache.match_prefix(&mut table, &prompt),
            8,
            "the last block is recomputed"
        );
        cache.release(&mut table);
        assert_eq!(cache.match_prefix(&mut table, &prompt[..9]), 8);
        cache.release(&mut table);
        assert_eq!(cache.match_prefix(&mut table, &prompt[..8]), 4);
        cache.release(&mut table);
        assert_eq!(cache.match_prefix(&mut table, &prompt[..1]), 0);
        assert_eq!(cache.match_prefix(&mut table, &[]), 0);
        assert!(table.blocks().is_empty());
    }

    #[test]
    fn match_into_a_non_empty_table_does_nothing() {
        let mut cache = cache(4);
        let prompt: Vec<u32> = (0..9).collect();
        let (first, _) = run(&mut cache, &prompt);
        let mut busy = BlockTable::new();
        cache.reserve(&mut busy, 1).unwrap();
        let before = busy.clone();
        assert_eq!(cache.match_prefix(&mut busy, &prompt), 0);
        assert_eq!(busy, before);
        assert_eq!(
            cache.stats().queries,
            1,
            "only the first sequence's query counts"
        );
        for mut table in [first, busy] {
            cache.release(&mut table);
        }
    }

    #[test]
    fn evicts_least_recently_released_first() {
        let mut cache = cache(8);
        let a: Vec<u32> = vec![1, 1, 1, 1, 2, 2, 2, 2, 0];
        let b: Vec<u32> = vec![3, 3, 3, 3, 0];
        let c: Vec<u32> = vec![4, 4, 4, 4, 0];
        let (mut ta, _) = run(&mut cache, &a);
        let (mut tb, _) = run(&mut cache, &b);
        let (mut tc, _) = run(&mut cache, &c);
        let (a0, a1) = (ta.blocks()[0], ta.blocks()[1]);
        let (b0, c0) = (tb.blocks()[0], tc.blocks()[0]);
        // Release order b, a, c; within a, its tail (a1) goes before its head (a0).
        cache.release(&mut tb);
        cache.release(&mut ta);
        cache.release(&mut tc);
        assert_eq!(cache.stats().evictable_blocks, 4);
        assert_eq!(
            cache.stats().free_blocks,
            4,
            "the partial blocks and one never used"
        );

        // Touching c's block takes it out of the order.
        let mut again = BlockTable::new();
        assert_eq!(cache.match_prefix(&mut again, &c), 4);

        let mut big = BlockTable::new();
        cache.reserve(&mut big, 4 * 4).unwrap();
        assert_eq!(cache.stats().evictions, 0, "free blocks go first");
        cache.reserve(&mut big, 6 * 4).unwrap(); // then b0 and a1
        assert_eq!(cache.stats().evictions, 2);
        assert_eq!(&big.blocks()[4..], &[b0, a1]);
        assert!(cache.cached_tokens(b0).is_none() && cache.cached_tokens(a1).is_none());
        assert_eq!(cache.cached_tokens(a0), Some(&[1, 1, 1, 1][..]));

        cache.reserve(&mut big, 7 * 4).unwrap(); // then a0
        assert_eq!(big.blocks()[6], a0);
        assert_eq!(cache.stats().evictions, 3);
        let err = cache.reserve(&mut big, 8 * 4).unwrap_err();
        assert_eq!(err, CacheError::CacheFull { needed: 1, free: 0 });
        assert!(
            !big.blocks().contains(&c0),
            "a referenced block is never evicted"
        );
        assert_eq!(
            cache.match_prefix(&mut BlockTable::new(), &b),
            0,
            "b was evicted"
        );
    }

    #[test]
    fn colliding_keys_never_return_other_tokens() {
        // Every block gets the same key: only the stored tokens and ancestry tell them apart.
        let mut cache = BlockManager::with_key_fn(layout(12), |_, _| PrefixKey(7)).unwrap();
        let x: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8, 0];
        let y: Vec<u32> = vec![5, 6, 7, 8, 1, 2, 3, 4, 0];
        let (mut tx, _) = run(&mut cache, &x);
        let (mut ty, matched) = run(&mut cache, &y);
        assert_eq!(matched, 0, "same key, other tokens");
        assert_eq!(cache.stats().cached_blocks, 4);

        let mut t = BlockTable::new();
        assert_eq!(cache.match_prefix(&mut t, &y), 8);
        assert_eq!(t.blocks(), &ty.blocks()[..2]);
        cache.release(&mut t);
        // Right tokens in the second block but under the other first block: no match past it.
        let mixed: Vec<u32> = vec![1, 2, 3, 4, 1, 2, 3, 4, 0];
        assert_eq!(cache.match_prefix(&mut t, &mixed), 4);
        assert_eq!(t.blocks(), &tx.blocks()[..1]);
        cache.release(&mut t);
        cache.release(&mut tx);
        cache.release(&mut ty);
    }

    #[test]
    fn commit_is_idempotent_and_keeps_the_first_holder() {
        let mut cache = cache(8);
        let prompt: Vec<u32> = (0..9).collect();
        // Two sequences compute the same prompt side by side.
        let mut a = BlockTable::new();
        let mut b = BlockTable::new();
        for table in [&mut a, &mut b] {
            assert_eq!(cache.match_prefix(table, &prompt), 0);
            cache.reserve(table, 9).unwrap();
            BlockManager::set_len(table, 9);
        }
        cache.commit(&mut a, &prompt);
        cache.commit(&mut a, &prompt);
        cache.commit(&mut b, &prompt);
        assert_eq!(cache.stats().cached_blocks, 2);
        assert!(b
            .blocks()
            .iter()
            .all(|&id| cache.cached_tokens(id).is_none()));
        cache.release(&mut b);
        assert_eq!(
            cache.stats().evictable_blocks,
            0,
            "b's copies are freed, not cached"
        );

        // Commit registers only the computed part and never the partial block.
        let mut c = BlockTable::new();
        let other: Vec<u32> = (50..62).collect();
        cache.reserve(&mut c, 12).unwrap();
        BlockManager::set_len(&mut c, 7);
        cache.commit(&mut c, &other);
        assert_eq!(cache.stats().cached_blocks, 3);
        BlockManager::set_len(&mut c, 12);
        cache.commit(&mut c, &other[..5]); // tokens shorter than the table: only what they cover
        assert_eq!(cache.stats().cached_blocks, 3);
        cache.commit(&mut c, &other);
        assert_eq!(cache.stats().cached_blocks, 5);
    }

    // Key computations of the counting key function below, per thread (tests run in parallel).
    thread_local! {
        static KEYS_HASHED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn counting_key(parent: PrefixKey, tokens: &[u32]) -> PrefixKey {
        KEYS_HASHED.with(|n| n.set(n.get() + 1));
        PrefixKey::child(parent, tokens)
    }

    #[test]
    fn commit_after_each_token_hashes_each_block_once() {
        let mut cache = BlockManager::with_key_fn(layout(40), counting_key).unwrap();
        let tokens: Vec<u32> = (0..100).map(|i| i * 7 % 23).collect();
        let mut table = BlockTable::new();
        for len in 1..=tokens.len() {
            cache.reserve(&mut table, len).unwrap();
            BlockManager::set_len(&mut table, len);
            cache.commit(&mut table, &tokens);
        }
        // 25 full blocks: one key each when registered; a commit with no new block hashes none.
        assert_eq!(
            KEYS_HASHED.with(|n| n.get()),
            2 * 25,
            "a find and an insert per block"
        );
        let mut probe = BlockTable::new();
        assert_eq!(cache.match_prefix(&mut probe, &tokens), 96);
        assert_eq!(probe.blocks(), &table.blocks()[..24]);
        cache.release(&mut probe);

        // A table that computed blocks the index already holds elsewhere is not their home:
        // its mark stops before them, and every commit checks them again.
        cache.release(&mut table);
        assert!(table.committed.is_none());
        let mut again = BlockTable::new();
        assert_eq!(cache.match_prefix(&mut again, &tokens[..33]), 32);
        cache.reserve(&mut again, 40).unwrap();
        BlockManager::set_len(&mut again, 40);
        cache.commit(&mut again, &tokens);
        assert_eq!(again.committed.map(|m| m.blocks), Some(8));
        KEYS_HASHED.with(|n| n.set(0));
        cache.commit(&mut again, &tokens);
        assert_eq!(
            KEYS_HASHED.with(|n| n.get()),
            2,
            "blocks 8 and 9 are found again"
        );
        cache.release(&mut again);
    }

    #[test]
    fn recommit_after_an_evicted_ancestor_rehomes_the_chain() {
        let mut cache = cache(6);
        let prompt: Vec<u32> = vec![1, 1, 1, 1, 2, 2, 2, 2, 0];
        // `a` caches the first block; `x` computed the whole prompt on its own meanwhile, so its
        // first block is a duplicate and its second is registered under `a`'s first.
        let (mut a, _) = run(&mut cache, &prompt[..5]);
        let mut x = BlockTable::new();
        cache.reserve(&mut x, 9).unwrap();
        BlockManager::set_len(&mut x, 9);
        cache.commit(&mut x, &prompt);
        assert!(cache.cached_tokens(x.blocks()[0]).is_none());
        assert!(cache.cached_tokens(x.blocks()[1]).is_some());

        // `a`'s first block is evicted: x's second block can no longer be reached.
        cache.release(&mut a);
        let mut filler = BlockTable::new();
        cache.reserve(&mut filler, 12).unwrap();
        assert_eq!(cache.stats().evictions, 1);
        cache.release(&mut filler);
        let mut probe = BlockTable::new();
        assert_eq!(cache.match_prefix(&mut probe, &prompt), 0);

        // Committing `x` again makes its own blocks the cached chain.
        cache.commit(&mut x, &prompt);
        assert_eq!(cache.match_prefix(&mut probe, &prompt), 8);
        assert_eq!(probe.blocks(), &x.blocks()[..2]);
        assert_eq!(cache.stats().cached_blocks, 2);
        cache.release(&mut probe);
        cache.release(&mut x);
    }

    #[test]
    fn fork_shares_and_prepare_append_copies_on_write() {
        let mut cache = cache(6);
        let prompt: Vec<u32> = (0..6).collect();
        let (mut parent, _) = run(&mut cache, &prompt);
        cache.reserve(&mut parent, 12).unwrap(); // an empty third block, not shared by fork
        let mut child = cache.fork(&parent);
        assert_eq!(child.blocks(), &parent.blocks()[..2]);
        assert_eq!((child.num_tokens(), child.capacity()), (6, 8));
        assert_eq!(cache.pool().ref_count(parent.blocks()[1]), 2);

        let shared_tail = child.blocks()[1];
        let (old, new) = cache.prepare_append(&mut child).unwrap().unwrap();
        assert_eq!(old, shared_tail);
        assert_ne!(new, old);
        assert_eq!(child.blocks(), &[parent.blocks()[0], new]);
        assert_eq!(cache.pool().ref_count(old), 1);
        assert_eq!(cache.pool().ref_count(new), 1);
        assert_eq!(
            cache.prepare_append(&mut child).unwrap(),
            None,
            "already private"
        );

        // The full first block stays shared: appends never reach it.
        assert_eq!(cache.pool().ref_count(parent.blocks()[0]), 2);
        assert_eq!(cache.prepare_append(&mut parent).unwrap(), None);
        cache.release(&mut child);
        cache.release(&mut parent);
        assert_eq!(cache.stats().evictable_blocks, 1);
        assert_eq!(cache.num_free_blocks(), 6);
    }

    #[test]
    fn prepare_append_fails_whole_and_guards_shrunk_tables() {
        let mut cache = cache(3);
        let prompt: Vec<u32> = (0..10).collect();
        let (mut a, _) = run(&mut cache, &prompt);
        let mut b = cache.fork(&a);
        assert_eq!(cache.num_free_blocks(), 0);
        let before = (b.clone(), cache.stats());
        let err = cache.prepare_append(&mut b).unwrap_err();
        assert_eq!(err, CacheError::CacheFull { needed: 1, free: 0 });
        assert_eq!((b.clone(), cache.stats()), before);
        cache.release(&mut b);

        // Shrinking into a registered block and writing again would change cached contents:
        // the block is unregistered first.
        let second = a.blocks()[1];
        assert!(cache.cached_tokens(second).is_some());
        BlockManager::set_len(&mut a, 5);
        assert_eq!(cache.prepare_append(&mut a).unwrap(), None);
        assert!(cache.cached_tokens(second).is_none());
        assert!(cache.cached_tokens(a.blocks()[0]).is_some());
        cache.release(&mut a);
    }

    proptest::proptest! {
        /// Forcing every key to collide must change nothing a caller can see: the index tells
        /// blocks apart by their tokens and ancestry alone.
        #[test]
        fn colliding_keys_change_nothing(
            steps in proptest::collection::vec(
                (proptest::collection::vec(0..2u32, 1..14), 0..4usize),
                1..40,
            )
        ) {
            let mut real = BlockManager::new(layout(12));
            let mut colliding = BlockManager::with_key_fn(layout(12), |_, _| PrefixKey(0)).unwrap();
            let mut live: [Vec<BlockTable>; 2] = Default::default();
            for (tokens, release_index) in steps {
                for (cache, live) in [&mut real, &mut colliding].into_iter().zip(&mut live) {
                    if live.len() > 2 {
                        let mut table = live.remove(release_index % live.len());
                        cache.release(&mut table);
                    }
                    let mut table = BlockTable::new();
                    cache.match_prefix(&mut table, &tokens);
                    for (i, &id) in table.blocks().iter().enumerate() {
                        let want = &tokens[i * 4..(i + 1) * 4];
                        proptest::prop_assert_eq!(cache.cached_tokens(id), Some(want));
                    }
                    if cache.reserve(&mut table, tokens.len()).is_ok() {
                        BlockManager::set_len(&mut table, tokens.len());
                        cache.commit(&mut table, &tokens);
                    }
                    live.push(table);
                }
                proptest::prop_assert_eq!(&live[0], &live[1]);
                proptest::prop_assert_eq!(real.stats(), colliding.stats());
            }
        }
    }
}
