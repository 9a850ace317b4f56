//! Cascade decode attention on the GPU: one new query token per sequence, where groups of
//! sequences share the KV blocks of a common prefix (a system prompt). The shared prefix is read
//! once per group on the tensor cores, each sequence's own suffix separately, and the partial
//! results are merged by their log-sum-exp state; the result equals
//! [`CudaDevice::paged_attention_decode`] within rounding.
//!
//! Device-side layout the caller provides (all `u32`, read by the kernels at run time, so the
//! launch may be replayed with new values):
//! - the batch's sequences ordered so each group is a contiguous run of rows: group `g` is rows
//!   `group_starts[g]..group_starts[g + 1]` (`num_groups + 1` non-decreasing entries); rows in no
//!   group attend to their whole context through their own table;
//! - `prefix_lens[g]`: the number of leading KV tokens every member of group `g` shares (any
//!   value, not only block multiples; 0 means no sharing). The prefix is read through the block
//!   table of the group's first member, so its leading `ceil(prefix_len / block_size)` entries
//!   must hold the shared tokens; every member's own keys `prefix_len..context_len` are read
//!   through its own table;
//! - `block_tables` `[num_seqs, max_blocks_per_seq]` and `context_lens` `[num_seqs]` as for
//!   plain decode (a context length of 0 is a padding row with a zero output).
//!
//! The grids are sized from host-side [`CascadeBounds`]; whatever the device data, every key is
//! covered (prefix and suffix bounds that are too small cost speed, not correctness), except that
//! `max_prefix_tokens == 0` skips the shared-prefix pass and every sequence then reads its whole
//! context through its own table. `max_group_size` must bound every group: on Hopper at head_dim
//! 128 the prefix pass runs on the wgmma prefill pipeline (`attention_prefill_wgmma.cu`), whose
//! grid covers that many members. No host synchronisation and no allocation happen in the call.

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::attention::{
    check_aligned, prefill_wgmma_runs, AttentionParams, MAX_GRID_YZ, PREFILL_WGMMA_BOX,
    PREFILL_WGMMA_ROWS, PREFILL_WGMMA_SHARED_BYTES, PREFILL_WGMMA_THREADS,
};
use super::{
    check_limit, driver_error, invalid_argument, kernel_arg, tensor_map_2d, to_i32, CudaDevice,
    CudaError, KernelFloat, LaunchAttributes,
};

// Kernel launch constants; each must match the constant of the same name in attention_cascade.cu.
/// `PREFIX_THREADS`.
const PREFIX_THREADS: u32 = 128;
/// `PREFIX_BM`: query rows (members x GQA heads) one prefix block holds at a time.
const PREFIX_BLOCK_ROWS: usize = 64;
/// `PREFIX_STAGES`: K/V tiles in flight per prefix block.
const PREFIX_STAGES: usize = 2;
/// `SUFFIX_THREADS`.
const SUFFIX_THREADS: u32 = 128;
/// `MERGE_THREADS`.
const MERGE_THREADS: u32 = 128;

/// Prefix blocks the split-K partitioning aims for while the suffix pass runs beside it: about
/// one per SM of an H100 (132 SMs), since a prefix block holds 29K of an SM's 64K registers and
/// the rest of the SM goes to suffix blocks. Measured at the Qwen3-0.6B shape (64 sequences
/// sharing 4096 tokens) in CUDA-graph replays, as the engine runs it, 8 prefix partitions beat
/// 12, 16 and 24 at every suffix length tried, 1..64 included (H100, 2026-11-27; KERNELS.md).
const PREFIX_TARGET_BLOCKS: usize = 128;
/// Shortest prefix partition worth a block: each partition writes a partial state as large as
/// 130 tokens of K and V, so shorter ones would move more bytes than they read.
const PREFIX_MIN_PARTITION: usize = 128;
/// Suffix tokens per block before more partitions are added for parallelism.
const SUFFIX_PARTITION_TOKENS: usize = 320;
/// Fewest suffix tokens per block when partitions are added to fill the GPU.
const SUFFIX_MIN_PARTITION: usize = 64;
/// Suffix blocks (sequence x KV head x partition) a batch should have to fill an H100's SMs
/// beside the prefix pass: 64 sequences x 8 KV heads with suffixes of up to 320 tokens ran
/// faster in one partition (512 blocks) than in two, e.g. 38.8 against 40.5 µs a layer at
/// suffixes 64..320 and 31.0 against 32.5 at 128 (graph replays, H100, 2026-11-27).
const SUFFIX_TARGET_BLOCKS: usize = 512;
/// Largest GQA group the suffix kernel handles per pass; larger groups loop.
const SUFFIX_MAX_GROUP_CHUNK: usize = 4;

