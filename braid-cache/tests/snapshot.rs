//! Prefix cache snapshots end to end on the CPU: round trips that keep matches and KV bytes,
//! idempotent and partial loads, and refusals (mismatched, truncated, corrupt, malformed files,
//! failing backends) that leave the cache exactly as it was.

use braid_cache::{
    BlockContents, BlockId, BlockManager, BlockState, BlockTable, CacheError, CacheStats, KvLayout,
    KvStorage, SnapshotError, SnapshotMeta, SnapshotSummary,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

const BLOCK_SIZE: usize = 4;
const LAYERS: usize = 2;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 3;
const KV_DIM: usize = KV_HEADS * HEAD_DIM;

fn layout(num_blocks: usize) -> KvLayout {
    KvLayout {
        num_layers: LAYERS,
        num_kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        block_size: BLOCK_SIZE,
        num_blocks,
    }
}

fn meta() -> SnapshotMeta {
    SnapshotMeta {
        fingerprint: SnapshotMeta::fingerprint_of(&[b"test-model", b"f32"]),
        dtype: KvStorage::DTYPE.into(),
    }
}

/// The K row a forward pass would store for the last token of `prefix` in `layer`: it depends on
/// every earlier token, as real KV does, so equal tokens after different prefixes differ.
fn k_row(layer: usize, prefix: &[u32]) -> [f32; KV_DIM] {
    let mut hash: u32 = 0x811c_9dc5;
    for &token in prefix {
        hash = (hash ^ token).wrapping_mul(0x0100_0193);
    }
    let last = prefix.last().copied().unwrap_or(0);
    [
        last as f32,
        prefix.len() as f32,
        layer as f32,
        (hash >> 12) as f32,
        (hash & 0xfff) as f32,
        0.25,
    ]
}

fn v_row(layer: usize, prefix: &[u32]) -> [f32; KV_DIM] {
    k_row(layer, prefix).map(|x| -x - 1.0)
}

/// A block manager and the CPU storage of its blocks, driven as the engine drives them.
#[derive(Clone)]
struct Cache {
    manager: BlockManager,
    storage: KvStorage,
}

impl Cache {
    fn new(num_blocks: usize) -> Self {
        Self {
            manager: BlockManager::new(layout(num_blocks)),
            storage: KvStorage::new(layout(num_blocks)),
        }
    }

    /// Runs `tokens` as a new sequence: match the cached prefix, compute the rest, commit.
    /// Returns the live table, or `None` when the cache had no room (nothing is kept then).
    fn run(&mut self, tokens: &[u32]) -> Option<BlockTable> {
        let mut table = BlockTable::new();
        let matched = self.manager.match_prefix(&mut table, tokens);
        if self.manager.reserve(&mut table, tokens.len()).is_err() {
            self.manager.release(&mut table);
            return None;
        }
        for pos in matched..tokens.len() {
            let slot = table.slot(pos, BLOCK_SIZE);
            for layer in 0..LAYERS {
                let prefix = &tokens[..=pos];
                self.storage
                    .write(layer, &[slot], &k_row(layer, prefix), &v_row(layer, prefix));
            }
        }
        BlockManager::set_len(&mut table, tokens.len());
        self.manager.commit(&mut table, tokens);
        Some(table)
    }

    /// Runs `tokens` and releases the table at once, leaving its full blocks cached.
    fn run_and_release(&mut self, tokens: &[u32]) {
        if let Some(mut table) = self.run(tokens) {
            self.manager.release(&mut table);
        }
    }

    fn save(&mut self) -> (Vec<u8>, SnapshotSummary) {
        let mut bytes = Vec::new();
        let summary = self
            .manager
            .save_snapshot(&mut self.storage, &meta(), &mut bytes)
            .unwrap();
        assert_eq!(summary.bytes, bytes.len() as u64);
        (bytes, summary)
    }

    fn load(&mut self, bytes: &[u8]) -> Result<SnapshotSummary, CacheError> {
        self.manager
            .load_snapshot(&mut self.storage, &meta(), bytes)
    }

    fn block_bytes(&mut self, id: BlockId) -> Vec<u8> {
        let mut bytes = vec![0u8; self.storage.block_bytes()];
        self.storage.read_block(id, &mut bytes).unwrap();
        bytes
    }

    /// Tokens the cache supplies for `tokens` now, without keeping the match.
    fn matched(&mut self, tokens: &[u32]) -> usize {
        let mut table = BlockTable::new();
        let matched = self.manager.match_prefix(&mut table, tokens);
        self.manager.release(&mut table);
        matched
    }

    /// Everything a caller can observe: each block's state, registration and (unless free) KV
    /// bytes, the counters, and the order in which blocks would be handed out.
    fn observe(&mut self) -> Observed {
        let blocks = (0..self.manager.num_total_blocks() as BlockId)
            .map(|id| {
                let state = self.manager.pool().state(id);
                let kv = (state != Some(BlockState::Free)).then(|| self.block_bytes(id));
                let tokens = self.manager.cached_tokens(id).map(<[u32]>::to_vec);
                (state, tokens, kv)
            })
            .collect();
        let mut probe = self.manager.clone();
        let mut table = BlockTable::new();
        let available = probe.num_free_blocks();
        probe.reserve(&mut table, available * BLOCK_SIZE).unwrap();
        Observed {
            blocks,
            stats: self.manager.stats(),
            hand_out_order: table.blocks().to_vec(),
        }
    }
}

/// One block as a caller sees it: state, registered tokens, KV bytes (none when free).
type BlockView = (Option<BlockState>, Option<Vec<u32>>, Option<Vec<u8>>);

#[derive(Debug, PartialEq)]
struct Observed {
    blocks: Vec<BlockView>,
    stats: CacheStats,
    hand_out_order: Vec<BlockId>,
}

/// Block ownership and registration stay consistent with the live tables: no block is held by
/// more tables than its count says, none is lost, free blocks are unregistered, evictable ones
/// registered, and the counters agree.
fn check_invariants(cache: &Cache, tables: &[&BlockTable]) -> Result<(), TestCaseError> {
    let total = cache.manager.num_total_blocks();
    let mut holdings = vec![0u32; total];
    for table in tables {
        for &id in table.blocks() {
            prop_assert!((id as usize) < total, "block {} out of range", id);
            holdings[id as usize] += 1;
        }
    }
    let (mut free, mut evictable, mut registered) = (0, 0, 0);
    for (id, &held) in holdings.iter().enumerate() {
        let block = id as BlockId;
        prop_assert_eq!(cache.manager.pool().ref_count(block), held);
        let cached = cache.manager.cached_tokens(block).is_some();
        registered += usize::from(cached);
        match cache.manager.pool().state(block) {
            Some(BlockState::Free) => {
                free += 1;
                prop_assert!(!cached, "free block {} is registered", id);
                prop_assert_eq!(held, 0, "free block {} is held", id);
            }
            Some(BlockState::Evictable) => {
                evictable += 1;
                prop_assert!(cached, "evictable block {} is not registered", id);
                prop_assert_eq!(held, 0, "evictable block {} is held", id);
            }
            Some(BlockState::Referenced(count)) => prop_assert_eq!(count, held),
            None => prop_assert!(false, "block {} unknown to the pool", id),
        }
    }
    let stats = cache.manager.stats();
    prop_assert_eq!(stats.free_blocks, free);
    prop_assert_eq!(stats.evictable_blocks, evictable);
    prop_assert_eq!(stats.cached_blocks, registered);
    prop_assert_eq!(cache.manager.num_free_blocks(), free + evictable);
    Ok(())
}

/// Every block `match_prefix` hands out for `tokens` holds exactly the KV a forward pass over
/// `tokens` would have written.
fn check_matched_kv(cache: &mut Cache, tokens: &[u32]) -> Result<usize, TestCaseError> {
    let mut table = BlockTable::new();
    let matched = cache.manager.match_prefix(&mut table, tokens);
    let (mut bad_pos, mut checked) = (None, 0);
    for pos in 0..matched {
        let slot = table.slot(pos, BLOCK_SIZE);
        for layer in 0..LAYERS {
            let (k, v) = cache.storage.layer(layer);
            let prefix = &tokens[..=pos];
            let rows = slot * KV_DIM..(slot + 1) * KV_DIM;
            if k[rows.clone()] != k_row(layer, prefix) || v[rows] != v_row(layer, prefix) {
                bad_pos.get_or_insert(pos);
            }
            checked += 1;
        }
    }
    cache.manager.release(&mut table);
    prop_assert_eq!(bad_pos, None, "a matched block holds the wrong KV");
    prop_assert_eq!(checked, matched * LAYERS);
    Ok(matched)
}

fn prompt(range: std::ops::Range<u32>) -> Vec<u32> {
    range.collect()
}

/// A source cache with a branch, an unrelated chain and a live table:
/// `a` = 3 full blocks + 2 tokens; `b` shares `a`'s first block; `c` is unrelated and still held.
fn source() -> (Cache, BlockTable, [Vec<u32>; 3]) {
    let mut cache = Cache::new(16);
    let a = prompt(100..114);
    let mut b = a[..4].to_vec();
    b.extend(200..209);
    let c = prompt(300..309);
    cache.run_and_release(&a);
    cache.run_and_release(&b);
    let live = cache.run(&c).unwrap();
    (cache, live, [a, b, c])
}

#[test]
fn round_trip_restores_matches_and_kv_bytes() {
    let (mut src, mut live, prompts) = source();
    let cached = src.manager.stats().cached_blocks;
    assert_eq!(cached, 3 + 2 + 2);
    let (bytes, saved) = src.save();
    assert_eq!(
        saved,
        SnapshotSummary {
            blocks: cached,
            tokens: cached * BLOCK_SIZE,
            already_cached_blocks: 0,
            skipped_blocks: 0,
            skipped_tokens: 0,
            bytes: bytes.len() as u64,
        }
    );

    let mut dst = Cache::new(10);
    let loaded = dst.load(&bytes).unwrap();
    assert_eq!(
        loaded,
        SnapshotSummary {
            bytes: bytes.len() as u64,
            ..saved
        }
    );
    let stats = dst.manager.stats();
    assert_eq!(
        (stats.cached_blocks, stats.evictable_blocks),
        (cached, cached)
    );
    assert_eq!(stats.free_blocks, 10 - cached);
    assert_eq!(stats.evictions, 0);
    check_invariants(&dst, &[]).unwrap();

    for tokens in &prompts {
        let mut from_src = BlockTable::new();
        let mut from_dst = BlockTable::new();
        let matched = src.manager.match_prefix(&mut from_src, tokens);
        assert!(matched >= 8);
        assert_eq!(dst.manager.match_prefix(&mut from_dst, tokens), matched);
        for (&s, &d) in from_src.blocks().iter().zip(from_dst.blocks()) {
            assert_eq!(dst.manager.cached_tokens(d), src.manager.cached_tokens(s));
            assert_eq!(dst.block_bytes(d), src.block_bytes(s), "KV bytes differ");
        }
        src.manager.release(&mut from_src);
        dst.manager.release(&mut from_dst);
        check_matched_kv(&mut dst, tokens).unwrap();
    }

    // A loaded block serves a new sequence exactly like a computed one: the sequence computes
    // only its tail, and committing extends the loaded chain.
    let mut longer = prompts[0].clone();
    longer.extend(500..506);
    let hits = dst.manager.stats().hits_tokens;
    let mut table = dst.run(&longer).unwrap();
    assert_eq!(
        dst.manager.stats().hits_tokens - hits,
        12,
        "only the tail is computed"
    );
    assert_eq!(dst.manager.stats().cached_blocks, cached + 2);
    check_invariants(&dst, &[&table]).unwrap();
    dst.manager.release(&mut table);
    assert_eq!(check_matched_kv(&mut dst, &longer).unwrap(), 16);
    src.manager.release(&mut live);
}

#[test]
fn loading_twice_changes_nothing_the_second_time() {
    let (mut src, _live, prompts) = source();
    let (bytes, saved) = src.save();
    let mut dst = Cache::new(12);
    dst.load(&bytes).unwrap();
    let after_first = dst.observe();
    let again = dst.load(&bytes).unwrap();
    assert_eq!(again.blocks, 0);
    assert_eq!(again.already_cached_blocks, saved.blocks);
    assert_eq!(again.skipped_blocks, 0);
    assert_eq!(dst.observe(), after_first);
    for tokens in &prompts {
        check_matched_kv(&mut dst, tokens).unwrap();
    }
}

#[test]
fn partial_load_takes_the_first_entries_and_never_touches_held_or_cached_blocks() {
    let (mut src, _live, [a, b, c]) = source();
    let (bytes, saved) = src.save();

    // 6 blocks: 2 held by a live table, 1 cached from the target's own work, 3 free.
    let mut dst = Cache::new(6);
    let own = prompt(900..905);
    dst.run_and_release(&own);
    let mut held = dst.run(&prompt(700..706)).unwrap();
    let before = dst.observe();
    assert_eq!(dst.manager.stats().free_blocks, 3);

    let loaded = dst.load(&bytes).unwrap();
    assert_eq!(loaded.blocks, 3);
    assert_eq!(loaded.tokens, 3 * BLOCK_SIZE);
    assert_eq!(loaded.skipped_blocks, saved.blocks - 3);
    assert_eq!(loaded.skipped_tokens, (saved.blocks - 3) * BLOCK_SIZE);
    assert_eq!(dst.manager.stats().free_blocks, 0);
    assert_eq!(dst.manager.stats().evictions, 0, "a load never evicts");

    // Registration order put `a`'s chain first: it is whole; `b` and `c` are skipped.
    assert_eq!(check_matched_kv(&mut dst, &a).unwrap(), 12);
    assert_eq!(
        check_matched_kv(&mut dst, &b).unwrap(),
        4,
        "only the shared block"
    );
    assert_eq!(check_matched_kv(&mut dst, &c).unwrap(), 0);

    // The held table and the target's own cached block are as they were.
    check_invariants(&dst, &[&held]).unwrap();
    for id in 0..6 {
        let (state, tokens, kv) = &before.blocks[id];
        if *state != Some(BlockState::Free) {
            assert_eq!(
                (
                    dst.manager.pool().state(id as BlockId),
                    dst.manager
                        .cached_tokens(id as BlockId)
                        .map(<[u32]>::to_vec),
                    Some(dst.block_bytes(id as BlockId))
                ),
                (*state, tokens.clone(), kv.clone()),
                "block {id} changed"
            );
        }
    }
    assert_eq!(check_matched_kv(&mut dst, &own).unwrap(), 4);
    dst.manager.release(&mut held);
    check_invariants(&dst, &[]).unwrap();
}

#[test]
fn existing_contents_survive_and_shared_prefixes_are_not_duplicated() {
    let (mut src, _live, [a, b, c]) = source();
    let (bytes, _) = src.save();
    // The target computed `a` itself and still runs `b`'s first block in a live table.
    let mut dst = Cache::new(20);
    dst.run_and_release(&a);
    let mut running = dst.run(&b[..6]).unwrap();
    let a_blocks = {
        let mut table = BlockTable::new();
        dst.manager.match_prefix(&mut table, &a);
        let blocks = table.blocks().to_vec();
        dst.manager.release(&mut table);
        blocks
    };
    let kv_before: Vec<Vec<u8>> = a_blocks.iter().map(|&id| dst.block_bytes(id)).collect();

    let loaded = dst.load(&bytes).unwrap();
    assert_eq!(
        loaded.already_cached_blocks, 3,
        "a's chain was cached already"
    );
    assert_eq!(loaded.blocks, 2 + 2, "b's second and third blocks, and c");
    let mut table = BlockTable::new();
    assert_eq!(dst.manager.match_prefix(&mut table, &a), 12);
    assert_eq!(
        table.blocks(),
        &a_blocks[..],
        "the target's own blocks stay the cached copy"
    );
    dst.manager.release(&mut table);
    for (id, kv) in a_blocks.iter().zip(&kv_before) {
        assert_eq!(&dst.block_bytes(*id), kv);
    }
    for tokens in [&a, &b, &c] {
        assert!(check_matched_kv(&mut dst, tokens).unwrap() >= 8);
    }
    check_invariants(&dst, &[&running]).unwrap();
    dst.manager.release(&mut running);
    check_invariants(&dst, &[]).unwrap();
}

/// Loads `bytes` with `meta` and `contents` into a copy of `cache`, checks the load failed
/// and changed nothing, and returns the error.
fn refused(
    cache: &Cache,
    contents: Option<&mut dyn BlockContents>,
    meta: &SnapshotMeta,
    bytes: &[u8],
) -> CacheError {
    let mut cache = cache.clone();
    let before = cache.observe();
    let result = match contents {
        Some(contents) => cache.manager.load_snapshot(contents, meta, bytes),
        None => cache.manager.load_snapshot(&mut cache.storage, meta, bytes),
    };
    let err = match result {
        Ok(summary) => panic!("the load was accepted: {summary:?}"),
        Err(err) => err,
    };
    assert_eq!(cache.observe(), before, "a refused load changed the cache");
    err
}

/// A target with some state of its own: a cached prompt and a live table.
fn busy_target() -> Cache {
    let mut cache = Cache::new(12);
    cache.run_and_release(&prompt(900..909));
    // The table itself is dropped, but its blocks stay referenced: a sequence that still runs.
    cache.run(&prompt(800..806)).unwrap();
    cache
}

#[test]
fn mismatched_snapshots_are_refused_with_the_difference_named() {
    let (mut src, _live, _) = source();
    let (bytes, _) = src.save();
    let target = busy_target();

    let other_model = SnapshotMeta {
        fingerprint: SnapshotMeta::fingerprint_of(&[b"another-model", b"f32"]),
        ..meta()
    };
    let err = refused(&target, None, &other_model, &bytes);
    assert!(matches!(
        err,
        CacheError::Snapshot(SnapshotError::ModelMismatch { .. })
    ));
    assert!(err
        .to_string()
        .starts_with("the prefix cache snapshot was saved for a different model (fingerprint "));

    let other_dtype = SnapshotMeta {
        dtype: "bf16".into(),
        ..meta()
    };
    assert_eq!(
        refused(&target, None, &other_dtype, &bytes).to_string(),
        "the prefix cache snapshot was saved for dtype f32, this engine runs bf16"
    );

    for (field, other) in [
        (
            "num_layers",
            KvLayout {
                num_layers: 3,
                ..layout(12)
            },
        ),
        (
            "num_kv_heads",
            KvLayout {
                num_kv_heads: 1,
                ..layout(12)
            },
        ),
        (
            "head_dim",
            KvLayout {
                head_dim: 2,
                ..layout(12)
            },
        ),
        (
            "block_size",
            KvLayout {
                block_size: 8,
                ..layout(12)
            },
        ),
    ] {
        let cache = Cache {
            manager: BlockManager::new(other),
            storage: KvStorage::new(other),
        };
        let err = refused(&cache, None, &meta(), &bytes);
        match err {
            CacheError::Snapshot(SnapshotError::LayoutMismatch { field: got, .. }) => {
                assert_eq!(got, field)
            }
            other => panic!("expected a layout mismatch on {field}, got {other}"),
        }
    }
    let eight = KvLayout {
        block_size: 8,
        ..layout(12)
    };
    let cache = Cache {
        manager: BlockManager::new(eight),
        storage: KvStorage::new(eight),
    };
    assert_eq!(
        refused(&cache, None, &meta(), &bytes).to_string(),
        "the prefix cache snapshot was saved for a KV cache with block_size = 4, this engine's has 8"
    );

    // Same layout, but a backend whose blocks are another size (another dtype in disguise).
    let mut half = HalfSized(KvStorage::new(layout(12)));
    assert_eq!(
        refused(&target, Some(&mut half), &meta(), &bytes),
        CacheError::Snapshot(SnapshotError::BlockBytesMismatch {
            saved: 384,
            running: 192
        })
    );

    // A snapshot of the pool size does not matter: a bigger source loads into a smaller target.
    assert!(target.clone().load(&bytes).is_ok());
}

/// A backend that claims half the bytes per block.
struct HalfSized(KvStorage);

impl BlockContents for HalfSized {
    fn block_bytes(&self) -> usize {
        self.0.block_bytes() / 2
    }
    fn read_block(&mut self, _: BlockId, _: &mut [u8]) -> Result<(), CacheError> {
        Err(CacheError::Backend {
            message: "half-sized blocks cannot be read".into(),
        })
    }
    fn write_block(&mut self, _: BlockId, _: &[u8]) -> Result<(), CacheError> {
        Err(CacheError::Backend {
            message: "half-sized blocks cannot be written".into(),
        })
    }
}

/// A backend whose writes fail after `ok_writes` successes.
struct FailingWrites {
    inner: KvStorage,
    ok_writes: usize,
}

impl BlockContents for FailingWrites {
    fn block_bytes(&self) -> usize {
        self.inner.block_bytes()
    }
    fn read_block(&mut self, id: BlockId, out: &mut [u8]) -> Result<(), CacheError> {
        self.inner.read_block(id, out)
    }
    fn write_block(&mut self, id: BlockId, data: &[u8]) -> Result<(), CacheError> {
        if self.ok_writes == 0 {
            return Err(CacheError::Backend {
                message: "device memory is gone".into(),
            });
        }
        self.ok_writes -= 1;
        self.inner.write_block(id, data)
    }
}

#[test]
fn a_failing_backend_aborts_the_load_and_the_save() {
    let (mut src, _live, _) = source();
    let (bytes, _) = src.save();
    let target = busy_target();
    let mut failing = FailingWrites {
        inner: target.storage.clone(),
        ok_writes: 2,
    };
    assert_eq!(
        refused(&target, Some(&mut failing), &meta(), &bytes).to_string(),
        "the KV cache backend failed: device memory is gone"
    );

    let mut half = HalfSized(KvStorage::new(layout(16)));
    let err = src
        .manager
        .save_snapshot(&mut half, &meta(), Vec::new())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the KV cache backend failed: half-sized blocks cannot be read"
    );

    let long_dtype = SnapshotMeta {
        dtype: "x".repeat(65),
        ..meta()
    };
    assert_eq!(
        src.manager
            .save_snapshot(&mut src.storage, &long_dtype, Vec::new())
            .unwrap_err()
            .to_string(),
        "a prefix cache snapshot's dtype name must be 1 to 64 bytes long, got 65"
    );
}

