/*
 * attend.cu -- kernels of the GPU attention path (qllm/gpu.py, driven per
 * execution block by csrc/torch/ops_cuda.cpp).  No kernel reads anything back
 * to the host: the retrieved block ids are written by select_kernel and read
 * by attn_kernel through the block table directly.
 *
 * Per execution block (E queries at text positions P0 .. P0+E-1):
 *   seam_kernel     between blocks i and i+1 (attend_run's default), one
 *                   launch for what follows: cut_kernel + bscore_pairs of
 *                   block i's cut blocks, select_kernel and prep_kernel of i+1
 *   prep_kernel     rotate queries (local: index p - T0; fixed: n_local - 1,
 *                   times cos[0]) and the recent segment's keys (index j - T0)
 *   select_kernel   top-k block ids of precomputed block scores (ascending)
 *   attn_kernel     FlashAttention-style tiles over [init | retrieved blocks |
 *                   tail memory] (fixed-position query, un-rotated keys) and
 *                   the local window (rotated), one online softmax (wgmma:
 *                   local, init, tail, retrieved tiles in that order, so an
 *                   early start waits for the ids last); bf16/f16
 *                   wgmma (sm_90a, head dim 128, software-pipelined) or
 *                   mma.sync, f32 accumulate; writes out and the row's lse
 *   combine_kernel  merges key splits (small E: decode) by log-sum-exp
 *   tscore_kernel   token scores: per key of the recent segment, the sum over
 *                   queries of its LOCAL probability (recomputed with the
 *                   final lse), in a fixed order (deterministic)
 *   cut_kernel      representatives of newly cut blocks
 *   bscore_kernel   block scores qcomb[i] . reprs[b] for (exec block, block)
 *   qcomb_kernel    mean fixed query per exec block + w * question
 * Logits are kept in the log2 domain: x = q.k * scaling * log2(e).
 */
#include "common.cuh"
#include "topk_net.cuh"
#include "wgmma.cuh"

namespace qllm_cuda {
namespace {

constexpr int BN = QLLM_CUDA_ATTN_BN; /* keys per tile */
constexpr int TS_KEYS = 64;    /* keys per token-score CTA (4 warps x 16) */
constexpr int TS_Q = 64;       /* queries per token-score step */
constexpr int TS_THREADS = 128;
constexpr float kLog2e = 1.4426950408889634f;

/* ------------------------------------------ early start (qllm_gpu_early) */

/* Programmatic dependent launch (sm_90): the seam lets the next grid launch
 * once all its CTAs have started; the attention launched that way waits for
 * the seam's end only when it exits (so the kernels after it still follow the
 * seam).  Both are no-ops in a grid launched without the attribute. */
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait_primary() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

/* The CTA's writes, then one count at *sig (cooperative groups' grid barrier
 * pattern: block barrier, then one thread's fence and atomic).  All threads. */
__device__ __forceinline__ void cta_signal(int32_t *sig) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(sig, 1);
    }
}

/* One warp's writes, then one count at *sig.  All lanes of the warp. */
__device__ __forceinline__ void warp_signal(int32_t *sig) {
    __syncwarp();
    if ((threadIdx.x & 31) == 0) {
        __threadfence();
        atomicAdd(sig, 1);
    }
}

/* Thread 0 waits until *sig >= target, then the CTA reads what the counted
 * writers wrote.  All threads (a block barrier at the end). */
__device__ __forceinline__ void cta_wait_count(const int32_t *sig, int target) {
    if (threadIdx.x == 0) {
        for (;;) {
            int v;
            asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(sig) : "memory");
            if (v >= target) break;
            __nanosleep(64);
        }
        __threadfence();
    }
    __syncthreads();
}

/* ------------------------------------------------------------------ prep */

template <typename T>
struct alignas(16) Vec8 {
    T v[8];
};

/* Store row of text position pos (qllm_cuda.cuh: identity, or a ring of
 * wmask + 1 rows after the n_init init rows in tiered mode). */
__device__ __forceinline__ int64_t kv_row(int64_t pos, int n_init, int64_t wmask) {
    return pos < n_init ? pos : n_init + ((pos - n_init) & wmask);
}

/* p[0..7] of a cos / sin table row: two 16-byte loads when VEC (the launcher
 * checked the tables' alignment), else eight scalar ones. */
template <bool VEC>
__device__ __forceinline__ void ld8f(const float *p, float (&x)[8]) {
    if constexpr (VEC) {
        const float4 u = __ldg(reinterpret_cast<const float4 *>(p));
        const float4 w = __ldg(reinterpret_cast<const float4 *>(p) + 1);
        x[0] = u.x; x[1] = u.y; x[2] = u.z; x[3] = u.w;
        x[4] = w.x; x[5] = w.y; x[6] = w.z; x[7] = w.w;
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) x[j] = p[j];
    }
}

/* x1 = dims d0..d0+7 (first half), x2 = partner dims d0+H2..; rotated with rows
 * c/s of the cos/sin table (and an optional per-dim factor f) -> y1, y2. */
template <bool VEC>
__device__ __forceinline__ void rope8(const float (&x1)[8], const float (&x2)[8], const float *c,
                                      const float *s, int d0, int H2, const float *f, float (&y1)[8],
                                      float (&y2)[8]) {
    float c1[8], s1[8], c2[8], s2[8];
    ld8f<VEC>(c + d0, c1);
    ld8f<VEC>(s + d0, s1);
    ld8f<VEC>(c + d0 + H2, c2);
    ld8f<VEC>(s + d0 + H2, s2);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        y1[j] = x1[j] * c1[j] - x2[j] * s1[j];
        y2[j] = x2[j] * c2[j] + x1[j] * s2[j];
    }
    if (f != nullptr) {
        ld8f<VEC>(f + d0, c1);
        ld8f<VEC>(f + d0 + H2, c2);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            y1[j] *= c1[j];
            y2[j] *= c2[j];
        }
    }
}

template <typename T>
__device__ __forceinline__ void load8(const T *p, float (&x)[8]) {
    const Vec8<T> v = *reinterpret_cast<const Vec8<T> *>(p);
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = Cvt<T>::to_f(v.v[j]);
}

template <typename T>
__device__ __forceinline__ void store8(T *p, const float (&x)[8]) {
    Vec8<T> v;
#pragma unroll
    for (int j = 0; j < 8; ++j) v.v[j] = Cvt<T>::from_f(x[j]);
    *reinterpret_cast<Vec8<T> *>(p) = v;
}

/* Rotations of one execution block; one thread per (row, 8 dims of the first half).
 * q rows need q_ts, q_hs multiples of 8 (checked by the launcher); VEC: the
 * cos / sin tables are 16-byte aligned (prep_vec). */
template <typename T, bool VEC>
__device__ __forceinline__ void prep_body(const qllm_gpu_layer &ly, qllm_gpu_exec ex, const T *__restrict__ q,
                                          int64_t q_hs, int64_t q_ts, T *__restrict__ qfix,
                                          T *__restrict__ qloc, T *__restrict__ krot,
                                          const int64_t *__restrict__ dyn, int64_t cta, int64_t n_ctas) {
    if (dyn != nullptr) { /* decode step: sizes from the device row (see qllm_gpu_decode) */
        ex.P0 = dyn[QLLM_DYN_P0];
        ex.T0 = dyn[QLLM_DYN_T0];
        ex.L = static_cast<int>(dyn[QLLM_DYN_L]);
        ex.init_len = static_cast<int>(dyn[QLLM_DYN_INIT]);
        ex.n_ret = static_cast<int>(dyn[QLLM_DYN_NRET]);
        ex.m = static_cast<int>(dyn[QLLM_DYN_M]);
    }
    const int D = ly.head_dim, H2 = D / 2, C = H2 / 8;
    const int64_t nq = static_cast<int64_t>(ly.hq) * ex.E * C;
    const int64_t nk = static_cast<int64_t>(ly.hkv) * ex.L * C;
    const int64_t off = ex.P0 - ex.T0;
    const float *cf = ly.cos + static_cast<int64_t>(ly.n_local - 1) * D;
    const float *sf = ly.sin + static_cast<int64_t>(ly.n_local - 1) * D;
    const T *kst = static_cast<const T *>(ly.k_store);
    for (int64_t w = cta * blockDim.x + threadIdx.x; w < nq + nk; w += n_ctas * blockDim.x) {
        float x1[8], x2[8], y1[8], y2[8];
        if (w < nq) {
            const int d0 = static_cast<int>(w % C) * 8;
            const int64_t rr = w / C;
            const int64_t r = rr % ex.E, h = rr / ex.E;
            const T *src = q + h * q_hs + r * q_ts;
            load8(src + d0, x1);
            load8(src + d0 + H2, x2);
            const int64_t o = (h * ex.E + r) * D;
            rope8<VEC>(x1, x2, ly.cos + (off + r) * D, ly.sin + (off + r) * D, d0, H2, nullptr, y1, y2);
            store8(qloc + o + d0, y1);
            store8(qloc + o + d0 + H2, y2);
            rope8<VEC>(x1, x2, cf, sf, d0, H2, ly.cos, y1, y2);
            store8(qfix + o + d0, y1);
            store8(qfix + o + d0 + H2, y2);
        } else {
            const int64_t w2 = w - nq;
            const int d0 = static_cast<int>(w2 % C) * 8;
            const int64_t rr = w2 / C;
            const int64_t s = rr % ex.L, hk = rr / ex.L;
            const T *src = kst + (hk * ly.cap + kv_row(ex.T0 + s, ly.n_init, ly.wmask)) * D;
            load8(src + d0, x1);
            load8(src + d0 + H2, x2);
            rope8<VEC>(x1, x2, ly.cos + s * D, ly.sin + s * D, d0, H2, nullptr, y1, y2);
            const int64_t o = (hk * ex.L + s) * D;
            store8(krot + o + d0, y1);
            store8(krot + o + d0 + H2, y2);
        }
    }
}

template <typename T, bool VEC>
__global__ void prep_kernel(qllm_gpu_layer ly, qllm_gpu_exec ex, const T *__restrict__ q,
                            int64_t q_hs, int64_t q_ts, T *__restrict__ qfix,
                            T *__restrict__ qloc, T *__restrict__ krot,
                            const int64_t *__restrict__ dyn) {
    prep_body<T, VEC>(ly, ex, q, q_hs, q_ts, qfix, qloc, krot, dyn, blockIdx.x, gridDim.x);
}

/* ----------------------------------------------------------- qcomb / bscore */

/* Mean fixed query of execution block i, head h.  The rotation to the fixed
 * position is linear and the same for every row, so the kernel sums the raw
 * rows and rotates the sums once.  Threads = (8-dim chunks of the first half)
 * x (row groups), 16-byte loads (q rows 16-byte aligned, as for prep). */
constexpr int QC_THREADS = 256;
constexpr int QC_U = 4; /* rows in flight per thread */

