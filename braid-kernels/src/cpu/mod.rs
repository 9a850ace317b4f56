//! CPU reference ops: f32 compute, parallel over rows with rayon. These define what every CUDA kernel
//! must compute, and they are a real fallback when no GPU is present.

mod activation;
mod attention;
mod embedding;
mod linear;
mod norm;
mod rope;

pub use activation::{add_inplace, silu_mul, softmax_inplace};
pub use attention::{paged_attention, AttentionShape};
pub use embedding::embedding;
pub use linear::linear;
pub use norm::rms_norm;
pub use rope::apply_rope;

/// Dot product with several independent accumulators so the compiler can vectorise it.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    const LANES: usize = 16;
    let mut acc = [0.0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (x, y) = (&a[c * LANES..(c + 1) * LANES], &b[c * LANES..(c + 1) * LANES]);
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0;
    for i in chunks * LANES..a.len() {
        tail += a[i] * b[i];
    }
    acc.iter().sum::<f32>() + tail
}
