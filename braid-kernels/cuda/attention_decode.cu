// Paged attention for decode steps (one new query token per sequence), flash-decoding style, in
// one kernel: paged_attention_decode_d<D>_g<GC>_<dtype> computes one partition of a sequence's
// context for one KV head and every query head of its GQA group; when the context spans several
// partitions, each writes its partial result to the workspace and the block that finishes last
// combines them by log-sum-exp. Storage f16/bf16, f32 accumulation.
//
// Everything that changes between decode steps (context lengths, block tables) is read from
// device memory and the grid depends only on (num_seqs, num_kv_heads, partitions), so a launch
// can be captured into a CUDA graph and replayed. The arrival counters that elect the merging
// block live in the workspace and are left at zero for the next launch.
//
// The _rope variants also do rope.cu's work for their decode step: each block
// computes its GQA group's rotated (and q-normed) query heads from the raw QKV projection, and
// the block holding a sequence's last key computes that key (k-norm, RoPE) and value, writes
// them to the cache slot and uses them from shared memory. One kernel per layer fewer; the
// values are rounded exactly as rope.cu rounds them, so the output is the same bits.
//
// Launched with programmatic dependent launch: the next kernel may be scheduled as soon as every
// block has started, and no block reads or writes global memory before the previous kernel has
// finished.
#include "rope.cuh"

