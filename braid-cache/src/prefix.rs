//! The exact prefix index over full KV blocks: chained block keys computed from token ids, and
//! per-block records (tokens and ancestry) that every lookup compares, so a hash never decides a match.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::BlockId;

/// Key of one full block of tokens in the context of everything before it: a 64-bit hash of the
/// parent block's key and the block's own token ids.
///
/// Keys depend on token ids alone and use a fixed, documented mixing function (no per-process
/// seed), so the same prompt gives the same keys in every run, on every platform, and they can be
/// stored. A key identifies a prefix only up to hash collisions; the index compares tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefixKey(pub u64);

// Multipliers from wyhash: odd, with well-spread bits, so folded products mix every input bit.
const P0: u64 = 0xa076_1d64_78bd_642f;
const P1: u64 = 0xe703_7ed1_a0b4_28db;
const P2: u64 = 0x8ebc_6af0_9c88_c6e3;

/// The 128-bit product of `a` and `b`, halves xored: the mixing step of wyhash.
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl PrefixKey {
    /// The parent of a sequence's first block.
    pub const ROOT: PrefixKey = PrefixKey(0x6272_6169_645f_6b76);

    /// The key of the block holding `tokens` whose preceding blocks have key `self`.
    pub fn child(self, tokens: &[u32]) -> PrefixKey {
        // The length goes in first, so the zero padding of an odd last token cannot alias a
        // shorter block.
        let mut h = fold(self.0 ^ P0, tokens.len() as u64 ^ P1);
        let mut pairs = tokens.chunks_exact(2);
        for pair in &mut pairs {
            let word = u64::from(pair[0]) | (u64::from(pair[1]) << 32);
            h = fold(h ^ word ^ P2, P1);
        }
        if let [last] = pairs.remainder() {
            h = fold(h ^ u64::from(*last) ^ P2, P1);
        }
        PrefixKey(fold(h ^ P0, P2))
    }

    /// The keys of every full block of `tokens`, in order (a trailing partial block has none).
    pub fn chain(tokens: &[u32], block_size: usize) -> Vec<PrefixKey> {
        let mut parent = PrefixKey::ROOT;
        tokens
            .chunks_exact(block_size.max(1))
            .map(|block| {
                parent = parent.child(block);
                parent
            })
            .collect()
    }
}

/// How the index derives a block's key; swapped only by tests that force collisions.
pub(crate) type KeyFn = fn(PrefixKey, &[u32]) -> PrefixKey;

/// A registered block's place in a chain: its key, and a serial number no other registration
/// ever receives.
///
/// Children record their parent's serial rather than its block id or key: a block id is reused
/// after eviction and a key can collide, but a serial names exactly one registration, so a child
/// whose parent was evicted can never hang under a different prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link {
    key: PrefixKey,
    serial: u64,
}

impl Link {
    /// The serial of the root: no registration receives it.
    pub(crate) const ROOT_SERIAL: u64 = 0;

    /// Where every chain starts, before its first block.
    pub(crate) const ROOT: Link = Link {
        key: PrefixKey::ROOT,
        serial: Self::ROOT_SERIAL,
    };
}

/// One registration as a snapshot records it: which block, its place in the chain, its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Registration<'a> {
    pub(crate) block: BlockId,
    pub(crate) serial: u64,
    /// [`Link::ROOT_SERIAL`] for a prompt's first block.
    pub(crate) parent_serial: u64,
    pub(crate) tokens: &'a [u32],
}

#[derive(Debug, Clone)]
struct Entry {
    link: Link,
    parent_serial: u64,
    tokens: Box<[u32]>,
}

/// Keys are already hashes: pass them through instead of hashing them again.
#[derive(Debug, Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = fold(self.0 ^ u64::from(byte), P0);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// Registered full blocks, findable by (parent registration, tokens).
#[derive(Debug, Clone)]
pub(crate) struct PrefixIndex {
    key_fn: KeyFn,
    /// By block id: the registration that block holds, if any.
    entries: Vec<Option<Entry>>,
    /// Blocks per key; more than one only when keys collide.
    buckets: HashMap<PrefixKey, Vec<BlockId>, BuildHasherDefault<KeyHasher>>,
    next_serial: u64,
    len: usize,
}