/// A snapshot of three blocks in two chains, small enough to cut at every byte.
fn small_snapshot() -> Vec<u8> {
    let mut cache = Cache::new(4);
    cache.run_and_release(&prompt(1..10));
    cache.run_and_release(&prompt(20..25));
    let (bytes, summary) = cache.save();
    assert_eq!(summary.blocks, 3);
    bytes
}

#[test]
fn truncated_snapshots_are_refused_at_every_length() {
    let bytes = small_snapshot();
    let target = busy_target();
    for len in 0..bytes.len() {
        match refused(&target, None, &meta(), &bytes[..len]) {
            CacheError::Snapshot(SnapshotError::Truncated { len: at, .. }) => {
                assert_eq!(at, len as u64)
            }
            other => panic!("cut at {len} bytes: expected truncated, got {other}"),
        }
    }
    let cut = 100.min(bytes.len() - 1);
    assert_eq!(
        refused(&target, None, &meta(), &bytes[..cut]).to_string(),
        "the prefix cache snapshot is truncated: it ends after 100 bytes, before the end of its entries"
    );

    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(
        refused(&target, None, &meta(), &longer),
        CacheError::Snapshot(SnapshotError::TrailingBytes)
    );
    assert!(target.clone().load(&bytes).is_ok());
}

/// Replaces the trailing checksum with a correct one for the edited contents.
fn resign(bytes: &mut [u8]) {
    let body = bytes.len() - 32;
    let digest = Sha256::digest(&bytes[..body]);
    bytes[body..].copy_from_slice(&digest);
}

