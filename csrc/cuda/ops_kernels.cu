/*
 * ops_kernels.cu -- CUDA kernels of the generic torch.ops.qllm ops
 * (repr_compute, retrieval_score, retrieval_topk, gather_slots) and the
 * launcher status plumbing.
 *
 * Same results as the C core: selections use the order of common.cuh
 * (higher score first, ties toward the lower index); representatives are
 * summed in selection order in f32 and divided once; block scores are
 * s1 + weight * s2 with f32 sums (summation order differs from the CPU:
 * results agree to f32 rounding).  Inputs are strided views of any float
 * dtype; they are read element by element (these ops are small; the fast
 * path is attend.cu).
 */
#include "common.cuh"

namespace qllm_cuda {

static thread_local char g_msg[512] = "";

int set_error(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_msg, sizeof g_msg, fmt, ap);
    va_end(ap);
    return code;
}

int check_launch(const char *what) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return set_error(QLLM_CUDA_ERR_LAUNCH, "%s: launch failed: %s", what, cudaGetErrorString(e));
    return QLLM_CUDA_OK;
}

namespace {

/* ------------------------------------------------------------ repr_compute */

struct View4 {
    const void *p;
    int dtype;
    int64_t s0, s1, s2, s3;
};

/* One thread block per (block b, query head h): repr_topk rounds of a
 * block-wide best search, then the mean of the selected keys. */
__global__ void repr_compute_kernel(View4 keys, View4 scores, void *out, int out_dtype,
                                    int64_t os0, int64_t os1, int64_t os2, int64_t T, int64_t D,
                                    int k, int group) {
    extern __shared__ int64_t sel[]; /* k selected token indices */
    __shared__ float sh_s[32];
    __shared__ int64_t sh_i[32];
    const int64_t b = blockIdx.x, h = blockIdx.y;
    /* NaN ranks as -inf: with unchecked scores (host_check=False) the order
     * stays total, so every round selects a token (never index -1). */
    block_select_best(
        [&](int64_t t) {
            const float v = load_f32(scores.p, b * scores.s0 + h * scores.s1 + t * scores.s2, scores.dtype);
            return isnan(v) ? -INFINITY : v;
        },
        T, k, [&](int64_t r, int64_t i) { sel[r] = i; }, sh_s, sh_i);
    __syncthreads();
    const int64_t kh = h / group;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (int r = 0; r < k; ++r)
            acc += load_f32(keys.p, b * keys.s0 + kh * keys.s1 + sel[r] * keys.s2 + d * keys.s3,
                            keys.dtype);
        store_f32(out, b * os0 + h * os1 + d * os2, out_dtype, acc / static_cast<float>(k));
    }
}

/* --------------------------------------------------------- retrieval_score */

/* One warp per block: s = sum_{h,d} q.r (+ weight * sum Q.r). */
__global__ void retrieval_score_kernel(const void *reprs, int rd, int64_t rs0, int64_t rs1,
                                       int64_t rs2, const void *query, int qd, int64_t qs0,
                                       int64_t qs1, const void *question, int Qd, int64_t Qs0,
                                       int64_t Qs1, float weight, float *out, int64_t os0,
                                       int64_t nb, int64_t hq, int64_t D) {
    const int lane = threadIdx.x & 31;
    const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (b >= nb) return;
    float s1 = 0.0f, s2 = 0.0f;
    const int64_t n = hq * D;
    for (int64_t x = lane; x < n; x += 32) {
        const int64_t h = x / D, d = x - h * D;
        const float r = load_f32(reprs, b * rs0 + h * rs1 + d * rs2, rd);
        s1 += load_f32(query, h * qs0 + d * qs1, qd) * r;
        if (question != nullptr) s2 += load_f32(question, h * Qs0 + d * Qs1, Qd) * r;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        s1 += __shfl_xor_sync(0xffffffffu, s1, off);
        s2 += __shfl_xor_sync(0xffffffffu, s2, off);
    }
    if (lane == 0) out[b * os0] = question != nullptr ? s1 + weight * s2 : s1;
}

/* ---------------------------------------------------------- retrieval_topk */

/* One thread block; k rounds of a block-wide best search (exact order). */
__global__ void topk_kernel(const float *s, int64_t ss, int64_t n, int64_t k, int32_t *out,
                            int64_t os) {
    __shared__ float sh_s[32];
    __shared__ int64_t sh_i[32];
    block_select_best([&](int64_t i) { return s[i * ss]; }, n, k,
                      [&](int64_t r, int64_t i) { out[r * os] = static_cast<int32_t>(i); }, sh_s, sh_i);
}

/* ------------------------------------------------------------ gather_slots */

template <typename E, typename I>
__global__ void gather_kernel(const E *pool, int64_t p0, int64_t p1, int64_t p2, int64_t p3,
                              const I *slots, int64_t sst, int64_t n, int64_t H, int64_t T,
                              int64_t D, E *out) {
    const int64_t total = H * n * T * D;
    for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
         o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        int64_t r = o;
        const int64_t d = r % D;
        r /= D;
        const int64_t t = r % T;
        r /= T;
        const int64_t i = r % n;
        const int64_t h = r / n;
        const int64_t slot = static_cast<int64_t>(slots[i * sst]);
        out[o] = pool[slot * p0 + h * p1 + t * p2 + d * p3];
    }
}

}  // namespace
}  // namespace qllm_cuda