namespace braid {
namespace attn_decode {

// These two must match the constants of the same names in src/cuda/attention.rs.
constexpr int THREADS = 256;
constexpr int MAX_PARTITION = 512;
constexpr int WARPS = THREADS / BRAID_WARP_SIZE;
// Independent 16-byte loads a thread issues before using the first one: enough bytes in flight to
// cover DRAM latency even when a small batch leaves most SMs idle.
constexpr int UNROLL = 4;
constexpr float LOG2E = 1.4426950408889634f;
// Blocks per SM the register allocation must allow (64 registers a thread for 4, 80 for 3).
// The kernel spends much of each block's life outside its load rounds (staging the table,
// softmax, reductions, the merge), so more resident blocks keep more bytes in flight: at GC 2
// and head_dim 128 four blocks instead of three took an H100 from 2.32 to 2.60 TB/s at batch 64
// and from 2.75 to 2.87 TB/s at 256 (context 640, KERNELS.md "Residency"). The plain kernels fit 64 registers without
// spilling up to head_dim 128. The _rope variants hold the RoPE work's registers too: at 64 they
// spill a little, which costs latency-bound small batches ≈5%, so they keep three blocks, and
// _rope_wide (GC 2, head_dim ≤ 128, batches above DECODE_WIDE_BATCH in attention.rs)
// takes four.
constexpr int min_blocks(int gc, int d) { return gc == 1 ? 4 : gc == 2 ? (d <= 128 ? 4 : 3) : 1; }
constexpr int min_blocks_rope(int gc) { return gc == 1 ? 4 : gc == 2 ? 3 : 1; }
constexpr int MIN_BLOCKS_ROPE_WIDE = 4;

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

// Read-only, streamed once: bypass L1 allocation so the KV stream does not evict the block tables.
__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The visible key range of a sequence and which partitions intersect it. Every block of a
// (sequence, KV head) derives it from the same context length, so they agree on how many
// partials the merge waits for.
struct Span {
    int len;          // keys in the cache (clamped to the block table's capacity); 0: no query
    int win_start;    // first visible key
    int first_part;   // partitions [first_part, last_part] hold visible keys
    int last_part;
};

__device__ __forceinline__ Span sequence_span(const uint32_t* context_lens, int seq, int capacity,
                                              int partition_tokens, int sliding_window) {
    Span s;
    s.len = static_cast<int>(min(context_lens[seq], static_cast<uint32_t>(capacity)));
    s.win_start = (sliding_window > 0 && s.len > sliding_window) ? s.len - sliding_window : 0;
    s.first_part = s.win_start / partition_tokens;
    s.last_part = s.len > 0 ? (s.len - 1) / partition_tokens : -1;
    return s;
}

// The merge of a (sequence, KV head)'s partials, run by the block that arrived last: for each
// query head of the group, out = sum_p o_p * l_p * 2^(m_p - M) / sum_p l_p * 2^(m_p - M), with
// M the largest m_p. One thread per output element folds the partitions in one pass with a
// running maximum, so every load is independent of the others and the merge costs one L2 round
// trip. The partials were written by other blocks of this launch, so they are read through L2
// (ld.global.cg), never through the non-coherent path.
template <typename T, int D>
__device__ __forceinline__ void merge_partials(const float* ws_o, const float* ws_ml, T* __restrict__ out,
                                               const Span& span, int seq, int kv_head, int group, int num_heads,
                                               int num_partitions) {
    const size_t first_row = static_cast<size_t>(seq) * num_heads + static_cast<size_t>(kv_head) * group;
    for (int i = threadIdx.x; i < group * D; i += THREADS) {
        const size_t row = first_row + i / D;
        const int d = i % D;
        const float* ml = ws_ml + 2 * row * num_partitions;
        const float* parts = ws_o + row * num_partitions * D + d;
        float m = -INFINITY;
        float l = 0.0f;
        float acc = 0.0f;
#pragma unroll 4
        for (int p = span.first_part; p <= span.last_part; ++p) {
            const float m_p = __ldcg(ml + 2 * p);
            const float l_p = __ldcg(ml + 2 * p + 1);
            const float o_p = __ldcg(parts + static_cast<size_t>(p) * D);
            const float m_new = fmaxf(m, m_p);
            // 2^-inf = 0 drops the empty start; every partition here holds a key, so m_p is finite.
            const float keep = fast_exp2(m - m_new);
            const float w_p = l_p * fast_exp2(m_p - m_new);
            l = fmaf(l, keep, w_p);
            acc = fmaf(acc, keep, o_p * w_p);
            m = m_new;
        }
        out[row * D + d] = from_float<T>(acc / l);
    }
}

// Grid: (partitions, num_kv_heads, num_seqs); block: THREADS.
//
// A key row of D elements is read by TPK = D/8 consecutive threads, one 16-byte pack each, so a
// block covers KPI keys per step and every K/V byte is fetched once for the whole GQA group. The
// partition's scores stay in shared memory (at most MAX_PARTITION per head), which keeps the
// three passes (scores, softmax, weighted V sum) simple and the query in registers.
//
// Query heads are processed GC at a time (GC a compile-time power of two), so registers hold the
// GC query vectors and accumulators; groups larger than GC loop and re-read the partition's K/V,
// mostly from L2.
//
// When a sequence's visible keys fall in one partition (always so when `ws_o == nullptr`), that
// block writes the normalised output directly. Otherwise every block holding keys writes its
// normalised partial output and its (max, sum) in the log2 domain to the workspace, then counts
// itself in at the (sequence, KV head)'s counter; the last to arrive merges (merge_partials) and
// zeroes the counter. Blocks without visible keys neither write nor arrive: every block computes
// the same count of partitions that do.
template <typename T, int D, int GC, bool FUSED>
__device__ __forceinline__ void decode_partition(
    const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    const uint32_t* __restrict__ block_tables, const uint32_t* __restrict__ context_lens,
    T* __restrict__ out, float* __restrict__ ws_o, float* __restrict__ ws_ml,
    unsigned int* __restrict__ counters, int num_heads, int num_kv_heads, int block_size_log2,
    int max_blocks_per_seq, int partition_tokens, float scale, int sliding_window, const T* __restrict__ qkv,
    const uint32_t* __restrict__ positions, const uint32_t* __restrict__ slots, const float* __restrict__ inv_freq,
    const T* __restrict__ q_norm, const T* __restrict__ k_norm, float eps, unsigned long long num_slots) {
    constexpr int TPK = D / 8;
    constexpr int KPI = THREADS / TPK;

    __shared__ float scores[GC][MAX_PARTITION];
    __shared__ float partial[WARPS][D];
    __shared__ float row_max[GC];
    __shared__ float row_sum[GC];
    __shared__ uint32_t part_blocks[MAX_PARTITION];
    __shared__ bool merges;
    // With `qkv`: this pass's rotated query heads, and the new key and value (see the top).
    __shared__ __align__(16) T q_stage[GC][D];
    __shared__ __align__(16) T fresh[2][D];

    const int part = blockIdx.x;
    const int kv_head = blockIdx.y;
    const int seq = blockIdx.z;
    const int num_partitions = gridDim.x;
    const int group = num_heads / num_kv_heads;
    const int block_size = 1 << block_size_log2;
    const int capacity = max_blocks_per_seq << block_size_log2;
    allow_next_launch();
    // While the previous kernel finishes, pull this block's context length and first table
    // entries into L2. A prefetch returns no data, so it is safe whoever writes these lines.
    if (threadIdx.x == 0) prefetch_l2(context_lens + seq);
    if (threadIdx.x == 1) prefetch_l2(block_tables + static_cast<size_t>(seq) * max_blocks_per_seq);
    // Everything below reads or writes what earlier kernels may still be producing or reading.
    wait_for_previous();
    const Span span = sequence_span(context_lens, seq, capacity, partition_tokens, sliding_window);
    const int tid = threadIdx.x;
    const int warp = tid / BRAID_WARP_SIZE;
    const int lane = tid % BRAID_WARP_SIZE;

    if (span.len == 0) {
        // A padding slot of a graph bucket: give it a defined (zero) output.
        if (part == 0) {
            for (int i = tid; i < group * D; i += THREADS) {
                out[(static_cast<size_t>(seq) * num_heads + kv_head * group) * D + i] = from_float<T>(0.0f);
            }
        }
        return;
    }
    if (part < span.first_part || part > span.last_part) return;
    const int arrivals = span.last_part - span.first_part + 1;
    const bool direct = ws_o == nullptr || arrivals == 1;

    const int begin = max(part * partition_tokens, span.win_start);
    const int end = min((part + 1) * partition_tokens, span.len);
    const int n = end - begin;

    const int lane_k = tid % TPK;
    const int key_group = tid / TPK;
    const size_t slot_stride = static_cast<size_t>(num_kv_heads) * D;
    const T* k_base = k_cache + static_cast<size_t>(kv_head) * D + lane_k * 8;
    const T* v_base = v_cache + static_cast<size_t>(kv_head) * D + lane_k * 8;
    const float q_scale = scale * LOG2E;
    constexpr int STEP = KPI * UNROLL;

    // The rope work of a fused launch. Query heads h0 .. h0+GC-1 go to q_stage (warp c takes
    // head h0 + c); with `with_kv` two more warp items compute the new key and value into
    // `fresh`. Every item is warp-uniform, as rope_head_d requires. The caller synchronises.
    constexpr bool fused = FUSED;
    const bool writes_kv = fused && part == span.last_part;
    const T* qkv_row = fused ? qkv + static_cast<size_t>(seq) * (num_heads + 2 * num_kv_heads) * D : nullptr;
    const float pos = fused ? static_cast<float>(positions[seq]) : 0.0f;
    auto rope_stage = [&](int h0, bool with_kv) {
        const int items = GC + (with_kv ? 2 : 0);
        for (int item = warp; item < items; item += WARPS) {
            if (item < GC) {
                if (h0 + item < group) {
                    rope_head_d<T, D>(qkv_row + static_cast<size_t>(kv_head * group + h0 + item) * D,
                                      q_stage[item], q_norm, inv_freq, pos, eps, true);
                }
            } else {
                const bool is_v = item == GC + 1;
                const int head = num_heads + (is_v ? num_kv_heads : 0) + kv_head;
                rope_head_d<T, D>(qkv_row + static_cast<size_t>(head) * D, fresh[is_v ? 1 : 0],
                                  is_v ? nullptr : k_norm, inv_freq, pos, eps, !is_v);
            }
        }
    };

    // Query packs of heads h0 .. h0+GC-1 (zeros past the group), as raw 16-byte loads so they
    // travel alongside the block-table loads below; from q_stage when fused.
    auto load_q = [&](int h0, uint4 (&raw)[GC]) {
#pragma unroll
        for (int c = 0; c < GC; ++c) {
            const int h = h0 + c;
            const T* src = fused ? q_stage[c]
                                 : q + (static_cast<size_t>(seq) * num_heads + kv_head * group + h) * D;
            raw[c] = h < group ? *reinterpret_cast<const uint4*>(src + lane_k * 8) : make_uint4(0, 0, 0, 0);
        }
    };
    if (fused) rope_stage(0, writes_kv);
    uint4 q_raw[GC];
    if (!fused) load_q(0, q_raw);

    // The partition's block ids, staged once: every K and V row address derives from them.
    const int first_block = begin >> block_size_log2;
    const int last_block = (end - 1) >> block_size_log2;
    const uint32_t* table = block_tables + static_cast<size_t>(seq) * max_blocks_per_seq;
    for (int b = tid; b <= last_block - first_block; b += THREADS) part_blocks[b] = table[first_block + b];
    __syncthreads();
    if (fused) load_q(0, q_raw);
    // The new key's row comes from `fresh`; the cache gets it for later steps (the kernels read
    // the cache through the non-coherent path, so no block of this launch reads it back). A
    // padding marker or an out-of-range slot skips the write, as in rope.cu.
    const int fresh_key = writes_kv ? span.len - 1 : -1;
    if (writes_kv) {
        const uint32_t slot = slots[seq];
        if (slot != ROPE_SKIP_SLOT && slot < num_slots) {
            const size_t at = (static_cast<size_t>(slot) * num_kv_heads + kv_head) * D;
            for (int i = tid; i < 2 * D / 8; i += THREADS) {
                const int which = i / (D / 8);
                T* cache = const_cast<T*>(which == 0 ? k_cache : v_cache);
                *reinterpret_cast<uint4*>(cache + at + (i % (D / 8)) * 8) =
                    *reinterpret_cast<const uint4*>(fresh[which] + (i % (D / 8)) * 8);
            }
        }
    }

    // One round: UNROLL rows per thread, KPI rows apart; rows past the partition read nothing.
    auto load_round = [&](const T* base_ptr, const T* fresh_row, int base, uint4 (&r)[UNROLL]) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int i = base + u * KPI + key_group;
            if (i < n) {
                const int j = begin + i;
                const size_t slot =
                    (static_cast<size_t>(part_blocks[(j >> block_size_log2) - first_block]) << block_size_log2) +
                    (j & (block_size - 1));
                if constexpr (FUSED) {
                    r[u] = j == fresh_key ? *reinterpret_cast<const uint4*>(fresh_row + lane_k * 8)
                                          : load_stream(base_ptr + slot * slot_stride);
                } else {
                    r[u] = load_stream(base_ptr + slot * slot_stride);
                }
            } else {
                r[u] = make_uint4(0, 0, 0, 0);
            }
        }
    };

