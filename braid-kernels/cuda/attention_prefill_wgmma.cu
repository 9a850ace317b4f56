// Paged prefill attention on Hopper tensor cores: paged_attention_prefill_wgmma_d128_{f16,bf16}.
// Same inputs and results as attention_prefill.cu's paged_attention_prefill (causal, sliding
// window, GQA, cached prefixes), for head_dim 128 and cache blocks of at least 16 tokens; the
// launcher (src/cuda/attention.rs) sends every other call to the mma.sync kernel.
//
// Why a kernel of its own: mma.sync re-reads each K/V tile from shared memory once per 16 query
// rows, which caps the old kernel at ≈185 TFLOP/s on an H100 at 4,096 tokens. wgmma reads a K or
// V tile once per 64 rows, and TMA moves the tiles without the consumer warps' help.
//
// * Rows: a block owns kBM = 128 rows of one KV head: row r is query token i0 + r / G of head
//   kv_head·G + r % G (G = num_heads / num_kv_heads), so the G heads that read the same keys share
//   each K/V tile. Grid (query tiles of kBM / G tokens, num_kv_heads, num_seqs), the tiles with the
//   most keys first.
// * Pipeline: lane 0 of warp 8 (the producer) walks the block table and loads each 64-key tile of
//   K and V with TMA (boxes of 16 cache slots × 64 dims, 128-byte swizzle) into a ring of kStages
//   slots guarded by mbarriers. Warps 0–7 are two consumer warpgroups of 64 rows each: S = Q·Kᵀ
//   (wgmma m64n64k16, Q and K from shared memory), the online softmax on the accumulators, then
//   O += P·V (wgmma m64n128k16, P from registers, V transposed from shared memory). The S of
//   tile t + 1 is issued together with P·V of tile t, so the softmax overlaps the tensor cores.
// * Masks: per row, keys outside [window start, position] are set to −inf, only on tiles some row
//   of the warp does not fully see. A tile past the last key loads the last valid 16-key piece
//   again (no table entry past the context is read); its V rows are zeroed in shared memory so
//   that zero probabilities never meet whatever those slots hold.
// * Numerics as the mma.sync kernel: f32 scores and sums, P rounded to the storage dtype for P·V,
//   the max kept raw and exponentiated as 2^(s·scale·log2e − m·scale·log2e), one rounding of the
//   normalised output. A row that sees no key (an invalid context length) comes out as zeros.
// * Split keys (paged_attention_prefill_wgmma_split_d128_*): a few new tokens after a long cached
//   context make too few blocks for the GPU, so the launcher cuts each query tile's key tiles into
//   `splits` contiguous ranges, one block each (grid x = query tiles × splits). A block's range
//   starts on a tile boundary of the unsplit kernel's walk, so the masks and the TMA pieces are the
//   same. Instead of `out` it writes its rows' unnormalised output and softmax state (max in the
//   log2 domain, sum) as f32 partials [split][total_q][num_heads], the layout attention_prefill.cu's
//   prefill_merge combines; a range with no visible key writes (−inf, 0) and zeros. A template
//   parameter, so the unsplit kernel keeps its registers.
// * Cascade prefix (cascade_prefix_wgmma_d128_*): the shared-prefix pass of cascade decode
//   attention (attention_cascade.cu) on this pipeline. A group of sequences sharing a prefix
//   takes the place of a sequence: its members' query rows are consecutive in q, like a
//   sequence's tokens, and every row attends to the keys [0, prefix_len) of the group's first
//   member's table, masked by its own position (its context length - 1) and window. The keys are
//   split as above, one block per range, and each row's normalised output and (max in the log2
//   domain, sum) go to workspace slot `split` of its (sequence, head), the layout the cascade
//   merge reads.
//
// Launch contract: kThreads threads, kSharedBytes of dynamic shared memory, tensor maps of the K
// and V caches as 2-D [total_slots][num_kv_heads·128] tensors of T, box 64 × 16, 128-byte swizzle;
// block_size = 2^block_size_log2 ≥ 16; out 4-byte aligned.
#include "attention_mma.cuh"
#include "hopper.cuh"