using namespace qllm_cuda;

extern "C" const char *qllm_cuda_last_error(void) { return g_msg; }

extern "C" int qllm_cuda_repr_compute(const qllm_tensor *keys, const qllm_tensor *scores,
                                      int64_t repr_topk, const qllm_tensor *out,
                                      cudaStream_t stream) {
    const int64_t nb = keys->shape[0], hkv = keys->shape[1], T = keys->shape[2],
                  D = keys->shape[3], hq = scores->shape[1];
    if (nb == 0 || hq == 0 || D == 0) return QLLM_CUDA_OK;
    if (repr_topk < 1 || hkv < 1 || hq % hkv != 0 || T < 1)
        return set_error(QLLM_CUDA_ERR_ARG, "repr_compute: bad sizes");
    if (nb > 2147483647 || hq > 65535)
        return set_error(QLLM_CUDA_ERR_ARG, "repr_compute: grid too large (%lld x %lld)",
                         (long long)nb, (long long)hq);
    const int64_t k = repr_topk < T ? repr_topk : T;
    if (k > 4096) return set_error(QLLM_CUDA_ERR_ARG, "repr_compute: repr_topk %lld > 4096", (long long)k);
    View4 kv{keys->data, keys->dtype, keys->strides[0], keys->strides[1], keys->strides[2],
             keys->strides[3]};
    View4 sv{scores->data, scores->dtype, scores->strides[0], scores->strides[1],
             scores->strides[2], 0};
    dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(hq));
    repr_compute_kernel<<<grid, 128, static_cast<size_t>(k) * sizeof(int64_t), stream>>>(
        kv, sv, out->data, out->dtype, out->strides[0], out->strides[1], out->strides[2], T, D,
        static_cast<int>(k), static_cast<int>(hq / hkv));
    return check_launch("repr_compute_kernel");
}

extern "C" int qllm_cuda_retrieval_score(const qllm_tensor *reprs, const qllm_tensor *query,
                                         const qllm_tensor *question, float weight,
                                         const qllm_tensor *out, cudaStream_t stream) {
    const int64_t nb = reprs->shape[0], hq = reprs->shape[1], D = reprs->shape[2];
    if (nb == 0) return QLLM_CUDA_OK;
    const int warps = 8;
    const int64_t blocks = (nb + warps - 1) / warps;
    if (blocks > 2147483647) return set_error(QLLM_CUDA_ERR_ARG, "retrieval_score: too many blocks");
    retrieval_score_kernel<<<static_cast<unsigned>(blocks), warps * 32, 0, stream>>>(
        reprs->data, reprs->dtype, reprs->strides[0], reprs->strides[1], reprs->strides[2],
        query->data, query->dtype, query->strides[0], query->strides[1],
        question ? question->data : nullptr, question ? question->dtype : 0,
        question ? question->strides[0] : 0, question ? question->strides[1] : 0, weight,
        static_cast<float *>(out->data), out->strides[0], nb, hq, D);
    return check_launch("retrieval_score_kernel");
}

extern "C" int qllm_cuda_retrieval_topk(const qllm_tensor *scores, int64_t k,
                                        const qllm_tensor *out, cudaStream_t stream) {
    const int64_t n = scores->shape[0];
    if (k < 0 || k > n) return set_error(QLLM_CUDA_ERR_ARG, "retrieval_topk: k=%lld, n=%lld",
                                         (long long)k, (long long)n);
    if (k == 0) return QLLM_CUDA_OK;
    topk_kernel<<<1, 1024, 0, stream>>>(static_cast<const float *>(scores->data),
                                        scores->strides[0], n, k,
                                        static_cast<int32_t *>(out->data), out->strides[0]);
    return check_launch("topk_kernel");
}

extern "C" int qllm_cuda_gather_slots(const qllm_tensor *pool, const void *slots, int slots_is_i64,
                                      int64_t n, int64_t slots_stride, void *out,
                                      cudaStream_t stream) {
    const int64_t H = pool->shape[1], T = pool->shape[2], D = pool->shape[3];
    const int64_t total = H * n * T * D;
    if (total == 0) return QLLM_CUDA_OK;
    const int threads = 256;
    int64_t blocks = (total + threads - 1) / threads;
    if (blocks > 65535 * 16) blocks = 65535 * 16;
    const int64_t *st = pool->strides;
    const size_t es = pool->dtype == QLLM_DTYPE_F32 ? 4 : 2;
#define QLLM_GATHER(E, I)                                                                        \
    gather_kernel<E, I><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(                 \
        static_cast<const E *>(pool->data), st[0], st[1], st[2], st[3],                         \
        static_cast<const I *>(slots), slots_stride, n, H, T, D, static_cast<E *>(out))
    if (es == 4) {
        if (slots_is_i64) QLLM_GATHER(uint32_t, int64_t); else QLLM_GATHER(uint32_t, int32_t);
    } else if (es == 2) {
        if (slots_is_i64) QLLM_GATHER(uint16_t, int64_t); else QLLM_GATHER(uint16_t, int32_t);
    } else {
        return set_error(QLLM_CUDA_ERR_ARG, "gather_slots: element size %zu", es);
    }
#undef QLLM_GATHER
    return check_launch("gather_kernel");
}
