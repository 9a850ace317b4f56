//! The paged attention kernels (decode and prefill) against the CPU reference
//! `braid_kernels::cpu::paged_attention` on random inputs: shuffled block tables, unused table
//! entries pointing at a NaN-filled block, outputs and workspace poisoned with NaN. Also a CUDA
//! graph replay of decode with new data, argument checks, and a timing report on a
//! Qwen3-0.6B layer shape. Without a device the GPU tests say "skipped: no CUDA device" and pass.

use std::io::Write as _;

use braid_kernels::cpu::{self, AttentionShape};
use braid_kernels::cuda::{
    AttentionParams, CudaDevice, CudaError, CudaSlice, DecodeRope, RopeParams, SKIP_SLOT,
};
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUfunction_attribute};
use cudarc::nvrtc::Ptx;
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
    let longest = lens.iter().copied().max().unwrap_or(0);
    p.max_blocks_per_seq = longest.div_ceil(p.block_size) + slack_blocks;
    let mut ws = decode_workspace(dev, lens.len(), &p);
    check_decode_with::<T>(dev, rng, &p, lens, &mut ws);
}

/// A decode workspace and how many elements at its end may hold arrival counters: the
/// documented `num_seqs * num_heads` of the bucket it was sized for.
struct Workspace {
    buf: CudaSlice<f32>,
    tail: usize,
}

/// A zeroed workspace sized for `num_seqs` sequences and `p`'s table width.
fn decode_workspace(dev: &CudaDevice, num_seqs: usize, p: &AttentionParams) -> Workspace {
    let len = CudaDevice::paged_attention_decode_workspace_len(
        num_seqs,
        p.num_heads,
        p.head_dim,
        p.max_blocks_per_seq,
        p.block_size,
    );
    let tail = if len == 0 { 0 } else { num_seqs * p.num_heads };
    Workspace {
        buf: dev.alloc_zeros(len).unwrap(),
        tail,
    }
}

impl Workspace {
    /// Fills the scratch part (everything before the counters) with NaN, so a merge can only
    /// read partials its own call wrote.
    fn poison_scratch(&mut self, dev: &CudaDevice) {
        let scratch = self.buf.len() - self.tail;
        if scratch > 0 {
            dev.stream()
                .memcpy_htod(&vec![f32::NAN; scratch], &mut self.buf.slice_mut(..scratch))
                .unwrap();
        }
    }

    /// Asserts that the op left every arrival counter at zero.
    fn assert_counters_zeroed(&self, dev: &CudaDevice, what: &str) {
        let tail = dev
            .download(&self.buf.slice(self.buf.len() - self.tail..))
            .unwrap();
        assert!(
            tail.iter().all(|v| v.to_bits() == 0),
            "{what}: the workspace counters were not left at zero: {tail:?}"
        );
    }
}

/// The CPU reference of a decode batch: one query at position `len - 1` per sequence.
fn decode_reference<T: TestFloat>(
    p: &AttentionParams,
    lens: &[usize],
    cache: &PagedCache<T>,
    q: &[T],
) -> Vec<f32> {
    let row = p.num_heads * p.head_dim;
    let (k, v, qf) = (to_f32(&cache.k), to_f32(&cache.v), to_f32(q));
    let mut want = Vec::with_capacity(q.len());
    for (s, &len) in lens.iter().enumerate() {
        let positions: Vec<usize> = if len > 0 { vec![len - 1] } else { Vec::new() };
        let table = &cache.block_tables[s * p.max_blocks_per_seq..(s + 1) * p.max_blocks_per_seq];
        want.extend(reference_rows(
            p,
            &qf[s * row..(s + 1) * row],
            &positions,
            table,
            &k,
            &v,
        ));
    }
    want
}

/// One decode call of `lens.len()` sequences with `p`'s table width through `ws` (sized for at
/// least as many sequences and as wide a table), whose scratch is poisoned first, against the
/// CPU reference; the counters, zero before as every call leaves them, must be zero after.
fn check_decode_with<T: TestFloat>(
    dev: &CudaDevice,
    rng: &mut Rng,
    p: &AttentionParams,
    lens: &[usize],
    ws: &mut Workspace,
) {
    let num_seqs = lens.len();
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
    let cache = paged_cache::<T>(rng, p, lens);
    let row = p.num_heads * p.head_dim;
    let q: Vec<T> = rng.vec(num_seqs * row, -2.0, 2.0);
    let lens_u32: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
    ws.poison_scratch(dev);

    let q_d = dev.upload(&q).unwrap();
    let k_d = dev.upload(&cache.k).unwrap();
    let v_d = dev.upload(&cache.v).unwrap();
    let bt_d = dev.upload(&cache.block_tables).unwrap();
    let cl_d = dev.upload(&lens_u32).unwrap();
    let mut out_d = poisoned::<T>(dev, num_seqs * row);
    dev.paged_attention_decode(&q_d, &k_d, &v_d, &bt_d, &cl_d, &mut out_d, &mut ws.buf, p)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = dev.download(&out_d).unwrap();
    assert_rel_l2(&what, &got, &decode_reference(p, lens, &cache, &q));
    ws.assert_counters_zeroed(dev, &what);
    check_decode_rope::<T>(dev, rng, p, lens, &cache, ws, &what);
}

/// Equal as stored values (NaN equal to NaN: the caches hold a poisoned block).
fn same_bits<T: TestFloat>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            let (x, y) = (x.to_f32(), y.to_f32());
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
        })
}

