//! f32 key/value storage on the host, laid out per layer as `[num_blocks, block_size, num_kv_heads, head_dim]`.

use crate::{CacheError, KvLayout};

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
    #[should_panic(expected = "must hold")]
    fn write_rejects_short_rows() {
        let mut storage = KvStorage::new(layout());
        storage.write(0, &[0, 1], &[0.0; 6], &[0.0; 12]);
    }
}
