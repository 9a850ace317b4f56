//! Property tests of prefix caching: random streams of new sequences, prefix matches, growth,
//! commits, forks, copy-on-write, truncation and releases over several tables, checked against a
//! shadow of the token each block slot holds.

use braid_cache::{BlockId, BlockManager, BlockState, BlockTable, CacheError, KvLayout};
use proptest::prelude::*;

const TABLES: usize = 4;
const BLOCK_SIZE: usize = 4;
const NUM_BLOCKS: usize = 16;
/// A two-letter alphabet: only 16 distinct blocks exist, so prefixes collide all the time.
const ALPHABET: u32 = 2;

#[derive(Debug, Clone)]
enum Op {
    /// Start a sequence in `slot` (dropping whatever was there) and match its prompt.
    New {
        slot: usize,
        tokens: Vec<u32>,
    },
    /// Compute `n` more tokens, drawing new ones from `extra` past the known tokens.
    Grow {
        slot: usize,
        n: usize,
        extra: Vec<u32>,
    },
    Commit {
        slot: usize,
    },
    Fork {
        src: usize,
        dst: usize,
    },
    /// Roll the sequence back to a fraction of its computed tokens.
    Truncate {
        slot: usize,
        fraction: f64,
    },
    Release {
        slot: usize,
    },
}

fn tokens(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(0..ALPHABET, len)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..TABLES, tokens(1..20)).prop_map(|(slot, tokens)| Op::New { slot, tokens }),
        5 => (0..TABLES, 1..12usize, tokens(12..13)).prop_map(|(slot, n, extra)| Op::Grow { slot, n, extra }),
        3 => (0..TABLES).prop_map(|slot| Op::Commit { slot }),
        2 => (0..TABLES, 0..TABLES).prop_map(|(src, dst)| Op::Fork { src, dst }),
        1 => (0..TABLES, 0.0..1.0f64).prop_map(|(slot, fraction)| Op::Truncate { slot, fraction }),
        2 => (0..TABLES).prop_map(|slot| Op::Release { slot }),
    ]
}

/// One sequence: its table and every token it knows (computed ones first).
#[derive(Debug, Clone)]
struct Seq {
    table: BlockTable,
    tokens: Vec<u32>,
}

/// What the test believes each block slot holds, written only where the engine would write.
type Shadow = Vec<[Option<u32>; BLOCK_SIZE]>;

fn states(cache: &BlockManager) -> Vec<Option<BlockState>> {
    (0..NUM_BLOCKS as BlockId)
        .map(|id| cache.pool().state(id))
        .collect()
}

fn check_invariants(
    cache: &BlockManager,
    seqs: &[Option<Seq>],
    shadow: &Shadow,
) -> Result<(), TestCaseError> {
    let mut holdings = [0u32; NUM_BLOCKS];
    for seq in seqs.iter().flatten() {
        let table = &seq.table;
        prop_assert_eq!(table.capacity(), table.blocks().len() * BLOCK_SIZE);
        prop_assert!(table.num_tokens() <= table.capacity());
        prop_assert!(table.num_tokens() <= seq.tokens.len());
        for &id in table.blocks() {
            prop_assert!((id as usize) < NUM_BLOCKS, "block {} out of range", id);
            holdings[id as usize] += 1;
        }
        // Every computed token reads back from the slot the table maps it to.
        for (pos, &token) in seq.tokens[..table.num_tokens()].iter().enumerate() {
            let id = table.blocks()[pos / BLOCK_SIZE] as usize;
            prop_assert_eq!(
                shadow[id][pos % BLOCK_SIZE],
                Some(token),
                "position {} of a table reads the wrong token",
                pos
            );
        }
    }

    let (mut free, mut evictable, mut referenced, mut registered) = (0, 0, 0, 0);
    for id in 0..NUM_BLOCKS {
        let block = id as BlockId;
        let state = cache.pool().state(block);
        prop_assert_eq!(cache.pool().ref_count(block), holdings[id]);
        let cached = cache.cached_tokens(block);
        match state {
            Some(BlockState::Free) => {
                free += 1;
                prop_assert_eq!(holdings[id], 0, "block {} free but held", id);
                prop_assert!(cached.is_none(), "free block {} still registered", id);
            }
            Some(BlockState::Evictable) => {
                evictable += 1;
                prop_assert_eq!(holdings[id], 0, "block {} evictable but held", id);
                prop_assert!(cached.is_some(), "evictable block {} not registered", id);
            }
            Some(BlockState::Referenced(count)) => {
                referenced += 1;
                prop_assert_eq!(count, holdings[id]);
            }
            None => prop_assert!(false, "block {} unknown to the pool", id),
        }
        if let Some(tokens) = cached {
            registered += 1;
            prop_assert_eq!(tokens.len(), BLOCK_SIZE);
            for (offset, &token) in tokens.iter().enumerate() {
                prop_assert_eq!(
                    shadow[id][offset],
                    Some(token),
                    "cached block {} does not hold its registered tokens",
                    id
                );
            }
        }
    }
    let stats = cache.stats();
    prop_assert_eq!(stats.free_blocks, free);
    prop_assert_eq!(stats.evictable_blocks, evictable);
    prop_assert_eq!(stats.cached_blocks, registered);
    prop_assert_eq!(free + evictable + referenced, NUM_BLOCKS);
    prop_assert_eq!(cache.num_free_blocks(), free + evictable);
    prop_assert_eq!(
        holdings.iter().map(|&h| h as usize).sum::<usize>(),
        seqs.iter()
            .flatten()
            .map(|s| s.table.blocks().len())
            .sum::<usize>()
    );
    Ok(())
}