    for (int h0 = 0; h0 < group; h0 += GC) {
        // ---- scores: s[c][i] = (q_c . k_i) * scale * log2(e) ----
        if (h0 > 0) {
            // The previous pass ended with a barrier, so q_stage is free.
            if (fused) {
                rope_stage(h0, false);
                __syncthreads();
            }
            load_q(h0, q_raw);
        }
        uint4 kr[UNROLL];
        load_round(k_base, fresh[0], 0, kr);
        float qr[GC][8];
#pragma unroll
        for (int c = 0; c < GC; ++c) {
            unpack8(q_raw[c], qr[c], T());
#pragma unroll
            for (int e = 0; e < 8; ++e) qr[c][e] *= q_scale;
        }

        // The step is uniform across the block so every lane reaches the shuffles below. Loads
        // are not double-buffered across rounds: the extra registers cost more occupancy than the
        // overlap gains (measured on an H100).
        for (int base = 0; base < n; base += STEP) {
            if (base > 0) load_round(k_base, fresh[0], base, kr);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int i = base + u * KPI + key_group;
                float kf[8];
                unpack8(kr[u], kf, T());
#pragma unroll
                for (int c = 0; c < GC; ++c) {
                    float s = 0.0f;
#pragma unroll
                    for (int e = 0; e < 8; ++e) s = fmaf(qr[c][e], kf[e], s);
#pragma unroll
                    for (int off = TPK / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
                    if (lane_k == 0 && i < n) scores[c][i] = s;
                }
            }
        }

        // V's first round flies while the softmax runs.
        uint4 vr[UNROLL];
        load_round(v_base, fresh[1], 0, vr);
        __syncthreads();

        // ---- softmax over the partition, one warp per head ----
        for (int c = warp; c < GC; c += WARPS) {
            if (h0 + c >= group) continue;
            float m = -INFINITY;
            for (int i = lane; i < n; i += BRAID_WARP_SIZE) m = fmaxf(m, scores[c][i]);
#pragma unroll
            for (int off = BRAID_WARP_SIZE / 2; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
            float sum = 0.0f;
            for (int i = lane; i < n; i += BRAID_WARP_SIZE) {
                const float p = fast_exp2(scores[c][i] - m);
                scores[c][i] = p;
                sum += p;
            }
            sum = warp_reduce_sum(sum);
            if (lane == 0) {
                row_max[c] = m;
                row_sum[c] = sum;
            }
        }
        __syncthreads();

        // ---- weighted sum of V rows ----
        float acc[GC][8];
#pragma unroll
        for (int c = 0; c < GC; ++c)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[c][e] = 0.0f;

        for (int base = 0; base < n; base += STEP) {
            if (base > 0) load_round(v_base, fresh[1], base, vr);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int i = base + u * KPI + key_group;
                if (i < n) {
                    float vf[8];
                    unpack8(vr[u], vf, T());
#pragma unroll
                    for (int c = 0; c < GC; ++c) {
                        if (h0 + c < group) {
                            const float p = scores[c][i];
#pragma unroll
                            for (int e = 0; e < 8; ++e) acc[c][e] = fmaf(p, vf[e], acc[c][e]);
                        }
                    }
                }
            }
        }

        // Lanes holding the same 8 dims of different keys: fold within the warp, then across warps.
#pragma unroll
        for (int c = 0; c < GC; ++c)
#pragma unroll
            for (int e = 0; e < 8; ++e)
#pragma unroll
                for (int off = TPK; off < BRAID_WARP_SIZE; off <<= 1)
                    acc[c][e] += __shfl_xor_sync(0xffffffffu, acc[c][e], off);

#pragma unroll
        for (int c = 0; c < GC; ++c) {
            if (h0 + c >= group) break;
            if (lane < TPK) {
#pragma unroll
                for (int e = 0; e < 8; ++e) partial[warp][lane * 8 + e] = acc[c][e];
            }
            __syncthreads();
            const int head = kv_head * group + h0 + c;
            for (int d = tid; d < D; d += THREADS) {
                float o = 0.0f;
#pragma unroll
                for (int w = 0; w < WARPS; ++w) o += partial[w][d];
                o /= row_sum[c];
                if (direct) {
                    out[(static_cast<size_t>(seq) * num_heads + head) * D + d] = from_float<T>(o);
                } else {
                    ws_o[((static_cast<size_t>(seq) * num_heads + head) * num_partitions + part) * D + d] = o;
                }
            }
            if (!direct && tid == 0) {
                const size_t idx = (static_cast<size_t>(seq) * num_heads + head) * num_partitions + part;
                ws_ml[2 * idx] = row_max[c];
                ws_ml[2 * idx + 1] = row_sum[c];
            }
            __syncthreads();
        }
    }
    if (direct) return;