/// `paged_attention_decode_rope` against `rope_qk_norm_kv_write` followed by
/// `paged_attention_decode` on the same random QKV rows and cache: the output and both caches
/// must be the same bits. Each sequence's new key goes to the slot its table gives position
/// `len - 1` (a zero-length padding row gets `SKIP_SLOT`); the q/k norms are on for about half
/// the cases.
fn check_decode_rope<T: TestFloat>(
    dev: &CudaDevice,
    rng: &mut Rng,
    p: &AttentionParams,
    lens: &[usize],
    cache: &PagedCache<T>,
    ws: &mut Workspace,
    what: &str,
) {
    let what = format!("{what}, RoPE folded in");
    let num_seqs = lens.len();
    let d = p.head_dim;
    let qkv: Vec<T> = rng.vec(num_seqs * (p.num_heads + 2 * p.num_kv_heads) * d, -2.0, 2.0);
    let positions: Vec<u32> = lens.iter().map(|&l| l.saturating_sub(1) as u32).collect();
    let slots: Vec<u32> = lens
        .iter()
        .enumerate()
        .map(|(s, &len)| {
            if len == 0 {
                return SKIP_SLOT;
            }
            let j = len - 1;
            let block = cache.block_tables[s * p.max_blocks_per_seq + j / p.block_size];
            block * p.block_size as u32 + (j % p.block_size) as u32
        })
        .collect();
    let inv_freq: Vec<f32> = (0..d / 2)
        .map(|i| 10_000f32.powf(-2.0 * i as f32 / d as f32))
        .collect();
    let norms = rng.below(2) == 0;
    let q_norm: Vec<T> = rng.vec(d, 0.5, 2.0);
    let k_norm: Vec<T> = rng.vec(d, 0.5, 40.0);
    let eps = 1e-6;

    let up = |v: &[u32]| dev.upload(v).unwrap();
    let (pos_d, slots_d, bt_d) = (up(&positions), up(&slots), up(&cache.block_tables));
    let lens_d = up(&lens.iter().map(|&l| l as u32).collect::<Vec<_>>());
    let qkv_d = dev.upload(&qkv).unwrap();
    let freq_d = dev.upload(&inv_freq).unwrap();
    let q_norm_d = dev.upload(&q_norm).unwrap();
    let k_norm_d = dev.upload(&k_norm).unwrap();
    let q_norm_v = norms.then(|| q_norm_d.slice(..));
    let k_norm_v = norms.then(|| k_norm_d.slice(..));
    let row = p.num_heads * d;

    // Separately: RoPE and the KV write, then attention.
    let (mut k_a, mut v_a) = (dev.upload(&cache.k).unwrap(), dev.upload(&cache.v).unwrap());
    let mut q_a = poisoned::<T>(dev, num_seqs * row);
    let mut out_a = poisoned::<T>(dev, num_seqs * row);
    let rope = RopeParams {
        n: num_seqs,
        num_heads: p.num_heads,
        num_kv_heads: p.num_kv_heads,
        head_dim: d,
    };
    dev.rope_qk_norm_kv_write(
        &qkv_d,
        &pos_d,
        &slots_d,
        &freq_d,
        q_norm_v.as_ref(),
        k_norm_v.as_ref(),
        eps,
        &mut q_a,
        &mut k_a,
        &mut v_a,
        &rope,
    )
    .unwrap();
    ws.poison_scratch(dev);
    dev.paged_attention_decode(&q_a, &k_a, &v_a, &bt_d, &lens_d, &mut out_a, &mut ws.buf, p)
        .unwrap();

    // Folded into the attention kernel.
    let (mut k_b, mut v_b) = (dev.upload(&cache.k).unwrap(), dev.upload(&cache.v).unwrap());
    let mut out_b = poisoned::<T>(dev, num_seqs * row);
    let inputs = DecodeRope {
        qkv: qkv_d.slice(..),
        positions: pos_d.slice(..),
        slot_mapping: slots_d.slice(..),
        inv_freq: freq_d.slice(..),
        q_norm: norms.then(|| q_norm_d.slice(..)),
        k_norm: norms.then(|| k_norm_d.slice(..)),
        eps,
    };
    ws.poison_scratch(dev);
    dev.paged_attention_decode_rope(
        &inputs,
        &mut k_b,
        &mut v_b,
        &bt_d,
        &lens_d,
        &mut out_b,
        &mut ws.buf,
        p,
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    ws.assert_counters_zeroed(dev, &what);

    let download = |x: &CudaSlice<T>| dev.download(x).unwrap();
    assert!(
        same_bits(&download(&out_a), &download(&out_b)),
        "{what}: outputs differ"
    );
    assert!(
        same_bits(&download(&k_a), &download(&k_b)),
        "{what}: K caches differ"
    );
    assert!(
        same_bits(&download(&v_a), &download(&v_b)),
        "{what}: V caches differ"
    );
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
    // With the full workspace the launch splits the keys where the shape calls for it; with a
    // one-element workspace it never does. On Hopper both take the wgmma kernel where it runs
    // (its split and unsplit variants); the forced mma.sync route covers what the dispatch no
    // longer sends there. All must give the reference result.
    let full = CudaDevice::paged_attention_prefill_workspace_len(p.head_dim);
    let mut outputs = Vec::new();
    for (route, ws_len) in [("auto", full), ("auto", 1), ("mma.sync", 1)] {
        let mut ws = poisoned::<f32>(dev, ws_len);
        let mut out_d = poisoned::<T>(dev, total_q * row);
        let call = if route == "auto" {
            CudaDevice::paged_attention_prefill
        } else {
            CudaDevice::paged_attention_prefill_mma_sync
        };
        call(
            dev, &q_d, &k_d, &v_d, &bt_d, &qs_d, &cl_d, &mut out_d, &mut ws, num_seqs, max_q_len,
            &p,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        outputs.push((
            format!("{route}, workspace {ws_len}"),
            dev.download(&out_d).unwrap(),
        ));
    }

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
    for (how, got) in outputs {
        assert_rel_l2(&format!("{what} {how}"), &got, &want);
    }
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
    // Batches of more than 16 sequences with GQA groups of 2 run the RoPE fold's four-block
    // instantiation (`_rope_wide`, head_dim up to 128), whose register budget differs.
    check_decode::<T>(dev, rng, params(2, 2, 128, 16, 0), &decode_lens(20, 1), 2);
    check_decode::<T>(dev, rng, params(1, 2, 64, 4, 256), &decode_lens(17, 2), 3);
    check_decode::<T>(dev, rng, params(1, 2, 16, 16, 0), &decode_lens(17, 3), 0);
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
    // A short message after a long conversation: few query tiles, so the keys are split (the
    // split ranges fall on and off the causal diagonal, the window edge and the context's end).
    check_prefill::<T>(dev, rng, params(8, 2, 128, 16, 0), &[70], &[2000], 0);
    check_prefill::<T>(dev, rng, params(8, 2, 128, 16, 900), &[100], &[2500], 0);
    check_prefill::<T>(
        dev,
        rng,
        params(4, 4, 128, 32, 0),
        &[40, 3],
        &[3000, 1200],
        0,
    );
    check_prefill::<T>(
        dev,
        rng,
        params(2, 2, 128, 16, 0),
        &[1, 65, 13],
        &[1500, 900, 3001],
        1,
    );
    check_prefill::<T>(
        dev,
        rng,
        params(2, 2, 128, 4, 700),
        &[65, 130],
        &[1800, 1000],
        0,
    );
    check_prefill::<T>(dev, rng, params(1, 4, 64, 16, 0), &[200], &[1100], 0);
    check_prefill::<T>(dev, rng, params(1, 2, 256, 16, 0), &[33], &[1200], 0);
    check_prefill::<T>(dev, rng, params(1, 1, 16, 16, 0), &[5], &[700], 0);
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

/// On Hopper, prefill calls with head_dim 128 and cache blocks of 16 or more tokens take the
/// wgmma kernel (`prefill_matches_reference` checks its results); others, and other GPUs, the
/// mma.sync kernel. A 4,096-token prompt (GQA 16/8, the Qwen3-0.6B shape, plus a window and a
/// 2,000-token cached prefix), and short messages after long contexts whose keys both kernels
/// split, are compared between the two kernels, which the shorter cases above have each checked
/// against the CPU.
#[test]
fn prefill_takes_the_wgmma_kernel_on_hopper() {
    let Some(dev) = device("prefill_takes_the_wgmma_kernel_on_hopper") else {
        return;
    };
    let hopper = dev.context().compute_capability().unwrap() == (9, 0);
    let qwen = params(8, 2, 128, 16, 0);
    assert_eq!(dev.prefill_takes_wgmma::<bf16>(&qwen), hopper);
    assert_eq!(dev.prefill_takes_wgmma::<f16>(&qwen), hopper);
    assert!(!dev.prefill_takes_wgmma::<f32>(&qwen));
    assert!(!dev.prefill_takes_wgmma::<bf16>(&params(8, 2, 64, 16, 0)));
    assert!(!dev.prefill_takes_wgmma::<bf16>(&params(8, 2, 128, 8, 0)));
    assert!(!dev.prefill_takes_wgmma::<bf16>(&params(1, 256, 128, 16, 0)));
    if !hopper {
        eprintln!("prefill_takes_the_wgmma_kernel_on_hopper: wgmma part skipped (not sm_90)");
        return;
    }
    let mut rng = Rng(31);
    let full = CudaDevice::paged_attention_prefill_workspace_len(128);
    for (p, q_len, cached, ws_len) in [
        (qwen, 4096usize, 0usize, 1usize),
        (params(8, 2, 128, 16, 1000), 3000, 0, 1),
        (params(4, 4, 128, 32, 0), 1000, 2000, 1),
        (qwen, 80, 4000, full),
        (params(8, 2, 128, 16, 1500), 33, 6000, full),
    ] {
        let ctx = q_len + cached;
        let p = AttentionParams {
            max_blocks_per_seq: ctx.div_ceil(p.block_size) + 1,
            ..p
        };
        let cache = paged_cache::<bf16>(&mut rng, &p, &[ctx]);
        let row = p.num_heads * p.head_dim;
        let q: Vec<bf16> = rng.vec(q_len * row, -2.0, 2.0);
        let q_d = dev.upload(&q).unwrap();
        let k_d = dev.upload(&cache.k).unwrap();
        let v_d = dev.upload(&cache.v).unwrap();
        let bt_d = dev.upload(&cache.block_tables).unwrap();
        let qs_d = dev.upload(&[0u32, q_len as u32]).unwrap();
        let cl_d = dev.upload(&[ctx as u32]).unwrap();
        let mut ws = poisoned::<f32>(&dev, ws_len);
        let mut outs = Vec::new();
        for call in [
            CudaDevice::paged_attention_prefill::<bf16>,
            CudaDevice::paged_attention_prefill_mma_sync::<bf16>,
        ] {
            let mut out_d = poisoned::<bf16>(&dev, q_len * row);
            call(
                &dev, &q_d, &k_d, &v_d, &bt_d, &qs_d, &cl_d, &mut out_d, &mut ws, 1, q_len, &p,
            )
            .unwrap();
            outs.push(dev.download(&out_d).unwrap());
        }
        let what = format!(
            "wgmma against mma.sync, {q_len} tokens after {cached}, heads {}/{}, block {}, window {}, workspace {ws_len}",
            p.num_heads, p.num_kv_heads, p.block_size, p.sliding_window
        );
        assert_rel_l2(&what, &outs[0], &to_f32(&outs[1]));
    }
}

/// The device buffers of one graph bucket (`num_seqs` sequences, tables
/// `p.max_blocks_per_seq` wide), whose decode call is captured once and replayed with new
/// queries, caches, tables and context lengths written into the same buffers.
struct DecodeBucket {
    p: AttentionParams,
    num_seqs: usize,
    cache_len: usize,
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    tables: CudaSlice<u32>,
    lens: CudaSlice<u32>,
    out: CudaSlice<bf16>,
}

/// What one replay of a [`DecodeBucket`] was given, for its reference.
struct DecodeStep {
    lens: Vec<usize>,
    cache: PagedCache<bf16>,
    q: Vec<bf16>,
}

impl DecodeBucket {
    fn new(dev: &CudaDevice, p: AttentionParams, num_seqs: usize) -> DecodeBucket {
        let row = p.num_heads * p.head_dim;
        let cache_len =
            (p.max_blocks_per_seq * num_seqs + 4) * p.block_size * p.num_kv_heads * p.head_dim;
        DecodeBucket {
            p,
            num_seqs,
            cache_len,
            q: dev.alloc_zeros(num_seqs * row).unwrap(),
            k: dev.alloc_zeros(cache_len).unwrap(),
            v: dev.alloc_zeros(cache_len).unwrap(),
            tables: dev.alloc_zeros(num_seqs * p.max_blocks_per_seq).unwrap(),
            lens: dev.alloc_zeros(num_seqs).unwrap(),
            out: dev.alloc_zeros(num_seqs * row).unwrap(),
        }
    }

    fn call(&mut self, dev: &CudaDevice, ws: &mut CudaSlice<f32>) {
        dev.paged_attention_decode(
            &self.q,
            &self.k,
            &self.v,
            &self.tables,
            &self.lens,
            &mut self.out,
            ws,
            &self.p,
        )
        .unwrap();
    }

    /// Writes a new step's data into the bucket's buffers and poisons its output.
    fn load(&mut self, dev: &CudaDevice, rng: &mut Rng, lens: &[usize]) -> DecodeStep {
        assert_eq!(lens.len(), self.num_seqs);
        let mut cache = paged_cache::<bf16>(rng, &self.p, lens);
        cache.k.resize(self.cache_len, bf16::ZERO);
        cache.v.resize(self.cache_len, bf16::ZERO);
        let row = self.p.num_heads * self.p.head_dim;
        let q: Vec<bf16> = rng.vec(self.num_seqs * row, -2.0, 2.0);
        let lens_u32: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        let stream = dev.stream();
        stream.memcpy_htod(&q, &mut self.q).unwrap();
        stream.memcpy_htod(&cache.k, &mut self.k).unwrap();
        stream.memcpy_htod(&cache.v, &mut self.v).unwrap();
        stream
            .memcpy_htod(&cache.block_tables, &mut self.tables)
            .unwrap();
        stream.memcpy_htod(&lens_u32, &mut self.lens).unwrap();
        stream
            .memcpy_htod(&vec![bf16::NAN; self.num_seqs * row], &mut self.out)
            .unwrap();
        DecodeStep {
            lens: lens.to_vec(),
            cache,
            q,
        }
    }

    fn check(&self, dev: &CudaDevice, what: &str, step: &DecodeStep) {
        let got = dev.download(&self.out).unwrap();
        let want = decode_reference(&self.p, &step.lens, &step.cache, &step.q);
        assert_rel_l2(&format!("{what}, lens {:?}", step.lens), &got, &want);
    }
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
    let mut bucket = DecodeBucket::new(&dev, p, 3);
    let mut ws = decode_workspace(&dev, 3, &p);
    // Load the kernels before capturing.
    bucket.call(&dev, &mut ws.buf);
    dev.synchronize().unwrap();
    let graph = capture(&dev, || bucket.call(&dev, &mut ws.buf));
    for lens in [[5, 60, 0], [64, 65, 700], [1, 1024, 513]] {
        let step = bucket.load(&dev, &mut rng, &lens);
        graph.launch().unwrap();
        bucket.check(&dev, "graph replay", &step);
        ws.assert_counters_zeroed(&dev, "graph replay");
    }
}

/// One workspace, sized for the largest bucket, serves direct calls of every smaller batch and
/// table width and two captured buckets replayed in turn, with context lengths that change the
/// number of partitions holding keys from call to call: every call must find the arrival
/// counters at zero and leave them so.
#[test]
fn decode_reuses_one_workspace_across_calls_buckets_and_replays() {
    let Some(dev) = device("decode_reuses_one_workspace_across_calls_buckets_and_replays") else {
        return;
    };
    single_stream_mode(&dev);
    let mut rng = Rng(16);
    let wide = AttentionParams {
        max_blocks_per_seq: 100,
        ..params(2, 2, 128, 16, 0)
    };
    let narrow = AttentionParams {
        max_blocks_per_seq: 20,
        sliding_window: 100,
        ..wide
    };
    let mut ws = decode_workspace(&dev, 7, &wide);
    let mut small = DecodeBucket::new(&dev, wide, 3);
    let mut large = DecodeBucket::new(&dev, narrow, 7);
    small.call(&dev, &mut ws.buf);
    large.call(&dev, &mut ws.buf);
    dev.synchronize().unwrap();
    let small_graph = capture(&dev, || small.call(&dev, &mut ws.buf));
    let large_graph = capture(&dev, || large.call(&dev, &mut ws.buf));

    let direct: [(&[usize], usize, usize); 6] = [
        (&[1500, 17, 300], 100, 0),
        (&[5, 70, 129, 64, 1, 0, 300], 20, 0),
        (&[1024], 64, 0),
        (&[300, 299, 1], 20, 37),
        (&[1500, 17, 300, 1600, 64, 65, 128], 100, 0),
        (&[1500, 17, 300], 100, 0),
    ];
    for (round, (lens, width, window)) in direct.into_iter().enumerate() {
        let p = AttentionParams {
            max_blocks_per_seq: width,
            sliding_window: window,
            ..wide
        };
        check_decode_with::<bf16>(&dev, &mut rng, &p, lens, &mut ws);

        let step = small.load(
            &dev,
            &mut rng,
            &[[1, 1500, 64], [700, 0, 65], [1600, 129, 3]][round % 3],
        );
        small_graph.launch().unwrap();
        small.check(&dev, "small bucket replay", &step);
        ws.assert_counters_zeroed(&dev, "small bucket replay");

        let lens = [[320, 1, 0, 64, 65, 200, 319], [5, 6, 7, 300, 1, 128, 129]][round % 2];
        let step = large.load(&dev, &mut rng, &lens);
        large_graph.launch().unwrap();
        large.check(&dev, "large bucket replay", &step);
        ws.assert_counters_zeroed(&dev, "large bucket replay");
    }
}

/// The buffers the decode chain test writes (and poisons between rounds): the QKV projection,
/// rotated q, the K/V caches, the attention output and the output projection.
struct ChainBuffers {
    qkv: CudaSlice<bf16>,
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    attn: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
}

/// The attention half of a decode layer, every kernel launched with programmatic dependent
/// launch: QKV projection, RoPE + q/k-norm + KV write, decode attention (several partitions and
/// the in-kernel merge) and the output projection; then the same with the RoPE step folded into
/// decode attention. Each round poisons every intermediate and the
/// cache slots the step writes with NaN, so a kernel that ran ahead of its predecessor would read
/// poison; 20 rounds on the stream, then 20 replays of a graph of the chain.
#[test]
fn overlapped_decode_chain_waits_for_each_previous_kernel() {
    let Some(dev) = device("overlapped_decode_chain_waits_for_each_previous_kernel") else {
        return;
    };
    single_stream_mode(&dev);
    let mut rng = Rng(17);
    let (hidden, bs, eps) = (1024usize, 16usize, 1e-6f32);
    let p = AttentionParams {
        max_blocks_per_seq: 32,
        ..params(8, 2, 128, bs, 0)
    };
    let (heads, kv_heads, d) = (p.num_heads, p.num_kv_heads, p.head_dim);
    let (q_dim, kv_dim) = (heads * d, kv_heads * d);
    let qkv_dim = q_dim + 2 * kv_dim;
    // Context lengths including the new token; 0 is a padding slot.
    let lens = [77usize, 300, 0, 1];
    let n = lens.len();
    let cache = paged_cache::<bf16>(&mut rng, &p, &lens);
    let slots: Vec<u32> = lens
        .iter()
        .enumerate()
        .map(|(s, &len)| {
            if len == 0 {
                SKIP_SLOT
            } else {
                let block = cache.block_tables[s * p.max_blocks_per_seq + (len - 1) / bs];
                block * bs as u32 + ((len - 1) % bs) as u32
            }
        })
        .collect();
    let positions: Vec<u32> = lens.iter().map(|&l| l.saturating_sub(1) as u32).collect();
    let x: Vec<bf16> = rng.vec(n * hidden, -1.0, 1.0);
    let w_qkv: Vec<bf16> = rng.vec(qkv_dim * hidden, -0.05, 0.05);
    let w_o: Vec<bf16> = rng.vec(hidden * q_dim, -0.03, 0.03);
    let q_norm: Vec<bf16> = rng.vec(d, 0.5, 1.5);
    let k_norm: Vec<bf16> = rng.vec(d, 0.5, 1.5);
    let inv_freq: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 1e6f32.powf(2.0 * i as f32 / d as f32))
        .collect();

    // The CPU reference, rounded to bf16 wherever the GPU stores an intermediate.
    let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| bf16::from_f32(*x).to_f32()).collect() };
    let mut qkv_ref = vec![0.0f32; n * qkv_dim];
    cpu::linear(
        &to_f32(&x),
        n,
        hidden,
        &to_f32(&w_qkv),
        qkv_dim,
        None,
        &mut qkv_ref,
    );
    let qkv_ref = round(&qkv_ref);
    let (mut q_ref, mut k_new, mut v_new) = (Vec::new(), Vec::new(), Vec::new());
    for t in qkv_ref.chunks(qkv_dim) {
        q_ref.extend_from_slice(&t[..q_dim]);
        k_new.extend_from_slice(&t[q_dim..q_dim + kv_dim]);
        v_new.extend_from_slice(&t[q_dim + kv_dim..]);
    }
    let (q_in, k_in) = (q_ref.clone(), k_new.clone());
    cpu::rms_norm(&q_in, &to_f32(&q_norm), eps, &mut q_ref);
    cpu::rms_norm(&k_in, &to_f32(&k_norm), eps, &mut k_new);
    let pos: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
    cpu::apply_rope(&mut q_ref, heads, d, &pos, &inv_freq, 1.0);
    cpu::apply_rope(&mut k_new, kv_heads, d, &pos, &inv_freq, 1.0);
    let (q_ref, k_new) = (round(&q_ref), round(&k_new));
    let (mut k_ref, mut v_ref) = (to_f32(&cache.k), to_f32(&cache.v));
    for (t, &slot) in slots.iter().enumerate() {
        if slot != SKIP_SLOT {
            let at = slot as usize * kv_dim;
            k_ref[at..at + kv_dim].copy_from_slice(&k_new[t * kv_dim..(t + 1) * kv_dim]);
            v_ref[at..at + kv_dim].copy_from_slice(&v_new[t * kv_dim..(t + 1) * kv_dim]);
        }
    }
    let mut attn_ref = Vec::with_capacity(n * q_dim);
    for (s, &len) in lens.iter().enumerate() {
        let positions: Vec<usize> = if len > 0 { vec![len - 1] } else { Vec::new() };
        let table = &cache.block_tables[s * p.max_blocks_per_seq..(s + 1) * p.max_blocks_per_seq];
        let rows = &q_ref[s * q_dim..(s + 1) * q_dim];
        attn_ref.extend(reference_rows(&p, rows, &positions, table, &k_ref, &v_ref));
    }
    let mut want = vec![0.0f32; n * hidden];
    cpu::linear(
        &round(&attn_ref),
        n,
        q_dim,
        &to_f32(&w_o),
        hidden,
        None,
        &mut want,
    );

    let x_d = dev.upload(&x).unwrap();
    let w_qkv_d = dev.upload(&w_qkv).unwrap();
    let w_o_d = dev.upload(&w_o).unwrap();
    let q_norm_d = dev.upload(&q_norm).unwrap();
    let k_norm_d = dev.upload(&k_norm).unwrap();
    let inv_freq_d = dev.upload(&inv_freq).unwrap();
    let positions_d = dev.upload(&positions).unwrap();
    let slots_d = dev.upload(&slots).unwrap();
    let tables_d = dev.upload(&cache.block_tables).unwrap();
    let lens_d = dev.upload(&lens.map(|l| l as u32)).unwrap();
    let mut bufs = ChainBuffers {
        qkv: poisoned::<bf16>(&dev, n * qkv_dim),
        q: poisoned::<bf16>(&dev, n * q_dim),
        k: dev.upload(&cache.k).unwrap(),
        v: dev.upload(&cache.v).unwrap(),
        attn: poisoned::<bf16>(&dev, n * q_dim),
        y: poisoned::<bf16>(&dev, n * hidden),
    };
    let mut ws = decode_workspace(&dev, n, &p);
    let rope_p = RopeParams {
        n,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: d,
    };
    let (qn, kn) = (q_norm_d.as_view(), k_norm_d.as_view());
    let stream = dev.stream().clone();
    let mut chain = |folded: bool, b: &mut ChainBuffers| {
        let ChainBuffers {
            qkv,
            q,
            k,
            v,
            attn,
            y,
        } = b;
        dev.linear_overlapped(&x_d, n, hidden, &w_qkv_d, qkv_dim, None, None, qkv)
            .unwrap();
        if folded {
            let rope = DecodeRope {
                qkv: qkv.slice(..),
                positions: positions_d.slice(..),
                slot_mapping: slots_d.slice(..),
                inv_freq: inv_freq_d.slice(..),
                q_norm: Some(q_norm_d.slice(..)),
                k_norm: Some(k_norm_d.slice(..)),
                eps,
            };
            dev.paged_attention_decode_rope(&rope, k, v, &tables_d, &lens_d, attn, &mut ws.buf, &p)
                .unwrap();
        } else {
            dev.rope_qk_norm_kv_write(
                &*qkv,
                &positions_d,
                &slots_d,
                &inv_freq_d,
                Some(&qn),
                Some(&kn),
                eps,
                q,
                k,
                v,
                &rope_p,
            )
            .unwrap();
            dev.paged_attention_decode(&*q, &*k, &*v, &tables_d, &lens_d, attn, &mut ws.buf, &p)
                .unwrap();
        }
        dev.linear_overlapped(&*attn, n, q_dim, &w_o_d, hidden, None, None, y)
            .unwrap();
    };
    let nan_row = vec![bf16::NAN; kv_dim];
    let poison = |b: &mut ChainBuffers| {
        let ChainBuffers {
            qkv,
            q,
            k,
            v,
            attn,
            y,
        } = b;
        stream
            .memcpy_htod(&vec![bf16::NAN; n * qkv_dim], qkv)
            .unwrap();
        stream.memcpy_htod(&vec![bf16::NAN; n * q_dim], q).unwrap();
        stream
            .memcpy_htod(&vec![bf16::NAN; n * q_dim], attn)
            .unwrap();
        stream.memcpy_htod(&vec![bf16::NAN; n * hidden], y).unwrap();
        for &slot in slots.iter().filter(|&&s| s != SKIP_SLOT) {
            let at = slot as usize * kv_dim;
            stream
                .memcpy_htod(&nan_row, &mut k.slice_mut(at..at + kv_dim))
                .unwrap();
            stream
                .memcpy_htod(&nan_row, &mut v.slice_mut(at..at + kv_dim))
                .unwrap();
        }
    };
    for folded in [false, true] {
        for round in 0..20 {
            poison(&mut bufs);
            chain(folded, &mut bufs);
            let what =
                format!("overlapped decode chain (RoPE folded: {folded}), stream round {round}");
            assert_rel_l2(&what, &dev.download(&bufs.y).unwrap(), &want);
        }
        let graph = capture(&dev, || chain(folded, &mut bufs));
        for round in 0..20 {
            poison(&mut bufs);
            graph.launch().unwrap();
            let what =
                format!("overlapped decode chain (RoPE folded: {folded}), graph round {round}");
            assert_rel_l2(&what, &dev.download(&bufs.y).unwrap(), &want);
        }
    }
    ws.assert_counters_zeroed(&dev, "overlapped decode chain");
}

