// Shared by the micro-benchmarks: per-launch time of `reps` back-to-back launches captured in
// one CUDA graph (a warm replay first, then the mean over 5 replays), and a CUDA error check
// that exits with the message.
#pragma once

#include <cstdio>
#include <cstdlib>

#define MICRO_CK(x)                                                                             \
    do {                                                                                       \
        const cudaError_t e_ = (x);                                                            \
        if (e_ != cudaSuccess) {                                                               \
            std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
            std::exit(1);                                                                      \
        }                                                                                      \
    } while (0)

namespace micro {
template <typename F>
float graph_us(F launch, int reps, cudaStream_t s) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    MICRO_CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < reps; ++i) launch();
    MICRO_CK(cudaStreamEndCapture(s, &g));
    MICRO_CK(cudaGraphInstantiate(&ge, g, 0));
    MICRO_CK(cudaGraphLaunch(ge, s));
    MICRO_CK(cudaStreamSynchronize(s));
    cudaEvent_t a, b;
    MICRO_CK(cudaEventCreate(&a));
    MICRO_CK(cudaEventCreate(&b));
    MICRO_CK(cudaEventRecord(a, s));
    for (int it = 0; it < 5; ++it) MICRO_CK(cudaGraphLaunch(ge, s));
    MICRO_CK(cudaEventRecord(b, s));
    MICRO_CK(cudaEventSynchronize(b));
    float ms = 0;
    MICRO_CK(cudaEventElapsedTime(&ms, a, b));
    MICRO_CK(cudaEventDestroy(a));
    MICRO_CK(cudaEventDestroy(b));
    MICRO_CK(cudaGraphExecDestroy(ge));
    MICRO_CK(cudaGraphDestroy(g));
    return ms * 1000.0f / (5.0f * reps);
}
}  // namespace micro
