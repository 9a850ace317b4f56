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

/// A paged cache where the members of one group share their first `prefix_len` tokens: whole
/// shared blocks are the same table entries; a partly shared block is each member's own block
/// holding a copy of the shared rows, as copy-on-write leaves it.
struct SharedGroup {
    tables: Vec<Vec<u32>>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn shared_group(
    contexts: &[usize],
    prefix_len: usize,
    block: usize,
    row: usize,
    seed: u64,
) -> SharedGroup {
    let full_shared = prefix_len / block;
    let mut next_block = 0u32;
    let mut tables: Vec<Vec<u32>> = Vec::new();
    let mut copies: Vec<(u32, u32)> = Vec::new();
    for (m, &ctx) in contexts.iter().enumerate() {
        let table: Vec<u32> = (0..ctx.div_ceil(block))
            .map(|i| {
                if m > 0 && i < full_shared {
                    return tables[0][i];
                }
                let b = next_block;
                next_block += 1;
                if m > 0 && i == full_shared && !prefix_len.is_multiple_of(block) {
                    copies.push((tables[0][i], b));
                }
                b
            })
            .collect();
        tables.push(table);
    }
    let len = (next_block as usize + 1) * block * row;
    let (mut k, mut v) = (rand_vec(len, seed), rand_vec(len, seed + 1));
    for (from, to) in copies {
        let rows = (prefix_len % block) * row;
        let (from, to) = (from as usize * block * row, to as usize * block * row);
        k.copy_within(from..from + rows, to);
        v.copy_within(from..from + rows, to);
    }
    SharedGroup { tables, k, v }
}

/// Cascade decode of random groups equals plain paged attention of every member: group sizes
/// 1..9, prefixes of 0, block multiples, other lengths and one less than the shortest context,
/// GQA 1/2/4, odd head counts, windows shorter and longer than the prefix.
#[test]
fn cascade_decode_equals_paged_attention_for_random_groups() {
    let mut state = 0x5EED_u64;
    let mut below = |n: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) as usize) % n
    };
    for case in 0..96u64 {
        let kv_heads = [1, 3][below(2)];
        let group = [1, 2, 4][below(3)];
        let dim = [8, 16][below(2)];
        let block = [4, 16][below(2)];
        let members = 1 + below(9);
        let prefix_len = match case % 4 {
            0 => 0,
            1 => block * (1 + below(4)),
            2 => 1 + below(50),
            _ => 3 + below(40),
        };
        let mut contexts: Vec<usize> = (0..members).map(|_| prefix_len + 1 + below(30)).collect();
        if case % 4 == 3 {
            // The prefix ends right before the shortest member's new token.
            contexts[below(members)] = prefix_len + 1;
        }
        let window = match case % 3 {
            0 => None,
            1 => Some(1 + below(prefix_len.max(1))),
            _ => Some(prefix_len + 2 + below(20)),
        };
        let heads = kv_heads * group;
        let shape = cpu::AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: dim,
            block_size: block,
            sliding_window: window,
            scale: 1.0 / (dim as f32).sqrt(),
        };
        let g = shared_group(&contexts, prefix_len, block, kv_heads * dim, case);
        let row = heads * dim;
        let q = rand_vec(members * row, 100 + case);
        let positions: Vec<usize> = contexts.iter().map(|c| c - 1).collect();
        let tables: Vec<&[u32]> = g.tables.iter().map(|t| &t[..]).collect();
        let mut got = vec![f32::NAN; q.len()];
        cpu::cascade_attention_decode(
            &shape,
            &q,
            &positions,
            &g.tables[0],
            prefix_len,
            &tables,
            &g.k,
            &g.v,
            &mut got,
        );
        for (m, table) in tables.iter().enumerate() {
            let mut want = vec![0.0f32; row];
            cpu::paged_attention(
                &shape,
                &q[m * row..(m + 1) * row],
                &positions[m..m + 1],
                table,
                &g.k,
                &g.v,
                &mut want,
            );
            let want: Vec<f64> = want.iter().map(|&x| x as f64).collect();
            assert_close(&got[m * row..(m + 1) * row], &want, 1e-5);
        }
    }
}

