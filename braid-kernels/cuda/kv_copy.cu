// Copy-on-write of paged KV blocks: copy_kv_block copies one block over another in every layer's
// K and V cache with a single launch, instead of one memcpy per cache (56 for a 28-layer model,
// each with its own host-side cost).
#include "common.cuh"

// Grid: (caches, chunks of the block); each thread moves 16 bytes. `caches` holds the caches'
// base addresses; the block starts `src_offset` / `dst_offset` bytes into each, and is
// `block_bytes` long. Requirements (checked by the launcher): offsets, addresses and
// block_bytes multiples of 16, both blocks inside every cache, and distinct.
extern "C" __global__ void __launch_bounds__(BRAID_ELEMENTWISE_BLOCK_THREADS)
    copy_kv_block(const unsigned long long* __restrict__ caches, unsigned long long src_offset,
                  unsigned long long dst_offset, unsigned long long block_bytes) {
    char* base = reinterpret_cast<char*>(caches[blockIdx.x]);
    const uint4* src = reinterpret_cast<const uint4*>(base + src_offset);
    uint4* dst = reinterpret_cast<uint4*>(base + dst_offset);
    const size_t words = block_bytes / sizeof(uint4);
    for (size_t i = static_cast<size_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < words;
         i += static_cast<size_t>(gridDim.y) * blockDim.x) {
        dst[i] = src[i];
    }
}
