//! The fused RoPE + q/k-norm + KV-write kernel against the CPU reference ops, and the GPU argmax and
//! sampler against CPU computations of their definitions (exact ids for argmax, exact kept sets
//! and chi-square frequency checks for sampling). Inputs are random with odd sizes and outputs are
//! poisoned beforehand. Without a device the GPU tests say "skipped: no CUDA device" and pass.
//!
//! `cargo test --release --test cuda_rope_sampling -- --ignored --nocapture` prints a timing table.

use braid_kernels::cpu;
use braid_kernels::cuda::{
    CudaDevice, CudaError, CudaSlice, RopeParams, SamplingBuffers, SamplingRow, SAMPLE_MAX_VOCAB,
    SKIP_SLOT,
};
use half::{bf16, f16};

mod common;
use common::{capture, device, poisoned, rel_l2, single_stream_mode, to_f32, Rng, TestFloat};

const EPS: f32 = 1e-6;

// ---------------------------------------------------------------------------------------------
// RoPE + q/k-norm + KV write

struct RopeCase {
    n: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    qk_norm: bool,
    theta: f32,
}

fn check_rope<T: TestFloat>(dev: &CudaDevice, rng: &mut Rng, case: &RopeCase) {
    let RopeCase {
        n,
        num_heads,
        num_kv_heads,
        head_dim,
        qk_norm,
        theta,
    } = *case;
    let what = format!(
        "rope_{} n={n} heads={num_heads}/{num_kv_heads} head_dim={head_dim} norm={qk_norm}",
        T::SUFFIX
    );
    let (q_dim, kv_dim) = (num_heads * head_dim, num_kv_heads * head_dim);
    let row = q_dim + 2 * kv_dim;
    let block_size = 16;
    let num_slots = (n + 9).div_ceil(block_size) * block_size;

    let qkv: Vec<T> = rng.vec(n * row, -2.0, 2.0);
    let positions: Vec<u32> = (0..n).map(|_| rng.below(40_001) as u32).collect();
    let mut slots: Vec<u32> = (0..num_slots as u32).collect();
    rng.shuffle(&mut slots);
    slots.truncate(n);
    for (i, s) in slots.iter_mut().enumerate() {
        if i % 7 == 3 {
            *s = SKIP_SLOT;
        }
    }
    // A slot past the end of the cache must be skipped too, not written out of bounds.
    if n > 5 {
        slots[5] = num_slots as u32 + 3;
    }
    let inv_freq: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
        .collect();
    // Qwen3's k_norm weights reach ~100; q_norm's stay near 1.
    let q_norm: Vec<T> = rng.vec(head_dim, 0.5, 1.5);
    let k_norm: Vec<T> = rng.vec(head_dim, -100.0, 100.0);

    let qkv_dev = dev.upload(&qkv).unwrap();
    let pos_dev = dev.upload(&positions).unwrap();
    let slots_dev = dev.upload(&slots).unwrap();
    let freq_dev = dev.upload(&inv_freq).unwrap();
    let qn_dev = dev.upload(&q_norm).unwrap();
    let kn_dev = dev.upload(&k_norm).unwrap();
    let mut q_out = poisoned::<T>(dev, n * q_dim);
    let mut k_cache = poisoned::<T>(dev, num_slots * kv_dim);
    let mut v_cache = poisoned::<T>(dev, num_slots * kv_dim);
    let params = RopeParams {
        n,
        num_heads,
        num_kv_heads,
        head_dim,
    };
    let (qn_view, kn_view) = (qn_dev.as_view(), kn_dev.as_view());
    dev.rope_qk_norm_kv_write(
        &qkv_dev,
        &pos_dev,
        &slots_dev,
        &freq_dev,
        qk_norm.then_some(&qn_view),
        qk_norm.then_some(&kn_view),
        EPS,
        &mut q_out,
        &mut k_cache,
        &mut v_cache,
        &params,
    )
    .unwrap();
    let got_q = dev.download(&q_out).unwrap();
    let got_k = dev.download(&k_cache).unwrap();
    let got_v = dev.download(&v_cache).unwrap();

    // CPU reference: exactly the model's f32 path.
    let x = to_f32(&qkv);
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for t in x.chunks(row) {
        q.extend_from_slice(&t[..q_dim]);
        k.extend_from_slice(&t[q_dim..q_dim + kv_dim]);
        v.extend_from_slice(&t[q_dim + kv_dim..]);
    }
    if qk_norm {
        let qn = to_f32(&q_norm);
        let kn = to_f32(&k_norm);
        let q_in = q.clone();
        cpu::rms_norm(&q_in, &qn, EPS, &mut q);
        let k_in = k.clone();
        cpu::rms_norm(&k_in, &kn, EPS, &mut k);
    }
    let pos: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
    cpu::apply_rope(&mut q, num_heads, head_dim, &pos, &inv_freq, 1.0);
    cpu::apply_rope(&mut k, num_kv_heads, head_dim, &pos, &inv_freq, 1.0);

    let mut worst = 0.0f64;
    for (h, (g, w)) in got_q.chunks(head_dim).zip(q.chunks(head_dim)).enumerate() {
        let err = rel_l2(&what, g, w);
        assert!(
            err < T::REL_L2,
            "{what}: q of token {} head {} has rel. L2 error {err}",
            h / num_heads,
            h % num_heads
        );
        worst = worst.max(err);
    }
    let mut written = vec![false; num_slots];
    for (t, &slot) in slots.iter().enumerate() {
        let slot = slot as usize;
        if slot >= num_slots {
            continue;
        }
        written[slot] = true;
        for h in 0..num_kv_heads {
            let range = slot * kv_dim + h * head_dim..slot * kv_dim + (h + 1) * head_dim;
            let want = &k[t * kv_dim + h * head_dim..t * kv_dim + (h + 1) * head_dim];
            let err = rel_l2(&what, &got_k[range.clone()], want);
            assert!(
                err < T::REL_L2,
                "{what}: k of token {t} head {h} has rel. L2 error {err}"
            );
            worst = worst.max(err);
            let want_v = &qkv[t * row + q_dim + kv_dim + h * head_dim
                ..t * row + q_dim + kv_dim + (h + 1) * head_dim];
            assert!(
                got_v[range]
                    .iter()
                    .zip(want_v)
                    .all(|(g, w)| g.to_f32().to_bits() == w.to_f32().to_bits()),
                "{what}: v of token {t} head {h} is not an exact copy"
            );
        }
    }
    for (slot, &w) in written.iter().enumerate() {
        if !w {
            let range = slot * kv_dim..(slot + 1) * kv_dim;
            assert!(
                got_k[range.clone()]
                    .iter()
                    .chain(&got_v[range])
                    .all(|v| v.to_f32().is_nan()),
                "{what}: slot {slot} was written although no token maps to it"
            );
        }
    }
    eprintln!("{what}: worst per-head rel. L2 error {worst:.2e}");
}

