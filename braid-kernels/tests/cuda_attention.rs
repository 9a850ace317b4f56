//! The paged attention kernels (decode and prefill) against the CPU reference
//! `braid_kernels::cpu::paged_attention` on random inputs: shuffled block tables, unused table
//! entries pointing at a NaN-filled block, outputs and workspace poisoned with NaN. Also a CUDA
//! graph replay of decode with new data, argument checks, and a timing report on a
//! Qwen3-0.6B layer shape. Without a device the GPU tests say "skipped: no CUDA device" and pass.

use std::io::Write as _;

use braid_kernels::cpu::{self, AttentionShape};
use braid_kernels::cuda::{AttentionParams, CudaDevice, CudaError, CudaSlice};
use cudarc::driver::sys::CUevent_flags;
use half::{bf16, f16};

mod common;
use common::{
    assert_rel_l2, capture, device, poisoned, single_stream_mode, to_f32, Rng, TestFloat,
};

/// A paged KV cache holding `lens[s]` tokens for each sequence, in shuffled blocks. Table
/// entries past a sequence's blocks point at a block full of NaN, so any read beyond the
/// visible keys shows up in the output.
struct PagedCache<T> {
    block_tables: Vec<u32>,
    k: Vec<T>,
    v: Vec<T>,
}

fn paged_cache<T: TestFloat>(rng: &mut Rng, p: &AttentionParams, lens: &[usize]) -> PagedCache<T> {
    let used: Vec<usize> = lens.iter().map(|l| l.div_ceil(p.block_size)).collect();
    assert!(
        used.iter().all(|&u| u <= p.max_blocks_per_seq),
        "test case overflows its block table"
    );
    let num_blocks = used.iter().sum::<usize>() + 4;
    let poison = rng.below(num_blocks) as u32;
    let mut pool: Vec<u32> = (0..num_blocks as u32).filter(|&b| b != poison).collect();
    rng.shuffle(&mut pool);
    let mut pool = pool.into_iter();
    let mut block_tables = Vec::with_capacity(lens.len() * p.max_blocks_per_seq);
    for &u in &used {
        for i in 0..p.max_blocks_per_seq {
            block_tables.push(if i < u {
                pool.next().unwrap_or(poison)
            } else {
                poison
            });
        }
    }
    let block = p.block_size * p.num_kv_heads * p.head_dim;
    let mut k: Vec<T> = rng.vec(num_blocks * block, -1.0, 1.0);
    let mut v: Vec<T> = rng.vec(num_blocks * block, -1.0, 1.0);
    let nan = T::from_f32(f32::NAN);
    let poisoned = poison as usize * block..(poison as usize + 1) * block;
    k[poisoned.clone()].fill(nan);
    v[poisoned].fill(nan);
    PagedCache { block_tables, k, v }
}

fn shape(p: &AttentionParams) -> AttentionShape {
    AttentionShape {
        num_heads: p.num_heads,
        num_kv_heads: p.num_kv_heads,
        head_dim: p.head_dim,
        block_size: p.block_size,
        sliding_window: (p.sliding_window > 0).then_some(p.sliding_window),
        scale: p.scale,
    }
}

/// The CPU reference for one sequence's rows of `q` at `positions`; empty positions give nothing.
fn reference_rows(
    p: &AttentionParams,
    q: &[f32],
    positions: &[usize],
    table: &[u32],
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    let mut out = vec![0.0f32; q.len()];
    if !positions.is_empty() {
        cpu::paged_attention(&shape(p), q, positions, table, k, v, &mut out);
    }
    out
}

fn params(
    num_kv_heads: usize,
    group: usize,
    head_dim: usize,
    block_size: usize,
    window: usize,
) -> AttentionParams {
    AttentionParams {
        num_heads: num_kv_heads * group,
        num_kv_heads,
        head_dim,
        block_size,
        max_blocks_per_seq: 1,
        scale: 1.0 / (head_dim as f32).sqrt(),
        sliding_window: window,
    }
}

