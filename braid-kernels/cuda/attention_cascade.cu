// Cascade decode attention: one new query token per sequence, where groups of sequences share the
// KV of a common prefix. Three kernels, each writing or reading per-(sequence, head, slot) partial
// states (normalised output, max in the log2 domain, sum) in a caller-provided workspace:
//
//   cascade_suffix_d<D>_g<GC>_<dtype>  each sequence's own keys [prefix_len, context_len), split
//                                      into the grid's partitions; slots [prefix_slots, slots)
//   cascade_prefix_d<D>_<dtype>        the shared prefix of each group, read once for all its
//                                      members on the tensor cores (rows = members x GQA group);
//                                      split into the grid's partitions; slots [0, prefix_slots)
//   cascade_merge_<dtype>              log-sum-exp merge of every slot into the output
//
// Everything that changes per step (context lengths, block tables, group starts, prefix lengths)
// is read from device memory; the grids depend only on host-side bounds, and every kernel covers
// its whole share of the work whatever the bounds were (a bound that is too small costs speed,
// never correctness).
//
// Groups: sequence s belongs to group g when group_starts[g] <= s < group_starts[g + 1]
// (group_starts non-decreasing); its prefix is min(prefix_lens[g], table capacity), or 0 when it
// is in no group or the launch has no prefix slots. The prefix is read through the block table of
// the group's first member.
#include <limits.h>

#include "attention_mma.cuh"

