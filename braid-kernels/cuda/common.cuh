// Shared by every Braid kernel: launch constants (also read by build.rs, which turns each
// `#define BRAID_<NAME> <integer>` below into a Rust constant), dtype conversions, 16-byte
// vector packs, block reductions and the programmatic-dependent-launch controls.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// ---- constants the Rust launcher uses (plain integer literals only: build.rs parses them) ----
#define BRAID_WARP_SIZE 32
#define BRAID_MAX_BLOCK_THREADS 1024
// Every kernel moves data in 16-byte packs when the row pointers allow it.
#define BRAID_VEC_BYTES 16
// Block size of the element-wise kernels (silu_mul, embedding).
#define BRAID_ELEMENTWISE_BLOCK_THREADS 256
// The hardware limit on gridDim.y; kernels loop over rows beyond it.
#define BRAID_MAX_GRID_Y 65535

namespace braid {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
// Round-to-nearest-even, the same rounding the host's f16/bf16 conversions use.
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// silu(gate) * up in f32, the gated activation of activation.cu's silu_mul and of the projections
// that fold it in (gemv.cu's silu_mul_gemm, gemm_wgmma.cu's gemm_wgmma_silu): one definition, so
// every path rounds the same values. Precise expf on purpose: the fast-math __expf loses accuracy
// for large |gate|, and every user is memory-bound, so the exact version costs nothing measurable.
__device__ __forceinline__ float silu_times(float gate, float up) {
    return gate / (1.0f + expf(-gate)) * up;
}

// One 16-byte pack of T: 4 floats or 8 halves. Loads and stores of a whole pack compile to a
// single 128-bit memory instruction, which is what lets these memory-bound kernels approach
// full bandwidth.
template <typename T> struct alignas(BRAID_VEC_BYTES) Pack {
    static constexpr int N = BRAID_VEC_BYTES / sizeof(T);
    T v[N];
};

__device__ __forceinline__ bool is_vec_aligned(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & (BRAID_VEC_BYTES - 1)) == 0;
}

__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
    for (int offset = BRAID_WARP_SIZE / 2; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Sum of `v` over the whole block, returned to every thread. blockDim.x must be a multiple of
// the warp size (the launcher guarantees it) because the shuffles use a full mask. Callable once
// per kernel: the shared scratch is reused without a trailing barrier.
__device__ __forceinline__ float block_reduce_sum(float v) {
    __shared__ float warp_sums[BRAID_MAX_BLOCK_THREADS / BRAID_WARP_SIZE];
    const int lane = threadIdx.x % BRAID_WARP_SIZE;
    const int warp = threadIdx.x / BRAID_WARP_SIZE;
    v = warp_reduce_sum(v);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int num_warps = blockDim.x / BRAID_WARP_SIZE;
        float partial = lane < num_warps ? warp_sums[lane] : 0.0f;
        partial = warp_reduce_sum(partial);
        if (lane == 0) warp_sums[0] = partial;
    }
    __syncthreads();
    return warp_sums[0];
}

// Pulls the 128-byte line holding `p` into L2 without returning data: safe before
// `wait_for_previous` whoever writes the line, since L2 is where the GPU's writes meet.
__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Programmatic dependent launch (sm_90+; no-ops when the kernel was launched without the
// attribute, and compiled out of pre-Hopper PTX, which the launcher then launches plainly).
// `allow_next_launch` lets the next kernel on the stream be scheduled now: its own
// `wait_for_previous` still waits for this whole grid to finish and its writes to be visible.
// A kernel launched with the attribute must call `wait_for_previous` in every block before it
// reads anything an earlier kernel writes or writes anything an earlier kernel reads; one that
// never waits would let its successor overtake its own predecessor.
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

}  // namespace braid