/// Attention split at any key into two partial states and merged equals attention over all keys,
/// including splits that leave one side empty.
#[test]
fn merged_partial_states_equal_full_attention() {
    let (heads, kv_heads, dim, block) = (6, 3, 16, 4);
    let contexts = [29usize, 3, 17];
    let g = shared_group(&contexts, 0, block, kv_heads * dim, 7);
    let row = heads * dim;
    for window in [None, Some(9)] {
        let shape = cpu::AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: dim,
            block_size: block,
            sliding_window: window,
            scale: 0.3,
        };
        for (s, &ctx) in contexts.iter().enumerate() {
            let positions = [ctx - 1];
            let q = rand_vec(row, 40 + s as u64);
            let mut want = vec![0.0f32; row];
            cpu::paged_attention(&shape, &q, &positions, &g.tables[s], &g.k, &g.v, &mut want);
            let want: Vec<f64> = want.iter().map(|&x| x as f64).collect();
            for split in [0, 1, ctx / 2, ctx - 1, ctx, ctx + 5] {
                let (mut a, mut la) = (vec![f32::NAN; row], vec![f32::NAN; heads]);
                let (mut b, mut lb) = (vec![f32::NAN; row], vec![f32::NAN; heads]);
                let table = &g.tables[s];
                cpu::paged_attention_partial(
                    &shape,
                    &q,
                    &positions,
                    table,
                    &g.k,
                    &g.v,
                    0..split,
                    &mut a,
                    &mut la,
                );
                cpu::paged_attention_partial(
                    &shape,
                    &q,
                    &positions,
                    table,
                    &g.k,
                    &g.v,
                    split..ctx,
                    &mut b,
                    &mut lb,
                );
                cpu::merge_attention_states(&mut a, &mut la, &b, &lb, dim);
                assert_close(&a, &want, 1e-5);
                assert!(la.iter().all(|l| l.is_finite()), "split {split}: {la:?}");
            }
            // An empty range gives a zero output and an lse of -inf.
            let (mut o, mut l) = (vec![f32::NAN; row], vec![0.0f32; heads]);
            cpu::paged_attention_partial(
                &shape,
                &q,
                &positions,
                &g.tables[s],
                &g.k,
                &g.v,
                ctx..ctx + 3,
                &mut o,
                &mut l,
            );
            assert!(o.iter().all(|&x| x == 0.0));
            assert!(l.iter().all(|&x| x == f32::NEG_INFINITY));
        }
    }
}

/// The log-sum-exp of a partial state is that of its scaled scores.
#[test]
fn partial_lse_is_the_log_sum_exp_of_the_scores() {
    let (dim, block) = (8, 4);
    let g = shared_group(&[11], 0, block, dim, 3);
    let shape = cpu::AttentionShape {
        num_heads: 1,
        num_kv_heads: 1,
        head_dim: dim,
        block_size: block,
        sliding_window: None,
        scale: 0.7,
    };
    let q = rand_vec(dim, 5);
    let (mut o, mut l) = (vec![0.0f32; dim], vec![0.0f32; 1]);
    cpu::paged_attention_partial(
        &shape,
        &q,
        &[10],
        &g.tables[0],
        &g.k,
        &g.v,
        2..7,
        &mut o,
        &mut l,
    );
    let want = (2..7)
        .map(|j: usize| {
            let slot = g.tables[0][j / block] as usize * block + j % block;
            let k = &g.k[slot * dim..(slot + 1) * dim];
            (q.iter()
                .zip(k)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
                * 0.7)
                .exp()
        })
        .sum::<f64>()
        .ln();
    assert!((l[0] as f64 - want).abs() < 1e-5, "{} vs {want}", l[0]);
}