fn check_decode<T: TestFloat>(
    dev: &CudaDevice,
    rng: &mut Rng,
    mut p: AttentionParams,
    lens: &[usize],
    slack_blocks: usize,
) {
    let num_seqs = lens.len();
    let longest = lens.iter().copied().max().unwrap_or(0);
    p.max_blocks_per_seq = longest.div_ceil(p.block_size) + slack_blocks;
    let what = format!(
        "decode_{} lens {lens:?} heads {}/{} d{} block {} window {} table width {}",
        T::SUFFIX,
        p.num_heads,
        p.num_kv_heads,
        p.head_dim,
        p.block_size,
        p.sliding_window,
        p.max_blocks_per_seq
    );
    let cache = paged_cache::<T>(rng, &p, lens);
    let row = p.num_heads * p.head_dim;
    let q: Vec<T> = rng.vec(num_seqs * row, -2.0, 2.0);
    let lens_u32: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
    let ws_len = CudaDevice::paged_attention_decode_workspace_len(
        num_seqs,
        p.num_heads,
        p.head_dim,
        p.max_blocks_per_seq,
        p.block_size,
    );

    let q_d = dev.upload(&q).unwrap();
    let k_d = dev.upload(&cache.k).unwrap();
    let v_d = dev.upload(&cache.v).unwrap();
    let bt_d = dev.upload(&cache.block_tables).unwrap();
    let cl_d = dev.upload(&lens_u32).unwrap();
    let mut out_d = poisoned::<T>(dev, num_seqs * row);
    let mut ws_d = dev.upload(&vec![f32::NAN; ws_len]).unwrap();
    dev.paged_attention_decode(&q_d, &k_d, &v_d, &bt_d, &cl_d, &mut out_d, &mut ws_d, &p)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = dev.download(&out_d).unwrap();

    let (k, v, qf) = (to_f32(&cache.k), to_f32(&cache.v), to_f32(&q));
    let mut want = Vec::with_capacity(q.len());
    for (s, &len) in lens.iter().enumerate() {
        let positions: Vec<usize> = if len > 0 { vec![len - 1] } else { Vec::new() };
        let table = &cache.block_tables[s * p.max_blocks_per_seq..(s + 1) * p.max_blocks_per_seq];
        want.extend(reference_rows(
            &p,
            &qf[s * row..(s + 1) * row],
            &positions,
            table,
            &k,
            &v,
        ));
    }
    assert_rel_l2(&what, &got, &want);
}

