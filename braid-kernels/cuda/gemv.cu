// Skinny GEMM for decode-sized batches: y[n, m] = x[n, k] · W[m, k]^T (+ bias[m]) (+ residual[n, m])
// with n ≤ 64, W in PyTorch Linear layout, f16/bf16 storage and f32 accumulation; its fused
// variants for n ≤ 16 that compute x themselves (residual add + RMSNorm, or SiLU·mul; see the
// section at the end); and the row-bias add that the cuBLASLt path uses when its epilogue cannot
// take the bias pointer.
//
// At small n a linear layer is a pure stream over W, so everything here serves one goal: keep
// enough 16-byte loads of W in flight to saturate HBM, and spend as little as possible per byte.
// The multiply runs on the tensor cores (mma.sync m16n8k16): x is the 16-row A operand (tokens),
// a group of 8 W rows the 8-column B operand, so the FMA work that would otherwise cost ~10
// instructions per W element at n = 8 becomes 2 mma per 16-byte W load at any n ≤ 16.
//
// Fragment trick: a dot product does not care in which order k is summed, so a thread's 8
// contiguous k elements (one 16-byte load) are fed to the mma as the k positions it owns in two
// consecutive mma steps ({2t, 2t+1, 2t+8, 2t+9} with t = lane % 4). A and B see the same
// permutation because both index k by the same lane % 4, so no shuffles or shared-memory staging
// are needed to build fragments: 4 lanes cover 32 contiguous k of a row (64 bytes), 8 such quads
// cover 8 rows per warp instruction.
//
// Work split: a block owns 8 * RG rows of W and its warps split k (warp w takes k-blocks w,
// w + warps, ...), then combine their accumulators through shared memory, where the bias and
// residual are added before the single rounding to T. x is read through L1 (each thread reads
// exactly the x chunks its own mma needs, so staging it in shared memory would only add a
// barrier); W is read with L1::no_allocate so the stream does not evict x.
//
// Launched with programmatic dependent launch, a kernel lets the next one start at once and
// issues its first W loads before waiting for the previous kernel, so back-to-back layers
// overlap their launch gaps and tails; launched plainly, those instructions do nothing.
#include "common.cuh"

