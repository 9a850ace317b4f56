// Tensor-core GEMM for 17–64 rows on Hopper: y[n, m] = x[n, k] · W[m, k]^T (+ bias[m])
// (+ residual[n, m]), W in PyTorch Linear layout, f16/bf16 storage, f32 accumulation, bias and
// residual added in f32 before the single rounding to the storage dtype.
//
// Why a kernel of its own: at 17–64 rows a projection is still a stream over W, but the skinny
// kernel (gemv.cu) re-reads all of x for every 16 rows of W (at 64 rows that is several times more
// x than W traffic), and cuBLASLt pays a per-call floor of about 5.5 µs on the decode shapes
// whatever the row count. Here a block stages each 64-wide k-slab of x once in shared memory next
// to the matching W tile, one warpgroup multiplies them with wgmma, and a producer warp keeps the
// following slabs in flight with TMA, so the W stream runs at close to full bandwidth.
//
// * Swap-AB: a block computes D^T[64 features, 64 tokens] = W[m0 : m0 + 64, k-slice] ·
//   x[0 : 64, k-slice]^T with wgmma.m64n64k16 (A = 64 rows of W, B = the 64 token rows of x, both
//   K-major in shared memory), so m fills the instruction's fixed 64-row side and the tokens its
//   N side. Token rows ≥ n of the 64-row x box are zero-filled by TMA and never stored.
// * Pipeline: one lane of warp 4 streams (W, x) tile pairs of 64 k with TMA (128-byte swizzle) into
//   a ring of kStages slots guarded by mbarriers; warps 0–3 (one warpgroup) consume them, keeping
//   one group of wgmma in flight while they release the slot of the one before.
// * Split-k over a thread-block cluster: grid (split, m / 64), cluster (split, 1, 1); block r of a
//   cluster covers k ∈ [r·k/split, (r+1)·k/split). Each block leaves its f32 partial tile in
//   shared memory; after a cluster barrier each block reduces 1/split of the valid token rows by
//   reading every partial tile through distributed shared memory in rank order (deterministic),
//   adds bias and residual, rounds once and stores 16-byte packs. No workspace, no atomics, no
//   second kernel; split = 1 runs the same path as a cluster of one.
// * Programmatic dependent launch: the block lets the next kernel launch at entry and loads the W
//   tiles of the whole ring before griddepcontrol.wait (W is constant); x, bias, residual and out
//   are touched only after the wait. Launched plainly, those instructions do nothing.
// * SiLU·mul variant (gemm_wgmma_silu_*): the gate|up projection of a gated MLP with the
//   activation in its epilogue, out[t, j] = silu(g[t, j]) · u[t, j] for j < I, where W = [2I, k]
//   holds the gate rows [0, I) and then the up rows [I, 2I). A block owns output features
//   [j0, j0 + 64) and streams two W tiles per k-slab from the same tensor map, gate rows j0… and
//   up rows I + j0…, next to one x tile (24 KB a slot), into two accumulators. The cluster
//   reduces both partial tiles, rounds g and u to T (what the unfused path stores in its gate|up
//   buffer), then rounds silu(g) · u once, as activation.cu's silu_mul does: the two paths differ
//   only in the order of the k sums. No bias, no residual. Both variants are one template.
//
// Launch contract (src/cuda/linear.rs): 160 threads per block, dynamic shared memory as
// `WgmmaEpilogue::shared_bytes` there computes it, tensor maps W = [m rows][k] (gemm_wgmma_silu: [2m
// rows][k], m = I) and x = [n rows][k] of T with a 64 × 64 box and CU_TENSOR_MAP_SWIZZLE_128B;
// grid (split, m / 64), cluster (split, 1, 1); 1 ≤ n ≤ 64, m % 64 == 0, k % (64 · split) == 0,
// split ≤ 8 (the portable cluster size); bias, residual and out 16-byte aligned, bias and residual
// may be null.
//
// wgmma and TMA exist only on sm_90a. The module's compute_80 PTX keeps the kernels' names with a
// body that traps; the launcher sends only compute-capability-9.0 devices here.
#include <cooperative_groups.h>

#include "hopper.cuh"