/// On a Hopper GPU the kernels launched with programmatic dependent launch must run from their
/// sm_90a image, which carries the `griddepcontrol` waits; the launcher falls back to plain
/// launches for an image built from older PTX, and would silently lose the overlap.
#[test]
fn overlapped_kernels_carry_their_waits_on_hopper() {
    let Some(dev) = device("overlapped_kernels_carry_their_waits_on_hopper") else {
        return;
    };
    let ctx = dev.context();
    let major = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .unwrap();
    for (module, kernel) in [
        ("attention_decode", "paged_attention_decode_d128_g2_bf16"),
        (
            "attention_decode",
            "paged_attention_decode_rope_d128_g2_bf16",
        ),
        ("rope", "rope_qk_norm_kv_write_bf16"),
        ("gemv", "skinny_gemm_bf16_x1_r1"),
    ] {
        let image = braid_kernels::cuda::module_ptx_or_fatbin(module).unwrap();
        let function = ctx
            .load_module(Ptx::from_binary(image.to_vec()))
            .unwrap()
            .load_function(kernel)
            .unwrap();
        let ptx = function
            .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_PTX_VERSION)
            .unwrap();
        eprintln!("{kernel}: compute capability {major}.x, PTX version {ptx}");
        if major == 9 {
            assert!(
                ptx >= 90,
                "{kernel} runs from PTX version {ptx} on an sm_90 device"
            );
        }
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

    // The RoPE-folded variant checks its own inputs: the QKV rows, and the alignment of the rows
    // and norm weights it reads in vectors.
    let qkv_row = (p.num_heads + 2 * p.num_kv_heads) * p.head_dim;
    let qkv = dev.alloc_zeros::<bf16>(2 * qkv_row + 1).unwrap();
    let norm = dev.alloc_zeros::<bf16>(p.head_dim + 1).unwrap();
    let positions = dev.upload(&[4u32, 19]).unwrap();
    let slots = dev.upload(&[4u32, 35]).unwrap();
    let inv_freq = dev.alloc_zeros::<f32>(p.head_dim / 2).unwrap();
    let (mut k_w, mut v_w) = (k.clone(), v.clone());
    let short_qkv = format!(
        "`qkv` holds {} elements, expected {}",
        2 * qkv_row - 1,
        2 * qkv_row
    );
    for (rows, k_norm, expected) in [
        (qkv.slice(..2 * qkv_row - 1), None, short_qkv.as_str()),
        (
            qkv.slice(1..),
            None,
            "the address of `qkv` must be 16-byte aligned",
        ),
        (
            qkv.slice(..2 * qkv_row),
            Some(norm.slice(1..)),
            "the address of `k_norm` must be 16-byte aligned",
        ),
    ] {
        let rope = DecodeRope {
            qkv: rows,
            positions: positions.slice(..),
            slot_mapping: slots.slice(..),
            inv_freq: inv_freq.slice(..),
            q_norm: None,
            k_norm,
            eps: 1e-6,
        };
        let err = dev
            .paged_attention_decode_rope(&rope, &mut k_w, &mut v_w, &bt, &cl, &mut out, &mut ws, &p)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("paged_attention_decode_rope: ") && err.contains(expected),
            "{err}"
        );
    }

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
        .paged_attention_prefill(
            &q_short,
            &k,
            &v,
            &bt,
            &qs,
            &cl,
            &mut out_short,
            &mut ws,
            2,
            1,
            &p,
        )
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
    dev.paged_attention_prefill(&q, &k, &v, &bt, &qs, &cl, &mut out, &mut ws, 2, 0, &p)
        .unwrap();
    dev.synchronize().unwrap();
}

