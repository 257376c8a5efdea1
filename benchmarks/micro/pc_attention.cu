// Micro-benchmark of the attention kernel's pipeline shape (NOTES_gpu.md rounds 8 and 12), before
// building a producer/consumer variant into csrc/cuda/attend.cu.  Full 64-key tiles of synthetic
// bf16 data, head dim 128, every query row attends every key (no masks), GQA group 4:
//   coupled  the shipped kernel's shape: a CTA = one warpgroup of 64 query rows; every thread
//            copies its share of each K/V tile (cp.async; K two tiles ahead, V one) and a
//            __syncthreads per tile hands the tiles over; S of tile t+1 and P V of tile t are
//            issued together after the softmax of tile t.  Two CTAs per SM.
//   pc       a CTA = two consumer warpgroups of 64 rows each (128 rows of one head) and one
//            producer warp that copies each K/V tile once into a ring of four stages (cp.async,
//            completion on the stage's `full` mbarrier); a consumer waits `full`, and after the
//            wait that retires P V of a tile, arrives on the stage's `empty` mbarrier, which
//            the producer waits on before refilling the stage.  One CTA per SM.
// Per row the math and its order are the same (the online softmax of attend.cu: log2 domain,
// running max moved by more than 8 only, trees of depth 4), so the outputs must be bitwise equal;
// the program checks that, then times both (CUDA graph of back-to-back launches).
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc/include -Icsrc \
//            benchmarks/micro/pc_attention.cu -o /tmp/pca
// Run:   /tmp/pca [rows per head, default 512] [keys, default 2560]
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../../csrc/cuda/attend.cu" /* the kernels' helpers: tree16, fast_exp2, cp_async16_all, Cvt */
#include "../../csrc/cuda/ops_kernels.cu" /* set_error, which attend.cu's launchers call */
#include "graph_timer.cuh"

namespace pca {

using namespace qllm_cuda;
using T = __nv_bfloat16;

constexpr int D = 128, BN = 64, HQ = 32, HKV = 8, GROUP = HQ / HKV;
constexpr int TILE_B = 64 * D * 2; /* one 64 x 128 bf16 tile, 128-byte swizzle */
constexpr int NS = 4;              /* pc: stages of the K/V ring */
constexpr float SLACK = ATT_SLACK;

__device__ __forceinline__ void cp_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

__device__ __forceinline__ void mbar_init(uint64_t *b, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t *b) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(smem_addr(b)) : "memory");
}
/* arrives on b once every cp.async this thread issued so far has landed (not counted up front) */
__device__ __forceinline__ void mbar_arrive_cp(uint64_t *b) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t *b, uint32_t parity) {
    uint32_t done = 0;
    while (!done)
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(smem_addr(b)), "r"(parity)
                     : "memory");
}
__device__ __forceinline__ void named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

/* One warpgroup's rows: running max / sum of its two rows per thread, O, and the tile math. */
struct Rows {
    float O[64];
    float S[32];
    float m[2], l[2];
    uint32_t pa[4][4];

