//! f32 key/value storage on the host, laid out per layer as
//! `[num_blocks, block_size, num_kv_heads, head_dim]`, and its blocks as the bytes snapshots carry.

use std::ops::Range;

use crate::{BlockContents, BlockId, CacheError, KvLayout};

/// Keys and values of every layer, in f32 host memory.
///
/// A *slot* is `block * block_size + offset`; its row of `kv_dim` floats starts at
/// `slot * kv_dim` in both the K and the V buffer of a layer.
#[derive(Debug, Clone)]
pub struct KvStorage {
    layout: KvLayout,
    /// Per layer: K then V, each `elements_per_layer` floats.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl KvStorage {
    /// The dtype name a snapshot of this storage's blocks carries in its
    /// [`crate::SnapshotMeta`].
    pub const DTYPE: &'static str = "f32";

    /// Zeroed storage for `layout`, or an error naming the field when the layout is unusable.
    pub fn try_new(layout: KvLayout) -> Result<Self, CacheError> {
        layout.validate()?;
        let n = layout.elements_per_layer();
        let layers = (0..layout.num_layers)
            .map(|_| (vec![0.0; n], vec![0.0; n]))
            .collect();
        Ok(Self { layout, layers })
    }

    /// Zeroed storage for `layout`.
    ///
    /// # Panics
    /// If the layout fails [`KvLayout::validate`]; use [`KvStorage::try_new`] for layouts
    /// built from user settings.
    pub fn new(layout: KvLayout) -> Self {
        match Self::try_new(layout) {
            Ok(storage) => storage,
            Err(err) => panic!("{err}"),
        }
    }

    /// The layout this storage was built for.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Layer `l`'s K and V buffers, each `[num_blocks, block_size, num_kv_heads, head_dim]`.
    ///
    /// # Panics
    /// If `l >= num_layers`.
    pub fn layer(&self, l: usize) -> (&[f32], &[f32]) {
        let (k, v) = &self.layers[l];
        (k, v)
    }

    /// Layer `l`'s K and V buffers, mutably, for kernels that write in place.
    ///
    /// # Panics
    /// If `l >= num_layers`.
    pub fn layer_mut(&mut self, l: usize) -> (&mut [f32], &mut [f32]) {
        let (k, v) = &mut self.layers[l];
        (k, v)
    }

    /// Writes one K row and one V row per slot: `k` and `v` are `[slots.len(), kv_dim]`.
    ///
    /// # Panics
    /// If `layer` or a slot is out of range, or `k`/`v` do not hold `slots.len() * kv_dim`
    /// floats; all are engine bugs.
    pub fn write(&mut self, layer: usize, slots: &[usize], k: &[f32], v: &[f32]) {
        let dim = self.layout.kv_dim();
        let rows = slots.len() * dim;
        assert_eq!(
            k.len(),
            rows,
            "K rows for {} slots must hold {rows} floats",
            slots.len()
        );
        assert_eq!(
            v.len(),
            rows,
            "V rows for {} slots must hold {rows} floats",
            slots.len()
        );
        let (k_store, v_store) = &mut self.layers[layer];
        for ((&slot, k_row), v_row) in slots
            .iter()
            .zip(k.chunks_exact(dim))
            .zip(v.chunks_exact(dim))
        {
            let start = slot * dim;
            k_store[start..start + dim].copy_from_slice(k_row);
            v_store[start..start + dim].copy_from_slice(v_row);
        }
    }
}

impl KvStorage {
    /// Floats of one block in one layer's K (or V) buffer, and where block `id`'s start, after
    /// checking `id` and that a buffer of `len` bytes holds the block exactly.
    fn block_range(&self, id: BlockId, len: usize) -> Result<Range<usize>, CacheError> {
        let expected = self.block_bytes();
        if len != expected {
            return Err(CacheError::Backend {
                message: format!(
                    "a block of this KV storage holds {expected} bytes, the buffer given holds {len}"
                ),
            });
        }
        if id as usize >= self.layout.num_blocks {
            return Err(CacheError::Backend {
                message: format!(
                    "block {id} is outside this KV storage's {} blocks",
                    self.layout.num_blocks
                ),
            });
        }
        let floats = self.layout.block_size * self.layout.kv_dim();
        let start = id as usize * floats;
        Ok(start..start + floats)
    }
}

/// Layer by layer, K before V, each `[block_size, num_kv_heads, head_dim]` f32 little-endian.
impl BlockContents for KvStorage {
    fn block_bytes(&self) -> usize {
        self.layout.block_size * self.layout.bytes_per_token_f32()
    }

