// Token selection on the GPU, so only token ids cross to the host: argmax_* (greedy) and sample_*
// (temperature -> top-k -> top-p -> min-p -> categorical draw, Hugging Face's order), one block
// or one cluster of blocks per sequence.
//
// Design:
// - Every pass streams the row from global memory (it stays in L2). Each thread takes chunks of
//   SAMPLE_CHUNK consecutive ids and issues SAMPLE_BATCH chunk loads before using any, so enough
//   bytes are in flight for one block to stream a row quickly.
// - Thresholds are exact: top-k and top-p are radix selects (three passes each, 11/11/10-bit
//   digits, shared-memory histograms) over the order-preserving integer image of the f32
//   logits. Top-k first finds a lower bound for its threshold, the k-th largest of the threads'
//   own maxima (those are k distinct tokens), so only tokens above it enter the histograms.
// - The temperature never divides a logit: selections compare the raw logits (dividing by a
//   positive temperature keeps their order), and a token's weight is exp((x - max) / T) computed
//   as one ex2 of (x - max) * log2(e) / T.
// - Probability mass is summed in 40-bit fixed point (weight <= 1 times 2^40) in integers: the
//   sums are exact and independent of the order of atomics and reductions, so a draw is a pure
//   function of (logits, params, seed, step).
// - The draw scans the kept tokens in id order: per-segment (128 ids) masses go to shared memory,
//   block scans find the segment holding the target, and one warp resolves the token inside it.
// - One block per row is slow when rows are few (a pass over 151936 logits takes one SM ~18 us),
//   so for small and mid-sized batches the *_clusterCL_* kernels give each row a thread-block
//   cluster of CL blocks (sm_90+): passes split over the cluster, and the reductions and
//   histograms are combined through distributed shared memory. The code is the same, templated
//   on the number of blocks per row.
#include <cooperative_groups.h>

#include "common.cuh"

// Mirrored in src/cuda/sampling.rs (BLOCK_THREADS, SAMPLE_MAX_VOCAB).
#define SAMPLE_BLOCK_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_BLOCK_THREADS / BRAID_WARP_SIZE)
#define SAMPLE_CHUNK 4
#define SAMPLE_SEGMENT (SAMPLE_CHUNK * BRAID_WARP_SIZE)
#define SAMPLE_BATCH 8
// Shared memory holds one 8-byte entry per segment: 5632 * 8 = 44 KiB, under the 48 KiB a block
// gets without opting in. That caps the vocabulary at 5632 * 128 = 720896 ids.
#define SAMPLE_MAX_SEGMENTS 5632
#define SAMPLE_RADIX_BINS 2048
// Keys of a block's top-k candidates, kept in the segment table's space after the histograms.
#define SAMPLE_MAX_CANDIDATES 4096
#define SAMPLE_FIXED_ONE 1099511627776.0f  // 2^40
// Below this temperature a row decodes greedily, as on the CPU.
#define SAMPLE_MIN_TEMPERATURE 1e-5f
// Cluster kernels come in two widths, instantiated at the end of this file: *_cluster8_* (the
// portable maximum cluster size) for the smallest batches, *_cluster2_* for mid-sized ones; the
// choice is made in src/cuda/sampling.rs.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define SAMPLE_HAS_CLUSTERS 0
#define SAMPLE_CLUSTER_DIMS(CL)
#else
#define SAMPLE_HAS_CLUSTERS 1
#define SAMPLE_CLUSTER_DIMS(CL) __cluster_dims__(CL, 1, 1)
#endif

static_assert(2 * SAMPLE_RADIX_BINS + SAMPLE_MAX_CANDIDATES <= 2 * SAMPLE_MAX_SEGMENTS,
              "histograms and candidates share the segment table");
static_assert(SAMPLE_RADIX_BINS % SAMPLE_BLOCK_THREADS == 0, "each thread scans whole bins");
static_assert(SAMPLE_BLOCK_THREADS == BRAID_WARP_SIZE * BRAID_WARP_SIZE, "two-level scans");