#[test]
fn corrupt_and_malformed_snapshots_are_refused() {
    let bytes = small_snapshot();
    let target = busy_target();
    let header_len = 8 + 4 + 32 + 4 + KvStorage::DTYPE.len() + 6 * 8;
    let entry_len = 8 + 4 * BLOCK_SIZE + 2 * LAYERS * BLOCK_SIZE * KV_DIM * 4;
    assert_eq!(bytes.len(), header_len + 3 * entry_len + 32);

    let mut flipped = bytes.clone();
    flipped[header_len + entry_len + 10] ^= 0x10;
    assert_eq!(
        refused(&target, None, &meta(), &flipped).to_string(),
        "the prefix cache snapshot's checksum does not match its contents, so the file is corrupt"
    );

    // A parent that does not come first, with a valid checksum.
    let mut forward = bytes.clone();
    forward[header_len..header_len + 8].copy_from_slice(&2u64.to_le_bytes());
    resign(&mut forward);
    assert_eq!(
        refused(&target, None, &meta(), &forward).to_string(),
        "the prefix cache snapshot is malformed: entry 0 names entry 2 as its parent, which does not come before it"
    );

    // The same entry twice.
    let mut repeated = bytes.clone();
    let second = header_len + entry_len;
    repeated.copy_within(header_len..second, second);
    resign(&mut repeated);
    assert_eq!(
        refused(&target, None, &meta(), &repeated).to_string(),
        "the prefix cache snapshot is malformed: entry 1 repeats an earlier entry's parent and tokens"
    );

    // An entry count far beyond the file's length.
    let mut huge = bytes.clone();
    let count_at = header_len - 8;
    huge[count_at..header_len].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    resign(&mut huge);
    assert!(matches!(
        refused(&target, None, &meta(), &huge),
        CacheError::Snapshot(SnapshotError::Malformed { .. } | SnapshotError::Truncated { .. })
    ));

    assert_eq!(
        refused(&target, None, &meta(), b"PK\x03\x04 not a snapshot at all"),
        CacheError::Snapshot(SnapshotError::NotASnapshot)
    );
}