impl PrefixIndex {
    /// An empty index for a pool of `num_blocks` blocks.
    pub(crate) fn new(num_blocks: usize, key_fn: KeyFn) -> Self {
        Self {
            key_fn,
            entries: vec![None; num_blocks],
            buckets: HashMap::default(),
            next_serial: 1,
            len: 0,
        }
    }

    /// The registered block holding `tokens` right after `parent`, and its link.
    pub(crate) fn find(&self, parent: Link, tokens: &[u32]) -> Option<(BlockId, Link)> {
        let key = (self.key_fn)(parent.key, tokens);
        self.buckets.get(&key)?.iter().find_map(|&id| {
            let entry = self.entries.get(id as usize)?.as_ref()?;
            (entry.parent_serial == parent.serial && *entry.tokens == *tokens)
                .then_some((id, entry.link))
        })
    }

    /// Registers `id` as holding `tokens` right after `parent`, replacing any registration it
    /// had, and returns its new link. Ids outside the pool are ignored (the root link comes back).
    pub(crate) fn insert(&mut self, id: BlockId, parent: Link, tokens: &[u32]) -> Link {
        if id as usize >= self.entries.len() {
            debug_assert!(false, "block {id} registered but it is outside the pool");
            return Link::ROOT;
        }
        self.remove(id);
        let link = Link {
            key: (self.key_fn)(parent.key, tokens),
            serial: self.next_serial,
        };
        self.next_serial += 1;
        self.entries[id as usize] = Some(Entry {
            link,
            parent_serial: parent.serial,
            tokens: tokens.into(),
        });
        self.buckets.entry(link.key).or_default().push(id);
        self.len += 1;
        link
    }

    /// Drops `id`'s registration; returns whether it had one.
    pub(crate) fn remove(&mut self, id: BlockId) -> bool {
        let Some(entry) = self.entries.get_mut(id as usize).and_then(Option::take) else {
            return false;
        };
        if let Some(bucket) = self.buckets.get_mut(&entry.link.key) {
            bucket.retain(|&other| other != id);
            if bucket.is_empty() {
                self.buckets.remove(&entry.link.key);
            }
        }
        self.len -= 1;
        true
    }

    /// The tokens `id` is registered with, if it is registered.
    pub(crate) fn tokens(&self, id: BlockId) -> Option<&[u32]> {
        self.entries.get(id as usize)?.as_ref().map(|e| &*e.tokens)
    }

    /// The link of `id`'s registration, if it is registered.
    pub(crate) fn link(&self, id: BlockId) -> Option<Link> {
        self.entries.get(id as usize)?.as_ref().map(|e| e.link)
    }

    /// Whether `id` holds a registration.
    pub(crate) fn contains(&self, id: BlockId) -> bool {
        self.tokens(id).is_some()
    }

    /// Registered blocks.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Every registration, oldest first. A block is registered only after its parent (the parent's
    /// link must exist to name it), so this order lists every parent before its children.
    pub(crate) fn registrations(&self) -> Vec<Registration<'_>> {
        let mut all: Vec<Registration<'_>> = self
            .entries
            .iter()
            .enumerate()
            .filter_map(|(id, entry)| {
                let entry = entry.as_ref()?;
                Some(Registration {
                    block: id as BlockId,
                    serial: entry.link.serial,
                    parent_serial: entry.parent_serial,
                    tokens: &entry.tokens,
                })
            })
            .collect();
        all.sort_unstable_by_key(|reg| reg.serial);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys of `[1..=8]` in blocks of 4, as this function first produced them.
    const GOLDEN_KEYS: [u64; 2] = [522_342_860_667_679_065, 11_119_511_371_741_626_650];

