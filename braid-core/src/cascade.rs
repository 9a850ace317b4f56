//! Choosing, each decode step, which sequences read a shared prefix's KV once as a group
//! (cascade attention) instead of once per sequence.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use braid_models::SharedPrefixGroup;

/// When decode steps use cascade attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CascadePolicy {
    /// Never: every sequence reads its whole context.
    Off,
    /// When a group's saved KV reads outweigh the cascade's fixed costs (a second pass and a
    /// merge each layer): at least [`AUTO_MIN_SAVED_TOKENS`] tokens of KV not re-read per step,
    /// over a prefix of at least [`AUTO_MIN_SHARED_TOKENS`].
    #[default]
    Auto,
    /// Whenever two or more sequences share at least one block.
    Always,
}

/// Under [`CascadePolicy::Auto`], a group is worth a cascade when `(members - 1) * shared_tokens`
/// reaches this. Measured on an H100 (Qwen3-0.6B shape, 64-token questions, 128-token answers,
/// cascade forced on against plain paged attention, both replaying graphs; table in
/// `docs/benchmarks.md`): of the groups saving 256 to 3,840 tokens, seven ran at 0.88–0.98× with
/// cascade and one at 1.04× (2,048 shared × 2); the groups saving 4,096 to 7,936 ran at
/// 1.00–1.23×, and the gain grows with the saving (2.85× at 4,096 × 32). A model of the
/// SmolLM2-135M shape (5.3× fewer KV bytes a token) broke even at the same token counts, so the
/// rule counts tokens, not bytes.
pub const AUTO_MIN_SAVED_TOKENS: usize = 4096;

/// Under [`CascadePolicy::Auto`], the shortest shared prefix worth a cascade: the shortest
/// measured. At 256 tokens a group needed 32 members to break even and 64 to gain (1.18×);
/// shorter prefixes were not measured, so they never take the cascade.
pub const AUTO_MIN_SHARED_TOKENS: usize = 256;

/// A step's batch order and its cascade groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CascadePlan {
    /// Positions in the step's list of sequences, in the order to run them: each group's members
    /// are contiguous.
    pub order: Vec<usize>,
    /// Groups over positions in `order`.
    pub groups: Vec<SharedPrefixGroup>,
    /// Tokens of KV the groups do not re-read this step (per layer).
    pub saved_tokens: usize,
}