template <typename T>
__global__ void __launch_bounds__(QC_THREADS) qcomb_kernel(qllm_gpu_layer ly, const T *__restrict__ q,
                                                           int64_t q_hs, int64_t q_ts, int64_t Tn, int exc,
                                                           const float *__restrict__ question, float weight,
                                                           float *__restrict__ qcomb) {
    __shared__ float red[QC_THREADS * 16];
    const int D = ly.head_dim, H2 = D / 2, C = H2 / 8, G = QC_THREADS / C;
    const int i = blockIdx.x, h = blockIdx.y;
    const int c = threadIdx.x % C, grp = threadIdx.x / C;
    const int64_t r0 = static_cast<int64_t>(i) * exc;
    const int64_t r1 = r0 + exc < Tn ? r0 + exc : Tn;
    float s1[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    float s2[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (grp < G) { /* (head_dim 64 or 128, check_layer: every thread has a group) */
        /* QC_U rows per batch, all loads issued before the first add (a loop with
         * an exit test per row keeps only one row's loads in flight) */
        for (int64_t base = r0 + grp; base < r1; base += QC_U * G) {
            Vec8<T> u1[QC_U], u2[QC_U];
#pragma unroll
            for (int u = 0; u < QC_U; ++u) {
                const int64_t r = base + static_cast<int64_t>(u) * G;
                if (r < r1) {
                    const T *src = q + h * q_hs + r * q_ts + c * 8;
                    u1[u] = *reinterpret_cast<const Vec8<T> *>(src);
                    u2[u] = *reinterpret_cast<const Vec8<T> *>(src + H2);
                }
            }
#pragma unroll
            for (int u = 0; u < QC_U; ++u) {
                if (base + static_cast<int64_t>(u) * G < r1) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        s1[j] += Cvt<T>::to_f(u1[u].v[j]);
                        s2[j] += Cvt<T>::to_f(u2[u].v[j]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        red[threadIdx.x * 16 + j] = s1[j];
        red[threadIdx.x * 16 + 8 + j] = s2[j];
    }
    __syncthreads();
    if (threadIdx.x < H2) {
        const int d = threadIdx.x, cc = d / 8, j = d % 8;
        float S1 = 0.0f, S2 = 0.0f;
        for (int g2 = 0; g2 < G; ++g2) { /* fixed order: deterministic */
            S1 += red[(g2 * C + cc) * 16 + j];
            S2 += red[(g2 * C + cc) * 16 + 8 + j];
        }
        const float *cf = ly.cos + static_cast<int64_t>(ly.n_local - 1) * D;
        const float *sf = ly.sin + static_cast<int64_t>(ly.n_local - 1) * D;
        const float *c0 = ly.cos;
        const float n = static_cast<float>(r1 - r0);
        float m1 = (S1 * cf[d] - S2 * sf[d]) * c0[d] / n;
        float m2 = (S2 * cf[d + H2] + S1 * sf[d + H2]) * c0[d + H2] / n;
        if (question != nullptr) {
            m1 += weight * question[h * D + d];
            m2 += weight * question[h * D + d + H2];
        }
        float *o = qcomb + (static_cast<int64_t>(i) * ly.hq + h) * D;
        o[d] = m1;
        o[d + H2] = m2;
    }
}

/* Scores of many (execution block, block) pairs (the blocks that exist at the
 * start of a prefill call against all its execution blocks): a CTA takes
 * BS_W blocks (a warp each) x BS_I execution blocks.  The execution blocks'
 * combined queries are staged in shared memory BS_XC floats at a time; each
 * lane reads its block's representatives as float4 and keeps BS_I partial
 * dot products; a butterfly sums the lanes (fixed order: deterministic). */
constexpr int BS_W = 8, BS_I = 16, BS_XC = 512;

__global__ void __launch_bounds__(BS_W * 32) bscore_kernel(const float *__restrict__ reprs, int64_t X,
                                                          const float *__restrict__ qcomb, int i0,
                                                          int i1, int64_t b0, int64_t b1,
                                                          float *__restrict__ out, int64_t ld) {
    constexpr int C4 = BS_XC / 4;
    __shared__ float4 Qs[BS_I][C4];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t b = b0 + static_cast<int64_t>(blockIdx.x) * BS_W + warp;
    const int it = i0 + static_cast<int>(blockIdx.y) * BS_I;
    const int ni = min(BS_I, i1 - it);
    const bool live = b < b1;
    const float4 *r = reinterpret_cast<const float4 *>(reprs + (live ? b : b0) * X);
    const int64_t X4 = X / 4;
    float acc[BS_I];
#pragma unroll
    for (int ii = 0; ii < BS_I; ++ii) acc[ii] = 0.0f;
    for (int64_t c0 = 0; c0 < X4; c0 += C4) {
        const int cn = static_cast<int>(X4 - c0 < C4 ? X4 - c0 : C4);
        __syncthreads(); /* every warp is done with the previous chunk */
        for (int e = threadIdx.x; e < BS_I * C4; e += BS_W * 32) {
            const int row = e / C4, col = e % C4;
            Qs[row][col] = row < ni && col < cn
                               ? reinterpret_cast<const float4 *>(qcomb + static_cast<int64_t>(it + row) * X)[c0 + col]
                               : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
        __syncthreads();
#pragma unroll 4
        for (int col = lane; col < cn; col += 32) {
            const float4 u = r[c0 + col];
#pragma unroll
            for (int ii = 0; ii < BS_I; ++ii) {
                const float4 c = Qs[ii][col];
                acc[ii] += u.x * c.x + u.y * c.y + u.z * c.z + u.w * c.w;
            }
        }
    }
#pragma unroll
    for (int ii = 0; ii < BS_I; ++ii) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[ii] += __shfl_xor_sync(0xffffffffu, acc[ii], o);
        if (live && lane == ii && ii < ni) out[static_cast<int64_t>(it + ii) * ld + b] = acc[ii];
    }
}

/* Few (exec block, block) pairs: one warp per pair, 16-byte loads. */
__global__ void __launch_bounds__(256) bscore_pairs_kernel(const float *__restrict__ reprs, int64_t X,
                                                           const float *__restrict__ qcomb, int i0,
                                                           int n_rows, int64_t b0, int64_t n_pairs,
                                                           float *__restrict__ out, int64_t ld,
                                                           const int64_t *__restrict__ dyn_nb) {
    if (dyn_nb != nullptr) n_pairs = (*dyn_nb - b0) * n_rows; /* decode: blocks from the device */
    const int lane = threadIdx.x & 31;
    const int64_t w = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
    if (w >= n_pairs) return;
    const int64_t b = b0 + w / n_rows;
    const int i = i0 + static_cast<int>(w % n_rows);
    const float4 *r = reinterpret_cast<const float4 *>(reprs + b * X);
    const float4 *qv = reinterpret_cast<const float4 *>(qcomb + static_cast<int64_t>(i) * X);
    /* eight independent loads in flight per lane (the decode step reads every block's
     * representative once: bandwidth-bound, and one CTA per SM holds too few loads
     * otherwise), fixed summation order */
    float acc8[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    const int64_t n4 = X / 4;
    int64_t x = lane;
    for (; x + 224 < n4; x += 256) {
        float4 u[8], c[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) u[j] = r[x + 32 * j];
#pragma unroll
        for (int j = 0; j < 8; ++j) c[j] = qv[x + 32 * j];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc8[j] += u[j].x * c[j].x + u[j].y * c[j].y + u[j].z * c[j].z + u[j].w * c[j].w;
    }
    for (; x < n4; x += 32) {
        const float4 u = r[x], c = qv[x];
        acc8[0] += u.x * c.x + u.y * c.y + u.z * c.z + u.w * c.w;
    }
    float acc = ((acc8[0] + acc8[1]) + (acc8[2] + acc8[3])) + ((acc8[4] + acc8[5]) + (acc8[6] + acc8[7]));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[static_cast<int64_t>(i) * ld + b] = acc;
}

/* ------------------------------------------------------------------ top-k */

/* put(e, get(e)) for e = first, first + step, ... < n with U loads issued
 * before their uses: a loop of one load and its use per iteration waits a
 * whole memory round trip per element (in-order issue).  Latency-bound
 * staging of a few values per thread then takes one round trip per U. */
template <int U, typename Get, typename Put>
__device__ __forceinline__ void batched(int first, int n, int step, Get get, Put put) {
    for (int e0 = first; e0 < n; e0 += U * step) {
        float v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int e = e0 + u * step;
            v[u] = e < n ? get(e) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int e = e0 + u * step;
            if (e < n) put(e, v[u]);
        }
    }
}

constexpr int SEL_THREADS = 256;
/* Dynamic shared memory the selection kernels may take: 48 KB (no opt-in) less
 * room for their static arrays (the top-k histogram, the qsel partials). */
constexpr int64_t SEL_DYN_SMEM = 43 * 1024;

/* Orderable key of a block score: a larger key is a better score; -0 == +0;
 * NaN is the lowest. */
__device__ __forceinline__ uint32_t score_key(float v) {
    if (v != v) return 0u;
    const uint32_t b = __float_as_uint(v == 0.0f ? 0.0f : v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/* Exact top-k of src[0..n) (descending score, ties toward the lower index),
 * written to ids[0..k) in ascending block order.  All SEL_THREADS threads of
 * the block call it.  k > n: ids[n..k) = -1.
 * k <= SEL_KFAST (topk_lists): every thread keeps a sorted list of the best
 * SEL_KFAST (key, index) pairs of the elements it reads (one coalesced pass,
 * each element read once, so src may stay in global memory); each warp then
 * takes its top k in k rounds of two warp reductions over the lists' heads
 * (key max, then index min; the winning lane pops its head), and warp 0 does
 * the same over the warps' candidates (block_best; lists: topk_net.cuh).  A
 * butterfly merge of the lists (bitonic merges) was slower: 3.9 against 3.3 us
 * at n=1024, k=8 (benchmarks/NOTES_gpu.md, round 11).
 * Larger k (topk_radix): a radix select, whose cost does not grow with k.
 * Radix select:
 * 1. Radix select over the 32-bit keys, 8 bits per pass: each pass histograms
 *    the keys that match the digits chosen so far (warp-aggregated shared
 *    atomics), and warp 0 finds the digit holding the k-th best by a scan.
 *    After 4 passes the k-th best key T is known, and `need` says how many of
 *    the keys equal to T belong to the top k.
 * 2. One ordered pass takes every key > T and the first `need` keys == T,
 *    placing them by block-wide ballot scans: ids come out ascending.
 * Measured: benchmarks/micro/select_combine.cu, benchmarks/NOTES_gpu.md. */
constexpr int SEL_KFAST = 8; /* lists up to this k, radix above */
static_assert(QLLM_SEAM_CNT_INTS >= 1 + 2 * SEL_KFAST, "the seam's counter workspace holds a list of SEL_KFAST");

/* Best (key, index) of one lane's elements get(j), j < cnt, strictly worse
 * than (tk, ti) when bounded; none = (0, UINT_MAX), which every element beats. */
template <typename Get>
__device__ __forceinline__ void lane_best(Get get, int cnt, bool bounded, uint32_t tk, uint32_t ti,
                                          uint32_t &bk, uint32_t &bi) {
    bk = 0u;
    bi = 0xffffffffu;
    for (int j = 0; j < cnt; ++j) {
        uint32_t key, idx;
        get(j, key, idx);
        if (idx == 0xffffffffu) continue;
        if (bounded && !(key < tk || (key == tk && idx > ti))) continue;
        if (key > bk || (key == bk && idx < bi)) {
            bk = key;
            bi = idx;
        }
    }
}

/* k rounds over the warp's elements; round r's winner goes to out_k/out_i[r]
 * (lane 0 writes) and, when win != NULL, to *win of lane r. */
template <typename Get>
__device__ __forceinline__ void warp_topk(Get get, int cnt, int k, uint32_t *out_k, uint32_t *out_i,
                                          uint32_t *win) {
    const int lane = threadIdx.x & 31;
    uint32_t bk, bi;
    lane_best(get, cnt, false, 0u, 0u, bk, bi);
    for (int r = 0; r < k; ++r) {
        const uint32_t kmax = __reduce_max_sync(0xffffffffu, bk);
        const uint32_t imin = __reduce_min_sync(0xffffffffu, bk == kmax ? bi : 0xffffffffu);
        if (out_k != nullptr && lane == 0) {
            out_k[r] = kmax;
            out_i[r] = imin;
        }
        if (win != nullptr && lane == r) *win = imin;
        if (imin != 0xffffffffu && bk == kmax && bi == imin) lane_best(get, cnt, true, kmax, imin, bk, bi);
    }
}

/* k rounds over the warp's lists: lane r gets round r's winner in (wk, wi)
 * (none = (0, UINT_MAX) past the last pair); the winner's list pops its head. */
template <int K>
__device__ __forceinline__ void warp_rounds(qllm_topk::List<K> &l, int k, uint32_t &wk, uint32_t &wi) {
    const int lane = threadIdx.x & 31;
    wk = 0u;
    wi = 0xffffffffu;
    for (int r = 0; r < k; ++r) {
        const uint32_t kmax = __reduce_max_sync(0xffffffffu, l.key[0]);
        const uint32_t imin = __reduce_min_sync(0xffffffffu, l.key[0] == kmax ? l.idx[0] : 0xffffffffu);
        if (lane == r) {
            wk = kmax;
            wi = imin;
        }
        l.pop_if(kmax, imin);
    }
}

/* The block's best k (k <= SEL_KFAST) of the pairs that fill(l) inserts into
 * each thread's list l: on return lane r < k of warp 0 holds the r-th best in
 * (wk, wi) (none past the last pair); the other warps' (wk, wi) mean nothing.
 * All SEL_THREADS threads call it (one block barrier). */
template <typename Fill>
__device__ __forceinline__ void block_best(Fill fill, int k, uint32_t &wk, uint32_t &wi) {
    constexpr int NWS = SEL_THREADS / 32, K = SEL_KFAST;
    __shared__ uint32_t cand_k[NWS * K], cand_i[NWS * K];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    {
        qllm_topk::List<K> l;
        l.clear();
        fill(l);
        warp_rounds(l, k, wk, wi);
    }
    if (lane < k) {
        cand_k[warp * K + lane] = wk;
        cand_i[warp * K + lane] = wi;
    }
    __syncthreads();
    if (warp != 0) return;
    qllm_topk::List<K> l;
    l.clear();
    for (int c = lane; c < NWS * K; c += 32)
        if (c % K < k) l.insert(cand_k[c], cand_i[c]);
    warp_rounds(l, k, wk, wi);
}

/* One warp: the winners wi of lanes 0 .. k-1 to ids[0..k) in ascending block
 * order (none = UINT_MAX ranks last and is written as -1). */
__device__ __forceinline__ void write_ascending(uint32_t wi, int k, int32_t *__restrict__ ids) {
    const int lane = threadIdx.x & 31;
    int rank = 0;
    for (int j = 0; j < k; ++j) {
        const uint32_t v = __shfl_sync(0xffffffffu, wi, j);
        rank += (v < wi || (v == wi && j < lane)) ? 1 : 0;
    }
    if (lane < k) ids[rank] = wi == 0xffffffffu ? -1 : static_cast<int32_t>(wi);
}

__device__ __forceinline__ void topk_lists(const float *src, int n, int k, int32_t *__restrict__ ids) {
    uint32_t wk, wi;
    block_best(
        [&](qllm_topk::List<SEL_KFAST> &l) {
            batched<8>(threadIdx.x, n, SEL_THREADS, [&](int i) { return src[i]; },
                       [&](int i, float v) { l.insert(score_key(v), static_cast<uint32_t>(i)); });
        },
        k, wk, wi);
    if ((threadIdx.x >> 5) == 0) write_ascending(wi, k, ids);
}

/* Block-wide exclusive count of `flag` over the threads before this one (in
 * thread order), and the block's total in *total; wsum: SEL_THREADS / 32
 * ints of shared memory.  All threads call it; wsum is free again on return. */
__device__ __forceinline__ int block_flag_scan(bool flag, int *wsum, int &total) {
    constexpr int NWS = SEL_THREADS / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned b = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) wsum[warp] = __popc(b);
    __syncthreads();
    int before = __popc(b & ((1u << lane) - 1u));
    total = 0;
#pragma unroll
    for (int w = 0; w < NWS; ++w) {
        before += w < warp ? wsum[w] : 0;
        total += wsum[w];
    }
    __syncthreads();
    return before;
}

__device__ __forceinline__ void topk_radix(const float *src, int n, int k, int32_t *__restrict__ ids) {
    constexpr int NWS = SEL_THREADS / 32;
    __shared__ int hist[256];
    __shared__ uint32_t s_prefix;
    __shared__ int s_need;
    __shared__ int wsum[NWS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const unsigned lt_mask = (1u << lane) - 1u;
    for (int a = n + tid; a < k; a += SEL_THREADS) ids[a] = -1;
    if (k > n) k = n;
    if (k <= 0) return;
    uint32_t prefix = 0u, mask = 0u;
    int need = k; /* keys still to take among those matching prefix on mask */
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int d = tid; d < 256; d += SEL_THREADS) hist[d] = 0;
        __syncthreads();
        for (int c0 = 0; c0 < n; c0 += SEL_THREADS) {
            const int i = c0 + tid;
            int digit = 256; /* none */
            if (i < n) {
                const uint32_t key = score_key(src[i]);
                if ((key & mask) == prefix) digit = static_cast<int>((key >> shift) & 255u);
            }
            const unsigned peers = __match_any_sync(0xffffffffu, digit);
            if (digit < 256 && (peers & lt_mask) == 0u) atomicAdd(&hist[digit], __popc(peers));
        }
        __syncthreads();
        if (warp == 0) {
            /* lane l holds digits 255 - 8l down to 248 - 8l: best first */
            int c[8], tot = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                c[j] = hist[255 - 8 * lane - j];
                tot += c[j];
            }
            int inc = tot;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o) inc += y;
            }
            const int exc = inc - tot;
            if (exc < need && need <= inc) { /* exactly one lane */
                int cum = exc;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (cum + c[j] >= need) {
                        s_prefix = prefix | (static_cast<uint32_t>(255 - 8 * lane - j) << shift);
                        s_need = need - cum;
                        break;
                    }
                    cum += c[j];
                }
            }
        }
        __syncthreads();
        prefix = s_prefix;
        need = s_need;
        mask |= 255u << shift;
        /* s_prefix / s_need are written again only after the next pass's two barriers */
    }
    int base_eq = 0, base_out = 0;
    for (int c0 = 0; c0 < n && base_out < k; c0 += SEL_THREADS) {
        const int i = c0 + tid;
        const uint32_t key = i < n ? score_key(src[i]) : 0u;
        const bool gt = i < n && key > prefix;
        const bool eq = i < n && key == prefix;
        int eq_tot = 0, take_tot = 0;
        const int eq_before = base_eq + block_flag_scan(eq, wsum, eq_tot);
        const bool take = gt || (eq && eq_before < need);
        const int pos = base_out + block_flag_scan(take, wsum, take_tot);
        if (take) ids[pos] = i;
        base_eq += eq_tot;
        base_out += take_tot;
    }
}

__device__ __forceinline__ void topk_ascending(const float *src, int n, int k, int32_t *__restrict__ ids) {
    if (k <= SEL_KFAST)
        topk_lists(src, n, k, ids);
    else
        topk_radix(src, n, k, ids);
}

/* Top-k of scores s[0..n) from an earlier launch: the lists read s once in
 * place; the radix select, which reads it 5 times, stages it in shared memory
 * sc[n] first. */
__device__ __forceinline__ void topk_staged(const float *__restrict__ s, int n, int k, int32_t *__restrict__ ids,
                                            float *sc) {
    if (k <= SEL_KFAST) {
        topk_lists(s, n, k, ids);
        return;
    }
    for (int i = threadIdx.x; i < n; i += SEL_THREADS) sc[i] = s[i];
    __syncthreads();
    topk_ascending(sc, n, k, ids);
}

__global__ void __launch_bounds__(SEL_THREADS) select_kernel(const float *__restrict__ s, int n, int k,
                                                             bool staged, int32_t *__restrict__ ids,
                                                             const int64_t *__restrict__ dyn) {
    if (dyn != nullptr) { /* decode: n, k from the device row (smem sized for the maxima) */
        n = static_cast<int>(dyn[QLLM_DYN_NBLK]);
        k = static_cast<int>(dyn[QLLM_DYN_NRET]);
    }
    extern __shared__ float sel_smem[]; /* [n] scores when staged, then k ints */
    /* two call sites, so that each knows its memory space: one pointer that may
     * be shared or global would make every score read a generic load */
    if (staged)
        topk_staged(s, n, k, ids, sel_smem);
    else
        topk_ascending(s, n, k, ids);
}

/* Selection with the question-head term (qllm_cuda_select_blocks_qheads).
 * Series 0 is bscore[0..n), series c >= 1 is raw column c-1.  Means and
 * population stds: chunks of QS_CH series, each thread summing its candidates
 * per series, warp sums then per-warp partials in a fixed order (two passes:
 * mean, then squared deviations; deterministic).  Then every candidate's
 * combined score goes to shared memory (staged) or back into bscore, and the
 * top-k runs on it.  bscore is read and written in place by the same thread and
 * read by others only after a barrier: no __restrict__ / const.
 * Dynamic shared memory: mu, sd [n_cols+1] each, the staged scores [n] when
 * staged, then k ints (qsel_smem). */
constexpr int QS_CH = 32;

__global__ void __launch_bounds__(SEL_THREADS, 1) qsel_kernel(float *bscore, int n, int k, bool staged,
                                                           const float *__restrict__ raw, int64_t ld,
                                                           int n_cols, float weight, int32_t *__restrict__ ids,
                                                           const int64_t *__restrict__ dyn) {
    if (dyn != nullptr) {
        n = static_cast<int>(dyn[QLLM_DYN_NBLK]);
        k = static_cast<int>(dyn[QLLM_DYN_NRET]);
    }
    extern __shared__ float sel_smem[];
    __shared__ float part[QS_CH][SEL_THREADS / 32];
    if (n < 1 || k < 1) return; /* uniform: every thread exits */
    const int S = n_cols + 1;
    float *mu = sel_smem, *sd = sel_smem + S;
    float *sc_shared = sel_smem + 2 * S; /* the combined scores when staged, else in bscore */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float fn = static_cast<float>(n);
    for (int c0 = 0; c0 < S; c0 += QS_CH) {
        const int cn = S - c0 < QS_CH ? S - c0 : QS_CH;
        for (int pass = 0; pass < 2; ++pass) {
            for (int j = 0; j < cn; ++j) {
                const int c = c0 + j;
                const float *src = c == 0 ? bscore : raw + (c - 1);
                const int64_t step = c == 0 ? 1 : ld;
                const float m = pass ? mu[c] : 0.0f;
                float acc = 0.0f;
                for (int b = threadIdx.x; b < n; b += SEL_THREADS) {
                    float x = src[b * step];
                    if (pass) {
                        x -= m;
                        x *= x;
                    }
                    acc += x;
                }
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
                if (lane == 0) part[j][warp] = acc;
            }
            __syncthreads();
            if (threadIdx.x < cn) {
                float t = 0.0f;
#pragma unroll
                for (int w = 0; w < SEL_THREADS / 32; ++w) t += part[threadIdx.x][w];
                const int c = c0 + threadIdx.x;
                if (pass == 0)
                    mu[c] = t / fn;
                else
                    sd[c] = fmaxf(sqrtf(t / fn), 1e-6f);
            }
            __syncthreads();
        }
    }
    const float fc = static_cast<float>(n_cols > 0 ? n_cols : 1);
    for (int b = threadIdx.x; b < n; b += SEL_THREADS) {
        float zq = 0.0f;
        for (int c = 1; c <= n_cols; ++c) zq += (raw[b * ld + (c - 1)] - mu[c]) / sd[c];
        const float v = (bscore[b] - mu[0]) / sd[0] + weight * (zq / fc);
        if (staged)
            sc_shared[b] = v;
        else
            bscore[b] = v;
    }
    __syncthreads();
    if (staged) /* two call sites: see select_kernel */
        topk_ascending(sc_shared, n, k, ids);
    else
        topk_ascending(bscore, n, k, ids);
}

/* ------------------------------------------------------ question-head scores */

constexpr int QR_THREADS = 128;
constexpr int QR_TOK = 16;      /* question tokens per shared-memory chunk */
constexpr int QR_MAX_HEADS = 32; /* heads per launch (more: several launches) */

struct QhRec {
    int n, col0;
    int heads[QR_MAX_HEADS];
};

/* raw[b, col0 + i] = max_{t, j} tokens[h_i, t] . k_j over block b (grid: blocks x heads). */
template <typename T>
__global__ void __launch_bounds__(QR_THREADS) qrec_kernel(qllm_gpu_layer ly, int64_t b0,
                                                          const float *__restrict__ tokens, int n_tok,
                                                          QhRec hr, float *__restrict__ raw, int64_t ld) {
    __shared__ float qs[QR_TOK][128];
    __shared__ float red[QR_THREADS / 32];
    const int64_t b = b0 + blockIdx.x;
    const int i = blockIdx.y;
    const int h = hr.heads[i];
    const int D = ly.head_dim, bs = ly.block_size;
    const int kvh = h / (ly.hq / ly.hkv);
    const T *keys = static_cast<const T *>(ly.k_store) + static_cast<int64_t>(kvh) * ly.cap * D;
    const int64_t pos0 = ly.n_init + b * bs;
    const float *qt = tokens + static_cast<int64_t>(h) * n_tok * D;
    float best = -INFINITY;
    for (int t0 = 0; t0 < n_tok; t0 += QR_TOK) {
        const int nt = n_tok - t0 < QR_TOK ? n_tok - t0 : QR_TOK;
        __syncthreads(); /* the previous chunk is consumed */
        for (int e = threadIdx.x; e < QR_TOK * D; e += QR_THREADS) {
            const int t = e / D, d = e % D;
            qs[t][d] = t < nt ? qt[static_cast<int64_t>(t0 + t) * D + d] : 0.0f;
        }
        __syncthreads();
        for (int j = threadIdx.x; j < bs; j += QR_THREADS) {
            float acc[QR_TOK];
#pragma unroll
            for (int t = 0; t < QR_TOK; ++t) acc[t] = 0.0f;
            const T *kr = keys + kv_row(pos0 + j, ly.n_init, ly.wmask) * D;
            for (int d0 = 0; d0 < D; d0 += 8) {
                float x[8];
                load8(kr + d0, x);
#pragma unroll
                for (int t = 0; t < QR_TOK; ++t)
#pragma unroll
                    for (int jj = 0; jj < 8; ++jj) acc[t] = fmaf(x[jj], qs[t][d0 + jj], acc[t]);
            }
#pragma unroll
            for (int t = 0; t < QR_TOK; ++t)
                if (t < nt) best = fmaxf(best, acc[t]);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < QR_THREADS / 32; ++w) best = fmaxf(best, red[w]);
        raw[b * ld + hr.col0 + i] = best;
    }
}

/* ------------------------------------------------------------- attention */

struct AttnArgs {
    const void *qfix, *qloc; /* [hq, E, D] */
    const void *kst, *vst;   /* [hkv, cap, D] */
    int64_t cap;
    int64_t wmask;           /* kv_row */
    const void *kc, *vc;     /* tiered: block cache [n_slots, hkv, bs, D], else NULL */
    const int32_t *slot_of;  /* tiered: cache slot of each block */
    int hkv;
    const void *krot;        /* [hkv, L, D] */
    const int32_t *ids;
    int64_t P0, T0;
    int E, L, init_len, n_ret, bs, n_init, n_local, m, group, streaming, hq;
    float sl2;
    void *out;
    int64_t o_hs, o_ts;
    float *lse; /* [hq, E] */
    float *part_o, *part_lse;
    int n_split;      /* thread blocks per row tile (grid.z) */
    int n_split_eff;  /* splits that get tiles (<= n_split; the rest write empty partials) */
    int pack;         /* rows are the query heads of one KV head (E = 1; set by the launcher) */
    int pair_rows;    /* heavy / light row tiles paired in the grid order (attn_body; set by the launcher) */
    const int64_t *dyn; /* decode: sizes from the device row, else NULL */
    /* early start (qllm_gpu_early; wgmma kernel only), else NULL: wait for
     * sig[0] >= sig_prep before reading the rotated queries and keys, and for
     * sig[1] >= sig_ids before the retrieved tiles' addresses */
    const int32_t *sig;
    int sig_prep, sig_ids;
};

/* Element offset of memory key u (init | retrieved blocks | tail memory) of
 * KV head hk, in the store (from_cache false) or the block cache (tiered). */
template <int D>
__device__ __forceinline__ int64_t mem_off(const AttnArgs &a, int hk, int64_t u, bool &from_cache) {
    from_cache = false;
    int64_t pos;
    if (u < a.init_len) {
        pos = u;
    } else {
        u -= a.init_len;
        const int64_t nbk = static_cast<int64_t>(a.n_ret) * a.bs;
        if (u < nbk) {
            /* 32-bit division: u < n_ret * bs, a few thousand */
            const int ui = static_cast<int>(u), bi = ui / a.bs;
            /* L2: with an early start the ids were written while this grid ran */
            const int64_t id = __ldcg(a.ids + bi), j = ui - bi * a.bs;
            if (a.slot_of != nullptr) {
                from_cache = true;
                return ((static_cast<int64_t>(a.slot_of[id]) * a.hkv + hk) * a.bs + j) * D;
            }
            pos = a.n_init + id * a.bs + j;
        } else {
            pos = a.T0 + (u - nbk);
        }
    }
    return (static_cast<int64_t>(hk) * a.cap + kv_row(pos, a.n_init, a.wmask)) * D;
}

/* Offset of the first key of memory tile [u0, u0 + BN) when its BN keys are
 * consecutive rows of one buffer (init rows, one retrieved block, or tail
 * positions the ring does not wrap); -1 otherwise (mem_off per key). */
template <int D>
__device__ __forceinline__ int64_t mem_tile_base(const AttnArgs &a, int hk, int64_t u0, bool &from_cache) {
    from_cache = false;
    const int64_t u1 = u0 + BN - 1;
    if (u1 < a.init_len) return u1 < a.n_init ? (static_cast<int64_t>(hk) * a.cap + u0) * D : -1;
    if (u0 < a.init_len) return -1;
    const int64_t nbk = static_cast<int64_t>(a.n_ret) * a.bs;
    const int64_t v0 = u0 - a.init_len, v1 = u1 - a.init_len;
    if (v1 < nbk) {
        if (static_cast<int>(v0) / a.bs != static_cast<int>(v1) / a.bs) return -1;
        const int64_t o = mem_off<D>(a, hk, u0, from_cache);
        if (from_cache) return o; /* block cache slots hold whole blocks */
        bool c1 = false;
        return mem_off<D>(a, hk, u1, c1) - o == static_cast<int64_t>(BN - 1) * D ? o : -1;
    }
    if (v0 < nbk) return -1;
    const int64_t p0 = a.T0 + (v0 - nbk);
    const int64_t w0 = kv_row(p0, a.n_init, a.wmask);
    if (kv_row(p0 + BN - 1, a.n_init, a.wmask) - w0 != BN - 1) return -1;
    return (static_cast<int64_t>(hk) * a.cap + w0) * D;
}

/* The first 1024-byte boundary in the dynamic shared memory, as smem_raw plus
 * an offset: a pointer made from the rounded integer would be generic to the
 * compiler, and every access through it a generic LD/ST (longer latency than
 * LDS, and a long-scoreboard wait) instead of a shared-memory one. */
__device__ __forceinline__ unsigned char *smem_aligned1024(unsigned char *smem_raw) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(smem_raw);
    return smem_raw + (((p + 1023) & ~static_cast<uintptr_t>(1023)) - p);
}

/* op over 16 values as a tree of depth 4 (every index a constant: registers) */
template <typename Op>
__device__ __forceinline__ float tree16(float (&v)[16], Op op) {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = op(v[j], v[j + 8]);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = op(v[j], v[j + 4]);
    v[0] = op(v[0], v[2]);
    v[1] = op(v[1], v[3]);
    return op(v[0], v[1]);
}

/* Attention tile table (attn_body): entries of the first ATT_TAB tiles of a
 * CTA, after the Q/K/V tiles in shared memory. */
constexpr int ATT_TAB = 96;
/* Online softmax: the running max of a row moves only when a tile raises it
 * by more than this (log2 units), so most tiles skip the rescale of O. */