/// Host-side bounds of a cascade batch, fixed for a batch bucket: they size the grids (and so
/// the workspace), never the results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CascadeBounds {
    /// The largest number of members of any group. Unlike the other bounds it must hold: the
    /// prefix pass on Hopper (wgmma) covers only that many members of a group.
    pub max_group_size: usize,
    /// The largest `prefix_lens[g]`; 0 skips the shared-prefix pass, so every sequence reads its
    /// whole context through its own table.
    pub max_prefix_tokens: usize,
    /// The largest number of keys a sequence reads through its own table:
    /// `context_len - prefix_len`, the whole context for a sequence without a prefix.
    pub max_suffix_tokens: usize,
}

impl CascadeBounds {
    /// The launch shape these bounds give a batch of `num_seqs` sequences in `num_groups` groups
    /// with geometry `p`. The kernels take nothing else from the bounds, so two calls with the
    /// same grid and arguments launch the same work: a graph captured with one set of bounds
    /// replays exactly for any other that gives the same grid.
    pub fn grid(&self, num_seqs: usize, num_groups: usize, p: &AttentionParams) -> CascadeGrid {
        CascadeGrid::new(num_seqs, num_groups, p, self)
    }
}

/// Grid shape of one cascade launch (see [`CascadeBounds::grid`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CascadeGrid {
    /// Partitions of each group's prefix (0: no prefix pass); workspace slots `0..prefix_slots`.
    prefix_slots: usize,
    /// Tiles of `PREFIX_BLOCK_ROWS` rows a group's rows are spread over (blocks loop over any
    /// further ones).
    row_tiles: usize,
    /// Partitions of each sequence's own keys; the slots after the prefix ones.
    suffix_slots: usize,
    /// Query tiles of the wgmma prefix pass (128 rows each), which does not loop over further
    /// ones: `max_group_size` must bound every group where that pass runs.
    wgmma_q_tiles: usize,
}

impl CascadeGrid {
    fn new(
        num_seqs: usize,
        num_groups: usize,
        p: &AttentionParams,
        bounds: &CascadeBounds,
    ) -> Self {
        let capacity = p.max_blocks_per_seq.saturating_mul(p.block_size);
        let group = (p.num_heads / p.num_kv_heads.max(1)).max(1);
        let rows = bounds.max_group_size.max(1).saturating_mul(group);
        let row_tiles = rows
            .div_ceil(PREFIX_BLOCK_ROWS)
            .min(MAX_GRID_YZ / p.num_kv_heads.max(1))
            .max(1);
        let prefix_tokens = bounds.max_prefix_tokens.min(capacity);
        let prefix_slots = if prefix_tokens == 0 || num_groups == 0 {
            0
        } else {
            let per_slot = p
                .num_kv_heads
                .saturating_mul(num_groups)
                .saturating_mul(row_tiles)
                .max(1);
            PREFIX_TARGET_BLOCKS
                .div_ceil(per_slot)
                .min(prefix_tokens.div_ceil(PREFIX_MIN_PARTITION))
                .max(1)
        };
        let suffix_tokens = bounds.max_suffix_tokens.min(capacity).max(1);
        let mut suffix_slots = suffix_tokens.div_ceil(SUFFIX_PARTITION_TOKENS);
        let blocks_per_slot = num_seqs.saturating_mul(p.num_kv_heads).max(1);
        while blocks_per_slot.saturating_mul(suffix_slots) < SUFFIX_TARGET_BLOCKS
            && suffix_tokens.div_ceil(suffix_slots * 2) >= SUFFIX_MIN_PARTITION
        {
            suffix_slots *= 2;
        }
        CascadeGrid {
            prefix_slots,
            row_tiles,
            suffix_slots,
            wgmma_q_tiles: bounds
                .max_group_size
                .max(1)
                .div_ceil((PREFILL_WGMMA_ROWS / group).max(1)),
        }
    }