    __device__ void init() {
#pragma unroll
        for (int i = 0; i < 64; ++i) O[i] = 0.0f;
        m[0] = m[1] = -INFINITY;
        l[0] = l[1] = 0.0f;
    }
    /* S = Q K^T of a tile (issued and committed, not waited) */
    __device__ void issue_s(const unsigned char *Q, const unsigned char *K) {
        const uint64_t dq = qllm_sdesc(Q, QLLM_WG_KMAJ_LBO, QLLM_WG_KMAJ_SBO);
        const uint64_t dk = qllm_sdesc(K, QLLM_WG_KMAJ_LBO, QLLM_WG_KMAJ_SBO);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int o = (kk / 4) * 8192 + (kk % 4) * 32;
            wgmma_m64n64k16_ss<T>(S, qllm_sdesc_add(dq, o), qllm_sdesc_add(dk, o), kk > 0);
        }
        wg_commit();
    }
    /* O += P V of a tile from pa (issued and committed) */
    __device__ void issue_pv(const unsigned char *V) {
        const uint64_t dv = qllm_sdesc(V, QLLM_WG_MNMAJ_LBO, QLLM_WG_MNMAJ_SBO);
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) wgmma_m64n128k16_rs<T>(O, pa[kk], qllm_sdesc_add(dv, kk * 16 * 128));
        wg_commit();
    }
    /* online softmax of S (S becomes P); alpha for O; true when some row of the warp rescales.
     * attend.cu's softmax_tile (MI = 1) restated: there it is a lambda inside attn_body, and the
     * two kernels here must run the same math to isolate the pipeline (and compare bitwise) */
    __device__ bool softmax(float sl2, float (&alpha)[2]) {
        bool rescale = false;
        float ref[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float v[16];
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                v[2 * nt] = S[nt * 4 + 2 * i];
                v[2 * nt + 1] = S[nt * 4 + 2 * i + 1];
            }
            float mx = tree16(v, [](float x, float y) { return fmaxf(x, y); });
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float cand = mx * sl2;
            const bool up = cand > m[i] + SLACK;
            const float mn = up ? cand : m[i];
            ref[i] = mn == -INFINITY ? 0.0f : mn;
            alpha[i] = up ? fast_exp2(m[i] - ref[i]) : 1.0f;
            rescale |= up;
            m[i] = mn;
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float v[16];
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const float p = fast_exp2(fmaf(S[nt * 4 + 2 * i + c], sl2, -ref[i]));
                    S[nt * 4 + 2 * i + c] = p;
                    v[2 * nt + c] = p;
                }
            l[i] = l[i] * alpha[i] + tree16(v, [](float x, float y) { return x + y; });
        }
        return __any_sync(0xffffffffu, rescale);
    }
    /* after the wait that retired the previous P V: rescale O, pack P */
    __device__ void rescale_pack(bool rescale, const float (&alpha)[2]) {
        if (rescale) {
#pragma unroll
            for (int dt = 0; dt < 16; ++dt) {
                O[dt * 4 + 0] *= alpha[0];
                O[dt * 4 + 1] *= alpha[0];
                O[dt * 4 + 2] *= alpha[1];
                O[dt * 4 + 3] *= alpha[1];
            }
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            pa[kk][0] = Cvt<T>::pack(S[8 * kk + 0], S[8 * kk + 1]);
            pa[kk][1] = Cvt<T>::pack(S[8 * kk + 2], S[8 * kk + 3]);
            pa[kk][2] = Cvt<T>::pack(S[8 * kk + 4], S[8 * kk + 5]);
            pa[kk][3] = Cvt<T>::pack(S[8 * kk + 6], S[8 * kk + 7]);
        }
    }
    /* rows r0 + (this thread's two rows) of head h into out / lse */
    __device__ void store(T *out, float *lse, int h, int R, int r0, int wtid) {
        const int warp = wtid >> 5, lane = wtid & 31, g = lane >> 2, tq = lane & 3;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float s = l[i];
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            const int r = r0 + warp * 16 + g + 8 * i;
            const float inv = s > 0.0f ? 1.0f / s : 0.0f;
            T *o = out + (static_cast<int64_t>(h) * R + r) * D;
#pragma unroll
            for (int dt = 0; dt < 16; ++dt)
                *reinterpret_cast<uint32_t *>(o + dt * 8 + tq * 2) = Cvt<T>::pack(O[dt * 4 + 2 * i] * inv, O[dt * 4 + 2 * i + 1] * inv);
            if (tq == 0) lse[static_cast<int64_t>(h) * R + r] = s > 0.0f ? m[i] + __log2f(s) : -INFINITY;
        }
    }
};

/* rows [row0, row0 + 64) x 128 of src (row stride D) into a swizzled tile; `threads` threads
 * from `t`, chunk c = t % 16 of rows t / 16 + k * (threads / 16) */