constexpr float ATT_SLACK = 8.0f;
constexpr int ATT_ENT_B = 24;
template <typename T, int D, int MI, int NW, bool WG>
__host__ __device__ constexpr size_t attn_tab_off() {
    return WG ? static_cast<size_t>(2 * NW * 16 * MI + 4 * BN) * D * sizeof(T)
              : static_cast<size_t>(NW * 16 * MI + 4 * BN) * (D + 8) * sizeof(T);
}

/* One CTA = BM = 64*MI query rows of one head (NW warps x 16*MI rows; with
 * MI = 2 each K/V fragment feeds the MMAs of two 16-row groups).  Tiles: memory
 * tiles (fixed-position queries, un-rotated keys) and local tiles (local
 * rotation).  mma.sync: memory tiles first, then local ones (the queries switch
 * once); wgmma: local tiles first, then the memory tiles, those with retrieved
 * keys last (perm; both query tiles stay in shared memory).
 *
 * WG (sm_90a): the two products on wgmma, one warpgroup = the CTA's 64 rows,
 * tiles in the 128-byte-swizzled layout of wgmma.cuh (from a 1024-byte
 * boundary: fixed Q, local Q, two K stages, two V stages, 16 KB each), and a
 * software pipeline: S of tile t+1 is issued before P V of tile t, and in the
 * PTX the softmax of tile t precedes the wait for P V of tile t-1 (ptxas moves
 * that wait above it: softmax_pack). */
template <typename T, int D, int MI, int NW, bool WG>
__device__ __forceinline__ void attn_body(const AttnArgs &a) {
    constexpr int LD = D + 8;     /* padded smem row (elements): ldmatrix without conflicts */
    constexpr int CH = D / 8;     /* 16-byte chunks per row */
    constexpr int NDT = D / 8;    /* 8-wide n-tiles of the output */
    constexpr int NT = NW * 32;   /* threads */
    constexpr int BM = NW * 16 * MI; /* rows per CTA: NW warps x MI 16-row groups */
    static_assert(NT % CH == 0 && (BN * CH) % NT == 0, "tile loads: whole rows per pass");
    static_assert(!WG || (MI == 1 && NW == 4 && D == 128 && BN == 64), "wgmma variant: 64 x 128 tiles");
    constexpr int TILE_B = WG ? 64 * D * 2 : 0;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char *smem = WG ? smem_aligned1024(smem_raw) : smem_raw;
    /* WG: QsF, QsL, K[2], V[2] tiles of TILE_B; else Q, K[2], V[2] in padded rows */
    T *Qs = reinterpret_cast<T *>(smem);
    T *Ks = WG ? reinterpret_cast<T *>(smem + 2 * TILE_B) : Qs + BM * LD;
    T *Vs = WG ? reinterpret_cast<T *>(smem + 4 * TILE_B) : Ks + 2 * BN * LD;
    auto kstage = [&](int s) -> T * {
        return WG ? reinterpret_cast<T *>(reinterpret_cast<unsigned char *>(Ks) + s * TILE_B) : Ks + s * BN * LD;
    };
    auto vstage = [&](int s) -> T * {
        return WG ? reinterpret_cast<T *>(reinterpret_cast<unsigned char *>(Vs) + s * TILE_B) : Vs + s * BN * LD;
    };
    /* element (row, col) of a tile */
    auto qdst = [&](T *tile, int row, int col) -> T * {
        if constexpr (WG)
            return reinterpret_cast<T *>(reinterpret_cast<unsigned char *>(tile) + qllm_swz_off(row, col));
        else
            return tile + row * LD + col;
    };

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    /* Row tile and head.  The later row tiles of an execution block see more
     * tail memory (up to one more key tile per row tile), so their CTAs run
     * longer.  With a.pair_rows (an even number of row tiles G2 = 2G, one
     * split) the grid's first half takes the heavy row tiles G..2G-1 and the
     * second half the light ones in reverse, so CTAs j and j + SMs -- one SM's
     * two CTAs when the dispatch goes round the SMs -- get row tiles qt and
     * 2G-1-qt whenever SMs - half the grid is a multiple of G (132 SMs, 8 row
     * tiles of 32 heads); any other pairing is still a permutation. */
    int qt = blockIdx.x, hy = blockIdx.y;
    if (a.pair_rows) {
        const int G = gridDim.x / 2, j = blockIdx.x + gridDim.x * blockIdx.y, half = G * gridDim.y;
        const int u = j < half ? j : j - half;
        hy = u / G;
        qt = j < half ? G + u % G : G - 1 - u % G;
    }
    const int split = blockIdx.z;
    /* Packed (a.pack, one query: E = 1): the CTA's rows are the a.group query
     * heads of KV head blockIdx.y, all at the same position, so each K/V tile
     * is read once per KV head.  Otherwise the rows are positions of head h. */
    const bool packed = a.pack != 0;
    const int h = packed ? blockIdx.y * a.group : hy;
    const int hk = packed ? blockIdx.y : h / a.group;
    const int r0 = qt * BM;
    const int rows_valid = packed ? a.group : min(BM, a.E - r0);
    const int npos = packed ? 1 : rows_valid; /* distinct positions among the rows */
    const int rstep = packed ? 0 : 1;         /* position step from one row to the next */

    const T *kst = static_cast<const T *>(a.kst);
    const T *vst = static_cast<const T *>(a.vst);
    const T *krot = static_cast<const T *>(a.krot);
    const T *kc = static_cast<const T *>(a.kc);
    const T *vc = static_cast<const T *>(a.vc);
    const int64_t kv_head = static_cast<int64_t>(hk) * a.cap;

    /* tiles: memory tiles first, then local tiles of the recent segment */
    const int64_t nbk = static_cast<int64_t>(a.n_ret) * a.bs;
    const int fixed_end = static_cast<int>(a.init_len + nbk); /* keys seen by every query */
    /* tail memory: positions T0 .. T0+m-1, visible to row p iff pos <= p - n_local:
     * this CTA's last row bounds how many it needs */
    int64_t m_cta = a.P0 + r0 + npos - 1 - a.n_local - a.T0 + 1;
    m_cta = m_cta < 0 ? 0 : (m_cta > a.m ? a.m : m_cta);
    const int M_total = fixed_end + static_cast<int>(m_cta);
    const int n_mt = (M_total + BN - 1) / BN;
    const int off = static_cast<int>(a.P0 - a.T0);
    const int64_t dense_lim = static_cast<int64_t>(a.n_init) + a.n_local;
    const bool first_dense = a.P0 + r0 < dense_lim;
    int lo_s = first_dense ? 0 : off + r0 - a.n_local + 1;
    if (lo_s < 0) lo_s = 0;
    const int hi_s = off + r0 + npos - 1;
    const int lt0 = lo_s / BN, lt1 = hi_s / BN;
    const int n_tot = n_mt + (lt1 - lt0 + 1);
    const int per = (n_tot + a.n_split_eff - 1) / a.n_split_eff;
    const int t_begin = split * per;
    const int t_end = min(n_tot, t_begin + per);
    /* Processing order of the CTA's tiles t_begin .. t_end-1 (tile p of the
     * loop is logical tile perm(p)).  wgmma: the local tiles, then the memory
     * tiles that hold no retrieved key (init, tail), then those that do: with
     * an early start (a.sig) only these need block i+1's ids, so the CTA waits
     * for them there, after most of its work.  mma.sync: the logical order
     * (memory tiles, then local).  The order is fixed by the arguments, so an
     * early start changes no bit of the result. */
    const int32_t *sig = WG ? a.sig : nullptr;
    /* wgmma: n_loc local tiles from lo_loc, n_pre memory tiles from t_begin,
     * n_post from lo_post, then the rest from lo_dep (retrieved keys) */
    int n_loc = 0, n_pre = 0, n_post = 0, lo_loc = 0, lo_post = 0, lo_dep = 0, n_dep = 0;
    if constexpr (WG) {
        const int me = min(t_end, n_mt); /* memory tiles of the range: t_begin .. me-1 */
        /* logical memory tiles d0 .. d1-1 hold retrieved keys */
        const int d0 = nbk > 0 ? a.init_len / BN : n_mt;
        const int d1 = nbk > 0 ? min(n_mt, (fixed_end + BN - 1) / BN) : n_mt;
        lo_loc = max(t_begin, n_mt);
        n_loc = max(0, t_end - lo_loc);
        n_pre = max(0, min(me, d0) - t_begin);
        lo_post = max(t_begin, d1);
        n_post = max(0, me - lo_post);
        lo_dep = max(t_begin, d0);
        n_dep = max(0, min(me, d1) - lo_dep);
    }
    auto perm = [&](int p) -> int {
        if constexpr (!WG) return p;
        int j = p - t_begin;
        if (j < n_loc) return lo_loc + j;
        j -= n_loc;
        if (j < n_pre) return t_begin + j;
        j -= n_pre;
        return j < n_post ? lo_post + j : lo_dep + (j - n_post);
    };
    /* first loop index of the tiles that need the ids; with an early start
     * their table entries wait for the ids */
    const int p_dep = t_begin + n_loc + n_pre + n_post;
    const bool defer = sig != nullptr && n_dep > 0;

    const T *qf = static_cast<const T *>(a.qfix) + (static_cast<int64_t>(h) * a.E + r0) * D;
    const T *ql = static_cast<const T *>(a.qloc) + (static_cast<int64_t>(h) * a.E + r0) * D;
    auto load_q = [&](T *dst, const T *src) {
        for (int c = tid; c < BM * CH; c += NT) {
            const int row = c / CH, ch = c % CH;
            const bool v = row < rows_valid;
            cp_async16(qdst(dst, row, ch * 8), src + (v ? row * D + ch * 8 : 0), v);
        }
    };
    /* sources of key row kr of tile t, a tile whose keys are not consecutive
     * rows (the per-key path); false past the tile's live keys */
    auto row_src = [&](int t, int kr, const T *&ksrc, const T *&vsrc) -> bool {
        if (t < n_mt) {
            const int64_t u = static_cast<int64_t>(t) * BN + kr;
            const bool v = u < M_total;
            bool cached = false;
            const int64_t o = v ? mem_off<D>(a, hk, u, cached) : 0;
            ksrc = (cached ? kc : kst) + o;
            vsrc = (cached ? vc : vst) + o;
            return v;
        }
        const int sidx = (lt0 + t - n_mt) * BN + kr;
        const bool v = sidx < a.L;
        const int64_t sv = v ? sidx : 0;
        ksrc = krot + (static_cast<int64_t>(hk) * a.L + sv) * D;
        vsrc = vst + (v ? (kv_head + kv_row(a.T0 + sv, a.n_init, a.wmask)) * D : 0);
        return v;
    };
    /* this thread's chunk of row tid / CH + i * (NT / CH) of a tile sits cd0 + i * CDI
     * bytes in (swizzled: a row step of a multiple of 8 keeps the chunk order) */
    static_assert(!WG || (NT / CH) % 8 == 0, "tile loads: row steps of 8");
    constexpr uint32_t CDI = WG ? (NT / CH) * 128 : (NT / CH) * LD * sizeof(T);
    const uint32_t cd0 = WG ? qllm_swz_off(tid / CH, (tid % CH) * 8)
                            : static_cast<uint32_t>(((tid / CH) * LD + (tid % CH) * 8) * sizeof(T));
    auto cdst = [&](T *tile, int i) -> T * {
        return reinterpret_cast<T *>(reinterpret_cast<unsigned char *>(tile) + cd0 + i * CDI);
    };
    struct TileEnt {
        const T *k, *v; /* first key / value row when consecutive rows, else null (per key) */
        int lim;        /* live rows (>= BN: the whole tile) */
        int kind;       /* classify | logical tile << 2 */
    };
    static_assert(sizeof(TileEnt) == ATT_ENT_B, "tile table entries");
    /* Copies of tile t's keys into kdst and/or its values into vdst (either
     * may be null), from the tile's table entry.  This thread's chunks: column
     * chunk tid % CH of rows tid / CH + i * NT / CH.  Consecutive rows (e.k
     * set, nearly always) are unrolled; the per-key case (e.k null) stays a
     * compact loop, so the main loop's code stays small (instruction cache). */
    auto load_rows = [&](const TileEnt &e, T *kdst, T *vdst) {
        const int ch = tid % CH;
        if (e.k != nullptr) {
            const T *kb = e.k + ch * 8, *vb = e.v + ch * 8;
            if (e.lim >= BN) { /* every row live: no predicates */
#pragma unroll
                for (int i = 0; i < BN * CH / NT; ++i) {
                    const int o = (tid / CH + i * (NT / CH)) * D;
                    if (kdst != nullptr) cp_async16_all(cdst(kdst, i), kb + o);
                    if (vdst != nullptr) cp_async16_all(cdst(vdst, i), vb + o);
                }
            } else {
#pragma unroll
                for (int i = 0; i < BN * CH / NT; ++i) {
                    const int kr = tid / CH + i * (NT / CH);
                    const bool v = kr < e.lim;
                    const int o = v ? kr * D : 0;
                    if (kdst != nullptr) cp_async16(cdst(kdst, i), kb + o, v);
                    if (vdst != nullptr) cp_async16(cdst(vdst, i), vb + o, v);
                }
            }
        } else {
#pragma unroll 1
            for (int i = 0; i < BN * CH / NT; ++i) {
                const int kr = tid / CH + i * (NT / CH);
                const T *ksrc, *vsrc;
                const bool v = row_src(e.kind >> 2, kr, ksrc, vsrc);
                if (kdst != nullptr) cp_async16(cdst(kdst, i), ksrc + ch * 8, v);
                if (vdst != nullptr) cp_async16(cdst(vdst, i), vsrc + ch * 8, v);
            }
        }
    };

    float O[MI][NDT][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int i = 0; i < NDT; ++i) O[mi][i][0] = O[mi][i][1] = O[mi][i][2] = O[mi][i][3] = 0.0f;
    float mrow[MI][2], lrow[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mrow[mi][i] = -INFINITY;
            lrow[mi][i] = 0.0f;
        }
    /* row (mi, i) of this thread sits at segment index prel0 + mi*16 + 8*i; it is
     * dense (ordinary causal attention) iff that index is < dense_rel */
    const int prel0 = off + r0 + rstep * (warp * (16 * MI) + g);
    const int dense_rel = static_cast<int>(max(static_cast<int64_t>(-1), min(static_cast<int64_t>(INT_MAX / 2), dense_lim - a.T0)));
    const bool warp_active = warp * (16 * MI) < rows_valid;
    /* streaming: tail memory only below n_init */
    const int stream_lim = a.streaming ? static_cast<int>(max(static_cast<int64_t>(0), a.n_init - a.T0)) : INT_MAX;
    /* Tile kinds: 0 = no mask needed, 1 = memory boundary, 2 = local boundary.
     * Local tile keys s0..s0+BN-1 are visible to every row of this CTA iff
     * s0+BN-1 < L, s0+BN-1 <= first row, and (all rows dense, or s0 >= last row - n_local + 1). */
    const int pr_first = off + r0;
    const int pr_last = off + r0 + npos - 1;
    const bool all_dense = a.P0 + r0 + npos - 1 < dense_lim;
    auto classify = [&](int t) -> int {
        if (t < n_mt) return (t + 1) * BN <= fixed_end ? 0 : 1;
        const int s0 = (lt0 + t - n_mt) * BN;
        const bool full = s0 + BN - 1 < a.L && s0 + BN - 1 <= pr_first &&
                          (all_dense || s0 >= pr_last - a.n_local + 1);
        return full ? 0 : 2;
    };
    /* Per-CTA tile table in shared memory, filled once: where each tile's keys
     * and values start, its live rows and its mask kind (tiles past ATT_TAB
     * compute theirs on the fly).  The loop then reads 32 bytes per tile
     * instead of redoing mem_tile_base and classify (a division and a dozen
     * branches, in every thread, for every tile: a fifth of the loop's
     * instructions).  Entries are in loop order (perm); a tile's keys are
     * consecutive rows of one buffer nearly always, then k / v point at the
     * first (else null: per key, row_src). */
    /* entry of memory tile t (< n_mt) */
    auto mem_ent = [&](int t) -> TileEnt {
        TileEnt e{nullptr, nullptr, M_total - t * BN, classify(t) | (t << 2)};
        bool cached = false;
        const int64_t base = mem_tile_base<D>(a, hk, static_cast<int64_t>(t) * BN, cached);
        if (base >= 0) {
            e.k = (cached ? kc : kst) + base;
            e.v = (cached ? vc : vst) + base;
        }
        return e;
    };
    auto make_ent = [&](int p) -> TileEnt {
        const int t = perm(p);
        if (t < n_mt) return mem_ent(t);
        /* local tile: keys rotated in krot, values in the store (consecutive
         * rows unless the ring wraps inside the tile: then per key) */
        const int s0 = (lt0 + t - n_mt) * BN;
        TileEnt e{nullptr, nullptr, a.L - s0, classify(t) | (t << 2)};
        const int64_t p0 = a.T0 + s0;
        const int64_t w0 = kv_row(p0, a.n_init, a.wmask);
        if (kv_row(p0 + BN - 1, a.n_init, a.wmask) - w0 == BN - 1) {
            e.k = krot + (static_cast<int64_t>(hk) * a.L + s0) * D;
            e.v = vst + (kv_head + w0) * D;
        }
        return e;
    };
    TileEnt *tab = reinterpret_cast<TileEnt *>(smem + attn_tab_off<T, D, MI, NW, WG>());
    auto ent = [&](int t) -> TileEnt {
        const int i = t - t_begin;
        if (__builtin_expect(i < ATT_TAB, 1)) return tab[i];
        return make_ent(t);
    };
    /* with an early start the entries from p_dep on are made once the ids are there */
    const int tab_now = (defer ? p_dep : t_end) - t_begin;
    for (int i = tid; i < ATT_TAB && i < tab_now; i += NT) tab[i] = make_ent(t_begin + i);
    if (sig != nullptr)
        cta_wait_count(sig, a.sig_prep); /* the seam's rotations of this block (a block barrier) */
    else
        __syncthreads();
    /* the ids of the retrieved blocks, then their tiles' entries (published by
     * the caller's next block barrier) */
    auto wait_ids = [&]() {
        cta_wait_count(sig + 1, a.sig_ids);
        for (int i = p_dep - t_begin + tid; i < ATT_TAB && i < t_end - t_begin; i += NT)
            tab[i] = mem_ent(lo_dep + i - (p_dep - t_begin));
    };
    /* raw scores of tile t: -inf where the key is not visible (boundary tiles
     * only).  Each row sees the tile's columns [lo, hi): memory tiles every key
     * before fixed_end plus the tail keys its position allows, local tiles the
     * causal window. */
    auto mask_tile = [&](float(&S)[MI][8][4], int p) {
        const int i = p - t_begin;
        const int kt = i < ATT_TAB ? tab[i].kind : classify(perm(p)) | (perm(p) << 2);
        const int kind = kt & 3, t = kt >> 2;
        if (kind == 0) return;
        int lo[MI][2], hi[MI][2];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int pr = prel0 + rstep * (mi * 16 + 8 * i);
                if (kind == 1) {
                    int lim = fixed_end;
                    if (pr >= dense_rel) {
                        const int tail = min(min(pr - a.n_local + 1, stream_lim), M_total - fixed_end);
                        if (tail > 0) lim += tail;
                    }
                    lo[mi][i] = 0;
                    hi[mi][i] = lim - t * BN;
                } else {
                    const int sbase = (lt0 + t - n_mt) * BN;
                    lo[mi][i] = (pr < dense_rel ? 0 : pr - a.n_local + 1) - sbase;
                    hi[mi][i] = min(a.L - 1, pr) + 1 - sbase;
                }
            }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = nt * 8 + tq * 2 + (e & 1);
                    if (col < lo[mi][e >> 1] || col >= hi[mi][e >> 1]) S[mi][nt][e] = -INFINITY;
                }
    };
    /* Online softmax of one tile in the log2 domain (the scale folded into the
     * exponent): S becomes P, alpha the factor for O; true when some row of
     * the warp needs O rescaled. */
    auto softmax_tile = [&](float(&S)[MI][8][4], float(&alpha)[MI][2]) -> bool {
        bool rescale = false;
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
            float mx[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) { /* a tree: 4 dependent steps, not 16 */
                float v[16];
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    v[2 * nt] = S[mi][nt][2 * i];
                    v[2 * nt + 1] = S[mi][nt][2 * i + 1];
                }
                mx[i] = tree16(v, [](float x, float y) { return fmaxf(x, y); });
            }
            float ref[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
                /* The running max moves only when the tile raises it by more than
                 * ATT_SLACK (log2 units): P stays below 2^ATT_SLACK, and O is
                 * rescaled on those tiles only (the first tile of a row always). */
                const float cand = mx[i] * a.sl2;
                const bool up = cand > mrow[mi][i] + ATT_SLACK;
                const float mn = up ? cand : mrow[mi][i];
                ref[i] = mn == -INFINITY ? 0.0f : mn;
                alpha[mi][i] = up ? fast_exp2(mrow[mi][i] - ref[i]) : 1.0f;
                rescale |= up;
                mrow[mi][i] = mn;
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                float v[16];
#pragma unroll
                for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const float p = fast_exp2(fmaf(S[mi][nt][2 * i + c], a.sl2, -ref[i]));
                        S[mi][nt][2 * i + c] = p;
                        v[2 * nt + c] = p;
                    }
                lrow[mi][i] = lrow[mi][i] * alpha[mi][i] + tree16(v, [](float x, float y) { return x + y; });
            }
        }
        return __any_sync(0xffffffffu, rescale);
    };
    auto rescale_o = [&](const float(&alpha)[MI][2]) {
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int dt = 0; dt < NDT; ++dt) {
                O[mi][dt][0] *= alpha[mi][0];
                O[mi][dt][1] *= alpha[mi][0];
                O[mi][dt][2] *= alpha[mi][1];
                O[mi][dt][3] *= alpha[mi][1];
            }
    };

    if constexpr (WG) {
        float S[1][8][4];
        float(&Sf)[32] = *reinterpret_cast<float(*)[32]>(&S[0][0][0]);
        float(&Of)[NDT * 4] = *reinterpret_cast<float(*)[NDT * 4]>(&O[0][0][0]);
        const unsigned char *QsF = smem, *QsL = smem + TILE_B;
        auto stage_of = [&](int t) { return (t - t_begin) & 1; };
        /* S = Q K_t^T, issued and committed (not waited); the local tiles come first */
        auto issue_s = [&](int t) {
            const uint64_t dq = qllm_sdesc(t - t_begin >= n_loc ? QsF : QsL, QLLM_WG_KMAJ_LBO, QLLM_WG_KMAJ_SBO);
            const uint64_t dk = qllm_sdesc(kstage(stage_of(t)), QLLM_WG_KMAJ_LBO, QLLM_WG_KMAJ_SBO);
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const int o = (kk / 4) * 8192 + (kk % 4) * 32; /* 16 columns = 32 bytes; blocks of 64 */
                wgmma_m64n64k16_ss<T>(Sf, qllm_sdesc_add(dq, o), qllm_sdesc_add(dk, o), kk > 0);
            }
            wg_commit();
        };
        uint32_t pa[BN / 16][4];
        /* O += P V_t from the registers pa */
        auto issue_pv = [&](int t) {
            const uint64_t dv = qllm_sdesc(vstage(stage_of(t)), QLLM_WG_MNMAJ_LBO, QLLM_WG_MNMAJ_SBO);
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) /* 16 keys = 16 rows of 128 bytes */
                wgmma_m64n128k16_rs<T>(Of, pa[kk], qllm_sdesc_add(dv, kk * 16 * 128));
            wg_commit();
        };
        /* mask and softmax of tile t (overlapping P V of tile t-1), then O
         * rescaled and P packed once that P V is done.  (ptxas places the wait
         * above the exponentials; NOTES_gpu.md rounds 7-8: keeping it below
         * them, or issuing S of tile t+1 before them, measured no faster.) */
        auto softmax_pack = [&](int t) {
            mask_tile(S, t);
            float alpha[1][2];
            const bool rescale = softmax_tile(S, alpha);
            wg_wait<0>();
            wg_fence_operand(Of);
            if (rescale) rescale_o(alpha);
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                pa[kk][0] = Cvt<T>::pack(S[0][2 * kk][0], S[0][2 * kk][1]);
                pa[kk][1] = Cvt<T>::pack(S[0][2 * kk][2], S[0][2 * kk][3]);
                pa[kk][2] = Cvt<T>::pack(S[0][2 * kk + 1][0], S[0][2 * kk + 1][1]);
                pa[kk][3] = Cvt<T>::pack(S[0][2 * kk + 1][2], S[0][2 * kk + 1][3]);
            }
        };
        if (t_begin < t_end) {
            /* prologue: both queries, K and V of the first tile, K of the second; S of the first */
            if (t_begin < n_mt) load_q(reinterpret_cast<T *>(smem), qf);
            if (t_end > n_mt) load_q(reinterpret_cast<T *>(smem + TILE_B), ql);
            if (defer && p_dep - 2 < t_begin) { /* the ids are needed at once */
                wait_ids();
                __syncthreads();
            }
            load_rows(ent(t_begin), kstage(0), vstage(0));
            if (t_begin + 1 < t_end) load_rows(ent(t_begin + 1), kstage(1), nullptr);
            cp_async_commit();
            cp_async_wait<0>();
            fence_async_smem();
            __syncthreads();
            wg_fence();
            issue_s(t_begin);
            wg_wait<0>();
            wg_fence_operand(Sf);
            /* every tile but the last (the wgmma sequence is the same on every
             * pass, so the compiler can keep the two products in flight) */
            for (int t = t_begin; t + 1 < t_end; ++t) {
                /* here: S holds tile t's scores; P V of tile t-1 may be running;
                 * the copies of K_{t+1} and V_t are in flight */
                softmax_pack(t);
                cp_async_wait<0>(); /* K_{t+1}, V_t */
                fence_async_smem();
                if (defer && t == p_dep - 2) wait_ids(); /* K of tile p_dep loads now */
                __syncthreads(); /* every warp is past S_t (K stage of t) and P V_{t-1} (V stage of t-1) */
                load_rows(ent(t + 1), nullptr, vstage(stage_of(t + 1)));
                if (t + 2 < t_end) load_rows(ent(t + 2), kstage(stage_of(t)), nullptr);
                cp_async_commit();
                wg_fence();
                issue_s(t + 1);
                issue_pv(t);
                wg_wait<1>(); /* S of tile t+1; P V of tile t keeps running */
                wg_fence_operand(Sf);
            }
            softmax_pack(t_end - 1);
            cp_async_wait<0>(); /* V of the last tile */
            fence_async_smem();
            __syncthreads();
            wg_fence();
            issue_pv(t_end - 1);
            wg_wait<0>();
            wg_fence_operand(Of);
        }
    } else {
        if (t_begin < t_end) {
            load_q(Qs, t_begin < n_mt ? qf : ql);
            load_rows(ent(t_begin), kstage(0), vstage(0));
        }
        cp_async_commit();

        for (int t = t_begin; t < t_end; ++t) {
            const int st = (t - t_begin) & 1;
            const bool more = t + 1 < t_end;
            if (more) {
                if (t == n_mt && t > t_begin) load_q(Qs, ql); /* first local tile: every warp is past the last one */
                load_rows(ent(t + 1), kstage(st ^ 1), vstage(st ^ 1));
            } else if (t == n_mt && t > t_begin) {
                load_q(Qs, ql);
            }
            cp_async_commit();
            if (t == n_mt && t > t_begin)
                cp_async_wait<0>(); /* the local queries */
            else
                cp_async_wait<1>();
            __syncthreads();
            if (warp_active) {
                const T *ks = kstage(st);
                const T *vs = vstage(st);
                float S[MI][8][4];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (int nt = 0; nt < 8; ++nt) S[mi][nt][0] = S[mi][nt][1] = S[mi][nt][2] = S[mi][nt][3] = 0.0f;
#pragma unroll
                for (int kk2 = 0; kk2 < D / 32; ++kk2) {
                    uint32_t qa[MI][2][4];
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi) {
                        const T *qp = Qs + (warp * (16 * MI) + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD +
                                      kk2 * 32 + (lane >> 4) * 8;
                        ldsm_x4(qa[mi][0][0], qa[mi][0][1], qa[mi][0][2], qa[mi][0][3], qp);
                        ldsm_x4(qa[mi][1][0], qa[mi][1][1], qa[mi][1][2], qa[mi][1][3], qp + 16);
                    }
#pragma unroll
                    for (int nt = 0; nt < 8; ++nt) {
                        uint32_t b0, b1, b2, b3;
                        ldsm_x4(b0, b1, b2, b3, ks + (nt * 8 + (lane & 7)) * LD + kk2 * 32 + (lane >> 3) * 8);
#pragma unroll
                        for (int mi = 0; mi < MI; ++mi) {
                            mma16816<T>(S[mi][nt], qa[mi][0], b0, b1);
                            mma16816<T>(S[mi][nt], qa[mi][1], b2, b3);
                        }
                    }
                }
                mask_tile(S, t);
                float alpha[MI][2];
                if (softmax_tile(S, alpha)) rescale_o(alpha);
                /* O += P V */
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk) {
                    uint32_t pa[MI][4];
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi) {
                        pa[mi][0] = Cvt<T>::pack(S[mi][2 * kk][0], S[mi][2 * kk][1]);
                        pa[mi][1] = Cvt<T>::pack(S[mi][2 * kk][2], S[mi][2 * kk][3]);
                        pa[mi][2] = Cvt<T>::pack(S[mi][2 * kk + 1][0], S[mi][2 * kk + 1][1]);
                        pa[mi][3] = Cvt<T>::pack(S[mi][2 * kk + 1][2], S[mi][2 * kk + 1][3]);
                    }
                    const T *vp = vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8;
#pragma unroll
                    for (int dt2 = 0; dt2 < D / 16; ++dt2) {
                        uint32_t b0, b1, b2, b3;
                        ldsm_x4_t(b0, b1, b2, b3, vp + dt2 * 16);
#pragma unroll
                        for (int mi = 0; mi < MI; ++mi) {
                            mma16816<T>(O[mi][2 * dt2], pa[mi], b0, b1);
                            mma16816<T>(O[mi][2 * dt2 + 1], pa[mi], b2, b3);
                        }
                    }
                }
            }
            __syncthreads();
        }
        cp_async_wait<0>();
    }

    /* epilogue */
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float l = lrow[mi][i];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int rl = warp * (16 * MI) + mi * 16 + g + 8 * i; /* row in the CTA */
            if (!warp_active || rl >= rows_valid) continue;
            const int hh = packed ? h + rl : h;  /* query head of the row */
            const int r = packed ? 0 : r0 + rl;  /* and its query index */
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            const float lse = l > 0.0f ? mrow[mi][i] + __log2f(l) : -INFINITY;
            if (a.n_split == 1) {
                T *o = static_cast<T *>(a.out) + hh * a.o_hs + r * a.o_ts;
#pragma unroll
                for (int dt = 0; dt < NDT; ++dt)
                    *reinterpret_cast<uint32_t *>(o + dt * 8 + tq * 2) =
                        Cvt<T>::pack(O[mi][dt][2 * i] * inv, O[mi][dt][2 * i + 1] * inv);
                if (tq == 0) a.lse[static_cast<int64_t>(hh) * a.E + r] = lse;
            } else {
                const int64_t row = (static_cast<int64_t>(split) * a.hq + hh) * a.E + r;
                float *o = a.part_o + row * D;
#pragma unroll
                for (int dt = 0; dt < NDT; ++dt)
                    *reinterpret_cast<float2 *>(o + dt * 8 + tq * 2) =
                        make_float2(O[mi][dt][2 * i] * inv, O[mi][dt][2 * i + 1] * inv);
                if (tq == 0) a.part_lse[row] = lse;
            }
        }
    /* early start: the grid ends after the seam (the kernels after it follow
     * the seam through it) */
    if (sig != nullptr) pdl_wait_primary();
}

