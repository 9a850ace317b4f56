// Gated activations: silu_mul_* computes silu(gate) * up over rows laid out as [gate | up].
#include "common.cuh"

namespace braid {

// Grid: x covers the 16-byte chunks of one output row, y walks rows (looping past the grid-y
// limit). A chunk uses 128-bit accesses when gate, up and out rows are all aligned. Launched with
// programmatic dependent launch: the next kernel (the down projection) may be scheduled at once,
// and every block waits for the previous kernel before it touches memory.
template <typename T>
__device__ __forceinline__ void silu_mul(const T* __restrict__ gate_up, T* __restrict__ out, int rows,
                                         int inter) {
    allow_next_launch();
    wait_for_previous();
    constexpr int N = Pack<T>::N;
    const int chunks = (inter + N - 1) / N;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= chunks) return;
    const int base = c * N;
    for (int row = blockIdx.y; row < rows; row += gridDim.y) {
        const T* gate = gate_up + static_cast<size_t>(row) * 2 * inter;
        const T* up = gate + inter;
        T* y = out + static_cast<size_t>(row) * inter;
        if (base + N <= inter && is_vec_aligned(gate) && is_vec_aligned(up) && is_vec_aligned(y)) {
            const Pack<T> gs = *reinterpret_cast<const Pack<T>*>(gate + base);
            const Pack<T> us = *reinterpret_cast<const Pack<T>*>(up + base);
            Pack<T> ys;
#pragma unroll
            for (int i = 0; i < N; ++i) {
                ys.v[i] = from_float<T>(silu_times(to_float(gs.v[i]), to_float(us.v[i])));
            }
            *reinterpret_cast<Pack<T>*>(y + base) = ys;
        } else {
            const int end = min(base + N, inter);
            for (int i = base; i < end; ++i) {
                y[i] = from_float<T>(silu_times(to_float(gate[i]), to_float(up[i])));
            }
        }
    }
}

}  // namespace braid

#define BRAID_DEFINE_SILU_MUL_KERNEL(T, SUFFIX)                                                  \
    extern "C" __global__ void __launch_bounds__(BRAID_ELEMENTWISE_BLOCK_THREADS)                \
        silu_mul_##SUFFIX(const T* __restrict__ gate_up, T* __restrict__ out, int rows, int inter) { \
        braid::silu_mul<T>(gate_up, out, rows, inter);                                           \
    }

BRAID_DEFINE_SILU_MUL_KERNEL(float, f32)
BRAID_DEFINE_SILU_MUL_KERNEL(__half, f16)
BRAID_DEFINE_SILU_MUL_KERNEL(__nv_bfloat16, bf16)
