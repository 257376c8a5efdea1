// Probe for a wgmma (sm_90a) attention kernel: checks the shared-memory
// layouts and matrix descriptors the two products of one attention tile
// need, against a host reference, and times the tensor-core rate of a
// warpgroup issuing them from resident tiles.
//   S = Q K^T : m64n64k16, A = Q [64 x 128] and B = K [64 keys x 128] from shared
//               memory, both K-major (head dim contiguous), 128-byte swizzle;
//   O = P V   : m64n128k16, A = P [64 x 64 keys] from registers (the mma.sync
//               A-fragment layout), B = V [64 keys x 128] from shared memory,
//               MN-major (head dim contiguous), 128-byte swizzle.
// Physical layout of every tile: 64-element column blocks of 8 KB, row r at
// r * 128 bytes, 16-byte chunk c stored at chunk c ^ (r % 8).
// For each candidate (leading, stride) byte offset pair it prints PASS/FAIL,
// so the attention kernel can be written against the pair that passes.
// The descriptor offsets that pass go into csrc/cuda/wgmma.cuh (QLLM_WG_*).
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a benchmarks/micro/wgmma_probe.cu -o /tmp/wgp
#include <cuda_bf16.h>
#include <cstdint>
#include <cstdio>
#include <cmath>
#include <vector>

#include "../../csrc/cuda/wgmma.cuh"

namespace probe {

using namespace qllm_cuda;

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&v);
}

/* S += Q K^T over the head dim (8 k-steps of 16: 32 bytes within a 64-column block) */
__device__ __forceinline__ void qk_tile(float (&S)[32], const unsigned char *Qs, const unsigned char *Ks, uint32_t lbo,
                                        uint32_t sbo) {
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        const int off = (kk / 4) * 8192 + (kk % 4) * 32;
        wgmma_m64n64k16_ss<__nv_bfloat16>(S, qllm_sdesc(Qs + off, lbo, sbo), qllm_sdesc(Ks + off, lbo, sbo), true);
    }
    wg_commit();
    wg_wait<0>();
}

/* O += P V over 64 keys (4 k-steps of 16 rows of 128 bytes) */
__device__ __forceinline__ void pv_tile(float (&O)[64], const uint32_t (&a)[4][4], const unsigned char *Vs, uint32_t lbo,
                                        uint32_t sbo) {
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_m64n128k16_rs<__nv_bfloat16>(O, a[kk], qllm_sdesc(Vs + kk * 16 * 128, lbo, sbo));
    wg_commit();
    wg_wait<0>();
}

/* one warpgroup: raw accumulators out, [128 threads][32] and [128][64] */
__global__ void __launch_bounds__(128) check_kernel(const __nv_bfloat16 *q, const __nv_bfloat16 *k,
                                                    const __nv_bfloat16 *v, const float *p, uint32_t lbo_a,
                                                    uint32_t sbo_a, uint32_t lbo_v, uint32_t sbo_v, float *s_out,
                                                    float *o_out) {
    extern __shared__ __align__(1024) unsigned char sm[];
    unsigned char *Qs = sm, *Ks = sm + 16384, *Vs = sm + 32768;
    const int tid = threadIdx.x;
    for (int e = tid; e < 64 * 16; e += 128) { /* 16-byte chunks */
        const int r = e / 16, c = (e % 16) * 8;
        *reinterpret_cast<uint4 *>(Qs + qllm_swz_off(r, c)) = *reinterpret_cast<const uint4 *>(q + r * 128 + c);
        *reinterpret_cast<uint4 *>(Ks + qllm_swz_off(r, c)) = *reinterpret_cast<const uint4 *>(k + r * 128 + c);
        *reinterpret_cast<uint4 *>(Vs + qllm_swz_off(r, c)) = *reinterpret_cast<const uint4 *>(v + r * 128 + c);
    }
    fence_async_smem();
    __syncthreads();
    float S[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) S[i] = 0.0f;
    qk_tile(S, Qs, Ks, lbo_a, sbo_a);
#pragma unroll
    for (int i = 0; i < 32; ++i) s_out[tid * 32 + i] = S[i];

    const int warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
    const int r = warp * 16 + g;
    float O[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) O[i] = 0.0f;
    uint32_t a[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        const int c0 = kk * 16 + tq * 2;
        a[kk][0] = pack_bf16(p[r * 64 + c0], p[r * 64 + c0 + 1]);
        a[kk][1] = pack_bf16(p[(r + 8) * 64 + c0], p[(r + 8) * 64 + c0 + 1]);
        a[kk][2] = pack_bf16(p[r * 64 + c0 + 8], p[r * 64 + c0 + 9]);
        a[kk][3] = pack_bf16(p[(r + 8) * 64 + c0 + 8], p[(r + 8) * 64 + c0 + 9]);
    }
    pv_tile(O, a, Vs, lbo_v, sbo_v);
#pragma unroll
    for (int i = 0; i < 64; ++i) o_out[tid * 64 + i] = O[i];
}