    // Publish this block's partials before counting it in: the barrier orders every thread's
    // stores before thread 0's fence, which is cumulative, then its atomic (the pattern of a
    // cooperative grid barrier). The last block to arrive merges.
    __syncthreads();
    unsigned int* counter = counters + static_cast<size_t>(seq) * num_kv_heads + kv_head;
    if (tid == 0) {
        __threadfence();
        const unsigned int before = atomicAdd(counter, 1u);
        merges = before == static_cast<unsigned int>(arrivals - 1);
        if (merges) {
            // Every block of this (sequence, KV head) has arrived: zero the counter for the next
            // launch, and order the partials' reads below after the arrivals.
            atomicExch(counter, 0u);
            __threadfence();
        }
    }
    __syncthreads();
    if (!merges) return;
    merge_partials<T, D>(ws_o, ws_ml, out, span, seq, kv_head, group, num_heads, num_partitions);
}

}  // namespace attn_decode
}  // namespace braid

#define BRAID_DECODE_ARGS(T)                                                                            \
    const T *__restrict__ q, const T *__restrict__ k_cache, const T *__restrict__ v_cache,             \
        const uint32_t *__restrict__ block_tables, const uint32_t *__restrict__ context_lens,          \
        T *__restrict__ out, float *__restrict__ ws_o, float *__restrict__ ws_ml,                        \
        unsigned int *__restrict__ counters, int num_heads, int num_kv_heads, int block_size_log2,       \
        int max_blocks_per_seq, int partition_tokens, float scale, int sliding_window, const T *__restrict__ qkv, \
        const uint32_t *__restrict__ positions, const uint32_t *__restrict__ slots,                      \
        const float *__restrict__ inv_freq, const T *__restrict__ q_norm, const T *__restrict__ k_norm,  \
        float eps, unsigned long long num_slots