__device__ __forceinline__ void copy_tile(unsigned char *dst, const T *src, int t, int threads) {
    const int ch = t % 16;
    for (int row = t / 16; row < 64; row += threads / 16) cp_async16_all(dst + qllm_swz_off(row, ch * 8), src + row * D + ch * 8);
}

/* ---------------------------------------------------------------- coupled */
__global__ void __launch_bounds__(128, 2) coupled_kernel(const T *q, const T *k, const T *v, int R, int NK, float sl2,
                                                         T *out, float *lse) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char *sm = smem_aligned1024(smem_raw);
    unsigned char *Qs = sm, *Ks = sm + TILE_B, *Vs = sm + 3 * TILE_B;
    const int tid = threadIdx.x, h = blockIdx.y, r0 = blockIdx.x * 64, NT = NK / BN;
    const T *qh = q + (static_cast<int64_t>(h) * R + r0) * D;
    const T *kh = k + static_cast<int64_t>(h / GROUP) * NK * D;
    const T *vh = v + static_cast<int64_t>(h / GROUP) * NK * D;
    Rows w;
    w.init();
    copy_tile(Qs, qh, tid, 128);
    copy_tile(Ks, kh, tid, 128);
    copy_tile(Vs, vh, tid, 128);
    if (NT > 1) copy_tile(Ks + TILE_B, kh + BN * D, tid, 128);
    cp_async_commit();
    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();
    wg_fence();
    w.issue_s(Qs, Ks);
    wg_wait<0>();
    wg_fence_operand(w.S);
    /* every tile but the last: the same wgmma sequence on every pass (under a branch, ptxas
     * serializes the wgmma: NOTES_gpu.md round 6) */
    float alpha[2];
    for (int t = 0; t + 1 < NT; ++t) {
        const bool rs = w.softmax(sl2, alpha);
        wg_wait<0>(); /* P V of tile t-1 */
        wg_fence_operand(w.O);
        w.rescale_pack(rs, alpha);
        cp_async_wait<0>(); /* K of t+1, V of t */
        fence_async_smem();
        __syncthreads(); /* every warp is past S of t (K stage t&1) and P V of t-1 (V stage (t+1)&1) */
        copy_tile(Vs + ((t + 1) & 1) * TILE_B, vh + static_cast<int64_t>(t + 1) * BN * D, tid, 128);
        if (t + 2 < NT) copy_tile(Ks + (t & 1) * TILE_B, kh + static_cast<int64_t>(t + 2) * BN * D, tid, 128);
        cp_async_commit();
        wg_fence();
        w.issue_s(Qs, Ks + ((t + 1) & 1) * TILE_B);
        w.issue_pv(Vs + (t & 1) * TILE_B);
        wg_wait<1>();
        wg_fence_operand(w.S);
    }
    const bool rs = w.softmax(sl2, alpha);
    wg_wait<0>();
    wg_fence_operand(w.O);
    w.rescale_pack(rs, alpha);
    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();
    wg_fence();
    w.issue_pv(Vs + ((NT - 1) & 1) * TILE_B);
    wg_wait<0>();
    wg_fence_operand(w.O);
    w.store(out, lse, h, R, r0, tid);
}