namespace braid {
namespace skinny {

constexpr int kMaxWarps = 16;
// Elements of one 16-byte pack, and the k-extent of one k-block (4 lanes × one pack).
constexpr int kPack = 8;
constexpr int kBlockK = 4 * kPack;

__device__ __forceinline__ uint4 load_weight(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

__device__ __forceinline__ uint4 load_input(const void* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
}

template <typename T> struct Mma;

template <> struct Mma<__nv_bfloat16> {
    __device__ __forceinline__ static void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                               uint32_t a3, uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
};

template <> struct Mma<__half> {
    __device__ __forceinline__ static void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                               uint32_t a3, uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
};

// Loads in flight per thread and k-loop trip: enough to cover HBM latency with few resident
// warps, few enough that the x and W registers (4 per pack) stay well under 128.
template <int NX, int RG> __host__ __device__ constexpr int unroll() {
    return (NX + RG) <= 2 ? 8 : (NX + RG) <= 4 ? 4 : (NX + RG) <= 6 ? 2 : 1;
}

// The block's k-split reduction and output: each warp parks its accumulators in `partials`
// ([warps][TILES][RG][FRAG] floats), then the block sums them per output and adds bias and
// residual in f32 before the single rounding to T.
template <typename T, int NX, int RG>
__device__ __forceinline__ void combine_and_store(const float (&acc)[(NX + 1) / 2][RG][4],
                                                  float* partials, const T* __restrict__ bias,
                                                  const T* __restrict__ residual,
                                                  T* __restrict__ out, int n, int m, int row_base) {
    constexpr int TILES = (NX + 1) / 2;
    constexpr int FRAG = 128;
    const int lane = threadIdx.x % BRAID_WARP_SIZE;
    const int warp = threadIdx.x / BRAID_WARP_SIZE;
    const int warps = blockDim.x / BRAID_WARP_SIZE;
#pragma unroll
    for (int t = 0; t < TILES; ++t)
#pragma unroll
        for (int g = 0; g < RG; ++g)
#pragma unroll
            for (int i = 0; i < 4; ++i)
                partials[((warp * TILES + t) * RG + g) * FRAG + lane * 4 + i] = acc[t][g][i];
    __syncthreads();

    // Accumulator element i of lane l in tile t, group g holds token 16t + l/4 + 8*(i/2) and
    // W row 8g + 2*(l%4) + i%2 of this block.
    constexpr int OUTPUTS = TILES * RG * FRAG;
    for (int idx = threadIdx.x; idx < OUTPUTS; idx += blockDim.x) {
        const int i = idx % 4;
        const int l = (idx / 4) % BRAID_WARP_SIZE;
        const int g = (idx / FRAG) % RG;
        const int t = idx / (FRAG * RG);
        const int token = 16 * t + l / 4 + 8 * (i / 2);
        const int row = row_base + 8 * g + 2 * (l % 4) + i % 2;
        if (token >= n || row >= m) continue;
        float sum = 0.0f;
        for (int wi = 0; wi < warps; ++wi) sum += partials[wi * OUTPUTS + idx];
        const size_t o = static_cast<size_t>(token) * m + row;
        if (bias != nullptr) sum += to_float(bias[row]);
        if (residual != nullptr) sum += to_float(residual[o]);
        out[o] = from_float<T>(sum);
    }
}

// NX: 8-token groups of x (n ≤ 8 * NX), RG: 8-row groups of W per block.
// Requirements (checked by the launcher): k % 8 == 0, x and w 16-byte aligned, 1 ≤ n ≤ 8 * NX,
// blockDim.x a multiple of 32 and at most 32 * kMaxWarps, dynamic shared memory
// warps * TILES * RG * 128 floats.
template <typename T, int NX, int RG>
__device__ __forceinline__ void skinny_gemm(const T* __restrict__ x, const T* __restrict__ w,
                                            const T* __restrict__ bias, const T* __restrict__ residual,
                                            T* __restrict__ out, int n, int k, int m) {
    constexpr int TILES = (NX + 1) / 2;  // 16-token A tiles
    constexpr int U = unroll<NX, RG>();
    extern __shared__ float partials[];  // [warps][TILES][RG][128]: see combine_and_store

    const int lane = threadIdx.x % BRAID_WARP_SIZE;
    const int warp = threadIdx.x / BRAID_WARP_SIZE;
    const int warps = blockDim.x / BRAID_WARP_SIZE;
    const int group = lane / 4;  // W row within an 8-row group; token within an 8-token group
    const int quad_lane = lane % 4;
    const int packs = k / kPack;
    const int kblocks = (packs + 3) / 4;
    const int row_base = blockIdx.x * (8 * RG);

    // Rows past m and tokens past n read nothing (their operands stay zero) and are not stored.
    const T* w_rows[RG];
    bool w_valid[RG];
#pragma unroll
    for (int g = 0; g < RG; ++g) {
        const int row = row_base + g * 8 + group;
        w_valid[g] = row < m;
        w_rows[g] = w + static_cast<size_t>(w_valid[g] ? row : 0) * k + quad_lane * kPack;
    }
    const T* x_rows[NX];
    bool x_valid[NX];
#pragma unroll
    for (int h = 0; h < NX; ++h) {
        const int token = h * 8 + group;
        x_valid[h] = token < n;
        x_rows[h] = x + static_cast<size_t>(x_valid[h] ? token : 0) * k + quad_lane * kPack;
    }

    allow_next_launch();

    float acc[TILES][RG][4];
#pragma unroll
    for (int t = 0; t < TILES; ++t)
#pragma unroll
        for (int g = 0; g < RG; ++g)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[t][g][i] = 0.0f;

    for (int kb0 = warp; kb0 < kblocks; kb0 += U * warps) {
        // Every load of this trip is issued before the first mma consumes one.
        uint4 wv[U][RG];
        uint4 xv[U][NX];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int kb = kb0 + u * warps;
            const bool pack_ok = kb * 4 + quad_lane < packs;
            const size_t offset = static_cast<size_t>(kb) * kBlockK;
#pragma unroll
            for (int g = 0; g < RG; ++g) {
                wv[u][g] = make_uint4(0, 0, 0, 0);
                if (pack_ok && w_valid[g]) wv[u][g] = load_weight(w_rows[g] + offset);
            }
        }
        // Under programmatic dependent launch the W stream above overlaps the previous kernel;
        // x (and later bias, residual and out) may be its output, so they wait. Returns at once
        // after the first trip, and when launched without the attribute.
        wait_for_previous();
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int kb = kb0 + u * warps;
            const bool pack_ok = kb * 4 + quad_lane < packs;
            const size_t offset = static_cast<size_t>(kb) * kBlockK;
#pragma unroll
            for (int h = 0; h < NX; ++h) {
                xv[u][h] = make_uint4(0, 0, 0, 0);
                if (pack_ok && x_valid[h]) xv[u][h] = load_input(x_rows[h] + offset);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            // Warp-uniform: mma.sync needs every lane of the warp.
            if (kb0 + u * warps >= kblocks) break;
#pragma unroll
            for (int t = 0; t < TILES; ++t) {
                const uint4 lo = xv[u][2 * t];
                const uint4 hi = (2 * t + 1 < NX) ? xv[u][(2 * t + 1) % NX] : make_uint4(0, 0, 0, 0);
#pragma unroll
                for (int g = 0; g < RG; ++g) {
                    Mma<T>::run(acc[t][g], lo.x, hi.x, lo.y, hi.y, wv[u][g].x, wv[u][g].y);
                    Mma<T>::run(acc[t][g], lo.z, hi.z, lo.w, hi.w, wv[u][g].z, wv[u][g].w);
                }
            }
        }
    }
    // Warps without k-blocks never reached the wait in the loop.
    wait_for_previous();
    combine_and_store<T, NX, RG>(acc, partials, bias, residual, out, n, m, row_base);
}

// ---- GEMMs that compute their own x ------------------------------------------------------------
//
// A decode step spends more time between kernels than in them, so the small op before a
// projection is folded into it: each block computes that op's output for the n rows of x it
// multiplies into shared memory (a prologue), then runs skinny_gemm's loop with x read from there.
//   AddRmsNorm: x = rms_norm(residual + delta) * norm_weight. Pass one: warps take (row,
//     segment) pairs (a row split over up to 16 warps, kSumLoads packs in flight per lane),
//     stage the rounded sum and add up its squares; block 0 also stores the sum to residual_out,
//     which must be another buffer than residual: the other blocks are still reading it. Pass
//     two, after a barrier: every thread scales its share of the staged rows. Each value is
//     rounded exactly as norm.cu's fused_add_rms_norm rounds it, so the fused and unfused paths
//     differ only in the order of the sum of squares.
//   SiluMul: x = silu(gate) * up of rows laid out [gate | up], rounded as activation.cu does.
// The prologue is the price of the fusion and every block pays it, so the grid holds only as
// many blocks as fit on the GPU at once (the launcher sizes it) and each block loops over 8·RG-row
// tiles of W: the prologue runs once per block, not once per wave. The first tile's W is loaded
// into registers before the wait, as in skinny_gemm, so it streams while the previous kernel
// finishes; the later tiles' W is prefetched into L2 at the same moment.
//
// Shared memory, in order (the launcher computes the same sizes): the k-reduction partials
// [warps][TILES][RG][128] floats; kSumSlots floats of row sums; x as n rows of stage_stride(k)
// elements; for AddRmsNorm the norm weight, k elements. The row stride is 64 bytes past a multiple
// of 128, so the 8 rows one warp instruction reads land in alternate halves of the 32 banks.

enum class Prologue { AddRmsNorm, SiluMul };

// Packs each lane of a prologue pass loads before using the first.
constexpr int kSumLoads = 4;
// Row-sum slots: (row, segment) pairs, at most max(16 rows, kMaxWarps segments of one row).
constexpr int kSumSlots = 16;
static_assert(kSumSlots >= kMaxWarps, "one slot per warp when a single row is split");

__host__ __device__ constexpr int stage_stride(int k) { return (k + 63) / 64 * 64 + 32; }

template <typename T> __device__ __forceinline__ Pack<T> as_pack(const uint4& v) {
    Pack<T> p;
    *reinterpret_cast<uint4*>(&p) = v;
    return p;
}

template <typename T> __device__ __forceinline__ void store_pack(T* p, const Pack<T>& v) {
    *reinterpret_cast<Pack<T>*>(p) = v;
}

// Asks L2 to fetch `rows` contiguous rows of k elements starting at `p` (16-byte aligned, k a
// multiple of 8), in 4 KB pieces spread over the block's threads. A hint only: before sm_90
// there is no bulk prefetch and the loads that follow go to memory.
template <typename T>
__device__ __forceinline__ void prefetch_rows_l2(const T* p, int rows, int k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr uint32_t kPiece = 4096;
    const size_t bytes = static_cast<size_t>(rows) * k * sizeof(T);
    const char* base = reinterpret_cast<const char*>(p);
    for (size_t off = static_cast<size_t>(threadIdx.x) * kPiece; off < bytes;
         off += static_cast<size_t>(blockDim.x) * kPiece) {
        const uint32_t size = static_cast<uint32_t>(min(static_cast<size_t>(kPiece), bytes - off));
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(base + off), "r"(size)
                     : "memory");
    }
#endif
}

// Stages rms_norm(residual + delta) * norm_weight for the n rows (delta absent: residual as
// is), as described above. Every thread calls it; it returns after a barrier.
template <typename T, bool HasDelta>
__device__ __forceinline__ void norm_prologue(const T* __restrict__ residual,
                                              const T* __restrict__ delta,
                                              const T* __restrict__ norm_weight,
                                              T* __restrict__ residual_out, float eps, T* stage,
                                              T* weight_stage, float* slots, int n, int k) {
    constexpr int N = Pack<T>::N;
    const int lane = threadIdx.x % BRAID_WARP_SIZE;
    const int warp = threadIdx.x / BRAID_WARP_SIZE;
    const int warps = blockDim.x / BRAID_WARP_SIZE;
    const int stride = stage_stride(k);
    const int packs = k / N;
    const int segments = max(1, warps / n);
    const int segment_packs = (packs + segments - 1) / segments;
    const bool writer = blockIdx.x == 0 && residual_out != nullptr;

    for (int pair = warp; pair < n * segments; pair += warps) {
        const int t = pair / segments;
        const int begin = (pair % segments) * segment_packs;
        const int end = min(packs, begin + segment_packs);
        const size_t row = static_cast<size_t>(t) * k;
        float sum = 0.0f;
        for (int p0 = begin + lane; p0 < end; p0 += kSumLoads * BRAID_WARP_SIZE) {
            uint4 rs[kSumLoads], ds[kSumLoads], ws[kSumLoads];
#pragma unroll
            for (int j = 0; j < kSumLoads; ++j) {
                const int p = p0 + j * BRAID_WARP_SIZE;
                if (p < end) {
                    rs[j] = load_input(residual + row + p * N);
                    if constexpr (HasDelta) ds[j] = load_input(delta + row + p * N);
                    // The warps of row 0 also stage the norm weight for pass two.
                    if (t == 0) ws[j] = load_input(norm_weight + p * N);
                }
            }
#pragma unroll
            for (int j = 0; j < kSumLoads; ++j) {
                const int p = p0 + j * BRAID_WARP_SIZE;
                if (p >= end) continue;
                Pack<T> s = as_pack<T>(rs[j]);
                if constexpr (HasDelta) {
                    const Pack<T> d = as_pack<T>(ds[j]);
#pragma unroll
                    for (int i = 0; i < N; ++i) s.v[i] = from_float<T>(to_float(s.v[i]) + to_float(d.v[i]));
                }
                if (writer) store_pack(residual_out + row + p * N, s);
#pragma unroll
                for (int i = 0; i < N; ++i) {
                    const float v = to_float(s.v[i]);
                    sum += v * v;
                }
                store_pack(stage + t * stride + p * N, s);
                if (t == 0) store_pack(weight_stage + p * N, as_pack<T>(ws[j]));
            }
        }
        sum = warp_reduce_sum(sum);
        if (lane == 0) slots[pair] = sum;
    }
    __syncthreads();

    for (int idx = threadIdx.x; idx < n * packs; idx += blockDim.x) {
        const int t = idx / packs;
        const int base = (idx - t * packs) * N;
        float sum = 0.0f;
        for (int seg = 0; seg < segments; ++seg) sum += slots[t * segments + seg];
        const float inv_rms = rsqrtf(sum / static_cast<float>(k) + eps);
        T* x = stage + t * stride + base;
        const Pack<T> s = *reinterpret_cast<const Pack<T>*>(x);
        const Pack<T> w = *reinterpret_cast<const Pack<T>*>(weight_stage + base);
        Pack<T> y;
#pragma unroll
        for (int i = 0; i < N; ++i) y.v[i] = from_float<T>(to_float(s.v[i]) * inv_rms * to_float(w.v[i]));
        store_pack(x, y);
    }
    __syncthreads();
}

// Stages silu(gate) * up for the n rows of `gate_up` ([gate | up], 2k wide). Every thread calls
// it; it returns after a barrier.
template <typename T>
__device__ __forceinline__ void silu_prologue(const T* __restrict__ gate_up, T* stage, int n, int k) {
    constexpr int N = Pack<T>::N;
    const int stride = stage_stride(k);
    const int packs = k / N;
    const int total = n * packs;
    for (int idx0 = threadIdx.x; idx0 < total; idx0 += kSumLoads * blockDim.x) {
        uint4 gs[kSumLoads], us[kSumLoads];
#pragma unroll
        for (int j = 0; j < kSumLoads; ++j) {
            const int idx = idx0 + j * blockDim.x;
            if (idx < total) {
                const int t = idx / packs;
                const T* gate = gate_up + static_cast<size_t>(t) * 2 * k + (idx - t * packs) * N;
                gs[j] = load_input(gate);
                us[j] = load_input(gate + k);
            }
        }
#pragma unroll
        for (int j = 0; j < kSumLoads; ++j) {
            const int idx = idx0 + j * blockDim.x;
            if (idx >= total) continue;
            const int t = idx / packs;
            const Pack<T> g = as_pack<T>(gs[j]), u = as_pack<T>(us[j]);
            Pack<T> y;
#pragma unroll
            for (int i = 0; i < N; ++i) y.v[i] = from_float<T>(silu_times(to_float(g.v[i]), to_float(u.v[i])));
            store_pack(stage + t * stride + (idx - t * packs) * N, y);
        }
    }
    __syncthreads();
}

// y[n, m] = x · W^T (+ bias) with x computed by prologue P (see above): AddRmsNorm reads
// a = residual, b = delta (null when HasDelta is false), norm_weight, residual_out (or null)
// and eps; SiluMul reads a = gate_up. Requirements (checked by the launcher): as skinny_gemm,
// plus every operand pointer 16-byte aligned, 1 ≤ n ≤ 8 * NX ≤ 16, gridDim.x at most the number
// of 8·RG-row tiles, and dynamic shared memory for the layout above.
template <typename T, int NX, int RG, Prologue P, bool HasDelta>
__device__ __forceinline__ void fused_gemm(const T* __restrict__ a, const T* __restrict__ b,
                                           const T* __restrict__ norm_weight,
                                           T* __restrict__ residual_out, float eps,
                                           const T* __restrict__ w, const T* __restrict__ bias,
                                           T* __restrict__ out, int n, int k, int m) {
    constexpr int TILES = (NX + 1) / 2;
    constexpr int U = unroll<NX, RG>();
    extern __shared__ float partials[];

    const int lane = threadIdx.x % BRAID_WARP_SIZE;
    const int warp = threadIdx.x / BRAID_WARP_SIZE;
    const int warps = blockDim.x / BRAID_WARP_SIZE;
    const int group = lane / 4;
    const int quad_lane = lane % 4;
    const int packs = k / kPack;
    const int kblocks = (packs + 3) / 4;
    const int tile_rows = 8 * RG;
    const int tiles = (m + tile_rows - 1) / tile_rows;
    const int stride = stage_stride(k);
    float* slots = partials + warps * TILES * RG * 128;
    T* stage = reinterpret_cast<T*>(slots + kSumSlots);

    const T* x_rows[NX];
    bool x_valid[NX];
#pragma unroll
    for (int h = 0; h < NX; ++h) {
        const int token = h * 8 + group;
        x_valid[h] = token < n;
        x_rows[h] = stage + (x_valid[h] ? token : 0) * stride + quad_lane * kPack;
    }

    allow_next_launch();
    for (int tile = blockIdx.x + gridDim.x; tile < tiles; tile += gridDim.x) {
        prefetch_rows_l2(w + static_cast<size_t>(tile) * tile_rows * k, min(tile_rows, m - tile * tile_rows), k);
    }

    int row_base = 0;
    const T* w_rows[RG];
    bool w_valid[RG];
    auto set_tile = [&](int tile) {
        row_base = tile * tile_rows;
#pragma unroll
        for (int g = 0; g < RG; ++g) {
            const int row = row_base + g * 8 + group;
            w_valid[g] = row < m;
            w_rows[g] = w + static_cast<size_t>(w_valid[g] ? row : 0) * k + quad_lane * kPack;
        }
    };
    uint4 wv[U][RG];
    auto load_w = [&](int kb0) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int kb = kb0 + u * warps;
            const bool pack_ok = kb * 4 + quad_lane < packs;
            const size_t offset = static_cast<size_t>(kb) * kBlockK;
#pragma unroll
            for (int g = 0; g < RG; ++g) {
                wv[u][g] = make_uint4(0, 0, 0, 0);
                if (pack_ok && w_valid[g]) wv[u][g] = load_weight(w_rows[g] + offset);
            }
        }
    };
    set_tile(blockIdx.x);
    load_w(warp);
    wait_for_previous();
    if constexpr (P == Prologue::AddRmsNorm) {
        norm_prologue<T, HasDelta>(a, b, norm_weight, residual_out, eps, stage, stage + n * stride,
                                   slots, n, k);
    } else {
        silu_prologue<T>(a, stage, n, k);
    }

    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const bool first = tile == static_cast<int>(blockIdx.x);
        if (!first) set_tile(tile);
        float acc[TILES][RG][4];
