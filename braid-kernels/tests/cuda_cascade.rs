//! Cascade decode attention (`CudaDevice::cascade_attention_decode`) against the CPU reference
//! `braid_kernels::cpu::paged_attention` of every sequence through its own table, and against the
//! GPU's plain decode: several groups of different sizes and prefix lengths in one batch, groups
//! of one without a prefix, padding rows, GQA, windows, odd sizes, unused table entries pointing
//! at a NaN-filled block, outputs and workspace poisoned with NaN. Also argument checks and a
//! timing report (plain vs cascade) on a Qwen3-0.6B layer with 64 sequences sharing a
//! 4096-token prefix. Without a device the tests say "skipped: no CUDA device" and pass.

use std::io::Write as _;

use braid_kernels::cpu::{self, AttentionShape};
use braid_kernels::cuda::cascade::CascadeBounds;
use braid_kernels::cuda::{AttentionParams, CudaDevice, CudaError, CudaSlice};
use cudarc::driver::sys::CUevent_flags;
use half::{bf16, f16};

mod common;
use common::{assert_rel_l2, device, poisoned, rel_l2, to_f32, Rng, TestFloat};

/// One group of a test batch: its members' context lengths and the prefix they share.
struct GroupSpec {
    contexts: Vec<usize>,
    prefix_len: usize,
}

/// A batch laid out as the engine would: groups are contiguous runs of rows; the members of a
/// group share the table entries of their whole prefix blocks, and a partly shared block is each
/// member's own copy of the shared rows (copy-on-write). Table entries past a sequence's blocks
/// point at a block full of NaN.
struct Batch<T> {
    block_tables: Vec<u32>,
    k: Vec<T>,
    v: Vec<T>,
    contexts: Vec<usize>,
    group_starts: Vec<u32>,
    prefix_lens: Vec<u32>,
    bounds: CascadeBounds,
}