// paged_attention_decode_*: q given rotated; paged_attention_decode_rope{,_wide}_*: the RoPE
// step folded in (qkv and the rope arguments read, q ignored), at two residencies (see
// min_blocks). Separate instantiations, so the plain kernel's inner loops carry nothing of the
// fold.
#define BRAID_DEFINE_DECODE_VARIANT(T, SUFFIX, D, GC, NAME, FUSED, MIN_BLOCKS)                       \
    extern "C" __global__ void __launch_bounds__(braid::attn_decode::THREADS, MIN_BLOCKS)              \
        NAME##_d##D##_g##GC##_##SUFFIX(BRAID_DECODE_ARGS(T)) {                                          \
        braid::attn_decode::decode_partition<T, D, GC, FUSED>(                                         \
            q, k_cache, v_cache, block_tables, context_lens, out, ws_o, ws_ml, counters, num_heads,     \
            num_kv_heads, block_size_log2, max_blocks_per_seq, partition_tokens, scale, sliding_window, \
            qkv, positions, slots, inv_freq, q_norm, k_norm, eps, num_slots);                           \
    }

#define BRAID_DEFINE_DECODE_KERNEL(T, SUFFIX, D, GC)                                                 \
    BRAID_DEFINE_DECODE_VARIANT(T, SUFFIX, D, GC, paged_attention_decode, false,                     \
                                braid::attn_decode::min_blocks(GC, D))                               \
    BRAID_DEFINE_DECODE_VARIANT(T, SUFFIX, D, GC, paged_attention_decode_rope, true,                 \
                                braid::attn_decode::min_blocks_rope(GC))