/* --------------------------------------------------------------------- pc */
__global__ void __launch_bounds__(288, 1) pc_kernel(const T *q, const T *k, const T *v, int R, int NK, float sl2,
                                                    T *out, float *lse) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char *sm = smem_aligned1024(smem_raw);
    unsigned char *Qs = sm;                 /* [2] */
    unsigned char *ring = sm + 2 * TILE_B;  /* [NS] x (K, V) */
    uint64_t *full = reinterpret_cast<uint64_t *>(ring + NS * 2 * TILE_B), *empty = full + NS;
    const int tid = threadIdx.x, warp = tid >> 5, h = blockIdx.y, NT = NK / BN;
    const T *kh = k + static_cast<int64_t>(h / GROUP) * NK * D;
    const T *vh = v + static_cast<int64_t>(h / GROUP) * NK * D;
    if (tid == 0) {
        for (int s = 0; s < NS; ++s) {
            mbar_init(&full[s], 32); /* the producer's lanes, each once its copies land */
            mbar_init(&empty[s], 8); /* lane 0 of each consumer warp */
        }
    }
    __syncthreads();
    if (warp == 8) { /* producer */
        const int lane = tid & 31;
        for (int t = 0; t < NT; ++t) {
            const int s = t % NS;
            if (t >= NS) mbar_wait(&empty[s], ((t / NS) - 1) & 1);
            unsigned char *K = ring + s * 2 * TILE_B;
            copy_tile(K, kh + static_cast<int64_t>(t) * BN * D, lane, 32);
            copy_tile(K + TILE_B, vh + static_cast<int64_t>(t) * BN * D, lane, 32);
            mbar_arrive_cp(&full[s]);
        }
        cp_wait_all();
        return;
    }
    const int c = warp >> 2, wtid = tid & 127, r0 = blockIdx.x * 128 + c * 64;
    unsigned char *Q = Qs + c * TILE_B;
    copy_tile(Q, q + (static_cast<int64_t>(h) * R + r0) * D, wtid, 128);
    cp_async_commit();
    cp_async_wait<0>();
    fence_async_smem();
    named_sync(1 + c, 128);
    auto K_of = [&](int t) { return ring + (t % NS) * 2 * TILE_B; };
    auto release = [&](int t) {
        if ((tid & 31) == 0) mbar_arrive(&empty[t % NS]);
    };
    Rows w;
    w.init();
    mbar_wait(&full[0], 0);
    fence_async_smem();
    wg_fence();
    w.issue_s(Q, K_of(0));
    wg_wait<0>();
    wg_fence_operand(w.S);
    float alpha[2];
    for (int t = 0; t + 1 < NT; ++t) {
        const bool rs = w.softmax(sl2, alpha);
        wg_wait<0>(); /* P V of tile t-1: its stage is free */
        wg_fence_operand(w.O);
        if (t > 0) release(t - 1);
        w.rescale_pack(rs, alpha);
        mbar_wait(&full[(t + 1) % NS], ((t + 1) / NS) & 1);
        fence_async_smem();
        wg_fence();
        w.issue_s(Q, K_of(t + 1));
        w.issue_pv(K_of(t) + TILE_B);
        wg_wait<1>();
        wg_fence_operand(w.S);
    }
    const bool rs = w.softmax(sl2, alpha);
    wg_wait<0>();
    wg_fence_operand(w.O);
    if (NT > 1) release(NT - 2);
    w.rescale_pack(rs, alpha);
    wg_fence();
    w.issue_pv(K_of(NT - 1) + TILE_B);
    wg_wait<0>();
    wg_fence_operand(w.O);
    release(NT - 1);
    w.store(out, lse, h, R, r0, wtid);
}

}  // namespace pca