    #[test]
    fn keys_are_fixed_across_runs() {
        // Stored caches rely on these values: changing the mixing function must be deliberate.
        assert_eq!(PrefixKey::ROOT.child(&[]), PrefixKey::ROOT.child(&[]));
        let keys = PrefixKey::chain(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4);
        assert_eq!(keys.len(), 2, "the partial last block has no key");
        assert_eq!(keys[0], PrefixKey::ROOT.child(&[1, 2, 3, 4]));
        assert_eq!(keys[1], keys[0].child(&[5, 6, 7, 8]));
        assert_eq!(
            keys.iter().map(|k| k.0).collect::<Vec<_>>(),
            GOLDEN_KEYS,
            "prefix keys changed"
        );
    }

    #[test]
    fn keys_separate_order_parent_and_length() {
        let a = PrefixKey::ROOT.child(&[1, 2, 3, 4]);
        assert_ne!(a, PrefixKey::ROOT.child(&[2, 1, 3, 4]));
        assert_ne!(a, PrefixKey::ROOT.child(&[1, 2, 3]));
        assert_ne!(
            PrefixKey::ROOT.child(&[1, 2, 3]),
            PrefixKey::ROOT.child(&[1, 2, 3, 0])
        );
        assert_ne!(a.child(&[5, 6, 7, 8]), PrefixKey::ROOT.child(&[5, 6, 7, 8]));
        // Every single-bit change of a token moves the key.
        let base = [7u32, 11, 13, 17];
        let base_key = PrefixKey::ROOT.child(&base);
        for i in 0..base.len() {
            for bit in 0..32 {
                let mut flipped = base;
                flipped[i] ^= 1 << bit;
                assert_ne!(PrefixKey::ROOT.child(&flipped), base_key);
            }
        }
    }

    #[test]
    fn colliding_keys_are_told_apart_by_tokens_and_parent() {
        let mut index = PrefixIndex::new(4, |_, _| PrefixKey(42));
        let a = index.insert(0, Link::ROOT, &[1, 2]);
        let b = index.insert(1, Link::ROOT, &[3, 4]);
        let a_child = index.insert(2, a, &[5, 6]);
        assert_eq!(index.find(Link::ROOT, &[1, 2]), Some((0, a)));
        assert_eq!(index.find(Link::ROOT, &[3, 4]), Some((1, b)));
        assert_eq!(index.find(Link::ROOT, &[1, 3]), None);
        assert_eq!(index.find(a, &[5, 6]), Some((2, a_child)));
        assert_eq!(
            index.find(b, &[5, 6]),
            None,
            "same key and tokens, other parent"
        );
        assert_eq!(index.len(), 3);

        // Evicting the parent and reusing its id for another prefix must not revive the child.
        assert!(index.remove(0));
        assert_eq!(index.find(Link::ROOT, &[1, 2]), None);
        let reused = index.insert(0, Link::ROOT, &[9, 9]);
        assert_eq!(index.find(reused, &[5, 6]), None);
        assert_eq!(index.tokens(2), Some(&[5, 6][..]));
        assert!(!index.remove(3));
        assert_eq!(index.len(), 3);
    }

    #[test]
    fn registrations_list_parents_first() {
        let mut index = PrefixIndex::new(4, PrefixKey::child);
        // Block 3 is registered first, so block ids alone would put the child before it.
        let root = index.insert(3, Link::ROOT, &[1, 2]);
        let child = index.insert(0, root, &[3, 4]);
        index.insert(2, child, &[5, 6]);
        let regs = index.registrations();
        assert_eq!(regs.iter().map(|r| r.block).collect::<Vec<_>>(), [3, 0, 2]);
        assert_eq!(regs[0].parent_serial, Link::ROOT_SERIAL);
        assert_eq!(regs[1].parent_serial, regs[0].serial);
        assert_eq!(regs[2].parent_serial, regs[1].serial);
        assert_eq!(regs[2].tokens, &[5, 6]);
    }
}
