// Where the seam launch's time goes (qllm_cuda_exec_seam, csrc/cuda/attend.cu): the launch
// between execution blocks i and i+1 at a 128K-like state (Llama-3-8B heads, 2K-budget config,
// block i+1 ranks 774 blocks, 4 of them cut by block i), in six variants:
//   full      cut of block i + block i+1's top-k + block i+1's rotations (what attend_run runs)
//   no-prep   cut + top-k
//   cut-only  cut (representatives, partial dots, block scores)
//   cut+prep  cut + rotations
//   prep-only rotations
//   full-512K full, with block i+1 ranking 3974 blocks (a 512K-like state)
// First the per-launch time of each in a CUDA graph of back-to-back launches, then one traced
// launch of each: every CTA's thread 0 stamps %globaltimer at its phases (SEAM_T_* in attend.cu,
// compiled in by QLLM_SEAM_TRACE), printed as microseconds after the first CTA's start.
// In the last CTA's line, "staged" and "sums" are, with the merged selection (sel_merge), the
// cut blocks' scores for block i+1 and block i+1's ids written.
// Build: nvcc -O3 -std=c++20 -arch=sm_90 -Icsrc/include -Icsrc benchmarks/micro/seam_trace.cu -o /tmp/mseam
#define QLLM_SEAM_TRACE 1
#include "../../csrc/cuda/attend.cu"
#ifndef QLLM_SEAM_CNT_INTS /* an older attend.cu: the counter alone */
#define QLLM_SEAM_CNT_INTS 1
#endif
#include "../../csrc/cuda/ops_kernels.cu"
#include "graph_timer.cuh"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