namespace braid {
namespace attn_prefill_wgmma {

// These must match the constants of the same names in src/cuda/attention.rs.
constexpr int kWarpgroups = 2;
constexpr int kThreads = kWarpgroups * 128 + BRAID_WARP_SIZE;
constexpr int kStages = 4;
// Keys per K/V tile.
constexpr int kBN = 64;
// A tile is two halves of [64 keys][64 dims] (128-byte rows, swizzled): dims 0–63, then 64–127.
constexpr int kHalfBytes = kBN * 128;
constexpr int kTileBytes = 2 * kHalfBytes;
constexpr int kStageBytes = 2 * kTileBytes;  // K tile, then V tile
constexpr int kQBytes = 2 * 64 * 128;        // a warpgroup's 64 Q rows, same layout
constexpr int kBarrierBytes = 1024;
constexpr int kStagesOffset = kBarrierBytes;
constexpr int kQOffset = kStagesOffset + kStages * kStageBytes;
// + 1024 slack to round the dynamic shared memory base up to the swizzle period.
constexpr int kSharedBytes = 1024 + kQOffset + kWarpgroups * kQBytes;
static_assert(2 * kStages * 8 <= kBarrierBytes, "full and empty barriers fit their area");
static_assert(kSharedBytes <= 227 * 1024, "the ring and the Q tiles fit one block");

#if BRAID_HAS_WGMMA

constexpr int kD = 128;
// Rows of a block: 64 per consumer warpgroup.
constexpr int kBM = kWarpgroups * 64;
// Keys per TMA box: one 16-slot piece of a cache block.
constexpr int kPiece = 16;

using namespace hopper;
using attn_mma::fast_exp2;
using attn_mma::LOG2E;
using attn_mma::pack2;

// O[64 x 128] += P[64 x 16] · V[16 x 128]: P from registers (the m16n8k16 A layout per warp),
// V from shared memory transposed (imm-trans-b = 1: its rows are keys, the GEMM's K dimension).
#define BRAID_WGMMA_PV(TYPE)                                                                      \
    asm volatile(                                                                                 \
        "{\n\t.reg .pred p;\n\t"                                                                  \
        "setp.ne.b32 p, %69, 0;\n\t"                                                              \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                          \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                 \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "        \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "         \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "       \
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n\t}"                                             \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),     \
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),              \
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),           \
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),           \
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),           \
          "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),           \
          "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),           \
          "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),           \
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),           \
          "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),           \
          "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                                                   \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_v), "r"(1))

__device__ __forceinline__ void wgmma_pv(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_v,
                                         __nv_bfloat16) {
    BRAID_WGMMA_PV("bf16");
}
__device__ __forceinline__ void wgmma_pv(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_v,
                                         __half) {
    BRAID_WGMMA_PV("f16");
}
#undef BRAID_WGMMA_PV

__device__ __forceinline__ void fence_fragments(uint32_t (&p)[4][4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(p[i][j])::"memory");
}

// The V tile as the transposed B operand (PTX ISA "Matrix Descriptor Format", MN-major with the
// 128-byte swizzle): 64 dims of a key row are contiguous (one swizzle row), the next 64 dims are
// the second half (leading offset kHalfBytes), the next 8 keys 1024 bytes on (stride offset).
__device__ __forceinline__ uint64_t v_descriptor(uint32_t smem_addr) {
    return static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4) |
           (static_cast<uint64_t>(kHalfBytes >> 4) << 16) |
           (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// Byte offset of k-step ks (16 dims) in a K-major [64 rows][128 dims] tile: +32 B inside the
// 128-byte row (the hardware applies the swizzle), the second half from dims 64 on.
__device__ __forceinline__ constexpr uint32_t kstep_offset(int ks) {
    return (ks >> 2) * kHalfBytes + (ks & 3) * 32;
}

// S = Q·Kᵀ for the warpgroup's 64 rows and one 64-key tile: 8 k-steps of 16 dims.
template <typename T>
__device__ __forceinline__ void issue_s(float (&s)[32], uint32_t q_tile, uint32_t k_tile) {
    const uint64_t dq = smem_descriptor(q_tile);
    const uint64_t dk = smem_descriptor(k_tile);
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) {
        wgmma_m64n64k16(s, dq + (kstep_offset(ks) >> 4), dk + (kstep_offset(ks) >> 4), ks > 0, T());
    }
}