template <typename T, int D, int MI, int NW, bool WG>
__global__ void __launch_bounds__(NW * 32, 8 / NW) attn_kernel(const AttnArgs a) {
    attn_body<T, D, MI, NW, WG>(a);
}

/* Decode step (E = 1): the sizes come from the device row; the split count
 * actually used is the host's choice for these sizes (ops_cuda.cpp
 * choose_split), so the result is bitwise that of attn_kernel. */
template <typename T, int D, int MI, int NW, bool WG>
__global__ void __launch_bounds__(NW * 32, 8 / NW) attn_dyn_kernel(const AttnArgs a0) {
    AttnArgs a = a0;
    a.P0 = a.dyn[QLLM_DYN_P0];
    a.T0 = a.dyn[QLLM_DYN_T0];
    a.L = static_cast<int>(a.dyn[QLLM_DYN_L]);
    a.init_len = static_cast<int>(a.dyn[QLLM_DYN_INIT]);
    a.n_ret = static_cast<int>(a.dyn[QLLM_DYN_NRET]);
    a.m = static_cast<int>(a.dyn[QLLM_DYN_M]);
    if (a.n_split > 1) {
        constexpr int BMr = NW * 16 * MI;
        const int64_t M = a.init_len + static_cast<int64_t>(a.n_ret) * a.bs + a.m;
        const int64_t lw = a.L < a.n_local + BMr ? a.L : a.n_local + BMr;
        const int64_t tiles = (M + BN - 1) / BN + lw / BN + 1;
        a.n_split_eff = static_cast<int>(tiles < a.n_split ? tiles : a.n_split);
    }
    attn_body<T, D, MI, NW, WG>(a);
}

/* Merge n_split (<= QLLM_CUDA_MAX_SPLIT) partial results of each (head, row).
 * One CTA of D threads per (row, head), one output dim per thread; every
 * thread reads all the splits' lse (the same addresses: broadcast) and its
 * dim of every split, all loads in flight together: in a decode step this
 * kernel is latency, not bandwidth.  Splits are summed in order. */
template <typename T>
__global__ void combine_kernel(const float *__restrict__ part_o, const float *__restrict__ part_lse,
                               int n_split, int hq, int E, int D, T *out, int64_t o_hs,
                               int64_t o_ts, float *lse) {
    const int r = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    const int64_t stride = static_cast<int64_t>(hq) * E; /* rows between splits */
    const int64_t row0 = static_cast<int64_t>(h) * E + r;
    float ls[QLLM_CUDA_MAX_SPLIT], po[QLLM_CUDA_MAX_SPLIT];
#pragma unroll
    for (int sp = 0; sp < QLLM_CUDA_MAX_SPLIT; ++sp) {
        ls[sp] = sp < n_split ? part_lse[row0 + sp * stride] : -INFINITY;
        po[sp] = sp < n_split ? part_o[(row0 + sp * stride) * D + d] : 0.0f;
    }
    float mx = -INFINITY;
#pragma unroll
    for (int sp = 0; sp < QLLM_CUDA_MAX_SPLIT; ++sp) mx = fmaxf(mx, ls[sp]);
    const float ref = mx == -INFINITY ? 0.0f : mx;
    float tot = 0.0f, acc = 0.0f;
#pragma unroll
    for (int sp = 0; sp < QLLM_CUDA_MAX_SPLIT; ++sp) {
        const float w = sp < n_split ? exp2f(ls[sp] - ref) : 0.0f;
        tot += w;
        acc += w * po[sp];
    }
    const float inv = tot > 0.0f ? 1.0f / tot : 0.0f;
    out[h * o_hs + r * o_ts + d] = Cvt<T>::from_f(acc * inv);
    if (d == 0) lse[row0] = tot > 0.0f ? ref + __log2f(tot) : -INFINITY;
}

/* ----------------------------------------------------------- token scores */

struct TsArgs {
    const void *qloc, *krot;
    const float *lse;
    float *scores;
    int64_t ring, P0, T0;
    int E, L, n_init, n_local, group;
    float sl2;
    int pack;  /* columns are the query heads of one KV head (E = 1; set by the launcher) */
    int order; /* heavy key tiles first: grid (heads, key tiles by rank), see ts_tile_of_rank */
};

/* Which (key, query) pairs of one token-score CTA are LOCAL: its 64 keys
 * s0 .. s0+63 of the recent segment, its query tiles qa .. qb. */
struct TsGeom {
    int s0, off, r_dense_end, qa, qb, h, hk, n_cols;
    bool packed;
};

/* The key tile of rank k (0 = first dispatched) of n, middle out from tile
 * c: c, c+1, c-1, c+2, c-2, ..., then the rest of the longer side.  A key
 * tile's work (query tiles qa .. qb) rises from the oldest keys to a plateau
 * and falls over the execution block's own keys, so from the plateau's middle
 * outwards is heaviest first: the light tiles fill the end of the grid. */
__device__ __forceinline__ int ts_tile_of_rank(int k, int n, int c) {
    const int left = c, right = n - 1 - c, m = min(left, right);
    if (k <= 2 * m) return k == 0 ? c : (k & 1) ? c + (k + 1) / 2 : c - k / 2;
    const int j = k - 2 * m;
    return right > left ? c + m + j : c - m - j;
}

/* This CTA's (key tile, head column): blockIdx (x, y), or with a.order
 * (not packed) grid (heads, key tiles by rank). */
__device__ __forceinline__ int2 ts_block(const TsArgs &a) {
    if (!a.order) return make_int2(blockIdx.x, blockIdx.y);
    /* the plateau: from the first tile whose queries reach row E-1 to the
     * first whose queries start after row 0 */
    const int n = gridDim.y, off = static_cast<int>(a.P0 - a.T0);
    const int t_full = max(0, (a.E - 1 - (TS_KEYS - 1) - (a.n_local - 1) + off + TS_KEYS - 1) / TS_KEYS);
    const int t_late = (off + TS_KEYS - 1) / TS_KEYS;
    const int c = min(n - 1, (min(t_full, n - 1) + min(t_late, n - 1)) / 2);
    return make_int2(ts_tile_of_rank(blockIdx.y, n, c), blockIdx.x);
}

/* blk = (key tile, head column) from ts_block */
__device__ __forceinline__ TsGeom ts_geom(const TsArgs &a, int2 blk) {
    TsGeom G;
    /* Packed (a.pack, E = 1): the query columns are the a.group heads of KV head
     * blk.y, each key's score for each head is one element of S: no sum. */
    G.packed = a.pack != 0;
    const int tile = blk.x, hy = blk.y;
    const int64_t s0 = static_cast<int64_t>(tile) * TS_KEYS;
    G.h = G.packed ? hy * a.group : hy;
    G.hk = G.packed ? hy : G.h / a.group;
    G.n_cols = G.packed ? a.group : a.E; /* query columns (rows of qloc from h on) */
    const int64_t dense_lim = static_cast<int64_t>(a.n_init) + a.n_local;
    /* query rows that see a key of this tile as LOCAL */
    int64_t r_lo = a.T0 + s0 - a.P0;
    if (r_lo < 0) r_lo = 0;
    int64_t r_hi = a.T0 + s0 + TS_KEYS - 1 + a.n_local - 1 - a.P0;
    const int64_t r_dense = dense_lim - 1 - a.P0;
    if (r_dense > r_hi) r_hi = r_dense;
    if (r_hi > a.E - 1) r_hi = a.E - 1;
    G.off = static_cast<int>(a.P0 - a.T0); /* query row r sits at segment index off + r */
    G.s0 = static_cast<int>(s0);
    /* rows r < r_dense_end are dense (ordinary causal attention) */
    G.r_dense_end = static_cast<int>(max(static_cast<int64_t>(-1), min(static_cast<int64_t>(a.E), dense_lim - a.P0)));
    G.qa = static_cast<int>(r_lo / TS_Q);
    G.qb = r_lo <= r_hi ? static_cast<int>(r_hi / TS_Q) : G.qa - 1;
    return G;
}

/* Packed tile (one query position, columns = the a.group heads of KV head
 * G.hk): each visible probability is one head's score of one key, written
 * straight into the ring. */
__device__ __forceinline__ void ts_packed(const TsArgs &a, const TsGeom &G, const float (&S)[8][4], const float *ls) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    const int pr = G.off;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) /* group <= 16 columns */
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int col = nt * 8 + tq * 2 + (e & 1);
            const int s = G.s0 + warp * 16 + g + 8 * (e >> 1);
            if (col >= a.group || s >= a.L) continue;
            const bool vis = s <= pr && (pr - s < a.n_local || 0 < G.r_dense_end);
            const int64_t pos = a.T0 + s;
            float *slot = a.scores + static_cast<int64_t>(G.h + col) * a.ring + (pos & (a.ring - 1));
            *slot = (pos >= a.P0 ? 0.0f : *slot) + (vis ? fast_exp2(fmaf(S[nt][e], a.sl2, -ls[col])) : 0.0f);
        }
}

/* The query rows [lo, lo + n) that see each of the thread's two keys as
 * LOCAL: row r sees key s iff s < L, r < E, s <= off + r (causal) and
 * (off + r - s < n_local, or r < r_dense_end: dense rows). */
struct TsRows {
    int lo[2], n[2];
};

__device__ __forceinline__ TsRows ts_rows(const TsArgs &a, const TsGeom &G) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
    TsRows R;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int s = G.s0 + warp * 16 + g + 8 * i;
        const int lo = max(0, s - G.off);
        const int hi = min(a.E, max(s - G.off + a.n_local, G.r_dense_end));
        R.lo[i] = lo;
        R.n[i] = s < a.L ? max(0, hi - lo) : 0;
    }
    return R;
}

/* Tile S of keys x queries in the m16n8 accumulator layout (this warp's 16
 * keys, query columns rq0 .. rq0+63), ls = the columns' lse: adds each visible
 * probability into the thread's two keys (acc); R from ts_rows.  Kept apart
 * from ts_packed: one function with both (an early return) cost ptxas ~45
 * more registers. */
__device__ __forceinline__ void ts_accum(const TsArgs &a, const TsGeom &G, const TsRows &R, const float (&S)[8][4],
                                         const float *ls, int rq0, float (&acc)[2]) {
    const int tq = threadIdx.x & 3;
    const bool full = rq0 + TS_Q - 1 < a.E && G.s0 + TS_KEYS - 1 < a.L && G.s0 + TS_KEYS - 1 <= G.off + rq0 &&
                      (G.off + rq0 + TS_Q - 1 - G.s0 < a.n_local || rq0 + TS_Q - 1 < G.r_dense_end);
    if (full) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                acc[e >> 1] += fast_exp2(fmaf(S[nt][e], a.sl2, -ls[nt * 8 + tq * 2 + (e & 1)]));
    } else {
        /* column c is visible to key i iff c - (lo_i - rq0) in [0, n_i) */
        const int c0[2] = {R.lo[0] - rq0 - tq * 2, R.lo[1] - rq0 - tq * 2};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = e >> 1, cc = nt * 8 + (e & 1); /* column - tq * 2 */
                const float p = fast_exp2(fmaf(S[nt][e], a.sl2, -ls[nt * 8 + tq * 2 + (e & 1)]));
                acc[i] += static_cast<unsigned>(cc - c0[i]) < static_cast<unsigned>(R.n[i]) ? p : 0.0f;
            }
    }
}

