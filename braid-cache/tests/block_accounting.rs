//! Property tests: block ownership stays exclusive and fully accounted through any sequence of
//! reserve / set_len / release calls over several tables.

use braid_cache::{BlockManager, BlockTable, CacheError, KvLayout};
use proptest::prelude::*;
use std::collections::HashSet;

const TABLES: usize = 4;
const BLOCK_SIZE: usize = 4;
const NUM_BLOCKS: usize = 12;

#[derive(Debug, Clone)]
enum Op {
    Reserve { table: usize, new_len: usize },
    SetLen { table: usize, fraction: f64 },
    Release { table: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..TABLES, 0..NUM_BLOCKS * BLOCK_SIZE + 8).prop_map(|(table, new_len)| Op::Reserve { table, new_len }),
        2 => (0..TABLES, 0.0..=1.0f64).prop_map(|(table, fraction)| Op::SetLen { table, fraction }),
        1 => (0..TABLES).prop_map(|table| Op::Release { table }),
    ]
}

fn check_invariants(cache: &BlockManager, tables: &[BlockTable]) -> Result<(), TestCaseError> {
    let mut owned = HashSet::new();
    for table in tables {
        for &id in table.blocks() {
            prop_assert!((id as usize) < NUM_BLOCKS, "block {} out of range", id);
            prop_assert!(owned.insert(id), "block {} owned twice", id);
        }
        prop_assert!(table.num_tokens() <= table.capacity());
        prop_assert_eq!(table.capacity(), table.blocks().len() * BLOCK_SIZE);
    }
    prop_assert_eq!(
        cache.num_free_blocks() + owned.len(),
        cache.num_total_blocks()
    );
    Ok(())
}

proptest! {
    #[test]
    fn blocks_are_exclusive_and_never_leak(ops in prop::collection::vec(op(), 1..80)) {
        let layout = KvLayout { num_layers: 1, num_kv_heads: 1, head_dim: 1, block_size: BLOCK_SIZE, num_blocks: NUM_BLOCKS };
        let mut cache = BlockManager::new(layout);
        let mut tables = vec![BlockTable::new(); TABLES];

        for op in ops {
            match op {
                Op::Reserve { table, new_len } => {
                    let before_table = tables[table].clone();
                    let before_free = cache.num_free_blocks();
                    let needed = cache.blocks_needed(&tables[table], new_len);
                    match cache.reserve(&mut tables[table], new_len) {
                        Ok(()) => {
                            prop_assert!(tables[table].capacity() >= new_len);
                            prop_assert_eq!(cache.num_free_blocks(), before_free - needed);
                            prop_assert_eq!(&tables[table].blocks()[..before_table.blocks().len()], before_table.blocks());
                        }
                        Err(CacheError::CacheFull { needed: n, free }) => {
                            prop_assert_eq!(n, needed);
                            prop_assert_eq!(free, before_free);
                            prop_assert!(n > free);
                            prop_assert_eq!(&tables[table], &before_table);
                            prop_assert_eq!(cache.num_free_blocks(), before_free);
                        }
                        Err(other) => prop_assert!(false, "unexpected error {}", other),
                    }
                }
                Op::SetLen { table, fraction } => {
                    let len = (tables[table].capacity() as f64 * fraction).floor() as usize;
                    BlockManager::set_len(&mut tables[table], len);
                    prop_assert_eq!(tables[table].num_tokens(), len);
                }
                Op::Release { table } => {
                    cache.release(&mut tables[table]);
                    prop_assert!(tables[table].blocks().is_empty());
                    prop_assert_eq!(tables[table].num_tokens(), 0);
                }
            }
            check_invariants(&cache, &tables)?;
        }

        for table in &mut tables {
            cache.release(table);
        }
        prop_assert_eq!(cache.num_free_blocks(), NUM_BLOCKS);
        check_invariants(&cache, &tables)?;
    }
}