#[test]
fn save_leaves_out_blocks_whose_ancestor_was_evicted() {
    let mut cache = Cache::new(6);
    let full: Vec<u32> = vec![1, 1, 1, 1, 2, 2, 2, 2, 0];
    // `a` caches the first block; `x` computes the whole prompt alone, so its second block is
    // registered under `a`'s first. Evicting `a`'s block leaves that registration unreachable.
    let mut a = cache.run(&full[..5]).unwrap();
    let mut x = BlockTable::new();
    cache.manager.reserve(&mut x, 9).unwrap();
    BlockManager::set_len(&mut x, 9);
    cache.manager.commit(&mut x, &full);
    cache.manager.release(&mut a);
    let mut filler = BlockTable::new();
    cache.manager.reserve(&mut filler, 12).unwrap();
    assert_eq!(cache.manager.stats().evictions, 1);
    assert_eq!(cache.manager.stats().cached_blocks, 1);

    let (bytes, saved) = cache.save();
    assert_eq!(
        (saved.blocks, saved.skipped_blocks, saved.skipped_tokens),
        (0, 1, 4)
    );
    let mut dst = Cache::new(6);
    let loaded = dst.load(&bytes).unwrap();
    assert_eq!(
        loaded.blocks + loaded.already_cached_blocks + loaded.skipped_blocks,
        0
    );
    assert_eq!(dst.observe(), Cache::new(6).observe());
    cache.manager.release(&mut filler);
    cache.manager.release(&mut x);
}