/* rate: iters x (S = Q K^T, O += P V) on resident tiles, one warpgroup per CTA */
__global__ void __launch_bounds__(128) rate_kernel(int iters, uint32_t lbo_a, uint32_t sbo_a, uint32_t lbo_v,
                                                   uint32_t sbo_v, float *sink) {
    extern __shared__ __align__(1024) unsigned char sm[];
    unsigned char *Qs = sm, *Ks = sm + 16384, *Vs = sm + 32768;
    for (int e = threadIdx.x; e < 3 * 16384 / 16; e += 128) reinterpret_cast<uint4 *>(sm)[e] = make_uint4(0, 0, 0, 0);
    fence_async_smem();
    __syncthreads();
    float S[32], O[64];
#pragma unroll
    for (int i = 0; i < 32; ++i) S[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < 64; ++i) O[i] = 0.0f;
    for (int it = 0; it < iters; ++it) {
        qk_tile(S, Qs, Ks, lbo_a, sbo_a);
        uint32_t a[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
            for (int j = 0; j < 4; ++j) a[kk][j] = pack_bf16(S[kk * 8 + 2 * j], S[kk * 8 + 2 * j + 1]);
        pv_tile(O, a, Vs, lbo_v, sbo_v);
    }
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < 64; ++i) acc += O[i];
    if (acc == 12345.0f) sink[threadIdx.x] = acc;
}

/* accumulator element i of thread t (warpgroup) -> (row, col), the mma.sync-style layout */
inline void acc_rc(int t, int i, int &row, int &col) {
    const int w = t / 32, l = t % 32;
    row = w * 16 + l / 4 + 8 * ((i / 2) % 2);
    col = (i / 4) * 8 + (l % 4) * 2 + (i % 2);
}

}  // namespace probe