    fn slots(&self) -> usize {
        self.prefix_slots + self.suffix_slots
    }

    /// f32 elements of the workspace: a partial output and its (max, sum) per
    /// (sequence, head, slot).
    fn workspace_len(&self, num_seqs: usize, p: &AttentionParams) -> usize {
        num_seqs
            .saturating_mul(p.num_heads)
            .saturating_mul(self.slots())
            .saturating_mul(p.head_dim.saturating_add(2))
    }
}

/// Query heads the suffix kernel handles per pass: the GQA group rounded up to a power of two,
/// capped at `SUFFIX_MAX_GROUP_CHUNK`.
fn suffix_group_chunk(group: usize) -> usize {
    group.next_power_of_two().min(SUFFIX_MAX_GROUP_CHUNK)
}

/// Dynamic shared memory of a prefix block: the query tile, then `PREFIX_STAGES` stages of K and
/// V tiles, rows padded by 8 elements (attention_mma.cuh `Tile`).
fn prefix_smem_bytes(head_dim: usize, elem_bytes: usize) -> usize {
    let block_n = if head_dim <= 128 { 64 } else { 32 };
    (PREFIX_BLOCK_ROWS + 2 * PREFIX_STAGES * block_n) * (head_dim + 8) * elem_bytes
}

impl CudaDevice {
    /// f32 elements of the scratch buffer [`CudaDevice::cascade_attention_decode`] needs for a
    /// batch of `num_seqs` sequences in `num_groups` groups with geometry `p` and `bounds`.
    pub fn cascade_attention_decode_workspace_len(
        num_seqs: usize,
        num_groups: usize,
        p: &AttentionParams,
        bounds: &CascadeBounds,
    ) -> usize {
        CascadeGrid::new(num_seqs, num_groups, p, bounds).workspace_len(num_seqs, p)
    }