int main(int argc, char **argv) {
    using namespace pca;
    const int R = argc > 1 ? std::atoi(argv[1]) : 512;
    const int NK = argc > 2 ? std::atoi(argv[2]) : 2560;
    if (R < 128 || R % 128 != 0 || NK < pca::BN || NK % pca::BN != 0) {
        std::printf("rows: a multiple of 128; keys: a multiple of 64\n");
        return 2;
    }
    const size_t nq = static_cast<size_t>(HQ) * R * D, nk = static_cast<size_t>(HKV) * NK * D;
    std::vector<T> hq(nq), hk(nk), hv(nk);
    uint32_t st = 12345u;
    auto rnd = [&]() {
        st = st * 1664525u + 1013904223u;
        return (static_cast<float>(st >> 8) / 16777216.0f - 0.5f) * 2.0f;
    };
    for (auto &x : hq) x = __float2bfloat16(rnd());
    for (auto &x : hk) x = __float2bfloat16(rnd());
    for (auto &x : hv) x = __float2bfloat16(rnd());
    T *q, *k, *v, *o1, *o2;
    float *l1, *l2;
    MICRO_CK(cudaMalloc(&q, nq * sizeof(T)));
    MICRO_CK(cudaMalloc(&k, nk * sizeof(T)));
    MICRO_CK(cudaMalloc(&v, nk * sizeof(T)));
    MICRO_CK(cudaMalloc(&o1, nq * sizeof(T)));
    MICRO_CK(cudaMalloc(&o2, nq * sizeof(T)));
    MICRO_CK(cudaMalloc(&l1, static_cast<size_t>(HQ) * R * sizeof(float)));
    MICRO_CK(cudaMalloc(&l2, static_cast<size_t>(HQ) * R * sizeof(float)));
    MICRO_CK(cudaMemcpy(q, hq.data(), nq * sizeof(T), cudaMemcpyHostToDevice));
    MICRO_CK(cudaMemcpy(k, hk.data(), nk * sizeof(T), cudaMemcpyHostToDevice));
    MICRO_CK(cudaMemcpy(v, hv.data(), nk * sizeof(T), cudaMemcpyHostToDevice));
    const float sl2 = 0.08838834764831845f * 1.4426950408889634f; /* 128^-0.5 * log2(e) */
    const size_t smem_c = 5 * TILE_B + 1024, smem_p = (2 + 2 * NS) * TILE_B + 1024 + 2 * NS * sizeof(uint64_t);
    MICRO_CK(cudaFuncSetAttribute(coupled_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_c)));
    MICRO_CK(cudaFuncSetAttribute(pc_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_p)));
    cudaStream_t s;
    MICRO_CK(cudaStreamCreate(&s));
    const dim3 gc(R / 64, HQ), gp(R / 128, HQ);
    auto run_c = [&]() { coupled_kernel<<<gc, 128, smem_c, s>>>(q, k, v, R, NK, sl2, o1, l1); };
    auto run_p = [&]() { pc_kernel<<<gp, 288, smem_p, s>>>(q, k, v, R, NK, sl2, o2, l2); };
    run_c();
    run_p();
    MICRO_CK(cudaStreamSynchronize(s));
    MICRO_CK(cudaGetLastError());
    std::vector<T> a(nq), b(nq);
    std::vector<float> la(static_cast<size_t>(HQ) * R), lb(la.size());
    MICRO_CK(cudaMemcpy(a.data(), o1, nq * sizeof(T), cudaMemcpyDeviceToHost));
    MICRO_CK(cudaMemcpy(b.data(), o2, nq * sizeof(T), cudaMemcpyDeviceToHost));
    MICRO_CK(cudaMemcpy(la.data(), l1, la.size() * sizeof(float), cudaMemcpyDeviceToHost));
    MICRO_CK(cudaMemcpy(lb.data(), l2, lb.size() * sizeof(float), cudaMemcpyDeviceToHost));
    const bool same = std::memcmp(a.data(), b.data(), nq * sizeof(T)) == 0 &&
                      std::memcmp(la.data(), lb.data(), la.size() * sizeof(float)) == 0;
    size_t ndiff = 0;
    for (size_t i = 0; i < nq; ++i) ndiff += std::memcmp(&a[i], &b[i], sizeof(T)) != 0;
    std::printf("rows %d per head x %d heads, %d keys (%d tiles): outputs %s (%zu of %zu elements differ)\n", R, HQ, NK,
                NK / pca::BN, same ? "bitwise equal" : "DIFFER", ndiff, nq);
    const double flop = 4.0 * HQ * static_cast<double>(R) * NK * D;
    for (int rep = 0; rep < 2; ++rep) {
        const float tc = micro::graph_us(run_c, 20, s), tp = micro::graph_us(run_p, 20, s);
        std::printf("coupled %.2f us (%.0f TFLOP/s)   pc %.2f us (%.0f TFLOP/s)   pc/coupled %.3f\n", tc,
                    flop / tc * 1e-6, tp, flop / tp * 1e-6, tp / tc);
    }
    return same ? 0 : 1;
}