fn release(cache: &mut BlockManager, slot: &mut Option<Seq>) {
    if let Some(mut seq) = slot.take() {
        cache.release(&mut seq.table);
        assert!(seq.table.blocks().is_empty());
    }
}

fn grow(
    cache: &mut BlockManager,
    seq: &mut Seq,
    n: usize,
    extra: &[u32],
    shadow: &mut Shadow,
) -> Result<(), TestCaseError> {
    let computed = seq.table.num_tokens();
    let new_len = computed + n;
    let mut extra = extra.iter().cycle();
    while seq.tokens.len() < new_len {
        seq.tokens.push(*extra.next().unwrap_or(&0));
    }

    let before = (seq.table.clone(), states(cache), cache.stats());
    match cache.prepare_append(&mut seq.table) {
        Ok(copy) => {
            if let Some((old, new)) = copy {
                let offset = computed % BLOCK_SIZE;
                prop_assert!(offset > 0, "a copy is asked only for a partly filled block");
                prop_assert_eq!(seq.table.blocks()[computed / BLOCK_SIZE], new);
                let valid = shadow[old as usize];
                shadow[new as usize][..offset].copy_from_slice(&valid[..offset]);
            }
        }
        Err(CacheError::CacheFull { needed, free }) => {
            prop_assert!(needed > free);
            prop_assert_eq!(
                (seq.table.clone(), states(cache), cache.stats()),
                before,
                "a failed prepare_append changed something"
            );
            return Ok(());
        }
        Err(other) => prop_assert!(false, "unexpected error {}", other),
    }

    let before = (seq.table.clone(), states(cache), cache.stats());
    let needed = cache.blocks_needed(&seq.table, new_len);
    match cache.reserve(&mut seq.table, new_len) {
        Ok(()) => {}
        Err(CacheError::CacheFull {
            needed: reported,
            free,
        }) => {
            prop_assert_eq!(reported, needed);
            prop_assert!(reported > free);
            prop_assert_eq!(
                (seq.table.clone(), states(cache), cache.stats()),
                before,
                "a failed reserve changed something"
            );
            return Ok(());
        }
        Err(other) => prop_assert!(false, "unexpected error {}", other),
    }
    prop_assert_eq!(
        &seq.table.blocks()[..before.0.blocks().len()],
        before.0.blocks()
    );

    // The forward pass writes the new tokens: only into private, unregistered blocks.
    for pos in computed..new_len {
        let id = seq.table.blocks()[pos / BLOCK_SIZE];
        prop_assert_eq!(
            cache.pool().ref_count(id),
            1,
            "writing into shared block {}",
            id
        );
        prop_assert!(
            cache.cached_tokens(id).is_none(),
            "writing into cached block {}",
            id
        );
        shadow[id as usize][pos % BLOCK_SIZE] = Some(seq.tokens[pos]);
    }
    BlockManager::set_len(&mut seq.table, new_len);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn prefix_sharing_stays_exact_and_accounted(ops in prop::collection::vec(op(), 1..80)) {
        let layout = KvLayout { num_layers: 1, num_kv_heads: 1, head_dim: 1, block_size: BLOCK_SIZE, num_blocks: NUM_BLOCKS };
        let mut cache = BlockManager::new(layout);
        let mut seqs: Vec<Option<Seq>> = vec![None; TABLES];
        let mut shadow: Shadow = vec![[None; BLOCK_SIZE]; NUM_BLOCKS];

        for op in ops {
            match op {
                Op::New { slot, tokens } => {
                    release(&mut cache, &mut seqs[slot]);
                    let mut table = BlockTable::new();
                    let queries = cache.stats().queries;
                    let matched = cache.match_prefix(&mut table, &tokens);
                    prop_assert_eq!(cache.stats().queries, queries + 1);
                    prop_assert_eq!(matched % BLOCK_SIZE, 0);
                    prop_assert!(matched < tokens.len(), "matched every token");
                    prop_assert_eq!(table.num_tokens(), matched);
                    prop_assert_eq!(table.blocks().len(), matched / BLOCK_SIZE);
                    for (i, &id) in table.blocks().iter().enumerate() {
                        let want = &tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
                        prop_assert_eq!(cache.cached_tokens(id), Some(want));
                        let held: Vec<Option<u32>> = shadow[id as usize].to_vec();
                        let want: Vec<Option<u32>> = want.iter().copied().map(Some).collect();
                        prop_assert_eq!(held, want, "matched block {} holds other tokens", id);
                    }
                    seqs[slot] = Some(Seq { table, tokens });
                }
                Op::Grow { slot, n, extra } => {
                    if let Some(seq) = seqs[slot].as_mut() {
                        grow(&mut cache, seq, n, &extra, &mut shadow)?;
                    }
                }
                Op::Commit { slot } => {
                    if let Some(seq) = seqs[slot].as_mut() {
                        let before = cache.stats().cached_blocks;
                        cache.commit(&mut seq.table, &seq.tokens);
                        let after = cache.stats().cached_blocks;
                        cache.commit(&mut seq.table, &seq.tokens);
                        prop_assert_eq!(cache.stats().cached_blocks, after, "commit is idempotent");
                        prop_assert!(after >= before);
                        // Every full computed block's prefix is now findable.
                        let full = seq.table.num_tokens() / BLOCK_SIZE * BLOCK_SIZE;
                        let mut probe = BlockTable::new();
                        let mut prompt = seq.tokens[..full].to_vec();
                        prompt.push(0);
                        let available = cache.num_free_blocks();
                        prop_assert_eq!(cache.match_prefix(&mut probe, &prompt), full);
                        cache.release(&mut probe);
                        prop_assert_eq!(cache.num_free_blocks(), available);
                    }
                }
                Op::Fork { src, dst } => {
                    if src != dst {
                        if let Some(source) = seqs[src].clone() {
                            release(&mut cache, &mut seqs[dst]);
                            let table = cache.fork(&source.table);
                            prop_assert_eq!(table.num_tokens(), source.table.num_tokens());
                            prop_assert_eq!(table.blocks(), &source.table.blocks()[..table.blocks().len()]);
                            let tokens = source.tokens[..table.num_tokens()].to_vec();
                            seqs[dst] = Some(Seq { table, tokens });
                        }
                    }
                }
                Op::Truncate { slot, fraction } => {
                    if let Some(seq) = seqs[slot].as_mut() {
                        let len = (seq.table.num_tokens() as f64 * fraction).floor() as usize;
                        BlockManager::set_len(&mut seq.table, len);
                        seq.tokens.truncate(len);
                    }
                }
                Op::Release { slot } => release(&mut cache, &mut seqs[slot]),
            }
            check_invariants(&cache, &seqs, &shadow)?;
        }

        for slot in &mut seqs {
            release(&mut cache, slot);
        }
        check_invariants(&cache, &seqs, &shadow)?;
        prop_assert!(
            states(&cache).iter().all(|s| matches!(s, Some(BlockState::Free | BlockState::Evictable))),
            "a block is still referenced after every table was released"
        );
        let stats = cache.stats();
        prop_assert_eq!(stats.free_blocks + stats.evictable_blocks, NUM_BLOCKS);
        prop_assert_eq!(stats.evictable_blocks, stats.cached_blocks);
    }
}
