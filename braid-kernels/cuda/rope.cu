// Everything between the fused QKV projection and attention, in one launch per layer:
// rope_qk_norm_kv_write_* applies the optional per-head RMSNorm (q_norm / k_norm) and rotate-half
// RoPE to q and k, writes q to its own buffer and k, v into the paged KV caches. Launched with
// programmatic dependent launch: scheduled during the previous kernel's tail, it touches no
// memory before that kernel has finished.
#include "rope.cuh"

// Warps per block; each warp owns one (token, head). Mirrored by WARPS_PER_BLOCK in rope.rs.
#define ROPE_WARPS_PER_BLOCK 4

namespace braid {

// One warp per (token, head): q heads come first, then k heads, then v heads, matching the column
// order of the fused QKV output. Every branch below is uniform across the warp, so the norm's warp
// reduction always has all lanes.
template <typename T>
__device__ __forceinline__ void rope_qk_norm_kv_write(
    const T* __restrict__ qkv, const uint32_t* __restrict__ positions, const uint32_t* __restrict__ slots,
    const float* __restrict__ inv_freq, const T* __restrict__ q_norm, const T* __restrict__ k_norm,
    float eps, T* __restrict__ q_out, T* __restrict__ k_cache, T* __restrict__ v_cache, int n,
    int num_heads, int num_kv_heads, int head_dim, unsigned long long num_slots) {
    allow_next_launch();
    // qkv comes from the kernel before; the caches may still be read by an earlier one.
    wait_for_previous();
    const int heads_per_token = num_heads + 2 * num_kv_heads;
    const long long item =
        static_cast<long long>(blockIdx.x) * ROPE_WARPS_PER_BLOCK + threadIdx.x / BRAID_WARP_SIZE;
    if (item >= static_cast<long long>(n) * heads_per_token) return;
    const int token = static_cast<int>(item / heads_per_token);
    const int head = static_cast<int>(item % heads_per_token);

    const T* src = qkv + static_cast<size_t>(item) * head_dim;
    const bool is_q = head < num_heads;
    const bool is_v = head >= num_heads + num_kv_heads;

    T* dst;
    if (is_q) {
        dst = q_out + (static_cast<size_t>(token) * num_heads + head) * head_dim;
    } else {
        const uint32_t slot = slots[token];
        // Out-of-range slots are skipped like the padding marker: a bad table must not write
        // outside the cache.
        if (slot == ROPE_SKIP_SLOT || slot >= num_slots) return;
        const int kv_head = is_v ? head - num_heads - num_kv_heads : head - num_heads;
        T* cache = is_v ? v_cache : k_cache;
        dst = cache + (static_cast<size_t>(slot) * num_kv_heads + kv_head) * head_dim;
    }
    const T* norm = is_v ? nullptr : (is_q ? q_norm : k_norm);
    const float pos = static_cast<float>(positions[token]);
    rope_head<T>(src, dst, norm, inv_freq, pos, eps, !is_v, head_dim);
}

}  // namespace braid

// Grid: ceil(n * (num_heads + 2 * num_kv_heads) / ROPE_WARPS_PER_BLOCK) blocks of
// ROPE_WARPS_PER_BLOCK warps. q_norm / k_norm may be null (no norm for that projection).
#define BRAID_DEFINE_ROPE_KERNEL(T, SUFFIX)                                                              \
    extern "C" __global__ void __launch_bounds__(ROPE_WARPS_PER_BLOCK * BRAID_WARP_SIZE)                 \
        rope_qk_norm_kv_write_##SUFFIX(const T* __restrict__ qkv, const uint32_t* __restrict__ positions, \
                                       const uint32_t* __restrict__ slots,                              \
                                       const float* __restrict__ inv_freq, const T* __restrict__ q_norm, \
                                       const T* __restrict__ k_norm, float eps, T* __restrict__ q_out,   \
                                       T* __restrict__ k_cache, T* __restrict__ v_cache, int n,          \
                                       int num_heads, int num_kv_heads, int head_dim,                    \
                                       unsigned long long num_slots) {                                   \
        braid::rope_qk_norm_kv_write<T>(qkv, positions, slots, inv_freq, q_norm, k_norm, eps, q_out,     \
                                        k_cache, v_cache, n, num_heads, num_kv_heads, head_dim,          \
                                        num_slots);                                                      \
    }

BRAID_DEFINE_ROPE_KERNEL(float, f32)
BRAID_DEFINE_ROPE_KERNEL(__half, f16)
BRAID_DEFINE_ROPE_KERNEL(__nv_bfloat16, bf16)