fn rope_cases() -> Vec<RopeCase> {
    let mut cases = Vec::new();
    for (head_dim, num_heads, num_kv_heads, theta) in [
        (64, 9, 3, 10_000.0),
        (128, 16, 8, 1_000_000.0),
        (128, 7, 1, 500_000.0),
    ] {
        for qk_norm in [false, true] {
            cases.push(RopeCase {
                n: 37,
                num_heads,
                num_kv_heads,
                head_dim,
                qk_norm,
                theta,
            });
        }
    }
    cases.push(RopeCase {
        n: 1,
        num_heads: 16,
        num_kv_heads: 8,
        head_dim: 128,
        qk_norm: true,
        theta: 1e6,
    });
    // A head size that fills no whole warp of pairs, and the largest supported one.
    cases.push(RopeCase {
        n: 5,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 80,
        qk_norm: true,
        theta: 1e4,
    });
    cases.push(RopeCase {
        n: 3,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 512,
        qk_norm: true,
        theta: 1e4,
    });
    cases.push(RopeCase {
        n: 4,
        num_heads: 8,
        num_kv_heads: 4,
        head_dim: 256,
        qk_norm: true,
        theta: 1e6,
    });
    cases
}

#[test]
fn rope_qk_norm_kv_write_matches_cpu_reference() {
    let Some(dev) = device("rope_qk_norm_kv_write_matches_cpu_reference") else {
        return;
    };
    let mut rng = Rng(11);
    for case in rope_cases() {
        check_rope::<f32>(&dev, &mut rng, &case);
        check_rope::<f16>(&dev, &mut rng, &case);
        check_rope::<bf16>(&dev, &mut rng, &case);
    }
}

#[test]
fn rope_rejects_bad_shapes_and_buffers() {
    let Some(dev) = device("rope_rejects_bad_shapes_and_buffers") else {
        return;
    };
    let params = RopeParams {
        n: 2,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 8,
    };
    let qkv = dev.alloc_zeros::<f32>(2 * 4 * 8).unwrap();
    let ids = dev.alloc_zeros::<u32>(2).unwrap();
    let freq = dev.alloc_zeros::<f32>(4).unwrap();
    let mut q_out = dev.alloc_zeros::<f32>(2 * 2 * 8).unwrap();
    let mut k_cache = dev.alloc_zeros::<f32>(5 * 8).unwrap();
    let mut v_cache = dev.alloc_zeros::<f32>(5 * 8).unwrap();
    let mut short_v = dev.alloc_zeros::<f32>(39).unwrap();
    let mut short_q = dev.alloc_zeros::<f32>(31).unwrap();
    let run = |p: &RopeParams,
               q_out: &mut CudaSlice<f32>,
               k: &mut CudaSlice<f32>,
               v: &mut CudaSlice<f32>| {
        dev.rope_qk_norm_kv_write(&qkv, &ids, &ids, &freq, None, None, EPS, q_out, k, v, p)
    };
    run(&params, &mut q_out, &mut k_cache, &mut v_cache).unwrap();
    let err = run(&params, &mut q_out, &mut k_cache, &mut short_v).unwrap_err();
    assert_eq!(
        err.to_string(),
        "rope_qk_norm_kv_write: `v_cache` holds 39 elements, expected 40"
    );
    let err = run(&params, &mut short_q, &mut k_cache, &mut v_cache).unwrap_err();
    assert_eq!(
        err.to_string(),
        "rope_qk_norm_kv_write: `q_out` holds 31 elements, expected 32"
    );
    let err = run(&params, &mut q_out, &mut short_v.clone(), &mut short_v).unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InvalidArgument {
                argument: "the KV cache length",
                ..
            }
        ),
        "{err}"
    );
    let odd = RopeParams {
        head_dim: 7,
        ..params
    };
    let err = run(&odd, &mut q_out, &mut k_cache, &mut v_cache).unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InvalidArgument {
                argument: "head_dim",
                ..
            }
        ),
        "{err}"
    );
    dev.synchronize().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Argmax and sampling

/// Index of the largest value, NaN as negative infinity, lowest index among equals.
fn argmax_reference(row: &[f32]) -> u32 {
    let mut best = 0;
    let clean = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    for (i, &v) in row.iter().enumerate() {
        if clean(v) > clean(row[best]) {
            best = i;
        }
    }
    best as u32
}

