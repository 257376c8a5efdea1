/*
 * topk_net.cuh -- the lists of the block top-k (attend.cu topk_lists and the
 * seam's merge): short sorted lists of (key, index) pairs, insertion, and the
 * pop of one round of the warp rounds.  Host-and-device code without CUDA
 * intrinsics, so that tests/test_topk_net.py checks the whole selection on the
 * CPU (the lanes and the warps' reductions emulated) against a plain sort.
 *
 * Order: a larger key first, then the lower index (a strict total order, as
 * every index is distinct); none = (0, UINT32_MAX), which every pair ranks
 * before and which ties only with itself.
 */
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define QLLM_NET_FN __host__ __device__ __forceinline__
#else
#define QLLM_NET_FN inline
#endif
/* unrolled in device code (register arrays); host compilers need no hint */
#if defined(__CUDA_ARCH__)
#define QLLM_NET_UNROLL _Pragma("unroll")
#else
#define QLLM_NET_UNROLL
#endif

namespace qllm_topk {

/* (ka, ia) ranks before (kb, ib). */
QLLM_NET_FN bool before(uint32_t ka, uint32_t ia, uint32_t kb, uint32_t ib) {
    return ka > kb || (ka == kb && ia < ib);
}

/* K pairs sorted best first (K a power of two). */
template <int K>
struct List {
    static_assert(K >= 1 && (K & (K - 1)) == 0, "K: a power of two");
    uint32_t key[K], idx[K];

    QLLM_NET_FN void clear() {
QLLM_NET_UNROLL
        for (int r = 0; r < K; ++r) {
            key[r] = 0u;
            idx[r] = 0xffffffffu;
        }
    }

    /* (k, i) joins the list if it ranks before the last pair; the pairs after
     * its place move down one. */
    QLLM_NET_FN void insert(uint32_t k, uint32_t i) {
        if (!before(k, i, key[K - 1], idx[K - 1])) return;
QLLM_NET_UNROLL
        for (int r = 0; r < K; ++r) {
            const bool b = before(k, i, key[r], idx[r]);
            const uint32_t tk = b ? key[r] : k, ti = b ? idx[r] : i;
            key[r] = b ? k : key[r];
            idx[r] = b ? i : idx[r];
            k = tk;
            i = ti;
        }
    }

    /* One round of the warp rounds (attend.cu warp_rounds): (kmax, imin) is
     * the best head among the warp's lists; the list whose head it is pops it
     * (the pairs move up one, none enters last).  Returns whether it popped. */
    QLLM_NET_FN bool pop_if(uint32_t kmax, uint32_t imin) {
        const bool pop = key[0] == kmax && idx[0] == imin;
QLLM_NET_UNROLL
        for (int j = 0; j + 1 < K; ++j) {
            key[j] = pop ? key[j + 1] : key[j];
            idx[j] = pop ? idx[j + 1] : idx[j];
        }
        if (pop) {
            key[K - 1] = 0u;
            idx[K - 1] = 0xffffffffu;
        }
        return pop;
    }

    /* The r-th pair's index (r < K) without a dynamic register index. */
    QLLM_NET_FN uint32_t idx_at(int r) const {
        uint32_t v = idx[0];
QLLM_NET_UNROLL
        for (int j = 1; j < K; ++j) v = r == j ? idx[j] : v;
        return v;
    }
};

}  // namespace qllm_topk
