//! Paged attention on the GPU: split-K (flash-decoding) decode and flash-attention prefill over
//! the paged KV cache, with GQA, causal masking and an optional sliding window.
//!
//! Both ops read everything that changes from step to step (context lengths, block tables, query
//! offsets) from device memory, size their grids only from shapes fixed for a batch bucket, and
//! take any scratch memory from the caller, so their launches can be captured into CUDA graphs.
//!
//! The KV cache of one layer is `[num_blocks, block_size, num_kv_heads, head_dim]` for K and the
//! same for V, in f16 or bf16. Every block-table entry a sequence uses must be below `num_blocks`:
//! the kernels follow the tables without checking them.

use std::ffi::c_void;

use cudarc::driver::sys::{CUdeviceptr, CUfunction_attribute};
use cudarc::driver::{
    CudaFunction, CudaView, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};

use super::{
    check_eps, check_limit, check_nonzero, driver_error, invalid_argument, kernel_arg,
    tensor_map_2d, to_i32, CudaDevice, CudaError, KernelFloat, LaunchAttributes,
};

/// Geometry and options of one attention call, shared by decode and prefill.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionParams {
    /// Query heads.
    pub num_heads: usize,
    /// KV heads; query head `h` reads KV head `h / (num_heads / num_kv_heads)`.
    pub num_kv_heads: usize,
    /// One of 16, 32, 64, 128 or 256.
    pub head_dim: usize,
    /// Tokens per KV block: a power of two.
    pub block_size: usize,
    /// Width of the block tables; fixed per batch bucket, it sets the decode grid.
    pub max_blocks_per_seq: usize,
    /// Multiplies `q . k` before the softmax (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
    /// A query at position `p` sees keys `j` with `p - w < j <= p`; 0 means no window.
    pub sliding_window: usize,
}

/// What [`CudaDevice::paged_attention_decode_rope`] computes the step's q, k and v from: the
/// inputs of [`CudaDevice::rope_qk_norm_kv_write`] for one token per sequence.
pub struct DecodeRope<'a, T> {
    /// `[num_seqs, (num_heads + 2 * num_kv_heads) * head_dim]` from the QKV projection.
    pub qkv: CudaView<'a, T>,
    /// Each sequence's new position (`context_lens[s] - 1`).
    pub positions: CudaView<'a, u32>,
    /// Each sequence's cache slot for the new key and value, or [`crate::cuda::SKIP_SLOT`].
    pub slot_mapping: CudaView<'a, u32>,
    /// `head_dim / 2` RoPE frequencies, scaling folded in.
    pub inv_freq: CudaView<'a, f32>,
    /// Per-head RMSNorm weights of q and k (`head_dim` each), when the model has them.
    pub q_norm: Option<CudaView<'a, T>>,
    pub k_norm: Option<CudaView<'a, T>>,
    pub eps: f32,
}

/// Where a decode launch takes its query from.
enum DecodeQuery {
    /// Rotated q rows, `[num_seqs, num_heads * head_dim]`.
    Rotated(CUdeviceptr),
    /// The raw projection and the RoPE inputs; the kernel rotates q and writes k and v.
    Raw(RawQuery),
}

/// Device pointers of a [`DecodeRope`] (zeros for the plain kernel, which ignores them).
#[derive(Default)]
struct RawQuery {
    qkv: CUdeviceptr,
    positions: CUdeviceptr,
    slots: CUdeviceptr,
    inv_freq: CUdeviceptr,
    q_norm: CUdeviceptr,
    k_norm: CUdeviceptr,
    eps: f32,
    num_slots: u64,
}

// Kernel launch constants; each must match the constant of the same name in the `.cu` file.
/// attention_decode.cu `THREADS`.
const DECODE_THREADS: u32 = 256;
/// attention_decode.cu `MAX_PARTITION`: the scores of one partition live in shared memory.
const DECODE_MAX_PARTITION: usize = 512;
/// attention_prefill.cu `THREADS`.
const PREFILL_THREADS: u32 = 128;
/// attention_prefill.cu `BM`: query rows per block.
const PREFILL_BLOCK_M: usize = 64;

/// attention_prefill_wgmma.cu `kThreads`: two consumer warpgroups and a producer warp.
pub(super) const PREFILL_WGMMA_THREADS: u32 = 288;
/// attention_prefill_wgmma.cu rows per block (`kBM`): query tokens × the heads of a KV group.
pub(super) const PREFILL_WGMMA_ROWS: usize = 128;
/// attention_prefill_wgmma.cu `kSharedBytes`: alignment slack, barriers, 4 ring slots of a
/// 64-key K and V tile (32 KB), and the two warpgroups' Q tiles (16 KB each).
pub(super) const PREFILL_WGMMA_SHARED_BYTES: usize = 1024 + 1024 + 4 * 32 * 1024 + 2 * 16 * 1024;
/// The wgmma prefill kernel's head size, and its TMA box: 16 cache slots × 64 dims.
const PREFILL_WGMMA_HEAD_DIM: usize = 128;
pub(super) const PREFILL_WGMMA_BOX: (u32, u32) = (16, 64);

/// A prefill launch with fewer (query tile, head, sequence) blocks than this splits the keys of
/// each query tile over more blocks (split KV); and the blocks it aims for when it does.
const PREFILL_SPLIT_BELOW_BLOCKS: usize = 128;
const PREFILL_SPLIT_TARGET_BLOCKS: usize = 256;
/// Most key ranges per query tile, and the fewest key tiles a range gets: shorter ones would
/// spend more on staging Q and on their share of the merge than they save.
const PREFILL_MAX_SPLITS: usize = 16;
const PREFILL_MIN_TILES_PER_SPLIT: usize = 4;

/// Smallest decode partition, used only by batches below `DECODE_TINY_BATCH` sequences: they are
/// latency-bound, and more, shorter partitions put more SMs to work on one context.
const DECODE_MIN_PARTITION: usize = 64;
/// Smallest decode partition of larger batches: below it each block's fixed work (staging,
/// reductions, its share of the merge) outweighs the extra parallelism.
const DECODE_MIN_BATCH_PARTITION: usize = 128;
const DECODE_TINY_BATCH: usize = 4;
/// Batches of more than `DECODE_WIDE_BATCH` sequences keep enough blocks busy with partitions of
/// at least `DECODE_MIN_WIDE_PARTITION` tokens, and take the RoPE-folded decode kernel
/// instantiated for four resident blocks per SM (`_rope_wide`, GQA chunks of 2 up to
/// `DECODE_ROPE_WIDE_MAX_HEAD_DIM`); smaller, latency-bound ones the three-block one, which does
/// not spill (attention_decode.cu, `min_blocks`).
const DECODE_WIDE_BATCH: usize = 16;
const DECODE_MIN_WIDE_PARTITION: usize = 256;
const DECODE_ROPE_WIDE_MAX_HEAD_DIM: usize = 128;
/// Partitions are halved (down to the minimum) until a batch has at least this many
/// (sequence, partition) pairs, so a few long sequences still spread over the GPU's SMs.
const DECODE_TARGET_PAIRS: usize = 256;
/// The largest GQA group one decode block handles per pass; larger groups loop.
const DECODE_MAX_GROUP_CHUNK: usize = 8;
/// Token capacity of a block table (`max_blocks_per_seq * block_size`) the kernels index with
/// 32-bit integers, with headroom for position arithmetic.
const MAX_CAPACITY: usize = 1 << 30;
/// Largest gridDim.y / gridDim.z.
pub(super) const MAX_GRID_YZ: usize = 65_535;
/// The opt-in limit above which a block's dynamic shared memory needs an explicit attribute.
const DEFAULT_DYNAMIC_SMEM: usize = 48 * 1024;