    fn read_block(&mut self, id: BlockId, out: &mut [u8]) -> Result<(), CacheError> {
        let range = self.block_range(id, out.len())?;
        let values = self
            .layers
            .iter()
            .flat_map(|(k, v)| k[range.clone()].iter().chain(&v[range.clone()]));
        for (dst, value) in out.chunks_exact_mut(4).zip(values) {
            dst.copy_from_slice(&value.to_le_bytes());
        }
        Ok(())
    }

    fn write_block(&mut self, id: BlockId, data: &[u8]) -> Result<(), CacheError> {
        let range = self.block_range(id, data.len())?;
        let mut bytes = data.chunks_exact(4);
        for (k, v) in &mut self.layers {
            let values = k[range.clone()].iter_mut().chain(&mut v[range.clone()]);
            for (value, src) in values.zip(&mut bytes) {
                *value = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 3,
            block_size: 4,
            num_blocks: 3,
        }
    }

    #[test]
    fn write_then_read_back() {
        let mut storage = KvStorage::new(layout());
        let dim = 6;
        let slots = [5usize, 0, 11];
        let k: Vec<f32> = (0..slots.len() * dim).map(|i| i as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        storage.write(1, &slots, &k, &v);

        let (k0, v0) = storage.layer(0);
        assert!(k0.iter().chain(v0).all(|&x| x == 0.0), "layer 0 untouched");
        let (k1, v1) = storage.layer(1);
        assert_eq!(k1.len(), 3 * 4 * dim);
        for (row, &slot) in slots.iter().enumerate() {
            assert_eq!(
                &k1[slot * dim..(slot + 1) * dim],
                &k[row * dim..(row + 1) * dim]
            );
            assert_eq!(
                &v1[slot * dim..(slot + 1) * dim],
                &v[row * dim..(row + 1) * dim]
            );
        }
        let written: usize = k1.iter().filter(|&&x| x != 0.0).count();
        assert_eq!(
            written,
            slots.len() * dim - 1,
            "only the written rows change (one value is 0.0)"
        );
    }

    #[test]
    fn try_new_reports_bad_layout() {
        let err = KvStorage::try_new(KvLayout {
            num_layers: 0,
            ..layout()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "KV cache layout field `num_layers` must be at least 1, got 0"
        );
    }

    #[test]
    fn block_bytes_round_trip_through_another_storage() {
        let mut storage = KvStorage::new(layout());
        let dim = 6;
        for layer in 0..2 {
            let slots: Vec<usize> = (0..12).collect();
            let k: Vec<f32> = (0..12 * dim).map(|i| (layer * 1000 + i) as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x - 0.5).collect();
            storage.write(layer, &slots, &k, &v);
        }
        assert_eq!(storage.block_bytes(), 2 * 2 * 4 * dim * 4);
        let mut bytes = vec![0u8; storage.block_bytes()];
        storage.read_block(1, &mut bytes).unwrap();
        // Layer 0's K for block 1 comes first: slots 4..8.
        assert_eq!(&bytes[..4], &(4.0 * dim as f32).to_le_bytes());

        let mut other = KvStorage::new(layout());
        other.write_block(2, &bytes).unwrap();
        let block = |s: &KvStorage, layer: usize, id: usize| {
            let (k, v) = s.layer(layer);
            let r = id * 4 * dim..(id + 1) * 4 * dim;
            (k[r.clone()].to_vec(), v[r].to_vec())
        };
        for layer in 0..2 {
            assert_eq!(block(&other, layer, 2), block(&storage, layer, 1));
            let (k, v) = block(&other, layer, 0);
            assert!(
                k.iter().chain(&v).all(|&x| x == 0.0),
                "other blocks untouched"
            );
        }
    }

    #[test]
    fn block_access_reports_bad_ids_and_buffers() {
        let mut storage = KvStorage::new(layout());
        let mut bytes = vec![0u8; storage.block_bytes()];
        assert_eq!(
            storage.read_block(3, &mut bytes).unwrap_err().to_string(),
            "the KV cache backend failed: block 3 is outside this KV storage's 3 blocks"
        );
        assert_eq!(
            storage.write_block(0, &bytes[1..]).unwrap_err().to_string(),
            "the KV cache backend failed: a block of this KV storage holds 384 bytes, the buffer given holds 383"
        );
        let dyn_contents: &mut dyn BlockContents = &mut storage;
        assert_eq!(dyn_contents.block_bytes(), 384);
    }

    #[test]
    #[should_panic(expected = "must hold")]
    fn write_rejects_short_rows() {
        let mut storage = KvStorage::new(layout());
        storage.write(0, &[0, 1], &[0.0; 6], &[0.0; 12]);
    }
}