int main() {
    using namespace probe;
    int dev = 0;
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, dev);
    printf("device: %s, sm_%d%d, %d SMs\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
    const size_t smem = 3 * 16384;
    cudaFuncSetAttribute(check_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    cudaFuncSetAttribute(rate_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    std::vector<__nv_bfloat16> hq(64 * 128), hk(64 * 128), hv(64 * 128);
    std::vector<float> fq(64 * 128), fk(64 * 128), fv(64 * 128), hp(64 * 64), fp(64 * 64);
    unsigned rng = 7u;
    auto rnd = [&]() { rng = rng * 1664525u + 1013904223u; return static_cast<float>((rng >> 9) % 2001) / 1000.0f - 1.0f; };
    for (int i = 0; i < 64 * 128; ++i) {
        hq[i] = __float2bfloat16(rnd()); fq[i] = __bfloat162float(hq[i]);
        hk[i] = __float2bfloat16(rnd()); fk[i] = __bfloat162float(hk[i]);
        hv[i] = __float2bfloat16(rnd()); fv[i] = __bfloat162float(hv[i]);
    }
    for (int i = 0; i < 64 * 64; ++i) { hp[i] = rnd(); fp[i] = __bfloat162float(__float2bfloat16(hp[i])); }
    std::vector<double> refS(64 * 64), refO(64 * 128);
    for (int r = 0; r < 64; ++r)
        for (int c = 0; c < 64; ++c) {
            double a = 0; for (int d = 0; d < 128; ++d) a += double(fq[r * 128 + d]) * fk[c * 128 + d];
            refS[r * 64 + c] = a;
        }
    for (int r = 0; r < 64; ++r)
        for (int d = 0; d < 128; ++d) {
            double a = 0; for (int j = 0; j < 64; ++j) a += double(fp[r * 64 + j]) * fv[j * 128 + d];
            refO[r * 128 + d] = a;
        }
    __nv_bfloat16 *dq, *dk, *dv; float *dp, *ds, *dout, *sink;
    cudaMalloc(&dq, 64 * 128 * 2); cudaMalloc(&dk, 64 * 128 * 2); cudaMalloc(&dv, 64 * 128 * 2);
    cudaMalloc(&dp, 64 * 64 * 4); cudaMalloc(&ds, 128 * 32 * 4); cudaMalloc(&dout, 128 * 64 * 4); cudaMalloc(&sink, 4096);
    cudaMemcpy(dq, hq.data(), 64 * 128 * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dk, hk.data(), 64 * 128 * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dv, hv.data(), 64 * 128 * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dp, hp.data(), 64 * 64 * 4, cudaMemcpyHostToDevice);
    const uint32_t cand[][2] = {{16, 1024}, {8192, 1024}, {1024, 8192}, {1024, 16}, {2048, 1024}, {1024, 2048}};
    const int nc = sizeof(cand) / sizeof(cand[0]);
    int ok_a = -1, ok_v = -1;
    for (int ca = 0; ca < nc; ++ca)
        for (int cv = 0; cv < nc; ++cv) {
            cudaMemset(ds, 0, 128 * 32 * 4);
            cudaMemset(dout, 0, 128 * 64 * 4);
            check_kernel<<<1, 128, smem>>>(dq, dk, dv, dp, cand[ca][0], cand[ca][1], cand[cv][0], cand[cv][1], ds, dout);
            const cudaError_t e = cudaDeviceSynchronize();
            if (e != cudaSuccess) { printf("launch error %s (candidate %d/%d): stopping\n", cudaGetErrorString(e), ca, cv); return 1; }
            std::vector<float> s(128 * 32), o(128 * 64);
            cudaMemcpy(s.data(), ds, s.size() * 4, cudaMemcpyDeviceToHost);
            cudaMemcpy(o.data(), dout, o.size() * 4, cudaMemcpyDeviceToHost);
            double es = 0, eo = 0;
            for (int t = 0; t < 128; ++t) {
                for (int i = 0; i < 32; ++i) { int r, c; acc_rc(t, i, r, c); es = std::fmax(es, std::fabs(s[t * 32 + i] - refS[r * 64 + c])); }
                for (int i = 0; i < 64; ++i) { int r, c; acc_rc(t, i, r, c); eo = std::fmax(eo, std::fabs(o[t * 64 + i] - refO[r * 128 + c])); }
            }
            const bool pa = es < 1e-2, pv = eo < 1e-2;
            if (cv == 0) printf("S = Q K^T, K-major SW128, LBO %5u SBO %5u: max err %.3g %s\n", cand[ca][0], cand[ca][1], es, pa ? "PASS" : "FAIL");
            if (ca == 0 || (pa && ok_a < 0)) printf("  O = P V, V MN-major SW128, LBO %5u SBO %5u: max err %.3g %s\n", cand[cv][0], cand[cv][1], eo, pv ? "PASS" : "FAIL");
            if (pa && ok_a < 0) ok_a = ca;
            if (pv && ok_v < 0) ok_v = cv;
        }
    printf("result: QK descriptor %s, PV descriptor %s\n", ok_a >= 0 ? "found" : "NOT found", ok_v >= 0 ? "found" : "NOT found");
    if (ok_a >= 0 && ok_v >= 0) {
        cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
        for (int per_sm : {1, 2, 3, 4}) {
            const int grid = prop.multiProcessorCount * per_sm, iters = 2000;
            rate_kernel<<<grid, 128, smem>>>(10, cand[ok_a][0], cand[ok_a][1], cand[ok_v][0], cand[ok_v][1], sink);
            cudaEventRecord(a);
            rate_kernel<<<grid, 128, smem>>>(iters, cand[ok_a][0], cand[ok_a][1], cand[ok_v][0], cand[ok_v][1], sink);
            cudaEventRecord(b); cudaEventSynchronize(b);
            float ms = 0; cudaEventElapsedTime(&ms, a, b);
            const double flop = double(grid) * iters * (64.0 * 64 * 128 * 2 + 64.0 * 128 * 64 * 2);
            printf("rate, %d warpgroup(s) per SM, no loads, S then PV serialized: %.0f TFLOP/s\n", per_sm, flop / ms / 1e9);
        }
    }
    const cudaError_t e = cudaDeviceSynchronize();
    printf("status: %s\n", cudaGetErrorString(e));
    return (e == cudaSuccess && ok_a >= 0 && ok_v >= 0) ? 0 : 2;
}