const SUPPORTED_HEAD_DIMS: [usize; 5] = [16, 32, 64, 128, 256];

/// What the validated parameters imply for a launch.
pub(super) struct Geometry {
    pub(super) block_size_log2: i32,
    pub(super) capacity: usize,
}

impl AttentionParams {
    pub(super) fn validate<T: KernelFloat>(&self, op: &'static str) -> Result<Geometry, CudaError> {
        if T::SUFFIX == "f32" {
            return Err(invalid_argument(
                op,
                "the storage dtype",
                "f16 or bf16",
                "f32",
            ));
        }
        if !SUPPORTED_HEAD_DIMS.contains(&self.head_dim) {
            return Err(invalid_argument(
                op,
                "head_dim",
                "one of 16, 32, 64, 128 or 256",
                self.head_dim,
            ));
        }
        check_nonzero(op, "num_kv_heads", self.num_kv_heads)?;
        let group = self.num_heads / self.num_kv_heads;
        if group == 0 || group * self.num_kv_heads != self.num_heads {
            return Err(invalid_argument(
                op,
                "num_heads",
                "a non-zero multiple of num_kv_heads",
                format!("{} for {} KV heads", self.num_heads, self.num_kv_heads),
            ));
        }
        check_limit(op, "num_heads", self.num_heads, MAX_GRID_YZ)?;
        if !self.block_size.is_power_of_two() {
            return Err(invalid_argument(
                op,
                "block_size",
                "a power of two",
                self.block_size,
            ));
        }
        check_nonzero(op, "max_blocks_per_seq", self.max_blocks_per_seq)?;
        let capacity = self.max_blocks_per_seq.saturating_mul(self.block_size);
        check_limit(
            op,
            "the block-table capacity (max_blocks_per_seq * block_size)",
            capacity,
            MAX_CAPACITY,
        )?;
        if !self.scale.is_finite() {
            return Err(invalid_argument(op, "scale", "a finite number", self.scale));
        }
        check_limit(op, "sliding_window", self.sliding_window, i32::MAX as usize)?;
        Ok(Geometry {
            block_size_log2: self.block_size.trailing_zeros() as i32,
            capacity,
        })
    }

    /// Elements of one token row of `q`/`out`, and of one cache block.
    pub(super) fn q_row(&self) -> usize {
        self.num_heads * self.head_dim
    }

    fn block_elems(&self) -> usize {
        self.block_size * self.num_kv_heads * self.head_dim
    }
}

/// Tokens per decode partition for a batch bucket: it depends only on the bucket's shape, so the
/// grid and the workspace stay fixed while context lengths grow.
///
/// Measured on an H100 (Qwen3-0.6B shape, context 640): this picks 64 tokens at batch 1,
/// 128 at batch 8, 256 at 64 and 512 at 256. The 256-token floor above 16 sequences came with four
/// resident blocks per SM: against 128 it gained 2.5–3.4% of whole decode steps at batches 24–64,
/// tied at 16 and lost 6.6% at 8.
fn decode_partition_tokens(num_seqs: usize, capacity: usize) -> usize {
    let min = if num_seqs < DECODE_TINY_BATCH {
        DECODE_MIN_PARTITION
    } else if num_seqs <= DECODE_WIDE_BATCH {
        DECODE_MIN_BATCH_PARTITION
    } else {
        DECODE_MIN_WIDE_PARTITION
    };
    let mut tokens = DECODE_MAX_PARTITION;
    while tokens > min && num_seqs.saturating_mul(capacity.div_ceil(tokens)) < DECODE_TARGET_PAIRS {
        tokens /= 2;
    }
    tokens
}

/// (sequence, partition) pairs whose partial results a decode batch stores: 0 when a single
/// partition lets the partition kernel write the output directly.
fn decode_units(num_seqs: usize, capacity: usize) -> usize {
    let partitions = capacity.div_ceil(decode_partition_tokens(num_seqs, capacity));
    if partitions <= 1 {
        0
    } else {
        num_seqs.saturating_mul(partitions)
    }
}

/// An upper bound of `decode_units(s, c)` over every `s <= num_seqs` and `c <= capacity`,
/// itself monotone in both. The halving loop of `decode_partition_tokens` either keeps 512-token
/// partitions, or stops after a halving, which at most doubles a pair count that was still below
/// `DECODE_TARGET_PAIRS`; and no partition is shorter than `DECODE_MIN_PARTITION`.
fn decode_units_bound(num_seqs: usize, capacity: usize) -> usize {
    if capacity <= DECODE_MIN_PARTITION {
        return 0;
    }
    let at_max = num_seqs.saturating_mul(capacity.div_ceil(DECODE_MAX_PARTITION));
    let at_min = num_seqs.saturating_mul(capacity.div_ceil(DECODE_MIN_PARTITION));
    at_max.max(at_min.min(2 * (DECODE_TARGET_PAIRS - 1)))
}

/// Query heads a decode block handles per pass: the group size rounded up to a power of two,
/// capped at `DECODE_MAX_GROUP_CHUNK`.
fn decode_group_chunk(group: usize) -> usize {
    group.next_power_of_two().min(DECODE_MAX_GROUP_CHUNK)
}

/// Keys per prefill K/V tile (attention_prefill.cu `Tile::BN`).
fn prefill_block_n(head_dim: usize) -> usize {
    if head_dim <= 128 {
        64
    } else {
        32
    }
}

/// Key ranges per query tile of a prefill launch of `blocks` (query tile, head, sequence)
/// blocks over at most `key_tiles` key tiles, whose partials take `unit_elems` floats per split,
/// with `workspace` floats to hold them: 1 (no split) unless the launch leaves most SMs idle and
/// the contexts are long enough for each range to get several key tiles.
fn prefill_splits(blocks: usize, key_tiles: usize, unit_elems: usize, workspace: usize) -> usize {
    if blocks == 0 || blocks >= PREFILL_SPLIT_BELOW_BLOCKS {
        return 1;
    }
    (PREFILL_SPLIT_TARGET_BLOCKS / blocks)
        .min(key_tiles / PREFILL_MIN_TILES_PER_SPLIT)
        .min(PREFILL_MAX_SPLITS)
        .min(workspace / unit_elems.max(1))
        .max(1)
}

/// Dynamic shared memory of a prefill block: Q, then two stages of K and V, rows padded by 8.
fn prefill_smem_bytes(head_dim: usize, elem_bytes: usize) -> usize {
    (PREFILL_BLOCK_M + 4 * prefill_block_n(head_dim)) * (head_dim + 8) * elem_bytes
}

