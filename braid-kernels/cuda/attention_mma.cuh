// Tensor-core building blocks of the flash-attention kernels (prefill and the shared-prefix pass
// of cascade decode): cp.async tile copies, ldmatrix, mma.sync m16n8k16 with f32 accumulation,
// and one warp's online-softmax step over a K/V tile held in shared memory.
//
// A warp owns 16 query rows; lane l holds rows l/4 ("row 0") and l/4 + 8 ("row 1") and, of every
// 8-column slice of the scores or the output, columns 2*(l%4) and 2*(l%4)+1.
#pragma once

#include "common.cuh"

namespace braid {
namespace attn_mma {

constexpr float LOG2E = 1.4426950408889634f;

template <int D>
struct Tile {
    // Keys per K/V tile: 64, or 32 at D = 256 so the output accumulators (D/2 floats per thread)
    // still fit the register file next to the scores.
    static constexpr int BN = D <= 128 ? 64 : 32;
    // One 16-byte pad per row: ldmatrix reads 8 rows at the same column, and with the pad those
    // rows start in 8 different bank groups, for every head_dim.
    static constexpr int STRIDE = D + 8;
    static constexpr int CHUNKS = D / 8;
    // At D = 256 the query fragments would take 64 more registers; they are re-read from shared
    // memory instead.
    static constexpr bool Q_IN_REGS = D <= 128;
    static constexpr int Q_FRAGS = Q_IN_REGS ? D / 16 : 1;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes global -> shared without passing through registers; a `valid == false` copy
// reads nothing and zero-fills, which is how rows past the end of a sequence become zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    const int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_size)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                    __nv_bfloat16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded into one register, the lower column in the low half (the mma operand order).
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The running state of one warp's 16 query rows: unnormalised output, and the max (log2 domain,
// scale folded in) and sum of each of the thread's two rows.
template <int D>
struct WarpRows {
    float o[D / 8][4];
    float row_max[2];
    float row_sum[2];

    __device__ __forceinline__ void init() {
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[dt][e] = 0.0f;
        row_max[0] = row_max[1] = -INFINITY;
        row_sum[0] = row_sum[1] = 0.0f;
    }

    // The sum of row `ri` over the four lanes that share it.
    __device__ __forceinline__ float total_sum(int ri) const {
        float sum = row_sum[ri];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        return sum;
    }
};

// The warp's query fragments for its 16 rows at `sq_warp` (row stride Tile<D>::STRIDE).
template <typename T, int D>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qf)[Tile<D>::Q_FRAGS][4], const T* sq_warp, int lane) {
    if constexpr (Tile<D>::Q_IN_REGS) {
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            ldmatrix_x4(qf[ks], sq_warp + (lane % 16) * Tile<D>::STRIDE + ks * 16 + (lane / 16) * 8);
        }
    }
}

// One K/V tile of BN keys for the warp's 16 rows: S = Q K^T, scaling into the log2 domain, the
// optional mask, the online-softmax update and O += P V. `kt`/`vt` point at the tile's K and V
// rows in shared memory. With `masked`, column `col` of row `ri` is visible only when
// `lo_c[ri] < col <= hi_c[ri]`.
template <typename T, int D>
__device__ __forceinline__ void attend_tile(WarpRows<D>& st, const uint32_t (&qf)[Tile<D>::Q_FRAGS][4],
                                            const T* sq_warp, const T* kt, const T* vt, float scale_log2,
                                            bool masked, const int (&lo_c)[2], const int (&hi_c)[2], int lane) {
    constexpr int BN = Tile<D>::BN;
    constexpr int STRIDE = Tile<D>::STRIDE;
    const int tig = lane % 4;

    // ---- S = Q K^T for the warp's 16 rows and the tile's BN keys ----
    float s[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t a[4];
        if constexpr (Tile<D>::Q_IN_REGS) {
#pragma unroll
            for (int e = 0; e < 4; ++e) a[e] = qf[ks][e];
        } else {
            ldmatrix_x4(a, sq_warp + (lane % 16) * STRIDE + ks * 16 + (lane / 16) * 8);
        }
#pragma unroll
        for (int nt2 = 0; nt2 < BN / 16; ++nt2) {
            uint32_t b[4];
            ldmatrix_x4(b, kt + (nt2 * 16 + (lane % 8) + (lane / 16) * 8) * STRIDE + ks * 16 + ((lane / 8) % 2) * 8);
            mma(s[2 * nt2], a, b[0], b[1], T());
            mma(s[2 * nt2 + 1], a, b[2], b[3], T());
        }
    }

#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;

    if (masked) {
#pragma unroll
        for (int ri = 0; ri < 2; ++ri)
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = nt * 8 + tig * 2 + e;
                    if (col > hi_c[ri] || col <= lo_c[ri]) s[nt][ri * 2 + e] = -INFINITY;
                }
    }

    // ---- online softmax: row 0 (elements 0,1) and row 1 (elements 2,3) ----
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][ri * 2], s[nt][ri * 2 + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float new_max = fmaxf(st.row_max[ri], mx);
        // A row with nothing visible yet keeps max -inf; exponentiate against 0 so it stays 0
        // instead of producing (-inf) - (-inf).
        const float ref = new_max == -INFINITY ? 0.0f : new_max;
        const float correction = fast_exp2(st.row_max[ri] - ref);
        st.row_max[ri] = new_max;
        st.row_sum[ri] *= correction;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            st.o[dt][ri * 2] *= correction;
            st.o[dt][ri * 2 + 1] *= correction;
        }
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float p = fast_exp2(s[nt][ri * 2 + e] - ref);
                s[nt][ri * 2 + e] = p;
                st.row_sum[ri] += p;
            }
    }

    // ---- O += P V: the score accumulators of two key tiles form one A fragment ----
#pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc) {
        uint32_t a[4];
        a[0] = pack2(s[2 * kc][0], s[2 * kc][1], T());
        a[1] = pack2(s[2 * kc][2], s[2 * kc][3], T());
        a[2] = pack2(s[2 * kc + 1][0], s[2 * kc + 1][1], T());
        a[3] = pack2(s[2 * kc + 1][2], s[2 * kc + 1][3], T());
#pragma unroll
        for (int dt2 = 0; dt2 < D / 16; ++dt2) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, vt + (kc * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * STRIDE + dt2 * 16 + (lane / 16) * 8);
            mma(st.o[2 * dt2], a, b[0], b[1], T());
            mma(st.o[2 * dt2 + 1], a, b[2], b[3], T());
        }
    }
}

}  // namespace attn_mma
}  // namespace braid