fn check_argmax<T: TestFloat>(dev: &CudaDevice, rng: &mut Rng) {
    // On sm_90+ up to 16 rows run clusters of 8 blocks a row, 17–64 rows clusters of 2, more rows
    // one block per row.
    for (rows, vocab) in [
        (3, 1),
        (5, 7),
        (6, 50),
        (4, 1001),
        (40, 1001),
        (3, 151_936),
        (2, 151_937),
        (17, 4099),
        (64, 151_936),
        (65, 333),
    ] {
        let what = format!("argmax_{} [{rows}, {vocab}]", T::SUFFIX);
        let mut logits: Vec<T> = rng.vec(rows * vocab, -30.0, 30.0);
        for r in 0..rows {
            let row = &mut logits[r * vocab..(r + 1) * vocab];
            match r % 3 {
                // Ties at the maximum: the lowest id wins.
                0 if vocab > 2 => {
                    let (a, b) = (rng.below(vocab), rng.below(vocab));
                    row[a] = T::from_f32(64.0);
                    row[b] = T::from_f32(64.0);
                }
                // NaN is never the argmax.
                1 => {
                    for _ in 0..vocab.div_ceil(10) {
                        let i = rng.below(vocab);
                        row[i] = T::from_f32(f32::NAN);
                    }
                }
                _ => {}
            }
        }
        let logits_dev = dev.upload(&logits).unwrap();
        let mut out = dev.upload(&vec![u32::MAX; rows]).unwrap();
        dev.argmax(&logits_dev, rows, vocab, &mut out).unwrap();
        let got = dev.download(&out).unwrap();
        for r in 0..rows {
            let row = to_f32(&logits[r * vocab..(r + 1) * vocab]);
            assert_eq!(got[r], argmax_reference(&row), "{what}: row {r}");
        }
    }
}

#[test]
fn argmax_matches_cpu_with_ties_and_nan() {
    let Some(dev) = device("argmax_matches_cpu_with_ties_and_nan") else {
        return;
    };
    let mut rng = Rng(21);
    check_argmax::<f32>(&dev, &mut rng);
    check_argmax::<f16>(&dev, &mut rng);
    check_argmax::<bf16>(&dev, &mut rng);
}

fn sampled(
    temperature: f32,
    top_k: u32,
    top_p: f32,
    min_p: f32,
    seed: u64,
    step: u64,
) -> SamplingRow {
    SamplingRow {
        temperature,
        top_k,
        top_p,
        min_p,
        seed,
        step,
    }
}

/// The filtered distribution, computed as the CPU sampler does (Hugging Face's warpers in order,
/// in f64 over the f32-scaled logits). Greedy rows put all mass on the argmax.
fn reference_probs(logits: &[f32], p: &SamplingRow) -> Vec<f64> {
    let n = logits.len();
    if p.temperature < 1e-5 {
        let mut probs = vec![0.0; n];
        probs[argmax_reference(logits) as usize] = 1.0;
        return probs;
    }
    let x: Vec<f32> = logits
        .iter()
        .map(|&l| {
            if l.is_nan() {
                f32::NEG_INFINITY
            } else {
                l / p.temperature
            }
        })
        .collect();
    let mut keep: Vec<bool> = vec![true; n];
    if p.top_k > 0 && (p.top_k as usize) < n {
        let mut sorted = x.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let threshold = sorted[p.top_k as usize - 1];
        for (k, &v) in keep.iter_mut().zip(&x) {
            *k &= v >= threshold;
        }
    }
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weight = |v: f32| ((v - max) as f64).exp();
    if p.top_p < 1.0 {
        let mut order: Vec<usize> = (0..n)
            .filter(|&i| keep[i] && x[i] > f32::NEG_INFINITY)
            .collect();
        order.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
        let total: f64 = order.iter().map(|&i| weight(x[i])).sum();
        let target = p.top_p as f64 * total;
        let mut before = 0.0;
        for (rank, &i) in order.iter().enumerate() {
            if rank > 0 && before >= target {
                keep[i] = false;
            } else {
                before += weight(x[i]);
            }
        }
    }
    if p.min_p > 0.0 {
        for (k, &v) in keep.iter_mut().zip(&x) {
            *k &= weight(v) >= p.min_p as f64;
        }
    }
    let w: Vec<f64> = (0..n)
        .map(|i| if keep[i] { weight(x[i]) } else { 0.0 })
        .collect();
    let total: f64 = w.iter().sum();
    w.iter().map(|v| v / total).collect()
}

/// Draws outside the support fail at once; the rest must pass a chi-square test, with categories
/// expecting fewer than 5 draws pooled. The bound (df + 6·sqrt(2·df)) fails a correct sampler
/// with a probability far below 1e-6.
fn check_frequencies(what: &str, ids: &[u32], probs: &[f64]) {
    let draws = ids.len() as f64;
    let mut counts = vec![0u64; probs.len()];
    for &id in ids {
        let id = id as usize;
        assert!(
            id < probs.len() && probs[id] > 0.0,
            "{what}: drew id {id}, which the filters remove"
        );
        counts[id] += 1;
    }
    let (mut chi2, mut df) = (0.0f64, 0usize);
    let (mut pooled_count, mut pooled_expected) = (0.0f64, 0.0f64);
    for (i, &p) in probs.iter().enumerate() {
        if p == 0.0 {
            continue;
        }
        let expected = p * draws;
        if expected < 5.0 {
            pooled_count += counts[i] as f64;
            pooled_expected += expected;
        } else {
            chi2 += (counts[i] as f64 - expected).powi(2) / expected;
            df += 1;
        }
    }
    if pooled_expected > 0.0 {
        chi2 += (pooled_count - pooled_expected).powi(2) / pooled_expected;
        df += 1;
    }
    let df = df.saturating_sub(1) as f64;
    let bound = df + 6.0 * (2.0 * df).sqrt() + 1e-9;
    assert!(
        chi2 <= bound,
        "{what}: chi-square {chi2:.1} over {df} degrees of freedom exceeds {bound:.1}"
    );
    eprintln!("{what}: chi-square {chi2:.1}, {df} degrees of freedom");
}

