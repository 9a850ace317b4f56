//! Dense linear layer: `y = x W^T + b` with W in PyTorch's [out_features, in_features] layout.

use rayon::prelude::*;

/// Rows of W handled per task: enough work to amortise scheduling, small enough to balance two cores or sixty-four.
const ROWS_PER_TASK: usize = 16;

/// `x`: [n, k]; `w`: [m, k]; `bias`: [m]; `out`: [n, m].
pub fn linear(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    m: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    debug_assert_eq!(x.len(), n * k);
    debug_assert_eq!(w.len(), m * k);
    debug_assert_eq!(out.len(), n * m);
    if n == 1 {
        out.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(chunk, o)| {
                let row0 = chunk * ROWS_PER_TASK;
                for (i, o) in o.iter_mut().enumerate() {
                    let r = row0 + i;
                    *o = super::dot(x, &w[r * k..(r + 1) * k]) + bias.map_or(0.0, |b| b[r]);
                }
            });
        return;
    }
    // Each task keeps a few weight rows hot in cache while it sweeps every token, writing a
    // transposed [m, n] result that is turned back into [n, m] at the end.
    let mut out_t = vec![0.0f32; m * n];
    out_t
        .par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .for_each(|(chunk, o)| {
            let row0 = chunk * ROWS_PER_TASK;
            for (i, o_row) in o.chunks_mut(n).enumerate() {
                let r = row0 + i;
                let w_row = &w[r * k..(r + 1) * k];
                let b = bias.map_or(0.0, |b| b[r]);
                for (t, o) in o_row.iter_mut().enumerate() {
                    *o = super::dot(&x[t * k..(t + 1) * k], w_row) + b;
                }
            }
        });
    out.par_chunks_mut(m).enumerate().for_each(|(t, o)| {
        for (r, o) in o.iter_mut().enumerate() {
            *o = out_t[r * n + t];
        }
    });
}