namespace braid {
namespace wgmma_gemm {

// These must match the constants of the same names in src/cuda/linear.rs.
// Warps 0–3: the consumer warpgroup (wgmma needs a warpgroup to start at a warp index divisible
// by 4); warp 4: the producer.
constexpr int kThreads = 160;
// Ring slots: the prototype's sweep on an H100 found 8 better than 2, 4 or 6 on every decode shape.
constexpr int kStages = 8;
// Rows of a W or x tile, and k per slab: 64 elements of 2 bytes are one 128-byte swizzle row.
constexpr int kTile = 64;
constexpr int kTileBytes = kTile * 128;
// The mbarriers sit at the start of the (1024-aligned) dynamic shared memory, the ring after them.
constexpr int kBarrierBytes = 1024;
// f32 pitch of a partial tile P[token][feature]: bank (4·token + feature) % 32 differs across
// the lanes of a fragment store.
constexpr int kPitch = kTile + 4;
constexpr int kPartialBytes = kTile * kPitch * 4;

// What a variant keeps per block: W tiles per k-slab (1, or gate and up for SiLU·mul), one
// accumulator and one partial tile each. A slot holds the W tiles, then the x tile; every tile
// stays 1024-byte aligned (the swizzle period).
template <bool kSiluMul> struct Layout {
    static constexpr int kWTiles = kSiluMul ? 2 : 1;
    static constexpr int kStageBytes = (kWTiles + 1) * kTileBytes;
    static constexpr int kXOffset = kWTiles * kTileBytes;
    static constexpr int kPartialsBytes = kWTiles * kPartialBytes;
    // Dynamic shared memory of a block whose k-slice is `slabs` slabs: slack to align the base to
    // 1024, the barriers, then the ring slots it uses (small k-slices leave room for more blocks
    // per SM) or the partial tiles, whichever is larger. `WgmmaEpilogue::shared_bytes` in
    // linear.rs mirrors it.
    __host__ __device__ static constexpr int shared_bytes(int slabs) {
        const int ring = (slabs < kStages ? slabs : kStages) * kStageBytes;
        return 1024 + kBarrierBytes + (ring > kPartialsBytes ? ring : kPartialsBytes);
    }
};

static_assert(kStages >= 2, "the producer waits for a slot's release by the next consumer trip");
static_assert(2 * kStages * 8 <= kBarrierBytes, "full and empty barriers fit their area");
static_assert(kThreads == 5 * BRAID_WARP_SIZE, "one warpgroup and one producer warp");
// 227 KB is what an H100 grants one block after opting in: 130 KB and 194 KB here.
static_assert(Layout<true>::shared_bytes(kStages) <= 227 * 1024, "a full SiLU·mul ring fits a block");

#if BRAID_HAS_WGMMA

using namespace hopper;

// Loads the W tiles of the k-slab at `k` into `slot`: tile t holds W rows m0 + t·w_step (for
// SiLU·mul, the gate tile, then the up tile).
template <int kWTiles>
__device__ __forceinline__ void load_w(uint32_t slot, const CUtensorMap& tm_w, int k, int m0,
                                       int w_step, uint32_t bar, uint64_t policy) {
#pragma unroll
    for (int t = 0; t < kWTiles; ++t) {
        tma_load_2d(slot + t * kTileBytes, &tm_w, k, m0 + t * w_step, bar, policy);
    }
}

// Streams the (W tiles, x) of this block's k-slice through the ring. One lane runs it.
template <bool kSiluMul>
__device__ __forceinline__ void produce(const CUtensorMap& tm_w, const CUtensorMap& tm_x,
                                        uint32_t full, uint32_t empty, uint32_t ring, int slabs,
                                        int k0, int m0, int w_step) {
    using L = Layout<kSiluMul>;
    prefetch_tensor_map(&tm_w);
    prefetch_tensor_map(&tm_x);
    const uint64_t keep_w = policy_evict_first();
    const uint64_t keep_x = policy_evict_last();
    const int first = slabs < kStages ? slabs : kStages;
    // W does not depend on the previous kernel: fill the whole ring with it before the wait.
    // Each slot expects its W and x bytes at once; x rows past n count as zero-filled box rows.
    for (int i = 0; i < first; ++i) {
        mbar_arrive_expect_tx(full + 8 * i, L::kStageBytes);
        load_w<L::kWTiles>(ring + i * L::kStageBytes, tm_w, k0 + i * kTile, m0, w_step,
                           full + 8 * i, keep_w);
    }
    wait_for_previous();
    for (int i = 0; i < first; ++i) {
        tma_load_2d(ring + i * L::kStageBytes + L::kXOffset, &tm_x, k0 + i * kTile, 0,
                    full + 8 * i, keep_x);
    }
    for (int i = first; i < slabs; ++i) {
        const int s = i % kStages;
        const uint32_t slot = ring + s * L::kStageBytes;
        // Use i / kStages of slot s: wait for the consumers to release use i / kStages - 1.
        mbar_wait(empty + 8 * s, (i / kStages - 1) & 1);
        mbar_arrive_expect_tx(full + 8 * s, L::kStageBytes);
        load_w<L::kWTiles>(slot, tm_w, k0 + i * kTile, m0, w_step, full + 8 * s, keep_w);
        tma_load_2d(slot + L::kXOffset, &tm_x, k0 + i * kTile, 0, full + 8 * s, keep_x);
    }
}

// The warpgroup's main loop: accumulates this block's k-slice of W tile t into `acc[t]`.
template <typename T, bool kSiluMul>
__device__ __forceinline__ void consume(float (&acc)[Layout<kSiluMul>::kWTiles][32],
                                        uint32_t full, uint32_t empty, uint32_t ring, int slabs) {
    using L = Layout<kSiluMul>;
    const int lane = threadIdx.x % BRAID_WARP_SIZE;
#pragma unroll
    for (int t = 0; t < L::kWTiles; ++t) {
#pragma unroll
        for (int r = 0; r < 32; ++r) acc[t][r] = 0.0f;
        fence_accumulators(acc[t]);
    }
    for (int i = 0; i < slabs; ++i) {
        const int s = i % kStages;
        mbar_wait(full + 8 * s, (i / kStages) & 1);
        const uint32_t slot = ring + s * L::kStageBytes;
        const uint64_t desc_x = smem_descriptor(slot + L::kXOffset);
#pragma unroll
        for (int t = 0; t < L::kWTiles; ++t) fence_accumulators(acc[t]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kTile / 16; ++kk) {
#pragma unroll
            for (int t = 0; t < L::kWTiles; ++t) {
                const uint64_t desc_w = smem_descriptor(slot + t * kTileBytes);
                wgmma_m64n64k16(acc[t], desc_w + 2 * kk, desc_x + 2 * kk, 1, T());
            }
        }
        wgmma_commit();
#pragma unroll
        for (int t = 0; t < L::kWTiles; ++t) fence_accumulators(acc[t]);
        if (i > 0) {
            // The group before this one has finished reading its slot: hand it back.
            wgmma_wait<1>();
            if (lane == 0) mbar_arrive(empty + 8 * ((i - 1) % kStages));
        }
    }
    wgmma_wait<0>();
#pragma unroll
    for (int t = 0; t < L::kWTiles; ++t) fence_accumulators(acc[t]);
}

#endif  // BRAID_HAS_WGMMA

// One block of either variant; `m` is the output width (I for SiLU·mul, whose W has 2I rows).
template <typename T, bool kSiluMul>
__device__ __forceinline__ void gemm(const CUtensorMap& tm_w, const CUtensorMap& tm_x,
                                     const T* __restrict__ bias, const T* __restrict__ residual,
                                     T* __restrict__ out, int n, int m, int k_per_block) {
    static_assert(sizeof(T) == 2, "a 64-element k-slab is one 128-byte swizzle row");
#if BRAID_HAS_WGMMA
    using L = Layout<kSiluMul>;
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    const uint32_t full = base;
    const uint32_t empty = base + 8 * kStages;
    const uint32_t ring = base + kBarrierBytes;
    // Partial tile t at partial + t·kTile·kPitch.
    float* partial = reinterpret_cast<float*>(smem_raw + (base - raw) + kBarrierBytes);

    const int warp = threadIdx.x / BRAID_WARP_SIZE;
    const int lane = threadIdx.x % BRAID_WARP_SIZE;
    const int slabs = k_per_block / kTile;
    const int k0 = blockIdx.x * k_per_block;
    const int m0 = blockIdx.y * kTile;

    // A launch with less shared memory than this layout needs would overrun it: fail instead.
    uint32_t granted;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(granted));
    if (granted < static_cast<uint32_t>(L::shared_bytes(slabs))) __trap();