#define BRAID_DEFINE_DECODE_GROUPS(T, SUFFIX, D)                                                    \
    BRAID_DEFINE_DECODE_KERNEL(T, SUFFIX, D, 1)                                                     \
    BRAID_DEFINE_DECODE_KERNEL(T, SUFFIX, D, 2)                                                     \
    BRAID_DEFINE_DECODE_KERNEL(T, SUFFIX, D, 4)                                                     \
    BRAID_DEFINE_DECODE_KERNEL(T, SUFFIX, D, 8)

// The wide-batch fold exists where it differs from the narrow one: GC 2 up to head_dim 128.
#define BRAID_DEFINE_DECODE_ROPE_WIDE(T, SUFFIX, D)                                                 \
    BRAID_DEFINE_DECODE_VARIANT(T, SUFFIX, D, 2, paged_attention_decode_rope_wide, true,            \
                                braid::attn_decode::MIN_BLOCKS_ROPE_WIDE)

#define BRAID_DEFINE_DECODE_DTYPE(T, SUFFIX)                                                           \
    BRAID_DEFINE_DECODE_GROUPS(T, SUFFIX, 16)                                                          \
    BRAID_DEFINE_DECODE_GROUPS(T, SUFFIX, 32)                                                          \
    BRAID_DEFINE_DECODE_GROUPS(T, SUFFIX, 64)                                                          \
    BRAID_DEFINE_DECODE_GROUPS(T, SUFFIX, 128)                                                         \
    BRAID_DEFINE_DECODE_GROUPS(T, SUFFIX, 256)                                                         \
    BRAID_DEFINE_DECODE_ROPE_WIDE(T, SUFFIX, 16)                                                       \
    BRAID_DEFINE_DECODE_ROPE_WIDE(T, SUFFIX, 32)                                                       \
    BRAID_DEFINE_DECODE_ROPE_WIDE(T, SUFFIX, 64)                                                       \
    BRAID_DEFINE_DECODE_ROPE_WIDE(T, SUFFIX, 128)

BRAID_DEFINE_DECODE_DTYPE(__half, f16)
BRAID_DEFINE_DECODE_DTYPE(__nv_bfloat16, bf16)