#pragma unroll
        for (int t = 0; t < TILES; ++t)
#pragma unroll
            for (int g = 0; g < RG; ++g)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[t][g][i] = 0.0f;

        for (int kb0 = warp; kb0 < kblocks; kb0 += U * warps) {
            if (!first || kb0 != warp) load_w(kb0);
            uint4 xv[U][NX];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int kb = kb0 + u * warps;
                const bool pack_ok = kb * 4 + quad_lane < packs;
#pragma unroll
                for (int h = 0; h < NX; ++h) {
                    xv[u][h] = make_uint4(0, 0, 0, 0);
                    if (pack_ok && x_valid[h])
                        xv[u][h] = *reinterpret_cast<const uint4*>(x_rows[h] + kb * kBlockK);
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (kb0 + u * warps >= kblocks) break;
#pragma unroll
                for (int t = 0; t < TILES; ++t) {
                    const uint4 lo = xv[u][2 * t];
                    const uint4 hi = (2 * t + 1 < NX) ? xv[u][(2 * t + 1) % NX] : make_uint4(0, 0, 0, 0);
#pragma unroll
                    for (int g = 0; g < RG; ++g) {
                        Mma<T>::run(acc[t][g], lo.x, hi.x, lo.y, hi.y, wv[u][g].x, wv[u][g].y);
                        Mma<T>::run(acc[t][g], lo.z, hi.z, lo.w, hi.w, wv[u][g].z, wv[u][g].w);
                    }
                }
            }
        }
        combine_and_store<T, NX, RG>(acc, partials, bias, nullptr, out, n, m, row_base);
        // The next tile's warps write the partials this tile's reduction may still be reading.
        __syncthreads();
    }
}

}  // namespace skinny
}  // namespace braid