namespace micro {
using qllm_cuda::SEAM_PHASES;

template <typename T>
T *dev_alloc(size_t n) {
    T *p = nullptr;
    MICRO_CK(cudaMalloc(&p, n * sizeof(T)));
    MICRO_CK(cudaMemset(p, 0, n * sizeof(T)));
    return p;
}

/* Deterministic pseudo-random fill in [-1, 1) (scaled), written on the host. */
void fill_f32(float *d, size_t n, unsigned seed, float scale) {
    std::vector<float> h(n);
    for (size_t i = 0; i < n; ++i) {
        seed = seed * 1664525u + 1013904223u;
        h[i] = scale * (static_cast<float>(seed >> 8) / 8388608.0f - 1.0f);
    }
    MICRO_CK(cudaMemcpy(d, h.data(), n * sizeof(float), cudaMemcpyHostToDevice));
}
void fill_bf16(__nv_bfloat16 *d, size_t n, unsigned seed) {
    std::vector<__nv_bfloat16> h(n);
    for (size_t i = 0; i < n; ++i) {
        seed = seed * 1664525u + 1013904223u;
        h[i] = __float2bfloat16(static_cast<float>(seed >> 8) / 8388608.0f - 1.0f);
    }
    MICRO_CK(cudaMemcpy(d, h.data(), n * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
}

/* min / median / max of v (empty: zeros) */
void stats(std::vector<double> v, double out[3]) {
    if (v.empty()) {
        out[0] = out[1] = out[2] = 0.0;
        return;
    }
    std::sort(v.begin(), v.end());
    out[0] = v.front();
    out[1] = v[v.size() / 2];
    out[2] = v.back();
}
}  // namespace micro

int main() {
    using namespace micro;
    constexpr int D = 128, HQ = 32, HKV = 8, BS = 128, N_INIT = 128, N_LOCAL = 1024, E = 512;
    constexpr int64_t CAP = 520000, RING = 4096, CAP_B = 4096, P = 2048, T_CHUNK = 8192;
    constexpr int N_EXEC = 16, I = 5; /* block i = 5 of the call's 16 */
    constexpr int64_t CUT_B0 = 770, CUT_N = 4, SEL_N = CUT_B0 + CUT_N, CUT_B0_512K = 3970;
    cudaStream_t s;
    MICRO_CK(cudaStreamCreate(&s));

    auto *k_store = dev_alloc<__nv_bfloat16>(static_cast<size_t>(HKV) * CAP * D);
    auto *v_store = dev_alloc<__nv_bfloat16>(static_cast<size_t>(HKV) * CAP * D);
    auto *scores = dev_alloc<float>(static_cast<size_t>(HQ) * RING);
    auto *reprs = dev_alloc<float>(static_cast<size_t>(CAP_B) * HQ * D);
    auto *cosv = dev_alloc<float>(static_cast<size_t>(P) * D);
    auto *sinv = dev_alloc<float>(static_cast<size_t>(P) * D);
    auto *q = dev_alloc<__nv_bfloat16>(static_cast<size_t>(HQ) * T_CHUNK * D);
    auto *qfix = dev_alloc<__nv_bfloat16>(static_cast<size_t>(HQ) * E * D);
    auto *qloc = dev_alloc<__nv_bfloat16>(static_cast<size_t>(HQ) * E * D);
    auto *krot = dev_alloc<__nv_bfloat16>(static_cast<size_t>(HKV) * (N_LOCAL + E) * D);
    auto *qcomb = dev_alloc<float>(static_cast<size_t>(N_EXEC) * HQ * D);
    auto *bscore = dev_alloc<float>(static_cast<size_t>(N_EXEC) * CAP_B);
    auto *pdot = dev_alloc<float>(static_cast<size_t>(CUT_N) * N_EXEC * HQ);
    auto *cnt = dev_alloc<int32_t>(QLLM_SEAM_CNT_INTS);
    auto *ids = dev_alloc<int32_t>(64);
    fill_bf16(k_store, static_cast<size_t>(HKV) * CAP * D, 1u);
    fill_f32(scores, static_cast<size_t>(HQ) * RING, 2u, 1.0f);
    fill_f32(cosv, static_cast<size_t>(P) * D, 3u, 1.0f);
    fill_f32(sinv, static_cast<size_t>(P) * D, 4u, 1.0f);
    fill_bf16(q, static_cast<size_t>(HQ) * T_CHUNK * D, 5u);
    fill_f32(qcomb, static_cast<size_t>(N_EXEC) * HQ * D, 6u, 0.1f);
    fill_f32(bscore, static_cast<size_t>(N_EXEC) * CAP_B, 7u, 1.0f);

    qllm_gpu_layer ly;
    std::memset(&ly, 0, sizeof(ly));
    ly.dtype = QLLM_DTYPE_BF16;
    ly.head_dim = D;
    ly.hq = HQ;
    ly.hkv = HKV;
    ly.n_init = N_INIT;
    ly.n_local = N_LOCAL;
    ly.block_size = BS;
    ly.cap = CAP;
    ly.ring = RING;
    ly.cos = cosv;
    ly.sin = sinv;
    ly.rope_len = P;
    ly.k_store = k_store;
    ly.v_store = v_store;
    ly.scores = scores;
    ly.reprs = reprs;
    ly.reprs_cap = CAP_B;
    ly.wmask = INT64_MAX;

    /* block i+1: queries at 100000 + 512 .., the recent segment from 1024 before */
    qllm_gpu_exec next;
    std::memset(&next, 0, sizeof(next));
    next.P0 = 100512;
    next.T0 = next.P0 - N_LOCAL;
    next.E = E;
    next.L = N_LOCAL + E;
    next.init_len = N_INIT;
    next.n_ret = 8;
    next.m = 0;

    struct Variant {
        const char *name;
        bool cut, sel, prep;
        int64_t cut_b0;
    };
    const Variant variants[] = {{"full", true, true, true, CUT_B0},
                                {"no-prep", true, true, false, CUT_B0},
                                {"cut-only", true, false, false, CUT_B0},
                                {"cut+prep", true, false, true, CUT_B0},
                                {"prep-only", false, false, true, CUT_B0},
                                {"full-512K", true, true, true, CUT_B0_512K}};
    auto make = [&](const Variant &v) {
        qllm_gpu_seam sm;
        std::memset(&sm, 0, sizeof(sm));
        if (v.prep) {
            sm.next = &next;
            sm.q = q + static_cast<int64_t>(I + 1) * E * D; /* q [HQ, T_CHUNK, D]: row (i+1)*E */
            sm.q_hs = T_CHUNK * D;
            sm.q_ts = D;
            sm.qfix = qfix;
            sm.qloc = qloc;
            sm.krot = krot;
        }
        if (v.cut) {
            sm.cut_b0 = v.cut_b0;
            sm.cut_n = CUT_N;
            sm.repr_topk = 4;
            sm.qcomb = qcomb;
            sm.i0 = I + 1;
            sm.i1 = N_EXEC;
            sm.bscore = bscore;
            sm.ld = CAP_B;
            sm.pdot = pdot;
            sm.cnt = cnt;
        }
        if (v.sel) {
            sm.sel_scores = bscore + static_cast<int64_t>(I + 1) * CAP_B;
            sm.sel_n = v.cut_b0 + CUT_N;
            sm.sel_k = 8;
            sm.sel_ids = ids;
        }
        return sm;
    };

    const int max_ctas = 8192;
    unsigned long long *trace = dev_alloc<unsigned long long>(static_cast<size_t>(max_ctas) * SEAM_PHASES);
    unsigned long long *none = nullptr;
    std::printf("# seam launch at a 128K-like state: hq=%d hkv=%d D=%d, block_size %d, cut %lld blocks, top-8 of %lld, "
                "rotations of E=%d rows and L=%d keys\n",
                HQ, HKV, D, BS, (long long)CUT_N, (long long)SEL_N, E, next.L);
    for (const Variant &v : variants) {
        const qllm_gpu_seam sm = make(v);
        MICRO_CK(cudaMemcpyToSymbol(qllm_cuda::g_seam_trace, &none, sizeof(none)));
        if (qllm_cuda_exec_seam(&ly, &sm, s) != QLLM_CUDA_OK) {
            std::printf("%s: launcher error: %s\n", v.name, qllm_cuda_last_error());
            return 1;
        }
        MICRO_CK(cudaStreamSynchronize(s));
        const float us = graph_us([&] { qllm_cuda_exec_seam(&ly, &sm, s); }, 100, s);
        /* one traced launch */
        MICRO_CK(cudaMemset(trace, 0, static_cast<size_t>(max_ctas) * SEAM_PHASES * sizeof(unsigned long long)));
        MICRO_CK(cudaMemcpyToSymbol(qllm_cuda::g_seam_trace, &trace, sizeof(trace)));
        qllm_cuda_exec_seam(&ly, &sm, s);
        MICRO_CK(cudaStreamSynchronize(s));
        std::vector<unsigned long long> h(static_cast<size_t>(max_ctas) * SEAM_PHASES);
        MICRO_CK(cudaMemcpy(h.data(), trace, h.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
        unsigned long long t0 = ~0ull, t_end = 0;
        int ctas = 0, last = -1;
        for (int c = 0; c < max_ctas; ++c) {
            const unsigned long long st = h[static_cast<size_t>(c) * SEAM_PHASES + qllm_cuda::SEAM_T_START];
            if (st == 0) continue;
            ctas = c + 1;
            t0 = std::min(t0, st);
            t_end = std::max(t_end, h[static_cast<size_t>(c) * SEAM_PHASES + qllm_cuda::SEAM_T_END]);
            if (h[static_cast<size_t>(c) * SEAM_PHASES + qllm_cuda::SEAM_T_LAST] != 0) last = c;
        }
        const int n_cut = v.cut ? static_cast<int>(CUT_N) * HQ : 0;
        auto at = [&](int c, int ph) {
            const unsigned long long t = h[static_cast<size_t>(c) * SEAM_PHASES + ph];
            return t == 0 ? -1.0 : static_cast<double>(t - t0) / 1000.0;
        };
        std::printf("\n%-9s  %.2f us per launch (graph of 100); traced launch: %d CTAs, first start to last end "
                    "%.2f us\n", v.name, us, ctas, static_cast<double>(t_end - t0) / 1000.0);
        const char *names[SEAM_PHASES] = {"start", "topk", "repr", "dots", "last", "staged", "sums", "end"};
        if (n_cut > 0) {
            for (int ph : {0, 1, 2, 3, 7}) {
                std::vector<double> xs;
                for (int c = 0; c < n_cut; ++c) xs.push_back(at(c, ph));
                double st[3];
                stats(xs, st);
                std::printf("  cut CTAs  %-6s min %6.2f  median %6.2f  max %6.2f us\n", names[ph], st[0], st[1], st[2]);
            }
            if (last >= 0)
                std::printf("  last CTA %d: dots %.2f  counted %.2f  staged %.2f  sums %.2f  end %.2f us\n", last,
                            at(last, 3), at(last, 4), at(last, 5), at(last, 6), at(last, 7));
        }
        if (ctas > n_cut) {
            for (int ph : {0, 7}) {
                std::vector<double> xs;
                for (int c = n_cut; c < ctas; ++c) xs.push_back(at(c, ph));
                double st[3];
                stats(xs, st);
                std::printf("  other CTAs (%d) %-5s min %6.2f  median %6.2f  max %6.2f us\n", ctas - n_cut,
                            names[ph], st[0], st[1], st[2]);
            }
        }
    }
    const cudaError_t e = cudaDeviceSynchronize();
    std::printf("\nstatus: %s\n", cudaGetErrorString(e));
    return e == cudaSuccess ? 0 : 1;
}