/// Which kernel a prefill call may take.
#[derive(Clone, Copy, PartialEq)]
enum PrefillRoute {
    /// The wgmma kernel where it can run (Hopper, head_dim 128, blocks of ≥ 16 tokens), else
    /// the mma.sync kernel.
    Auto,
    /// Always the mma.sync kernel.
    MmaSync,
}

/// Whether the wgmma prefill kernel can take a call on a device of compute capability
/// `capability`: it needs sm_90, f16/bf16, head_dim 128, cache blocks of at least 16 tokens (a
/// TMA box reads 16 slots of one block) and at most 128 query heads per KV head (one block's
/// rows).
pub(super) fn prefill_wgmma_runs<T: KernelFloat>(
    capability: (i32, i32),
    p: &AttentionParams,
) -> bool {
    capability == (9, 0)
        && std::mem::size_of::<T>() == 2
        && p.head_dim == PREFILL_WGMMA_HEAD_DIM
        && p.block_size >= PREFILL_WGMMA_BOX.0 as usize
        && p.num_heads / p.num_kv_heads <= PREFILL_WGMMA_ROWS
}

/// Query tiles of the wgmma prefill kernel's grid: each block holds 128 rows of one KV head,
/// so 128 / group query tokens.
fn prefill_wgmma_q_tiles(max_q_len: usize, p: &AttentionParams) -> usize {
    max_q_len.div_ceil(PREFILL_WGMMA_ROWS / (p.num_heads / p.num_kv_heads))
}

/// A validated prefill call as its kernels take it: device pointers, the key split and its
/// partials (null without a split), and the sizes the grids derive from.
struct PrefillCall {
    q: CUdeviceptr,
    k_cache: CUdeviceptr,
    v_cache: CUdeviceptr,
    block_tables: CUdeviceptr,
    q_starts: CUdeviceptr,
    context_lens: CUdeviceptr,
    out: CUdeviceptr,
    partial_o: CUdeviceptr,
    partial_ml: CUdeviceptr,
    splits: usize,
    total_q: usize,
    num_seqs: usize,
    max_q_len: usize,
    total_slots: usize,
    block_size_log2: i32,
}

/// Checks the 16-byte alignment the kernels' vector loads need, of `q`, `k_cache`, `v_cache`
/// and `out` in that order.
pub(super) fn check_aligned(op: &'static str, [q, k, v, out]: [u64; 4]) -> Result<(), CudaError> {
    let buffers = [
        ("the q buffer", q),
        ("the k_cache buffer", k),
        ("the v_cache buffer", v),
        ("the out buffer", out),
    ];
    for (argument, ptr) in buffers {
        if ptr & 15 != 0 {
            return Err(invalid_argument(
                op,
                argument,
                "16-byte aligned (a view starting at a multiple of 16 bytes)",
                format!("address {ptr:#x}"),
            ));
        }
    }
    Ok(())
}

impl CudaDevice {
    /// f32 elements of a scratch buffer that serves [`CudaDevice::paged_attention_decode`] for
    /// every batch of at most `num_seqs` sequences with tables at most `max_blocks_per_seq` wide
    /// (same heads, head_dim and block size): partial outputs and their softmax statistics for
    /// every (sequence, head, partition), then `num_seqs * num_heads` arrival counters at the
    /// end of the buffer. One buffer sized for the largest bucket therefore serves all smaller
    /// ones. Zero when every such batch fits one partition.
    ///
    /// The buffer must be all zero before its first use ([`CudaDevice::alloc_zeros`]): the
    /// counters start from zero, and every call leaves them at zero again, so the same buffer
    /// serves every later call and CUDA-graph replay. The partials are scratch that each call
    /// writes before it reads.
    pub fn paged_attention_decode_workspace_len(
        num_seqs: usize,
        num_heads: usize,
        head_dim: usize,
        max_blocks_per_seq: usize,
        block_size: usize,
    ) -> usize {
        let capacity = max_blocks_per_seq.saturating_mul(block_size);
        let units = decode_units_bound(num_seqs, capacity);
        if units == 0 {
            return 0;
        }
        units
            .saturating_mul(num_heads)
            .saturating_mul(head_dim.saturating_add(2))
            .saturating_add(num_seqs.saturating_mul(num_heads))
    }