    allow_next_launch();

    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < kStages; ++s) {
            mbar_init(full + 8 * s, 1);   // the producer's arrive, plus the TMA bytes
            mbar_init(empty + 8 * s, 4);  // lane 0 of each consumer warp
        }
        fence_mbar_init();
    }
    __syncthreads();

    float acc[L::kWTiles][32];
    if (warp == 4) {
        // The up rows of a SiLU·mul block start m rows after its gate rows.
        if (lane == 0) produce<kSiluMul>(tm_w, tm_x, full, empty, ring, slabs, k0, m0, m);
        __syncwarp();
    } else {
        consume<T, kSiluMul>(acc, full, empty, ring, slabs);
    }

    // Every wgmma of the block has completed and every TMA write has landed (the consumers waited
    // on each slot), so the ring can hold the f32 partial tiles.
    __syncthreads();
    if (warp < 4) {
#pragma unroll
        for (int t = 0; t < L::kWTiles; ++t)
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int i = 0; i < 2; ++i)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int token = 8 * j + 2 * (lane % 4) + c;
                        const int feature = 16 * warp + lane / 4 + 8 * i;
                        partial[(t * kTile + token) * kPitch + feature] = acc[t][4 * j + 2 * i + c];
                    }
    }

    // bias, residual and out belong to the dependency chain.
    wait_for_previous();

    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    cluster_arrive_release();
    cluster_wait_acquire();

    // This block's share of the token rows, in 8-feature (16-byte) groups.
    const int split = static_cast<int>(cluster.num_blocks());
    const int rank = static_cast<int>(cluster.block_rank());
    const int rows_per_block = (n + split - 1) / split;
    const int t_begin = rank * rows_per_block;
    const int t_end = min(n, t_begin + rows_per_block);
    constexpr int kGroups = kTile / 8;
    const int items = t_end > t_begin ? (t_end - t_begin) * kGroups : 0;
    for (int it = threadIdx.x; it < items; it += kThreads) {
        const int token = t_begin + it / kGroups;
        const int feature = m0 + 8 * (it % kGroups);
        const size_t o = static_cast<size_t>(token) * m + feature;
        // Global loads first, so their latency overlaps the distributed shared-memory reads.
        Pack<T> res{}, b{};
        if (!kSiluMul && residual != nullptr) res = *reinterpret_cast<const Pack<T>*>(residual + o);
        if (!kSiluMul && bias != nullptr) b = *reinterpret_cast<const Pack<T>*>(bias + feature);
        float v[L::kWTiles][8];
#pragma unroll
        for (int t = 0; t < L::kWTiles; ++t)
#pragma unroll
            for (int e = 0; e < 8; ++e) v[t][e] = 0.0f;
        for (int q = 0; q < split; ++q) {
            const float* peer = cluster.map_shared_rank(partial, q);
#pragma unroll
            for (int t = 0; t < L::kWTiles; ++t) {
                const float* src = peer + (t * kTile + token) * kPitch + (feature - m0);
                const float4 lo = reinterpret_cast<const float4*>(src)[0];
                const float4 hi = reinterpret_cast<const float4*>(src)[1];
                v[t][0] += lo.x;
                v[t][1] += lo.y;
                v[t][2] += lo.z;
                v[t][3] += lo.w;
                v[t][4] += hi.x;
                v[t][5] += hi.y;
                v[t][6] += hi.z;
                v[t][7] += hi.w;
            }
        }
        Pack<T> y;
        if constexpr (kSiluMul) {
            // Gate and up rounded as the unfused path stores them, then the activation rounded
            // as silu_mul rounds it.
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float g = to_float(from_float<T>(v[0][e]));
                const float u = to_float(from_float<T>(v[1][e]));
                y.v[e] = from_float<T>(silu_times(g, u));
            }
        } else {
            if (bias != nullptr) {
#pragma unroll
                for (int e = 0; e < 8; ++e) v[0][e] += to_float(b.v[e]);
            }
            if (residual != nullptr) {
#pragma unroll
                for (int e = 0; e < 8; ++e) v[0][e] += to_float(res.v[e]);
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) y.v[e] = from_float<T>(v[0][e]);
        }
        *reinterpret_cast<Pack<T>*>(out + o) = y;
    }

    // The peers may still be reading this block's partial tiles: stay resident until they are
    // done.
    cluster_arrive_relaxed();
    cluster_wait_acquire();