/* The row sums of the thread's two keys (ts_accum) into the ring of scores:
 * the first execution block that sees a position starts its slot at 0. */
__device__ __forceinline__ void ts_store(const TsArgs &a, const TsGeom &G, float (&acc)[2]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], 1);
        acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], 2);
    }
    if (tq == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int s = G.s0 + warp * 16 + g + 8 * i;
            if (s >= a.L) continue;
            const int64_t pos = a.T0 + s;
            float *slot = a.scores + static_cast<int64_t>(G.h) * a.ring + (pos & (a.ring - 1));
            *slot = (pos >= a.P0 ? 0.0f : *slot) + acc[i];
        }
    }
}

/* The CTA's 64 keys of the recent segment (rotated, its KV head) into shared
 * memory, zero past L: columns c .. c+7 of key row kr go to dst(kr, c). */
template <typename T, int D, typename Dst>
__device__ __forceinline__ void ts_load_keys(const TsArgs &a, const TsGeom &G, Dst dst) {
    constexpr int CH = D / 8;
    const T *krot = static_cast<const T *>(a.krot) + static_cast<int64_t>(G.hk) * a.L * D;
    for (int c = threadIdx.x; c < TS_KEYS * CH; c += TS_THREADS) {
        const int kr = c / CH, ch = c % CH;
        const bool v = G.s0 + kr < a.L;
        cp_async16(dst(kr, ch * 8), krot + (v ? static_cast<int64_t>(G.s0 + kr) * D + ch * 8 : 0), v);
    }
}

/* One CTA per (64 keys of the recent segment, query head).  S^T = K Q^T with
 * the keys as MMA rows, so the sum over queries is a row sum.  The query
 * tiles are visited in order: the result does not depend on scheduling. */
template <typename T, int D>
__device__ __forceinline__ void tscore_body(const TsArgs &a, int2 blk) {
    constexpr int LD = D + 8, CH = D / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *Ks = reinterpret_cast<T *>(smem_raw);
    T *Qs = Ks + TS_KEYS * LD; /* [2][TS_Q][LD] */
    float *Ls = reinterpret_cast<float *>(Qs + 2 * TS_Q * LD); /* [2][TS_Q] */

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const TsGeom G = ts_geom(a, blk);
    const TsRows R = ts_rows(a, G);
    const T *qloc = static_cast<const T *>(a.qloc) + static_cast<int64_t>(G.h) * a.E * D;
    const float *lse = a.lse + static_cast<int64_t>(G.h) * a.E;
    ts_load_keys<T, D>(a, G, [&](int kr, int c) { return Ks + kr * LD + c; });
    auto load_q = [&](int qt, int stage) {
        T *qs = Qs + stage * TS_Q * LD;
        for (int c = tid; c < TS_Q * CH; c += TS_THREADS) {
            const int qr = c / CH, ch = c % CH;
            const int64_t r = static_cast<int64_t>(qt) * TS_Q + qr;
            const bool v = r < G.n_cols;
            cp_async16(qs + qr * LD + ch * 8, qloc + (v ? r * D + ch * 8 : 0), v);
        }
        if (tid < TS_Q) {
            const int64_t r = static_cast<int64_t>(qt) * TS_Q + tid;
            Ls[stage * TS_Q + tid] = r < G.n_cols ? lse[r] : 0.0f;
        }
    };

    if (G.qa <= G.qb) load_q(G.qa, 0);
    cp_async_commit();

    float acc[2] = {0.0f, 0.0f};
    uint32_t ka[D / 16][4];
    bool have_k = false;
    for (int qt = G.qa; qt <= G.qb; ++qt) {
        const int st = (qt - G.qa) & 1;
        if (qt + 1 <= G.qb) {
            load_q(qt + 1, st ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (!have_k) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                ldsm_x4(ka[kk][0], ka[kk][1], ka[kk][2], ka[kk][3],
                        Ks + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + kk * 16 +
                            (lane >> 4) * 8);
            have_k = true;
        }
        const T *qs = Qs + st * TS_Q * LD;
        float S[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) S[nt][0] = S[nt][1] = S[nt][2] = S[nt][3] = 0.0f;
#pragma unroll
        for (int kk2 = 0; kk2 < D / 32; ++kk2)
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                uint32_t b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, qs + (nt * 8 + (lane & 7)) * LD + kk2 * 32 + (lane >> 3) * 8);
                mma16816<T>(S[nt], ka[2 * kk2], b0, b1);
                mma16816<T>(S[nt], ka[2 * kk2 + 1], b2, b3);
            }
        if (G.packed) {
            ts_packed(a, G, S, Ls + st * TS_Q);
            break; /* a single query tile */
        }
        ts_accum(a, G, R, S, Ls + st * TS_Q, qt * TS_Q, acc);
        __syncthreads();
    }
    cp_async_wait<0>();
    if (!G.packed) ts_store(a, G, acc);
}

/* The same on wgmma (sm_90a, head dim 128, not packed): one warpgroup, S^T =
 * K Q^T as m64n64k16 from the swizzled K tile and a Q tile.  QST = 2 Q
 * stages: the next query tile loads while this one multiplies and is summed
 * (50 KB, 4 CTAs per SM); QST = 1: it loads once this one's product is done,
 * during the sums (34 KB, 6 CTAs per SM: one wave at 128K).  Same tiles,
 * same order, same accumulator layout as tscore_body. */
template <typename T, int D, int QST>
__device__ __forceinline__ void tscore_wg_body(const TsArgs &a, int2 blk) {
    static_assert(D == 128 && TS_KEYS == 64 && TS_Q == 64 && TS_THREADS == 128, "wgmma token scores: 64 x 64 x 128");
    static_assert(QST == 1 || QST == 2, "one or two Q stages");
    constexpr int CH = D / 8, TILE_B = 64 * D * 2;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char *smem = smem_aligned1024(smem_raw);
    unsigned char *Kb = smem, *Qb = smem + TILE_B;                  /* Q: QST stages */
    float *Ls = reinterpret_cast<float *>(smem + (1 + QST) * TILE_B); /* [2][TS_Q] */

    const int tid = threadIdx.x;
    const TsGeom G = ts_geom(a, blk);
    const T *qloc = static_cast<const T *>(a.qloc) + static_cast<int64_t>(G.h) * a.E * D;
    const float *lse = a.lse + static_cast<int64_t>(G.h) * a.E;
    ts_load_keys<T, D>(a, G, [&](int kr, int c) { return Kb + qllm_swz_off(kr, c); });
    /* This thread's chunks of a query tile: column chunk tid % CH of rows
     * tid / CH + 8 i; in the swizzled tile row r + 8 keeps its chunk
     * permutation, so the chunk of row tid / CH + 8 i sits 1024 i bytes on. */
    constexpr int QROWS = TS_THREADS / CH; /* rows per pass */
    const int qr0 = tid / CH, qch = tid % CH;
    const uint32_t qsw = qllm_swz_off(qr0, qch * 8);
    static_assert(QROWS == 8, "row step of 8 keeps the swizzle");
    /* query tile qt into Q stage qs and lse stage ls (both of its parity; one Q stage if QST = 1) */
    auto load_q = [&](int qt) {
        const int st = (qt - G.qa) & 1;
        unsigned char *qs = Qb + (QST == 2 ? st : 0) * TILE_B + qsw;
        const int r0 = qt * TS_Q + qr0;
        const T *src = qloc + static_cast<int64_t>(r0) * D + qch * 8;
#pragma unroll
        for (int i = 0; i < TS_Q / QROWS; ++i) {
            const bool v = r0 + QROWS * i < G.n_cols;
            cp_async16(qs + i * QROWS * 128, v ? src + i * QROWS * D : qloc, v);
        }
        if (tid < TS_Q) {
            const int64_t r = static_cast<int64_t>(qt) * TS_Q + tid;
            Ls[st * TS_Q + tid] = r < G.n_cols ? lse[r] : 0.0f;
        }
    };
    if (G.qa <= G.qb) load_q(G.qa);
    cp_async_commit();
    const uint64_t dk = qllm_sdesc(Kb, QLLM_WG_KMAJ_LBO, QLLM_WG_KMAJ_SBO);
    const uint64_t dq0 = qllm_sdesc(Qb, QLLM_WG_KMAJ_LBO, QLLM_WG_KMAJ_SBO);
    const TsRows R = ts_rows(a, G);

    float acc[2] = {0.0f, 0.0f};
    float S[8][4];
    float(&Sf)[32] = *reinterpret_cast<float(*)[32]>(&S[0][0]);
    for (int qt = G.qa; qt <= G.qb; ++qt) {
        const int st = (qt - G.qa) & 1;
        cp_async_wait<0>(); /* K and Q of qt */
        fence_async_smem();
        __syncthreads(); /* every warp is past the sums of qt - 1 (the other lse stage) */
        const uint64_t dq = qllm_sdesc_add(dq0, (QST == 2 ? st : 0) * TILE_B);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int o = (kk / 4) * 8192 + (kk % 4) * 32; /* 16 columns = 32 bytes; blocks of 64 */
            wgmma_m64n64k16_ss<T>(Sf, qllm_sdesc_add(dk, o), qllm_sdesc_add(dq, o), kk > 0);
        }
        wg_commit();
        if constexpr (QST == 2) {
            if (qt + 1 <= G.qb) load_q(qt + 1);
            cp_async_commit();
        }
        wg_wait<0>();
        wg_fence_operand(Sf);
        if constexpr (QST == 1) {
            __syncthreads(); /* every warp's product has read the Q stage */
            if (qt + 1 <= G.qb) load_q(qt + 1);
            cp_async_commit();
        }
        ts_accum(a, G, R, S, Ls + st * TS_Q, qt * TS_Q, acc);
    }
    cp_async_wait<0>();
    ts_store(a, G, acc);
}

template <typename T, int D>
__global__ void __launch_bounds__(TS_THREADS) tscore_kernel(const TsArgs a) {
    tscore_body<T, D>(a, ts_block(a));
}

template <typename T, int D, int QST>
__global__ void __launch_bounds__(TS_THREADS) tscore_wg_kernel(const TsArgs a) {
    tscore_wg_body<T, D, QST>(a, ts_block(a));
}

/* Decode step: sizes from the device row; grid sized for the longest
 * segment, CTAs past L exit. */
template <typename T, int D>
__global__ void __launch_bounds__(TS_THREADS) tscore_dyn_kernel(const TsArgs a0, const int64_t *dyn) {
    TsArgs a = a0;
    a.P0 = dyn[QLLM_DYN_P0];
    a.T0 = dyn[QLLM_DYN_T0];
    a.L = static_cast<int>(dyn[QLLM_DYN_L]);
    if (static_cast<int64_t>(blockIdx.x) * TS_KEYS >= a.L) return;
    tscore_body<T, D>(a, make_int2(blockIdx.x, blockIdx.y)); /* a.order = 0 */
}

/* Decode step: the new token's K/V into the store at position P0. */
template <typename T>
__global__ void store_kv_kernel(const T *__restrict__ k, int64_t k_hs, const T *__restrict__ v,
                                int64_t v_hs, T *__restrict__ kst, T *__restrict__ vst, int64_t cap,
                                int D, int n_init, int64_t wmask, const int64_t *__restrict__ dyn) {
    const int h = blockIdx.x;
    const int64_t o = (static_cast<int64_t>(h) * cap + kv_row(dyn[QLLM_DYN_P0], n_init, wmask)) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        kst[o + d] = k[h * k_hs + d];
        vst[o + d] = v[h * v_hs + d];
    }
}

struct DynVals {
    int64_t v[QLLM_DYN_FIELDS];
};

__global__ void dyn_set_kernel(DynVals vals, int64_t *dyn) {
    if (threadIdx.x < QLLM_DYN_FIELDS) dyn[threadIdx.x] = vals.v[threadIdx.x];
}

/* ------------------------------------------------------------ cut blocks */

/* Representative of block b, head h: the mean of the un-rotated keys of the
 * block's tokens tok(0..k-1), summed in that order; emit(d, value) per dim. */
template <typename T, typename Tok, typename Emit>
__device__ __forceinline__ void repr_of_head(const qllm_gpu_layer &ly, int64_t b, int h, int k, Tok tok, Emit emit) {
    const int D = ly.head_dim;
    const int64_t pos0 = ly.n_init + b * ly.block_size;
    const T *keys = static_cast<const T *>(ly.k_store) + static_cast<int64_t>(h / (ly.hq / ly.hkv)) * ly.cap * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f; /* rows added in order r = 0, 1, ...; 4 loads in flight */
        batched<4>(0, k, 1, [&](int r) { return Cvt<T>::to_f(keys[kv_row(pos0 + tok(r), ly.n_init, ly.wmask) * D + d]); },
                   [&](int, float v) { acc += v; });
        emit(d, acc / static_cast<float>(k));
    }
}

/* Representatives of blocks b0 + blockIdx.x (dyn != NULL: b0 =
 * dyn[QLLM_DYN_CUTB], a decode step's cut), one head per blockIdx.y. */
template <typename T>
__global__ void cut_kernel(qllm_gpu_layer ly, int64_t b0, int k, const int64_t *__restrict__ dyn) {
    extern __shared__ int64_t sel[];
    __shared__ float sh_s[32];
    __shared__ int64_t sh_i[32];
    const int64_t b = (dyn != nullptr ? dyn[QLLM_DYN_CUTB] : b0) + blockIdx.x;
    if (b < 0 || b >= ly.reprs_cap) return; /* a device row the host checked: never, but no stray write */
    const int h = blockIdx.y, D = ly.head_dim, bs = ly.block_size;
    const int64_t pos0 = ly.n_init + b * bs;
    const float *sc = ly.scores + static_cast<int64_t>(h) * ly.ring;
    block_select_best([&](int64_t t) { return sc[(pos0 + t) & (ly.ring - 1)]; }, bs, k,
                      [&](int64_t r, int64_t i) { sel[r] = i; }, sh_s, sh_i);
    __syncthreads();
    float *out = ly.reprs + (b * ly.hq + h) * D;
    repr_of_head<T>(ly, b, h, k, [&](int r) { return sel[r]; }, [&](int d, float v) { out[d] = v; });
}

/* ------------------------------------------------------------------ seam */

/* The work between the token scores of execution block i and the attention
 * of block i+1, in one launch (qllm_cuda_exec_seam), instead of cut_kernel,
 * bscore_pairs_kernel, prep_kernel and select_kernel one after another:
 *   cut CTAs     (block, head) of the blocks cut by block i: the head's part
 *                of the representative (as cut_kernel: top repr_k token
 *                scores, ties to the lower token, keys summed in that order),
 *                then its partial dots with qcomb[i', head] for the later
 *                execution blocks i' into pdot;
 *   the last cut CTA to finish (a counter) sums the partials over heads in
 *                head order into bscore[i', b] and, when block i+1 ranks the
 *                blocks just cut, runs block i+1's top-k (as select_kernel);
 *   select CTA   block i+1's top-k on its own when it ranks no block cut now;
 *                when it does and k <= SEL_KFAST (sel_merge), the best k of
 *                the blocks not cut now, into sel_part; it then arrives like
 *                a cut CTA, and the last to arrive merges that list with the
 *                cut blocks' scores (seam_finish_merge) instead of ranking
 *                all n blocks after the cut;
 *   prep CTAs    block i+1's rotations (prep_body), independent of the rest.
 * The counter is zero on entry and left zero.  Nothing waits for another CTA:
 * the last one to arrive does the dependent work.  Shared memory: see
 * seam_cut_floats. */
struct SeamArgs {
    qllm_gpu_exec ex; /* prep of the next execution block: prep_ctas > 0 */
    const void *q;
    int64_t q_hs, q_ts;
    void *qfix, *qloc, *krot;
    int prep_ctas;
    int64_t cut_b0; /* cut: cut_n > 0 */
    int cut_n, repr_k;
    const float *qcomb; /* later execution blocks i0 .. i1-1 */
    int i0, i1;
    float *bscore;
    int64_t ld;
    float *pdot; /* [cut_n, i1 - i0, hq] */
    int32_t *cnt;
    uint32_t *sel_part; /* sel_merge: keys [SEL_KFAST], then indices [SEL_KFAST] */
    int qc_smem, pd_smem; /* qcomb rows / partials staged in shared memory */
    const float *sel_scores; /* select: sel_k > 0 */
    int sel_n, sel_k;
    int32_t *sel_ids;
    int sel_after_cut; /* the selection ranks blocks this launch cuts */
    int sel_merge;     /* ... and merges a list of the others made beside the cut */
    int sel_cta;       /* the grid has a select CTA after the cut CTAs */
    int32_t *sig;      /* early start of the next attention (qllm_gpu_early), else NULL: each prep CTA
                          counts sig[0] when done, the selection sig[1] once its ids are written */
};

constexpr int SEAM_THREADS = SEL_THREADS;

/* Phase stamps of the seam's CTAs for benchmarks/micro/seam_trace.cu, which
 * defines QLLM_SEAM_TRACE and points g_seam_trace at [grid][SEAM_PHASES]
 * %globaltimer values (thread 0 writes; nanoseconds).  Compiled out otherwise. */
enum {
    SEAM_T_START,  /* CTA entry */
    SEAM_T_TOPK,   /* cut: token top-k and qcomb prefetch done */
    SEAM_T_REPR,   /* cut: representative written */
    SEAM_T_DOTS,   /* cut: partial dots written */
    SEAM_T_LAST,   /* the last cut CTA: arrival counted */
    SEAM_T_STAGED, /* last: partials and scores staged */
    SEAM_T_SUMS,   /* last: block scores summed */
    SEAM_T_END,    /* CTA exit */
    SEAM_PHASES
};
#ifdef QLLM_SEAM_TRACE
__device__ unsigned long long *g_seam_trace;
__device__ __forceinline__ void seam_stamp(int phase) {
    if (threadIdx.x == 0 && g_seam_trace != nullptr) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        g_seam_trace[static_cast<int64_t>(blockIdx.x) * SEAM_PHASES + phase] = t;
    }
}
#else
__device__ __forceinline__ void seam_stamp(int) {}
#endif
constexpr int SEAM_WARPS = SEAM_THREADS / 32;

/* Shared-memory floats of a cut CTA: top-k keys and ids (2k), the block's
 * token scores (bs), the representative (D), qcomb rows (ni * D, staged); of
 * the last cut CTA: the selection's scores (n), the partials (cut_n*ni*hq,
 * staged), or with sel_merge the cut blocks' scores (cut_n).  The launcher
 * stages what fits under SEL_DYN_SMEM. */
__host__ __device__ inline int64_t seam_cut_floats(int k, int bs, int D, int ni, bool qc) {
    return 2 * static_cast<int64_t>(k) + bs + D + (qc ? static_cast<int64_t>(ni) * D : 0);
}
__host__ __device__ inline int64_t seam_last_floats(int64_t sel_n, int cut_n, int ni, int hq, bool pd) {
    return sel_n + (pd ? static_cast<int64_t>(cut_n) * ni * hq : 0);
}

/* Whether this CTA is the last of `total` to arrive at *counter (after its
 * writes); the last one resets the counter.  All threads call it. */
#ifndef QLLM_SEAM_ACQREL /* 1: one acquire-release atomic; 0: fence + atomic + fence */
#define QLLM_SEAM_ACQREL 1
#endif
__device__ __forceinline__ bool seam_arrive_last(int32_t *counter, int total) {
    __shared__ int s_last;
    __syncthreads();
    if (threadIdx.x == 0) {
#if QLLM_SEAM_ACQREL
        /* release: the CTA's writes (ordered before by the barrier); acquire:
         * the others' writes for the last one, whose threads read after the
         * next barrier */
        int prev;
        asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;\n" : "=r"(prev) : "l"(counter) : "memory");
#else
        __threadfence();
        const int prev = atomicAdd(counter, 1);
#endif
        s_last = prev == total - 1;
        if (s_last) *counter = 0;
    }
    __syncthreads();
    if (!s_last) return false;
#if !QLLM_SEAM_ACQREL
    __threadfence();
#endif
    return true;
}

/* The last cut CTA: bscore of every cut block for rows i0 .. i1-1 (partials
 * of this launch read through L2), then block i+1's top-k when it ranks them:
 * its scores staged in sel_s, the cut blocks' from the sums just made. */
__device__ __forceinline__ void seam_finish(const qllm_gpu_layer &ly, const SeamArgs &a, float *smem) {
    const int hq = ly.hq, ni = a.i1 - a.i0, np = a.cut_n * ni;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t c0 = a.cut_b0, c1 = a.cut_b0 + a.cut_n;
    float *sel_s = smem;
    float *pd = smem + (a.sel_after_cut ? a.sel_n : 0);
    /* one pass stages the partials [0, n_pd) and the other blocks' scores after them */
    const int n_pd = a.pd_smem ? np * hq : 0;
    const int n_sel = a.sel_after_cut ? a.sel_n : 0;
    batched<8>(
        threadIdx.x, n_pd + n_sel, SEAM_THREADS,
        [&](int e) {
            if (e < n_pd) return __ldcg(a.pdot + e);
            const int i = e - n_pd;
            return i < c0 || i >= c1 ? __ldcg(a.sel_scores + i) : 0.0f;
        },
        [&](int e, float v) {
            if (e < n_pd)
                pd[e] = v;
            else if (e - n_pd < c0 || e - n_pd >= c1)
                sel_s[e - n_pd] = v;
        });
    __syncthreads();
    seam_stamp(SEAM_T_STAGED);
    auto sum_pairs = [&](auto load) {
        for (int p = warp; p < np; p += SEAM_WARPS) {
            float acc = 0.0f;
            for (int hh = lane; hh < hq; hh += 32) acc += load(static_cast<int64_t>(p) * hq + hh);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
            if (lane == 0) {
                const int bl = p / ni, j = p % ni;
                a.bscore[static_cast<int64_t>(a.i0 + j) * a.ld + c0 + bl] = acc;
                if (j == 0 && a.sel_after_cut && c0 + bl < a.sel_n) sel_s[c0 + bl] = acc;
            }
        }
    };
    if (a.pd_smem) /* two call sites: each load knows its memory space */
        sum_pairs([&](int64_t e) { return pd[e]; });
    else
        sum_pairs([&](int64_t e) { return __ldcg(a.pdot + e); });
    seam_stamp(SEAM_T_SUMS);
    if (!a.sel_after_cut) return;
    __syncthreads();
    topk_ascending(sel_s, a.sel_n, a.sel_k, a.sel_ids);
    if (a.sig != nullptr) cta_signal(a.sig + 1);
}