#[allow(clippy::too_many_arguments)]
fn check_prefill<T: TestFloat>(
    dev: &CudaDevice,
    rng: &mut Rng,
    mut p: AttentionParams,
    q_lens: &[usize],
    prefixes: &[usize],
    extra_q_tiles: usize,
) {
    let num_seqs = q_lens.len();
    let ctx: Vec<usize> = q_lens.iter().zip(prefixes).map(|(q, c)| q + c).collect();
    let longest = ctx.iter().copied().max().unwrap_or(0);
    p.max_blocks_per_seq = longest.div_ceil(p.block_size) + 2;
    let what = format!(
        "prefill_{} q_lens {q_lens:?} prefixes {prefixes:?} heads {}/{} d{} block {} window {}",
        T::SUFFIX,
        p.num_heads,
        p.num_kv_heads,
        p.head_dim,
        p.block_size,
        p.sliding_window
    );
    let cache = paged_cache::<T>(rng, &p, &ctx);
    let row = p.num_heads * p.head_dim;
    let total_q: usize = q_lens.iter().sum();
    let q: Vec<T> = rng.vec(total_q * row, -2.0, 2.0);
    let mut q_starts = vec![0u32];
    for &l in q_lens {
        q_starts.push(q_starts[q_starts.len() - 1] + l as u32);
    }
    let ctx_u32: Vec<u32> = ctx.iter().map(|&c| c as u32).collect();
    let max_q_len = q_lens.iter().copied().max().unwrap_or(0) + extra_q_tiles * 64;

    let q_d = dev.upload(&q).unwrap();
    let k_d = dev.upload(&cache.k).unwrap();
    let v_d = dev.upload(&cache.v).unwrap();
    let bt_d = dev.upload(&cache.block_tables).unwrap();
    let qs_d = dev.upload(&q_starts).unwrap();
    let cl_d = dev.upload(&ctx_u32).unwrap();
    let mut out_d = poisoned::<T>(dev, total_q * row);
    dev.paged_attention_prefill(
        &q_d, &k_d, &v_d, &bt_d, &qs_d, &cl_d, &mut out_d, num_seqs, max_q_len, &p,
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = dev.download(&out_d).unwrap();

    let (k, v, qf) = (to_f32(&cache.k), to_f32(&cache.v), to_f32(&q));
    let mut want = Vec::with_capacity(q.len());
    for s in 0..num_seqs {
        let start = q_starts[s] as usize;
        let positions: Vec<usize> = (0..q_lens[s]).map(|i| ctx[s] - q_lens[s] + i).collect();
        let table = &cache.block_tables[s * p.max_blocks_per_seq..(s + 1) * p.max_blocks_per_seq];
        want.extend(reference_rows(
            &p,
            &qf[start * row..(start + q_lens[s]) * row],
            &positions,
            table,
            &k,
            &v,
        ));
    }
    assert_rel_l2(&what, &got, &want);
}

/// Context lengths of a batch: the brief's 1, 17, 300 and 1500 rotated so every size lands in
/// every batch position across cases.
fn decode_lens(num_seqs: usize, case: usize) -> Vec<usize> {
    const LENS: [usize; 4] = [1, 17, 300, 1500];
    (0..num_seqs)
        .map(|s| LENS[(s + case) % LENS.len()])
        .collect()
}

fn decode_suite<T: TestFloat>(dev: &CudaDevice, rng: &mut Rng) {
    let mut case = 0;
    for head_dim in [64, 128] {
        for group in [1, 2, 4] {
            for window in [0, 256] {
                for block_size in [4, 16] {
                    let num_seqs = [1, 3, 7][case % 3];
                    let lens = decode_lens(num_seqs, case);
                    check_decode::<T>(
                        dev,
                        rng,
                        params(2, group, head_dim, block_size, window),
                        &lens,
                        3,
                    );
                    case += 1;
                }
            }
        }
    }
    // The remaining head sizes, GQA groups that are not powers of two or exceed one pass (3, 16).
    check_decode::<T>(dev, rng, params(2, 2, 16, 16, 0), &[1, 17, 300, 1500], 1);
    check_decode::<T>(dev, rng, params(3, 1, 32, 4, 100), &[1500, 300, 17], 1);
    check_decode::<T>(dev, rng, params(1, 2, 256, 16, 0), &[300, 1500, 1], 1);
    check_decode::<T>(dev, rng, params(3, 3, 64, 16, 0), &[17, 1500, 300], 2);
    check_decode::<T>(dev, rng, params(1, 16, 128, 16, 37), &[1500, 300, 17, 1], 2);
    // Wide tables make full 512-token partitions; short ones a single partition written
    // directly. Zero-length slots (graph-bucket padding) must come out as zeros.
    check_decode::<T>(
        dev,
        rng,
        params(2, 2, 128, 16, 0),
        &[1500, 17, 300, 1, 1499, 900, 1024],
        1200,
    );
    check_decode::<T>(dev, rng, params(2, 4, 64, 4, 0), &[1, 17, 40, 0, 63], 0);
    check_decode::<T>(dev, rng, params(2, 2, 128, 16, 300), &[0, 1500, 0], 4);
}

fn prefill_suite<T: TestFloat>(dev: &CudaDevice, rng: &mut Rng) {
    const Q_LEN_SETS: [&[usize]; 3] = [&[200], &[13, 1], &[1, 200, 13]];
    let mut case = 0;
    for head_dim in [64, 128] {
        for group in [1, 2, 4] {
            for window in [0, 50] {
                for block_size in [4, 16] {
                    let q_lens = Q_LEN_SETS[case % 3];
                    // Every other case carries a cached prefix on its sequences.
                    let prefixes: Vec<usize> = (0..q_lens.len())
                        .map(|s| {
                            if (case + s) % 2 == 0 {
                                0
                            } else {
                                [77, 300, 5][s % 3]
                            }
                        })
                        .collect();
                    check_prefill::<T>(
                        dev,
                        rng,
                        params(2, group, head_dim, block_size, window),
                        q_lens,
                        &prefixes,
                        case % 2,
                    );
                    case += 1;
                }
            }
        }
    }
    check_prefill::<T>(dev, rng, params(2, 2, 16, 16, 0), &[200, 13], &[0, 64], 0);
    check_prefill::<T>(
        dev,
        rng,
        params(3, 1, 32, 4, 70),
        &[13, 200, 1],
        &[300, 0, 17],
        1,
    );
    check_prefill::<T>(
        dev,
        rng,
        params(1, 2, 256, 16, 0),
        &[200, 1],
        &[100, 600],
        0,
    );
    check_prefill::<T>(dev, rng, params(1, 16, 128, 16, 0), &[130, 1], &[0, 9], 0);
    check_prefill::<T>(dev, rng, params(2, 3, 64, 16, 1), &[65, 13], &[3, 0], 0);
}

#[test]
fn decode_matches_reference() {
    let Some(dev) = device("decode_matches_reference") else {
        return;
    };
    let mut rng = Rng(11);
    decode_suite::<bf16>(&dev, &mut rng);
    decode_suite::<f16>(&dev, &mut rng);
}

#[test]
fn prefill_matches_reference() {
    let Some(dev) = device("prefill_matches_reference") else {
        return;
    };
    let mut rng = Rng(12);
    prefill_suite::<bf16>(&dev, &mut rng);
    prefill_suite::<f16>(&dev, &mut rng);
}

/// Captures one decode step into a CUDA graph, then replays it with new queries, caches and
/// longer contexts written into the same buffers: the kernels must read everything that changes
/// from device memory.
#[test]
fn decode_replays_in_a_cuda_graph_with_new_data() {
    let Some(dev) = device("decode_replays_in_a_cuda_graph_with_new_data") else {
        return;
    };
    single_stream_mode(&dev);
    let mut rng = Rng(13);
    let mut p = params(2, 2, 128, 16, 0);
    p.max_blocks_per_seq = 64;
    let num_seqs = 3;
    let row = p.num_heads * p.head_dim;
    let steps: [[usize; 3]; 3] = [[5, 60, 0], [64, 65, 700], [1, 1024, 513]];
    let first = paged_cache::<bf16>(&mut rng, &p, &steps[0]);
    let cache_len = (64 * num_seqs + 4) * p.block_size * p.num_kv_heads * p.head_dim;
    let stream = dev.stream().clone();
    let mut q_d = dev.alloc_zeros::<bf16>(num_seqs * row).unwrap();
    let mut k_d = dev.alloc_zeros::<bf16>(cache_len).unwrap();
    let mut v_d = dev.alloc_zeros::<bf16>(cache_len).unwrap();
    let mut bt_d = dev.upload(&first.block_tables).unwrap();
    let mut cl_d = dev.upload(&[0u32; 3]).unwrap();
    let mut out_d = dev.alloc_zeros::<bf16>(num_seqs * row).unwrap();
    let ws_len =
        CudaDevice::paged_attention_decode_workspace_len(num_seqs, p.num_heads, p.head_dim, 64, 16);
    let mut ws_d = dev.alloc_zeros::<f32>(ws_len).unwrap();
    // Load the kernels before capturing.
    dev.paged_attention_decode(&q_d, &k_d, &v_d, &bt_d, &cl_d, &mut out_d, &mut ws_d, &p)
        .unwrap();
    dev.synchronize().unwrap();

    let graph = capture(&dev, || {
        dev.paged_attention_decode(&q_d, &k_d, &v_d, &bt_d, &cl_d, &mut out_d, &mut ws_d, &p)
            .unwrap()
    });

    for lens in steps {
        let mut cache = paged_cache::<bf16>(&mut rng, &p, &lens);
        cache.k.resize(cache_len, bf16::ZERO);
        cache.v.resize(cache_len, bf16::ZERO);
        let q: Vec<bf16> = rng.vec(num_seqs * row, -2.0, 2.0);
        let lens_u32: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        stream.memcpy_htod(&q, &mut q_d).unwrap();
        stream.memcpy_htod(&cache.k, &mut k_d).unwrap();
        stream.memcpy_htod(&cache.v, &mut v_d).unwrap();
        stream.memcpy_htod(&cache.block_tables, &mut bt_d).unwrap();
        stream.memcpy_htod(&lens_u32, &mut cl_d).unwrap();
        stream
            .memcpy_htod(&vec![bf16::NAN; num_seqs * row], &mut out_d)
            .unwrap();
        graph.launch().unwrap();
        let got = dev.download(&out_d).unwrap();

        let (k, v, qf) = (to_f32(&cache.k), to_f32(&cache.v), to_f32(&q));
        let mut want = Vec::new();
        for (s, &len) in lens.iter().enumerate() {
            let positions: Vec<usize> = if len > 0 { vec![len - 1] } else { Vec::new() };
            let table = &cache.block_tables[s * 64..(s + 1) * 64];
            want.extend(reference_rows(
                &p,
                &qf[s * row..(s + 1) * row],
                &positions,
                table,
                &k,
                &v,
            ));
        }
        assert_rel_l2(&format!("graph replay, lens {lens:?}"), &got, &want);
    }
}

#[test]
fn attention_rejects_bad_arguments_with_clear_errors() {
    let Some(dev) = device("attention_rejects_bad_arguments_with_clear_errors") else {
        return;
    };
    let mut p = params(2, 2, 64, 16, 0);
    p.max_blocks_per_seq = 2;
    let row = p.num_heads * p.head_dim;
    let block = p.block_size * p.num_kv_heads * p.head_dim;
    let q = dev.alloc_zeros::<bf16>(2 * row).unwrap();
    let k = dev.alloc_zeros::<bf16>(3 * block).unwrap();
    let v = dev.alloc_zeros::<bf16>(3 * block).unwrap();
    let bt = dev.upload(&[0u32, 1, 2, 0]).unwrap();
    let cl = dev.upload(&[5u32, 20]).unwrap();
    let mut out = dev.alloc_zeros::<bf16>(2 * row).unwrap();
    let mut ws = dev.alloc_zeros::<f32>(0).unwrap();

    let err = dev
        .paged_attention_decode(
            &q,
            &k,
            &v,
            &bt,
            &cl,
            &mut out,
            &mut ws,
            &AttentionParams { head_dim: 96, ..p },
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "paged_attention_decode: head_dim must be one of 16, 32, 64, 128 or 256, found 96"
    );

    let short: CudaSlice<bf16> = dev.alloc_zeros(row).unwrap();
    let err = dev
        .paged_attention_decode(&short, &k, &v, &bt, &cl, &mut out, &mut ws, &p)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "paged_attention_decode: `q` holds {row} elements, expected {}",
            2 * row
        )
    );

    let odd_cache = dev.alloc_zeros::<bf16>(3 * block - 1).unwrap();
    let err = dev
        .paged_attention_decode(&q, &odd_cache, &v, &bt, &cl, &mut out, &mut ws, &p)
        .unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InvalidArgument {
                argument: "the k_cache length",
                ..
            }
        ),
        "{err}"
    );

    // Wide tables need a workspace; an empty one is refused rather than overrun.
    let wide = AttentionParams {
        max_blocks_per_seq: 100,
        ..p
    };
    let wide_bt = dev.alloc_zeros::<u32>(200).unwrap();
    let err = dev
        .paged_attention_decode(&q, &k, &v, &wide_bt, &cl, &mut out, &mut ws, &wide)
        .unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InvalidArgument {
                argument: "the workspace length",
                ..
            }
        ),
        "{err}"
    );

    // A view one element into its buffer cannot take 16-byte loads.
    let q_big = dev.alloc_zeros::<bf16>(2 * row + 1).unwrap();
    let err = dev
        .paged_attention_decode(&q_big.slice(1..), &k, &v, &bt, &cl, &mut out, &mut ws, &p)
        .unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InvalidArgument {
                argument: "the q buffer",
                ..
            }
        ),
        "{err}"
    );

    let q32 = dev.alloc_zeros::<f32>(2 * row).unwrap();
    let k32 = dev.alloc_zeros::<f32>(3 * block).unwrap();
    let mut out32 = dev.alloc_zeros::<f32>(2 * row).unwrap();
    let err = dev
        .paged_attention_decode(&q32, &k32, &k32, &bt, &cl, &mut out32, &mut ws, &p)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "paged_attention_decode: the storage dtype must be f16 or bf16, found f32"
    );

    let qs = dev.upload(&[0u32, 1, 2]).unwrap();
    let mut out_short = dev.alloc_zeros::<bf16>(2 * row - 8).unwrap();
    let q_short = dev.alloc_zeros::<bf16>(2 * row - 8).unwrap();
    let err = dev
        .paged_attention_prefill(&q_short, &k, &v, &bt, &qs, &cl, &mut out_short, 2, 1, &p)
        .unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InvalidArgument {
                argument: "the q length",
                ..
            }
        ),
        "{err}"
    );

    // Nothing to do is not an error and launches nothing.
    dev.paged_attention_prefill(&q, &k, &v, &bt, &qs, &cl, &mut out, 2, 0, &p)
        .unwrap();
    dev.synchronize().unwrap();
}

