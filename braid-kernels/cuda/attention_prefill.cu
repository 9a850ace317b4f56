// Paged attention for prefill (a variable-length batch of several query tokens per sequence),
// flash-attention style: paged_attention_prefill_d<D>_<dtype>. Q/K/V tiles in shared memory,
// S = QK^T and O += PV on the tensor cores (mma.sync m16n8k16, f32 accumulation), online softmax
// in registers; no score matrix ever reaches global memory. Causal mask, sliding window, GQA.
#include "attention_mma.cuh"

namespace braid {
namespace attn_prefill {

using namespace attn_mma;

// These must match the constants of the same names in src/cuda/attention.rs.
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * BRAID_WARP_SIZE;
// Each warp owns 16 query rows (the m of one mma tile).
constexpr int BM = WARPS * 16;

// Grid: (query tiles of BM rows over max_q_len × splits, num_heads, num_seqs); block: THREADS;
// dynamic shared memory: (BM + 4 * BN) * STRIDE elements (Q, then K and V in two stages each).
//
// Query i of a sequence (0-based among its q_len new tokens) sits at absolute position
// ctx - q_len + i and sees keys j with max(0, pos - w + 1) <= j <= pos (w = 0: no window).
// Query tiles are walked in reverse so the causal tiles with the most work start first.
//
// Split KV: a few new tokens over a long cached context (the next turn of a conversation) make
// only a few query tiles, too few blocks for the GPU. With splits > 1 the key tiles of each query
// tile are cut into `splits` contiguous ranges, one block each; a block stores its rows'
// unnormalised output and softmax state (max in the log2 domain, sum) as f32 partials
// [split][total_q][num_heads] and prefill_merge combines them. splits == 1 writes `out` directly.
template <typename T, int D>
__device__ __forceinline__ void prefill(const T* __restrict__ q, const T* __restrict__ k_cache,
                                        const T* __restrict__ v_cache, const uint32_t* __restrict__ block_tables,
                                        const uint32_t* __restrict__ q_starts,
                                        const uint32_t* __restrict__ context_lens, T* __restrict__ out,
                                        float* __restrict__ partial_o, float* __restrict__ partial_ml,
                                        int splits, int total_q, int num_heads, int num_kv_heads,
                                        int block_size_log2, int max_blocks_per_seq, float scale,
                                        int sliding_window) {
    using Cfg = Tile<D>;
    constexpr int BN = Cfg::BN;
    constexpr int STRIDE = Cfg::STRIDE;
    constexpr int CHUNKS = Cfg::CHUNKS;
    static_assert((BM * CHUNKS) % THREADS == 0 && (BN * CHUNKS) % THREADS == 0, "tile loads must divide evenly");

    extern __shared__ uint4 smem_raw[];
    T* const sq = reinterpret_cast<T*>(smem_raw);
    T* const sk = sq + BM * STRIDE;
    T* const sv = sk + 2 * BN * STRIDE;

    const int split = blockIdx.x % splits;
    const int q_tile = gridDim.x / splits - 1 - blockIdx.x / splits;
    const int head = blockIdx.y;
    const int seq = blockIdx.z;
    const uint32_t q_first = q_starts[seq];
    const uint32_t q_next = min(q_starts[seq + 1], static_cast<uint32_t>(total_q));
    if (q_next <= q_first) return;
    const int q_len = static_cast<int>(q_next - q_first);
    const int i0 = q_tile * BM;
    if (i0 >= q_len) return;
    const int rows = min(BM, q_len - i0);

    const int tid = threadIdx.x;
    const int warp = tid / BRAID_WARP_SIZE;
    const int lane = tid % BRAID_WARP_SIZE;
    const int kv_head = head / (num_heads / num_kv_heads);
    const int block_size = 1 << block_size_log2;
    const long long capacity = static_cast<long long>(max_blocks_per_seq) << block_size_log2;
    const long long window = sliding_window;
    // 64-bit positions: a context length below q_len (an invalid input) must give empty rows, not
    // overflow.
    const long long pos_first = static_cast<long long>(context_lens[seq]) - q_len + i0;
    const long long pos_last_valid = pos_first + rows - 1;
    const long long pos_last_tile = pos_first + BM - 1;
    const long long kv_lo = window > 0 ? max(0LL, pos_first - window + 1) : 0LL;
    const long long kv_hi = min(pos_last_valid + 1, capacity);
    const int all_tiles = kv_hi > kv_lo ? static_cast<int>((kv_hi - kv_lo + BN - 1) / BN) : 0;
    // This block's key tiles: [first_tile, num_tiles).
    const int per_split = (all_tiles + splits - 1) / splits;
    const int first_tile = min(all_tiles, split * per_split);
    const int num_tiles = min(all_tiles, first_tile + per_split);

    const size_t q_row_stride = static_cast<size_t>(num_heads) * D;
    const uint32_t* table = block_tables + static_cast<size_t>(seq) * max_blocks_per_seq;

    auto load_kv = [&](int tile, int stage) {
        const long long kv0 = kv_lo + static_cast<long long>(tile) * BN;
        T* dk = sk + stage * BN * STRIDE;
        T* dv = sv + stage * BN * STRIDE;
#pragma unroll
        for (int it = 0; it < BN * CHUNKS / THREADS; ++it) {
            const int idx = tid + it * THREADS;
            const int r = idx / CHUNKS;
            const int c = idx % CHUNKS;
            const long long j = kv0 + r;
            const bool valid = j < kv_hi;
            size_t offset = 0;
            if (valid) {
                const int jj = static_cast<int>(j);
                const size_t slot = (static_cast<size_t>(table[jj >> block_size_log2]) << block_size_log2) +
                                    (jj & (block_size - 1));
                offset = (slot * num_kv_heads + kv_head) * D + c * 8;
            }
            cp_async16(dk + r * STRIDE + c * 8, k_cache + offset, valid);
            cp_async16(dv + r * STRIDE + c * 8, v_cache + offset, valid);
        }
    };

    WarpRows<D> st;
    st.init();
    const int g = lane / 4;
    const int tig = lane % 4;
    const float scale_log2 = scale * LOG2E;

    if (num_tiles > first_tile) {
#pragma unroll
        for (int it = 0; it < BM * CHUNKS / THREADS; ++it) {
            const int idx = tid + it * THREADS;
            const int r = idx / CHUNKS;
            const int c = idx % CHUNKS;
            const bool valid = r < rows;
            const size_t offset = valid ? (q_first + i0 + r) * q_row_stride + head * D + c * 8 : 0;
            cp_async16(sq + r * STRIDE + c * 8, q + offset, valid);
        }
        load_kv(first_tile, 0);
        cp_async_commit();
    }

    const T* sq_warp = sq + warp * 16 * STRIDE;
    uint32_t qf[Cfg::Q_FRAGS][4];

    for (int t = first_tile; t < num_tiles; ++t) {
        const int stage = (t - first_tile) & 1;
        if (t + 1 < num_tiles) load_kv(t + 1, stage ^ 1);
        // Always commit (possibly an empty group) so wait_group<1> means "tile t has landed".
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        if (t == first_tile) load_q_fragments<T, D>(qf, sq_warp, lane);

        // ---- mask: only tiles that cross the diagonal, the window edge or the end ----
        const long long kv0 = kv_lo + static_cast<long long>(t) * BN;
        const bool needs_mask = kv0 + BN > kv_hi || kv0 + BN - 1 > pos_first ||
                                (window > 0 && kv0 <= pos_last_tile - window);
        int lo_c[2] = {-1, -1};
        int hi_c[2] = {BN, BN};
        if (needs_mask) {
#pragma unroll
            for (int ri = 0; ri < 2; ++ri) {
                const long long pos = pos_first + warp * 16 + g + ri * 8;
                // Visible columns of this row within the tile: lo < col <= hi.
                const long long hi = min(pos, kv_hi - 1) - kv0;
                const long long lo = window > 0 ? pos - window - kv0 : -1LL;
                hi_c[ri] = static_cast<int>(max(-1LL, min(static_cast<long long>(BN), hi)));
                lo_c[ri] = static_cast<int>(max(-1LL, min(static_cast<long long>(BN), lo)));
            }
        }
        attend_tile<T, D>(st, qf, sq_warp, sk + stage * BN * STRIDE, sv + stage * BN * STRIDE, scale_log2,
                          needs_mask, lo_c, hi_c, lane);
        // The next iteration's copies overwrite the stage this one read.
        __syncthreads();
    }

    if (splits > 1) {
        // ---- partials of rows g and g + 8: output unnormalised, then (max, sum) ----
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
            const float sum = st.total_sum(ri);
            const int r = warp * 16 + g + ri * 8;
            if (r >= rows) continue;
            const size_t unit = (static_cast<size_t>(split) * total_q + q_first + i0 + r) * num_heads + head;
            float* dst = partial_o + unit * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                *reinterpret_cast<float2*>(dst + dt * 8 + tig * 2) = make_float2(st.o[dt][ri * 2], st.o[dt][ri * 2 + 1]);
            }
            if (tig == 0) *reinterpret_cast<float2*>(partial_ml + unit * 2) = make_float2(st.row_max[ri], sum);
        }
        return;
    }