/* Sums over heads of the partials of pairs q = first, first + step, .. < nq
 * (pair q's hq partials at pd + off(q)): per lane the heads lane, lane + 32,
 * .. added in order, then a butterfly over the lanes, as seam_finish;
 * emit(q, sum) on lane 0.  One warp; U pairs' loads in flight per lane. */
template <int U, typename Off, typename Emit>
__device__ __forceinline__ void warp_pair_sums(const float *pd, int hq, int first, int nq, int step, Off off,
                                               Emit emit) {
    const int lane = threadIdx.x & 31;
    for (int q0 = first; q0 < nq; q0 += U * step) {
        float acc[U];
#pragma unroll
        for (int u = 0; u < U; ++u) acc[u] = 0.0f;
        for (int hh = lane; hh < hq; hh += 32) {
            float v[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int q = q0 + u * step;
                v[u] = q < nq ? __ldcg(pd + off(q) + hh) : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < U; ++u) acc[u] += v[u];
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[u] += __shfl_xor_sync(0xffffffffu, acc[u], o);
        }
        if (lane == 0) {
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (q0 + u * step < nq) emit(q0 + u * step, acc[u]);
        }
    }
}

/* The last CTA to arrive with sel_merge: block i+1's scores of the cut blocks
 * (row i0) first; then warp 0 merges them with the select CTA's list of the
 * other blocks' best k into block i+1's ids, while the other warps sum the
 * later rows' scores (i0+1 .. i1-1), which only later seams read. */
__device__ __forceinline__ void seam_finish_merge(const qllm_gpu_layer &ly, const SeamArgs &a, float *smem) {
    constexpr int K = SEL_KFAST;
    const int hq = ly.hq, ni = a.i1 - a.i0, cut_n = a.cut_n, k = a.sel_k;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t c0 = a.cut_b0;
    float *news = smem; /* [cut_n] */
    uint32_t pk = 0u, pi = 0xffffffffu; /* the select CTA's r-th best, lane r of warp 0 */
    if (warp == 0 && lane < k) {
        pk = __ldcg(a.sel_part + lane);
        pi = __ldcg(a.sel_part + K + lane);
    }
    warp_pair_sums<1>(
        a.pdot, hq, warp, cut_n, SEAM_WARPS, [&](int bl) { return static_cast<int64_t>(bl) * ni * hq; },
        [&](int bl, float v) {
            a.bscore[static_cast<int64_t>(a.i0) * a.ld + c0 + bl] = v;
            news[bl] = v;
        });
    __syncthreads();
    seam_stamp(SEAM_T_STAGED);
    if (warp == 0) {
        qllm_topk::List<K> l;
        l.clear();
        l.insert(pk, pi);
        for (int j = lane; j < cut_n; j += 32)
            if (c0 + j < a.sel_n) l.insert(score_key(news[j]), static_cast<uint32_t>(c0 + j));
        uint32_t wk, wi;
        warp_rounds(l, k, wk, wi);
        write_ascending(wi, k, a.sel_ids);
        if (a.sig != nullptr) warp_signal(a.sig + 1);
        seam_stamp(SEAM_T_SUMS);
    } else if (ni > 1) {
        const int nr = cut_n * (ni - 1); /* pair q: block q / (ni-1), row i0 + 1 + q % (ni-1) */
        warp_pair_sums<8>(
            a.pdot, hq, warp - 1, nr, SEAM_WARPS - 1,
            [&](int q) { return (static_cast<int64_t>(q / (ni - 1)) * ni + 1 + q % (ni - 1)) * hq; },
            [&](int q, float v) {
                a.bscore[static_cast<int64_t>(a.i0 + 1 + q % (ni - 1)) * a.ld + c0 + q / (ni - 1)] = v;
            });
    }
}

/* The select CTA with sel_merge: the best k of block i+1's scores of the
 * blocks not cut now (their scores exist before the launch) into sel_part,
 * then the arrival of the cut CTAs. */
__device__ __forceinline__ void seam_pre(const qllm_gpu_layer &ly, const SeamArgs &a, float *smem) {
    const int64_t c0 = a.cut_b0, c1 = a.cut_b0 + a.cut_n;
    uint32_t wk, wi;
    block_best(
        [&](qllm_topk::List<SEL_KFAST> &l) {
            batched<8>(threadIdx.x, a.sel_n, SEAM_THREADS,
                       [&](int i) { return i < c0 || i >= c1 ? a.sel_scores[i] : 0.0f; },
                       [&](int i, float v) {
                           if (i < c0 || i >= c1) l.insert(score_key(v), static_cast<uint32_t>(i));
                       });
        },
        a.sel_k, wk, wi);
    if (threadIdx.x < static_cast<unsigned>(a.sel_k)) { /* lanes of warp 0 */
        a.sel_part[threadIdx.x] = wk;
        a.sel_part[SEL_KFAST + threadIdx.x] = wi;
    }
    if (seam_arrive_last(a.cnt, a.cut_n * ly.hq + 1)) {
        seam_stamp(SEAM_T_LAST);
        seam_finish_merge(ly, a, smem);
    }
}

template <typename T>
__device__ __forceinline__ void seam_cut(const qllm_gpu_layer &ly, const SeamArgs &a, int cta, float *smem) {
    const int hq = ly.hq, D = ly.head_dim, bs = ly.block_size, k = a.repr_k, ni = a.i1 - a.i0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bl = cta / hq, h = cta % hq;
    const int64_t b = a.cut_b0 + bl;
    const int64_t pos0 = ly.n_init + b * bs;
    uint32_t *sk = reinterpret_cast<uint32_t *>(smem), *si = sk + k;
    float *scs = smem + 2 * k, *rep = scs + bs, *qs = rep + D;
    if (warp == 0) { /* the block's top-k tokens: one warp, no block barrier per round */
        const float *sc = ly.scores + static_cast<int64_t>(h) * ly.ring;
        batched<4>(lane, bs, 32, [&](int t) { return sc[(pos0 + t) & (ly.ring - 1)]; },
                   [&](int t, float v) { scs[t] = v; });
        __syncwarp();
        const int cnt = lane < bs ? (bs - lane + 31) / 32 : 0;
        warp_topk([&](int j, uint32_t &key, uint32_t &idx) {
                      const int t = lane + 32 * j;
                      key = score_key(scs[t]);
                      idx = static_cast<uint32_t>(t);
                  },
                  cnt, k, sk, si, nullptr);
    } else if (a.qc_smem) { /* meanwhile the other warps fetch the later blocks' qcomb rows */
        batched<8>(
            threadIdx.x - 32, ni * D, SEAM_THREADS - 32,
            [&](int e) { return a.qcomb[(static_cast<int64_t>(a.i0 + e / D) * hq + h) * D + e % D]; },
            [&](int e, float v) { qs[e] = v; });
    }
    __syncthreads();
    seam_stamp(SEAM_T_TOPK);
    float *out = ly.reprs + (b * hq + h) * D;
    repr_of_head<T>(ly, b, h, k, [&](int r) { return static_cast<int64_t>(si[r]); }, [&](int d, float v) {
        out[d] = v;
        rep[d] = v;
    });
    if (ni <= 0 && !a.sel_after_cut) return; /* uniform */
    __syncthreads();
    seam_stamp(SEAM_T_REPR);
    auto dots = [&](auto row) {
        for (int j = warp; j < ni; j += SEAM_WARPS) {
            float acc = 0.0f;
            for (int d = lane; d < D; d += 32) acc += rep[d] * row(j, d);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
            if (lane == 0) a.pdot[(static_cast<int64_t>(bl) * ni + j) * hq + h] = acc;
        }
    };
    if (a.qc_smem)
        dots([&](int j, int d) { return qs[j * D + d]; });
    else
        dots([&](int j, int d) { return a.qcomb[(static_cast<int64_t>(a.i0 + j) * hq + h) * D + d]; });
    seam_stamp(SEAM_T_DOTS);
    if (seam_arrive_last(a.cnt, a.cut_n * hq + (a.sel_merge ? 1 : 0))) {
        seam_stamp(SEAM_T_LAST);
        if (a.sel_merge)
            seam_finish_merge(ly, a, smem);
        else
            seam_finish(ly, a, smem);
    }
}

/* Grid: [cut_n * hq cut CTAs | 1 select CTA (sel_cta) | prep_ctas]. */
template <typename T, bool VEC>
__global__ void __launch_bounds__(SEAM_THREADS) seam_kernel(qllm_gpu_layer ly, SeamArgs a) {
    extern __shared__ __align__(16) float seam_smem[];
    int cta = static_cast<int>(blockIdx.x);
    const int n_cut = a.cut_n * ly.hq;
    seam_stamp(SEAM_T_START);
    pdl_launch_dependents(); /* an early-started attention may launch once every CTA is here */
    if (cta < n_cut) {
        seam_cut<T>(ly, a, cta, seam_smem);
    } else if (cta -= n_cut; a.sel_cta && cta == 0) {
        if (a.sel_merge) {
            seam_pre(ly, a, seam_smem);
        } else {
            topk_staged(a.sel_scores, a.sel_n, a.sel_k, a.sel_ids, seam_smem); /* ranks no block cut now */
            if (a.sig != nullptr) cta_signal(a.sig + 1);
        }
    } else {
        if (a.sel_cta) cta -= 1;
        prep_body<T, VEC>(ly, a.ex, static_cast<const T *>(a.q), a.q_hs, a.q_ts, static_cast<T *>(a.qfix),
                          static_cast<T *>(a.qloc), static_cast<T *>(a.krot), nullptr, cta, a.prep_ctas);
        if (a.sig != nullptr) cta_signal(a.sig);
    }
    seam_stamp(SEAM_T_END);
}

/* ------------------------------------------------------------ tiered blocks */

constexpr int TIER_THREADS = 256;

struct TierView {
    int32_t *miss, *blk_of, *stamp, *slot_of;
};

__device__ __forceinline__ TierView tier_view(const qllm_gpu_layer &ly) {
    TierView t;
    t.miss = ly.tier + QLLM_TIER_MISS;
    t.blk_of = t.miss + 2 * static_cast<int64_t>(ly.miss_cap);
    t.stamp = t.blk_of + ly.n_slots;
    t.slot_of = t.stamp + ly.n_slots;
    return t;
}

/* One CTA: tick the clock, stamp resident blocks, give each missing block the
 * least recently used slot not stamped now (free slots first: stamp -1; ties to
 * the lower slot), record (block, slot) in the miss list. */
__global__ void __launch_bounds__(TIER_THREADS) tier_alloc_kernel(qllm_gpu_layer ly, const int32_t *ids,
                                                                   int64_t b0, int n, const int64_t *dyn) {
    __shared__ int clk, nmiss;
    __shared__ unsigned long long red[TIER_THREADS / 32];
    const TierView tv = tier_view(ly);
    if (dyn != nullptr) n = static_cast<int>(dyn[QLLM_DYN_NRET]);
    if (threadIdx.x == 0) {
        clk = ly.tier[QLLM_TIER_CLOCK] + 1;
        ly.tier[QLLM_TIER_CLOCK] = clk;
        nmiss = 0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int64_t b = ids != nullptr ? ids[i] : b0 + i;
        const int s = tv.slot_of[b];
        if (s >= 0) tv.stamp[s] = clk;
    }
    __syncthreads();
    for (int i = 0; i < n; ++i) {
        const int64_t b = ids != nullptr ? ids[i] : b0 + i;
        if (tv.slot_of[b] >= 0) continue; /* uniform: every thread reads the same word */
        unsigned long long key = ~0ull;   /* (stamp + 1) << 32 | slot, smallest wins */
        for (int s = threadIdx.x; s < ly.n_slots; s += blockDim.x) {
            const int st = tv.stamp[s];
            if (st < clk) {
                const unsigned long long k2 =
                    (static_cast<unsigned long long>(static_cast<uint32_t>(st + 1)) << 32) | static_cast<uint32_t>(s);
                key = k2 < key ? k2 : key;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const unsigned long long other = __shfl_xor_sync(0xffffffffu, key, o);
            key = other < key ? other : key;
        }
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = key;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < TIER_THREADS / 32; ++w) key = red[w] < key ? red[w] : key;
            key = red[0] < key ? red[0] : key;
            if (key != ~0ull) {
                const int s = static_cast<int>(key & 0xffffffffu);
                const int old = tv.blk_of[s];
                if (old >= 0) tv.slot_of[old] = -1;
                tv.blk_of[s] = static_cast<int32_t>(b);
                tv.slot_of[b] = s;
                tv.stamp[s] = clk;
                if (nmiss < ly.miss_cap) {
                    tv.miss[2 * nmiss] = static_cast<int32_t>(b);
                    tv.miss[2 * nmiss + 1] = s;
                    ++nmiss;
                }
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        ly.tier[QLLM_TIER_NMISS] = nmiss;
        ly.tier[ids != nullptr ? QLLM_TIER_FETCHED : QLLM_TIER_PLACED] += nmiss;
    }
}

/* K/V of miss i (grid.y) into its cache slot, 16 bytes per thread step: from
 * the store ring when the block's rows still hold it, else from its pinned
 * host chunk (mapped host memory read over the bus). */
template <typename T>
__global__ void __launch_bounds__(256) tier_copy_kernel(qllm_gpu_layer ly, int64_t ring_lo, const int64_t *dyn) {
    const int i = blockIdx.y;
    if (i >= ly.tier[QLLM_TIER_NMISS]) return;
    const TierView tv = tier_view(ly);
    const int64_t b = tv.miss[2 * i], s = tv.miss[2 * i + 1];
    if (dyn != nullptr) ring_lo = dyn[QLLM_DYN_RLO];
    const int D = ly.head_dim, bs = ly.block_size, C = D / 8;
    const int64_t pos0 = ly.n_init + b * bs;
    const bool from_ring = pos0 >= ring_lo;
    const int64_t n16 = static_cast<int64_t>(ly.hkv) * bs * C;
    const int64_t cb = ly.chunk_blocks;
    const T *hk_base = from_ring ? nullptr : reinterpret_cast<const T *>(ly.host_k[b / cb]);
    const T *hv_base = from_ring ? nullptr : reinterpret_cast<const T *>(ly.host_v[b / cb]);
    const int64_t blk_elems = static_cast<int64_t>(ly.hkv) * bs * D;
    T *kc = static_cast<T *>(ly.k_cache) + s * blk_elems;
    T *vc = static_cast<T *>(ly.v_cache) + s * blk_elems;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < n16;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t r = c / C, ch = c % C; /* r = hk * bs + j */
        const int64_t hk = r / bs, j = r % bs;
        const T *ks, *vs;
        if (from_ring) {
            const int64_t o = (hk * ly.cap + kv_row(pos0 + j, ly.n_init, ly.wmask)) * D + ch * 8;
            ks = static_cast<const T *>(ly.k_store) + o;
            vs = static_cast<const T *>(ly.v_store) + o;
        } else {
            const int64_t o = (b % cb) * blk_elems + r * D + ch * 8;
            ks = hk_base + o;
            vs = hv_base + o;
        }
        *reinterpret_cast<uint4 *>(kc + r * D + ch * 8) = *reinterpret_cast<const uint4 *>(ks);
        *reinterpret_cast<uint4 *>(vc + r * D + ch * 8) = *reinterpret_cast<const uint4 *>(vs);
    }
}

/* ------------------------------------------------------------ launch utils */

/* Whether environment variable name is set and starts with c (the kernel
 * choices below read theirs once per process, into function-local statics). */
bool env_is(const char *name, char c) {
    const char *e = getenv(name);
    return e != nullptr && e[0] == c;
}

int grid_for(int64_t work, int threads) {
    int64_t b = (work + threads - 1) / threads;
    if (b < 1) b = 1;
    if (b > 132 * 16) b = 132 * 16;
    return static_cast<int>(b);
}

/* prep_kernel with 16-byte loads of the cos / sin rows when the tables allow
 * them (aligned bases, head dim a multiple of 8: every row and 8-dim group
 * then starts on 16 bytes), else scalar loads: the same values either way. */
bool prep_vec(const qllm_gpu_layer &ly) {
    return ((reinterpret_cast<uintptr_t>(ly.cos) | reinterpret_cast<uintptr_t>(ly.sin)) & 15u) == 0 &&
           ly.head_dim % 8 == 0;
}

/* Arguments of one execution block's rotations (exec_prep, exec_seam); *work:
 * the (row, 8-dim) items of prep_body. */
int check_prep(const qllm_gpu_layer *ly, const qllm_gpu_exec &ex, const void *q, int64_t q_hs, int64_t q_ts,
               const char *what, int64_t *work) {
    if (ex.E < 1 || ex.L < ex.E || ex.L > ly->rope_len)
        return set_error(QLLM_CUDA_ERR_ARG, "%s: E=%d L=%d rope_len=%lld", what, ex.E, ex.L,
                         (long long)ly->rope_len);
    if (q_hs % 8 != 0 || q_ts % 8 != 0 || (reinterpret_cast<uintptr_t>(q) & 15) != 0)
        return set_error(QLLM_CUDA_ERR_ARG, "%s: q rows must be 16-byte aligned (strides %lld, %lld)", what,
                         (long long)q_hs, (long long)q_ts);
    *work = (static_cast<int64_t>(ly->hq) * ex.E + static_cast<int64_t>(ly->hkv) * ex.L) * (ly->head_dim / 16);
    return QLLM_CUDA_OK;
}

template <typename T>
void launch_prep(const qllm_gpu_layer &ly, const qllm_gpu_exec &ex, const T *q, int64_t q_hs, int64_t q_ts,
                 T *qfix, T *qloc, T *krot, const int64_t *dyn, int grid, cudaStream_t stream) {
    if (prep_vec(ly))
        prep_kernel<T, true><<<grid, 256, 0, stream>>>(ly, ex, q, q_hs, q_ts, qfix, qloc, krot, dyn);
    else
        prep_kernel<T, false><<<grid, 256, 0, stream>>>(ly, ex, q, q_hs, q_ts, qfix, qloc, krot, dyn);
}

int check_layer(const qllm_gpu_layer *ly, const char *what) {
    if (ly->dtype != QLLM_DTYPE_F16 && ly->dtype != QLLM_DTYPE_BF16)
        return set_error(QLLM_CUDA_ERR_ARG, "%s: dtype must be f16 or bf16", what);
    if (ly->head_dim != 64 && ly->head_dim != 128)
        return set_error(QLLM_CUDA_ERR_ARG, "%s: head_dim %d not in {64, 128}", what, ly->head_dim);
    if (ly->hkv < 1 || ly->hq % ly->hkv != 0)
        return set_error(QLLM_CUDA_ERR_ARG, "%s: bad head counts", what);
    return QLLM_CUDA_OK;
}

template <typename Kern>
int ensure_smem(Kern k, size_t bytes, const char *what) {
    if (bytes <= 48 * 1024) return QLLM_CUDA_OK;
    const cudaError_t e =
        cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (e != cudaSuccess)
        return set_error(QLLM_CUDA_ERR_LAUNCH, "%s: cannot reserve %zu bytes of shared memory: %s",
                         what, bytes, cudaGetErrorString(e));
    return QLLM_CUDA_OK;
}

/* Shape of the attention CTA, read once from the environment:
 *   0: 4 warps x 16 rows, mma.sync (64-row CTAs, 2 per SM): the default of an
 *      sm_90 build, and QLLM_ATTN_WGMMA=0;
 *   1, QLLM_ATTN_MI=2: 4 warps x 32 rows (128-row CTAs);
 *   2, QLLM_ATTN_WARPS=8: 8 warps x 16 rows (128-row CTAs, 1 per SM);
 *   3: variant 0 with the two products on wgmma, software-pipelined (head
 *      dim 128; head dim 64 runs variant 0): the default of an sm_90a build
 *      (QLLM_CUDA_ARCH=90a, setup.py's default), or QLLM_ATTN_WGMMA=1.
 * benchmarks/NOTES_gpu.md has the measurements behind the default. */
int attn_variant() {
#if defined(QLLM_SM90A)
    constexpr int dflt = 3;
#else
    constexpr int dflt = 0;
#endif
    static const int v = env_is("QLLM_ATTN_MI", '2') ? 1 : env_is("QLLM_ATTN_WARPS", '8') ? 2
                         : env_is("QLLM_ATTN_WGMMA", '1') ? 3 : env_is("QLLM_ATTN_WGMMA", '0') ? 0 : dflt;
    return v;
}

/* Heavy / light row tiles paired in the attention grid (attn_body), read once:
 * on by default, off with QLLM_ATTN_PAIR=0.  The same outputs either way. */
bool attn_pair_rows() {
    static const bool v = !env_is("QLLM_ATTN_PAIR", '0');
    return v;
}

/* Packed rows (attn_body): one query (E = 1) whose heads share KV heads. */
bool attn_packs(int64_t E, int group) { return E == 1 && group > 1 && group <= 16; }

