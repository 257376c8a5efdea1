// Micro-benchmark of two small decode-step kernels (select_kernel, combine_kernel):
// per-launch time in a CUDA graph of back-to-back launches, against an empty kernel.
// First, select_kernel's ids are checked against a host top-k (descending score,
// ties toward the lower index, ids ascending) on inputs full of ties.
// Build: nvcc -O3 -std=c++20 -arch=sm_90 -Icsrc/include -Icsrc benchmarks/micro/select_combine.cu -o /tmp/msel
#include "../../csrc/cuda/attend.cu"
#include "../../csrc/cuda/ops_kernels.cu"
#include "graph_timer.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <vector>

namespace micro {
__global__ void empty_kernel(int *p) {
    if (p != nullptr && threadIdx.x == 1000) *p = 0;
}
}  // namespace micro

int main() {
    using namespace micro;
    cudaStream_t s;
    cudaStreamCreate(&s);
    const int reps = 200;
    {
        int bad = 0, cases = 0;
        float *d_s;
        int32_t *d_ids;
        cudaMalloc(&d_s, 20000 * sizeof(float));
        cudaMalloc(&d_ids, 4096 * sizeof(int32_t));
        unsigned rng = 12345u;
        for (int n : {1, 7, 64, 255, 256, 257, 1000, 1024, 5000, 12000}) {
            for (int k : {1, 2, 3, 7, 8, 9, 31, 32, 33, 100, 4096}) {
                if (k > n) continue;
                for (int levels : {3, 50, 1 << 30}) {
                    std::vector<float> h(n);
                    for (int i = 0; i < n; ++i) {
                        rng = rng * 1664525u + 1013904223u;
                        const int q = static_cast<int>((rng >> 8) % static_cast<unsigned>(std::min(levels, 1 << 23)));
                        h[i] = (q % 7 == 3 && levels == 50) ? -INFINITY : (q - 20) * 0.37f;
                        if (levels == 3 && i % 5 == 0) h[i] = (i % 10 == 0) ? -0.0f : 0.0f;
                    }
                    std::vector<int> ord(n);
                    std::iota(ord.begin(), ord.end(), 0);
                    std::stable_sort(ord.begin(), ord.end(), [&](int a, int b) { return h[a] > h[b]; });
                    std::vector<int> want(ord.begin(), ord.begin() + k);
                    std::sort(want.begin(), want.end());
                    cudaMemcpy(d_s, h.data(), n * sizeof(float), cudaMemcpyHostToDevice);
                    const bool staged = (n + k) * 4 <= SEL_DYN_SMEM;
                    const size_t smem = (staged ? n * 4 : 0) + k * 4;
                    select_kernel<<<1, SEL_THREADS, smem, s>>>(d_s, n, k, staged, d_ids, nullptr);
                    if (cudaGetLastError() != cudaSuccess) printf("launch failed n=%d k=%d\n", n, k);
                    std::vector<int32_t> got(k);
                    cudaMemcpy(got.data(), d_ids, k * sizeof(int32_t), cudaMemcpyDeviceToHost);
                    ++cases;
                    if (!std::equal(want.begin(), want.end(), got.begin())) {
                        if (bad < 5) printf("MISMATCH n=%d k=%d levels=%d\n", n, k, levels);
                        ++bad;
                    }
                }
            }
        }
        printf("select_kernel check: %d of %d cases wrong\n", bad, cases);
        cudaFree(d_s);
        cudaFree(d_ids);
        if (bad) return 2;
    }
    printf("empty kernel <<<1,256>>>: %.2f us\n", graph_us([&] { empty_kernel<<<1, 256, 0, s>>>(nullptr); }, reps, s));
    float *sc;
    int32_t *ids;
    cudaMalloc(&sc, 65536 * sizeof(float));
    cudaMalloc(&ids, 4096 * sizeof(int32_t));
    std::vector<float> h(65536);
    for (size_t i = 0; i < h.size(); ++i) h[i] = static_cast<float>((i * 2654435761u) % 100003) / 100003.0f;
    cudaMemcpy(sc, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice);
    for (int n : {64, 512, 1024, 2048, 4096, 8192}) {
        for (int k : {1, 8, 32, 100}) {
            const bool staged = (n + k) * 4 <= SEL_DYN_SMEM;
            const size_t smem = (staged ? n * 4 : 0) + k * 4;
            const float us = graph_us([&] { select_kernel<<<1, SEL_THREADS, smem, s>>>(sc, n, k, staged, ids, nullptr); },
                                      reps, s);
            printf("select_kernel n=%5d k=%2d: %.2f us\n", n, k, us);
        }
    }
    float *po, *pl, *lse;
    __nv_bfloat16 *out;
    cudaMalloc(&po, 32 * 32 * 128 * sizeof(float));
    cudaMalloc(&pl, 32 * 32 * sizeof(float));
    cudaMalloc(&lse, 32 * sizeof(float));
    cudaMalloc(&out, 32 * 128 * sizeof(__nv_bfloat16));
    cudaMemset(po, 0, 32 * 32 * 128 * sizeof(float));
    cudaMemset(pl, 0, 32 * 32 * sizeof(float));
    for (int ns : {9, 32}) {
        const float us = graph_us([&] {
            combine_kernel<__nv_bfloat16><<<dim3(1, 32), 128, 0, s>>>(po, pl, ns, 32, 1, 128, out, 128, 128, lse);
        }, reps, s);
        printf("combine_kernel E=1 hq=32 D=128 splits=%d: %.2f us\n", ns, us);
    }
    const cudaError_t e = cudaDeviceSynchronize();
    printf("status: %s\n", cudaGetErrorString(e));
    return e == cudaSuccess ? 0 : 1;
}
