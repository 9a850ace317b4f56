// Token embedding lookup: embedding_* gathers one table row per token id.
#include "common.cuh"

namespace braid {

// Grid: x covers the 16-byte chunks of one row, y walks tokens (looping past the grid-y limit).
// An id outside the table writes a zero row instead of reading out of bounds: ids are validated
// on the host, so this only guards memory safety.
template <typename T>
__device__ __forceinline__ void embedding(const uint32_t* __restrict__ ids, const T* __restrict__ table,
                                          T* __restrict__ out, int rows, int dim, uint32_t vocab) {
    constexpr int N = Pack<T>::N;
    const int chunks = (dim + N - 1) / N;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= chunks) return;
    const int base = c * N;
    for (int row = blockIdx.y; row < rows; row += gridDim.y) {
        const uint32_t id = ids[row];
        T* y = out + static_cast<size_t>(row) * dim;
        const int end = min(base + N, dim);
        if (id >= vocab) {
            for (int i = base; i < end; ++i) y[i] = from_float<T>(0.0f);
            continue;
        }
        const T* src = table + static_cast<size_t>(id) * dim;
        if (base + N <= dim && is_vec_aligned(src) && is_vec_aligned(y)) {
            *reinterpret_cast<Pack<T>*>(y + base) = *reinterpret_cast<const Pack<T>*>(src + base);
        } else {
            for (int i = base; i < end; ++i) y[i] = src[i];
        }
    }
}

}  // namespace braid

#define BRAID_DEFINE_EMBEDDING_KERNEL(T, SUFFIX)                                                    \
    extern "C" __global__ void __launch_bounds__(BRAID_ELEMENTWISE_BLOCK_THREADS)                   \
        embedding_##SUFFIX(const uint32_t* __restrict__ ids, const T* __restrict__ table,           \
                           T* __restrict__ out, int rows, int dim, uint32_t vocab) {                \
        braid::embedding<T>(ids, table, out, rows, dim, vocab);                                     \
    }

BRAID_DEFINE_EMBEDDING_KERNEL(float, f32)
BRAID_DEFINE_EMBEDDING_KERNEL(__half, f16)
BRAID_DEFINE_EMBEDDING_KERNEL(__nv_bfloat16, bf16)