#define BRAID_DEFINE_SKINNY_GEMM(T, SUFFIX, NX, RG)                                                  \
    extern "C" __global__ void __launch_bounds__(braid::skinny::kMaxWarps * BRAID_WARP_SIZE)       \
        skinny_gemm_##SUFFIX##_x##NX##_r##RG(const T* __restrict__ x, const T* __restrict__ w,     \
                                            const T* __restrict__ bias,                           \
                                            const T* __restrict__ residual, T* __restrict__ out,  \
                                            int n, int k, int m) {                                \
        braid::skinny::skinny_gemm<T, NX, RG>(x, w, bias, residual, out, n, k, m);                \
    }

#define BRAID_DEFINE_SKINNY_GEMM_ALL(T, SUFFIX)   \
    BRAID_DEFINE_SKINNY_GEMM(T, SUFFIX, 1, 1)     \
    BRAID_DEFINE_SKINNY_GEMM(T, SUFFIX, 1, 2)     \
    BRAID_DEFINE_SKINNY_GEMM(T, SUFFIX, 2, 1)     \
    BRAID_DEFINE_SKINNY_GEMM(T, SUFFIX, 2, 2)     \
    BRAID_DEFINE_SKINNY_GEMM(T, SUFFIX, 4, 1)     \
    BRAID_DEFINE_SKINNY_GEMM(T, SUFFIX, 4, 2)     \
    BRAID_DEFINE_SKINNY_GEMM(T, SUFFIX, 8, 1)     \
    BRAID_DEFINE_SKINNY_GEMM(T, SUFFIX, 8, 2)