/// The signature of `paged_attention_prefill` and its forced-route twin, over device slices.
type PrefillCall = fn(
    &CudaDevice,
    &CudaSlice<bf16>,
    &CudaSlice<bf16>,
    &CudaSlice<bf16>,
    &CudaSlice<u32>,
    &CudaSlice<u32>,
    &CudaSlice<u32>,
    &mut CudaSlice<bf16>,
    &mut CudaSlice<f32>,
    usize,
    usize,
    &AttentionParams,
) -> Result<(), braid_kernels::cuda::CudaError>;

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

    // (new tokens, cached tokens before them): fresh prompts, and a short message after a long
    // conversation, timed with the split-KV workspace and without it.
    let full_ws = CudaDevice::paged_attention_prefill_workspace_len(d);
    for (tokens, cached, ws_len) in [
        (512usize, 0usize, full_ws),
        (4096, 0, full_ws),
        (80, 2048, full_ws),
        (80, 2048, 1),
        (80, 4096, full_ws),
    ] {
        let ctx = tokens + cached;
        let blocks = ctx.div_ceil(bs);
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
        let lens = dev.upload(&[ctx as u32]).unwrap();
        let mut out = dev.alloc_zeros::<bf16>(tokens * heads * d).unwrap();
        let mut ws = dev.alloc_zeros::<f32>(ws_len).unwrap();
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
        // The dispatch (wgmma where it runs), then the mma.sync kernel alone.
        let mut time_route = |call: PrefillCall| {
            time_us(&dev, iters, 5, |_| {
                call(
                    &dev, &q, &k, &v, &table, &q_starts, &lens, &mut out, &mut ws, 1, tokens, &p,
                )
                .unwrap()
            })
        };
        let us = time_route(CudaDevice::paged_attention_prefill::<bf16>);
        let mma_us = time_route(CudaDevice::paged_attention_prefill_mma_sync::<bf16>);
        // Causal: query i attends to cached + i + 1 keys; QK^T and PV each cost 2 * head_dim
        // per pair.
        let pairs = tokens * cached + tokens * (tokens + 1) / 2;
        let flops = 4.0 * (heads * d) as f64 * pairs as f64;
        let split = if ws_len > 1 { "" } else { " (no split)" };
        lines.push(format!(
            "prefill {tokens:>4} tokens after {cached:>4}{split}: {us:>8.1} us  {:>7.1} TFLOP/s | mma.sync {mma_us:>8.1} us  {:>7.1} TFLOP/s",
            flops / us / 1e6,
            flops / mma_us / 1e6
        ));
    }
    let report = lines.join("\n") + "\n";
    let _ = std::io::stderr().write_all(report.as_bytes());
}