/// Uploads `params.len()` copies of `row` and samples each with its own parameters, `batch` rows
/// per launch (on sm_90+ up to 16 rows a launch run clusters of 8 blocks a row, 17–64 clusters of
/// 2, more one block per row).
fn sample_rows<T: TestFloat>(
    dev: &CudaDevice,
    row: &[T],
    params: &[SamplingRow],
    batch: usize,
) -> Vec<u32> {
    let rows = params.len();
    let vocab = row.len();
    let mut logits = Vec::with_capacity(rows * vocab);
    for _ in 0..rows {
        logits.extend_from_slice(row);
    }
    let logits_dev = dev.upload(&logits).unwrap();
    let mut buffers = SamplingBuffers::new(dev, batch).unwrap();
    let mut out = dev.upload(&vec![u32::MAX; rows]).unwrap();
    for start in (0..rows).step_by(batch) {
        let end = (start + batch).min(rows);
        buffers.write(dev, &params[start..end]).unwrap();
        let logits = logits_dev.slice(start * vocab..end * vocab);
        dev.sample(
            &logits,
            end - start,
            vocab,
            &buffers,
            &mut out.slice_mut(start..end),
        )
        .unwrap();
    }
    dev.download(&out).unwrap()
}

fn check_sampling_frequencies<T: TestFloat>(dev: &CudaDevice, rng: &mut Rng, batch: usize) {
    const DRAWS: usize = 16_384;
    let vocab = 50;
    let row: Vec<T> = rng.vec(vocab, -2.0, 2.0);
    let row_f32 = to_f32(&row);
    let configs = [
        ("temperature 0.8", sampled(0.8, 0, 1.0, 0.0, 0, 0)),
        ("top-k 10", sampled(1.0, 10, 1.0, 0.0, 0, 0)),
        ("top-p 0.8", sampled(1.0, 0, 0.8, 0.0, 0, 0)),
        ("min-p 0.1", sampled(1.0, 0, 1.0, 0.1, 0, 0)),
        ("all filters", sampled(0.7, 20, 0.9, 0.05, 0, 0)),
    ];
    for (name, config) in configs {
        let params: Vec<SamplingRow> = (0..DRAWS as u64)
            .map(|seed| SamplingRow {
                seed: seed * 7919 + 1,
                step: 3,
                ..config
            })
            .collect();
        let ids = sample_rows(dev, &row, &params, batch);
        let what = format!(
            "sample_{} vocab {vocab}, {name}, {batch} rows a launch",
            T::SUFFIX
        );
        check_frequencies(&what, &ids, &reference_probs(&row_f32, &config));
    }
}

#[test]
fn sampling_frequencies_match_filtered_softmax() {
    let Some(dev) = device("sampling_frequencies_match_filtered_softmax") else {
        return;
    };
    let mut rng = Rng(31);
    check_sampling_frequencies::<f32>(&dev, &mut rng, 16);
    check_sampling_frequencies::<bf16>(&dev, &mut rng, 16_384);
    check_sampling_frequencies::<f16>(&dev, &mut rng, 7);
    // Launches of 48 rows (clusters of 2 blocks a row on sm_90+) and a last one of 16 (clusters
    // of 8).
    check_sampling_frequencies::<f16>(&dev, &mut rng, 48);
}

#[test]
fn top_p_boundary_ties_are_ranked_by_id() {
    let Some(dev) = device("top_p_boundary_ties_are_ranked_by_id") else {
        return;
    };
    // One clear favourite, six exact ties, and a tail: top-p 0.35 cuts inside the ties, so only
    // the lowest-id three of them may stay.
    let vocab = 50;
    let mut row = vec![bf16::from_f32(-1.0); vocab];
    row[30] = bf16::from_f32(2.0);
    for id in [41, 5, 33, 9, 20, 12] {
        row[id] = bf16::from_f32(1.0);
    }
    let config = sampled(1.0, 0, 0.35, 0.0, 0, 0);
    let row_f32 = to_f32(&row);
    let probs = reference_probs(&row_f32, &config);
    let support: Vec<usize> = (0..vocab).filter(|&i| probs[i] > 0.0).collect();
    assert_eq!(support, vec![5, 9, 12, 30], "the reference itself");
    let params: Vec<SamplingRow> = (0..8192)
        .map(|seed| SamplingRow { seed, ..config })
        .collect();
    for batch in [16, 64, 8192] {
        let ids = sample_rows(&dev, &row, &params, batch);
        check_frequencies(
            &format!("top-p boundary ties, {batch} rows a launch"),
            &ids,
            &probs,
        );
        for &id in &support {
            assert!(
                ids.contains(&(id as u32)),
                "top-p boundary ties: id {id} was never drawn"
            );
        }
    }
}

/// A large vocabulary spreads the candidates over more segments than the block has threads, with
/// boundary ties in different segments and candidates in the last, partial segment.
#[test]
fn large_vocabulary_sampling_matches_filtered_softmax() {
    let Some(dev) = device("large_vocabulary_sampling_matches_filtered_softmax") else {
        return;
    };
    let mut rng = Rng(41);
    let vocab = 131_075;
    let mut row = vec![bf16::from_f32(-20.0); vocab];
    let mut candidates: Vec<usize> = (0..40).map(|_| rng.below(vocab)).collect();
    candidates.extend([0, 127, 128, vocab - 1, vocab - 2, 131_071]);
    for &id in &candidates {
        row[id] = bf16::from_f32([0.0, 0.5, 1.0, 1.5, 2.0][rng.below(5)]);
    }
    let row_f32 = to_f32(&row);
    for (name, config, batch) in [
        ("min-p 0.05", sampled(1.0, 0, 1.0, 0.05, 0, 0), 1024),
        (
            "top-p 0.6 + min-p 0.01",
            sampled(1.0, 0, 0.6, 0.01, 0, 0),
            1024,
        ),
        (
            "top-p 0.6 + min-p 0.01",
            sampled(1.0, 0, 0.6, 0.01, 0, 0),
            16,
        ),
        ("top-k 25", sampled(1.3, 25, 1.0, 0.0, 0, 0), 1024),
        ("top-k 25", sampled(1.3, 25, 1.0, 0.0, 0, 0), 16),
    ] {
        let params: Vec<SamplingRow> = (0..1024)
            .map(|seed| SamplingRow {
                seed: seed + 100,
                step: 9,
                ..config
            })
            .collect();
        let ids = sample_rows(&dev, &row, &params, batch);
        let what = format!("sample_bf16 vocab {vocab}, {name}, {batch} rows a launch");
        check_frequencies(&what, &ids, &reference_probs(&row_f32, &config));
    }
}

