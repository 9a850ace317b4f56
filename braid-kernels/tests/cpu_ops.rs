//! The CPU reference ops against direct f64 computations of their definitions, on odd sizes.

use braid_kernels::cpu;
use proptest::prelude::*;

/// Deterministic pseudo-random values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn assert_close(a: &[f32], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x as f64 - y).abs() <= tol * (1.0 + y.abs()),
            "element {i}: {x} vs {y}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn linear_matches_definition(n in 1usize..6, k in 1usize..70, m in 1usize..40, seed in 0u64..1000, bias in any::<bool>()) {
        let x = rand_vec(n * k, seed);
        let w = rand_vec(m * k, seed + 1);
        let b = rand_vec(m, seed + 2);
        let mut out = vec![f32::NAN; n * m];
        cpu::linear(&x, n, k, &w, m, bias.then_some(&b[..]), &mut out);
        let want: Vec<f64> = (0..n * m)
            .map(|i| {
                let (t, r) = (i / m, i % m);
                (0..k).map(|j| x[t * k + j] as f64 * w[r * k + j] as f64).sum::<f64>() + if bias { b[r] as f64 } else { 0.0 }
            })
            .collect();
        assert_close(&out, &want, 1e-5);
    }

    #[test]
    fn rms_norm_matches_definition(rows in 1usize..5, dim in 1usize..300, seed in 0u64..1000) {
        let x = rand_vec(rows * dim, seed);
        let w = rand_vec(dim, seed + 7);
        let mut out = vec![f32::NAN; rows * dim];
        cpu::rms_norm(&x, &w, 1e-6, &mut out);
        let mut want = Vec::new();
        for r in x.chunks(dim) {
            let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (ms + 1e-6).sqrt();
            want.extend(r.iter().zip(&w).map(|(&v, &w)| v as f64 * inv * w as f64));
        }
        assert_close(&out, &want, 1e-5);
    }
}

#[test]
fn rope_rotates_pairs_by_position_times_frequency() {
    let (heads, dim) = (3, 8);
    let positions = [0usize, 5, 1000];
    let inv_freq = [1.0f32, 0.1, 0.01, 0.001];
    let x = rand_vec(positions.len() * heads * dim, 3);
    let mut out = x.clone();
    cpu::apply_rope(&mut out, heads, dim, &positions, &inv_freq, 1.0);
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * dim;
            for i in 0..dim / 2 {
                let a = pos as f64 * inv_freq[i] as f64;
                let (x0, x1) = (x[base + i] as f64, x[base + i + dim / 2] as f64);
                assert!((out[base + i] as f64 - (x0 * a.cos() - x1 * a.sin())).abs() < 1e-4);
                assert!(
                    (out[base + i + dim / 2] as f64 - (x1 * a.cos() + x0 * a.sin())).abs() < 1e-4
                );
            }
        }
    }
}

#[test]
fn softmax_is_stable_for_large_logits() {
    let mut x = vec![1000.0f32, 999.0, -1000.0];
    cpu::softmax_inplace(&mut x);
    assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    assert!(x[0] > x[1] && x[2] == 0.0);
}

#[test]
fn silu_mul_matches_definition() {
    let g = rand_vec(37, 1);
    let u = rand_vec(37, 2);
    let mut out = vec![f32::NAN; 37];
    cpu::silu_mul(&g, &u, &mut out);
    let want: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64)
        .collect();
    assert_close(&out, &want, 1e-6);
}

#[test]
fn embedding_rejects_ids_outside_the_vocabulary() {
    let table = rand_vec(4 * 3, 9);
    let mut out = vec![0.0; 6];
    cpu::embedding(&table, 3, &[3, 1], &mut out).unwrap();
    assert_eq!(&out[..3], &table[9..12]);
    assert!(cpu::embedding(&table, 3, &[4], &mut out[..3])
        .unwrap_err()
        .to_string()
        .contains("token id 4"));
}

/// Dense causal attention computed directly, for the paged kernel to match.
#[allow(clippy::too_many_arguments)]
fn dense_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    positions: &[usize],
    heads: usize,
    kv_heads: usize,
    dim: usize,
    window: Option<usize>,
) -> Vec<f64> {
    let scale = 1.0 / (dim as f64).sqrt();
    let mut out = Vec::new();
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            let qv = &q[(t * heads + h) * dim..][..dim];
            let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let scores: Vec<f64> = (lo..=pos)
                .map(|j| {
                    (0..dim)
                        .map(|d| qv[d] as f64 * k[(j * kv_heads + kvh) * dim + d] as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..dim {
                out.push(
                    (lo..=pos)
                        .zip(&e)
                        .map(|(j, p)| p / z * v[(j * kv_heads + kvh) * dim + d] as f64)
                        .sum(),
                );
            }
        }
    }
    out
}

#[test]
fn paged_attention_matches_dense_attention_through_a_scattered_block_table() {
    let (heads, kv_heads, dim, block) = (4, 2, 16, 4);
    let len = 23;
    for window in [None, Some(5)] {
        // Logical block i lives in physical block table[i]; the rest of the pool holds noise.
        let table: Vec<u32> = vec![5, 0, 7, 2, 6, 1];
        let num_blocks = 8;
        let row = kv_heads * dim;
        let k_dense = rand_vec(len * row, 11);
        let v_dense = rand_vec(len * row, 12);
        let mut k_cache = rand_vec(num_blocks * block * row, 13);
        let mut v_cache = rand_vec(num_blocks * block * row, 14);
        for j in 0..len {
            let slot = table[j / block] as usize * block + j % block;
            k_cache[slot * row..][..row].copy_from_slice(&k_dense[j * row..][..row]);
            v_cache[slot * row..][..row].copy_from_slice(&v_dense[j * row..][..row]);
        }
        // The last 6 tokens as queries (a prefill chunk after a cached prefix).
        let positions: Vec<usize> = (len - 6..len).collect();
        let q = rand_vec(positions.len() * heads * dim, 15);
        let shape = cpu::AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: dim,
            block_size: block,
            sliding_window: window,
            scale: 1.0 / (dim as f32).sqrt(),
        };
        let mut out = vec![f32::NAN; q.len()];
        cpu::paged_attention(&shape, &q, &positions, &table, &k_cache, &v_cache, &mut out);
        assert_close(
            &out,
            &dense_attention(
                &q, &k_dense, &v_dense, &positions, heads, kv_heads, dim, window,
            ),
            1e-5,
        );
    }
}