/// Graph replays of `calls` back-to-back calls: the median of 7 replays after 2 warm-ups, in
/// microseconds per call.
fn graph_us(dev: &CudaDevice, calls: usize, mut call: impl FnMut(usize)) -> f64 {
    call(0);
    dev.synchronize().unwrap();
    let graph = capture(dev, || {
        for i in 0..calls {
            call(i);
        }
    });
    time_us(dev, 1, 7, |_| graph.launch().unwrap()) / calls as f64
}

/// The decode step's attention half on a Qwen3-0.6B shape as the engine runs it (context 130,
/// block tables 16 blocks wide, bf16): the QKV projection, RoPE + q/k-norm + KV write, decode
/// attention and the output projection, each layer with its own weights and KV cache so nothing
/// runs from L2. Prints µs per layer for the chain and for each kernel alone, all in graphs.
#[test]
fn decode_step_timing() {
    let Some(dev) = device("decode_step_timing") else {
        return;
    };
    single_stream_mode(&dev);
    let mut rng = Rng(15);
    let (hidden, heads, kv_heads, d, bs) = (1024usize, 16usize, 8usize, 128usize, 16usize);
    let (q_dim, kv_dim) = (heads * d, kv_heads * d);
    let qkv_dim = q_dim + 2 * kv_dim;
    let (ctx, width, layers) = (130usize, 16usize, 8usize);
    let mut lines = vec![format!(
        "decode step timing on {} (bf16, 16/8 heads x 128, hidden 1024, ctx {ctx}, table width {width}, {layers} layers per graph)",
        dev.name().unwrap_or_default()
    )];
    let w_qkv: Vec<CudaSlice<bf16>> = (0..layers)
        .map(|_| {
            dev.upload(&rng.vec::<bf16>(qkv_dim * hidden, -0.03, 0.03))
                .unwrap()
        })
        .collect();
    let w_o: Vec<CudaSlice<bf16>> = (0..layers)
        .map(|_| {
            dev.upload(&rng.vec::<bf16>(hidden * q_dim, -0.03, 0.03))
                .unwrap()
        })
        .collect();
    let q_norm = dev.upload(&rng.vec::<bf16>(d, 0.5, 1.5)).unwrap();
    let k_norm = dev.upload(&rng.vec::<bf16>(d, 0.5, 1.5)).unwrap();
    let inv_freq = dev
        .upload(
            &(0..d / 2)
                .map(|i| 1.0 / 1e6f32.powf(2.0 * i as f32 / d as f32))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    for batch in [1usize, 64] {
        let num_blocks = batch * width;
        let cache_len = num_blocks * bs * kv_dim;
        let fill = rng.vec::<bf16>(cache_len, -1.0, 1.0);
        let mut caches: Vec<(CudaSlice<bf16>, CudaSlice<bf16>)> = (0..layers)
            .map(|_| (dev.upload(&fill).unwrap(), dev.upload(&fill).unwrap()))
            .collect();
        let tables = dev
            .upload(&(0..num_blocks as u32).collect::<Vec<_>>())
            .unwrap();
        let lens = dev.upload(&vec![ctx as u32; batch]).unwrap();
        let positions = dev.upload(&vec![ctx as u32 - 1; batch]).unwrap();
        let slots = dev
            .upload(
                &(0..batch)
                    .map(|s| (s * width * bs + ctx - 1) as u32)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let mut x = [
            dev.upload(&rng.vec::<bf16>(batch * hidden, -1.0, 1.0))
                .unwrap(),
            dev.alloc_zeros::<bf16>(batch * hidden).unwrap(),
        ];
        let mut qkv = dev
            .upload(&rng.vec::<bf16>(batch * qkv_dim, -1.0, 1.0))
            .unwrap();
        let mut q = dev
            .upload(&rng.vec::<bf16>(batch * q_dim, -1.0, 1.0))
            .unwrap();
        let mut attn = dev.alloc_zeros::<bf16>(batch * q_dim).unwrap();
        let p = AttentionParams {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
            block_size: bs,
            max_blocks_per_seq: width,
            scale: 1.0 / (d as f32).sqrt(),
            sliding_window: 0,
        };
        let rope_p = RopeParams {
            n: batch,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
        };
        let mut ws = dev
            .alloc_zeros::<f32>(CudaDevice::paged_attention_decode_workspace_len(
                batch, heads, d, width, bs,
            ))
            .unwrap();
        let (qn, kn) = (q_norm.as_view(), k_norm.as_view());

        let attention = graph_us(&dev, layers, |l| {
            let (k, v) = &caches[l];
            dev.paged_attention_decode(&q, k, v, &tables, &lens, &mut attn, &mut ws, &p)
                .unwrap()
        });
        let rope = graph_us(&dev, layers, |l| {
            let (k, v) = &mut caches[l];
            dev.rope_qk_norm_kv_write(
                &qkv,
                &positions,
                &slots,
                &inv_freq,
                Some(&qn),
                Some(&kn),
                1e-6,
                &mut q,
                k,
                v,
                &rope_p,
            )
            .unwrap()
        });
        let qkv_proj = graph_us(&dev, layers, |l| {
            let [x0, _] = &x;
            dev.linear_overlapped(x0, batch, hidden, &w_qkv[l], qkv_dim, None, None, &mut qkv)
                .unwrap()
        });
        let o_proj = graph_us(&dev, layers, |l| {
            let [_, x1] = &mut x;
            dev.linear_overlapped(&attn, batch, q_dim, &w_o[l], hidden, None, None, x1)
                .unwrap()
        });
        let chain = graph_us(&dev, layers, |l| {
            let (k, v) = &mut caches[l];
            let [a, b] = &mut x;
            let (input, output) = if l % 2 == 0 { (&*a, b) } else { (&*b, a) };
            dev.linear_overlapped(
                input, batch, hidden, &w_qkv[l], qkv_dim, None, None, &mut qkv,
            )
            .unwrap();
            dev.rope_qk_norm_kv_write(
                &qkv,
                &positions,
                &slots,
                &inv_freq,
                Some(&qn),
                Some(&kn),
                1e-6,
                &mut q,
                k,
                v,
                &rope_p,
            )
            .unwrap();
            dev.paged_attention_decode(&q, &*k, &*v, &tables, &lens, &mut attn, &mut ws, &p)
                .unwrap();
            dev.linear_overlapped(&attn, batch, q_dim, &w_o[l], hidden, None, None, output)
                .unwrap();
        });
        lines.push(format!(
            "batch {batch:>2}: qkv {qkv_proj:>6.2} + rope {rope:>5.2} + attention {attention:>6.2} + o {o_proj:>5.2} = {:>6.2} us alone; chained {chain:>6.2} us per layer",
            qkv_proj + rope + attention + o_proj
        ));
    }
    let report = lines.join("\n") + "\n";
    let _ = std::io::stderr().write_all(report.as_bytes());
}