    /// Decode attention (one new query token per sequence) where groups of sequences share a
    /// prefix of KV blocks; see the module documentation for the layout of `group_starts`
    /// (`[num_groups + 1]`) and `prefix_lens` (`[num_groups]`).
    ///
    /// `q` and `out` are `[num_seqs, num_heads * head_dim]`, `block_tables` is
    /// `[num_seqs, max_blocks_per_seq]`, `context_lens` is `[num_seqs]` (the new token sits at
    /// `context_lens[s] - 1`); `num_seqs` is `context_lens.len()` and `num_groups` is
    /// `prefix_lens.len()`. `workspace` holds at least
    /// [`CudaDevice::cascade_attention_decode_workspace_len`] elements. Causal masking and the
    /// sliding window apply per query in both passes. `q`, both caches and `out` must start
    /// 16-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub fn cascade_attention_decode<T: KernelFloat>(
        &self,
        q: &impl DevicePtr<T>,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
        block_tables: &impl DevicePtr<u32>,
        context_lens: &impl DevicePtr<u32>,
        group_starts: &impl DevicePtr<u32>,
        prefix_lens: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<T>,
        workspace: &mut impl DevicePtrMut<f32>,
        p: &AttentionParams,
        bounds: &CascadeBounds,
    ) -> Result<(), CudaError> {
        let grid = CascadeGrid::new(context_lens.len(), prefix_lens.len(), p, bounds);
        self.launch_cascade(
            q,
            k_cache,
            v_cache,
            block_tables,
            context_lens,
            group_starts,
            prefix_lens,
            out,
            workspace,
            p,
            grid,
        )
    }

    /// [`CudaDevice::cascade_attention_decode`] with the number of prefix and suffix partitions
    /// given explicitly (`prefix_slots == 0` skips the prefix pass), for tuning the defaults;
    /// the workspace needs [`CudaDevice::cascade_attention_decode_tuned_workspace_len`].
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub fn cascade_attention_decode_tuned<T: KernelFloat>(
        &self,
        q: &impl DevicePtr<T>,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
        block_tables: &impl DevicePtr<u32>,
        context_lens: &impl DevicePtr<u32>,
        group_starts: &impl DevicePtr<u32>,
        prefix_lens: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<T>,
        workspace: &mut impl DevicePtrMut<f32>,
        p: &AttentionParams,
        bounds: &CascadeBounds,
        prefix_slots: usize,
        suffix_slots: usize,
    ) -> Result<(), CudaError> {
        let mut grid = CascadeGrid::new(context_lens.len(), prefix_lens.len(), p, bounds);
        grid.prefix_slots = prefix_slots;
        grid.suffix_slots = suffix_slots.max(1);
        self.launch_cascade(
            q,
            k_cache,
            v_cache,
            block_tables,
            context_lens,
            group_starts,
            prefix_lens,
            out,
            workspace,
            p,
            grid,
        )
    }

    /// Workspace elements of [`CudaDevice::cascade_attention_decode_tuned`].
    #[doc(hidden)]
    pub fn cascade_attention_decode_tuned_workspace_len(
        num_seqs: usize,
        p: &AttentionParams,
        prefix_slots: usize,
        suffix_slots: usize,
    ) -> usize {
        CascadeGrid {
            prefix_slots,
            row_tiles: 1,
            suffix_slots: suffix_slots.max(1),
            wgmma_q_tiles: 1,
        }
        .workspace_len(num_seqs, p)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_cascade<T: KernelFloat>(
        &self,
        q: &impl DevicePtr<T>,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
        block_tables: &impl DevicePtr<u32>,
        context_lens: &impl DevicePtr<u32>,
        group_starts: &impl DevicePtr<u32>,
        prefix_lens: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<T>,
        workspace: &mut impl DevicePtrMut<f32>,
        p: &AttentionParams,
        grid: CascadeGrid,
    ) -> Result<(), CudaError> {
        const OP: &str = "cascade_attention_decode";
        let geo = p.validate::<T>(OP)?;
        let num_seqs = context_lens.len();
        let num_groups = prefix_lens.len();
        let grid = CascadeGrid {
            prefix_slots: if num_groups == 0 {
                0
            } else {
                grid.prefix_slots
            },
            ..grid
        };
        self.check_context(OP, "context_lens", context_lens)?;
        self.check_context(OP, "prefix_lens", prefix_lens)?;
        check_limit(OP, "the number of sequences", num_seqs, MAX_GRID_YZ)?;
        check_limit(OP, "the number of groups", num_groups, MAX_GRID_YZ)?;
        self.check_buffer(OP, "group_starts", group_starts, num_groups + 1)?;
        self.check_buffer(OP, "q", q, num_seqs * p.q_row())?;
        self.check_buffer(OP, "out", out, num_seqs * p.q_row())?;
        self.check_paged_cache(OP, block_tables, num_seqs, k_cache, v_cache, p)?;
        check_limit(
            OP,
            "the suffix partitions",
            grid.suffix_slots,
            i32::MAX as usize,
        )?;
        check_limit(
            OP,
            "the prefix partitions",
            grid.prefix_slots,
            i32::MAX as usize,
        )?;
        let needed = grid.workspace_len(num_seqs, p);
        self.check_context(OP, "workspace", workspace)?;
        if workspace.len() < needed {
            return Err(invalid_argument(
                OP,
                "the workspace length",
                "at least cascade_attention_decode_workspace_len(...) elements",
                format!("{} elements where {needed} are needed", workspace.len()),
            ));
        }
        check_limit(
            OP,
            "the partial-state slots per sequence and head",
            grid.slots(),
            i32::MAX as usize,
        )?;
        if num_seqs == 0 {
            return Ok(());
        }

        let (q_ptr, _q_sync) = q.device_ptr(&self.stream);
        let (k_ptr, _k_sync) = k_cache.device_ptr(&self.stream);
        let (v_ptr, _v_sync) = v_cache.device_ptr(&self.stream);
        let (bt_ptr, _bt_sync) = block_tables.device_ptr(&self.stream);
        let (cl_ptr, _cl_sync) = context_lens.device_ptr(&self.stream);
        let (gs_ptr, _gs_sync) = group_starts.device_ptr(&self.stream);
        let (pl_ptr, _pl_sync) = prefix_lens.device_ptr(&self.stream);
        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
        let (ws_ptr, _ws_sync) = workspace.device_ptr_mut(&self.stream);
        check_aligned(OP, [q_ptr, k_ptr, v_ptr, out_ptr])?;

        let slots = grid.slots();
        let ws_o = ws_ptr;
        let ws_ml = ws_ptr
            + (num_seqs * p.num_heads * slots * p.head_dim * std::mem::size_of::<f32>()) as u64;
        let num_seqs_i = to_i32(num_seqs);
        let num_groups_i = to_i32(num_groups);
        let num_heads = to_i32(p.num_heads);
        let num_kv_heads = to_i32(p.num_kv_heads);
        let max_blocks = to_i32(p.max_blocks_per_seq);
        let window = to_i32(p.sliding_window);
        let slots_i = to_i32(slots);
        let prefix_slots = to_i32(grid.prefix_slots);

        // The two passes are independent and differently bound: the prefix pass is a latency-bound
        // tensor-core loop on about one block per SM, the suffix pass streams each sequence's own
        // keys. On two streams (two branches of a captured graph) the suffix blocks fill the rest
        // of each SM beside the prefix blocks instead of waiting for the whole prefix grid. The
        // side stream forks before either launch, so it waits only for what came before the call.
        // On Hopper at head_dim 128 the prefix pass runs on the wgmma prefill pipeline
        // (attention_prefill_wgmma.cu), a group's members taking the place of a sequence's tokens.
        let wgmma_prefix = grid.prefix_slots > 0 && prefill_wgmma_runs::<T>(self.capability(), p);
        if wgmma_prefix {
            let side = self.fork_side_stream(OP)?;
            let name = format!("cascade_prefix_wgmma_d128_{}", T::SUFFIX);
            let kernel = self.kernel("attention_prefill_wgmma", &name)?;
            self.allow_dynamic_smem(OP, &kernel, PREFILL_WGMMA_SHARED_BYTES)?;
            let row = p.num_kv_heads * p.head_dim;
            let total_slots = k_cache.len() / row;
            let tm_k = tensor_map_2d::<T>(OP, k_ptr, total_slots, row, PREFILL_WGMMA_BOX)?;
            let tm_v = tensor_map_2d::<T>(OP, v_ptr, total_slots, row, PREFILL_WGMMA_BOX)?;
            let cfg = LaunchConfig {
                grid_dim: (
                    (grid.wgmma_q_tiles * grid.prefix_slots) as u32,
                    p.num_kv_heads as u32,
                    num_groups as u32,
                ),
                block_dim: (PREFILL_WGMMA_THREADS, 1, 1),
                shared_mem_bytes: PREFILL_WGMMA_SHARED_BYTES as u32,
            };
            let mut params = [
                kernel_arg(&tm_k),
                kernel_arg(&tm_v),
                kernel_arg(&q_ptr),
                kernel_arg(&bt_ptr),
                kernel_arg(&gs_ptr),
                kernel_arg(&cl_ptr),
                kernel_arg(&pl_ptr),
                kernel_arg(&ws_o),
                kernel_arg(&ws_ml),
                kernel_arg(&prefix_slots),
                kernel_arg(&num_seqs_i),
                kernel_arg(&num_heads),
                kernel_arg(&num_kv_heads),
                kernel_arg(&geo.block_size_log2),
                kernel_arg(&max_blocks),
                kernel_arg(&p.scale),
                kernel_arg(&window),
                kernel_arg(&slots_i),
            ];
            // SAFETY: `params` matches `cascade_prefix_wgmma_d128_*(CUtensorMap, CUtensorMap,
            // const T*, const u32*, const u32*, const u32*, const u32*, float*, float*, int, int,
            // int, int, int, int, float, int, int)` in attention_prefill_wgmma.cu, each entry
            // pointing at a live local of that type (the driver copies the tensor maps at launch
            // or capture). The tensor maps cover the whole caches (16-byte aligned, checked
            // above); the kernel clamps group ranges to `num_seqs` and prefix lengths to the
            // tables' capacity, reads table entries of each group's first member below its
            // clamped prefix, and writes prefix slots `0..prefix_slots` of the rows of the
            // `wgmma_q_tiles` query tiles of each group, inside the workspace checked above.
            unsafe {
                self.launch_with_attributes_on(
                    side,
                    OP,
                    &kernel,
                    cfg,
                    LaunchAttributes::default(),
                    &mut params,
                )
            }?;
        }
        let prefix_pass = if grid.prefix_slots > 0 && !wgmma_prefix {
            let prefix = self.kernel(
                "attention_cascade",
                &format!("cascade_prefix_d{}_{}", p.head_dim, T::SUFFIX),
            )?;
            let smem = prefix_smem_bytes(p.head_dim, std::mem::size_of::<T>());
            self.allow_dynamic_smem(OP, &prefix, smem)?;
            let cfg = LaunchConfig {
                grid_dim: (
                    grid.prefix_slots as u32,
                    (p.num_kv_heads * grid.row_tiles) as u32,
                    num_groups as u32,
                ),
                block_dim: (PREFIX_THREADS, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            Some((self.fork_side_stream(OP)?, prefix, cfg))
        } else {
            None
        };
        let chunk = suffix_group_chunk(p.num_heads / p.num_kv_heads);
        let suffix = self.kernel(
            "attention_cascade",
            &format!("cascade_suffix_d{}_g{chunk}_{}", p.head_dim, T::SUFFIX),
        )?;
        let cfg = LaunchConfig {
            grid_dim: (
                grid.suffix_slots as u32,
                p.num_kv_heads as u32,
                num_seqs as u32,
            ),
            block_dim: (SUFFIX_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let suffix_pass = Some((&*self.stream, suffix, cfg));
        for (stream, function, cfg) in [prefix_pass, suffix_pass].into_iter().flatten() {
            let mut launch = stream.launch_builder(&function);
            launch
                .arg(&q_ptr)
                .arg(&k_ptr)
                .arg(&v_ptr)
                .arg(&bt_ptr)
                .arg(&cl_ptr)
                .arg(&gs_ptr)
                .arg(&pl_ptr)
                .arg(&ws_o)
                .arg(&ws_ml)
                .arg(&num_seqs_i)
                .arg(&num_groups_i)
                .arg(&num_heads)
                .arg(&num_kv_heads)
                .arg(&geo.block_size_log2)
                .arg(&max_blocks)
                .arg(&p.scale)
                .arg(&window)
                .arg(&slots_i)
                .arg(&prefix_slots);
            // SAFETY: the arguments match `cascade_prefix_d*_*` and `cascade_suffix_d*_g*_*` in
            // attention_cascade.cu (the same list). Both clamp group ranges to `num_seqs` rows and
            // context and prefix lengths to the tables' capacity, reading only table entries below
            // it; the prefix pass writes slots `0..prefix_slots` of its groups' rows, the suffix
            // pass slots `prefix_slots..slots` of every (sequence, head) row, all inside the
            // workspace checked above.
            unsafe { launch.launch(cfg) }.map_err(driver_error(OP))?;
        }

        if grid.prefix_slots > 0 {
            self.join_side_stream(OP)?;
        }

        let merge = self.kernel("attention_cascade", &format!("cascade_merge_{}", T::SUFFIX))?;
        let head_dim = to_i32(p.head_dim);
        let capacity = to_i32(geo.capacity);
        let cfg = LaunchConfig {
            grid_dim: (p.num_heads as u32, num_seqs as u32, 1),
            block_dim: (MERGE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&merge);
        launch
            .arg(&ws_o)
            .arg(&ws_ml)
            .arg(&cl_ptr)
            .arg(&gs_ptr)
            .arg(&pl_ptr)
            .arg(&out_ptr)
            .arg(&num_groups_i)
            .arg(&head_dim)
            .arg(&slots_i)
            .arg(&prefix_slots)
            .arg(&capacity);
        // SAFETY: the arguments match `cascade_merge_*` in attention_cascade.cu; it reads the
        // slots the two passes wrote for every (sequence, head) (the prefix ones only for a
        // sequence whose group has a prefix, derived from the same data as the prefix pass)
        // and writes `out`, checked above.
        unsafe { launch.launch(cfg) }.map_err(driver_error(OP))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(max_blocks_per_seq: usize) -> AttentionParams {
        AttentionParams {
            num_heads: 16,
            num_kv_heads: 8,
            head_dim: 128,
            block_size: 16,
            max_blocks_per_seq,
            scale: 0.088,
            sliding_window: 0,
        }
    }

    #[test]
    fn the_target_shape_splits_the_prefix_over_about_one_block_per_sm() {
        // 64 sequences sharing 4096 tokens, own suffixes up to 600.
        let mut bounds = CascadeBounds {
            max_group_size: 64,
            max_prefix_tokens: 4096,
            max_suffix_tokens: 600,
        };
        let grid = CascadeGrid::new(64, 1, &params(300), &bounds);
        assert_eq!(grid.row_tiles, 2);
        assert_eq!(grid.prefix_slots, 8);
        assert_eq!(grid.suffix_slots, 2);
        assert_eq!(
            CudaDevice::cascade_attention_decode_workspace_len(64, 1, &params(300), &bounds),
            64 * 16 * 10 * 130
        );
        // Suffixes up to 320 take one partition (512 blocks beside the prefix pass's 128), short
        // ones too.
        for suffix in [320, 64, 1] {
            bounds.max_suffix_tokens = suffix;
            let grid = CascadeGrid::new(64, 1, &params(300), &bounds);
            assert_eq!((grid.prefix_slots, grid.suffix_slots), (8, 1), "{suffix}");
        }
        // Fewer sequences split their suffixes to fill the GPU, down to 64 tokens a block.
        bounds.max_suffix_tokens = 320;
        let grid = CascadeGrid::new(16, 1, &params(300), &bounds);
        assert_eq!(grid.suffix_slots, 4);
    }

    #[test]
    fn a_group_decoding_its_answer_keeps_one_grid_for_hundreds_of_steps() {
        // The shared-prefix benchmark: 64 members of 4096 shared tokens, questions of 64 tokens,
        // answers of 256: every own suffix from 65 to 320 tokens gives the same launches.
        let grid = |suffix| {
            let bounds = CascadeBounds {
                max_group_size: 64,
                max_prefix_tokens: 4096,
                max_suffix_tokens: suffix,
            };
            bounds.grid(64, 1, &params(512))
        };
        assert!((65..=320).all(|s| grid(s) == grid(65)));
        assert_ne!(grid(321), grid(320));
    }

    #[test]
    fn grids_stay_within_their_limits() {
        for (seqs, groups, group_size, prefix, suffix) in [
            (1, 1, 1, 0, 1),
            (1, 1, 1, 5, 1),
            (7, 3, 5, 4000, 9000),
            (256, 256, 1, 0, 4096),
            (300, 2, 200, 100_000, 3),
        ] {
            let bounds = CascadeBounds {
                max_group_size: group_size,
                max_prefix_tokens: prefix,
                max_suffix_tokens: suffix,
            };
            let grid = CascadeGrid::new(seqs, groups, &params(8000), &bounds);
            assert!(grid.suffix_slots >= 1);
            assert!(grid.row_tiles >= 1);
            assert_eq!(grid.prefix_slots == 0, prefix == 0, "{grid:?}");
            // Prefix partitions are never shorter than the minimum (bar a short prefix's one).
            if grid.prefix_slots > 1 {
                assert!(prefix.div_ceil(grid.prefix_slots) >= PREFIX_MIN_PARTITION / 2);
            }
            assert!(
                grid.suffix_slots == 1
                    || suffix.div_ceil(grid.suffix_slots) >= SUFFIX_MIN_PARTITION
            );
        }
    }

    #[test]
    fn suffix_group_chunks_are_powers_of_two_up_to_four() {
        let chunks: Vec<usize> = [1, 2, 3, 4, 5, 8, 16]
            .iter()
            .map(|&g| suffix_group_chunk(g))
            .collect();
        assert_eq!(chunks, [1, 2, 4, 4, 4, 4, 4]);
    }

    #[test]
    fn prefix_shared_memory_fits_an_h100_block() {
        for d in [16, 32, 64, 128, 256] {
            assert!(prefix_smem_bytes(d, 2) <= 227 * 1024, "head_dim {d}");
        }
    }
}