template <typename T, int D, int MI, int NW, bool DYN, bool WG = false>
int launch_attention_v(const AttnArgs &a0, int E, int hq, cudaStream_t stream) {
    constexpr int BMr = NW * 16 * MI;
    /* tiles, then the tile table; WG: 1024 bytes of slack to align the swizzled tiles */
    const size_t smem = attn_tab_off<T, D, MI, NW, WG>() + ATT_TAB * ATT_ENT_B + (WG ? 1024 : 0);
    static bool ready = false;
    if (!ready) {
        const int st = DYN ? ensure_smem(attn_dyn_kernel<T, D, MI, NW, WG>, smem, "attn_dyn_kernel")
                           : ensure_smem(attn_kernel<T, D, MI, NW, WG>, smem, "attn_kernel");
        if (st != QLLM_CUDA_OK) return st;
        ready = true;
    }
    AttnArgs a = a0;
    a.pack = attn_packs(E, a.group) ? 1 : 0;
    dim3 grid(a.pack ? 1 : (E + BMr - 1) / BMr, a.pack ? hq / a.group : hq, a.n_split);
    a.pair_rows = !a.pack && a.n_split == 1 && grid.x % 2 == 0 && attn_pair_rows() ? 1 : 0;
    if (!DYN && WG && a.sig != nullptr) { /* early start: launched while the seam runs */
        cudaLaunchConfig_t cfg{};
        cfg.gridDim = grid;
        cfg.blockDim = dim3(NW * 32);
        cfg.dynamicSmemBytes = smem;
        cfg.stream = stream;
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        const cudaError_t e = cudaLaunchKernelEx(&cfg, attn_kernel<T, D, MI, NW, WG>, a);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            return set_error(QLLM_CUDA_ERR_LAUNCH, "attn_kernel (early start): %s", cudaGetErrorString(e));
        }
        return check_launch("attn_kernel");
    }
    a.sig = nullptr;
    if (DYN)
        attn_dyn_kernel<T, D, MI, NW, WG><<<grid, NW * 32, smem, stream>>>(a);
    else
        attn_kernel<T, D, MI, NW, WG><<<grid, NW * 32, smem, stream>>>(a);
    return check_launch("attn_kernel");
}

template <typename T, int D, bool DYN>
int launch_attention_dyn(const AttnArgs &a, int E, int hq, cudaStream_t stream) {
    switch (attn_variant()) {
    case 1: return launch_attention_v<T, D, 2, 4, DYN>(a, E, hq, stream);
    case 2: return launch_attention_v<T, D, 1, 8, DYN>(a, E, hq, stream);
    case 3:
        if constexpr (D == 128) {
#if defined(QLLM_SM90A)
            return launch_attention_v<T, D, 1, 4, DYN, true>(a, E, hq, stream);
#else
            return set_error(QLLM_CUDA_ERR_ARG,
                             "QLLM_ATTN_WGMMA=1 needs the extension built for sm_90a (QLLM_CUDA_ARCH=90a)");
#endif
        }
        return launch_attention_v<T, D, 1, 4, DYN>(a, E, hq, stream);
    default: return launch_attention_v<T, D, 1, 4, DYN>(a, E, hq, stream);
    }
}

template <typename T, int D>
int launch_attention(const AttnArgs &a, int E, int hq, cudaStream_t stream) {
    return a.dyn != nullptr ? launch_attention_dyn<T, D, true>(a, E, hq, stream)
                            : launch_attention_dyn<T, D, false>(a, E, hq, stream);
}

/* Token-score kernel of a prefill execution block (decode steps, packed, keep
 * tscore_body): 1 = wgmma (tscore_wg_body), the default of an sm_90a build;
 * 0 = mma.sync, the default elsewhere and with QLLM_TSCORE_WGMMA=0;
 * 2 = QLLM_TSCORE_WGMMA=1 in a build without sm_90a (an error at launch). */
int tscore_variant() {
#if defined(QLLM_SM90A)
    static const int v = env_is("QLLM_TSCORE_WGMMA", '0') ? 0 : 1;
#else
    static const int v = env_is("QLLM_TSCORE_WGMMA", '1') ? 2 : 0;
#endif
    return v;
}

#if defined(QLLM_SM90A)
/* Q stages of the wgmma token scores: 1 (the default: 6 CTAs per SM; on the
 * H100 the kernel takes 32.7 us per 128K execution block against 35.1 us with
 * two stages, and 36 us on mma.sync) or QLLM_TSCORE_STAGES=2. */
int tscore_stages() {
    static const int v = env_is("QLLM_TSCORE_STAGES", '2') ? 2 : 1;
    return v;
}
#endif

/* Token-score CTAs of a prefill execution block dispatched heaviest key tile
 * first (ts_geom, ts_tile_of_rank); QLLM_TSCORE_ORDER=0: in key order. */
bool tscore_ordered() {
    static const bool v = !env_is("QLLM_TSCORE_ORDER", '0');
    return v;
}

/* dyn != NULL: decode step, a.L is the longest segment (grid), sizes from dyn. */
template <typename T, int D>
int launch_tscore(const TsArgs &a, int hq, cudaStream_t stream, const int64_t *dyn = nullptr) {
    const size_t smem = static_cast<size_t>(TS_KEYS + 2 * TS_Q) * (D + 8) * sizeof(T) +
                        2 * TS_Q * sizeof(float);
    static bool ready = false;
    if (!ready) {
        int st = ensure_smem(tscore_kernel<T, D>, smem, "tscore_kernel");
        if (st == QLLM_CUDA_OK) st = ensure_smem(tscore_dyn_kernel<T, D>, smem, "tscore_dyn_kernel");
        if (st != QLLM_CUDA_OK) return st;
        ready = true;
    }
    TsArgs t = a;
    t.pack = attn_packs(a.E, a.group) ? 1 : 0; /* the decode step: E = 1 */
    t.order = 0;
    dim3 grid((a.L + TS_KEYS - 1) / TS_KEYS, t.pack ? hq / a.group : hq);
    if (dyn != nullptr) {
        tscore_dyn_kernel<T, D><<<grid, TS_THREADS, smem, stream>>>(t, dyn);
        return check_launch("tscore_dyn_kernel");
    }
    if (!t.pack && tscore_ordered()) { /* heavy key tiles first (ts_geom) */
        t.order = 1;
        grid = dim3(hq, (a.L + TS_KEYS - 1) / TS_KEYS);
    }
    const int tv = tscore_variant();
    if (tv == 2)
        return set_error(QLLM_CUDA_ERR_ARG,
                         "QLLM_TSCORE_WGMMA=1 needs the extension built for sm_90a (QLLM_CUDA_ARCH=90a)");
#if defined(QLLM_SM90A)
    if constexpr (D == 128) {
        if (tv == 1 && !t.pack) {
            /* K and QST Q stages of swizzled 16 KB tiles from a 1024-byte boundary */
            const int qst = tscore_stages();
            const size_t smem_wg =
                static_cast<size_t>(TS_KEYS + qst * TS_Q) * D * sizeof(T) + 2 * TS_Q * sizeof(float) + 1024;
            static bool ready_wg = false;
            if (!ready_wg) {
                const int st = qst == 1 ? ensure_smem(tscore_wg_kernel<T, D, 1>, smem_wg, "tscore_wg_kernel")
                                        : ensure_smem(tscore_wg_kernel<T, D, 2>, smem_wg, "tscore_wg_kernel");
                if (st != QLLM_CUDA_OK) return st;
                ready_wg = true;
            }
            if (qst == 1)
                tscore_wg_kernel<T, D, 1><<<grid, TS_THREADS, smem_wg, stream>>>(t);
            else
                tscore_wg_kernel<T, D, 2><<<grid, TS_THREADS, smem_wg, stream>>>(t);
            return check_launch("tscore_wg_kernel");
        }
    }
#endif
    tscore_kernel<T, D><<<grid, TS_THREADS, smem, stream>>>(t);
    return check_launch("tscore_kernel");
}

}  // namespace
}  // namespace qllm_cuda

using namespace qllm_cuda;

#define QLLM_DISPATCH_T(dtype, ...)                      \
    do {                                                 \
        if ((dtype) == QLLM_DTYPE_F16) {                 \
            using T = __half;                            \
            __VA_ARGS__;                                 \
        } else {                                         \
            using T = __nv_bfloat16;                     \
            __VA_ARGS__;                                 \
        }                                                \
    } while (0)

extern "C" int qllm_cuda_attention_rows(void) { return attn_variant() == 1 || attn_variant() == 2 ? 128 : 64; }

extern "C" const char *qllm_cuda_attention_kernel(int head_dim) {
    (void)head_dim; /* unused without sm_90a */
    switch (attn_variant()) {
    case 1: return "mma.sync, 4 warps x 32 rows (QLLM_ATTN_MI=2)";
    case 2: return "mma.sync, 8 warps x 16 rows (QLLM_ATTN_WARPS=8)";
    case 3:
#if defined(QLLM_SM90A)
        if (head_dim == 128)
            return "wgmma, 1 warpgroup x 64 rows, pipelined (sm_90a)";
        return "mma.sync, 4 warps x 16 rows (wgmma needs head dim 128)";
#else
        return "none: QLLM_ATTN_WGMMA=1 needs an sm_90a build";
#endif
    default: return "mma.sync, 4 warps x 16 rows";
    }
}

extern "C" int qllm_cuda_attention_packs(int64_t E, int group) { return attn_packs(E, group) ? 1 : 0; }

extern "C" int qllm_cuda_exec_prep(const qllm_gpu_layer *ly, const qllm_gpu_exec *ex,
                                   const void *q, int64_t q_hs, int64_t q_ts, void *qfix,
                                   void *qloc, void *krot, cudaStream_t stream) {
    int st = check_layer(ly, "exec_prep");
    if (st) return st;
    int64_t work = 0;
    st = check_prep(ly, *ex, q, q_hs, q_ts, "exec_prep", &work);
    if (st) return st;
    QLLM_DISPATCH_T(ly->dtype, launch_prep<T>(*ly, *ex, static_cast<const T *>(q), q_hs, q_ts, static_cast<T *>(qfix),
                                              static_cast<T *>(qloc), static_cast<T *>(krot), nullptr,
                                              grid_for(work, 256), stream));
    return check_launch("prep_kernel");
}

extern "C" int qllm_cuda_query_comb(const qllm_gpu_layer *ly, const void *q, int64_t q_hs,
                                    int64_t q_ts, int64_t n_rows, int exc, int n_exec,
                                    const float *question, float weight, float *qcomb,
                                    cudaStream_t stream) {
    int st = check_layer(ly, "query_comb");
    if (st) return st;
    if (n_exec < 1 || exc < 1 || n_rows < 1 || ly->hq > 65535)
        return set_error(QLLM_CUDA_ERR_ARG, "query_comb: bad sizes");
    if (q_hs % 8 != 0 || q_ts % 8 != 0 || (reinterpret_cast<uintptr_t>(q) & 15) != 0)
        return set_error(QLLM_CUDA_ERR_ARG, "query_comb: q rows must be 16-byte aligned (strides %lld, %lld)",
                         (long long)q_hs, (long long)q_ts);
    dim3 grid(n_exec, ly->hq);
    QLLM_DISPATCH_T(ly->dtype, qcomb_kernel<T><<<grid, QC_THREADS, 0, stream>>>(
                                   *ly, static_cast<const T *>(q), q_hs, q_ts, n_rows, exc, question,
                                   weight, qcomb));
    return check_launch("qcomb_kernel");
}

extern "C" int qllm_cuda_block_scores(const qllm_gpu_layer *ly, const float *qcomb, int i0, int i1,
                                      int64_t b0, int64_t b1, float *bscore, int64_t ld,
                                      cudaStream_t stream) {
    if (i1 <= i0 || b1 <= b0) return QLLM_CUDA_OK;
    const int64_t X = static_cast<int64_t>(ly->hq) * ly->head_dim;
    const int64_t n_pairs = (b1 - b0) * (i1 - i0);
    if (n_pairs <= 8192 && X % 4 == 0) { /* few pairs (decode, blocks just cut): a warp each */
        const int64_t nb = (n_pairs + 7) / 8;
        bscore_pairs_kernel<<<static_cast<unsigned>(nb), 256, 0, stream>>>(ly->reprs, X, qcomb, i0, i1 - i0,
                                                                          b0, n_pairs, bscore, ld, nullptr);
        return check_launch("bscore_pairs_kernel");
    }
    if (X % 4 != 0) return set_error(QLLM_CUDA_ERR_ARG, "block_scores: hq * head_dim = %lld", (long long)X);
    const int64_t nbx = (b1 - b0 + BS_W - 1) / BS_W;
    const int nby = (i1 - i0 + BS_I - 1) / BS_I;
    if (nbx > 2147483647 || nby > 65535) return set_error(QLLM_CUDA_ERR_ARG, "block_scores: grid too large");
    dim3 grid(static_cast<unsigned>(nbx), nby);
    bscore_kernel<<<grid, BS_W * 32, 0, stream>>>(ly->reprs, X, qcomb, i0, i1, b0, b1, bscore, ld);
    return check_launch("bscore_kernel");
}

extern "C" int qllm_cuda_select_blocks(const float *bscore, int64_t n, int k, int32_t *ids,
                                       cudaStream_t stream) {
    if (k < 1 || k > n || k > 4096 || n > 2147483647)
        return set_error(QLLM_CUDA_ERR_ARG, "select_blocks: k=%d, n=%lld", k, (long long)n);
    const bool staged = (n + k) * static_cast<int64_t>(sizeof(float)) <= SEL_DYN_SMEM;
    const size_t smem = (staged ? static_cast<size_t>(n) * sizeof(float) : 0) + static_cast<size_t>(k) * sizeof(int);
    if (static_cast<int64_t>(smem) > SEL_DYN_SMEM)
        return set_error(QLLM_CUDA_ERR_ARG, "select_blocks: k=%d too large", k);
    select_kernel<<<1, SEL_THREADS, smem, stream>>>(bscore, static_cast<int>(n), k, staged, ids, nullptr);
    return check_launch("select_kernel");
}

/* Dynamic shared memory of a question-head selection over (at most) n
 * candidates with n_cols columns and k ids: the candidates are staged when all
 * fits under 44 KB (the kernel has ~1.1 KB of static shared memory); 0 when
 * even the unstaged layout does not fit. */
static size_t qsel_smem(int64_t n, int n_cols, int k, bool *staged) {
    const int64_t base = 2 * (static_cast<int64_t>(n_cols) + 1) + k;
    const int64_t lim = SEL_DYN_SMEM / static_cast<int64_t>(sizeof(float));
    *staged = base + n <= lim;
    if (base > lim) return 0;
    return static_cast<size_t>(base + (*staged ? n : 0)) * sizeof(float);
}

extern "C" int qllm_cuda_select_blocks_qheads(float *bscore, int64_t n, int k, const float *raw, int64_t ld,
                                              int n_cols, float weight, int32_t *ids, cudaStream_t stream) {
    if (k < 1 || k > n || k > 4096 || n > 2147483647)
        return set_error(QLLM_CUDA_ERR_ARG, "select_blocks_qheads: k=%d, n=%lld", k, (long long)n);
    bool staged = false;
    const size_t smem = qsel_smem(n, n_cols, k, &staged);
    if (raw == nullptr || n_cols < 1 || n_cols > QLLM_CUDA_QH_MAX_COLS || ld < n_cols || smem == 0)
        return set_error(QLLM_CUDA_ERR_ARG, "select_blocks_qheads: %d columns (ld %lld), at most %d, k=%d", n_cols,
                         (long long)ld, QLLM_CUDA_QH_MAX_COLS, k);
    qsel_kernel<<<1, SEL_THREADS, smem, stream>>>(bscore, static_cast<int>(n), k, staged, raw, ld, n_cols, weight,
                                                 ids, nullptr);
    return check_launch("qsel_kernel");
}

extern "C" int qllm_cuda_qhead_record(const qllm_gpu_layer *ly, int64_t b0, int64_t n, const float *tokens,
                                      int n_tok, const int *heads, int n_heads, float *raw, int64_t ld, int col0,
                                      cudaStream_t stream) {
    int st = check_layer(ly, "qhead_record");
    if (st) return st;
    if (n <= 0 || n_heads <= 0) return QLLM_CUDA_OK;
    if (tokens == nullptr || raw == nullptr || heads == nullptr || n_tok < 1 || b0 < 0 || n > 2147483647 ||
        col0 < 0 || col0 + n_heads > ld)
        return set_error(QLLM_CUDA_ERR_ARG, "qhead_record: bad arguments (%d tokens, columns %d..%d of %lld)",
                         n_tok, col0, col0 + n_heads, (long long)ld);
    for (int i = 0; i < n_heads; ++i)
        if (heads[i] < 0 || heads[i] >= ly->hq)
            return set_error(QLLM_CUDA_ERR_ARG, "qhead_record: head %d of %d", heads[i], ly->hq);
    for (int i0 = 0; i0 < n_heads; i0 += QR_MAX_HEADS) {
        QhRec hr;
        hr.n = n_heads - i0 < QR_MAX_HEADS ? n_heads - i0 : QR_MAX_HEADS;
        hr.col0 = col0 + i0;
        for (int i = 0; i < QR_MAX_HEADS; ++i) hr.heads[i] = i < hr.n ? heads[i0 + i] : 0;
        dim3 grid(static_cast<unsigned>(n), hr.n);
        QLLM_DISPATCH_T(ly->dtype, qrec_kernel<T><<<grid, QR_THREADS, 0, stream>>>(*ly, b0, tokens, n_tok, hr,
                                                                                   raw, ld));
        st = check_launch("qrec_kernel");
        if (st) return st;
    }
    return QLLM_CUDA_OK;
}

/* The fields of AttnArgs / TsArgs that follow from the layer; callers fill in
 * the execution block (positions, lengths, buffers). */
static AttnArgs attn_args_for_layer(const qllm_gpu_layer &ly, float scaling) {
    AttnArgs a{};
    a.kst = ly.k_store;
    a.vst = ly.v_store;
    a.cap = ly.cap;
    a.wmask = ly.wmask;
    a.kc = ly.k_cache;
    a.vc = ly.v_cache;
    a.slot_of = ly.k_cache != nullptr ? ly.tier + QLLM_TIER_MISS + 2 * static_cast<int64_t>(ly.miss_cap) +
                                            2 * static_cast<int64_t>(ly.n_slots)
                                      : nullptr;
    a.hkv = ly.hkv;
    a.bs = ly.block_size;
    a.n_init = ly.n_init;
    a.n_local = ly.n_local;
    a.group = ly.hq / ly.hkv;
    a.streaming = ly.streaming;
    a.hq = ly.hq;
    a.sl2 = scaling * kLog2e;
    return a;
}

static TsArgs tscore_args_for_layer(const qllm_gpu_layer &ly, float scaling) {
    TsArgs t{};
    t.scores = ly.scores;
    t.ring = ly.ring;
    t.n_init = ly.n_init;
    t.n_local = ly.n_local;
    t.group = ly.hq / ly.hkv;
    t.sl2 = scaling * kLog2e;
    return t;
}

extern "C" int qllm_cuda_exec_attention(const qllm_gpu_layer *ly, const qllm_gpu_exec *ex,
                                        const void *qfix, const void *qloc, const void *krot,
                                        const int32_t *ids, float scaling, void *out,
                                        int64_t o_hs, int64_t o_ts, float *lse, int n_split,
                                        float *part_o, float *part_lse, const qllm_gpu_early *after,
                                        cudaStream_t stream) {
    int st = check_layer(ly, "exec_attention");
    if (st) return st;
    if (n_split < 1 || n_split > QLLM_CUDA_MAX_SPLIT || (n_split > 1 && (!part_o || !part_lse)))
        return set_error(QLLM_CUDA_ERR_ARG, "exec_attention: n_split=%d", n_split);
    if (ex->n_ret > 0 && ids == nullptr)
        return set_error(QLLM_CUDA_ERR_ARG, "exec_attention: n_ret=%d without ids", ex->n_ret);
    AttnArgs a = attn_args_for_layer(*ly, scaling);
    a.qfix = qfix;
    a.qloc = qloc;
    a.krot = krot;
    a.ids = ids;
    a.P0 = ex->P0;
    a.T0 = ex->T0;
    a.E = ex->E;
    a.L = ex->L;
    a.init_len = ex->init_len;
    a.n_ret = ex->n_ret;
    a.m = ex->m;
    a.out = out;
    a.o_hs = o_hs;
    a.o_ts = o_ts;
    a.lse = lse;
    a.part_o = part_o;
    a.part_lse = part_lse;
    a.n_split = n_split;
    a.n_split_eff = n_split;
    a.dyn = nullptr;
    /* early start: the wgmma kernel only (its tile order puts the retrieved tiles last) */
    bool wg = false;
#if defined(QLLM_SM90A)
    wg = attn_variant() == 3 && ly->head_dim == 128;
#endif
    if (after != nullptr && after->ok && after->sig != nullptr && wg && qllm_cuda_early_enabled()) {
        if (after->prep > INT_MAX || after->ids > INT_MAX)
            return set_error(QLLM_CUDA_ERR_ARG, "exec_attention: early-start counts %lld / %lld overflow",
                             (long long)after->prep, (long long)after->ids);
        a.sig = after->sig;
        a.sig_prep = static_cast<int>(after->prep);
        a.sig_ids = static_cast<int>(after->ids);
    }
    if (ly->hq > 65535) return set_error(QLLM_CUDA_ERR_ARG, "exec_attention: too many heads");
    QLLM_DISPATCH_T(ly->dtype, {
        st = ly->head_dim == 64 ? launch_attention<T, 64>(a, ex->E, ly->hq, stream)
                                : launch_attention<T, 128>(a, ex->E, ly->hq, stream);
    });
    if (st || n_split == 1) return st;
    dim3 grid(static_cast<unsigned>(ex->E), ly->hq);
    QLLM_DISPATCH_T(ly->dtype, combine_kernel<T><<<grid, ly->head_dim, 0, stream>>>(
                                   part_o, part_lse, n_split, ly->hq, ex->E, ly->head_dim,
                                   static_cast<T *>(out), o_hs, o_ts, lse));
    return check_launch("combine_kernel");
}

