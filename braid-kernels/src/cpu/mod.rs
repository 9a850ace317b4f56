//! CPU reference ops: f32 compute, parallel over rows with rayon. These define what every CUDA kernel
//! must compute, and they are a real fallback when no GPU is present.

mod activation;
mod attention;
mod embedding;
mod linear;
mod norm;
mod rope;

pub use activation::{add_inplace, silu_mul, softmax_inplace};
pub use attention::{
    cascade_attention_decode, merge_attention_states, paged_attention, paged_attention_partial,
    AttentionShape,
};
pub use embedding::embedding;
pub use linear::linear;
pub use norm::rms_norm;
pub use rope::apply_rope;

/// Dot product, using AVX2+FMA where the processor has them (detected once at run time, so the
/// same binary still runs on older x86 machines).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the processor supports the features the function was compiled for.
        return unsafe { dot_avx2(a, b) };
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

/// Several independent accumulators so the compiler can vectorise (and, inlined into
/// `dot_avx2`, use 256-bit FMA).
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    const LANES: usize = 32;
    let mut acc = [0.0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (x, y) = (
            &a[c * LANES..(c + 1) * LANES],
            &b[c * LANES..(c + 1) * LANES],
        );
        for l in 0..LANES {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut tail = 0.0;
    for i in chunks * LANES..a.len() {
        tail += a[i] * b[i];
    }
    acc.iter().sum::<f32>() + tail
}