namespace braid {

// The blocks that share one row: one plain block, or a cluster of CL blocks.
template <int CL> struct RowBlocks;

template <> struct RowBlocks<1> {
    static constexpr int THREADS = SAMPLE_BLOCK_THREADS;
    __device__ __forceinline__ static unsigned rank() { return 0; }
    __device__ __forceinline__ static void sync() { __syncthreads(); }
    template <typename X> __device__ __forceinline__ static X* at(X* p, unsigned) { return p; }
};

#if SAMPLE_HAS_CLUSTERS
template <int CL> struct RowBlocks {
    static_assert(CL > 1, "one block per row is the specialisation above");
    static constexpr int THREADS = CL * SAMPLE_BLOCK_THREADS;
    __device__ __forceinline__ static unsigned rank() { return cooperative_groups::this_cluster().block_rank(); }
    // Orders shared-memory writes of every block of the cluster before the reads after it.
    __device__ __forceinline__ static void sync() { cooperative_groups::this_cluster().sync(); }
    // The same shared variable in block `r` of the cluster.
    template <typename X> __device__ __forceinline__ static X* at(X* p, unsigned r) {
        return cooperative_groups::this_cluster().map_shared_rank(p, r);
    }
};
#endif

// One row's sampling parameters; layout mirrored by `SamplingRow` in src/cuda/sampling.rs.
struct SamplingRow {
    float temperature;
    uint32_t top_k;
    float top_p;
    float min_p;
    unsigned long long seed;
    unsigned long long step;
};
static_assert(sizeof(SamplingRow) == 32, "SamplingRow layout");

template <typename T> struct alignas(SAMPLE_CHUNK * sizeof(T)) Chunk {
    T v[SAMPLE_CHUNK];
};

// Whether whole chunks of this row can be loaded with one vector access each.
template <typename T> __device__ __forceinline__ bool is_chunk_aligned(const T* p) {
    return (reinterpret_cast<uintptr_t>(p) % (SAMPLE_CHUNK * sizeof(T))) == 0;
}

// Raw logits of chunk `c`; returns how many of its ids lie inside the row (0 past the end).
template <typename T>
__device__ __forceinline__ int load_raw(const T* __restrict__ row, int vocab, bool aligned, int c, Chunk<T>& out) {
    const int base = c * SAMPLE_CHUNK;
    if (base >= vocab) return 0;
    const int count = min(SAMPLE_CHUNK, vocab - base);
    if (aligned && count == SAMPLE_CHUNK) {
        out = *reinterpret_cast<const Chunk<T>*>(row + base);
    } else {
#pragma unroll
        for (int e = 0; e < SAMPLE_CHUNK; ++e) out.v[e] = e < count ? row[base + e] : from_float<T>(0.0f);
    }
    return count;
}

// NaN becomes -inf (fmaxf returns the number), -0 becomes +0 so that equal values have equal
// keys, and ids past the row become -inf.
template <typename T>
__device__ __forceinline__ void clean_chunk(const Chunk<T>& raw, int count, float (&x)[SAMPLE_CHUNK]) {
#pragma unroll
    for (int e = 0; e < SAMPLE_CHUNK; ++e) {
        x[e] = e < count ? __fadd_rn(fmaxf(to_float(raw.v[e]), -INFINITY), 0.0f) : -INFINITY;
    }
}

// Calls f(c, x, count) for every chunk c of the row owned by this thread (c = its index among the
// row's threads, modulo their number), SAMPLE_BATCH chunks at a time whose loads are all issued
// before the first use. All lanes of a warp make the same calls (count 0 past the end), so f may
// use warp collectives; the 32 chunks of one call of a warp are consecutive.
template <int CL, typename T, typename F>
__device__ __forceinline__ void for_each_chunk(const T* __restrict__ row, int vocab, bool aligned, F&& f) {
    const int chunks = (vocab + SAMPLE_CHUNK - 1) / SAMPLE_CHUNK;
    constexpr int stride = RowBlocks<CL>::THREADS;
    const int lane = threadIdx.x % BRAID_WARP_SIZE;
    const int first = static_cast<int>(RowBlocks<CL>::rank()) * SAMPLE_BLOCK_THREADS + threadIdx.x;
    for (int c0 = first; c0 - lane < chunks; c0 += SAMPLE_BATCH * stride) {
        Chunk<T> raw[SAMPLE_BATCH];
        int count[SAMPLE_BATCH];
#pragma unroll
        for (int b = 0; b < SAMPLE_BATCH; ++b) count[b] = load_raw(row, vocab, aligned, c0 + b * stride, raw[b]);
#pragma unroll
        for (int b = 0; b < SAMPLE_BATCH; ++b) {
            float x[SAMPLE_CHUNK];
            clean_chunk(raw[b], count[b], x);
            f(c0 + b * stride, x, count[b]);
        }
    }
}

// Order-preserving map from f32 to u32: a < b as floats iff key(a) < key(b) (no NaN here).
__device__ __forceinline__ uint32_t float_key(float v) {
    const uint32_t bits = __float_as_uint(v);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

// Softmax weights of one row relative to its maximum token.
struct Weights {
    float row_max;
    float log2_scale;  // log2(e) / temperature

    // exp((x - max) / T) in [0, 1]; the max token weighs exactly 1. ex2.approx is within 2 ulp,
    // far finer than any sampling decision, and the same inputs always give the same bits.
    __device__ __forceinline__ float weight(float x) const {
        float w;
        asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(w) : "f"(__fmul_rn(__fsub_rn(x, row_max), log2_scale)));
        return w;
    }

    // A weight (or a sum of at most a few of them) in 40-bit fixed point: a whole row fits 64 bits.
    __device__ __forceinline__ static unsigned long long fixed(float w) {
        return __float2ull_rz(w * SAMPLE_FIXED_ONE);
    }
};

__device__ __forceinline__ unsigned long long warp_sum_u64(unsigned long long v) {
#pragma unroll
    for (int offset = BRAID_WARP_SIZE / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ unsigned long long warp_inclusive_scan_u64(unsigned long long v) {
    const int lane = threadIdx.x % BRAID_WARP_SIZE;
#pragma unroll
    for (int offset = 1; offset < BRAID_WARP_SIZE; offset <<= 1) {
        const unsigned long long up = __shfl_up_sync(0xffffffffu, v, offset);
        if (lane >= offset) v += up;
    }
    return v;
}

// Larger value wins; among equal values the lower id, as the CPU argmax does.
__device__ __forceinline__ void argmax_merge(float& best, int& best_id, float v, int id) {
    if (v > best || (v == best && id < best_id)) {
        best = v;
        best_id = id;
    }
}

// Exclusive prefix sum of one value per thread, in thread order; `total` gets the block's sum.
// Safe to call repeatedly: the scratch read after the second barrier is never the one the next
// call writes before its first.
__device__ __forceinline__ unsigned long long block_exclusive_scan_u64(unsigned long long v,
                                                                       unsigned long long& total) {
    __shared__ unsigned long long warp_totals[SAMPLE_WARPS];
    __shared__ unsigned long long warp_offsets[SAMPLE_WARPS + 1];
    const int lane = threadIdx.x % BRAID_WARP_SIZE;
    const int warp = threadIdx.x / BRAID_WARP_SIZE;
    const unsigned long long inclusive = warp_inclusive_scan_u64(v);
    if (lane == BRAID_WARP_SIZE - 1) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        const unsigned long long t = warp_totals[lane];
        const unsigned long long scanned = warp_inclusive_scan_u64(t);
        warp_offsets[lane] = scanned - t;
        if (lane == BRAID_WARP_SIZE - 1) warp_offsets[SAMPLE_WARPS] = scanned;
    }
    __syncthreads();
    total = warp_offsets[SAMPLE_WARPS];
    return warp_offsets[warp] + inclusive - v;
}

// Max of the row and the lowest id holding it; `thread_max` gets this thread's own maximum over the
// chunks it read (-inf when it read none).
template <int CL, typename T>
__device__ __forceinline__ void row_argmax(const T* __restrict__ row, int vocab, bool aligned, float& max_out,
                                           int& id_out, float& thread_max) {
    __shared__ float warp_best[SAMPLE_WARPS];
    __shared__ int warp_best_id[SAMPLE_WARPS];
    __shared__ float result_best;
    __shared__ int result_id;
    const int lane = threadIdx.x % BRAID_WARP_SIZE;
    const int warp = threadIdx.x / BRAID_WARP_SIZE;
    float best = -INFINITY;
    int best_id = 0x7fffffff;
    for_each_chunk<CL>(row, vocab, aligned, [&](int c, const float (&x)[SAMPLE_CHUNK], int count) {
#pragma unroll
        for (int e = 0; e < SAMPLE_CHUNK; ++e) {
            if (e < count) argmax_merge(best, best_id, x[e], c * SAMPLE_CHUNK + e);
        }
    });
    thread_max = best;
#pragma unroll
    for (int offset = BRAID_WARP_SIZE / 2; offset > 0; offset >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best, offset);
        const int id = __shfl_xor_sync(0xffffffffu, best_id, offset);
        argmax_merge(best, best_id, v, id);
    }
    if (lane == 0) {
        warp_best[warp] = best;
        warp_best_id[warp] = best_id;
    }
    __syncthreads();
    if (warp == 0) {
        best = warp_best[lane];
        best_id = warp_best_id[lane];
#pragma unroll
        for (int offset = BRAID_WARP_SIZE / 2; offset > 0; offset >>= 1) {
            const float v = __shfl_xor_sync(0xffffffffu, best, offset);
            const int id = __shfl_xor_sync(0xffffffffu, best_id, offset);
            argmax_merge(best, best_id, v, id);
        }
        if (lane == 0) {
            result_best = best;
            result_id = best_id;
        }
    }
    RowBlocks<CL>::sync();
    best = result_best;
    best_id = result_id;
    if (CL > 1) {
        // Every block merges all blocks' results in rank order, so all agree; the second barrier
        // keeps each block's shared memory alive until the others have read it.
        for (int r = 0; r < CL; ++r) {
            argmax_merge(best, best_id, *RowBlocks<CL>::at(&result_best, r), *RowBlocks<CL>::at(&result_id, r));
        }
        RowBlocks<CL>::sync();
    }
    max_out = best;
    id_out = best_id;
}

// Radix select over the candidates that `visit(add)` reports as add(key, x). With COUNT, finds the
// key of the `target`-th largest (duplicates counted). Otherwise sets `target` to
// clamp(floor(top_p * total weight), 1, total) and finds the largest key v whose candidates with
// key >= v weigh at least `target`, returning in `mass_above` the weight of those with key > v.
// The COUNT target must not exceed the number of candidates.
//
// `hist` is 2 * SAMPLE_RADIX_BINS words of shared memory. Counts use one 32-bit atomic; weights
// use two (low word, then high word plus the carry the low add reported), which keeps every sum
// exact without 64-bit shared-memory atomics.
template <bool COUNT, int CL, typename Visit>
__device__ uint32_t radix_select(Visit&& visit, const Weights& weights, float top_p, uint32_t* hist,
                                 unsigned long long& target, unsigned long long& mass_above) {
    __shared__ uint32_t found_digit;
    __shared__ unsigned long long found_above;
    uint32_t* hist_lo = hist;
    uint32_t* hist_hi = hist + SAMPLE_RADIX_BINS;
    uint32_t prefix = 0;
    uint32_t prefix_mask = 0;
    unsigned long long remaining = target;
    mass_above = 0;
#pragma unroll 1
    for (int level = 0; level < 3; ++level) {
        // Digits of 11, 11 and 10 bits, most significant first.
        const int shift = level == 0 ? 21 : (level == 1 ? 10 : 0);
        const uint32_t bins = level == 2 ? 1024u : 2048u;
        for (uint32_t b = threadIdx.x; b < bins; b += blockDim.x) {
            hist_lo[b] = 0;
            hist_hi[b] = 0;
        }
        // Each block fills only its own histogram; the others read it after the row barrier
        // below, and their reads of the previous level ended before the barrier closing it.
        __syncthreads();
        visit([&](uint32_t key, float x) {
            if ((key & prefix_mask) != prefix) return;
            const uint32_t digit = (key >> shift) & (bins - 1);
            if (COUNT) {
                atomicAdd(&hist_lo[digit], 1u);
            } else {
                const unsigned long long w = Weights::fixed(weights.weight(x));
                if (w == 0) return;
                const uint32_t lo = static_cast<uint32_t>(w);
                const uint32_t old = atomicAdd(&hist_lo[digit], lo);
                const uint32_t hi = static_cast<uint32_t>(w >> 32) + (old + lo < old ? 1u : 0u);
                if (hi != 0) atomicAdd(&hist_hi[digit], hi);
            }
        });
        RowBlocks<CL>::sync();
        // Bins from the largest digit down: thread t owns reversed positions [t*per, (t+1)*per).
        // A bin's value sums the row's blocks in rank order. Each is read once, every block's
        // words requested before the first is added: a read of another block's shared memory
        // is a round trip through the cluster.
        constexpr int kMaxPer = SAMPLE_RADIX_BINS / SAMPLE_BLOCK_THREADS;
        const int per = bins / blockDim.x;
        unsigned long long bin_values[kMaxPer];
#pragma unroll
        for (int j = 0; j < kMaxPer; ++j) {
            bin_values[j] = 0;
            if (j >= per) continue;
            const uint32_t b = bins - 1 - (threadIdx.x * per + j);
            uint32_t lo[CL];
            uint32_t hi[CL];
#pragma unroll
            for (int r = 0; r < CL; ++r) {
                lo[r] = *RowBlocks<CL>::at(&hist_lo[b], r);
                hi[r] = COUNT ? 0u : *RowBlocks<CL>::at(&hist_hi[b], r);
            }
#pragma unroll
            for (int r = 0; r < CL; ++r) bin_values[j] += (static_cast<unsigned long long>(hi[r]) << 32) | lo[r];
        }
        unsigned long long local = 0;
#pragma unroll
        for (int j = 0; j < kMaxPer; ++j) local += bin_values[j];
        unsigned long long total;
        unsigned long long above = block_exclusive_scan_u64(local, total);
        if (!COUNT && level == 0) {
            // The first level sees every candidate, so its total is the whole mass.
            const double wanted = static_cast<double>(fmaxf(top_p, 0.0f)) * static_cast<double>(total);
            target = min(max(static_cast<unsigned long long>(wanted), 1ull), total);
            remaining = target;
        }
#pragma unroll
        for (int j = 0; j < kMaxPer; ++j) {
            if (j >= per) break;
            const uint32_t b = bins - 1 - (threadIdx.x * per + j);
            const unsigned long long h = bin_values[j];
            if (above < remaining && remaining <= above + h) {
                found_digit = b;
                found_above = above;
            }
            above += h;
        }
        RowBlocks<CL>::sync();
        remaining -= found_above;
        mass_above += found_above;
        prefix |= found_digit << shift;
        prefix_mask |= (bins - 1) << shift;
    }
    return prefix;
}

// Philox4x32-10 (Salmon et al., 2011): a counter-based generator, so each draw is a pure function
// of (seed, step) with no state to carry between graph replays.
__device__ __forceinline__ unsigned long long philox_u64(unsigned long long seed, unsigned long long step) {
    uint32_t c0 = static_cast<uint32_t>(step), c1 = static_cast<uint32_t>(step >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return static_cast<unsigned long long>(c0) | (static_cast<unsigned long long>(c1) << 32);
}

// The filters' decisions for one token, shared by the segment pass and the final walk so both see
// exactly the same kept set.
struct Filters {
    float row_max;
    bool top_k;
    uint32_t top_k_key;
    bool top_p;
    uint32_t top_p_key;
    bool min_p;
    float min_p_delta;  // T * ln(min_p) <= 0

    // 0: dropped, 1: kept, 2: a top-p boundary tie (kept or not by its rank among the ties).
    __device__ __forceinline__ int classify(float x) const {
        const uint32_t key = float_key(x);
        if (top_k && key < top_k_key) return 0;
        // p / p_max = exp((x - max) / T) >= min_p, compared in the log domain.
        if (min_p && !(__fsub_rn(x, row_max) >= min_p_delta)) return 0;
        if (top_p) {
            if (key < top_p_key) return 0;
            if (key == top_p_key) return 2;
        }
        return 1;
    }
};

// Within one lane's chunk, the cumulative kept weight after each token, in fixed point: regular
// tokens through their f32 running sum (converted once per prefix), each kept boundary tie adding
// `tie_weight`. The segment pass and the final walk both use this, so they agree to the unit.
struct LaneCdf {
    unsigned long long at[SAMPLE_CHUNK];
    uint32_t ties;  // boundary ties among the chunk's tokens, kept or not
};

__device__ __forceinline__ LaneCdf lane_cdf(const Filters& f, const Weights& weights, const float (&x)[SAMPLE_CHUNK],
                                            int count, unsigned long long tie_rank, unsigned long long ties_kept,
                                            unsigned long long tie_weight) {
    LaneCdf cdf;
    cdf.ties = 0;
    float regular = 0.0f;
    unsigned long long tie_mass = 0;
#pragma unroll
    for (int e = 0; e < SAMPLE_CHUNK; ++e) {
        const int kind = e < count ? f.classify(x[e]) : 0;
        if (kind == 1) regular = __fadd_rn(regular, weights.weight(x[e]));
        if (kind == 2) {
            if (tie_rank + cdf.ties < ties_kept) tie_mass += tie_weight;
            ++cdf.ties;
        }
        cdf.at[e] = Weights::fixed(regular) + tie_mass;
    }
    return cdf;
}

template <int CL, typename T>
__device__ void sample_row(const T* __restrict__ row, int vocab, const SamplingRow& params, uint32_t* out_id) {
    using Row = RowBlocks<CL>;
    // Histograms and the per-segment table are never live at the same time.
    __shared__ unsigned long long scratch[SAMPLE_MAX_SEGMENTS];
    __shared__ int found_segment;
    __shared__ unsigned long long found_offset;
    __shared__ unsigned long long found_tie_base;
    uint32_t* hist = reinterpret_cast<uint32_t*>(scratch);

    const bool aligned = is_chunk_aligned(row);
    const float temperature = params.temperature;
    float row_max, thread_max;
    int max_id;
    row_argmax<CL>(row, vocab, aligned, row_max, max_id, thread_max);
    // Greedy rows, and rows whose maximum is infinite (all mass on it, or nothing finite left),
    // take the argmax, as the CPU sampler does.
    if (!(temperature >= SAMPLE_MIN_TEMPERATURE) || isinf(row_max)) {
        if (Row::rank() == 0 && threadIdx.x == 0) *out_id = static_cast<uint32_t>(max_id);
        return;
    }

    Weights weights;
    weights.row_max = row_max;
    weights.log2_scale = static_cast<float>(1.4426950408889634 / static_cast<double>(temperature));
    Filters f;
    f.row_max = row_max;
    f.top_k = params.top_k > 0 && params.top_k < static_cast<uint32_t>(vocab);
    f.top_k_key = 0;
    f.top_p = params.top_p < 1.0f;
    f.top_p_key = 0;
    f.min_p = params.min_p > 0.0f;
    // min_p above 1 would drop even the top token; the host validates it to [0, 1] anyway.
    f.min_p_delta = f.min_p ? static_cast<float>(static_cast<double>(temperature) *
                                                 log(static_cast<double>(fminf(params.min_p, 1.0f))))
                            : 0.0f;

    unsigned long long unused;
    // Once top-k has a floor, this block's tokens at or above it are listed in shared memory and
    // the selects after it read the list instead of the row. Each block lists only its own share
    // of the row and fills only its own histograms, so a block whose list overflows reads its
    // share of the row instead, whatever the other blocks do.
    uint32_t* candidates = hist + 2 * SAMPLE_RADIX_BINS;
    __shared__ int candidate_count;
    bool listed = false;
    auto visit_list = [&](uint32_t min_key, auto&& add) {
        for (int i = threadIdx.x; i < candidate_count; i += blockDim.x) {
            const uint32_t key = candidates[i];
            if (key >= min_key) add(key, key_float(key));
        }
    };
    auto visit_row = [&](uint32_t min_key, auto&& add) {
        for_each_chunk<CL>(row, vocab, aligned, [&](int, const float (&x)[SAMPLE_CHUNK], int count) {
#pragma unroll
            for (int e = 0; e < SAMPLE_CHUNK; ++e) {
                const uint32_t key = float_key(x[e]);
                if (e < count && key >= min_key) add(key, x[e]);
            }
        });
    };
    if (f.top_k) {
        unsigned long long k = params.top_k;
        uint32_t floor_key = 0;
        if (k <= SAMPLE_BLOCK_THREADS) {
            // This block's threads' maxima are distinct tokens of its share of the row, so at least
            // k tokens reach the k-th largest of them, and so does the row's k-th largest token:
            // a lower bound for the threshold that keeps most of the block's tokens out of the list
            // and the histograms. Found by the block alone (a select of one block), so each block
            // of a cluster has its own floor.
            floor_key = radix_select<true, 1>([&](auto&& add) { add(float_key(thread_max), thread_max); }, weights,
                                          1.0f, hist, k, unused);
            if (threadIdx.x == 0) candidate_count = 0;
            __syncthreads();
            const int lane = threadIdx.x % BRAID_WARP_SIZE;
            for_each_chunk<CL>(row, vocab, aligned, [&](int, const float (&x)[SAMPLE_CHUNK], int count) {
#pragma unroll
                for (int e = 0; e < SAMPLE_CHUNK; ++e) {
                    const uint32_t key = float_key(x[e]);
                    const bool keep = e < count && key >= floor_key;
                    // One shared-memory atomic per warp reserves the slots of its lanes' keys.
                    const unsigned keepers = __ballot_sync(0xffffffffu, keep);
                    if (keepers == 0) continue;
                    int base = 0;
                    if (lane == 0) base = atomicAdd(&candidate_count, __popc(keepers));
                    base = __shfl_sync(0xffffffffu, base, 0);
                    const int slot = base + __popc(keepers & ((1u << lane) - 1u));
                    if (keep && slot < SAMPLE_MAX_CANDIDATES) candidates[slot] = key;
                }
            });
            __syncthreads();
            listed = candidate_count <= SAMPLE_MAX_CANDIDATES;
        }
        // Two instantiations, so the row's pass carries nothing of the list's.
        f.top_k_key = listed ? radix_select<true, CL>([&](auto&& add) { visit_list(floor_key, add); }, weights,
                                                      1.0f, hist, k, unused)
                             : radix_select<true, CL>([&](auto&& add) { visit_row(floor_key, add); }, weights,
                                                      1.0f, hist, k, unused);
    }

    // Boundary ties of top-p: the first `ties_kept` of them in id order stay, as a stable sort by
    // descending probability followed by the cumulative cut would keep.
    unsigned long long ties_kept = 0;
    unsigned long long tie_weight = 0;
    if (f.top_p) {
        unsigned long long target = 0;
        unsigned long long mass_above;
        f.top_p_key = listed ? radix_select<false, CL>([&](auto&& add) { visit_list(f.top_k_key, add); }, weights,
                                                       params.top_p, hist, target, mass_above)
                             : radix_select<false, CL>([&](auto&& add) { visit_row(f.top_k_key, add); }, weights,
                                                       params.top_p, hist, target, mass_above);
        tie_weight = Weights::fixed(weights.weight(key_float(f.top_p_key)));
        // The select only stops in a bin with mass, so the selected key weighs more than zero.
        ties_kept = (target - mass_above + tie_weight - 1) / tie_weight;
    }

    // Pass: per-segment mass of the regular kept tokens and boundary-tie count, packed as
    // mass << 8 | ties (a segment weighs at most 128 * 2^40 < 2^47 and holds at most 128 ties).
    const int lane = threadIdx.x % BRAID_WARP_SIZE;
    const int warp = threadIdx.x / BRAID_WARP_SIZE;
    const int segments = (vocab + SAMPLE_SEGMENT - 1) / SAMPLE_SEGMENT;
    // A fallback that the draw below overwrites; it only matters if rounding ever left the draw
    // without a token, and keeps the output defined in that case.
    if (Row::rank() == 0 && threadIdx.x == 0) {
        *out_id = static_cast<uint32_t>(max_id);
        found_segment = 0;
        found_offset = 0;
        found_tie_base = 0;
    }
    __syncthreads();  // the last select may still be reading its histogram from `scratch`
    for_each_chunk<CL>(row, vocab, aligned, [&](int c, const float (&x)[SAMPLE_CHUNK], int count) {
        // No tie is counted as kept here (ties_kept = 0): their share is added per segment below.
        const LaneCdf cdf = lane_cdf(f, weights, x, count, 0, 0, 0);
        const unsigned long long mass = warp_sum_u64(cdf.at[SAMPLE_CHUNK - 1]);
        const uint32_t ties = __reduce_add_sync(0xffffffffu, cdf.ties);
        // The chunks of one call of a warp are consecutive: one segment.
        const int s = c / BRAID_WARP_SIZE;
        if (lane == 0 && s < segments) scratch[s] = (mass << 8) | ties;
    });
    Row::sync();
    if (CL > 1) {
        // Block 0 finishes the row alone: it copies the segments the other blocks own (segment s
        // came from the block whose threads read its chunks) into the same slots of its table,
        // then a last barrier lets the other blocks exit.
        if (Row::rank() == 0) {
            for (int s = threadIdx.x; s < segments; s += blockDim.x) {
                const unsigned owner = (s % (CL * BRAID_WARP_SIZE)) / BRAID_WARP_SIZE;
                if (owner != 0) scratch[s] = *Row::at(&scratch[s], owner);
            }
        }
        Row::sync();
        if (Row::rank() != 0) return;
    }

    // Each thread owns a run of consecutive segments; two block scans give every segment its tie
    // rank base and its kept mass offset in id order.
    const int per = (segments + SAMPLE_BLOCK_THREADS - 1) / SAMPLE_BLOCK_THREADS;
    const int first = min(static_cast<int>(threadIdx.x) * per, segments);
    const int last = min(first + per, segments);
    unsigned long long local_ties = 0;
    for (int s = first; s < last; ++s) local_ties += scratch[s] & 0xFF;
    unsigned long long all_ties;
    const unsigned long long tie_base = block_exclusive_scan_u64(local_ties, all_ties);
    auto kept_tie_count = [&](unsigned long long base, unsigned long long ties) -> unsigned long long {
        return base >= ties_kept ? 0 : min(ties, ties_kept - base);
    };
    unsigned long long local_mass = 0;
    {
        unsigned long long base = tie_base;
        for (int s = first; s < last; ++s) {
            const unsigned long long ties = scratch[s] & 0xFF;
            local_mass += (scratch[s] >> 8) + tie_weight * kept_tie_count(base, ties);
            base += ties;
        }
    }
    unsigned long long kept_total;
    const unsigned long long mass_base = block_exclusive_scan_u64(local_mass, kept_total);
    // A uniform integer in [0, kept_total): the high word of a 64x64-bit product.
    const unsigned long long draw = __umul64hi(philox_u64(params.seed, params.step), kept_total);
    if (mass_base <= draw && draw < mass_base + local_mass) {
        unsigned long long offset = mass_base;
        unsigned long long base = tie_base;
        for (int s = first; s < last; ++s) {
            const unsigned long long ties = scratch[s] & 0xFF;
            const unsigned long long mass = (scratch[s] >> 8) + tie_weight * kept_tie_count(base, ties);
            if (draw < offset + mass) {
                found_segment = s;
                found_offset = draw - offset;
                found_tie_base = base;
                break;
            }
            offset += mass;
            base += ties;
        }
    }
    __syncthreads();

    // One warp resolves the token inside the chosen segment: the lanes' tie ranks come from a scan
    // of their tie counts, then each lane's CDF (now with the kept ties) locates the draw.
    if (warp != 0) return;
    const int c = found_segment * BRAID_WARP_SIZE + lane;
    Chunk<T> raw;
    const int count = load_raw(row, vocab, aligned, c, raw);
    float x[SAMPLE_CHUNK];
    clean_chunk(raw, count, x);
    const uint32_t lane_ties = lane_cdf(f, weights, x, count, 0, 0, 0).ties;
    const unsigned long long tie_rank =
        found_tie_base + warp_inclusive_scan_u64(lane_ties) - lane_ties;
    const LaneCdf cdf = lane_cdf(f, weights, x, count, tie_rank, ties_kept, tie_weight);
    const unsigned long long lane_mass = cdf.at[SAMPLE_CHUNK - 1];
    const unsigned long long inclusive = warp_inclusive_scan_u64(lane_mass);
    const unsigned long long lane_offset = inclusive - lane_mass;
    const unsigned long long wanted = found_offset;
    if (lane_offset <= wanted && wanted < inclusive) {
        const unsigned long long r = wanted - lane_offset;
        unsigned long long before = 0;
#pragma unroll
        for (int e = 0; e < SAMPLE_CHUNK; ++e) {
            if (before <= r && r < cdf.at[e]) *out_id = static_cast<uint32_t>(c * SAMPLE_CHUNK + e);
            before = cdf.at[e];
        }
    }
}

}  // namespace braid

// Grids: one block of SAMPLE_BLOCK_THREADS per row (gridDim.x = rows) for argmax_* and sample_*;
// one cluster of CL such blocks per row (gridDim.x = rows * CL) for the *_clusterCL_* kernels,
// which exist only on sm_90 and newer. 1 <= vocab <= the limit.
#if SAMPLE_HAS_CLUSTERS
#define BRAID_CLUSTER_BODY(...) __VA_ARGS__
#else
#define BRAID_CLUSTER_BODY(...)
#endif

// argmax_clusterCL_* and sample_clusterCL_*: one cluster of CL blocks per row.
#define BRAID_DEFINE_CLUSTER_SAMPLING_KERNELS(T, SUFFIX, CL)                                             \
    extern "C" __global__ void SAMPLE_CLUSTER_DIMS(CL) __launch_bounds__(SAMPLE_BLOCK_THREADS)           \
        argmax_cluster##CL##_##SUFFIX(const T* __restrict__ logits, int vocab, uint32_t* __restrict__ out_ids) { \
        BRAID_CLUSTER_BODY(                                                                              \
            const int r = blockIdx.x / CL;                                                               \
            const T* row = logits + static_cast<size_t>(r) * vocab;                                      \
            float best, thread_best;                                                                     \
            int best_id;                                                                                 \
            braid::row_argmax<CL>(row, vocab, braid::is_chunk_aligned(row), best, best_id, thread_best); \
            if (blockIdx.x % CL == 0 && threadIdx.x == 0) out_ids[r] = static_cast<uint32_t>(best_id);)  \
    }                                                                                                    \
    extern "C" __global__ void SAMPLE_CLUSTER_DIMS(CL) __launch_bounds__(SAMPLE_BLOCK_THREADS)           \
        sample_cluster##CL##_##SUFFIX(const T* __restrict__ logits, int vocab,                           \
                                      const braid::SamplingRow* __restrict__ params, uint32_t* __restrict__ out_ids) { \
        BRAID_CLUSTER_BODY(                                                                              \
            const int r = blockIdx.x / CL;                                                               \
            const T* row = logits + static_cast<size_t>(r) * vocab;                                      \
            const braid::SamplingRow p = params[r];                                                      \
            braid::sample_row<CL>(row, vocab, p, out_ids + r);)                                          \
    }