BRAID_DEFINE_SKINNY_GEMM_ALL(__half, f16)
BRAID_DEFINE_SKINNY_GEMM_ALL(__nv_bfloat16, bf16)

// Fused variants for n ≤ 16 (NX 1 or 2), the decode batches that run the skinny path. The norm
// kernel with a delta (`add_rms_norm_gemm`) and without (`rms_norm_gemm`) are separate
// instantiations so neither pays for the other's branch.
#define BRAID_DEFINE_FUSED_GEMM(T, SUFFIX, NX, RG)                                                    \
    extern "C" __global__ void __launch_bounds__(braid::skinny::kMaxWarps * BRAID_WARP_SIZE)        \
        add_rms_norm_gemm_##SUFFIX##_x##NX##_r##RG(                                                 \
            const T* __restrict__ residual, const T* __restrict__ delta,                            \
            const T* __restrict__ norm_weight, T* __restrict__ residual_out, float eps,             \
            const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ out, int n, int k, \
            int m) {                                                                                \
        braid::skinny::fused_gemm<T, NX, RG, braid::skinny::Prologue::AddRmsNorm, true>(            \
            residual, delta, norm_weight, residual_out, eps, w, bias, out, n, k, m);                \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(braid::skinny::kMaxWarps * BRAID_WARP_SIZE)        \
        rms_norm_gemm_##SUFFIX##_x##NX##_r##RG(                                                     \
            const T* __restrict__ residual, const T* __restrict__ delta,                            \
            const T* __restrict__ norm_weight, T* __restrict__ residual_out, float eps,             \
            const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ out, int n, int k, \
            int m) {                                                                                \
        braid::skinny::fused_gemm<T, NX, RG, braid::skinny::Prologue::AddRmsNorm, false>(           \
            residual, delta, norm_weight, residual_out, eps, w, bias, out, n, k, m);                \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(braid::skinny::kMaxWarps * BRAID_WARP_SIZE)        \
        silu_mul_gemm_##SUFFIX##_x##NX##_r##RG(const T* __restrict__ gate_up,                       \
                                               const T* __restrict__ w,                             \
                                               const T* __restrict__ bias, T* __restrict__ out,     \
                                               int n, int k, int m) {                               \
        braid::skinny::fused_gemm<T, NX, RG, braid::skinny::Prologue::SiluMul, false>(              \
            gate_up, nullptr, nullptr, nullptr, 0.0f, w, bias, out, n, k, m);                       \
    }