// O += P·V for one 64-key tile: 4 k-steps of 16 keys (2048 bytes of V each).
template <typename T>
__device__ __forceinline__ void issue_pv(float (&o)[64], const uint32_t (&p)[4][4], uint32_t v_tile) {
    const uint64_t dv = v_descriptor(v_tile);
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) wgmma_pv(o, p[kc], dv + ((kc * 2048) >> 4), T());
}

// Online softmax over one S tile for the thread's two rows (raw dot products in, probabilities
// out in s). Keys outside [lo, hi] are masked first. corr: the factor that rescales the row's
// output and sum. m stays raw (unscaled); a row that has seen nothing exponentiates against 0.
__device__ __forceinline__ void softmax_tile(float (&s)[32], float (&m)[2], float (&l)[2],
                                             float (&corr)[2], int kv0, const int (&lo)[2],
                                             const int (&hi)[2], float sl2, int t4) {
    bool need = false;
#pragma unroll
    for (int i = 0; i < 2; ++i) need |= kv0 < lo[i] || kv0 + kBN - 1 > hi[i];
    if (__any_sync(0xffffffffu, need)) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int key = kv0 + 8 * j + 2 * t4 + c;
                    if (key < lo[i] || key > hi[i]) s[4 * j + 2 * i + c] = -INFINITY;
                }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float mx = m[i];
#pragma unroll
        for (int j = 0; j < 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * i], s[4 * j + 2 * i + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float ref = mx == -INFINITY ? 0.0f : mx * sl2;
        corr[i] = fast_exp2(m[i] * sl2 - ref);
        m[i] = mx;
        float sum = l[i] * corr[i];
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const float p = fast_exp2(fmaf(s[4 * j + 2 * i + c], sl2, -ref));
                s[4 * j + 2 * i + c] = p;
                sum += p;
            }
        l[i] = sum;
    }
}

// ptxas hoists wgmma.wait_group (it has no register operands) to the top of the softmax, which
// would serialise the softmax of tile t + 1 and P·V of tile t. A branch on the row sums, which
// need every exponential, ends the basic block so the wait stays after the softmax. Never taken
// for finite inputs, and harmless if it is.
__device__ __forceinline__ void schedule_fence(const float (&l)[2]) {
    if (__any_sync(0xffffffffu, !(l[0] >= 0.0f) || !(l[1] >= 0.0f))) asm volatile("nanosleep.u32 0;");
}

// The S accumulator columns 16kc..16kc+15 as the A fragment of P·V k-step kc.
template <typename T>
__device__ __forceinline__ void to_fragments(uint32_t (&p)[4][4], const float (&s)[32]) {
#pragma unroll
    for (int kc = 0; kc < 4; ++kc)
#pragma unroll
        for (int r = 0; r < 4; ++r) p[kc][r] = pack2(s[8 * kc + 2 * r], s[8 * kc + 2 * r + 1], T());
}

#endif  // BRAID_HAS_WGMMA

