// Hopper (sm_90a) building blocks shared by the wgmma kernels (gemm_wgmma.cu,
// attention_prefill_wgmma.cu): mbarriers, TMA loads, cluster barriers, wgmma fence/commit/wait,
// the shared-memory matrix descriptor of a 128-byte-swizzled K-major tile and the m64n64k16
// instruction on two such tiles. Everything here
// exists only where BRAID_HAS_WGMMA is 1; the kernels' compute_80 PTX keeps their names with a
// body that traps, and the launchers send only compute-capability-9.0 devices to them.
#pragma once

#include <cuda.h>  // CUtensorMap

#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BRAID_HAS_WGMMA 1
#else
#define BRAID_HAS_WGMMA 0
#endif

#if BRAID_HAS_WGMMA

namespace braid {
namespace hopper {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

// Makes the initialised barriers visible to the async proxy (TMA's complete_tx) and the cluster.
__device__ __forceinline__ void fence_mbar_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    return done != 0;
}

__device__ __forceinline__ uint64_t globaltimer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Waits for the phase of `bar` with the given parity. A wait that never ends (a tensor map or
// byte count that does not match the launch) traps after 4 s, so the launch fails with an error
// at the next synchronisation instead of hanging the process. Under PDL the consumers' first wait
// also spans the rest of the previous kernel, which at these sizes takes microseconds.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    if (mbar_try_wait(bar, parity)) return;
    const uint64_t start = globaltimer_ns();
    while (!mbar_try_wait(bar, parity)) {
        if (globaltimer_ns() - start > 4000000000ull) __trap();
    }
}

// W is streamed once: evict it first. x is re-read by every block of the grid: keep it.
__device__ __forceinline__ uint64_t policy_evict_first() {
    uint64_t p;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}

__device__ __forceinline__ uint64_t policy_evict_last() {
    uint64_t p;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
    return p;
}

__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// 2-D TMA load of the box at (k = c0, row = c1) into shared memory, completing its bytes on
// `bar`. A shared::cta address of this block is a valid shared::cluster address.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                            uint32_t bar, uint64_t policy) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
        " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "l"(policy)
        : "memory");
}

// Cluster barrier halves. arrive.release + wait.acquire order every block's partial tile before
// its peers read it; the exit barrier only needs "the peers are done reading", for which a relaxed
// arrive suffices (their loads have returned before they arrive).
__device__ __forceinline__ void cluster_arrive_release() {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}

__device__ __forceinline__ void cluster_arrive_relaxed() {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}

__device__ __forceinline__ void cluster_wait_acquire() {
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Generic-proxy shared-memory writes made visible to later async-proxy reads (wgmma operands).
__device__ __forceinline__ void fence_proxy_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Barrier `ID` over the first COUNT threads that reach it (a subset of the block: warpgroups).
template <int ID, int COUNT> __device__ __forceinline__ void named_barrier() {
    asm volatile("bar.sync %0, %1;" ::"n"(ID), "n"(COUNT) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}

template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Compiler-only barrier on the accumulators (CUTLASS's warpgroup_fence_operand): keeps reads and
// copies of them from moving across the points where wgmma issues or completes.
template <int N> __device__ __forceinline__ void fence_accumulators(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// wgmma shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): bits 0–13 the start
// address >> 4, 16–29 the leading-dimension byte offset >> 4, 32–45 the stride-dimension byte
// offset >> 4, 49–51 the base offset, 62–63 the swizzle mode (1 = 128-byte).
//
// TMA with CU_TENSOR_MAP_SWIZZLE_128B writes row r of a tile (64 elements = 128 bytes) at r·128
// with its 16-byte chunk c at chunk c ^ (r % 8): the canonical K-major 128-byte-swizzle operand
// layout. One wgmma K step (16 elements, 32 bytes) lies inside one 128-byte row, so the K-direction
// offset is implied by the swizzle (set to the conventional 1); the next group of 8 rows starts
// 1024 bytes on (SBO = 1024); every tile is 1024-byte aligned, so the base offset is 0. The hardware
// applies the swizzle to the final address, so K step kk is reached by adding 32·kk bytes to the
// start address (2·kk in the encoded field, which cannot carry out of it: starts stay below 0x3900).
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t smem_addr) {
    uint64_t d = 0;
    d |= static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4);
    d |= static_cast<uint64_t>(1) << 16;
    d |= static_cast<uint64_t>(1024 >> 4) << 32;
    d |= static_cast<uint64_t>(1) << 62;
    return d;
}

// D[64 x 64] (+)= A[64 x 16] · B[16 x 64], A and B K-major in shared memory (no transposes), f32
// accumulators; scale_d = 0 overwrites D instead of adding to it. Thread t of the warpgroup
// (w = t / 32, l = t % 32) holds in d[4j + 2i + c] row 16w + l/4 + 8i and column 8j + 2(l % 4) + c
// of D. The last argument selects the input type.
#define BRAID_WGMMA_M64N64K16(TYPE)                                                               \
    asm volatile(                                                                                 \
        "{\n\t.reg .pred p;\n\t"                                                                  \
        "setp.ne.b32 p, %34, 0;\n\t"                                                              \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                           \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                 \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "       \
        "%32, %33, p, 1, 1, 0, 0;\n\t}"                                                           \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),     \
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),              \
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),           \
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),           \
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),           \
          "+f"(d[31])                                                                             \
        : "l"(desc_a), "l"(desc_b), "r"(scale_d))

__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                int scale_d, __nv_bfloat16) {
    BRAID_WGMMA_M64N64K16("bf16");
}

__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                int scale_d, __half) {
    BRAID_WGMMA_M64N64K16("f16");
}

#undef BRAID_WGMMA_M64N64K16

}  // namespace hopper
}  // namespace braid

#endif  // BRAID_HAS_WGMMA