#[test]
fn files_are_replaced_atomically_and_named_in_errors() {
    let dir = std::env::temp_dir().join(format!("braid-cache-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("prefix.braidkv");
    let (mut src, _live, prompts) = source();
    let saved = src
        .manager
        .save_snapshot_file(&mut src.storage, &meta(), &path)
        .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), saved.bytes);
    assert!(!dir.join("prefix.braidkv.partial").exists());

    let mut dst = Cache::new(16);
    let loaded = dst
        .manager
        .load_snapshot_file(&mut dst.storage, &meta(), &path)
        .unwrap();
    assert_eq!(loaded.blocks, saved.blocks);
    for tokens in &prompts {
        check_matched_kv(&mut dst, tokens).unwrap();
    }

    // A failed save leaves the old file in place.
    let mut half = HalfSized(KvStorage::new(layout(16)));
    assert!(src
        .manager
        .save_snapshot_file(&mut half, &meta(), &path)
        .is_err());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), saved.bytes);
    assert!(!dir.join("prefix.braidkv.partial").exists());

    let missing = dir.join("missing.braidkv");
    match dst
        .manager
        .load_snapshot_file(&mut dst.storage, &meta(), &missing)
    {
        Err(CacheError::Snapshot(SnapshotError::Io { kind, .. })) => {
            assert_eq!(kind, std::io::ErrorKind::NotFound)
        }
        other => panic!("expected a missing file, got {other:?}"),
    }
    let err = src
        .manager
        .save_snapshot_file(&mut src.storage, &meta(), &dir.join("no-such-dir/x"))
        .unwrap_err();
    assert!(err.to_string().starts_with("could not create "), "{err}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Random prompts over a two-letter alphabet, so chains share and branch often.
fn prompts(max: usize) -> impl Strategy<Value = Vec<Vec<u32>>> {
    prop::collection::vec(prop::collection::vec(0..2u32, 1..20), 0..max)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bit_flips_are_refused(offset in any::<prop::sample::Index>(), bit in 0..8u8) {
        let bytes = small_snapshot();
        let target = busy_target();
        let mut flipped = bytes.clone();
        let at = offset.index(bytes.len());
        flipped[at] ^= 1 << bit;
        // `refused` checks the cache is unchanged.
        let err = refused(&target, None, &meta(), &flipped);
        prop_assert!(matches!(err, CacheError::Snapshot(_)), "{}", err);
    }

    #[test]
    fn loads_keep_every_invariant(
        source_prompts in prompts(8),
        held_prompts in prompts(3),
        cached_prompts in prompts(3),
        target_blocks in 4..24usize,
    ) {
        let mut src = Cache::new(16);
        for tokens in &source_prompts {
            src.run_and_release(tokens);
        }
        let (bytes, saved) = src.save();

        let mut dst = Cache::new(target_blocks);
        for tokens in &cached_prompts {
            dst.run_and_release(tokens);
        }
        let held: Vec<BlockTable> = held_prompts.iter().filter_map(|t| dst.run(t)).collect();
        let free_before = dst.manager.stats().free_blocks;
        let evictions_before = dst.manager.stats().evictions;
        let held_refs: Vec<&BlockTable> = held.iter().collect();
        let loaded = dst.load(&bytes).unwrap();

        prop_assert_eq!(
            loaded.blocks + loaded.already_cached_blocks + loaded.skipped_blocks,
            saved.blocks
        );
        prop_assert_eq!(dst.manager.stats().free_blocks, free_before - loaded.blocks);
        prop_assert_eq!(dst.manager.stats().evictions, evictions_before, "a load never evicts");
        check_invariants(&dst, &held_refs)?;
        for tokens in source_prompts.iter().chain(&held_prompts).chain(&cached_prompts) {
            let matched = check_matched_kv(&mut dst, tokens)?;
            if free_before >= saved.blocks {
                prop_assert_eq!(loaded.skipped_blocks, 0);
                prop_assert!(matched >= src.matched(tokens), "a saved prefix was lost");
            }
        }
        let again = dst.load(&bytes).unwrap();
        prop_assert_eq!(again.blocks, 0);
        check_invariants(&dst, &held_refs)?;
        let mut held = held;
        for table in &mut held {
            dst.manager.release(table);
        }
        check_invariants(&dst, &[])?;
    }
}