template <typename T, bool kSplit, bool kCascade>
__device__ __forceinline__ void prefill(const CUtensorMap& tm_k, const CUtensorMap& tm_v,
                                        const T* __restrict__ q,
                                        const uint32_t* __restrict__ block_tables,
                                        const uint32_t* __restrict__ q_starts,
                                        const uint32_t* __restrict__ context_lens,
                                        T* __restrict__ out, float* __restrict__ partial_o,
                                        float* __restrict__ partial_ml, int splits, int total_q,
                                        int num_heads, int num_kv_heads, int block_size_log2,
                                        int max_blocks_per_seq, float scale, int sliding_window,
                                        const uint32_t* __restrict__ prefix_lens, int num_slots) {
#if BRAID_HAS_WGMMA
    const int group = num_heads / num_kv_heads;
    const int tokens_per_tile = kBM / group;
    // The unsplit kernel is instantiated with splits = 1, for which these are its own indices.
    const int split = static_cast<int>(blockIdx.x) % splits;
    const int q_tile = static_cast<int>(gridDim.x) / splits - 1 - static_cast<int>(blockIdx.x) / splits;
    const int kv_head = blockIdx.y;
    const int seq = blockIdx.z;
    const uint32_t q_first = q_starts[seq];
    const uint32_t q_next = min(q_starts[seq + 1], static_cast<uint32_t>(total_q));
    if (q_next <= q_first) return;
    const int q_len = static_cast<int>(q_next - q_first);
    const int i0 = q_tile * tokens_per_tile;
    if (i0 >= q_len) return;
    const int tokens = min(tokens_per_tile, q_len - i0);
    const int rows = tokens * group;

    // Keys [kv_begin, kv_end) in 64-key tiles; kv_begin is a multiple of 16 so that every TMA
    // box is one piece of one cache block. 64-bit first: a context length below q_len (an invalid
    // input) must give empty rows, not overflow.
    const int capacity = max_blocks_per_seq << block_size_log2;
    long long pos_first_ll = 0;
    int kv_begin = 0;
    int kv_end = 0;
    if constexpr (kCascade) {
        // The shared prefix, whole: each row's own position and window are applied by its mask.
        kv_end = static_cast<int>(min(prefix_lens[seq], static_cast<uint32_t>(capacity)));
    } else {
        pos_first_ll = static_cast<long long>(context_lens[seq]) - q_len + i0;
        const int pos_first = static_cast<int>(max(-1LL, min(pos_first_ll, static_cast<long long>(capacity))));
        const int pos_last = static_cast<int>(
            max(-1LL, min(pos_first_ll + tokens - 1, static_cast<long long>(capacity) - 1)));
        kv_end = pos_last + 1;
        const int kv_lo = sliding_window > 0 ? max(0, pos_first - sliding_window + 1) : 0;
        kv_begin = min(kv_lo, kv_end) & ~(kPiece - 1);
    }
    int num_tiles = kv_end > kv_begin ? (kv_end - kv_begin + kBN - 1) / kBN : 0;
    if constexpr (kSplit || kCascade) {
        // This block's tiles of the walk above: [first, first + num_tiles), as keys.
        const int per_split = (num_tiles + splits - 1) / splits;
        const int first = min(num_tiles, split * per_split);
        const int last = min(num_tiles, first + per_split);
        kv_begin += first * kBN;
        kv_end = min(kv_end, kv_begin + (last - first) * kBN);
        num_tiles = last - first;
    }

    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    uint8_t* const base_ptr = smem_raw + (base - raw);
    const uint32_t full = base;
    const uint32_t empty = base + 8 * kStages;
    const uint32_t ring = base + kStagesOffset;

    const int tid = threadIdx.x;
    const int warp = tid / BRAID_WARP_SIZE;
    const int lane = tid % BRAID_WARP_SIZE;

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < kStages; ++s) {
            mbar_init(full + 8 * s, 1);                // the producer's arrive, plus the TMA bytes
            mbar_init(empty + 8 * s, 4 * kWarpgroups);  // lane 0 of every consumer warp
        }
        fence_mbar_init();
    }
    __syncthreads();

    if (warp == 4 * kWarpgroups) {
        // ---- producer warp: lanes look up 32 pieces (8 tiles) of the block table at a time ----
        if (num_tiles == 0) return;
        if (lane == 0) {
            prefetch_tensor_map(&tm_k);
            prefetch_tensor_map(&tm_v);
        }
        // K and V are read again by the other query tiles of this KV head: keep them in L2.
        const uint64_t keep = policy_evict_last();
        // A cascade group's prefix is read through its first member's table.
        const uint32_t* table = block_tables + static_cast<size_t>(kCascade ? q_first : seq) * max_blocks_per_seq;
        const int block_mask = (1 << block_size_log2) - 1;
        const int last_piece = (kv_end - 1) & ~(kPiece - 1);
        for (int t0 = 0; t0 < num_tiles; t0 += 8) {
            int slot = 0;
            const int piece = t0 * 4 + lane;
            if (piece < num_tiles * 4) {
                int j = kv_begin + piece * kPiece;
                if (j >= kv_end) j = last_piece;
                slot = static_cast<int>((table[j >> block_size_log2] << block_size_log2) + (j & block_mask));
            }
            const int t_end = min(t0 + 8, num_tiles);
            for (int t = t0; t < t_end; ++t) {
                int slots[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) slots[i] = __shfl_sync(0xffffffffu, slot, (t - t0) * 4 + i);
                if (lane == 0) {
                    const int s = t % kStages;
                    if (t >= kStages) mbar_wait(empty + 8 * s, (t / kStages - 1) & 1);
                    mbar_arrive_expect_tx(full + 8 * s, kStageBytes);
                    const uint32_t dk = ring + s * kStageBytes;
                    const uint32_t dv = dk + kTileBytes;
#pragma unroll
                    for (int i = 0; i < 4; ++i)
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const int c0 = kv_head * kD + h * 64;
                            const uint32_t off = h * kHalfBytes + i * kPiece * 128;
                            tma_load_2d(dk + off, &tm_k, c0, slots[i], full + 8 * s, keep);
                            tma_load_2d(dv + off, &tm_v, c0, slots[i], full + 8 * s, keep);
                        }
                }
                __syncwarp();
            }
        }
        return;
    }

    // ---- consumer warpgroups: warpgroup wg owns rows [64·wg, 64·wg + 64) ----
    const int wg = warp / 4;
    const int wq = warp % 4;
    const int wtid = tid % 128;
    const int g = lane / 4;
    const int t4 = lane % 4;
    const float sl2 = scale * LOG2E;
    const size_t row_stride = static_cast<size_t>(num_heads) * kD;
    uint8_t* const sq = base_ptr + kQOffset + wg * kQBytes;
    const uint32_t sq_addr = base + kQOffset + wg * kQBytes;
    const int r0 = wg * 64;

    // Q rows into the K-major 128-byte-swizzled layout wgmma reads: 16-byte chunk c of row r
    // (dims 8c..8c+7) in half c / 8 at chunk (c % 8) ^ (r % 8). Rows past the tile are zeros.
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int idx = wtid + i * 128;
        const int r = idx / 16;
        const int c = idx % 16;
        const int row = r0 + r;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (row < rows) {
            const size_t token = q_first + i0 + row / group;
            const int head = kv_head * group + row % group;
            v = *reinterpret_cast<const uint4*>(q + token * row_stride + static_cast<size_t>(head) * kD + c * 8);
        }
        *reinterpret_cast<uint4*>(sq + (c / 8) * kHalfBytes + r * 128 + (((c % 8) ^ (r % 8)) << 4)) = v;
    }
    fence_proxy_async_smem();  // generic stores, then wgmma (async proxy) reads
    if (wg == 0) {
        named_barrier<2, 128>();
    } else {
        named_barrier<3, 128>();
    }

    // The thread's two rows: visible keys [lo, hi]. Padding rows see every key of the range, so
    // they never force the mask.
    int lo[2], hi[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = r0 + wq * 16 + g + 8 * i;
        if (row < rows) {
            const long long pos =
                kCascade ? static_cast<long long>(min(context_lens[q_first + i0 + row / group],
                                                      static_cast<uint32_t>(capacity))) - 1
                         : pos_first_ll + row / group;
            const long long first = sliding_window > 0 ? pos - sliding_window + 1 : 0;
            hi[i] = static_cast<int>(max(-1LL, min(pos, static_cast<long long>(kv_end) - 1)));
            lo[i] = static_cast<int>(max(static_cast<long long>(kv_begin), min(first, static_cast<long long>(kv_end))));
        } else {
            lo[i] = kv_begin;
            hi[i] = kv_end - 1;
        }
    }

    // Waits for tile t; a partial last tile gets its V rows past kv_end zeroed, and the consumer
    // barrier makes every row zero before either warpgroup's P·V reads it.
    auto wait_tile = [&](int t) {
        const int s = t % kStages;
        mbar_wait(full + 8 * s, (t / kStages) & 1);
        const int valid = kv_end - (kv_begin + t * kBN);
        if (valid < kBN) {
            uint8_t* const v = base_ptr + kStagesOffset + s * kStageBytes + kTileBytes;
            for (int i = tid; i < (kBN - valid) * 16; i += 128 * kWarpgroups) {
                const int r = valid + i / 16;
                const int c = i % 16;
                *reinterpret_cast<uint4*>(v + (c / 8) * kHalfBytes + r * 128 + (c % 8) * 16) = make_uint4(0, 0, 0, 0);
            }
            fence_proxy_async_smem();
            named_barrier<1, 128 * kWarpgroups>();
        }
    };
    auto release = [&](int t) {
        if (lane == 0) mbar_arrive(empty + 8 * (t % kStages));
    };

    float s[32];
    float o[64];
    uint32_t p[4][4];
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.0f, 0.0f};
    float corr[2];