// The block loop reads the first member's table at the same index it assigns.
#[allow(clippy::needless_range_loop)]
fn batch<T: TestFloat>(
    rng: &mut Rng,
    p: &mut AttentionParams,
    groups: &[GroupSpec],
    slack: usize,
) -> Batch<T> {
    let bs = p.block_size;
    let contexts: Vec<usize> = groups
        .iter()
        .flat_map(|g| g.contexts.iter().copied())
        .collect();
    p.max_blocks_per_seq = contexts.iter().map(|c| c.div_ceil(bs)).max().unwrap_or(0) + slack;
    let width = p.max_blocks_per_seq;
    let block = bs * p.num_kv_heads * p.head_dim;

    let mut next = 0u32;
    let mut tables: Vec<Vec<u32>> = Vec::new();
    let mut copies = Vec::new();
    let mut group_starts = vec![0u32];
    for g in groups {
        let first = tables.len();
        let shared = g.prefix_len / bs;
        for (m, &ctx) in g.contexts.iter().enumerate() {
            let mut table = Vec::new();
            for i in 0..ctx.div_ceil(bs) {
                if m > 0 && i < shared {
                    table.push(tables[first][i]);
                    continue;
                }
                if m > 0 && i == shared && !g.prefix_len.is_multiple_of(bs) {
                    copies.push((tables[first][i], next, g.prefix_len % bs));
                }
                table.push(next);
                next += 1;
            }
            tables.push(table);
        }
        group_starts.push(tables.len() as u32);
    }
    // Shuffle the physical blocks so no table is contiguous, and keep one for the NaN poison.
    let num_blocks = next as usize + 1;
    let mut physical: Vec<u32> = (0..num_blocks as u32).collect();
    rng.shuffle(&mut physical);
    let poison = physical[num_blocks - 1];
    let mut block_tables = Vec::with_capacity(tables.len() * width);
    for t in &tables {
        block_tables.extend(t.iter().map(|&b| physical[b as usize]));
        block_tables.extend(std::iter::repeat_n(poison, width - t.len()));
    }
    let mut k: Vec<T> = rng.vec(num_blocks * block, -1.0, 1.0);
    let mut v: Vec<T> = rng.vec(num_blocks * block, -1.0, 1.0);
    let row = p.num_kv_heads * p.head_dim;
    for (from, to, rows) in copies {
        let from = physical[from as usize] as usize * block;
        let to = physical[to as usize] as usize * block;
        k.copy_within(from..from + rows * row, to);
        v.copy_within(from..from + rows * row, to);
    }
    let nan = T::from_f32(f32::NAN);
    let poisoned = poison as usize * block..(poison as usize + 1) * block;
    k[poisoned.clone()].fill(nan);
    v[poisoned].fill(nan);

    let prefix_lens: Vec<u32> = groups.iter().map(|g| g.prefix_len as u32).collect();
    let bounds = CascadeBounds {
        max_group_size: groups.iter().map(|g| g.contexts.len()).max().unwrap_or(0),
        max_prefix_tokens: groups.iter().map(|g| g.prefix_len).max().unwrap_or(0),
        max_suffix_tokens: groups
            .iter()
            .flat_map(|g| g.contexts.iter().map(|c| c.saturating_sub(g.prefix_len)))
            .max()
            .unwrap_or(0),
    };
    Batch {
        block_tables,
        k,
        v,
        contexts,
        group_starts,
        prefix_lens,
        bounds,
    }
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

/// Runs cascade decode on `groups` (with the batch's own bounds, or `bounds` to override them)
/// and checks it against the CPU reference and against the GPU's plain decode.
fn check_cascade<T: TestFloat>(
    dev: &CudaDevice,
    rng: &mut Rng,
    mut p: AttentionParams,
    groups: &[GroupSpec],
    bounds: Option<CascadeBounds>,
) {
    let b = batch::<T>(rng, &mut p, groups, 2);
    let bounds = bounds.unwrap_or(b.bounds);
    let num_seqs = b.contexts.len();
    let num_groups = groups.len();
    let what = format!(
        "cascade_{} groups {:?} heads {}/{} d{} block {} window {} bounds {bounds:?}",
        T::SUFFIX,
        groups
            .iter()
            .map(|g| (g.contexts.clone(), g.prefix_len))
            .collect::<Vec<_>>(),
        p.num_heads,
        p.num_kv_heads,
        p.head_dim,
        p.block_size,
        p.sliding_window,
    );
    let row = p.num_heads * p.head_dim;
    let q: Vec<T> = rng.vec(num_seqs * row, -2.0, 2.0);
    let ctx_u32: Vec<u32> = b.contexts.iter().map(|&c| c as u32).collect();

    let q_d = dev.upload(&q).unwrap();
    let k_d = dev.upload(&b.k).unwrap();
    let v_d = dev.upload(&b.v).unwrap();
    let bt_d = dev.upload(&b.block_tables).unwrap();
    let cl_d = dev.upload(&ctx_u32).unwrap();
    let gs_d = dev.upload(&b.group_starts).unwrap();
    let pl_d = dev.upload(&b.prefix_lens).unwrap();
    let mut out_d = poisoned::<T>(dev, num_seqs * row);
    let ws_len =
        CudaDevice::cascade_attention_decode_workspace_len(num_seqs, num_groups, &p, &bounds);
    let mut ws_d = dev.upload(&vec![f32::NAN; ws_len.max(1)]).unwrap();
    dev.cascade_attention_decode(
        &q_d, &k_d, &v_d, &bt_d, &cl_d, &gs_d, &pl_d, &mut out_d, &mut ws_d, &p, &bounds,
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = dev.download(&out_d).unwrap();

    let (k, v, qf) = (to_f32(&b.k), to_f32(&b.v), to_f32(&q));
    let width = p.max_blocks_per_seq;
    let mut want = vec![0.0f32; q.len()];
    for (s, &ctx) in b.contexts.iter().enumerate() {
        if ctx > 0 {
            cpu::paged_attention(
                &shape(&p),
                &qf[s * row..(s + 1) * row],
                &[ctx - 1],
                &b.block_tables[s * width..(s + 1) * width],
                &k,
                &v,
                &mut want[s * row..(s + 1) * row],
            );
        }
    }
    assert_rel_l2(&what, &got, &want);

    // The same batch through plain decode agrees too.
    let mut plain_d = poisoned::<T>(dev, num_seqs * row);
    let plain_ws = CudaDevice::paged_attention_decode_workspace_len(
        num_seqs,
        p.num_heads,
        p.head_dim,
        p.max_blocks_per_seq,
        p.block_size,
    );
    let mut plain_ws_d = dev.alloc_zeros::<f32>(plain_ws.max(1)).unwrap();
    dev.paged_attention_decode(
        &q_d,
        &k_d,
        &v_d,
        &bt_d,
        &cl_d,
        &mut plain_d,
        &mut plain_ws_d,
        &p,
    )
    .unwrap();
    let plain = dev.download(&plain_d).unwrap();
    let plain_f32 = to_f32(&plain);
    assert_rel_l2(&format!("{what} vs plain decode"), &got, &plain_f32);
}

/// `n` contexts of `prefix + suffix` with suffixes drawn from `1..=max_suffix`.
fn members(rng: &mut Rng, n: usize, prefix: usize, max_suffix: usize) -> GroupSpec {
    GroupSpec {
        contexts: (0..n).map(|_| prefix + 1 + rng.below(max_suffix)).collect(),
        prefix_len: prefix,
    }
}

fn suite<T: TestFloat>(dev: &CudaDevice, rng: &mut Rng) {
    // A mixed batch: groups of several sizes and prefixes (block multiples and not), groups of
    // one without a prefix, and a padding row (context 0).
    for (kv_heads, group, head_dim, block, window) in [
        (2, 2, 128, 16, 0),
        (3, 1, 64, 16, 0),
        (1, 4, 32, 4, 0),
        (2, 3, 16, 32, 0),
        (1, 2, 256, 16, 0),
        (2, 2, 128, 16, 37),
        (1, 4, 64, 16, 300),
        (3, 2, 128, 8, 1),
    ] {
        let p = params(kv_heads, group, head_dim, block, window);
        let groups = vec![
            members(rng, 3, 37, 90),
            GroupSpec {
                contexts: vec![1 + rng.below(300)],
                prefix_len: 0,
            },
            members(rng, 9, 4 * block, 40),
            GroupSpec {
                contexts: vec![0],
                prefix_len: 0,
            },
            members(rng, 5, 201, 3),
            GroupSpec {
                contexts: vec![57],
                prefix_len: 0,
            },
            members(rng, 2, 1, 700),
        ];
        check_cascade::<T>(dev, rng, p, &groups, None);
    }

    // The prefix ends right before a member's new token (its suffix is that token alone), and
    // a group whose prefix length is a whole number of blocks plus one.
    let mut g = members(rng, 4, 130, 20);
    g.contexts[2] = 131;
    let groups = [g, members(rng, 3, 65, 5)];
    check_cascade::<T>(dev, rng, params(2, 2, 64, 16, 0), &groups, None);

    // One big group of more rows than a prefix block holds (80 members x 2 heads), sharing a long
    // prefix; the window shorter than the prefix.
    let g = members(rng, 80, 1000, 60);
    check_cascade::<T>(dev, rng, params(2, 2, 128, 16, 0), &[g], None);
    let g = members(rng, 20, 700, 60);
    check_cascade::<T>(dev, rng, params(1, 8, 128, 16, 129), &[g], None);

    // Prefix and suffix bounds below the real batch (and a zero prefix bound) change the grid,
    // never the result. (The group size bound must hold: the wgmma prefix pass covers that many
    // members; the mma.sync one, on other GPUs and head sizes, loops over any further rows.)
    let groups = [members(rng, 70, 333, 500), members(rng, 2, 17, 3)];
    let tight = CascadeBounds {
        max_group_size: 70,
        max_prefix_tokens: 1,
        max_suffix_tokens: 1,
    };
    check_cascade::<T>(dev, rng, params(2, 2, 128, 16, 0), &groups, Some(tight));
    let no_prefix = CascadeBounds {
        max_group_size: 70,
        max_prefix_tokens: 0,
        max_suffix_tokens: 900,
    };
    check_cascade::<T>(dev, rng, params(2, 2, 128, 16, 0), &groups, Some(no_prefix));
}

#[test]
fn cascade_matches_reference_and_plain_decode() {
    let Some(dev) = device("cascade_matches_reference_and_plain_decode") else {
        return;
    };
    let mut rng = Rng(21);
    suite::<bf16>(&dev, &mut rng);
    suite::<f16>(&dev, &mut rng);
}

/// The two passes run on two streams (the prefix pass on the device's side stream); captured
/// into a CUDA graph they become parallel branches that must still join before the merge.
/// Replays with a new query each round, outputs and workspace NaN-poisoned before each, must
/// match plain decode of the same round.
#[test]
fn cascade_replays_in_a_graph_with_both_passes_concurrent() {
    let Some(dev) = device("cascade_replays_in_a_graph_with_both_passes_concurrent") else {
        return;
    };
    let mut rng = Rng(23);
    let mut p = params(2, 2, 128, 16, 0);
    let groups = [
        members(&mut rng, 40, 600, 200),
        GroupSpec {
            contexts: vec![90],
            prefix_len: 0,
        },
        members(&mut rng, 3, 17, 30),
    ];
    let b = batch::<bf16>(&mut rng, &mut p, &groups, 2);
    let num_seqs = b.contexts.len();
    let row = p.num_heads * p.head_dim;
    let ctx: Vec<u32> = b.contexts.iter().map(|&c| c as u32).collect();
    let mut q_d = dev.alloc_zeros::<bf16>(num_seqs * row).unwrap();
    let k_d = dev.upload(&b.k).unwrap();
    let v_d = dev.upload(&b.v).unwrap();
    let bt_d = dev.upload(&b.block_tables).unwrap();
    let cl_d = dev.upload(&ctx).unwrap();
    let gs_d = dev.upload(&b.group_starts).unwrap();
    let pl_d = dev.upload(&b.prefix_lens).unwrap();
    let mut out_d = poisoned::<bf16>(&dev, num_seqs * row);
    let ws_len =
        CudaDevice::cascade_attention_decode_workspace_len(num_seqs, groups.len(), &p, &b.bounds);
    let mut ws_d = dev.alloc_zeros::<f32>(ws_len).unwrap();
    let graph = common::capture(&dev, || {
        dev.cascade_attention_decode(
            &q_d, &k_d, &v_d, &bt_d, &cl_d, &gs_d, &pl_d, &mut out_d, &mut ws_d, &p, &b.bounds,
        )
        .unwrap()
    });
    let plain_ws = CudaDevice::paged_attention_decode_workspace_len(
        num_seqs,
        p.num_heads,
        p.head_dim,
        p.max_blocks_per_seq,
        p.block_size,
    );
    let mut plain_ws_d = dev.alloc_zeros::<f32>(plain_ws).unwrap();
    let mut plain_d = dev.alloc_zeros::<bf16>(num_seqs * row).unwrap();
    let stream = dev.stream();
    for round in 0..5 {
        let q: Vec<bf16> = rng.vec(num_seqs * row, -2.0, 2.0);
        stream.memcpy_htod(&q, &mut q_d).unwrap();
        stream
            .memcpy_htod(&vec![bf16::NAN; num_seqs * row], &mut out_d)
            .unwrap();
        stream
            .memcpy_htod(&vec![f32::NAN; ws_len], &mut ws_d)
            .unwrap();
        graph.launch().unwrap();
        let got = dev.download(&out_d).unwrap();
        dev.paged_attention_decode(
            &q_d,
            &k_d,
            &v_d,
            &bt_d,
            &cl_d,
            &mut plain_d,
            &mut plain_ws_d,
            &p,
        )
        .unwrap();
        let plain = to_f32(&dev.download(&plain_d).unwrap());
        assert_rel_l2(
            &format!("graph replay {round} vs plain decode"),
            &got,
            &plain,
        );
    }
}

#[test]
fn cascade_rejects_bad_arguments_with_clear_errors() {
    let Some(dev) = device("cascade_rejects_bad_arguments_with_clear_errors") else {
        return;
    };
    let mut p = params(2, 2, 64, 16, 0);
    p.max_blocks_per_seq = 2;
    let row = p.num_heads * p.head_dim;
    let block = p.block_size * p.num_kv_heads * p.head_dim;
    let bounds = CascadeBounds {
        max_group_size: 2,
        max_prefix_tokens: 16,
        max_suffix_tokens: 16,
    };
    let q = dev.alloc_zeros::<bf16>(2 * row).unwrap();
    let k = dev.alloc_zeros::<bf16>(3 * block).unwrap();
    let v = dev.alloc_zeros::<bf16>(3 * block).unwrap();
    let bt = dev.upload(&[0u32, 1, 0, 2]).unwrap();
    let cl = dev.upload(&[20u32, 30]).unwrap();
    let gs = dev.upload(&[0u32, 2]).unwrap();
    let pl = dev.upload(&[16u32]).unwrap();
    let mut out = dev.alloc_zeros::<bf16>(2 * row).unwrap();
    let ws_len = CudaDevice::cascade_attention_decode_workspace_len(2, 1, &p, &bounds);
    let mut ws = dev.alloc_zeros::<f32>(ws_len).unwrap();
    dev.cascade_attention_decode(
        &q, &k, &v, &bt, &cl, &gs, &pl, &mut out, &mut ws, &p, &bounds,
    )
    .unwrap();

    let short_gs: CudaSlice<u32> = dev.upload(&[0u32]).unwrap();
    let err = dev
        .cascade_attention_decode(
            &q, &k, &v, &bt, &cl, &short_gs, &pl, &mut out, &mut ws, &p, &bounds,
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cascade_attention_decode: `group_starts` holds 1 elements, expected 2"
    );

    let mut small_ws = dev.alloc_zeros::<f32>(ws_len - 1).unwrap();
    let err = dev
        .cascade_attention_decode(
            &q,
            &k,
            &v,
            &bt,
            &cl,
            &gs,
            &pl,
            &mut out,
            &mut small_ws,
            &p,
            &bounds,
        )
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

    let err = dev
        .cascade_attention_decode(
            &q,
            &k,
            &v,
            &bt,
            &cl,
            &gs,
            &pl,
            &mut out,
            &mut ws,
            &AttentionParams { head_dim: 48, ..p },
            &bounds,
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cascade_attention_decode: head_dim must be one of 16, 32, 64, 128 or 256, found 48"
    );
    dev.synchronize().unwrap();
}

/// µs per call of `iters` back-to-back calls, median of `runs` timed rounds after a warm-up.
fn time_us(dev: &CudaDevice, iters: usize, runs: usize, mut call: impl FnMut(usize)) -> f64 {
    for i in 0..3 {
        call(i);
    }
    median_us_per_call(dev, iters, runs, || {
        for i in 0..iters {
            call(i);
        }
    })
}

/// µs per call of `iters` calls captured into one CUDA graph, median of `runs` replays after a
/// warm-up replay: the two passes then run as parallel branches, as in the CUDA model's graphs.
fn time_graph_us(dev: &CudaDevice, iters: usize, runs: usize, mut call: impl FnMut(usize)) -> f64 {
    call(0);
    dev.synchronize().unwrap();
    let graph = common::capture(dev, || {
        for i in 0..iters {
            call(i);
        }
    });
    graph.launch().unwrap();
    median_us_per_call(dev, iters, runs, || graph.launch().unwrap())
}

/// Times `round` (which enqueues `calls` calls) with stream events `runs` times: the median µs
/// per call.
fn median_us_per_call(dev: &CudaDevice, calls: usize, runs: usize, mut round: impl FnMut()) -> f64 {
    let ctx = dev.context();
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        let end = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        start.record(dev.stream()).unwrap();
        round();
        end.record(dev.stream()).unwrap();
        samples.push(start.elapsed_ms(&end).unwrap() as f64 * 1000.0 / calls as f64);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[test]
fn cascade_timing_report() {
    let Some(dev) = device("cascade_timing_report") else {
        return;
    };
    let mut rng = Rng(22);
    let (heads, kv_heads, d, bs) = (16usize, 8usize, 128usize, 16usize);
    let mut lines = vec![format!(
        "cascade timing on {} (bf16, 16/8 heads, head_dim 128, block 16, 64 sequences)",
        dev.name().unwrap_or_default()
    )];
    let num_seqs = 64usize;
    let sweep_requested = std::env::var_os("BRAID_CASCADE_SWEEP").is_some();
    for (prefix, suffix_lo, suffix_hi) in [
        (4096usize, 64usize, 320usize),
        (4096, 64, 600),
        (4096, 1, 64),
        (1024, 64, 600),
    ] {
        let suffixes: Vec<usize> = (0..num_seqs)
            .map(|s| suffix_lo + s * (suffix_hi - suffix_lo) / (num_seqs - 1))
            .collect();
        let groups = [GroupSpec {
            contexts: suffixes.iter().map(|s| prefix + s).collect(),
            prefix_len: prefix,
        }];
        let mut p = params(kv_heads, heads / kv_heads, d, bs, 0);
        let copies: Vec<Batch<bf16>> = (0..2)
            .map(|_| batch(&mut rng, &mut p, &groups, 0))
            .collect();
        let bounds = copies[0].bounds;
        let row = heads * d;
        let q = dev
            .upload(&rng.vec::<bf16>(num_seqs * row, -1.0, 1.0))
            .unwrap();
        let on_device: Vec<_> = copies
            .iter()
            .map(|b| {
                (
                    dev.upload(&b.k).unwrap(),
                    dev.upload(&b.v).unwrap(),
                    dev.upload(&b.block_tables).unwrap(),
                )
            })
            .collect();
        let ctx: Vec<u32> = copies[0].contexts.iter().map(|&c| c as u32).collect();
        let cl = dev.upload(&ctx).unwrap();
        let gs = dev.upload(&copies[0].group_starts).unwrap();
        let pl = dev.upload(&copies[0].prefix_lens).unwrap();
        let mut out = dev.alloc_zeros::<bf16>(num_seqs * row).unwrap();
        let mut plain_ws = dev
            .alloc_zeros::<f32>(CudaDevice::paged_attention_decode_workspace_len(
                num_seqs,
                heads,
                d,
                p.max_blocks_per_seq,
                bs,
            ))
            .unwrap();
        let mut ws = dev
            .alloc_zeros::<f32>(CudaDevice::cascade_attention_decode_workspace_len(
                num_seqs, 1, &p, &bounds,
            ))
            .unwrap();
        let plain_us = time_us(&dev, 50, 5, |i| {
            let (k, v, bt) = &on_device[i % 2];
            dev.paged_attention_decode(&q, k, v, bt, &cl, &mut out, &mut plain_ws, &p)
                .unwrap()
        });
        let cascade_us = time_us(&dev, 200, 5, |i| {
            let (k, v, bt) = &on_device[i % 2];
            dev.cascade_attention_decode(
                &q, k, v, bt, &cl, &gs, &pl, &mut out, &mut ws, &p, &bounds,
            )
            .unwrap()
        });
        let graph_us = time_graph_us(&dev, 100, 5, |i| {
            let (k, v, bt) = &on_device[i % 2];
            dev.cascade_attention_decode(
                &q, k, v, bt, &cl, &gs, &pl, &mut out, &mut ws, &p, &bounds,
            )
            .unwrap()
        });
        // Bytes each must read at least: plain every sequence's whole context, cascade the
        // prefix once plus the suffixes.
        let token_bytes = (kv_heads * d * 2 * 2) as f64;
        let suffix_tokens: usize = suffixes.iter().sum();
        let plain_bytes = (prefix * num_seqs + suffix_tokens) as f64 * token_bytes;
        let cascade_bytes = (prefix + suffix_tokens) as f64 * token_bytes;
        lines.push(format!(
            "prefix {prefix:>4}, suffixes {suffix_lo:>3}..{suffix_hi:<3}: plain {plain_us:>7.1} us ({:>6.0} MB, {:>5.2} TB/s if from DRAM) | cascade {cascade_us:>6.1} us ({:>5.1} MB, {:>5.2} TB/s) | {:>5.1}x",
            plain_bytes / 1e6,
            plain_bytes / plain_us / 1e6,
            cascade_bytes / 1e6,
            cascade_bytes / cascade_us / 1e6,
            plain_us / cascade_us
        ));
        lines.push(format!(
            "  cascade replayed from a CUDA graph (passes as parallel branches): {graph_us:.1} us"
        ));
        if sweep_requested {
            // Partition counts around the defaults, for tuning them.
            let mut sweep =
                String::from("  sweep, graph replays (prefix slots x suffix slots: us):");
            for prefix_slots in [4usize, 8, 16] {
                for suffix_slots in [1usize, 2, 3] {
                    let len = CudaDevice::cascade_attention_decode_tuned_workspace_len(
                        num_seqs,
                        &p,
                        prefix_slots,
                        suffix_slots,
                    );
                    let mut tuned_ws = dev.alloc_zeros::<f32>(len).unwrap();
                    let us = time_graph_us(&dev, 100, 5, |i| {
                        let (k, v, bt) = &on_device[i % 2];
                        dev.cascade_attention_decode_tuned(
                            &q,
                            k,
                            v,
                            bt,
                            &cl,
                            &gs,
                            &pl,
                            &mut out,
                            &mut tuned_ws,
                            &p,
                            &bounds,
                            prefix_slots,
                            suffix_slots,
                        )
                        .unwrap()
                    });
                    sweep.push_str(&format!(" {prefix_slots}x{suffix_slots}: {us:.1}"));
                }
            }
            lines.push(sweep);
            // The last call must be the default one again for the check below.
            for (k, v, bt) in &on_device {
                dev.cascade_attention_decode(
                    &q, k, v, bt, &cl, &gs, &pl, &mut out, &mut ws, &p, &bounds,
                )
                .unwrap();
            }
        }
        // The timed outputs are the real thing: check the last one against plain decode.
        let got = dev.download(&out).unwrap();
        let (k, v, bt) = &on_device[1];
        let mut plain = dev.alloc_zeros::<bf16>(num_seqs * row).unwrap();
        dev.paged_attention_decode(&q, k, v, bt, &cl, &mut plain, &mut plain_ws, &p)
            .unwrap();
        let plain = to_f32(&dev.download(&plain).unwrap());
        let rel = rel_l2("timed cascade vs plain", &got, &plain);
        assert!(
            rel < bf16::REL_L2,
            "timed cascade vs plain: relative L2 {rel:.3e}"
        );
    }
    let report = lines.join("\n") + "\n";
    let _ = std::io::stderr().write_all(report.as_bytes());
}
