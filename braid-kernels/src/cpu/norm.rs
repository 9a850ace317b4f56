//! RMSNorm.

use rayon::prelude::*;

/// `out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight` for every row of length `weight.len()`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, x)| {
            let ss = super::dot(x, x);
            let inv = 1.0 / (ss / dim as f32 + eps).sqrt();
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(weight) {
                *o = x * inv * w;
            }
        });
}