/// Top-k lists each block's candidates in shared memory (4,096 a block) once it has bounded the
/// threshold. Here ties at the top fill far more than that in the blocks that read the first
/// chunks of every 32,768 ids (rank 0 of a cluster of 8), so those blocks read the row instead
/// while the others use their lists. All tied tokens survive top-k 10 with equal weight; top-p
/// 0.5 then keeps the first half of them in id order.
#[test]
fn top_k_candidate_overflow_keeps_every_tie() {
    let Some(dev) = device("top_k_candidate_overflow_keeps_every_tie") else {
        return;
    };
    let mut rng = Rng(43);
    let vocab = 151_936;
    let mut row = vec![bf16::from_f32(-20.0); vocab];
    let mut tied: Vec<usize> = (0..vocab).filter(|id| (id / 4) % 8192 < 1024).collect();
    tied.extend((0..200).map(|_| rng.below(vocab)));
    tied.sort_unstable();
    tied.dedup();
    for &id in &tied {
        row[id] = bf16::from_f32(1.0);
    }
    const BUCKETS: usize = 16;
    const DRAWS: usize = 2048;
    for (name, config, kept) in [
        ("top-k 10", sampled(1.0, 10, 1.0, 0.0, 0, 0), tied.len()),
        (
            "top-k 10 + top-p 0.5",
            sampled(1.0, 10, 0.5, 0.0, 0, 0),
            tied.len().div_ceil(2),
        ),
    ] {
        let kept = &tied[..kept];
        for batch in [16, 64, 1024] {
            let params: Vec<SamplingRow> = (0..DRAWS as u64)
                .map(|seed| SamplingRow {
                    seed: seed + 7,
                    step: 3,
                    ..config
                })
                .collect();
            let ids = sample_rows(&dev, &row, &params, batch);
            let what = format!("{name}, {} tied tokens, {batch} rows a launch", tied.len());
            let mut counts = [0f64; BUCKETS];
            for &id in &ids {
                let at = kept
                    .binary_search(&(id as usize))
                    .unwrap_or_else(|_| panic!("{what}: drew id {id}, which the filters remove"));
                counts[at * BUCKETS / kept.len()] += 1.0;
            }
            // Each bucket holds kept.len() / 16 tokens of equal probability, give or take one.
            let chi2: f64 = (0..BUCKETS)
                .map(|b| {
                    let size = (b + 1) * kept.len() / BUCKETS - b * kept.len() / BUCKETS;
                    let expected = DRAWS as f64 * size as f64 / kept.len() as f64;
                    (counts[b] - expected).powi(2) / expected
                })
                .sum();
            let df = (BUCKETS - 1) as f64;
            let bound = df + 6.0 * (2.0 * df).sqrt();
            assert!(
                chi2 <= bound,
                "{what}: chi-square {chi2:.1} over id buckets exceeds {bound:.1}"
            );
        }
    }
}

fn check_top_k_one_is_argmax<T: TestFloat>(dev: &CudaDevice, rng: &mut Rng) {
    for vocab in [7, 1001, 151_936] {
        let rows = 6;
        let logits: Vec<T> = rng.vec(rows * vocab, -10.0, 10.0);
        let logits_dev = dev.upload(&logits).unwrap();
        let params: Vec<SamplingRow> = (0..rows as u64)
            .map(|r| {
                sampled(
                    0.25 + 0.5 * r as f32,
                    1,
                    if r % 2 == 0 { 1.0 } else { 0.9 },
                    0.0,
                    r,
                    r,
                )
            })
            .collect();
        let mut buffers = SamplingBuffers::new(dev, rows + 3).unwrap();
        buffers.write(dev, &params).unwrap();
        let mut out = dev.upload(&vec![u32::MAX; rows]).unwrap();
        dev.sample(&logits_dev, rows, vocab, &buffers, &mut out)
            .unwrap();
        let got = dev.download(&out).unwrap();
        for r in 0..rows {
            let row = to_f32(&logits[r * vocab..(r + 1) * vocab]);
            let scaled: Vec<f32> = row.iter().map(|v| v / params[r].temperature).collect();
            // Top-1 keeps every token tied with the maximum after scaling.
            let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(
                scaled[got[r] as usize],
                max,
                "sample_{} top-k 1, vocab {vocab}, row {r}",
                T::SUFFIX
            );
        }
    }
}

#[test]
fn sampling_with_top_k_one_is_argmax() {
    let Some(dev) = device("sampling_with_top_k_one_is_argmax") else {
        return;
    };
    let mut rng = Rng(51);
    check_top_k_one_is_argmax::<f32>(&dev, &mut rng);
    check_top_k_one_is_argmax::<f16>(&dev, &mut rng);
    check_top_k_one_is_argmax::<bf16>(&dev, &mut rng);
}

