// Skinny GEMM for decode-sized batches: y[n, m] = x[n, k] · W[m, k]^T (+ bias[m]) (+ residual[n, m])
// with n ≤ 64, W in PyTorch Linear layout, f16/bf16 storage and f32 accumulation. Also the
// row-bias add that the cuBLASLt path uses when its epilogue cannot take the bias pointer.
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

// Programmatic dependent launch (sm_90+; no-ops when the kernel was launched without the
// attribute). `allow_next_launch` lets the next kernel on the stream be scheduled now: its own
// `wait_for_previous` still waits for this whole grid to finish and its writes to be visible.
__device__ __forceinline__ void allow_next_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_previous() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
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
    constexpr int FRAG = 128;  // floats of one 16×8 accumulator tile, 4 per lane
    extern __shared__ float partials[];  // [warps][TILES][RG][FRAG]

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