#define BRAID_DEFINE_FUSED_GEMM_ALL(T, SUFFIX) \
    BRAID_DEFINE_FUSED_GEMM(T, SUFFIX, 1, 1)   \
    BRAID_DEFINE_FUSED_GEMM(T, SUFFIX, 1, 2)   \
    BRAID_DEFINE_FUSED_GEMM(T, SUFFIX, 2, 1)   \
    BRAID_DEFINE_FUSED_GEMM(T, SUFFIX, 2, 2)

BRAID_DEFINE_FUSED_GEMM_ALL(__half, f16)
BRAID_DEFINE_FUSED_GEMM_ALL(__nv_bfloat16, bf16)

// out[r, j] += bias[j] for a [rows, cols] matrix, one thread per element (grid-stride).
#define BRAID_DEFINE_ADD_BIAS(T, SUFFIX)                                                          \
    extern "C" __global__ void add_row_bias_##SUFFIX(T* __restrict__ out,                         \
                                                     const T* __restrict__ bias, int rows,        \
                                                     int cols) {                                  \
        const size_t total = static_cast<size_t>(rows) * cols;                                   \
        for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;    \
             i += static_cast<size_t>(gridDim.x) * blockDim.x) {                                  \
            out[i] = braid::from_float<T>(braid::to_float(out[i]) +                               \
                                          braid::to_float(bias[i % cols]));                       \
        }                                                                                         \
    }

BRAID_DEFINE_ADD_BIAS(float, f32)
BRAID_DEFINE_ADD_BIAS(__half, f16)
BRAID_DEFINE_ADD_BIAS(__nv_bfloat16, bf16)
