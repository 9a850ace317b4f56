//! ggml tensor types: their ids, block geometry, and CPU dequantization to f32.
//!
//! Block layouts and arithmetic follow ggml's reference `dequantize_row_*` functions operation by
//! operation (same products, same order, no fused multiply-add), so results are bit-identical to
//! the reference implementation that ships with ggml's Python package.

mod blocks;

use rayon::prelude::*;

use crate::error::{QuantError, Result};

/// A ggml tensor element type, with the discriminant equal to ggml's type id.
///
/// Ids 4 and 5 (the old `Q4_2`/`Q4_3`) and 31..=33, 36..=38 (repacked layouts that never
/// appear in files) were removed from ggml and are rejected as unknown.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    IQ2_XXS = 16,
    IQ2_XS = 17,
    IQ3_XXS = 18,
    IQ1_S = 19,
    IQ4_NL = 20,
    IQ3_S = 21,
    IQ2_S = 22,
    IQ4_XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1_M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    MXFP4 = 39,
    NVFP4 = 40,
    Q1_0 = 41,
}

/// Super-block size of the K-quants and most IQ formats.
const QK_K: usize = 256;

impl GgmlType {
    /// Every type this crate recognises, in id order.
    pub const ALL: [GgmlType; 34] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ3_XXS,
        GgmlType::IQ1_S,
        GgmlType::IQ4_NL,
        GgmlType::IQ3_S,
        GgmlType::IQ2_S,
        GgmlType::IQ4_XS,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::IQ1_M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
        GgmlType::NVFP4,
        GgmlType::Q1_0,
    ];

    /// The type with ggml id `id`; an id no ggml version defines is an error naming it.
    pub fn from_id(id: u32) -> Result<Self> {
        GgmlType::ALL
            .iter()
            .copied()
            .find(|ty| ty.id() == id)
            .ok_or(QuantError::UnknownGgmlType { id })
    }

    /// ggml's numeric id of this type (as stored in GGUF tensor infos).
    pub fn id(&self) -> u32 {
        *self as u32
    }

    /// ggml's name of this type (`"Q4_K"`, `"BF16"`, …).
    pub fn name(&self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::Q8_K => "Q8_K",
            GgmlType::IQ2_XXS => "IQ2_XXS",
            GgmlType::IQ2_XS => "IQ2_XS",
            GgmlType::IQ3_XXS => "IQ3_XXS",
            GgmlType::IQ1_S => "IQ1_S",
            GgmlType::IQ4_NL => "IQ4_NL",
            GgmlType::IQ3_S => "IQ3_S",
            GgmlType::IQ2_S => "IQ2_S",
            GgmlType::IQ4_XS => "IQ4_XS",
            GgmlType::I8 => "I8",
            GgmlType::I16 => "I16",
            GgmlType::I32 => "I32",
            GgmlType::I64 => "I64",
            GgmlType::F64 => "F64",
            GgmlType::IQ1_M => "IQ1_M",
            GgmlType::BF16 => "BF16",
            GgmlType::TQ1_0 => "TQ1_0",
            GgmlType::TQ2_0 => "TQ2_0",
            GgmlType::MXFP4 => "MXFP4",
            GgmlType::NVFP4 => "NVFP4",
            GgmlType::Q1_0 => "Q1_0",
        }
    }

    /// Number of values in one block (1 for plain element types).
    pub fn block_size(&self) -> usize {
        self.geometry().0
    }

    /// Number of bytes one block occupies.
    pub fn type_size(&self) -> usize {
        self.geometry().1
    }

    /// Whether [`dequantize`] implements this type.
    pub fn can_dequantize(&self) -> bool {
        self.kernel().is_some()
    }

    /// `(values per block, bytes per block)`, as in ggml's type traits.
    fn geometry(&self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 => (1, 2),
            GgmlType::Q4_0 => (32, 2 + 16),
            GgmlType::Q4_1 => (32, 2 + 2 + 16),
            GgmlType::Q5_0 => (32, 2 + 4 + 16),
            GgmlType::Q5_1 => (32, 2 + 2 + 4 + 16),
            GgmlType::Q8_0 => (32, 2 + 32),
            GgmlType::Q8_1 => (32, 2 + 2 + 32),
            GgmlType::Q2_K => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            GgmlType::Q3_K => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            GgmlType::Q4_K => (QK_K, 2 + 2 + 12 + QK_K / 2),
            GgmlType::Q5_K => (QK_K, 2 + 2 + 12 + QK_K / 8 + QK_K / 2),
            GgmlType::Q6_K => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            GgmlType::Q8_K => (QK_K, 4 + QK_K + 2 * (QK_K / 16)),
            GgmlType::IQ2_XXS => (QK_K, 2 + QK_K / 4),
            GgmlType::IQ2_XS => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            GgmlType::IQ3_XXS => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            GgmlType::IQ1_S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            GgmlType::IQ4_NL => (32, 2 + 16),
            GgmlType::IQ3_S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            GgmlType::IQ2_S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            GgmlType::IQ4_XS => (QK_K, 2 + 2 + QK_K / 64 + QK_K / 2),
            GgmlType::I8 => (1, 1),
            GgmlType::I16 => (1, 2),
            GgmlType::I32 => (1, 4),
            GgmlType::I64 => (1, 8),
            GgmlType::F64 => (1, 8),
            GgmlType::IQ1_M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            GgmlType::BF16 => (1, 2),
            GgmlType::TQ1_0 => (QK_K, 2 + 4 * 13),
            GgmlType::TQ2_0 => (QK_K, 2 + 64),
            GgmlType::MXFP4 => (32, 1 + 16),
            GgmlType::NVFP4 => (64, 4 + 32),
            GgmlType::Q1_0 => (128, 2 + 16),
        }
    }

    /// The block decoder for this type, if implemented.
    fn kernel(&self) -> Option<Kernel> {
        Some(match self {
            GgmlType::F32 => Kernel::F32,
            GgmlType::F16 => Kernel::F16,
            GgmlType::BF16 => Kernel::Bf16,
            GgmlType::Q4_0 => Kernel::Block(blocks::q4_0),
            GgmlType::Q4_1 => Kernel::Block(blocks::q4_1),
            GgmlType::Q5_0 => Kernel::Block(blocks::q5_0),
            GgmlType::Q5_1 => Kernel::Block(blocks::q5_1),
            GgmlType::Q8_0 => Kernel::Block(blocks::q8_0),
            GgmlType::Q2_K => Kernel::Block(blocks::q2_k),
            GgmlType::Q3_K => Kernel::Block(blocks::q3_k),
            GgmlType::Q4_K => Kernel::Block(blocks::q4_k),
            GgmlType::Q5_K => Kernel::Block(blocks::q5_k),
            GgmlType::Q6_K => Kernel::Block(blocks::q6_k),
            GgmlType::Q8_K => Kernel::Block(blocks::q8_k),
            GgmlType::IQ4_NL => Kernel::Block(blocks::iq4_nl),
            GgmlType::IQ4_XS => Kernel::Block(blocks::iq4_xs),
            GgmlType::MXFP4 => Kernel::Block(blocks::mxfp4),
            _ => return None,
        })
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How one type's bytes become f32 values.
#[derive(Clone, Copy)]
enum Kernel {
    F32,
    F16,
    Bf16,
    /// Decodes one block (exactly `type_size` bytes) into `block_size` values.
    Block(fn(&[u8], &mut [f32])),
}

/// Values each parallel task produces: large enough to amortise scheduling, small enough to
/// spread a single weight matrix over every core.
const VALUES_PER_TASK: usize = 1 << 15;

/// Dequantizes `n_elements` values of type `ty` stored in `bytes` to f32.
///
/// `bytes` must hold exactly `n_elements / block_size` blocks. Blocks are decoded in parallel.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    check_lengths(ty, bytes, n_elements)?;
    let mut out = vec![0f32; n_elements];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

/// Dequantizes `bytes` of type `ty` into `out`, whose length is the number of values.
///
/// Same rules as [`dequantize`]; useful to decode straight into a caller-owned buffer.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let kernel = ty
        .kernel()
        .ok_or(QuantError::UnsupportedType { name: ty.name() })?;
    check_lengths(ty, bytes, out.len())?;
    match kernel {
        Kernel::F32 => run(bytes, out, 4, 1, |b, y| {
            y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }),
        Kernel::F16 => run(bytes, out, 2, 1, |b, y| y[0] = blocks::f16_at(b, 0)),
        Kernel::Bf16 => run(bytes, out, 2, 1, |b, y| {
            y[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
        }),
        Kernel::Block(decode) => run(bytes, out, ty.type_size(), ty.block_size(), decode),
    }
    Ok(())
}

fn check_lengths(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<()> {
    if !ty.can_dequantize() {
        return Err(QuantError::UnsupportedType { name: ty.name() });
    }
    let block_size = ty.block_size();
    let partial = n_elements % block_size;
    if partial != 0 {
        return Err(QuantError::PartialBlock {
            ty: ty.name(),
            block_size,
            n_elements,
        });
    }
    // An overflowing size can never equal a real slice length, so saturating is exact here.
    let expected = (n_elements / block_size).saturating_mul(ty.type_size());
    if bytes.len() != expected {
        return Err(QuantError::ByteLength {
            ty: ty.name(),
            n_elements,
            expected,
            actual: bytes.len(),
        });
    }
    Ok(())
}

/// Applies `decode` to every block, in parallel over groups of blocks.
fn run<F>(bytes: &[u8], out: &mut [f32], type_size: usize, block_size: usize, decode: F)
where
    F: Fn(&[u8], &mut [f32]) + Sync + Send,
{
    let blocks_per_task = (VALUES_PER_TASK / block_size).max(1);
    out.par_chunks_mut(blocks_per_task * block_size)
        .zip(bytes.par_chunks(blocks_per_task * type_size))
        .for_each(|(values, raw)| {
            for (y, b) in values
                .chunks_exact_mut(block_size)
                .zip(raw.chunks_exact(type_size))
            {
                decode(b, y);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_geometry_is_consistent() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()).ok(), Some(ty));
            assert!(ty.type_size() > 0 && ty.block_size() > 0, "{ty}");
        }
        assert_eq!(GgmlType::from_id(30).ok(), Some(GgmlType::BF16));
        assert_eq!(GgmlType::Q4_K.type_size(), 144);
        assert_eq!(GgmlType::Q6_K.type_size(), 210);
        assert_eq!(GgmlType::Q8_K.type_size(), 292);
    }

    #[test]
    fn unknown_ids_are_named() {
        for id in [4, 5, 31, 36, 42, u32::MAX] {
            let err = GgmlType::from_id(id).unwrap_err();
            assert_eq!(err.to_string(), format!("unknown ggml tensor type id {id}"));
        }
    }

    #[test]
    fn recognised_but_unimplemented_types_say_so() {
        let err = dequantize(GgmlType::IQ2_XXS, &[0; 66], 256).unwrap_err();
        assert_eq!(err.to_string(), "quant type IQ2_XXS is not supported");
    }

    #[test]
    fn length_mismatches_are_errors() {
        let err = dequantize(GgmlType::Q4_0, &[0; 18], 16).unwrap_err();
        assert!(matches!(err, QuantError::PartialBlock { .. }), "{err}");
        let err = dequantize(GgmlType::Q4_0, &[0; 17], 32).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Q4_0 data for 32 values must be 18 bytes, got 17"
        );
        let err = dequantize(GgmlType::Q4_0, &[0; 18], usize::MAX - 31).unwrap_err();
        assert!(matches!(err, QuantError::ByteLength { .. }), "{err}");
    }

    #[test]
    fn q8_k_scales_by_an_f32() {
        // The reference Python package has no Q8_K decoder, so check one block by hand.
        let mut block = vec![0u8; GgmlType::Q8_K.type_size()];
        block[..4].copy_from_slice(&0.5f32.to_le_bytes());
        for (i, q) in block[4..4 + QK_K].iter_mut().enumerate() {
            *q = (i as i32 - 128) as i8 as u8;
        }
        let values = dequantize(GgmlType::Q8_K, &block, QK_K).unwrap();
        for (i, v) in values.iter().enumerate() {
            assert_eq!(*v, (i as f32 - 128.0) * 0.5);
        }
    }

    #[test]
    fn q4_0_matches_a_hand_computed_block() {
        let mut block = vec![0u8; 18];
        block[..2].copy_from_slice(&half::f16::from_f32(0.25).to_bits().to_le_bytes());
        for (j, q) in block[2..].iter_mut().enumerate() {
            *q = (j as u8) | (15 - j as u8) << 4;
        }
        let values = dequantize(GgmlType::Q4_0, &block, 32).unwrap();
        for j in 0..16 {
            assert_eq!(values[j], (j as f32 - 8.0) * 0.25);
            assert_eq!(values[j + 16], (7.0 - j as f32) * 0.25);
        }
    }

    #[test]
    fn many_blocks_cross_task_boundaries() {
        // More values than one task holds, so the parallel split itself is exercised.
        let n = VALUES_PER_TASK * 3 + 64;
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| {
                half::f16::from_f32((i % 1000) as f32)
                    .to_bits()
                    .to_le_bytes()
            })
            .collect();
        let values = dequantize(GgmlType::F16, &bytes, n).unwrap();
        assert!(values
            .iter()
            .enumerate()
            .all(|(i, v)| *v == (i % 1000) as f32));
    }
}