extern "C" int qllm_cuda_exec_token_scores(const qllm_gpu_layer *ly, const qllm_gpu_exec *ex,
                                           const void *qloc, const void *krot, const float *lse,
                                           float scaling, cudaStream_t stream) {
    int st = check_layer(ly, "exec_token_scores");
    if (st) return st;
    if (ly->ring < ex->L || (ly->ring & (ly->ring - 1)) != 0)
        return set_error(QLLM_CUDA_ERR_ARG, "exec_token_scores: ring %lld < L %d or not a power of 2",
                         (long long)ly->ring, ex->L);
    TsArgs a = tscore_args_for_layer(*ly, scaling);
    a.qloc = qloc;
    a.krot = krot;
    a.lse = lse;
    a.P0 = ex->P0;
    a.T0 = ex->T0;
    a.E = ex->E;
    a.L = ex->L;
    QLLM_DISPATCH_T(ly->dtype, {
        st = ly->head_dim == 64 ? launch_tscore<T, 64>(a, ly->hq, stream)
                                : launch_tscore<T, 128>(a, ly->hq, stream);
    });
    return st;
}

extern "C" int qllm_cuda_cut_blocks(const qllm_gpu_layer *ly, int64_t b0, int64_t n, int repr_topk,
                                    cudaStream_t stream) {
    int st = check_layer(ly, "cut_blocks");
    if (st) return st;
    if (n <= 0) return QLLM_CUDA_OK;
    if (b0 < 0 || b0 + n > ly->reprs_cap || repr_topk < 1 || n > 2147483647)
        return set_error(QLLM_CUDA_ERR_ARG, "cut_blocks: blocks %lld..%lld of %lld", (long long)b0,
                         (long long)(b0 + n), (long long)ly->reprs_cap);
    const int k = repr_topk < ly->block_size ? repr_topk : ly->block_size;
    dim3 grid(static_cast<unsigned>(n), ly->hq);
    QLLM_DISPATCH_T(ly->dtype, cut_kernel<T><<<grid, 128, static_cast<size_t>(k) * sizeof(int64_t),
                                               stream>>>(*ly, b0, k, nullptr));
    return check_launch("cut_kernel");
}

extern "C" int qllm_cuda_early_enabled(void) {
    static const int on = env_is("QLLM_ATTN_EARLY", '0') ? 0 : 1;
    return on;
}

extern "C" int qllm_cuda_seam_enabled(void) {
    static const int on = env_is("QLLM_SEAM", '0') ? 0 : 1;
    return on;
}

/* QLLM_SEAM_MERGE=0: the seam without the merged selection (the round-10
 * seam but for the arrival atomic), for same-build A/B runs. */
static bool seam_merge_enabled() {
    static const bool on = !env_is("QLLM_SEAM_MERGE", '0');
    return on;
}

extern "C" int qllm_cuda_exec_seam(const qllm_gpu_layer *ly, const qllm_gpu_seam *s, cudaStream_t stream) {
    int st = check_layer(ly, "exec_seam");
    if (st) return st;
    const bool prep = s->next != nullptr, sel = s->sel_k > 0;
    const int64_t cut_n = s->cut_n;
    const int D = ly->head_dim;
    int64_t prep_work = 0;
    if (prep && (st = check_prep(ly, *s->next, s->q, s->q_hs, s->q_ts, "exec_seam", &prep_work)) != 0) return st;
    const int ni = s->i1 - s->i0;
    if (cut_n < 0 || (cut_n > 0 && (s->cut_b0 < 0 || s->cut_b0 + cut_n > ly->reprs_cap || s->repr_topk < 1 ||
                                     cut_n > (1 << 20) || ni < 0 || (ni > 0 && (!s->qcomb || !s->bscore)) ||
                                     !s->pdot || !s->cnt)))
        return set_error(QLLM_CUDA_ERR_ARG, "exec_seam: cut of blocks %lld+%lld (of %lld), rows %d..%d",
                         (long long)s->cut_b0, (long long)cut_n, (long long)ly->reprs_cap, s->i0, s->i1);
    if (sel && (s->sel_k > s->sel_n || s->sel_k > 4096 || !s->sel_scores || !s->sel_ids))
        return set_error(QLLM_CUDA_ERR_ARG, "exec_seam: select k=%d of n=%lld", s->sel_k, (long long)s->sel_n);
    /* The selection stages its candidates in shared memory; when they do not
     * fit it runs as select_kernel after the seam. */
    const bool sel_in = sel && (s->sel_n + s->sel_k) * static_cast<int64_t>(sizeof(float)) <= SEL_DYN_SMEM;
    SeamArgs a{};
    if (prep) a.ex = *s->next;
    a.q = s->q;
    a.q_hs = s->q_hs;
    a.q_ts = s->q_ts;
    a.qfix = s->qfix;
    a.qloc = s->qloc;
    a.krot = s->krot;
    a.prep_ctas = prep ? grid_for(prep_work, SEAM_THREADS) : 0;
    a.cut_b0 = s->cut_b0;
    a.cut_n = static_cast<int>(cut_n);
    a.repr_k = s->repr_topk < ly->block_size ? s->repr_topk : ly->block_size;
    a.qcomb = s->qcomb;
    a.i0 = s->i0;
    a.i1 = s->i1;
    a.bscore = s->bscore;
    a.ld = s->ld;
    a.pdot = s->pdot;
    a.cnt = s->cnt;
    a.sel_part = s->cnt != nullptr ? reinterpret_cast<uint32_t *>(s->cnt + 1) : nullptr;
    a.sel_scores = s->sel_scores;
    a.sel_n = static_cast<int>(s->sel_n);
    a.sel_k = sel_in ? s->sel_k : 0;
    a.sel_ids = s->sel_ids;
    /* block i+1 ranks a block cut now: its selection waits for the cut CTAs */
    a.sel_after_cut = sel_in && cut_n > 0 && s->sel_n > s->cut_b0;
    const int64_t budget = SEL_DYN_SMEM / static_cast<int64_t>(sizeof(float));
    int64_t floats = sel_in && !a.sel_after_cut ? s->sel_n : 0;
    if (cut_n > 0) {
        const int bs = ly->block_size, hq = ly->hq;
        const int64_t cut_min = seam_cut_floats(a.repr_k, bs, D, ni, false);
        if (cut_min > budget)
            return set_error(QLLM_CUDA_ERR_ARG, "exec_seam: block_size %d, repr_topk %d need too much shared memory",
                             bs, a.repr_k);
        /* with k <= SEL_KFAST the selection after the cut merges the select
         * CTA's list of the other blocks with the cut blocks' new scores */
        const bool fast = seam_merge_enabled();
        a.sel_merge = fast && a.sel_after_cut && s->sel_k <= SEL_KFAST && ni >= 1 && cut_n <= cut_min;
        const int64_t sel_part = a.sel_after_cut && !a.sel_merge ? s->sel_n : 0;
        a.qc_smem = seam_cut_floats(a.repr_k, bs, D, ni, true) <= budget;
        a.pd_smem = seam_last_floats(sel_part, a.cut_n, ni, hq, true) <= budget;
        const int64_t cut_f = seam_cut_floats(a.repr_k, bs, D, ni, a.qc_smem);
        const int64_t last_f = a.sel_merge ? cut_n : seam_last_floats(sel_part, a.cut_n, ni, hq, a.pd_smem);
        floats = floats > cut_f ? floats : cut_f;
        floats = floats > last_f ? floats : last_f;
    }
    a.sel_cta = sel_in && (!a.sel_after_cut || a.sel_merge);
    const int64_t grid = cut_n * ly->hq + (a.sel_cta ? 1 : 0) + a.prep_ctas;
    if (s->early != nullptr) { /* what the next attention may wait for */
        a.sig = s->early->sig;
        s->early->prep += a.prep_ctas;
        if (sel && sel_in) s->early->ids += 1;
        s->early->ok = a.sig != nullptr && grid > 0 && (!sel || sel_in); /* else the ids come from select_kernel */
    }
    if (grid > 0) {
        const size_t smem = static_cast<size_t>(floats) * sizeof(float);
        const bool vec = prep_vec(*ly);
        QLLM_DISPATCH_T(ly->dtype, {
            if (vec)
                seam_kernel<T, true><<<static_cast<unsigned>(grid), SEAM_THREADS, smem, stream>>>(*ly, a);
            else
                seam_kernel<T, false><<<static_cast<unsigned>(grid), SEAM_THREADS, smem, stream>>>(*ly, a);
        });
        st = check_launch("seam_kernel");
        if (st) return st;
    }
    if (sel && !sel_in) return qllm_cuda_select_blocks(s->sel_scores, s->sel_n, s->sel_k, s->sel_ids, stream);
    return QLLM_CUDA_OK;
}

extern "C" int qllm_cuda_tier_touch(const qllm_gpu_layer *ly, const int32_t *ids, int64_t b0, int n,
                                    int64_t ring_lo, const int64_t *dyn, cudaStream_t stream) {
    int st = check_layer(ly, "tier_touch");
    if (st) return st;
    if (ly->k_cache == nullptr || ly->v_cache == nullptr || ly->tier == nullptr || ly->n_slots < 1 ||
        ly->miss_cap < 1 || ly->host_k == nullptr || ly->host_v == nullptr || ly->chunk_blocks < 1 ||
        ly->wmask < 0 || ((ly->wmask + 1) & ly->wmask) != 0)
        return set_error(QLLM_CUDA_ERR_ARG, "tier_touch: the layer has no tiered block memory");
    if (n < 0 || (ids == nullptr && dyn != nullptr) || (ids == nullptr && (b0 < 0 || b0 + n > ly->tier_nb)) ||
        (ids != nullptr && n > ly->miss_cap) ||
        (ly->tier_nb + ly->chunk_blocks - 1) / ly->chunk_blocks > ly->n_chunks)
        return set_error(QLLM_CUDA_ERR_ARG, "tier_touch: blocks %lld+%d (of %lld, miss list %d)", (long long)b0, n,
                         (long long)ly->tier_nb, ly->miss_cap);
    const int64_t n16 = static_cast<int64_t>(ly->hkv) * ly->block_size * (ly->head_dim / 8);
    const unsigned gx = static_cast<unsigned>((n16 + 255) / 256 < 16 ? (n16 + 255) / 256 : 16);
    auto launch = [&](const int32_t *ids_, int64_t first, int count, int rows) -> int {
        tier_alloc_kernel<<<1, TIER_THREADS, 0, stream>>>(*ly, ids_, first, count, dyn);
        int st2 = check_launch("tier_alloc_kernel");
        if (st2 || rows == 0) return st2;
        QLLM_DISPATCH_T(ly->dtype, tier_copy_kernel<T><<<dim3(gx, static_cast<unsigned>(rows)), 256, 0, stream>>>(
                                       *ly, ring_lo, dyn));
        return check_launch("tier_copy_kernel");
    };
    if (ids != nullptr) return launch(ids, 0, n, dyn != nullptr ? ly->miss_cap : n);
    /* cut ranges longer than the miss list: in pieces (each one tick of the clock) */
    for (int done = 0; done < n; done += ly->miss_cap) {
        const int piece = n - done < ly->miss_cap ? n - done : ly->miss_cap;
        st = launch(nullptr, b0 + done, piece, piece);
        if (st) return st;
    }
    return QLLM_CUDA_OK;
}

extern "C" int qllm_cuda_decode_set(int64_t *dyn, const int64_t *vals, int n, cudaStream_t stream) {
    if (n < 1 || n > QLLM_DYN_FIELDS || dyn == nullptr)
        return set_error(QLLM_CUDA_ERR_ARG, "decode_set: %d values", n);
    DynVals dv;
    for (int i = 0; i < QLLM_DYN_FIELDS; ++i) dv.v[i] = 0;
    for (int i = 0; i < n; ++i) dv.v[i] = vals[i];
    dyn_set_kernel<<<1, 32, 0, stream>>>(dv, dyn);
    return check_launch("dyn_set_kernel");
}

extern "C" int qllm_cuda_decode_step(const qllm_gpu_layer *ly, const qllm_gpu_decode *dc,
                                     cudaStream_t stream) {
    int st = check_layer(ly, "decode_step");
    if (st) return st;
    const int D = ly->head_dim;
    if (dc->dyn == nullptr || dc->L_max < 1 || dc->L_max > ly->rope_len || dc->L_max > ly->ring ||
        (ly->ring & (ly->ring - 1)) != 0 || dc->nb_max < 1 || dc->nb_max > ly->reprs_cap ||
        dc->nb_max > 2147483647 || dc->k_max < 0 || dc->k_max > 4096 || dc->n_split < 1 ||
        dc->n_split > QLLM_CUDA_MAX_SPLIT || (dc->n_split > 1 && (!dc->part_o || !dc->part_lse)) ||
        ly->hq > 65535 || dc->qh_cols < 0 || dc->qh_cols > QLLM_CUDA_QH_MAX_COLS ||
        (dc->qh_cols > 0 && (dc->qh_raw == nullptr || dc->qh_ld < dc->qh_cols || dc->question != nullptr)))
        return set_error(QLLM_CUDA_ERR_ARG, "decode_step: bad sizes (L_max %d, nb_max %lld, k %d, split %d)",
                         dc->L_max, (long long)dc->nb_max, dc->k_max, dc->n_split);
    if (dc->cut_k < 0 || (dc->cut_k > 0 && (dc->cut_k > ly->block_size || ly->streaming || ly->k_cache != nullptr)))
        return set_error(QLLM_CUDA_ERR_ARG, "decode_step: cut_k %d (block_size %d%s%s)", dc->cut_k, ly->block_size,
                         ly->streaming ? ", streaming" : "", ly->k_cache != nullptr ? ", tiered" : "");
    if (dc->q_hs % 8 != 0 || (reinterpret_cast<uintptr_t>(dc->q) & 15) != 0)
        return set_error(QLLM_CUDA_ERR_ARG, "decode_step: q rows must be 16-byte aligned");
    const int64_t *dyn = dc->dyn;
    QLLM_DISPATCH_T(ly->dtype, store_kv_kernel<T><<<ly->hkv, D, 0, stream>>>(
                                   static_cast<const T *>(dc->k), dc->k_hs, static_cast<const T *>(dc->v),
                                   dc->v_hs, static_cast<T *>(ly->k_store), static_cast<T *>(ly->v_store),
                                   ly->cap, D, ly->n_init, ly->wmask, dyn));
    st = check_launch("store_kv_kernel");
    if (st) return st;
    /* rotations of q and of the window's keys: need the store write, not the selection */
    const bool fork = dc->side != nullptr && dc->ev_fork != nullptr && dc->ev_join != nullptr;
    const cudaStream_t prep_stream = fork ? dc->side : stream;
    if (fork) {
        cudaError_t e = cudaEventRecord(dc->ev_fork, stream);
        if (e == cudaSuccess) e = cudaStreamWaitEvent(dc->side, dc->ev_fork, 0);
        if (e != cudaSuccess) return set_error(QLLM_CUDA_ERR_LAUNCH, "decode_step: fork: %s", cudaGetErrorString(e));
    }
    {
        qllm_gpu_exec ex;
        ex.P0 = 0;
        ex.T0 = 0;
        ex.E = 1;
        ex.L = dc->L_max;
        ex.init_len = 0;
        ex.n_ret = 0;
        ex.m = 0;
        const int64_t work = (static_cast<int64_t>(ly->hq) + static_cast<int64_t>(ly->hkv) * dc->L_max) * (D / 16);
        QLLM_DISPATCH_T(ly->dtype, launch_prep<T>(*ly, ex, static_cast<const T *>(dc->q), dc->q_hs, dc->q_hs,
                                                  static_cast<T *>(dc->qfix), static_cast<T *>(dc->qloc),
                                                  static_cast<T *>(dc->krot), dyn, grid_for(work, 256), prep_stream));
        st = check_launch("prep_kernel");
        if (st) return st;
    }
    if (fork) {
        const cudaError_t e = cudaEventRecord(dc->ev_join, dc->side);
        if (e != cudaSuccess) return set_error(QLLM_CUDA_ERR_LAUNCH, "decode_step: join: %s", cudaGetErrorString(e));
    }
    if (!ly->streaming) {
        st = qllm_cuda_query_comb(ly, dc->q, dc->q_hs, dc->q_hs, 1, 1, 1, dc->question, dc->weight,
                                  dc->qcomb, stream);
        if (st) return st;
        const int64_t X = static_cast<int64_t>(ly->hq) * D;
        bscore_pairs_kernel<<<static_cast<unsigned>((dc->nb_max + 7) / 8), 256, 0, stream>>>(
            ly->reprs, X, dc->qcomb, 0, 1, 0, dc->nb_max, dc->bscore, dc->nb_max, dyn + QLLM_DYN_NBLK);
        st = check_launch("bscore_pairs_kernel");
        if (st) return st;
        if (dc->k_max > 0 && dc->qh_cols > 0) { /* question heads: z-scored terms, then top-k */
            bool staged = false;
            const size_t smem = qsel_smem(dc->nb_max, dc->qh_cols, dc->k_max, &staged);
            if (smem == 0) return set_error(QLLM_CUDA_ERR_ARG, "decode_step: %d question-head columns", dc->qh_cols);
            qsel_kernel<<<1, SEL_THREADS, smem, stream>>>(dc->bscore, static_cast<int>(dc->nb_max), dc->k_max,
                                                         staged, dc->qh_raw, dc->qh_ld, dc->qh_cols, dc->weight,
                                                         dc->ids, dyn);
            st = check_launch("qsel_kernel");
            if (st) return st;
        } else if (dc->k_max > 0) {
            const bool staged = (dc->nb_max + dc->k_max) * static_cast<int64_t>(sizeof(float)) <= SEL_DYN_SMEM;
            const size_t smem = (staged ? static_cast<size_t>(dc->nb_max) * sizeof(float) : 0) +
                                static_cast<size_t>(dc->k_max) * sizeof(int);
            select_kernel<<<1, SEL_THREADS, smem, stream>>>(dc->bscore, static_cast<int>(dc->nb_max),
                                                            dc->k_max, staged, dc->ids, dyn);
            st = check_launch("select_kernel");
            if (st) return st;
        }
        if (dc->k_max > 0 && ly->k_cache != nullptr) { /* tiered: the retrieved blocks into the cache */
            st = qllm_cuda_tier_touch(ly, dc->ids, 0, dc->k_max, 0, dyn, stream);
            if (st) return st;
        }
    }
    if (fork) {
        const cudaError_t e = cudaStreamWaitEvent(stream, dc->ev_join, 0);
        if (e != cudaSuccess) return set_error(QLLM_CUDA_ERR_LAUNCH, "decode_step: join: %s", cudaGetErrorString(e));
    }
    AttnArgs a = attn_args_for_layer(*ly, dc->scaling);
    a.qfix = dc->qfix;
    a.qloc = dc->qloc;
    a.krot = dc->krot;
    a.ids = dc->ids;
    a.P0 = 0;
    a.T0 = 0;
    a.E = 1;
    a.L = dc->L_max;
    a.init_len = 0;
    a.n_ret = 0;
    a.m = 0;
    a.out = dc->out;
    a.o_hs = dc->o_hs;
    a.o_ts = dc->o_hs;
    a.lse = dc->lse;
    a.part_o = dc->part_o;
    a.part_lse = dc->part_lse;
    a.n_split = dc->n_split;
    a.n_split_eff = dc->n_split;
    a.dyn = dyn;
    QLLM_DISPATCH_T(ly->dtype, {
        st = D == 64 ? launch_attention<T, 64>(a, 1, ly->hq, stream)
                     : launch_attention<T, 128>(a, 1, ly->hq, stream);
    });
    if (st) return st;
    if (dc->n_split > 1) {
        dim3 grid(1, ly->hq);
        QLLM_DISPATCH_T(ly->dtype, combine_kernel<T><<<grid, D, 0, stream>>>(
                                       dc->part_o, dc->part_lse, dc->n_split, ly->hq, 1, D,
                                       static_cast<T *>(dc->out), dc->o_hs, dc->o_hs, dc->lse));
        st = check_launch("combine_kernel");
        if (st) return st;
    }
    TsArgs t = tscore_args_for_layer(*ly, dc->scaling);
    t.qloc = dc->qloc;
    t.krot = dc->krot;
    t.lse = dc->lse;
    t.P0 = 0;
    t.T0 = 0;
    t.E = 1;
    t.L = dc->L_max;
    QLLM_DISPATCH_T(ly->dtype, {
        st = D == 64 ? launch_tscore<T, 64>(t, ly->hq, stream, dyn)
                     : launch_tscore<T, 128>(t, ly->hq, stream, dyn);
    });
    if (st || dc->cut_k == 0) return st;
    /* the block this token's scores complete (after them, as attend_run's cut) */
    QLLM_DISPATCH_T(ly->dtype, cut_kernel<T><<<dim3(1, ly->hq), 128, static_cast<size_t>(dc->cut_k) * sizeof(int64_t),
                                               stream>>>(*ly, 0, dc->cut_k, dyn));
    return check_launch("cut_kernel");
}