#else
    __trap();
#endif
}

}  // namespace wgmma_gemm
}  // namespace braid

#define BRAID_DEFINE_GEMM_WGMMA(T, SUFFIX)                                                          \
    extern "C" __global__ void __launch_bounds__(braid::wgmma_gemm::kThreads, 1)                   \
        gemm_wgmma_##SUFFIX(const __grid_constant__ CUtensorMap tm_w,                              \
                            const __grid_constant__ CUtensorMap tm_x, const T* __restrict__ bias,  \
                            const T* __restrict__ residual, T* __restrict__ out, int n, int m,     \
                            int k_per_block) {                                                     \
        braid::wgmma_gemm::gemm<T, false>(tm_w, tm_x, bias, residual, out, n, m, k_per_block);     \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(braid::wgmma_gemm::kThreads, 1)                   \
        gemm_wgmma_silu_##SUFFIX(const __grid_constant__ CUtensorMap tm_w,                         \
                                 const __grid_constant__ CUtensorMap tm_x, T* __restrict__ out,    \
                                 int n, int inter, int k_per_block) {                              \
        braid::wgmma_gemm::gemm<T, true>(tm_w, tm_x, nullptr, nullptr, out, n, inter,              \
                                         k_per_block);                                             \
    }

BRAID_DEFINE_GEMM_WGMMA(__half, f16)
BRAID_DEFINE_GEMM_WGMMA(__nv_bfloat16, bf16)
