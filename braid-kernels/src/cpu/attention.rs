//! Causal attention of new query tokens over a sequence's paged KV cache, with GQA and an optional
//! sliding window.

use rayon::prelude::*;

/// Geometry of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Only the last `w` positions (the query's own included) are visible, as in Mistral.
    pub sliding_window: Option<usize>,
    pub scale: f32,
}

/// `q`: [n, num_heads * head_dim] for tokens at absolute `positions` of one sequence; each attends to
/// the sequence's keys at positions `..=position` (within the window), found through `block_table` in
/// `k_cache`/`v_cache` laid out [num_blocks, block_size, num_kv_heads, head_dim]. Writes `out` like `q`.
pub fn paged_attention(
    shape: &AttentionShape,
    q: &[f32],
    positions: &[usize],
    block_table: &[u32],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
) {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        sliding_window,
        scale,
    } = *shape;
    let group = num_heads / num_kv_heads;
    let kv_row = num_kv_heads * head_dim;
    let key_offset = |j: usize, kvh: usize| {
        let slot = block_table[j / block_size] as usize * block_size + j % block_size;
        slot * kv_row + kvh * head_dim
    };
    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each(|(idx, o)| {
            let (t, h) = (idx / num_heads, idx % num_heads);
            let kvh = h / group;
            let pos = positions[t];
            let start = sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let qh = &q[idx * head_dim..(idx + 1) * head_dim];
            let mut scores: Vec<f32> = (start..=pos)
                .map(|j| {
                    let off = key_offset(j, kvh);
                    super::dot(qh, &k_cache[off..off + head_dim]) * scale
                })
                .collect();
            super::softmax_inplace(&mut scores);
            o.fill(0.0);
            for (j, p) in (start..=pos).zip(scores) {
                let off = key_offset(j, kvh);
                for (o, &v) in o.iter_mut().zip(&v_cache[off..off + head_dim]) {
                    *o += p * v;
                }
            }
        });
}