    /// Attention of one new query token per sequence over its paged KV cache.
    ///
    /// `q` and `out` are `[num_seqs, num_heads * head_dim]`; `block_tables` is
    /// `[num_seqs, max_blocks_per_seq]`; `context_lens[s]` counts the tokens in sequence `s`'s
    /// cache including the new one, whose position is `context_lens[s] - 1` (a length of 0 marks
    /// a padding slot and gives a zero output). `num_seqs` is `context_lens.len()`. `workspace`
    /// holds at least [`CudaDevice::paged_attention_decode_workspace_len`] elements, was zero
    /// before its first use, and is the same buffer on every call that shares it: its arrival
    /// counters sit in its last `num_seqs * num_kv_heads` elements, where no call's partials
    /// reach. Calls that share a workspace must run one after another (one stream).
    ///
    /// The context is split into fixed partitions computed in parallel; the block of a
    /// (sequence, KV head) that finishes last merges them by log-sum-exp, in the same launch.
    /// `q`, both caches and `out` must start 16-byte aligned. The kernel is launched with
    /// programmatic dependent launch: it is scheduled during the previous kernel's tail but
    /// touches no memory before that kernel has finished.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_decode<T: KernelFloat>(
        &self,
        q: &impl DevicePtr<T>,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
        block_tables: &impl DevicePtr<u32>,
        context_lens: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<T>,
        workspace: &mut impl DevicePtrMut<f32>,
        p: &AttentionParams,
    ) -> Result<(), CudaError> {
        const OP: &str = "paged_attention_decode";
        let geo = p.validate::<T>(OP)?;
        self.check_buffer(OP, "q", q, context_lens.len() * p.q_row())?;
        self.check_paged_cache(OP, block_tables, context_lens.len(), k_cache, v_cache, p)?;
        let (q_ptr, _q_sync) = q.device_ptr(&self.stream);
        let (k_ptr, _k_sync) = k_cache.device_ptr(&self.stream);
        let (v_ptr, _v_sync) = v_cache.device_ptr(&self.stream);
        let query = DecodeQuery::Rotated(q_ptr);
        self.decode_attention::<T>(
            OP,
            query,
            [k_ptr, v_ptr],
            block_tables,
            context_lens,
            out,
            workspace,
            p,
            geo,
        )
    }

    /// [`CudaDevice::rope_qk_norm_kv_write`] and [`CudaDevice::paged_attention_decode`] for one
    /// decode step in a single kernel: from the raw QKV projection (`rope.qkv`, one row per
    /// sequence), each block computes the q-normed, rotated query heads it needs, and the block
    /// holding a sequence's last key computes that key and value, writes them into the caches at
    /// `rope.slot_mapping[s]` and attends to them from shared memory. Every value is rounded as
    /// the two calls round it, so the output and the caches are the same bits; one kernel launch
    /// and one pass over q fewer per layer.
    ///
    /// `rope` follows [`CudaDevice::rope_qk_norm_kv_write`]'s conventions with `n = num_seqs`
    /// (a [`crate::cuda::SKIP_SLOT`] slot writes nothing: padding rows), the rest
    /// [`CudaDevice::paged_attention_decode`]'s; `rope.qkv` and the norm weights must also start
    /// 16-byte aligned, and the slot of each sequence must be where its block table puts
    /// position `context_lens[s] - 1`.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_decode_rope<T: KernelFloat>(
        &self,
        rope: &DecodeRope<'_, T>,
        k_cache: &mut (impl DevicePtr<T> + DevicePtrMut<T>),
        v_cache: &mut (impl DevicePtr<T> + DevicePtrMut<T>),
        block_tables: &impl DevicePtr<u32>,
        context_lens: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<T>,
        workspace: &mut impl DevicePtrMut<f32>,
        p: &AttentionParams,
    ) -> Result<(), CudaError> {
        const OP: &str = "paged_attention_decode_rope";
        let geo = p.validate::<T>(OP)?;
        check_eps(OP, rope.eps)?;
        let num_seqs = context_lens.len();
        let qkv_row = (p.num_heads + 2 * p.num_kv_heads) * p.head_dim;
        self.check_buffer(OP, "qkv", &rope.qkv, num_seqs * qkv_row)?;
        self.check_buffer(OP, "positions", &rope.positions, num_seqs)?;
        self.check_buffer(OP, "slot_mapping", &rope.slot_mapping, num_seqs)?;
        self.check_buffer(OP, "inv_freq", &rope.inv_freq, p.head_dim / 2)?;
        for (name, norm) in [("q_norm", &rope.q_norm), ("k_norm", &rope.k_norm)] {
            if let Some(w) = norm {
                self.check_buffer(OP, name, w, p.head_dim)?;
            }
        }
        self.check_paged_cache(OP, block_tables, num_seqs, &*k_cache, &*v_cache, p)?;
        let num_slots = (k_cache.len() / (p.num_kv_heads * p.head_dim)) as u64;
        let (qkv, _qkv_sync) = rope.qkv.device_ptr(&self.stream);
        let (positions, _pos_sync) = rope.positions.device_ptr(&self.stream);
        let (slots, _slot_sync) = rope.slot_mapping.device_ptr(&self.stream);
        let (inv_freq, _freq_sync) = rope.inv_freq.device_ptr(&self.stream);
        let q_norm = rope.q_norm.as_ref().map(|w| w.device_ptr(&self.stream));
        let k_norm = rope.k_norm.as_ref().map(|w| w.device_ptr(&self.stream));
        let (k_ptr, _k_sync) = k_cache.device_ptr_mut(&self.stream);
        let (v_ptr, _v_sync) = v_cache.device_ptr_mut(&self.stream);
        // A null pointer tells the kernel to skip that norm.
        let q_norm = q_norm.as_ref().map_or(0, |(ptr, _)| *ptr);
        let k_norm = k_norm.as_ref().map_or(0, |(ptr, _)| *ptr);
        // The kernel reads these rows in vectors of up to 16 bytes without checking alignment.
        for (name, ptr) in [
            ("the address of `qkv`", qkv),
            ("the address of `q_norm`", q_norm),
            ("the address of `k_norm`", k_norm),
        ] {
            if ptr % 16 != 0 {
                return Err(invalid_argument(
                    OP,
                    name,
                    "16-byte aligned",
                    format!("{ptr:#x}"),
                ));
            }
        }
        let query = DecodeQuery::Raw(RawQuery {
            qkv,
            positions,
            slots,
            inv_freq,
            q_norm,
            k_norm,
            eps: rope.eps,
            num_slots,
        });
        self.decode_attention::<T>(
            OP,
            query,
            [k_ptr, v_ptr],
            block_tables,
            context_lens,
            out,
            workspace,
            p,
            geo,
        )
    }

    /// The launch both decode entry points share, after they validated the parameters (`geo`)
    /// and checked the query and the caches (`caches` = the K and V pointers).
    #[allow(clippy::too_many_arguments)]
    fn decode_attention<T: KernelFloat>(
        &self,
        op: &'static str,
        query: DecodeQuery,
        caches: [CUdeviceptr; 2],
        block_tables: &impl DevicePtr<u32>,
        context_lens: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<T>,
        workspace: &mut impl DevicePtrMut<f32>,
        p: &AttentionParams,
        geo: Geometry,
    ) -> Result<(), CudaError> {
        let num_seqs = context_lens.len();
        self.check_context(op, "context_lens", context_lens)?;
        check_limit(op, "the number of sequences", num_seqs, MAX_GRID_YZ)?;
        self.check_buffer(op, "out", out, num_seqs * p.q_row())?;
        let units = decode_units(num_seqs, geo.capacity);
        let partials = units
            .saturating_mul(p.num_heads)
            .saturating_mul(p.head_dim + 2);
        let counters = if units == 0 {
            0
        } else {
            num_seqs * p.num_kv_heads
        };
        let needed = partials.saturating_add(counters);
        self.check_context(op, "workspace", workspace)?;
        if workspace.len() < needed {
            return Err(invalid_argument(
                op,
                "the workspace length",
                "at least paged_attention_decode_workspace_len(...) elements",
                format!("{} elements where {needed} are needed", workspace.len()),
            ));
        }
        if num_seqs == 0 {
            return Ok(());
        }

        let partition_tokens = decode_partition_tokens(num_seqs, geo.capacity);
        let partitions = geo.capacity.div_ceil(partition_tokens);
        let chunk = decode_group_chunk(p.num_heads / p.num_kv_heads);
        let family = match query {
            DecodeQuery::Rotated(_) => "paged_attention_decode",
            DecodeQuery::Raw(_)
                if chunk == 2
                    && p.head_dim <= DECODE_ROPE_WIDE_MAX_HEAD_DIM
                    && num_seqs > DECODE_WIDE_BATCH =>
            {
                "paged_attention_decode_rope_wide"
            }
            DecodeQuery::Raw(_) => "paged_attention_decode_rope",
        };
        let name = format!("{family}_d{}_g{chunk}_{}", p.head_dim, T::SUFFIX);
        let kernel = self.kernel("attention_decode", &name)?;

        let [k_ptr, v_ptr] = caches;
        let (bt_ptr, _bt_sync) = block_tables.device_ptr(&self.stream);
        let (cl_ptr, _cl_sync) = context_lens.device_ptr(&self.stream);
        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
        let workspace_len = workspace.len();
        let (ws_ptr, _ws_sync) = workspace.device_ptr_mut(&self.stream);
        let (q_ptr, raw) = match query {
            DecodeQuery::Rotated(q) => (q, RawQuery::default()),
            DecodeQuery::Raw(raw) => (0, raw),
        };
        check_aligned(op, [q_ptr, k_ptr, v_ptr, out_ptr])?;

        // One partition: the kernel writes `out` itself (signalled by a null workspace).
        let f32_bytes = std::mem::size_of::<f32>() as u64;
        let (ws_o, ws_ml, ws_counters): (CUdeviceptr, CUdeviceptr, CUdeviceptr) = if units > 0 {
            let o_elems = (num_seqs * p.num_heads * partitions * p.head_dim) as u64;
            let counters_at = (workspace_len - counters) as u64;
            (
                ws_ptr,
                ws_ptr + o_elems * f32_bytes,
                ws_ptr + counters_at * f32_bytes,
            )
        } else {
            (0, 0, 0)
        };
        let num_heads = to_i32(p.num_heads);
        let num_kv_heads = to_i32(p.num_kv_heads);
        let max_blocks = to_i32(p.max_blocks_per_seq);
        let partition_tokens = to_i32(partition_tokens);
        let window = to_i32(p.sliding_window);
        let cfg = LaunchConfig {
            grid_dim: (partitions as u32, p.num_kv_heads as u32, num_seqs as u32),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut params: [*mut c_void; 24] = [
            kernel_arg(&q_ptr),
            kernel_arg(&k_ptr),
            kernel_arg(&v_ptr),
            kernel_arg(&bt_ptr),
            kernel_arg(&cl_ptr),
            kernel_arg(&out_ptr),
            kernel_arg(&ws_o),
            kernel_arg(&ws_ml),
            kernel_arg(&ws_counters),
            kernel_arg(&num_heads),
            kernel_arg(&num_kv_heads),
            kernel_arg(&geo.block_size_log2),
            kernel_arg(&max_blocks),
            kernel_arg(&partition_tokens),
            kernel_arg(&p.scale),
            kernel_arg(&window),
            kernel_arg(&raw.qkv),
            kernel_arg(&raw.positions),
            kernel_arg(&raw.slots),
            kernel_arg(&raw.inv_freq),
            kernel_arg(&raw.q_norm),
            kernel_arg(&raw.k_norm),
            kernel_arg(&raw.eps),
            kernel_arg(&raw.num_slots),
        ];
        // SAFETY: `params` matches `paged_attention_decode{,_rope}_d*_g*_*` in attention_decode.cu, each
        // entry pointing at a live local of the parameter's type; the buffer lengths checked
        // above and by the callers cover every index the grid derives from the shapes, the
        // kernel clamps context lengths to the block tables' capacity and bounds cache writes by
        // `num_slots`, the workspace holds the partial results of every (sequence, head,
        // partition) below the counters of every (sequence, KV head), and every block waits for
        // the previous kernel before touching memory.
        unsafe { self.launch_with_dependency_overlap(op, &kernel, cfg, &mut params) }
    }

    /// f32 elements of a scratch buffer with which [`CudaDevice::paged_attention_prefill`] can
    /// split the keys of any call with heads of `head_dim` elements over as many blocks as it
    /// chooses. A smaller buffer (even an empty one) is accepted: the call then splits less or not
    /// at all.
    pub fn paged_attention_prefill_workspace_len(head_dim: usize) -> usize {
        // The larger of the two kernels' blocks: 128 (token, head) rows for the wgmma kernel.
        PREFILL_SPLIT_TARGET_BLOCKS * PREFILL_BLOCK_M.max(PREFILL_WGMMA_ROWS) * (head_dim + 2)
    }

    /// Causal attention of a variable-length batch of new tokens over the paged KV cache, whose
    /// K/V must already hold the new tokens.
    ///
    /// `q` and `out` are `[total_q, num_heads * head_dim]`, sequence `s` owning rows
    /// `q_starts[s]..q_starts[s + 1]` (`q_starts` has `num_seqs + 1` cumulative entries);
    /// `context_lens[s]` counts all of its keys, the new tokens being the last ones, so query
    /// `i` of a sequence sits at position `context_lens[s] - q_len + i`. `max_q_len` bounds
    /// every sequence's `q_len` (it sizes the grid). `q`, both caches and `out` must start
    /// 16-byte aligned.
    ///
    /// When the batch makes few blocks (a short message after a long cached conversation), the
    /// keys of each query tile are split over several blocks whose
    /// partial results a second kernel merges by log-sum-exp; `workspace` holds those partials
    /// ([`CudaDevice::paged_attention_prefill_workspace_len`] elements allow any split). The
    /// split count is chosen from the shapes and the block tables' width, not from the context
    /// lengths on the device.
    ///
    /// On an H100-class GPU (compute capability 9.0), calls with head_dim 128 and cache blocks
    /// of at least 16 tokens run a wgmma/TMA kernel (a block holds 128 query tokens × heads of
    /// one KV head), split or not; everything else the mma.sync one (a block holds 64 query
    /// tokens of one head). Both compute the same attention; they differ in the order of f32
    /// sums.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_prefill<T: KernelFloat>(
        &self,
        q: &impl DevicePtr<T>,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
        block_tables: &impl DevicePtr<u32>,
        q_starts: &impl DevicePtr<u32>,
        context_lens: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<T>,
        workspace: &mut impl DevicePtrMut<f32>,
        num_seqs: usize,
        max_q_len: usize,
        p: &AttentionParams,
    ) -> Result<(), CudaError> {
        self.prefill_attention(
            q,
            k_cache,
            v_cache,
            block_tables,
            q_starts,
            context_lens,
            out,
            workspace,
            num_seqs,
            max_q_len,
            p,
            PrefillRoute::Auto,
        )
    }

    /// [`CudaDevice::paged_attention_prefill`] always on the mma.sync kernel, for comparing the
    /// two kernels in tests and timings.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_prefill_mma_sync<T: KernelFloat>(
        &self,
        q: &impl DevicePtr<T>,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
        block_tables: &impl DevicePtr<u32>,
        q_starts: &impl DevicePtr<u32>,
        context_lens: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<T>,
        workspace: &mut impl DevicePtrMut<f32>,
        num_seqs: usize,
        max_q_len: usize,
        p: &AttentionParams,
    ) -> Result<(), CudaError> {
        self.prefill_attention(
            q,
            k_cache,
            v_cache,
            block_tables,
            q_starts,
            context_lens,
            out,
            workspace,
            num_seqs,
            max_q_len,
            p,
            PrefillRoute::MmaSync,
        )
    }

    /// Whether [`CudaDevice::paged_attention_prefill`] would run a call of these parameters on
    /// the wgmma kernel.
    #[doc(hidden)]
    pub fn prefill_takes_wgmma<T: KernelFloat>(&self, p: &AttentionParams) -> bool {
        prefill_wgmma_runs::<T>(self.capability(), p)
    }

    #[allow(clippy::too_many_arguments)]
    fn prefill_attention<T: KernelFloat>(
        &self,
        q: &impl DevicePtr<T>,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
        block_tables: &impl DevicePtr<u32>,
        q_starts: &impl DevicePtr<u32>,
        context_lens: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<T>,
        workspace: &mut impl DevicePtrMut<f32>,
        num_seqs: usize,
        max_q_len: usize,
        p: &AttentionParams,
        route: PrefillRoute,
    ) -> Result<(), CudaError> {
        const OP: &str = "paged_attention_prefill";
        let geo = p.validate::<T>(OP)?;
        check_limit(OP, "the number of sequences", num_seqs, MAX_GRID_YZ)?;
        self.check_context(OP, "q", q)?;
        let row = p.q_row();
        if q.len() % row != 0 {
            return Err(invalid_argument(
                OP,
                "the q length",
                "a whole number of num_heads * head_dim rows",
                format!("{} elements for rows of {row}", q.len()),
            ));
        }
        let total_q = q.len() / row;
        check_limit(OP, "the number of query tokens", total_q, i32::MAX as usize)?;
        self.check_buffer(OP, "out", out, q.len())?;
        self.check_buffer(OP, "q_starts", q_starts, num_seqs + 1)?;
        self.check_buffer(OP, "context_lens", context_lens, num_seqs)?;
        self.check_paged_cache(OP, block_tables, num_seqs, k_cache, v_cache, p)?;
        let q_tiles = max_q_len.div_ceil(PREFILL_BLOCK_M);
        if q_tiles > i32::MAX as usize {
            return Err(CudaError::TooLarge {
                op: OP,
                dimension: "max_q_len",
                value: max_q_len,
                limit: i32::MAX as usize,
            });
        }
        self.check_context(OP, "workspace", workspace)?;
        if num_seqs == 0 || q_tiles == 0 {
            return Ok(());
        }
        // The split rule counts blocks of 64 (query token, head) rows, the mma.sync kernel's
        // block: a wgmma block holds 128 rows of one KV head (query tokens × the group's heads)
        // and counts twice. Measured on an H100, counting wgmma blocks once split 512-token
        // prompts (64 blocks) in two and made them slower (19.3 against 15.4 µs a layer).
        let wgmma = route == PrefillRoute::Auto && self.prefill_takes_wgmma::<T>(p);
        let blocks = if wgmma {
            let per_block = PREFILL_WGMMA_ROWS / PREFILL_BLOCK_M;
            prefill_wgmma_q_tiles(max_q_len, p) * p.num_kv_heads * num_seqs * per_block
        } else {
            q_tiles * p.num_heads * num_seqs
        };
        let splits = prefill_splits(
            blocks,
            geo.capacity.div_ceil(prefill_block_n(p.head_dim)),
            total_q * p.num_heads * (p.head_dim + 2),
            workspace.len(),
        );

        let (q_ptr, _q_sync) = q.device_ptr(&self.stream);
        let (k_ptr, _k_sync) = k_cache.device_ptr(&self.stream);
        let (v_ptr, _v_sync) = v_cache.device_ptr(&self.stream);
        let (bt_ptr, _bt_sync) = block_tables.device_ptr(&self.stream);
        let (qs_ptr, _qs_sync) = q_starts.device_ptr(&self.stream);
        let (cl_ptr, _cl_sync) = context_lens.device_ptr(&self.stream);
        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
        let (ws_ptr, _ws_sync) = workspace.device_ptr_mut(&self.stream);
        check_aligned(OP, [q_ptr, k_ptr, v_ptr, out_ptr])?;
        // Partial outputs of every (split, row, head), then their (max, sum) pairs.
        let (partial_o, partial_ml): (CUdeviceptr, CUdeviceptr) = if splits > 1 {
            let o_elems = (splits * total_q * p.num_heads * p.head_dim) as u64;
            (ws_ptr, ws_ptr + o_elems * std::mem::size_of::<f32>() as u64)
        } else {
            (0, 0)
        };
        let call = PrefillCall {
            q: q_ptr,
            k_cache: k_ptr,
            v_cache: v_ptr,
            block_tables: bt_ptr,
            q_starts: qs_ptr,
            context_lens: cl_ptr,
            out: out_ptr,
            partial_o,
            partial_ml,
            splits,
            total_q,
            num_seqs,
            max_q_len,
            total_slots: k_cache.len() / (p.num_kv_heads * p.head_dim),
            block_size_log2: geo.block_size_log2,
        };
        if wgmma {
            self.prefill_wgmma::<T>(&call, p)?;
        } else {
            self.prefill_mma_sync::<T>(&call, p)?;
        }
        if splits > 1 {
            self.prefill_merge::<T>(&call, p)?;
        }
        Ok(())
    }

    /// Launches the mma.sync prefill kernel on a call `prefill_attention` validated.
    fn prefill_mma_sync<T: KernelFloat>(
        &self,
        c: &PrefillCall,
        p: &AttentionParams,
    ) -> Result<(), CudaError> {
        const OP: &str = "paged_attention_prefill";
        let name = format!("paged_attention_prefill_d{}_{}", p.head_dim, T::SUFFIX);
        let kernel = self.kernel("attention_prefill", &name)?;
        let smem = prefill_smem_bytes(p.head_dim, std::mem::size_of::<T>());
        self.allow_dynamic_smem(OP, &kernel, smem)?;
        let total_q = to_i32(c.total_q);
        let num_heads = to_i32(p.num_heads);
        let num_kv_heads = to_i32(p.num_kv_heads);
        let max_blocks = to_i32(p.max_blocks_per_seq);
        let window = to_i32(p.sliding_window);
        let splits_i = to_i32(c.splits);
        let q_tiles = c.max_q_len.div_ceil(PREFILL_BLOCK_M);
        let cfg = LaunchConfig {
            grid_dim: (
                (q_tiles * c.splits) as u32,
                p.num_heads as u32,
                c.num_seqs as u32,
            ),
            block_dim: (PREFILL_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut launch = self.stream.launch_builder(&kernel);
        launch
            .arg(&c.q)
            .arg(&c.k_cache)
            .arg(&c.v_cache)
            .arg(&c.block_tables)
            .arg(&c.q_starts)
            .arg(&c.context_lens)
            .arg(&c.out)
            .arg(&c.partial_o)
            .arg(&c.partial_ml)
            .arg(&splits_i)
            .arg(&total_q)
            .arg(&num_heads)
            .arg(&num_kv_heads)
            .arg(&c.block_size_log2)
            .arg(&max_blocks)
            .arg(&p.scale)
            .arg(&window);
        // SAFETY: the arguments match `paged_attention_prefill_d*_*` in attention_prefill.cu;
        // the kernel clamps query ranges to `total_q` rows and key positions to the block tables'
        // capacity, so with the lengths checked by `prefill_attention` every access stays inside
        // the buffers; with splits the workspace holds `splits * total_q * num_heads *
        // (head_dim + 2)` floats (`prefill_splits` never picks more).
        unsafe { launch.launch(cfg) }.map_err(driver_error(OP))?;
        Ok(())
    }

    /// Combines the partials of a split call into `out`: one block per (row, head), one thread
    /// per element.
    fn prefill_merge<T: KernelFloat>(
        &self,
        c: &PrefillCall,
        p: &AttentionParams,
    ) -> Result<(), CudaError> {
        const OP: &str = "paged_attention_prefill";
        let name = format!(
            "paged_attention_prefill_merge_d{}_{}",
            p.head_dim,
            T::SUFFIX
        );
        let merge = self.kernel("attention_prefill", &name)?;
        let cfg = LaunchConfig {
            grid_dim: ((c.total_q * p.num_heads) as u32, 1, 1),
            block_dim: (p.head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (splits, total_q, num_heads) =
            (to_i32(c.splits), to_i32(c.total_q), to_i32(p.num_heads));
        let mut launch = self.stream.launch_builder(&merge);
        launch
            .arg(&c.partial_o)
            .arg(&c.partial_ml)
            .arg(&c.out)
            .arg(&splits)
            .arg(&total_q)
            .arg(&num_heads);
        // SAFETY: the arguments match `paged_attention_prefill_merge_d*_*`; one block per
        // (row, head) of `out` and one thread per element, reading the partials the split
        // kernel wrote for every (split, row, head).
        unsafe { launch.launch(cfg) }.map_err(driver_error(OP))?;
        Ok(())
    }

    /// Launches the wgmma prefill kernel (its split variant when `c.splits > 1`) on a call
    /// `prefill_attention` validated and `prefill_wgmma_runs` accepted.
    fn prefill_wgmma<T: KernelFloat>(
        &self,
        c: &PrefillCall,
        p: &AttentionParams,
    ) -> Result<(), CudaError> {
        const OP: &str = "paged_attention_prefill";
        let split = if c.splits > 1 { "split_" } else { "" };
        let name = format!("paged_attention_prefill_wgmma_{split}d128_{}", T::SUFFIX);
        let kernel = self.kernel("attention_prefill_wgmma", &name)?;
        self.allow_dynamic_smem(OP, &kernel, PREFILL_WGMMA_SHARED_BYTES)?;
        let row = p.num_kv_heads * p.head_dim;
        let tm_k = tensor_map_2d::<T>(OP, c.k_cache, c.total_slots, row, PREFILL_WGMMA_BOX)?;
        let tm_v = tensor_map_2d::<T>(OP, c.v_cache, c.total_slots, row, PREFILL_WGMMA_BOX)?;
        let splits = to_i32(c.splits);
        let total_q = to_i32(c.total_q);
        let num_heads = to_i32(p.num_heads);
        let num_kv_heads = to_i32(p.num_kv_heads);
        let max_blocks = to_i32(p.max_blocks_per_seq);
        let window = to_i32(p.sliding_window);
        let mut params = [
            kernel_arg(&tm_k),
            kernel_arg(&tm_v),
            kernel_arg(&c.q),
            kernel_arg(&c.block_tables),
            kernel_arg(&c.q_starts),
            kernel_arg(&c.context_lens),
            kernel_arg(&c.out),
            kernel_arg(&c.partial_o),
            kernel_arg(&c.partial_ml),
            kernel_arg(&splits),
            kernel_arg(&total_q),
            kernel_arg(&num_heads),
            kernel_arg(&num_kv_heads),
            kernel_arg(&c.block_size_log2),
            kernel_arg(&max_blocks),
            kernel_arg(&p.scale),
            kernel_arg(&window),
        ];
        let cfg = LaunchConfig {
            grid_dim: (
                (prefill_wgmma_q_tiles(c.max_q_len, p) * c.splits) as u32,
                p.num_kv_heads as u32,
                c.num_seqs as u32,
            ),
            block_dim: (PREFILL_WGMMA_THREADS, 1, 1),
            shared_mem_bytes: PREFILL_WGMMA_SHARED_BYTES as u32,
        };
        // SAFETY: `params` matches `paged_attention_prefill_wgmma{,_split}_d128_*(CUtensorMap,
        // CUtensorMap, const T*, const u32*, const u32*, const u32*, T*, float*, float*, int,
        // int, int, int, int, int, float, int)` in attention_prefill_wgmma.cu, each entry
        // pointing at a live local of that type (the driver copies the tensor maps at launch or
        // capture). The
        // tensor maps cover the whole caches, whose 16-byte alignment `check_aligned` enforced;
        // the kernel reads block-table entries only below each sequence's clamped context, and
        // writes rows of `out`, or of the partials (`splits * total_q * num_heads * (head_dim +
        // 2)` floats of workspace, which `prefill_splits` never exceeds), only inside its
        // `q_starts` range clamped to `total_q`.
        unsafe {
            self.launch_with_attributes(OP, &kernel, cfg, LaunchAttributes::default(), &mut params)
        }
    }

    /// Checks that the block tables have one `max_blocks_per_seq` row per sequence, and that K
    /// and V are equal-length whole numbers of cache blocks of this geometry.
    pub(super) fn check_paged_cache<T>(
        &self,
        op: &'static str,
        block_tables: &impl DevicePtr<u32>,
        num_seqs: usize,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
        p: &AttentionParams,
    ) -> Result<(), CudaError> {
        let table_len = num_seqs * p.max_blocks_per_seq;
        self.check_buffer(op, "block_tables", block_tables, table_len)?;
        self.check_context(op, "k_cache", k_cache)?;
        let block = p.block_elems();
        if k_cache.len() == 0 || k_cache.len() % block != 0 {
            return Err(invalid_argument(
                op,
                "the k_cache length",
                "a non-zero multiple of block_size * num_kv_heads * head_dim",
                format!("{} elements for blocks of {block}", k_cache.len()),
            ));
        }
        self.check_buffer(op, "v_cache", v_cache, k_cache.len())
    }

    /// Raises a kernel's dynamic shared-memory limit when a launch needs more than the default.
    pub(super) fn allow_dynamic_smem(
        &self,
        op: &'static str,
        kernel: &CudaFunction,
        bytes: usize,
    ) -> Result<(), CudaError> {
        if bytes <= DEFAULT_DYNAMIC_SMEM {
            return Ok(());
        }
        kernel
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                to_i32(bytes),
            )
            .map_err(driver_error(op))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_partitions_shrink_for_small_batches_only() {
        assert_eq!(decode_partition_tokens(1, 640), 64);
        assert_eq!(decode_partition_tokens(8, 640), 128);
        assert_eq!(decode_partition_tokens(16, 640), 128);
        assert_eq!(decode_partition_tokens(17, 640), 256);
        assert_eq!(decode_partition_tokens(64, 640), 256);
        assert_eq!(decode_partition_tokens(256, 640), 512);
        assert_eq!(decode_partition_tokens(1, 1 << 20), 512);
        // Never below the minimum, however small the batch or short the context.
        assert_eq!(decode_partition_tokens(1, 16), DECODE_MIN_PARTITION);
        assert_eq!(decode_partition_tokens(7, 16), DECODE_MIN_BATCH_PARTITION);
        assert_eq!(decode_partition_tokens(64, 16), DECODE_MIN_WIDE_PARTITION);
    }

    #[test]
    fn prefill_splits_only_launches_that_leave_the_gpu_idle() {
        let full = CudaDevice::paged_attention_prefill_workspace_len(128);
        // 80 new tokens (2 query tiles) × 16 heads after a 2,048-token conversation.
        let unit = 80 * 16 * 130;
        assert_eq!(prefill_splits(32, 2048 / 64, unit, full), 8);
        // A 512-token prompt already makes 128 blocks: no split.
        assert_eq!(prefill_splits(128, 512 / 64, 512 * 16 * 130, full), 1);
        // A short context: each range keeps at least four key tiles.
        assert_eq!(prefill_splits(16, 8, 16 * 16 * 130, full), 2);
        assert_eq!(prefill_splits(16, 7, 16 * 16 * 130, full), 1);
        // The workspace bounds the split; an empty one turns it off.
        assert_eq!(prefill_splits(32, 2048 / 64, unit, 3 * unit), 3);
        assert_eq!(prefill_splits(32, 2048 / 64, unit, 0), 1);
        // The largest split any call can pick fits the full-size workspace.
        for blocks in 1..PREFILL_SPLIT_BELOW_BLOCKS {
            let splits = prefill_splits(blocks, 1 << 20, 0, usize::MAX);
            // Each block covers at most 128 (query token, head) rows: 64 tokens of one head on
            // the mma.sync kernel, 128 / group tokens of a group's heads on the wgmma kernel.
            assert!(
                splits * blocks * PREFILL_WGMMA_ROWS * 130 <= full,
                "{blocks} blocks"
            );
        }
    }

    #[test]
    fn wgmma_prefill_blocks_hold_128_rows_of_one_kv_head() {
        let p = |num_heads, num_kv_heads| AttentionParams {
            num_heads,
            num_kv_heads,
            head_dim: 128,
            block_size: 16,
            max_blocks_per_seq: 256,
            scale: 1.0,
            sliding_window: 0,
        };
        // Qwen3-0.6B (16 / 8 heads): 64 tokens a block, so 80 new tokens make 2 query tiles and
        // 16 blocks over the 8 KV heads (32 of the split rule's 64-row blocks), which a
        // 4,096-token context splits 8 ways: 128 blocks, one wave on an H100.
        assert_eq!(prefill_wgmma_q_tiles(80, &p(16, 8)), 2);
        assert_eq!(prefill_wgmma_q_tiles(4096, &p(16, 8)), 64);
        assert_eq!(prefill_wgmma_q_tiles(80, &p(32, 4)), 5);
        assert_eq!(prefill_wgmma_q_tiles(1, &p(128, 1)), 1);
        let full = CudaDevice::paged_attention_prefill_workspace_len(128);
        assert_eq!(prefill_splits(2 * 16, 4096 / 64, 80 * 16 * 130, full), 8);
        // A 512-token prompt: 8 query tiles × 8 KV heads, 128 rule blocks, no split.
        assert_eq!(prefill_splits(2 * 64, 512 / 64, 512 * 16 * 130, full), 1);
    }

    #[test]
    fn decode_workspace_covers_every_partition_or_is_empty() {
        // 640 tokens at batch 1: ten partitions of 64.
        assert_eq!(decode_units(1, 640), 10);
        assert_eq!(
            CudaDevice::paged_attention_decode_workspace_len(1, 16, 128, 40, 16),
            16 * 10 * 130 + 16
        );
        // A capacity within one partition writes the output directly.
        assert_eq!(decode_units(256, 512), 0);
        assert_eq!(
            CudaDevice::paged_attention_decode_workspace_len(256, 16, 128, 4, 16),
            0
        );
        assert_eq!(
            CudaDevice::paged_attention_decode_workspace_len(0, 16, 128, 40, 16),
            0
        );
    }

    #[test]
    fn decode_workspace_for_the_largest_bucket_serves_every_smaller_one() {
        let capacities = (1..=80)
            .map(|b| b * 16)
            .chain([2_000, 8_192, 8_200, 130_000, 131_072]);
        let capacities: Vec<usize> = capacities.collect();
        for &capacity in &capacities {
            let mut covered = 0;
            for num_seqs in 0..=300 {
                covered = covered.max(decode_units(num_seqs, capacity));
                let bound = decode_units_bound(num_seqs, capacity);
                assert!(bound >= covered, "{num_seqs} seqs, capacity {capacity}");
                assert!(bound >= decode_units_bound(num_seqs.saturating_sub(1), capacity));
            }
        }
        // Capacities ascend, so a running maximum covers every narrower table.
        for num_seqs in [1, 3, 4, 7, 64, 256] {
            let (mut covered, mut previous_bound) = (0, 0);
            for &capacity in &capacities {
                covered = covered.max(decode_units(num_seqs, capacity));
                let bound = decode_units_bound(num_seqs, capacity);
                assert!(bound >= covered, "{num_seqs} seqs, capacity {capacity}");
                assert!(
                    bound >= previous_bound,
                    "{num_seqs} seqs, capacity {capacity}"
                );
                previous_bound = bound;
            }
        }
    }

    /// The layout every call of a shared workspace relies on: partials from the front, counters
    /// in the last `num_seqs * num_kv_heads` elements, and no call's partials reaching the
    /// counters of any call, whatever its batch and table width within the bucket.
    #[test]
    fn decode_partials_never_reach_any_calls_counters() {
        let (heads, head_dim) = (16, 128);
        for (max_seqs, max_width) in [(1, 16), (3, 64), (7, 100), (64, 16), (256, 2048)] {
            let len = CudaDevice::paged_attention_decode_workspace_len(
                max_seqs, heads, head_dim, max_width, 16,
            );
            for num_seqs in 1..=max_seqs {
                for width in [1, 2, 4, 5, 8, 16, 33, 64, 100, 2048] {
                    if width > max_width {
                        continue;
                    }
                    let units = decode_units(num_seqs, width * 16);
                    let partials = units * heads * (head_dim + 2);
                    assert!(
                        partials + max_seqs * heads <= len,
                        "{num_seqs} of {max_seqs} seqs, width {width} of {max_width}"
                    );
                }
            }
        }
    }

    #[test]
    fn group_chunks_are_powers_of_two_up_to_eight() {
        let chunks: Vec<usize> = [1, 2, 3, 4, 5, 7, 8, 16]
            .iter()
            .map(|&g| decode_group_chunk(g))
            .collect();
        assert_eq!(chunks, [1, 2, 4, 4, 8, 8, 8, 8]);
    }

    #[test]
    fn prefill_shared_memory_fits_an_h100_block() {
        for d in SUPPORTED_HEAD_DIMS {
            let bytes = prefill_smem_bytes(d, 2);
            assert!(bytes <= 227 * 1024, "head_dim {d}: {bytes} bytes");
            // Two blocks per SM at the common head_dim.
            if d == 128 {
                assert!(2 * bytes <= 228 * 1024);
            }
        }
    }

    fn params() -> AttentionParams {
        AttentionParams {
            num_heads: 16,
            num_kv_heads: 8,
            head_dim: 128,
            block_size: 16,
            max_blocks_per_seq: 4,
            scale: 0.088,
            sliding_window: 0,
        }
    }

    #[test]
    fn params_are_validated_with_one_clear_sentence() {
        assert!(params().validate::<half::bf16>("op").is_ok());
        let err = AttentionParams {
            head_dim: 96,
            ..params()
        }
        .validate::<half::bf16>("op")
        .err()
        .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("op: head_dim must be one of 16, 32, 64, 128 or 256, found 96")
        );
        let err = AttentionParams {
            num_heads: 12,
            ..params()
        }
        .validate::<half::f16>("op")
        .err()
        .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "op: num_heads must be a non-zero multiple of num_kv_heads, found 12 for 8 KV heads"
            )
        );
        assert!(AttentionParams {
            block_size: 12,
            ..params()
        }
        .validate::<half::f16>("op")
        .is_err());
        assert!(AttentionParams {
            num_kv_heads: 0,
            ..params()
        }
        .validate::<half::f16>("op")
        .is_err());
        assert!(AttentionParams {
            max_blocks_per_seq: 0,
            ..params()
        }
        .validate::<half::f16>("op")
        .is_err());
        assert!(AttentionParams {
            scale: f32::NAN,
            ..params()
        }
        .validate::<half::f16>("op")
        .is_err());
        assert!(params().validate::<f32>("op").is_err());
        let geo = params()
            .validate::<half::bf16>("op")
            .ok()
            .map(|g| (g.block_size_log2, g.capacity));
        assert_eq!(geo, Some((4, 64)));
    }
}
