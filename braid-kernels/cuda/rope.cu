// Everything between the fused QKV projection and attention, in one launch per layer:
// rope_qk_norm_kv_write_* applies the optional per-head RMSNorm (q_norm / k_norm) and rotate-half
// RoPE to q and k, writes q to its own buffer and k, v into the paged KV caches. Launched with
// programmatic dependent launch: scheduled during the previous kernel's tail, it touches no
// memory before that kernel has finished.
#include "common.cuh"

// Largest head_dim the kernel handles: each lane keeps up to this many rotation pairs / 32 in
// registers. Mirrored by MAX_HEAD_DIM in src/cuda/rope.rs.
#define ROPE_MAX_HEAD_DIM 512
#define ROPE_PAIRS_PER_LANE (ROPE_MAX_HEAD_DIM / 2 / BRAID_WARP_SIZE)
// Warps per block; each warp owns one (token, head). Mirrored by WARPS_PER_BLOCK in rope.rs.
#define ROPE_WARPS_PER_BLOCK 4
// A slot_mapping entry with this value skips the token's KV write (padding rows of a graph bucket).
#define ROPE_SKIP_SLOT 0xFFFFFFFFu

namespace braid {

template <typename T, int P> struct alignas(P * sizeof(T)) Vec {
    T v[P];
};

template <typename T, int P> __device__ __forceinline__ bool vec_aligned(const T* p) {
    return (reinterpret_cast<uintptr_t>(p) % (P * sizeof(T))) == 0;
}

// x[i] * inv_rms * w[i]: the CPU reference's order of operations.
__device__ __forceinline__ float normed(float x, float inv_rms, float w) { return __fmul_rn(__fmul_rn(x, inv_rms), w); }

// The rotate-half update of one pair. The angle is formed in f32 exactly as the reference does
// (position converted to f32, one rounded multiply), and sincosf is the precise library routine:
// positions reach tens of thousands of radians, where the fast intrinsics lose all accuracy.
__device__ __forceinline__ void rotate_pair(float& x0, float& x1, float pos, float inv_freq) {
    const float angle = __fmul_rn(pos, inv_freq);
    float s, c;
    sincosf(angle, &s, &c);
    const float r0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    const float r1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
    x0 = r0;
    x1 = r1;
}

// 1 / sqrt(mean(x^2) + eps) with exact sqrt and division (not rsqrtf): Qwen3's k_norm weights
// reach ~100, so any error in the scale is magnified before the single rounding to T.
__device__ __forceinline__ float head_inv_rms(float sum_sq, int head_dim, float eps) {
    return 1.0f / sqrtf(warp_reduce_sum(sum_sq) / static_cast<float>(head_dim) + eps);
}

// head_dim == 64 * P with aligned rows: lane l owns the P consecutive pairs starting at l * P, so
// each half of the head moves with one vector access per lane.
template <typename T, int P>
__device__ __forceinline__ void head_contiguous(const T* __restrict__ src, T* __restrict__ dst,
                                                const T* __restrict__ norm, const float* __restrict__ inv_freq,
                                                float pos, float eps, bool rotate) {
    using V = Vec<T, P>;
    constexpr int HALF = BRAID_WARP_SIZE * P;
    const int i0 = (threadIdx.x % BRAID_WARP_SIZE) * P;
    const V a = *reinterpret_cast<const V*>(src + i0);
    const V b = *reinterpret_cast<const V*>(src + HALF + i0);
    if (!rotate) {
        *reinterpret_cast<V*>(dst + i0) = a;
        *reinterpret_cast<V*>(dst + HALF + i0) = b;
        return;
    }
    float lo[P], hi[P];
    float sum_sq = 0.0f;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        lo[p] = to_float(a.v[p]);
        hi[p] = to_float(b.v[p]);
        sum_sq += lo[p] * lo[p] + hi[p] * hi[p];
    }
    if (norm != nullptr) {
        const float inv_rms = head_inv_rms(sum_sq, 2 * HALF, eps);
        const V wa = *reinterpret_cast<const V*>(norm + i0);
        const V wb = *reinterpret_cast<const V*>(norm + HALF + i0);
#pragma unroll
        for (int p = 0; p < P; ++p) {
            lo[p] = normed(lo[p], inv_rms, to_float(wa.v[p]));
            hi[p] = normed(hi[p], inv_rms, to_float(wb.v[p]));
        }
    }
    V oa, ob;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        rotate_pair(lo[p], hi[p], pos, inv_freq[i0 + p]);
        oa.v[p] = from_float<T>(lo[p]);
        ob.v[p] = from_float<T>(hi[p]);
    }
    *reinterpret_cast<V*>(dst + i0) = oa;
    *reinterpret_cast<V*>(dst + HALF + i0) = ob;
}

