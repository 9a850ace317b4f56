//! The CUDA model's captured step graphs, bounded: a server sees batch buckets, block-table widths,
//! greedy and sampled steps and, with cascade attention, group counts and grids, and each
//! combination is a graph of its own. Past the capacity the least recently launched graph is
//! dropped; a step that needs it again captures it again.

use std::collections::HashMap;
use std::hash::Hash;

/// A map with a capacity that evicts its least recently used entry to make room.
pub(crate) struct GraphCache<K, V> {
    entries: HashMap<K, (V, u64)>,
    capacity: usize,
    /// Use counter: an entry's stamp is the counter's value at its last use.
    clock: u64,
}

impl<K: Copy + Eq + Hash, V> GraphCache<K, V> {
    /// `capacity` is at least 1 (a step's own graph must fit).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            clock: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.keys()
    }

    /// The entry of `key`, marked as used now.
    pub(crate) fn get(&mut self, key: &K) -> Option<&V> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|(value, stamp)| {
            *stamp = clock;
            &*value
        })
    }

    /// Stores `value` under `key` as used now, first dropping the least recently used entry if
    /// the cache is full. Returns the dropped key.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<K> {
        let evicted = if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, stamp))| *stamp)
                .map(|(k, _)| *k);
            oldest.inspect(|k| {
                self.entries.remove(k);
            })
        } else {
            None
        };
        self.clock += 1;
        self.entries.insert(key, (value, self.clock));
        evicted
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.entries.retain(|k, _| keep(k));
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::GraphCache;

    #[test]
    fn full_cache_drops_the_least_recently_used_entry() {
        let mut cache = GraphCache::new(3);
        assert_eq!(cache.insert(1, "a"), None);
        assert_eq!(cache.insert(2, "b"), None);
        assert_eq!(cache.insert(3, "c"), None);
        // 1 is used again, so 2 is now the oldest.
        assert_eq!(cache.get(&1), Some(&"a"));
        assert_eq!(cache.insert(4, "d"), Some(2));
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get(&2), None);
        assert_eq!(cache.insert(5, "e"), Some(3));
        let mut keys: Vec<_> = cache.keys().copied().collect();
        keys.sort();
        assert_eq!(keys, [1, 4, 5]);
    }

    #[test]
    fn replacing_a_key_evicts_nothing() {
        let mut cache = GraphCache::new(2);
        cache.insert(1, "a");
        cache.insert(2, "b");
        assert_eq!(cache.insert(1, "a2"), None);
        assert_eq!(cache.get(&1), Some(&"a2"));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn capacity_is_at_least_one_and_retain_filters() {
        let mut cache = GraphCache::new(0);
        assert_eq!(cache.insert(1, ()), None);
        assert_eq!(cache.insert(2, ()), Some(1));
        assert_eq!(cache.len(), 1);
        let mut cache = GraphCache::new(4);
        for k in 0..4 {
            cache.insert(k, ());
        }
        cache.retain(|k| k % 2 == 0);
        let mut keys: Vec<_> = cache.keys().copied().collect();
        keys.sort();
        assert_eq!(keys, [0, 2]);
        cache.clear();
        assert_eq!(cache.len(), 0);
    }
}