    // ---- normalise and store rows g and g + 8 ----
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
        const float sum = st.total_sum(ri);
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        const int r = warp * 16 + g + ri * 8;
        if (r < rows) {
            T* dst = out + (q_first + i0 + r) * q_row_stride + head * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                *reinterpret_cast<uint32_t*>(dst + dt * 8 + tig * 2) =
                    pack2(st.o[dt][ri * 2] * inv, st.o[dt][ri * 2 + 1] * inv, T());
            }
        }
    }
}

// Combines the split partials of every (query row, head): out = Σ o_s 2^(m_s - m) / Σ l_s 2^(m_s - m)
// with m the largest m_s; rows no split saw anything of come out as zeros, as without splits.
// Grid: total_q * num_heads blocks of D threads, one output element each.
template <typename T, int D>
__device__ __forceinline__ void prefill_merge(const float* __restrict__ partial_o,
                                              const float* __restrict__ partial_ml, T* __restrict__ out,
                                              int splits, int total_q, int num_heads) {
    const size_t unit = blockIdx.x;
    const size_t units = static_cast<size_t>(total_q) * num_heads;
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, partial_ml[(s * units + unit) * 2]);
    const float ref = m == -INFINITY ? 0.0f : m;
    float sum = 0.0f, acc = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const size_t u = s * units + unit;
        const float w = exp2f(partial_ml[u * 2] - ref);
        sum += partial_ml[u * 2 + 1] * w;
        acc += partial_o[u * D + threadIdx.x] * w;
    }
    out[unit * D + threadIdx.x] = from_float<T>(sum > 0.0f ? acc / sum : 0.0f);
}

}  // namespace attn_prefill
}  // namespace braid

