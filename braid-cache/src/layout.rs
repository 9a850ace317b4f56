//! Shape of the KV cache: how many layers, heads, blocks, and tokens per block.

use crate::{BlockId, CacheError};

/// Tokens per block when the engine is not told otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The shape of a KV cache. Every layer stores K and V as `[num_blocks, block_size, num_kv_heads, head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvLayout {
    /// Transformer layers, each with its own K and V storage.
    pub num_layers: usize,
    /// Key/value heads per layer (fewer than query heads under grouped-query attention).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
}

impl KvLayout {
    /// Width of one token's K (or V) row in one layer: `num_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Bytes one token occupies across all layers, K and V together, in f32.
    pub fn bytes_per_token_f32(&self) -> usize {
        2 * self.num_layers * self.kv_dim() * std::mem::size_of::<f32>()
    }

    /// Blocks needed to hold `n` tokens (rounded up; zero tokens need zero blocks).
    ///
    /// A layout with `block_size == 0` never passes [`KvLayout::validate`]; here it is
    /// treated as one token per block rather than dividing by zero.
    pub fn blocks_for_tokens(&self, n: usize) -> usize {
        n.div_ceil(self.block_size.max(1))
    }

    /// Tokens the whole pool can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks.saturating_mul(self.block_size)
    }

    /// Checks that every field is usable and that the storage size is addressable.
    pub fn validate(&self) -> Result<(), CacheError> {
        let positive = [
            ("num_layers", self.num_layers),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("block_size", self.block_size),
        ];
        for (field, got) in positive {
            if got == 0 {
                return Err(CacheError::InvalidLayout {
                    field,
                    expected: "at least 1",
                    got,
                });
            }
        }
        // Block ids are u32, so the pool cannot address more blocks than that.
        if self.num_blocks == 0 || self.num_blocks > BlockId::MAX as usize {
            return Err(CacheError::InvalidLayout {
                field: "num_blocks",
                expected: "between 1 and 4294967295",
                got: self.num_blocks,
            });
        }
        let too_large = CacheError::TooLarge {
            num_blocks: self.num_blocks,
        };
        let per_layer = self
            .num_blocks
            .checked_mul(self.block_size)
            .and_then(|n| n.checked_mul(self.num_kv_heads))
            .and_then(|n| n.checked_mul(self.head_dim))
            .ok_or(too_large.clone())?;
        // The byte size must fit too, or the allocation itself would overflow.
        per_layer
            .checked_mul(2 * std::mem::size_of::<f32>())
            .and_then(|n| n.checked_mul(self.num_layers))
            .filter(|&bytes| bytes <= isize::MAX as usize)
            .ok_or(too_large)?;
        Ok(())
    }

    /// f32 elements in one layer's K (or V) storage. Only meaningful for a validated layout.
    pub(crate) fn elements_per_layer(&self) -> usize {
        self.num_blocks * self.block_size * self.kv_dim()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            num_layers: 3,
            num_kv_heads: 2,
            head_dim: 8,
            block_size: 16,
            num_blocks: 10,
        }
    }

    #[test]
    fn sizes() {
        let l = layout();
        assert_eq!(l.kv_dim(), 16);
        assert_eq!(l.bytes_per_token_f32(), 2 * 3 * 16 * 4);
        assert_eq!(l.blocks_for_tokens(0), 0);
        assert_eq!(l.blocks_for_tokens(1), 1);
        assert_eq!(l.blocks_for_tokens(16), 1);
        assert_eq!(l.blocks_for_tokens(17), 2);
        assert_eq!(l.capacity_tokens(), 160);
    }

    #[test]
    fn validate_rejects_zero_fields_and_overflow() {
        assert_eq!(layout().validate(), Ok(()));
        let err = KvLayout {
            block_size: 0,
            ..layout()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "KV cache layout field `block_size` must be at least 1, got 0"
        );
        assert!(matches!(
            KvLayout {
                num_blocks: 0,
                ..layout()
            }
            .validate(),
            Err(CacheError::InvalidLayout {
                field: "num_blocks",
                ..
            })
        ));
        assert!(matches!(
            KvLayout {
                head_dim: usize::MAX / 4,
                num_blocks: 1000,
                ..layout()
            }
            .validate(),
            Err(CacheError::TooLarge { num_blocks: 1000 })
        ));
    }
}
