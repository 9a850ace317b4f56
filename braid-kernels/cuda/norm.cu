// RMS normalisation kernels: rms_norm_* and fused_add_rms_norm_* (residual add then norm), one
// block per row, f32 accumulation whatever the storage dtype.
#include "common.cuh"

namespace braid {

// Each thread owns whole 16-byte chunks of the row (strided by the block) so the hot path is one
// 128-bit load per chunk; a chunk falls back to scalar accesses only when the row pointers are not
// 16-byte aligned (odd widths, offset views) or it is the row's short tail.
template <typename T>
__device__ __forceinline__ void rms_norm_row(const T* __restrict__ x, const T* __restrict__ weight,
                                             T* __restrict__ out, int cols, float eps) {
    constexpr int N = Pack<T>::N;
    const int chunks = (cols + N - 1) / N;
    const bool aligned = is_vec_aligned(x) && is_vec_aligned(weight) && is_vec_aligned(out);

    float sum_sq = 0.0f;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        const int base = c * N;
        if (aligned && base + N <= cols) {
            const Pack<T> xs = *reinterpret_cast<const Pack<T>*>(x + base);
#pragma unroll
            for (int i = 0; i < N; ++i) {
                const float v = to_float(xs.v[i]);
                sum_sq += v * v;
            }
        } else {
            const int end = min(base + N, cols);
            for (int i = base; i < end; ++i) {
                const float v = to_float(x[i]);
                sum_sq += v * v;
            }
        }
    }
    const float inv_rms = rsqrtf(block_reduce_sum(sum_sq) / static_cast<float>(cols) + eps);

    // The second read of x hits L1/L2: a row is at most a few tens of KB.
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        const int base = c * N;
        if (aligned && base + N <= cols) {
            const Pack<T> xs = *reinterpret_cast<const Pack<T>*>(x + base);
            const Pack<T> ws = *reinterpret_cast<const Pack<T>*>(weight + base);
            Pack<T> ys;
#pragma unroll
            for (int i = 0; i < N; ++i) {
                ys.v[i] = from_float<T>(to_float(xs.v[i]) * inv_rms * to_float(ws.v[i]));
            }
            *reinterpret_cast<Pack<T>*>(out + base) = ys;
        } else {
            const int end = min(base + N, cols);
            for (int i = base; i < end; ++i) {
                out[i] = from_float<T>(to_float(x[i]) * inv_rms * to_float(weight[i]));
            }
        }
    }
}

// residual <- residual + x (rounded to T, exactly what an unfused add would store), then
// out <- rms_norm(residual) * weight. Pass two reads back only the chunks this same thread wrote
// in pass one, so no extra barrier is needed beyond the reduction's.
template <typename T>
__device__ __forceinline__ void fused_add_rms_norm_row(const T* __restrict__ x, T* __restrict__ residual,
                                                       const T* __restrict__ weight, T* __restrict__ out,
                                                       int cols, float eps) {
    constexpr int N = Pack<T>::N;
    const int chunks = (cols + N - 1) / N;
    const bool aligned = is_vec_aligned(x) && is_vec_aligned(residual) && is_vec_aligned(weight) &&
                         is_vec_aligned(out);

    float sum_sq = 0.0f;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        const int base = c * N;
        if (aligned && base + N <= cols) {
            const Pack<T> xs = *reinterpret_cast<const Pack<T>*>(x + base);
            Pack<T> rs = *reinterpret_cast<const Pack<T>*>(residual + base);
#pragma unroll
            for (int i = 0; i < N; ++i) {
                rs.v[i] = from_float<T>(to_float(rs.v[i]) + to_float(xs.v[i]));
                const float v = to_float(rs.v[i]);
                sum_sq += v * v;
            }
            *reinterpret_cast<Pack<T>*>(residual + base) = rs;
        } else {
            const int end = min(base + N, cols);
            for (int i = base; i < end; ++i) {
                const T sum = from_float<T>(to_float(residual[i]) + to_float(x[i]));
                residual[i] = sum;
                const float v = to_float(sum);
                sum_sq += v * v;
            }
        }
    }
    const float inv_rms = rsqrtf(block_reduce_sum(sum_sq) / static_cast<float>(cols) + eps);

    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        const int base = c * N;
        if (aligned && base + N <= cols) {
            const Pack<T> rs = *reinterpret_cast<const Pack<T>*>(residual + base);
            const Pack<T> ws = *reinterpret_cast<const Pack<T>*>(weight + base);
            Pack<T> ys;
#pragma unroll
            for (int i = 0; i < N; ++i) {
                ys.v[i] = from_float<T>(to_float(rs.v[i]) * inv_rms * to_float(ws.v[i]));
            }
            *reinterpret_cast<Pack<T>*>(out + base) = ys;
        } else {
            const int end = min(base + N, cols);
            for (int i = base; i < end; ++i) {
                out[i] = from_float<T>(to_float(residual[i]) * inv_rms * to_float(weight[i]));
            }
        }
    }
}

}  // namespace braid

// Grid: one block per row (gridDim.x = rows). Block: a multiple of the warp size, at most
// BRAID_MAX_BLOCK_THREADS. Launched with programmatic dependent launch: the next kernel may be
// scheduled at once (a projection then streams its weights while the norm runs), and no block
// touches memory before the previous kernel has finished.
#define BRAID_DEFINE_NORM_KERNELS(T, SUFFIX)                                                           \
    extern "C" __global__ void __launch_bounds__(BRAID_MAX_BLOCK_THREADS)                              \
        rms_norm_##SUFFIX(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ out,  \
                          int cols, float eps) {                                                       \
        braid::allow_next_launch();                                                                    \
        braid::wait_for_previous();                                                                    \
        const size_t offset = static_cast<size_t>(blockIdx.x) * cols;                                  \
        braid::rms_norm_row<T>(x + offset, weight, out + offset, cols, eps);                           \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(BRAID_MAX_BLOCK_THREADS)                              \
        fused_add_rms_norm_##SUFFIX(const T* __restrict__ x, T* __restrict__ residual,                 \
                                    const T* __restrict__ weight, T* __restrict__ out, int cols,       \
                                    float eps) {                                                       \
        braid::allow_next_launch();                                                                    \
        braid::wait_for_previous();                                                                    \
        const size_t offset = static_cast<size_t>(blockIdx.x) * cols;                                  \
        braid::fused_add_rms_norm_row<T>(x + offset, residual + offset, weight, out + offset, cols,    \
                                         eps);                                                         \
    }

BRAID_DEFINE_NORM_KERNELS(float, f32)
BRAID_DEFINE_NORM_KERNELS(__half, f16)
BRAID_DEFINE_NORM_KERNELS(__nv_bfloat16, bf16)