#define BRAID_DEFINE_PREFILL_KERNEL(T, SUFFIX, D)                                                        \
    extern "C" __global__ void __launch_bounds__(braid::attn_prefill::THREADS)                           \
        paged_attention_prefill_d##D##_##SUFFIX(                                                         \
            const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,       \
            const uint32_t* __restrict__ block_tables, const uint32_t* __restrict__ q_starts,            \
            const uint32_t* __restrict__ context_lens, T* __restrict__ out, float* __restrict__ partial_o, \
            float* __restrict__ partial_ml, int splits, int total_q, int num_heads, int num_kv_heads,    \
            int block_size_log2, int max_blocks_per_seq, float scale, int sliding_window) {              \
        braid::attn_prefill::prefill<T, D>(q, k_cache, v_cache, block_tables, q_starts, context_lens,    \
                                           out, partial_o, partial_ml, splits, total_q, num_heads,       \
                                           num_kv_heads, block_size_log2, max_blocks_per_seq, scale,     \
                                           sliding_window);                                              \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(D) paged_attention_prefill_merge_d##D##_##SUFFIX(       \
        const float* __restrict__ partial_o, const float* __restrict__ partial_ml, T* __restrict__ out,  \
        int splits, int total_q, int num_heads) {                                                        \
        braid::attn_prefill::prefill_merge<T, D>(partial_o, partial_ml, out, splits, total_q, num_heads); \
    }

#define BRAID_DEFINE_PREFILL_DTYPE(T, SUFFIX)      \
    BRAID_DEFINE_PREFILL_KERNEL(T, SUFFIX, 16)     \
    BRAID_DEFINE_PREFILL_KERNEL(T, SUFFIX, 32)     \
    BRAID_DEFINE_PREFILL_KERNEL(T, SUFFIX, 64)     \
    BRAID_DEFINE_PREFILL_KERNEL(T, SUFFIX, 128)    \
    BRAID_DEFINE_PREFILL_KERNEL(T, SUFFIX, 256)

BRAID_DEFINE_PREFILL_DTYPE(__half, f16)
BRAID_DEFINE_PREFILL_DTYPE(__nv_bfloat16, bf16)
