// Paged attention for prefill (a variable-length batch of several query tokens per sequence),
// flash-attention style: paged_attention_prefill_d<D>_<dtype>. Q/K/V tiles in shared memory,
// S = QK^T and O += PV on the tensor cores (mma.sync m16n8k16, f32 accumulation), online softmax
// in registers; no score matrix ever reaches global memory. Causal mask, sliding window, GQA.
#include "common.cuh"

namespace braid {
namespace attn_prefill {

// These must match the constants of the same names in src/cuda/attention.rs.
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * BRAID_WARP_SIZE;
// Each warp owns 16 query rows (the m of one mma tile).
constexpr int BM = WARPS * 16;
constexpr float LOG2E = 1.4426950408889634f;

template <int D>
struct Tile {
    // Keys per K/V tile: 64, or 32 at D = 256 so the output accumulators (D/2 floats per thread)
    // still fit the register file next to the scores.
    static constexpr int BN = D <= 128 ? 64 : 32;
    // One 16-byte pad per row: ldmatrix reads 8 rows at the same column, and with the pad those
    // rows start in 8 different bank groups, for every head_dim.
    static constexpr int STRIDE = D + 8;
    static constexpr int CHUNKS = D / 8;
    // At D = 256 the query fragments would take 64 more registers; they are re-read from shared
    // memory instead.
    static constexpr bool Q_IN_REGS = D <= 128;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes global -> shared without passing through registers; a `valid == false` copy
// reads nothing and zero-fills, which is how rows past the end of a sequence become zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    const int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_size)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                    __nv_bfloat16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded into one register, the lower column in the low half (the mma operand order).
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Grid: (query tiles of BM rows over max_q_len, num_heads, num_seqs); block: THREADS; dynamic
// shared memory: (BM + 4 * BN) * STRIDE elements (Q, then K and V in two stages each).
//
// Query i of a sequence (0-based among its q_len new tokens) sits at absolute position
// ctx - q_len + i and sees keys j with max(0, pos - w + 1) <= j <= pos (w = 0: no window).
// Tiles are walked in reverse so the causal tiles with the most work start first.
template <typename T, int D>
__device__ __forceinline__ void prefill(const T* __restrict__ q, const T* __restrict__ k_cache,
                                        const T* __restrict__ v_cache, const uint32_t* __restrict__ block_tables,
                                        const uint32_t* __restrict__ q_starts,
                                        const uint32_t* __restrict__ context_lens, T* __restrict__ out,
                                        int total_q, int num_heads, int num_kv_heads, int block_size_log2,
                                        int max_blocks_per_seq, float scale, int sliding_window) {
    using Cfg = Tile<D>;
    constexpr int BN = Cfg::BN;
    constexpr int STRIDE = Cfg::STRIDE;
    constexpr int CHUNKS = Cfg::CHUNKS;
    constexpr bool Q_IN_REGS = Cfg::Q_IN_REGS;
    static_assert((BM * CHUNKS) % THREADS == 0 && (BN * CHUNKS) % THREADS == 0, "tile loads must divide evenly");

    extern __shared__ uint4 smem_raw[];
    T* const sq = reinterpret_cast<T*>(smem_raw);
    T* const sk = sq + BM * STRIDE;
    T* const sv = sk + 2 * BN * STRIDE;

    const int q_tile = gridDim.x - 1 - blockIdx.x;
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
    const int num_tiles = kv_hi > kv_lo ? static_cast<int>((kv_hi - kv_lo + BN - 1) / BN) : 0;

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

    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[dt][e] = 0.0f;
    // Running max (log2 domain) and running sum of rows g and g + 8 of this warp's 16.
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};
    const int g = lane / 4;
    const int tig = lane % 4;
    const float scale_log2 = scale * LOG2E;

    if (num_tiles > 0) {
#pragma unroll
        for (int it = 0; it < BM * CHUNKS / THREADS; ++it) {
            const int idx = tid + it * THREADS;
            const int r = idx / CHUNKS;
            const int c = idx % CHUNKS;
            const bool valid = r < rows;
            const size_t offset = valid ? (q_first + i0 + r) * q_row_stride + head * D + c * 8 : 0;
            cp_async16(sq + r * STRIDE + c * 8, q + offset, valid);
        }
        load_kv(0, 0);
        cp_async_commit();
    }

    const T* sq_warp = sq + warp * 16 * STRIDE;
    uint32_t qf[Q_IN_REGS ? D / 16 : 1][4];

