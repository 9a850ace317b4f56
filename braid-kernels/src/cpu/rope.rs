//! Rotary position embedding in the "rotate half" layout Hugging Face models use (GGUF's interleaved
//! LLaMA layout is converted to it at load time).

use rayon::prelude::*;

/// Rotate each head of `x` ([n_tokens, n_heads * head_dim]) in place by its token's position.
/// `inv_freq` has `rotary_dim / 2` entries (scaling variants are folded into it by the caller);
/// `attention_factor` scales cos and sin (1.0 except for YaRN-style scaling).
pub fn apply_rope(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    positions: &[usize],
    inv_freq: &[f32],
    attention_factor: f32,
) {
    let half = inv_freq.len();
    let row = n_heads * head_dim;
    x.par_chunks_mut(row)
        .zip(positions.par_iter())
        .for_each(|(tok, &pos)| {
            // Angles in f32, as the reference implementation computes them.
            let (sin, cos): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|&f| {
                    let a = pos as f32 * f;
                    (a.sin() * attention_factor, a.cos() * attention_factor)
                })
                .unzip();
            for head in tok.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (x0, x1) = (head[i], head[i + half]);
                    head[i] = x0 * cos[i] - x1 * sin[i];
                    head[i + half] = x1 * cos[i] + x0 * sin[i];
                }
            }
        });
}