#pragma unroll
    for (int i = 0; i < 32; ++i) s[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.0f;

    if (num_tiles > 0) {
        // Tile 0: S, softmax, P; nothing to rescale yet.
        wait_tile(0);
        fence_accumulators(s);
        wgmma_fence();
        issue_s<T>(s, sq_addr, ring);
        wgmma_commit();
        wgmma_wait<0>();
        fence_accumulators(s);
        softmax_tile(s, m, l, corr, kv_begin, lo, hi, sl2, t4);
        to_fragments<T>(p, s);

        // Steady state: S(t + 1) and P·V(t) in flight together; the softmax of t + 1 overlaps
        // P·V(t) on the tensor cores.
        for (int t = 0; t + 1 < num_tiles; ++t) {
            const uint32_t cur = ring + (t % kStages) * kStageBytes;
            const uint32_t nxt = ring + ((t + 1) % kStages) * kStageBytes;
            wait_tile(t + 1);
            fence_accumulators(s);
            fence_accumulators(o);
            fence_fragments(p);
            wgmma_fence();
            issue_s<T>(s, sq_addr, nxt);
            wgmma_commit();
            issue_pv<T>(o, p, cur + kTileBytes);
            wgmma_commit();
            wgmma_wait<1>();  // S(t + 1) done; P·V(t) may still run
            fence_accumulators(s);
            softmax_tile(s, m, l, corr, kv_begin + (t + 1) * kBN, lo, hi, sl2, t4);
            schedule_fence(l);
            wgmma_wait<0>();  // P·V(t) done: its slot and P are free, O may be rescaled
            fence_accumulators(o);
            fence_fragments(p);
            release(t);
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                o[4 * j + 0] *= corr[0];
                o[4 * j + 1] *= corr[0];
                o[4 * j + 2] *= corr[1];
                o[4 * j + 3] *= corr[1];
            }
            to_fragments<T>(p, s);
        }
        const int last = num_tiles - 1;
        fence_accumulators(o);
        fence_fragments(p);
        wgmma_fence();
        issue_pv<T>(o, p, ring + (last % kStages) * kStageBytes + kTileBytes);
        wgmma_commit();
        wgmma_wait<0>();
        fence_accumulators(o);
        release(last);
    }

    // ---- rows g and g + 8 of this warp: normalise and store, or store the partials ----
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float sum = l[i];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int row = r0 + wq * 16 + g + 8 * i;
        if (row >= rows) continue;
        const size_t token = q_first + i0 + row / group;
        const int head = kv_head * group + row % group;
        if constexpr (kSplit || kCascade) {
            // Recomputed rather than kept live through the loop, which runs at the register cap.
            const int my_split = static_cast<int>(blockIdx.x) % splits;
            // Split: unnormalised partials [split][total_q][num_heads]. Cascade: the normalised
            // output in slot `split` of (sequence, head) of the cascade workspace, written even
            // when empty (zeros, -inf): the cascade merge reads every prefix slot.
            const size_t unit = kCascade ? (token * num_heads + head) * num_slots + my_split
                                         : (static_cast<size_t>(my_split) * total_q + token) * num_heads + head;
            const float scale_out = kCascade ? (sum > 0.0f ? 1.0f / sum : 0.0f) : 1.0f;
            float* dst = partial_o + unit * kD + 2 * t4;
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                *reinterpret_cast<float2*>(dst + 8 * j) =
                    make_float2(o[4 * j + 2 * i] * scale_out, o[4 * j + 2 * i + 1] * scale_out);
            }
            if (t4 == 0) {
                const float max_log2 = m[i] == -INFINITY ? -INFINITY : m[i] * sl2;
                *reinterpret_cast<float2*>(partial_ml + unit * 2) = make_float2(max_log2, sum);
            }
            continue;
        }
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        T* dst = out + token * row_stride + static_cast<size_t>(head) * kD + 2 * t4;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            *reinterpret_cast<uint32_t*>(dst + 8 * j) = pack2(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv, T());
        }
    }
