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
    /// When a group's saved KV reads outweigh the extra launches: at least
    /// [`AUTO_MIN_SAVED_TOKENS`] tokens of KV not re-read per step.
    #[default]
    Auto,
    /// Whenever two or more sequences share at least one block.
    Always,
}

/// Under [`CascadePolicy::Auto`], a group is worth a cascade when `(members - 1) * shared_tokens`
/// reaches this. Set when cascade steps ran without a captured graph, which cost about a
/// millisecond of launches on a 28-layer model: at ~114 KB of KV per token over all layers
/// (Qwen3-0.6B shape) and ~3 TB/s, the time to read ~26k tokens of KV. Cascade steps replay
/// graphs now; the threshold has not been measured again.
pub const AUTO_MIN_SAVED_TOKENS: usize = 32 * 1024;

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
            _ => saved >= AUTO_MIN_SAVED_TOKENS,
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
    fn auto_takes_groups_whose_savings_pay_for_the_launches() {
        let prefix: Vec<u32> = (0..256).collect();
        let tables: Vec<Vec<u32>> = (0..64)
            .map(|i| {
                let mut t = prefix.clone();
                t.push(1000 + i);
                t
            })
            .collect();
        let views: Vec<&[u32]> = tables.iter().map(Vec::as_slice).collect();
        let computed = vec![256 * 16 + 70; 64];
        let p = plan(&views, &computed, 16, CascadePolicy::Auto).unwrap();
        assert_eq!(p.groups[0].shared_tokens, 4096);
        assert_eq!(p.saved_tokens, 63 * 4096);
        let few: Vec<&[u32]> = views[..2].to_vec();
        assert!(plan(&few, &computed[..2], 16, CascadePolicy::Auto).is_none());
    }
}