// Any even head_dim up to ROPE_MAX_HEAD_DIM, any alignment: lane l owns pairs l, l + 32, ...
template <typename T>
__device__ __forceinline__ void head_strided(const T* __restrict__ src, T* __restrict__ dst, const T* __restrict__ norm,
                                             const float* __restrict__ inv_freq, float pos, float eps, bool rotate,
                                             int head_dim) {
    const int lane = threadIdx.x % BRAID_WARP_SIZE;
    const int half = head_dim / 2;
    if (!rotate) {
        for (int i = lane; i < head_dim; i += BRAID_WARP_SIZE) dst[i] = src[i];
        return;
    }
    float lo[ROPE_PAIRS_PER_LANE];
    float hi[ROPE_PAIRS_PER_LANE];
    float sum_sq = 0.0f;
#pragma unroll
    for (int p = 0; p < ROPE_PAIRS_PER_LANE; ++p) {
        const int i = lane + p * BRAID_WARP_SIZE;
        lo[p] = 0.0f;
        hi[p] = 0.0f;
        if (i < half) {
            lo[p] = to_float(src[i]);
            hi[p] = to_float(src[i + half]);
            sum_sq += lo[p] * lo[p] + hi[p] * hi[p];
        }
    }
    if (norm != nullptr) {
        const float inv_rms = head_inv_rms(sum_sq, head_dim, eps);
#pragma unroll
        for (int p = 0; p < ROPE_PAIRS_PER_LANE; ++p) {
            const int i = lane + p * BRAID_WARP_SIZE;
            if (i < half) {
                lo[p] = normed(lo[p], inv_rms, to_float(norm[i]));
                hi[p] = normed(hi[p], inv_rms, to_float(norm[i + half]));
            }
        }
    }
#pragma unroll
    for (int p = 0; p < ROPE_PAIRS_PER_LANE; ++p) {
        const int i = lane + p * BRAID_WARP_SIZE;
        if (i < half) {
            rotate_pair(lo[p], hi[p], pos, inv_freq[i]);
            dst[i] = from_float<T>(lo[p]);
            dst[i + half] = from_float<T>(hi[p]);
        }
    }
}

template <typename T, int P>
__device__ __forceinline__ bool try_contiguous(const T* src, T* dst, const T* norm, const float* inv_freq, float pos,
                                               float eps, bool rotate, int head_dim) {
    if (head_dim != 2 * BRAID_WARP_SIZE * P) return false;
    if (!vec_aligned<T, P>(src) || !vec_aligned<T, P>(dst) || (norm != nullptr && !vec_aligned<T, P>(norm))) {
        return false;
    }
    head_contiguous<T, P>(src, dst, norm, inv_freq, pos, eps, rotate);
    return true;
}

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
    const bool rotate = !is_v;
    if (try_contiguous<T, 1>(src, dst, norm, inv_freq, pos, eps, rotate, head_dim)) return;
    if (try_contiguous<T, 2>(src, dst, norm, inv_freq, pos, eps, rotate, head_dim)) return;
    if (try_contiguous<T, 4>(src, dst, norm, inv_freq, pos, eps, rotate, head_dim)) return;
    if (try_contiguous<T, 8>(src, dst, norm, inv_freq, pos, eps, rotate, head_dim)) return;
    head_strided<T>(src, dst, norm, inv_freq, pos, eps, rotate, head_dim);
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