#else
    // wgmma and TMA exist only on sm_90a; the launcher never sends other devices here.
    __trap();
#endif
}

}  // namespace attn_prefill_wgmma
}  // namespace braid

// Both variants take the same arguments: the unsplit one writes `out` and ignores the partials
// and `splits`, the split one writes the partials and ignores `out`.
#define BRAID_DEFINE_PREFILL_WGMMA_VARIANT(T, NAME, SPLIT)                                            \
    extern "C" __global__ void __launch_bounds__(braid::attn_prefill_wgmma::kThreads, 1) NAME(       \
        const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v,         \
        const T* __restrict__ q, const uint32_t* __restrict__ block_tables,                         \
        const uint32_t* __restrict__ q_starts, const uint32_t* __restrict__ context_lens,           \
        T* __restrict__ out, float* __restrict__ partial_o, float* __restrict__ partial_ml,         \
        int splits, int total_q, int num_heads, int num_kv_heads, int block_size_log2,              \
        int max_blocks_per_seq, float scale, int sliding_window) {                                  \
        braid::attn_prefill_wgmma::prefill<T, SPLIT, false>(                                        \
            tm_k, tm_v, q, block_tables, q_starts, context_lens, out, partial_o, partial_ml,        \
            SPLIT ? splits : 1, total_q, num_heads, num_kv_heads, block_size_log2,                  \
            max_blocks_per_seq, scale, sliding_window, nullptr, 0);                                 \
    }