/// Median of `runs` timings of `iters` back-to-back calls, in microseconds per call.
fn time_us(dev: &CudaDevice, iters: usize, runs: usize, mut call: impl FnMut(usize)) -> f64 {
    let ctx = dev.context();
    for i in 0..3 {
        call(i);
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        let end = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        start.record(dev.stream()).unwrap();
        for i in 0..iters {
            call(i);
        }
        end.record(dev.stream()).unwrap();
        samples.push(start.elapsed_ms(&end).unwrap() as f64 * 1000.0 / iters as f64);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Decode (batch 1, 64, 256 at context 640) and prefill (512 and 4096 tokens) on one layer of a
/// Qwen3-0.6B shape: 16 query heads, 8 KV heads, head_dim 128, bf16, block size 16.
#[test]
fn timing_report() {
    let Some(dev) = device("timing_report") else {
        return;
    };
    // Without cudarc's cross-stream events the decode calls can be captured into a graph, as
    // the engine will run them.
    single_stream_mode(&dev);
    let mut rng = Rng(14);
    let (heads, kv_heads, d, bs) = (16usize, 8usize, 128usize, 16usize);
    let block = bs * kv_heads * d;
    let mut lines = vec![format!(
        "attention timing on {} (bf16, 16/8 heads, head_dim 128, block 16)",
        dev.name().unwrap_or_default()
    )];

    let ctx = 640usize;
    let blocks_per_seq = ctx / bs;
    for batch in [1usize, 64, 256] {
        let kv_bytes = batch * ctx * kv_heads * d * 2 * 2;
        // Rotate over enough disjoint block sets that repeated calls do not run from L2.
        let rotations = (160_000_000usize).div_ceil(kv_bytes).max(1);
        let num_blocks = rotations * batch * blocks_per_seq;
        let k = dev
            .upload(&rng.vec::<bf16>(num_blocks * block, -1.0, 1.0))
            .unwrap();
        let v = dev
            .upload(&rng.vec::<bf16>(num_blocks * block, -1.0, 1.0))
            .unwrap();
        let tables: Vec<CudaSlice<u32>> = (0..rotations)
            .map(|r| {
                let ids: Vec<u32> = (0..batch * blocks_per_seq)
                    .map(|i| (r * batch * blocks_per_seq + i) as u32)
                    .collect();
                dev.upload(&ids).unwrap()
            })
            .collect();
        let lens = dev.upload(&vec![ctx as u32; batch]).unwrap();
        let q = dev
            .upload(&rng.vec::<bf16>(batch * heads * d, -1.0, 1.0))
            .unwrap();
        let mut out = dev.alloc_zeros::<bf16>(batch * heads * d).unwrap();
        let p = AttentionParams {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
            block_size: bs,
            max_blocks_per_seq: blocks_per_seq,
            scale: 1.0 / (d as f32).sqrt(),
            sliding_window: 0,
        };
        let mut ws = dev
            .alloc_zeros::<f32>(CudaDevice::paged_attention_decode_workspace_len(
                batch,
                heads,
                d,
                blocks_per_seq,
                bs,
            ))
            .unwrap();
        let us = time_us(&dev, 200, 5, |i| {
            dev.paged_attention_decode(
                &q,
                &k,
                &v,
                &tables[i % rotations],
                &lens,
                &mut out,
                &mut ws,
                &p,
            )
            .unwrap()
        });
        // The same calls replayed from a CUDA graph, as decode steps run in the engine.
        const GRAPH_CALLS: usize = 20;
        let graph = capture(&dev, || {
            for i in 0..GRAPH_CALLS {
                dev.paged_attention_decode(
                    &q,
                    &k,
                    &v,
                    &tables[i % rotations],
                    &lens,
                    &mut out,
                    &mut ws,
                    &p,
                )
                .unwrap();
            }
        });
        let graph_us = time_us(&dev, 10, 5, |_| graph.launch().unwrap()) / GRAPH_CALLS as f64;
        let bytes = (kv_bytes + 2 * batch * heads * d * 2) as f64;
        lines.push(format!(
            "decode  batch {batch:>3} ctx {ctx}: {us:>8.1} us  {:>7.0} GB/s | in a graph {graph_us:>7.1} us  {:>7.0} GB/s",
            bytes / us / 1e3,
            bytes / graph_us / 1e3
        ));
    }

    for tokens in [512usize, 4096] {
        let blocks = tokens / bs;
        let k = dev
            .upload(&rng.vec::<bf16>(blocks * block, -1.0, 1.0))
            .unwrap();
        let v = dev
            .upload(&rng.vec::<bf16>(blocks * block, -1.0, 1.0))
            .unwrap();
        let table = dev.upload(&(0..blocks as u32).collect::<Vec<_>>()).unwrap();
        let q = dev
            .upload(&rng.vec::<bf16>(tokens * heads * d, -1.0, 1.0))
            .unwrap();
        let q_starts = dev.upload(&[0u32, tokens as u32]).unwrap();
        let lens = dev.upload(&[tokens as u32]).unwrap();
        let mut out = dev.alloc_zeros::<bf16>(tokens * heads * d).unwrap();
        let p = AttentionParams {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
            block_size: bs,
            max_blocks_per_seq: blocks,
            scale: 1.0 / (d as f32).sqrt(),
            sliding_window: 0,
        };
        let iters = if tokens > 1024 { 20 } else { 100 };
        let us = time_us(&dev, iters, 5, |_| {
            dev.paged_attention_prefill(
                &q, &k, &v, &table, &q_starts, &lens, &mut out, 1, tokens, &p,
            )
            .unwrap()
        });
        // Causal: query i attends to i + 1 keys; QK^T and PV each cost 2 * head_dim per pair.
        let flops = 4.0 * (heads * d) as f64 * (tokens * (tokens + 1) / 2) as f64;
        lines.push(format!(
            "prefill {tokens:>4} tokens:        {us:>8.1} us  {:>7.1} TFLOP/s",
            flops / us / 1e6
        ));
    }
    let report = lines.join("\n") + "\n";
    let _ = std::io::stderr().write_all(report.as_bytes());
}