#define BRAID_DEFINE_SAMPLING_KERNELS(T, SUFFIX)                                                         \
    extern "C" __global__ void __launch_bounds__(SAMPLE_BLOCK_THREADS)                                   \
        argmax_##SUFFIX(const T* __restrict__ logits, int vocab, uint32_t* __restrict__ out_ids) {       \
        const T* row = logits + static_cast<size_t>(blockIdx.x) * vocab;                                 \
        float best, thread_best;                                                                         \
        int best_id;                                                                                     \
        braid::row_argmax<1>(row, vocab, braid::is_chunk_aligned(row), best, best_id, thread_best);     \
        if (threadIdx.x == 0) out_ids[blockIdx.x] = static_cast<uint32_t>(best_id);                      \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(SAMPLE_BLOCK_THREADS)                                   \
        sample_##SUFFIX(const T* __restrict__ logits, int vocab, const braid::SamplingRow* __restrict__ params, \
                        uint32_t* __restrict__ out_ids) {                                                \
        const T* row = logits + static_cast<size_t>(blockIdx.x) * vocab;                                 \
        const braid::SamplingRow p = params[blockIdx.x];                                                 \
        braid::sample_row<1>(row, vocab, p, out_ids + blockIdx.x);                                       \
    }                                                                                                    \
    BRAID_DEFINE_CLUSTER_SAMPLING_KERNELS(T, SUFFIX, 8)                                              \
    BRAID_DEFINE_CLUSTER_SAMPLING_KERNELS(T, SUFFIX, 2)

BRAID_DEFINE_SAMPLING_KERNELS(float, f32)
BRAID_DEFINE_SAMPLING_KERNELS(__half, f16)
BRAID_DEFINE_SAMPLING_KERNELS(__nv_bfloat16, bf16)