#[test]
fn sampling_is_a_pure_function_of_seed_and_step() {
    let Some(dev) = device("sampling_is_a_pure_function_of_seed_and_step") else {
        return;
    };
    let mut rng = Rng(61);
    let (rows, vocab) = (64, 151_936);
    let logits: Vec<bf16> = rng.vec(rows * vocab, -3.0, 3.0);
    let logits_dev = dev.upload(&logits).unwrap();
    let mut buffers = SamplingBuffers::new(&dev, rows).unwrap();
    let mut run = |step: u64| {
        let params: Vec<SamplingRow> = (0..rows as u64)
            .map(|r| sampled(1.0, 0, 0.95, 0.0, 1234 + r, step))
            .collect();
        buffers.write(&dev, &params).unwrap();
        let mut out = dev.upload(&vec![u32::MAX; rows]).unwrap();
        dev.sample(&logits_dev, rows, vocab, &buffers, &mut out)
            .unwrap();
        dev.download(&out).unwrap()
    };
    let first = run(5);
    assert_eq!(first, run(5), "same seeds and steps must give the same ids");
    assert_ne!(first, run(6), "another step must give other draws");
    // The sums are exact, so splitting a row over a cluster of blocks (2 blocks a row for the
    // 64-row launch, 8 for launches of 16 rows, on sm_90+) must not change a single draw.
    let params: Vec<SamplingRow> = (0..rows as u64)
        .map(|r| sampled(1.0, 0, 0.95, 0.0, 1234 + r, 5))
        .collect();
    let mut small = SamplingBuffers::new(&dev, 16).unwrap();
    let mut split = dev.upload(&vec![u32::MAX; rows]).unwrap();
    for start in (0..rows).step_by(16) {
        small.write(&dev, &params[start..start + 16]).unwrap();
        let logits = logits_dev.slice(start * vocab..(start + 16) * vocab);
        dev.sample(
            &logits,
            16,
            vocab,
            &small,
            &mut split.slice_mut(start..start + 16),
        )
        .unwrap();
    }
    assert_eq!(
        first,
        dev.download(&split).unwrap(),
        "16-row launches must draw the same ids"
    );
    for (r, &id) in first.iter().enumerate() {
        let row = to_f32(&logits[r * vocab..(r + 1) * vocab]);
        let probs = reference_probs(&row, &sampled(1.0, 0, 0.95, 0.0, 0, 0));
        assert!(
            probs[id as usize] > 0.0,
            "row {r}: drew id {id}, which top-p removes"
        );
    }
}

#[test]
fn greedy_rows_mix_with_sampled_rows() {
    let Some(dev) = device("greedy_rows_mix_with_sampled_rows") else {
        return;
    };
    let mut rng = Rng(71);
    let (rows, vocab) = (64, 1001);
    let mut logits: Vec<f32> = rng.vec(rows * vocab, -5.0, 5.0);
    // Edge rows: nothing finite (the CPU sampler gives id 0), an infinite logit (it takes all the
    // mass), and NaN everywhere but one token.
    logits[..vocab].fill(f32::NAN);
    logits[vocab + 17] = f32::INFINITY;
    logits[2 * vocab..3 * vocab].fill(f32::NAN);
    logits[2 * vocab + 999] = 0.5;
    let params: Vec<SamplingRow> = (0..rows as u64)
        .map(|r| {
            if r % 2 == 1 && r > 2 {
                SamplingRow {
                    seed: r,
                    ..SamplingRow::greedy()
                }
            } else {
                sampled(0.9, 5, 1.0, 0.0, r, 1)
            }
        })
        .collect();
    let logits_dev = dev.upload(&logits).unwrap();
    let mut buffers = SamplingBuffers::new(&dev, rows).unwrap();
    buffers.write(&dev, &params).unwrap();
    let mut out = dev.upload(&vec![u32::MAX; rows]).unwrap();
    dev.sample(&logits_dev, rows, vocab, &buffers, &mut out)
        .unwrap();
    let got = dev.download(&out).unwrap();
    assert_eq!(&got[..3], &[0, 17, 999], "edge rows");
    for r in 3..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        if r % 2 == 1 {
            assert_eq!(got[r], argmax_reference(row), "greedy row {r}");
        } else {
            let probs = reference_probs(row, &params[r]);
            assert!(
                probs[got[r] as usize] > 0.0,
                "row {r}: drew id {}, outside its top 5",
                got[r]
            );
        }
    }
}

#[test]
fn sampling_rejects_bad_arguments() {
    let Some(dev) = device("sampling_rejects_bad_arguments") else {
        return;
    };
    let logits = dev.alloc_zeros::<f32>(12).unwrap();
    let mut out = dev.alloc_zeros::<u32>(3).unwrap();
    let mut buffers = SamplingBuffers::new(&dev, 2).unwrap();
    let err = dev.sample(&logits, 3, 4, &buffers, &mut out).unwrap_err();
    assert_eq!(
        err.to_string(),
        "sample: `params` holds 2 elements, expected 3"
    );
    let err = dev.argmax(&logits, 3, 5, &mut out).unwrap_err();
    assert_eq!(
        err.to_string(),
        "argmax: `logits` holds 12 elements, expected 15"
    );
    let err = dev.argmax(&logits, 3, 0, &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InvalidArgument {
                argument: "vocab",
                ..
            }
        ),
        "{err}"
    );
    let err = dev
        .sample(
            &logits,
            0,
            SAMPLE_MAX_VOCAB + 1,
            &buffers,
            &mut out.slice_mut(0..0),
        )
        .unwrap_err();
    assert!(matches!(err, CudaError::TooLarge { .. }), "{err}");
    let err = buffers
        .write(&dev, &[SamplingRow::greedy(); 3])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "SamplingBuffers::write: `rows` holds 3 elements, expected 2"
    );
    let bad = SamplingRow {
        temperature: -1.0,
        ..SamplingRow::greedy()
    };
    let err = buffers
        .write(&dev, &[SamplingRow::greedy(), bad])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "SamplingBuffers::write: temperature must be a finite non-negative number, found -1 in row 1"
    );
    // Nothing to do is not an error and launches nothing.
    dev.sample(
        &logits.slice(0..0),
        0,
        4,
        &buffers,
        &mut out.slice_mut(0..0),
    )
    .unwrap();
    dev.argmax(&logits.slice(0..0), 0, 4, &mut out.slice_mut(0..0))
        .unwrap();
    dev.synchronize().unwrap();
}