// The cascade prefix pass: grid (query tiles x prefix_slots, num_kv_heads, num_groups); ws_o and
// ws_ml are the cascade workspace's partial outputs and states, num_slots slots a (sequence, head).
#define BRAID_DEFINE_CASCADE_PREFIX_WGMMA(T, SUFFIX)                                                 \
    extern "C" __global__ void __launch_bounds__(braid::attn_prefill_wgmma::kThreads, 1)             \
        cascade_prefix_wgmma_d128_##SUFFIX(                                                          \
            const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v,     \
            const T* __restrict__ q, const uint32_t* __restrict__ block_tables,                     \
            const uint32_t* __restrict__ group_starts, const uint32_t* __restrict__ context_lens,   \
            const uint32_t* __restrict__ prefix_lens, float* __restrict__ ws_o,                     \
            float* __restrict__ ws_ml, int prefix_slots, int num_seqs, int num_heads,               \
            int num_kv_heads, int block_size_log2, int max_blocks_per_seq, float scale,             \
            int sliding_window, int num_slots) {                                                    \
        braid::attn_prefill_wgmma::prefill<T, false, true>(                                         \
            tm_k, tm_v, q, block_tables, group_starts, context_lens, nullptr, ws_o, ws_ml,          \
            prefix_slots, num_seqs, num_heads, num_kv_heads, block_size_log2, max_blocks_per_seq,   \
            scale, sliding_window, prefix_lens, num_slots);                                         \
    }

#define BRAID_DEFINE_PREFILL_WGMMA(T, SUFFIX)                                                       \
    BRAID_DEFINE_PREFILL_WGMMA_VARIANT(T, paged_attention_prefill_wgmma_d128_##SUFFIX, false)       \
    BRAID_DEFINE_PREFILL_WGMMA_VARIANT(T, paged_attention_prefill_wgmma_split_d128_##SUFFIX, true)

BRAID_DEFINE_PREFILL_WGMMA(__half, f16)
BRAID_DEFINE_PREFILL_WGMMA(__nv_bfloat16, bf16)
BRAID_DEFINE_CASCADE_PREFIX_WGMMA(__half, f16)
BRAID_DEFINE_CASCADE_PREFIX_WGMMA(__nv_bfloat16, bf16)