namespace braid {
namespace attn_cascade {

using namespace attn_mma;

// These must match the constants of the same names in src/cuda/cascade.rs.
constexpr int PREFIX_WARPS = 4;
constexpr int PREFIX_THREADS = PREFIX_WARPS * BRAID_WARP_SIZE;
// Query rows of one prefix block: 16 per warp.
constexpr int PREFIX_BM = PREFIX_WARPS * 16;
// K/V tiles in flight in the prefix pass. Measured on an H100 at the Qwen3-0.6B shape, 8 warps
// with 3 stages (one block per SM) ran no faster than this prefill-like shape (two blocks per SM).
constexpr int PREFIX_STAGES = 2;
constexpr int SUFFIX_THREADS = 128;
constexpr int SUFFIX_WARPS = SUFFIX_THREADS / BRAID_WARP_SIZE;
constexpr int MERGE_THREADS = 128;
// Keys each thread of the suffix kernel loads per round (K and V both in flight). Rounds are
// issued one ahead of the one computed, so up to two rounds of two keys are in flight: the same
// registers as four keys a round without the lookahead (121, four blocks an SM), but no round
// waits for its own loads. Measured on an H100 in the shared-prefix benchmark (64 x 4,096):
// 28,360 against 27,940 tok/s for four keys without it (KERNELS.md).
constexpr int SUFFIX_UNROLL = 2;

// Read-only, streamed once: bypass L1 allocation so the KV stream does not evict the block tables.
__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ void unpack8(const uint4& raw, float (&f)[8], __half) {
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 v = __half22float2(h[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

__device__ __forceinline__ void unpack8(const uint4& raw, float (&f)[8], __nv_bfloat16) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 v = __bfloat1622float2(h[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

// The shared-prefix length of sequence `seq` (see the file comment), found by the whole block at
// once: each thread tests a few groups, so the search costs one round of loads, not a chain.
// Must be called by every thread of the block.
__device__ __forceinline__ int sequence_prefix(const uint32_t* __restrict__ group_starts,
                                               const uint32_t* __restrict__ prefix_lens, int num_groups,
                                               int prefix_slots, int seq, int capacity) {
    __shared__ int found_prefix;
    if (threadIdx.x == 0) found_prefix = 0;
    __syncthreads();
    if (prefix_slots > 0) {
        const uint32_t s = static_cast<uint32_t>(seq);
        for (int g = threadIdx.x; g < num_groups; g += blockDim.x) {
            if (group_starts[g] <= s && s < group_starts[g + 1]) {
                found_prefix = static_cast<int>(min(prefix_lens[g], static_cast<uint32_t>(capacity)));
            }
        }
    }
    __syncthreads();
    return found_prefix;
}

// First key a query at `pos` sees under the window (0 without one).
__device__ __forceinline__ int window_start(int pos, int sliding_window) {
    return (sliding_window > 0 && pos + 1 > sliding_window) ? pos + 1 - sliding_window : 0;
}

// ---------------------------------------------------------------------------------------------
// Prefix pass. Grid: (prefix_slots, num_kv_heads * row_tiles, num_groups); block: PREFIX_THREADS;
// dynamic shared memory (PREFIX_BM + 2 * PREFIX_STAGES * BN) * STRIDE elements (Q, then the K and
// V stages).
//
// Block (p, kv head, group) covers the group's rows (member m, query head h of the KV head's GQA
// group) as row = m * G + h, PREFIX_BM rows at a time, starting at its row tile and stepping by
// row_tiles; and keys [p * chunk, (p + 1) * chunk) of the prefix, chunk = ceil(prefix / slots)
// rounded up to whole K/V tiles. Each row keeps its own causal and window mask (its query sits at
// context_len - 1). Every row of the group gets slot p written: the normalised output, or only
// (max -inf, sum 0) when none of its keys fall in the block's range.
template <typename T, int D>
__device__ __forceinline__ void prefix_pass(const T* __restrict__ q, const T* __restrict__ k_cache,
                                            const T* __restrict__ v_cache, const uint32_t* __restrict__ block_tables,
                                            const uint32_t* __restrict__ context_lens,
                                            const uint32_t* __restrict__ group_starts,
                                            const uint32_t* __restrict__ prefix_lens, float* __restrict__ ws_o,
                                            float* __restrict__ ws_ml, int num_seqs, int num_heads, int num_kv_heads,
                                            int block_size_log2, int max_blocks_per_seq, float scale,
                                            int sliding_window, int num_slots) {
    using Cfg = Tile<D>;
    constexpr int BN = Cfg::BN;
    constexpr int STRIDE = Cfg::STRIDE;
    constexpr int CHUNKS = Cfg::CHUNKS;
    constexpr int BM = PREFIX_BM;
    constexpr int THREADS = PREFIX_THREADS;
    constexpr int STAGES = PREFIX_STAGES;
    static_assert((BM * CHUNKS) % THREADS == 0, "query tile loads must divide evenly");
    // At D = 16 a K/V tile has fewer 16-byte chunks than the block has threads.
    constexpr int KV_LOADS = (BN * CHUNKS + THREADS - 1) / THREADS;

    extern __shared__ uint4 smem_raw[];
    T* const sq = reinterpret_cast<T*>(smem_raw);
    T* const sk = sq + BM * STRIDE;
    T* const sv = sk + STAGES * BN * STRIDE;
    __shared__ int range_lo;
    __shared__ int range_hi;

    const int part = blockIdx.x;
    const int prefix_slots = gridDim.x;
    const int kv_head = blockIdx.y % num_kv_heads;
    const int row_tiles = gridDim.y / num_kv_heads;
    const int group_idx = blockIdx.z;
    const int group = num_heads / num_kv_heads;
    const int capacity = max_blocks_per_seq << block_size_log2;
    const int block_size = 1 << block_size_log2;

    const int first = static_cast<int>(min(group_starts[group_idx], static_cast<uint32_t>(num_seqs)));
    const int next = static_cast<int>(min(group_starts[group_idx + 1], static_cast<uint32_t>(num_seqs)));
    if (next <= first) return;
    const int prefix = static_cast<int>(min(prefix_lens[group_idx], static_cast<uint32_t>(capacity)));
    if (prefix == 0) return;
    const int rows = (next - first) * group;
    const int chunk = ((prefix + prefix_slots - 1) / prefix_slots + BN - 1) / BN * BN;
    const int part_begin = min(part * chunk, prefix);
    const int part_end = min(part_begin + chunk, prefix);

    const int tid = threadIdx.x;
    const int warp = tid / BRAID_WARP_SIZE;
    const int lane = tid % BRAID_WARP_SIZE;
    const int g = lane / 4;
    const int tig = lane % 4;
    const float scale_log2 = scale * LOG2E;
    const size_t q_row_stride = static_cast<size_t>(num_heads) * D;
    const uint32_t* table = block_tables + static_cast<size_t>(first) * max_blocks_per_seq;
    const T* sq_warp = sq + warp * 16 * STRIDE;

    for (int tile_row = blockIdx.y / num_kv_heads; tile_row * BM < rows; tile_row += row_tiles) {
        const int r0 = tile_row * BM;
        const int tile_rows = min(BM, rows - r0);

        // The keys the block reads, [kv_lo, kv_hi). Without a window that is the whole partition
        // (each row's causal limit is applied by its mask), known before any context length is
        // read, so the copies start at once. With a window, only the keys some row can see.
        int kv_lo = part_begin;
        int kv_hi = part_end;
        int lo[2];
        int hi[2];
        auto row_bounds = [&]() {
            // Each thread's two rows: the keys of the partition they see, [lo, hi] (empty when
            // lo > hi). Rows past the group see nothing and are never stored.
#pragma unroll
            for (int ri = 0; ri < 2; ++ri) {
                const int r = warp * 16 + g + ri * 8;
                lo[ri] = INT_MAX;
                hi[ri] = -1;
                if (r < tile_rows) {
                    const int seq = first + (r0 + r) / group;
                    const int pos = static_cast<int>(min(context_lens[seq], static_cast<uint32_t>(capacity))) - 1;
                    lo[ri] = max(window_start(pos, sliding_window), part_begin);
                    hi[ri] = min(pos, part_end - 1);
                }
            }
        };
        if (sliding_window > 0) {
            row_bounds();
            if (tid == 0) {
                range_lo = INT_MAX;
                range_hi = -1;
            }
            __syncthreads();
            if (tig == 0) {
#pragma unroll
                for (int ri = 0; ri < 2; ++ri) {
                    if (lo[ri] <= hi[ri]) {
                        atomicMin(&range_lo, lo[ri]);
                        atomicMax(&range_hi, hi[ri]);
                    }
                }
            }
            __syncthreads();
            kv_lo = range_lo;
            kv_hi = range_hi + 1;
        }
        const int num_tiles = kv_hi > kv_lo ? (kv_hi - kv_lo + BN - 1) / BN : 0;

        auto load_kv = [&](int tile) {
            const int stage = tile % STAGES;
            const int kv0 = kv_lo + tile * BN;
            T* dk = sk + stage * BN * STRIDE;
            T* dv = sv + stage * BN * STRIDE;
#pragma unroll
            for (int it = 0; it < KV_LOADS; ++it) {
                const int idx = tid + it * THREADS;
                if (idx >= BN * CHUNKS) break;
                const int r = idx / CHUNKS;
                const int c = idx % CHUNKS;
                const int j = kv0 + r;
                const bool valid = j < kv_hi;
                size_t offset = 0;
                if (valid) {
                    const size_t slot =
                        (static_cast<size_t>(table[j >> block_size_log2]) << block_size_log2) + (j & (block_size - 1));
                    offset = (slot * num_kv_heads + kv_head) * D + c * 8;
                }
                cp_async16(dk + r * STRIDE + c * 8, k_cache + offset, valid);
                cp_async16(dv + r * STRIDE + c * 8, v_cache + offset, valid);
            }
        };

        WarpRows<D> st;
        st.init();
        if (num_tiles > 0) {
#pragma unroll
            for (int it = 0; it < BM * CHUNKS / THREADS; ++it) {
                const int idx = tid + it * THREADS;
                const int r = idx / CHUNKS;
                const int c = idx % CHUNKS;
                const bool valid = r < tile_rows;
                size_t offset = 0;
                if (valid) {
                    const int row = r0 + r;
                    const size_t seq = static_cast<size_t>(first + row / group);
                    offset = seq * q_row_stride + static_cast<size_t>(kv_head * group + row % group) * D + c * 8;
                }
                cp_async16(sq + r * STRIDE + c * 8, q + offset, valid);
            }
            // Groups 0 .. STAGES-2 hold tiles 0 .. STAGES-2 (the first with Q), possibly empty.
#pragma unroll
            for (int t = 0; t < STAGES - 1; ++t) {
                if (t < num_tiles) load_kv(t);
                cp_async_commit();
            }
        }
        if (sliding_window == 0) row_bounds();

        // Warps whose 16 rows are all past the group only help with the copies.
        const bool active = warp * 16 < tile_rows;
        uint32_t qf[Cfg::Q_FRAGS][4];
        for (int t = 0; t < num_tiles; ++t) {
            if (t + STAGES - 1 < num_tiles) load_kv(t + STAGES - 1);
            // Always commit (possibly an empty group) so waiting for all but the newest
            // STAGES - 1 groups means "tile t has landed".
            cp_async_commit();
            cp_async_wait<STAGES - 1>();
            __syncthreads();
            if (active) {
                if (t == 0) load_q_fragments<T, D>(qf, sq_warp, lane);
                const int kv0 = kv_lo + t * BN;
                // Visible columns of each row within the tile: lo_c < col <= hi_c.
                int lo_c[2];
                int hi_c[2];
                bool row_needs_mask = false;
#pragma unroll
                for (int ri = 0; ri < 2; ++ri) {
                    lo_c[ri] = max(-1, min(BN, lo[ri] - 1 - kv0));
                    hi_c[ri] = max(-1, min(BN, hi[ri] - kv0));
                    row_needs_mask |= lo_c[ri] >= 0 || hi_c[ri] < BN - 1;
                }
                const bool masked = __any_sync(0xffffffffu, row_needs_mask);
                const int stage = t % STAGES;
                attend_tile<T, D>(st, qf, sq_warp, sk + stage * BN * STRIDE, sv + stage * BN * STRIDE, scale_log2,
                                  masked, lo_c, hi_c, lane);
            }
            // A later iteration's copies overwrite the stage this one read.
            __syncthreads();
        }

        // ---- store rows g and g + 8 of this warp: normalised output and (max, sum) ----
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
            const float sum = st.total_sum(ri);
            const int r = warp * 16 + g + ri * 8;
            if (r < tile_rows) {
                const int row = r0 + r;
                const size_t seq = static_cast<size_t>(first + row / group);
                const int head = kv_head * group + row % group;
                const size_t idx = (seq * num_heads + head) * num_slots + part;
                // Written even when empty (as zeros): the merge reads every slot unconditionally.
                const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
                float* dst = ws_o + idx * D;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    *reinterpret_cast<float2*>(dst + dt * 8 + tig * 2) =
                        make_float2(st.o[dt][ri * 2] * inv, st.o[dt][ri * 2 + 1] * inv);
                }
                if (tig == 0) {
                    ws_ml[2 * idx] = sum > 0.0f ? st.row_max[ri] : -INFINITY;
                    ws_ml[2 * idx + 1] = sum;
                }
            }
        }
        // The next row tile reuses the Q buffer and the shared key range.
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------
// Suffix pass. Grid: (suffix slots, num_kv_heads, num_seqs); block: SUFFIX_THREADS.
//
// Block (p, kv head, seq) covers share p of the sequence's own visible keys
// [max(prefix, window start), context_len), split evenly over the grid's partitions, for every
// query head of the KV head's GQA group, GC heads at a time. A key row of D elements is read by
// TPK = D/8 consecutive threads, one 16-byte pack each; each such key group keeps its own online
// softmax state over the keys it reads (no score buffer, no barrier in the key loop), and the
// block merges the key groups' states at the end. Slot prefix_slots + p of every head is written:
// the normalised output, or only (max -inf, sum 0) for an empty share.
template <typename T, int D, int GC>
__device__ __forceinline__ void suffix_pass(const T* __restrict__ q, const T* __restrict__ k_cache,
                                            const T* __restrict__ v_cache, const uint32_t* __restrict__ block_tables,
                                            const uint32_t* __restrict__ context_lens,
                                            const uint32_t* __restrict__ group_starts,
                                            const uint32_t* __restrict__ prefix_lens, float* __restrict__ ws_o,
                                            float* __restrict__ ws_ml, int num_groups, int num_heads, int num_kv_heads,
                                            int block_size_log2, int max_blocks_per_seq, float scale,
                                            int sliding_window, int num_slots, int prefix_slots) {
    constexpr int TPK = D / 8;
    constexpr int KPI = SUFFIX_THREADS / TPK;
    constexpr int STEP = KPI * SUFFIX_UNROLL;
    static_assert(TPK <= BRAID_WARP_SIZE && KPI >= 1, "a key row must fit one warp");

    __shared__ float partial[SUFFIX_WARPS][GC][D];
    __shared__ float warp_max[SUFFIX_WARPS][GC];
    __shared__ float warp_sum[SUFFIX_WARPS][GC];

    const int part = blockIdx.x;
    const int parts = gridDim.x;
    const int kv_head = blockIdx.y;
    const int seq = blockIdx.z;
    const int group = num_heads / num_kv_heads;
    const int capacity = max_blocks_per_seq << block_size_log2;
    const int block_size = 1 << block_size_log2;
    const int tid = threadIdx.x;
    const int warp = tid / BRAID_WARP_SIZE;
    const int lane = tid % BRAID_WARP_SIZE;
    const int lane_k = tid % TPK;
    const int key_group = tid / TPK;

    // Read before the block-wide group search, so the two loads overlap.
    const int len = static_cast<int>(min(context_lens[seq], static_cast<uint32_t>(capacity)));
    const int prefix = sequence_prefix(group_starts, prefix_lens, num_groups, prefix_slots, seq, capacity);
    const int start = len > 0 ? max(min(prefix, len), window_start(len - 1, sliding_window)) : 0;
    const int n = len - start;
    const int share = (n + parts - 1) / parts;
    const int begin = start + min(part * share, n);
    const int end = min(begin + share, len);

    const uint32_t* table = block_tables + static_cast<size_t>(seq) * max_blocks_per_seq;
    const size_t slot_stride = static_cast<size_t>(num_kv_heads) * D;
    const T* k_base = k_cache + static_cast<size_t>(kv_head) * D + lane_k * 8;
    const T* v_base = v_cache + static_cast<size_t>(kv_head) * D + lane_k * 8;
    const float q_scale = scale * LOG2E;

    for (int h0 = 0; h0 < group; h0 += GC) {
        float qf[GC][8];
#pragma unroll
        for (int c = 0; c < GC; ++c) {
            const int h = h0 + c;
            uint4 raw = make_uint4(0, 0, 0, 0);
            if (h < group) {
                raw = *reinterpret_cast<const uint4*>(
                    q + (static_cast<size_t>(seq) * num_heads + kv_head * group + h) * D + lane_k * 8);
            }
            unpack8(raw, qf[c], T());
#pragma unroll
            for (int e = 0; e < 8; ++e) qf[c][e] *= q_scale;
        }

        float m[GC];
        float l[GC];
        float acc[GC][8];
#pragma unroll
        for (int c = 0; c < GC; ++c) {
            m[c] = -INFINITY;
            l[c] = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[c][e] = 0.0f;
        }

        // Block ids of the next round to issue.
        uint32_t blocks[SUFFIX_UNROLL];
        auto load_blocks = [&](int base) {
#pragma unroll
            for (int u = 0; u < SUFFIX_UNROLL; ++u) {
                const int j = base + u * KPI + key_group;
                blocks[u] = j < end ? table[j >> block_size_log2] : 0u;
            }
        };
        auto issue = [&](uint4 (&kd)[SUFFIX_UNROLL], uint4 (&vd)[SUFFIX_UNROLL], int base) {
#pragma unroll
            for (int u = 0; u < SUFFIX_UNROLL; ++u) {
                const int j = base + u * KPI + key_group;
                if (j < end) {
                    const size_t slot = (static_cast<size_t>(blocks[u]) << block_size_log2) + (j & (block_size - 1));
                    kd[u] = load_stream(k_base + slot * slot_stride);
                    vd[u] = load_stream(v_base + slot * slot_stride);
                } else {
                    kd[u] = make_uint4(0, 0, 0, 0);
                    vd[u] = make_uint4(0, 0, 0, 0);
                }
            }
        };
        auto compute_round = [&](const uint4 (&kr)[SUFFIX_UNROLL], const uint4 (&vr)[SUFFIX_UNROLL], int base) {
            float s[GC][SUFFIX_UNROLL];
#pragma unroll
            for (int u = 0; u < SUFFIX_UNROLL; ++u) {
                const bool valid = base + u * KPI + key_group < end;
                float kf[8];
                unpack8(kr[u], kf, T());
#pragma unroll
                for (int c = 0; c < GC; ++c) {
                    float dot = 0.0f;
#pragma unroll
                    for (int e = 0; e < 8; ++e) dot = fmaf(qf[c][e], kf[e], dot);
#pragma unroll
                    for (int off = TPK / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
                    s[c][u] = valid ? dot : -INFINITY;
                }
            }
#pragma unroll
            for (int c = 0; c < GC; ++c) {
                float mx = m[c];
#pragma unroll
                for (int u = 0; u < SUFFIX_UNROLL; ++u) mx = fmaxf(mx, s[c][u]);
                // Nothing seen yet: exponentiate against 0 so the state stays exactly zero.
                const float ref = mx == -INFINITY ? 0.0f : mx;
                const float correction = fast_exp2(m[c] - ref);
                m[c] = mx;
                l[c] *= correction;
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[c][e] *= correction;
#pragma unroll
                for (int u = 0; u < SUFFIX_UNROLL; ++u) {
                    const float p = fast_exp2(s[c][u] - ref);
                    l[c] += p;
                    float vf[8];
                    unpack8(vr[u], vf, T());
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[c][e] = fmaf(p, vf[e], acc[c][e]);
                }
            }
        };
        // Round `base` is computed while round `base + STEP`'s loads are in flight, and the block
        // ids of the round after that are fetched, so the table lookups stay off the chain too.
        load_blocks(begin);
        uint4 kr[SUFFIX_UNROLL];
        uint4 vr[SUFFIX_UNROLL];
        issue(kr, vr, begin);
        load_blocks(begin + STEP);
        // The loop bounds are uniform across the block, so every lane reaches the shuffles.
        for (int base = begin; base < end; base += STEP) {
            uint4 kn[SUFFIX_UNROLL];
            uint4 vn[SUFFIX_UNROLL];
            issue(kn, vn, base + STEP);
            load_blocks(base + 2 * STEP);
            compute_round(kr, vr, base);
#pragma unroll
            for (int u = 0; u < SUFFIX_UNROLL; ++u) {
                kr[u] = kn[u];
                vr[u] = vn[u];
            }
        }

        // ---- merge the key groups: block max, rescale, sum within the warp, then across warps ----
#pragma unroll
        for (int c = 0; c < GC; ++c) {
            float mx = m[c];
#pragma unroll
            for (int off = TPK; off < BRAID_WARP_SIZE; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            if (lane == 0) warp_max[warp][c] = mx;
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < GC; ++c) {
            float block_max = -INFINITY;
#pragma unroll
            for (int w = 0; w < SUFFIX_WARPS; ++w) block_max = fmaxf(block_max, warp_max[w][c]);
            const float factor = m[c] == -INFINITY ? 0.0f : fast_exp2(m[c] - block_max);
            float sum = l[c] * factor;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[c][e] *= factor;
#pragma unroll
            for (int off = TPK; off < BRAID_WARP_SIZE; off <<= 1) {
                sum += __shfl_xor_sync(0xffffffffu, sum, off);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[c][e] += __shfl_xor_sync(0xffffffffu, acc[c][e], off);
            }
            if (lane < TPK) {
#pragma unroll
                for (int e = 0; e < 8; ++e) partial[warp][c][lane * 8 + e] = acc[c][e];
            }
            if (lane == 0) warp_sum[warp][c] = sum;
        }
        __syncthreads();
        for (int c = 0; c < GC && h0 + c < group; ++c) {
            float block_max = -INFINITY;
            float block_sum = 0.0f;
#pragma unroll
            for (int w = 0; w < SUFFIX_WARPS; ++w) {
                block_max = fmaxf(block_max, warp_max[w][c]);
                block_sum += warp_sum[w][c];
            }
            const size_t idx = (static_cast<size_t>(seq) * num_heads + kv_head * group + h0 + c) * num_slots +
                               prefix_slots + part;
            // Written even when empty (as zeros): the merge reads every slot unconditionally.
            const float inv = block_sum > 0.0f ? 1.0f / block_sum : 0.0f;
            for (int d = tid; d < D; d += SUFFIX_THREADS) {
                float o = 0.0f;
#pragma unroll
                for (int w = 0; w < SUFFIX_WARPS; ++w) o += partial[w][c][d];
                ws_o[idx * D + d] = o * inv;
            }
            if (tid == 0) {
                ws_ml[2 * idx] = block_sum > 0.0f ? block_max : -INFINITY;
                ws_ml[2 * idx + 1] = block_sum;
            }
        }
        // The next head chunk reuses the shared buffers.
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------
// Merge. Grid: (num_heads, num_seqs); block: MERGE_THREADS. For one (sequence, head):
// out = sum_s o_s * l_s * 2^(m_s - M) / sum_s l_s * 2^(m_s - M) over the slots with l_s > 0 (the
// prefix slots only when the sequence has a prefix), M the largest m_s; zero when no slot saw a
// key (a padding slot of context length 0). Every slot's output is written (zeros when empty), so
// the weighted sum reads all slots unconditionally and its loads pipeline.
template <typename T>
__device__ __forceinline__ void merge(const float* __restrict__ ws_o, const float* __restrict__ ws_ml,
                                      const uint32_t* __restrict__ context_lens,
                                      const uint32_t* __restrict__ group_starts,
                                      const uint32_t* __restrict__ prefix_lens, T* __restrict__ out, int num_groups,
                                      int head_dim, int num_slots, int prefix_slots, int capacity) {
    __shared__ float weights[MERGE_THREADS];
    __shared__ float shared_max;
    __shared__ float shared_inv_sum;
    const int head = blockIdx.x;
    const int seq = blockIdx.y;
    const int num_heads = gridDim.x;
    const int tid = threadIdx.x;
    T* o = out + (static_cast<size_t>(seq) * num_heads + head) * head_dim;
    if (context_lens[seq] == 0) {
        // A padding slot of a graph bucket: a defined (zero) output, whatever the workspace holds.
        for (int d = tid; d < head_dim; d += MERGE_THREADS) o[d] = from_float<T>(0.0f);
        return;
    }
    const int prefix = sequence_prefix(group_starts, prefix_lens, num_groups, prefix_slots, seq, capacity);
    const int first_slot = prefix > 0 ? 0 : prefix_slots;
    const size_t row = static_cast<size_t>(seq) * num_heads + head;
    const float* ml = ws_ml + 2 * row * num_slots;
    const float* parts = ws_o + row * num_slots * head_dim;

    if (tid < BRAID_WARP_SIZE) {
        float m = -INFINITY;
        for (int s = first_slot + tid; s < num_slots; s += BRAID_WARP_SIZE) {
            if (ml[2 * s + 1] > 0.0f) m = fmaxf(m, ml[2 * s]);
        }
#pragma unroll
        for (int off = BRAID_WARP_SIZE / 2; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
        float l = 0.0f;
        for (int s = first_slot + tid; s < num_slots; s += BRAID_WARP_SIZE) {
            const float ls = ml[2 * s + 1];
            if (ls > 0.0f) l += ls * fast_exp2(ml[2 * s] - m);
        }
        l = warp_reduce_sum(l);
        if (tid == 0) {
            shared_max = m;
            shared_inv_sum = l > 0.0f ? 1.0f / l : 0.0f;
        }
    }
    __syncthreads();
    const float m = shared_max;
    const float inv_sum = shared_inv_sum;
    // head_dim <= 256 = 2 * MERGE_THREADS: each thread owns at most two dimensions.
    float acc0 = 0.0f;
    float acc1 = 0.0f;
    const int d0 = tid;
    const int d1 = tid + MERGE_THREADS;
    for (int s0 = first_slot; s0 < num_slots; s0 += MERGE_THREADS) {
        const int s = s0 + tid;
        float w = 0.0f;
        if (s < num_slots) {
            const float ls = ml[2 * s + 1];
            if (ls > 0.0f) w = ls * fast_exp2(ml[2 * s] - m) * inv_sum;
        }
        weights[tid] = w;
        __syncthreads();
        const int count = min(MERGE_THREADS, num_slots - s0);
        const float* chunk = parts + static_cast<size_t>(s0) * head_dim;
        if (d0 < head_dim) {
#pragma unroll 8
            for (int i = 0; i < count; ++i) acc0 = fmaf(chunk[static_cast<size_t>(i) * head_dim + d0], weights[i], acc0);
        }
        if (d1 < head_dim) {
#pragma unroll 8
            for (int i = 0; i < count; ++i) acc1 = fmaf(chunk[static_cast<size_t>(i) * head_dim + d1], weights[i], acc1);
        }
        __syncthreads();
    }
    if (d0 < head_dim) o[d0] = from_float<T>(acc0);
    if (d1 < head_dim) o[d1] = from_float<T>(acc1);
}

}  // namespace attn_cascade
}  // namespace braid

#define BRAID_CASCADE_PASS_ARGS(T)                                                                       \
    const T *__restrict__ q, const T *__restrict__ k_cache, const T *__restrict__ v_cache,              \
        const uint32_t *__restrict__ block_tables, const uint32_t *__restrict__ context_lens,           \
        const uint32_t *__restrict__ group_starts, const uint32_t *__restrict__ prefix_lens,            \
        float *__restrict__ ws_o, float *__restrict__ ws_ml, int num_seqs, int num_groups,              \
        int num_heads, int num_kv_heads, int block_size_log2, int max_blocks_per_seq, float scale,       \
        int sliding_window, int num_slots, int prefix_slots

#define BRAID_DEFINE_CASCADE_PREFIX(T, SUFFIX, D)                                                       \
    extern "C" __global__ void __launch_bounds__(braid::attn_cascade::PREFIX_THREADS)                   \
        cascade_prefix_d##D##_##SUFFIX(BRAID_CASCADE_PASS_ARGS(T)) {                                     \
        (void)num_groups;                                                                               \
        (void)prefix_slots;                                                                             \
        braid::attn_cascade::prefix_pass<T, D>(q, k_cache, v_cache, block_tables, context_lens,         \
                                               group_starts, prefix_lens, ws_o, ws_ml, num_seqs,        \
                                               num_heads, num_kv_heads, block_size_log2,                \
                                               max_blocks_per_seq, scale, sliding_window, num_slots);   \
    }

#define BRAID_DEFINE_CASCADE_SUFFIX(T, SUFFIX, D, GC)                                                   \
    extern "C" __global__ void __launch_bounds__(braid::attn_cascade::SUFFIX_THREADS)                   \
        cascade_suffix_d##D##_g##GC##_##SUFFIX(BRAID_CASCADE_PASS_ARGS(T)) {                             \
        (void)num_seqs;                                                                                 \
        braid::attn_cascade::suffix_pass<T, D, GC>(q, k_cache, v_cache, block_tables, context_lens,     \
                                                   group_starts, prefix_lens, ws_o, ws_ml, num_groups,  \
                                                   num_heads, num_kv_heads, block_size_log2,            \
                                                   max_blocks_per_seq, scale, sliding_window,           \
                                                   num_slots, prefix_slots);                            \
    }

#define BRAID_DEFINE_CASCADE_HEAD_DIM(T, SUFFIX, D) \
    BRAID_DEFINE_CASCADE_PREFIX(T, SUFFIX, D)       \
    BRAID_DEFINE_CASCADE_SUFFIX(T, SUFFIX, D, 1)    \
    BRAID_DEFINE_CASCADE_SUFFIX(T, SUFFIX, D, 2)    \
    BRAID_DEFINE_CASCADE_SUFFIX(T, SUFFIX, D, 4)

#define BRAID_DEFINE_CASCADE_DTYPE(T, SUFFIX)                                                             \
    BRAID_DEFINE_CASCADE_HEAD_DIM(T, SUFFIX, 16)                                                          \
    BRAID_DEFINE_CASCADE_HEAD_DIM(T, SUFFIX, 32)                                                          \
    BRAID_DEFINE_CASCADE_HEAD_DIM(T, SUFFIX, 64)                                                          \
    BRAID_DEFINE_CASCADE_HEAD_DIM(T, SUFFIX, 128)                                                         \
    BRAID_DEFINE_CASCADE_HEAD_DIM(T, SUFFIX, 256)                                                         \
    extern "C" __global__ void __launch_bounds__(braid::attn_cascade::MERGE_THREADS)                      \
        cascade_merge_##SUFFIX(const float* __restrict__ ws_o, const float* __restrict__ ws_ml,           \
                               const uint32_t* __restrict__ context_lens,                                 \
                               const uint32_t* __restrict__ group_starts,                                 \
                               const uint32_t* __restrict__ prefix_lens, T* __restrict__ out,             \
                               int num_groups, int head_dim, int num_slots, int prefix_slots,             \
                               int capacity) {                                                            \
        braid::attn_cascade::merge<T>(ws_o, ws_ml, context_lens, group_starts, prefix_lens, out,          \
                                      num_groups, head_dim, num_slots, prefix_slots, capacity);           \
    }

BRAID_DEFINE_CASCADE_DTYPE(__half, f16)
BRAID_DEFINE_CASCADE_DTYPE(__nv_bfloat16, bf16)