/// Group decode sequences (one new token each) by the leading KV blocks they share. `tables[i]`
/// and `computed[i]` are sequence `i`'s block table and the tokens whose KV it holds; a shared
/// block is full and computed, so the shared length is a whole number of blocks. `None` when no
/// group qualifies under `policy`.
pub(crate) fn plan(
    tables: &[&[u32]],
    computed: &[usize],
    block_size: usize,
    policy: CascadePolicy,
) -> Option<CascadePlan> {
    if policy == CascadePolicy::Off {
        return None;
    }
    // Sequences grouped by their first block, groups in order of first appearance; only blocks
    // whose KV every member holds count. Runs every decode step, so the lookup is a hash map:
    // a linear search made this quadratic in the batch (65 µs a step at 256 sequences).
    let mut by_first: Vec<(u32, Vec<usize>)> = Vec::new();
    let mut group_of: HashMap<u32, usize> = HashMap::with_capacity(tables.len());
    for (i, t) in tables.iter().enumerate() {
        let Some(&first) = t.first().filter(|_| computed[i] >= block_size) else {
            continue;
        };
        match group_of.entry(first) {
            Entry::Occupied(g) => by_first[*g.get()].1.push(i),
            Entry::Vacant(slot) => {
                slot.insert(by_first.len());
                by_first.push((first, vec![i]));
            }
        }
    }
    let mut plan = CascadePlan::default();
    let mut grouped = vec![false; tables.len()];
    for (_, members) in by_first {
        if members.len() < 2 {
            continue;
        }
        let lead = tables[members[0]];
        let full_blocks = members
            .iter()
            .map(|&i| computed[i] / block_size)
            .min()
            .unwrap_or(0);
        let shared_blocks = members[1..]
            .iter()
            .map(|&i| {
                lead.iter()
                    .zip(tables[i])
                    .take_while(|(a, b)| a == b)
                    .count()
            })
            .min()
            .unwrap_or(0)
            .min(full_blocks);
        let shared = shared_blocks * block_size;
        let saved = (members.len() - 1) * shared;
        let worth = match policy {
            CascadePolicy::Always => shared > 0,
            _ => saved >= AUTO_MIN_SAVED_TOKENS && shared >= AUTO_MIN_SHARED_TOKENS,
        };
        if !worth {
            continue;
        }
        let start = plan.order.len();
        for &i in &members {
            grouped[i] = true;
            plan.order.push(i);
        }
        plan.groups.push(SharedPrefixGroup {
            seqs: start..plan.order.len(),
            shared_tokens: shared,
        });
        plan.saved_tokens += saved;
    }
    if plan.groups.is_empty() {
        return None;
    }
    plan.order
        .extend((0..tables.len()).filter(|&i| !grouped[i]));
    Some(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_shared_leading_blocks() {
        let a = [1, 2, 3, 10];
        let b = [1, 2, 3, 11];
        let c = [1, 2, 7, 12];
        let d = [5, 6];
        let tables: Vec<&[u32]> = vec![&d, &a, &b, &c];
        let computed = [20, 60, 60, 60];
        let p = plan(&tables, &computed, 16, CascadePolicy::Always).unwrap();
        // a, b and c share two blocks; d runs alone after the group.
        assert_eq!(p.order, vec![1, 2, 3, 0]);
        assert_eq!(
            p.groups,
            vec![SharedPrefixGroup {
                seqs: 0..3,
                shared_tokens: 32
            }]
        );
        assert_eq!(p.saved_tokens, 64);
        assert!(plan(&tables, &computed, 16, CascadePolicy::Auto).is_none());
        assert!(plan(&tables, &computed, 16, CascadePolicy::Off).is_none());
    }

    #[test]
    fn shared_blocks_must_be_computed_by_every_member() {
        let a = [1, 2, 3];
        let b = [1, 2, 3];
        let tables: Vec<&[u32]> = vec![&a, &b];
        // b holds KV for only 20 tokens: one full block.
        let p = plan(&tables, &[48, 20], 16, CascadePolicy::Always).unwrap();
        assert_eq!(p.groups[0].shared_tokens, 16);
        assert!(plan(&tables, &[48, 10], 16, CascadePolicy::Always).is_none());
    }

    #[test]
    fn auto_takes_groups_whose_savings_pay_for_the_fixed_costs() {
        // `members` sequences sharing `shared_blocks` blocks of 16 tokens, then one own block each.
        let auto = |members: u32, shared_blocks: u32| {
            let tables: Vec<Vec<u32>> = (0..members)
                .map(|i| (0..shared_blocks).chain([1000 + i]).collect())
                .collect();
            let views: Vec<&[u32]> = tables.iter().map(Vec::as_slice).collect();
            let computed = vec![shared_blocks as usize * 16 + 10; members as usize];
            plan(&views, &computed, 16, CascadePolicy::Auto)
        };
        let p = auto(64, 256).unwrap();
        assert_eq!(p.groups[0].shared_tokens, 4096);
        assert_eq!(p.saved_tokens, 63 * 4096);
        // Two members sharing 4,096 tokens save exactly the threshold; 2,048 do not.
        assert_eq!(auto(2, 256).unwrap().saved_tokens, AUTO_MIN_SAVED_TOKENS);
        assert!(auto(2, 128).is_none());
        // 256 shared tokens pay from 17 members on; a 240-token prefix never, however many
        // share it.
        assert!(auto(16, 16).is_none());
        assert!(auto(17, 16).is_some());
        assert!(auto(256, 15).is_none());
    }
}