    for (int t = 0; t < num_tiles; ++t) {
        const int stage = t & 1;
        if (t + 1 < num_tiles) load_kv(t + 1, stage ^ 1);
        // Always commit (possibly an empty group) so wait_group<1> means "tile t has landed".
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        if constexpr (Q_IN_REGS) {
            if (t == 0) {
#pragma unroll
                for (int ks = 0; ks < D / 16; ++ks) {
                    ldmatrix_x4(qf[ks], sq_warp + (lane % 16) * STRIDE + ks * 16 + (lane / 16) * 8);
                }
            }
        }

        // ---- S = Q K^T for this warp's 16 rows and the tile's BN keys ----
        const T* kt = sk + stage * BN * STRIDE;
        float s[BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            uint32_t a[4];
            if constexpr (Q_IN_REGS) {
#pragma unroll
                for (int e = 0; e < 4; ++e) a[e] = qf[ks][e];
            } else {
                ldmatrix_x4(a, sq_warp + (lane % 16) * STRIDE + ks * 16 + (lane / 16) * 8);
            }
#pragma unroll
            for (int nt2 = 0; nt2 < BN / 16; ++nt2) {
                uint32_t b[4];
                ldmatrix_x4(b, kt + (nt2 * 16 + (lane % 8) + (lane / 16) * 8) * STRIDE + ks * 16 +
                                   ((lane / 8) % 2) * 8);
                mma(s[2 * nt2], a, b[0], b[1], T());
                mma(s[2 * nt2 + 1], a, b[2], b[3], T());
            }
        }

#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;

        // ---- mask: only tiles that cross the diagonal, the window edge or the end ----
        const long long kv0 = kv_lo + static_cast<long long>(t) * BN;
        const bool needs_mask = kv0 + BN > kv_hi || kv0 + BN - 1 > pos_first ||
                                (window > 0 && kv0 <= pos_last_tile - window);
        if (needs_mask) {
#pragma unroll
            for (int ri = 0; ri < 2; ++ri) {
                const long long pos = pos_first + warp * 16 + g + ri * 8;
                // Visible columns of this row within the tile: lo < col <= hi.
                const long long hi = min(pos, kv_hi - 1) - kv0;
                const long long lo = window > 0 ? pos - window - kv0 : -1LL;
                const int hi_c = static_cast<int>(max(-1LL, min(static_cast<long long>(BN), hi)));
                const int lo_c = static_cast<int>(max(-1LL, min(static_cast<long long>(BN), lo)));
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int col = nt * 8 + tig * 2 + e;
                        if (col > hi_c || col <= lo_c) s[nt][ri * 2 + e] = -INFINITY;
                    }
            }
        }

        // ---- online softmax: rows g (elements 0,1) and g + 8 (elements 2,3) ----
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
            float mx = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][ri * 2], s[nt][ri * 2 + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float new_max = fmaxf(row_max[ri], mx);
            // A row with nothing visible yet keeps max -inf; exponentiate against 0 so it stays 0
            // instead of producing (-inf) - (-inf).
            const float ref = new_max == -INFINITY ? 0.0f : new_max;
            const float correction = fast_exp2(row_max[ri] - ref);
            row_max[ri] = new_max;
            row_sum[ri] *= correction;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                o[dt][ri * 2] *= correction;
                o[dt][ri * 2 + 1] *= correction;
            }
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = fast_exp2(s[nt][ri * 2 + e] - ref);
                    s[nt][ri * 2 + e] = p;
                    row_sum[ri] += p;
                }
        }

        // ---- O += P V: the score accumulators of two key tiles form one A fragment ----
        const T* vt = sv + stage * BN * STRIDE;
#pragma unroll
        for (int kc = 0; kc < BN / 16; ++kc) {
            uint32_t a[4];
            a[0] = pack2(s[2 * kc][0], s[2 * kc][1], T());
            a[1] = pack2(s[2 * kc][2], s[2 * kc][3], T());
            a[2] = pack2(s[2 * kc + 1][0], s[2 * kc + 1][1], T());
            a[3] = pack2(s[2 * kc + 1][2], s[2 * kc + 1][3], T());
#pragma unroll
            for (int dt2 = 0; dt2 < D / 16; ++dt2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, vt + (kc * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * STRIDE + dt2 * 16 +
                                         (lane / 16) * 8);
                mma(o[2 * dt2], a, b[0], b[1], T());
                mma(o[2 * dt2 + 1], a, b[2], b[3], T());
            }
        }
        // The next iteration's copies overwrite the stage this one read.
        __syncthreads();
    }

    // ---- normalise and store rows g and g + 8 ----
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
        float sum = row_sum[ri];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        const int r = warp * 16 + g + ri * 8;
        if (r < rows) {
            T* dst = out + (q_first + i0 + r) * q_row_stride + head * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                *reinterpret_cast<uint32_t*>(dst + dt * 8 + tig * 2) =
                    pack2(o[dt][ri * 2] * inv, o[dt][ri * 2 + 1] * inv, T());
            }
        }
    }
}

}  // namespace attn_prefill
}  // namespace braid

#define BRAID_DEFINE_PREFILL_KERNEL(T, SUFFIX, D)                                                        \
    extern "C" __global__ void __launch_bounds__(braid::attn_prefill::THREADS)                           \
        paged_attention_prefill_d##D##_##SUFFIX(                                                         \
            const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,       \
            const uint32_t* __restrict__ block_tables, const uint32_t* __restrict__ q_starts,            \
            const uint32_t* __restrict__ context_lens, T* __restrict__ out, int total_q, int num_heads,  \
            int num_kv_heads, int block_size_log2, int max_blocks_per_seq, float scale,                  \
            int sliding_window) {                                                                        \
        braid::attn_prefill::prefill<T, D>(q, k_cache, v_cache, block_tables, q_starts, context_lens,    \
                                           out, total_q, num_heads, num_kv_heads, block_size_log2,       \
                                           max_blocks_per_seq, scale, sliding_window);                   \
    }

#define BRAID_DEFINE_PREFILL_DTYPE(T, SUFFIX)      \
    BRAID_DEFINE_PREFILL_KERNEL(T, SUFFIX, 16)     \
    BRAID_DEFINE_PREFILL_KERNEL(T, SUFFIX, 32)     \
    BRAID_DEFINE_PREFILL_KERNEL(T, SUFFIX, 64)     \
    BRAID_DEFINE_PREFILL_KERNEL(T, SUFFIX, 128)    \
    BRAID_DEFINE_PREFILL_KERNEL(T, SUFFIX, 256)

BRAID_DEFINE_PREFILL_DTYPE(__half, f16)
BRAID_DEFINE_PREFILL_DTYPE(__nv_bfloat16, bf16)