// ---------------------------------------------------------------------------------------------
// CUDA graphs

fn set<T: cudarc::driver::DeviceRepr>(dev: &CudaDevice, buf: &mut CudaSlice<T>, host: &[T]) {
    dev.stream().memcpy_htod(host, buf).unwrap();
}

/// A decode step's ops are captured once and replayed with new positions, slots and sampling
/// parameters written into the same buffers: each replay must equal direct launches bit for bit.
#[test]
fn ops_replay_in_a_cuda_graph_with_new_inputs() {
    let Some(dev) = device("ops_replay_in_a_cuda_graph_with_new_inputs") else {
        return;
    };
    // cudarc's cross-stream event bookkeeping records events around every launch, which a
    // capture must not contain; Braid runs each device on one stream.
    single_stream_mode(&dev);
    let mut rng = Rng(91);
    let (n, heads, kv_heads, head_dim, num_slots) = (5usize, 16usize, 8usize, 128usize, 64usize);
    let kv_len = num_slots * kv_heads * head_dim;
    let qkv = dev
        .upload(&rng.vec::<bf16>(n * (heads + 2 * kv_heads) * head_dim, -2.0, 2.0))
        .unwrap();
    let q_norm = dev.upload(&rng.vec::<bf16>(head_dim, 0.5, 1.5)).unwrap();
    let k_norm = dev.upload(&rng.vec::<bf16>(head_dim, -90.0, 90.0)).unwrap();
    let inv_freq = dev
        .upload(
            &(0..head_dim / 2)
                .map(|i| 1.0 / 1e6f32.powf(2.0 * i as f32 / head_dim as f32))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let mut positions = dev.alloc_zeros::<u32>(n).unwrap();
    let mut slots = dev.alloc_zeros::<u32>(n).unwrap();
    let mut q_out = poisoned::<bf16>(&dev, n * heads * head_dim);
    let mut k_cache = poisoned::<bf16>(&dev, kv_len);
    let mut v_cache = poisoned::<bf16>(&dev, kv_len);
    let (rows, vocab) = (6usize, 1001usize);
    let logits = dev
        .upload(&rng.vec::<f32>(rows * vocab, -4.0, 4.0))
        .unwrap();
    let mut params = SamplingBuffers::new(&dev, rows).unwrap();
    let mut ids = dev.alloc_zeros::<u32>(rows).unwrap();
    let mut greedy_ids = dev.alloc_zeros::<u32>(rows).unwrap();
    let p = RopeParams {
        n,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
    };
    let (qn, kn) = (q_norm.as_view(), k_norm.as_view());

    let step = |positions: &CudaSlice<u32>,
                slots: &CudaSlice<u32>,
                q_out: &mut CudaSlice<bf16>,
                k_cache: &mut CudaSlice<bf16>,
                v_cache: &mut CudaSlice<bf16>,
                params: &SamplingBuffers,
                ids: &mut CudaSlice<u32>,
                greedy_ids: &mut CudaSlice<u32>| {
        dev.rope_qk_norm_kv_write(
            &qkv,
            positions,
            slots,
            &inv_freq,
            Some(&qn),
            Some(&kn),
            EPS,
            q_out,
            k_cache,
            v_cache,
            &p,
        )
        .unwrap();
        dev.sample(&logits, rows, vocab, params, ids).unwrap();
        dev.argmax(&logits, rows, vocab, greedy_ids).unwrap();
    };
    // A first direct run loads the kernels, which a capture must not do.
    step(
        &positions,
        &slots,
        &mut q_out,
        &mut k_cache,
        &mut v_cache,
        &params,
        &mut ids,
        &mut greedy_ids,
    );
    dev.synchronize().unwrap();
    let graph = capture(&dev, || {
        step(
            &positions,
            &slots,
            &mut q_out,
            &mut k_cache,
            &mut v_cache,
            &params,
            &mut ids,
            &mut greedy_ids,
        )
    });

    let nan = bf16::from_f32(f32::NAN);
    for round in 0..3u64 {
        let pos: Vec<u32> = (0..n).map(|_| rng.below(30_000) as u32).collect();
        let mut slot_ids: Vec<u32> = (0..num_slots as u32).collect();
        rng.shuffle(&mut slot_ids);
        slot_ids.truncate(n);
        slot_ids[round as usize] = SKIP_SLOT;
        let rows_params: Vec<SamplingRow> = (0..rows as u64)
            .map(|r| {
                if r == 2 {
                    SamplingRow::greedy()
                } else {
                    sampled(0.8, 0, 0.9, 0.02, r, round * 10 + r)
                }
            })
            .collect();
        set(&dev, &mut positions, &pos);
        set(&dev, &mut slots, &slot_ids);
        params.write(&dev, &rows_params).unwrap();
        set(&dev, &mut q_out, &vec![nan; n * heads * head_dim]);
        set(&dev, &mut k_cache, &vec![nan; kv_len]);
        set(&dev, &mut v_cache, &vec![nan; kv_len]);
        set(&dev, &mut ids, &vec![u32::MAX; rows]);
        graph.launch().unwrap();
        let replayed = (
            dev.download(&q_out).unwrap(),
            dev.download(&k_cache).unwrap(),
            dev.download(&v_cache).unwrap(),
            dev.download(&ids).unwrap(),
            dev.download(&greedy_ids).unwrap(),
        );

        let mut q2 = poisoned::<bf16>(&dev, n * heads * head_dim);
        let mut k2 = poisoned::<bf16>(&dev, kv_len);
        let mut v2 = poisoned::<bf16>(&dev, kv_len);
        let mut ids2 = dev.alloc_zeros::<u32>(rows).unwrap();
        let mut greedy2 = dev.alloc_zeros::<u32>(rows).unwrap();
        step(
            &positions,
            &slots,
            &mut q2,
            &mut k2,
            &mut v2,
            &params,
            &mut ids2,
            &mut greedy2,
        );
        let bits = |v: Vec<bf16>| v.into_iter().map(bf16::to_bits).collect::<Vec<_>>();
        assert_eq!(
            bits(replayed.0),
            bits(dev.download(&q2).unwrap()),
            "round {round}: q_out"
        );
        assert_eq!(
            bits(replayed.1),
            bits(dev.download(&k2).unwrap()),
            "round {round}: k_cache"
        );
        assert_eq!(
            bits(replayed.2),
            bits(dev.download(&v2).unwrap()),
            "round {round}: v_cache"
        );
        assert_eq!(
            replayed.3,
            dev.download(&ids2).unwrap(),
            "round {round}: sampled ids"
        );
        assert_eq!(
            replayed.4,
            dev.download(&greedy2).unwrap(),
            "round {round}: greedy ids"
        );
        assert_eq!(
            replayed.3[2], replayed.4[2],
            "round {round}: the greedy row is the argmax"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Timing

/// Kernel time per call in µs: `calls` back-to-back launches captured in one graph, replayed;
/// the median of 7 timed replays (events around each) after 2 warm-up replays.
fn time_us(dev: &CudaDevice, calls: usize, mut f: impl FnMut()) -> f64 {
    use cudarc::driver::sys::CUevent_flags;
    f();
    dev.synchronize().unwrap();
    let graph = capture(dev, || {
        for _ in 0..calls {
            f();
        }
    });
    for _ in 0..2 {
        graph.launch().unwrap();
    }
    let mut samples = Vec::new();
    for _ in 0..7 {
        let start = dev
            .stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        graph.launch().unwrap();
        let end = dev
            .stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        samples.push(start.elapsed_ms(&end).unwrap() as f64 * 1000.0 / calls as f64);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[test]
#[ignore = "timing table; run on a GPU host with --ignored --nocapture"]
fn bench_rope_and_sampling() {
    let Some(dev) = device("bench_rope_and_sampling") else {
        return;
    };
    single_stream_mode(&dev);
    let mut rng = Rng(81);
    println!("device: {}", dev.name().unwrap());
    println!(
        "{:<46} {:>6} {:>9}",
        "op (bf16, in a CUDA graph)", "rows", "us/call"
    );

    // Qwen3-0.6B attention shape: 16 q heads, 8 kv heads, head_dim 128, q/k-norm.
    let (heads, kv_heads, head_dim) = (16, 8, 128);
    let num_slots = 8192;
    let q_norm = dev.upload(&rng.vec::<bf16>(head_dim, 0.5, 1.5)).unwrap();
    let k_norm = dev.upload(&rng.vec::<bf16>(head_dim, 0.5, 1.5)).unwrap();
    let inv_freq = dev
        .upload(
            &(0..head_dim / 2)
                .map(|i| 1.0 / 1e6f32.powf(2.0 * i as f32 / head_dim as f32))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let mut k_cache = dev
        .alloc_zeros::<bf16>(num_slots * kv_heads * head_dim)
        .unwrap();
    let mut v_cache = dev
        .alloc_zeros::<bf16>(num_slots * kv_heads * head_dim)
        .unwrap();
    for n in [1usize, 8, 64, 256, 4096] {
        let qkv = dev
            .upload(&rng.vec::<bf16>(n * (heads + 2 * kv_heads) * head_dim, -2.0, 2.0))
            .unwrap();
        let positions = dev
            .upload(&(0..n as u32).map(|i| 1000 + i).collect::<Vec<_>>())
            .unwrap();
        let slots = dev.upload(&(0..n as u32).collect::<Vec<_>>()).unwrap();
        let mut q_out = dev.alloc_zeros::<bf16>(n * heads * head_dim).unwrap();
        let p = RopeParams {
            n,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
        };
        let (qn, kn) = (q_norm.as_view(), k_norm.as_view());
        let us = time_us(&dev, 20, || {
            dev.rope_qk_norm_kv_write(
                &qkv,
                &positions,
                &slots,
                &inv_freq,
                Some(&qn),
                Some(&kn),
                EPS,
                &mut q_out,
                &mut k_cache,
                &mut v_cache,
                &p,
            )
            .unwrap()
        });
        println!(
            "{:<46} {:>6} {:>9.2}",
            "rope_qk_norm_kv_write 16/8 heads x 128", n, us
        );
    }

    let vocab = 151_936;
    for rows in [1usize, 8, 64, 256] {
        let logits = dev
            .upload(&rng.vec::<bf16>(rows * vocab, -8.0, 8.0))
            .unwrap();
        let mut out = dev.alloc_zeros::<u32>(rows).unwrap();
        let us = time_us(&dev, 10, || {
            dev.argmax(&logits, rows, vocab, &mut out).unwrap()
        });
        println!("{:<46} {:>6} {:>9.2}", "argmax vocab 151936", rows, us);
        let mut buffers = SamplingBuffers::new(&dev, rows).unwrap();
        for (name, config) in [
            ("sample t=0.8", sampled(0.8, 0, 1.0, 0.0, 1, 1)),
            ("sample t=0.8 min-p 0.05", sampled(0.8, 0, 1.0, 0.05, 1, 1)),
            ("sample t=0.8 top-k 50", sampled(0.8, 50, 1.0, 0.0, 1, 1)),
            ("sample t=0.8 top-p 0.9", sampled(0.8, 0, 0.9, 0.0, 1, 1)),
            (
                "sample t=0.7 top-k 20 top-p 0.8 min-p 0.05",
                sampled(0.7, 20, 0.8, 0.05, 1, 1),
            ),
        ] {
            buffers.write(&dev, &vec![config; rows]).unwrap();
            let us = time_us(&dev, 10, || {
                dev.sample(&logits, rows, vocab, &buffers, &mut out)
                    .unwrap()
            });
            println!("{:<46} {:>6} {:>9.2}", name, rows, us);
        }
    }
}
