/*
 * fused.cu -- fused elementwise kernels of the model around the attention:
 * Llama-style RMSNorm and the SiLU-gate product of the MLP (qllm/fused.py
 * patches them into the model; bindings in csrc/torch/ops_fused_cuda.cpp).
 *
 * Both reproduce the rounding steps of the Hugging Face / torch code they
 * replace, in the same order, so the results are bitwise those of the
 * unfused model except where noted:
 *
 *   rms_norm   var = fl(sum x^2 * factor)        factor as torch's mean: rows / (rows*H)
 *              r   = rsqrtf(fl(var + eps))
 *              y   = dtype(fl(x * r));  out = dtype(fl(w * y))
 *              Only the order of the f32 sum of squares differs from torch's
 *              reduction (each square is exact: x is f16 / bf16).
 *   silu_mul   s = dtype(g / (1 + expf(-g)));  out = dtype(fl(s * u))
 *              (torch's silu then its multiply; bitwise equal).
 *
 * Multiplies and adds that torch rounds separately use __fmul_rn / __fadd_rn,
 * so -fmad contraction cannot merge them; expf and the division are the
 * IEEE-accurate ones torch uses (no fast math in this build).
 *
 * Layout: rows of a row-major matrix, the last dim contiguous, rows at a
 * stride (in elements).  16-byte vectors (8 elements) when every row starts
 * 16-byte aligned in every operand, the last H % 8 elements of a row then
 * scalar (possible only with one row: otherwise out, stride H, is
 * misaligned); element-wise loads otherwise.  Offsets are int64.
 */
#include <algorithm>

#include "common.cuh"

namespace qllm_cuda {
namespace {

constexpr int kNormThreads = 256; /* threads of every rms_norm CTA */
constexpr int kNormMaxJ = 8;      /* vectors a thread keeps in registers */
constexpr int kMulThreads = 256;

/* ------------------------------------------------------------ 8-wide vectors */

template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t v);
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
    return make_float2(__half2float(__ushort_as_half(static_cast<unsigned short>(v & 0xffffu))),
                       __half2float(__ushort_as_half(static_cast<unsigned short>(v >> 16))));
}
/* bf16 -> f32 is exact: the bits shifted into the high half */
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}

/* 8 elements (one uint4) <-> 8 floats, element 0 at the lowest address */
template <typename T> __device__ __forceinline__ void unpack8(const uint4 &v, float (&f)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 p = unpack2<T>(w[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
    }
}

template <typename T> __device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    uint4 v;
    v.x = Cvt<T>::pack(f[0], f[1]);
    v.y = Cvt<T>::pack(f[2], f[3]);
    v.z = Cvt<T>::pack(f[4], f[5]);
    v.w = Cvt<T>::pack(f[6], f[7]);
    return v;
}

/* ---------------------------------------------------------------- rms_norm */

struct NormArgs {
    const void *x;
    int64_t x_rs;   /* row stride of x (elements) */
    const void *w;  /* [H] */
    void *out;      /* [rows, H] contiguous */
    int64_t rows, H;
    float factor;   /* the mean's factor */
    float eps;
};

/* Sum of v over the TPR threads of a row group, in a fixed order (every
 * thread of the group gets it).  TPR == 32: one warp; TPR == kNormThreads:
 * the whole CTA (red: kNormThreads / 32 floats; every thread must call). */
template <int TPR> __device__ __forceinline__ float row_sum(float v, float *red) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if constexpr (TPR > 32) {
        static_assert(TPR == kNormThreads, "a row group is one warp or the whole CTA");
        __syncthreads(); /* red's previous row is read */
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
        __syncthreads();
        v = red[0];
#pragma unroll
        for (int i = 1; i < TPR / 32; ++i) v += red[i];
    }
    return v;
}

/* r = rsqrt(mean + eps), each step rounded as torch rounds it */
__device__ __forceinline__ float inv_rms(float ss, const NormArgs &a) {
    return rsqrtf(__fadd_rn(__fmul_rn(ss, a.factor), a.eps));
}

/* out = dtype(w * dtype(x * r)) for one element */
template <typename T> __device__ __forceinline__ float norm_out(float x, float r, float w) {
    const float y = Cvt<T>::to_f(Cvt<T>::from_f(__fmul_rn(x, r)));
    return __fmul_rn(w, y);
}

/* Vector path: a row group of TPR threads per row (TPR = 32: 8 rows per CTA,
 * H up to 2048 (+7); TPR = 256: one row per CTA, H up to 16384 (+7)).  Thread
 * t keeps vectors t, t + TPR, .. (NJ of them) of its row in registers: x is
 * read once, out written once.  The H % 8 tail elements (one row only, see
 * the file comment) go to threads 0 .. H%8-1. */
template <typename T, int TPR, int NJ>
__global__ void __launch_bounds__(kNormThreads) rms_norm_vec_kernel(NormArgs a) {
    constexpr int RPC = kNormThreads / TPR;
    __shared__ float red[kNormThreads / 32];
    const int t = threadIdx.x % TPR;
    const int64_t nv = a.H >> 3;
    const int tail = static_cast<int>(a.H - (nv << 3));
    const uint4 *w8 = static_cast<const uint4 *>(a.w);
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * RPC + threadIdx.x / TPR; row < a.rows;
         row += static_cast<int64_t>(gridDim.x) * RPC) {
        const T *xr = static_cast<const T *>(a.x) + row * a.x_rs;
        const uint4 *x8 = reinterpret_cast<const uint4 *>(xr);
        uint4 xv[NJ];
        float ss = 0.0f;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const int64_t v = t + j * TPR;
            xv[j] = v < nv ? x8[v] : make_uint4(0u, 0u, 0u, 0u);
        }
        float xt = 0.0f;
        if (t < tail) xt = Cvt<T>::to_f(xr[(nv << 3) + t]);
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            if (t + j * TPR < nv) {
                float f[8];
                unpack8<T>(xv[j], f);
#pragma unroll
                for (int i = 0; i < 8; ++i) ss = fmaf(f[i], f[i], ss); /* squares are exact */
            }
        }
        ss = fmaf(xt, xt, ss);
        const float r = inv_rms(row_sum<TPR>(ss, red), a);
        T *orow = static_cast<T *>(a.out) + row * a.H;
        uint4 *o8 = reinterpret_cast<uint4 *>(orow);
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const int64_t v = t + j * TPR;
            if (v < nv) {
                float f[8], wf[8];
                unpack8<T>(xv[j], f);
                unpack8<T>(w8[v], wf);
#pragma unroll
                for (int i = 0; i < 8; ++i) f[i] = norm_out<T>(f[i], r, wf[i]);
                o8[v] = pack8<T>(f);
            }
        }
        if (t < tail) {
            const int64_t i = (nv << 3) + t;
            const float wt = Cvt<T>::to_f(static_cast<const T *>(a.w)[i]);
            orow[i] = Cvt<T>::from_f(norm_out<T>(xt, r, wt));
        }
    }
}

/* Any alignment / any H: element-wise loads, the row read twice (the second
 * time mostly from L1 / L2).  TPR as above. */
template <typename T, int TPR>
__global__ void __launch_bounds__(kNormThreads) rms_norm_any_kernel(NormArgs a) {
    constexpr int RPC = kNormThreads / TPR;
    __shared__ float red[kNormThreads / 32];
    const int t = threadIdx.x % TPR;
    const T *w = static_cast<const T *>(a.w);
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * RPC + threadIdx.x / TPR; row < a.rows;
         row += static_cast<int64_t>(gridDim.x) * RPC) {
        const T *xr = static_cast<const T *>(a.x) + row * a.x_rs;
        float ss = 0.0f;
        for (int64_t i = t; i < a.H; i += TPR) {
            const float f = Cvt<T>::to_f(xr[i]);
            ss = fmaf(f, f, ss);
        }
        const float r = inv_rms(row_sum<TPR>(ss, red), a);
        T *orow = static_cast<T *>(a.out) + row * a.H;
        for (int64_t i = t; i < a.H; i += TPR)
            orow[i] = Cvt<T>::from_f(norm_out<T>(Cvt<T>::to_f(xr[i]), r, Cvt<T>::to_f(w[i])));
    }
}

template <typename T> int launch_rms_norm(const NormArgs &a, bool vec, cudaStream_t stream) {
    const int64_t nv = a.H >> 3;
    const bool small = vec ? nv <= 32 * kNormMaxJ : a.H <= 1024;
    const int rpc = small ? kNormThreads / 32 : 1;
    const int64_t grid = std::min<int64_t>((a.rows + rpc - 1) / rpc, 1 << 30);
    const unsigned g = static_cast<unsigned>(grid);
    if (vec && (small || nv <= static_cast<int64_t>(kNormThreads) * kNormMaxJ)) {
        const int tpr = small ? 32 : kNormThreads;
        const int nj = static_cast<int>(std::max<int64_t>((nv + tpr - 1) / tpr, 1));
#define QLLM_NORM_J(TPR, NJ) \
    case NJ: rms_norm_vec_kernel<T, TPR, NJ><<<g, kNormThreads, 0, stream>>>(a); break
#define QLLM_NORM_TPR(TPR)                                                                      \
    switch (nj) {                                                                               \
        QLLM_NORM_J(TPR, 1); QLLM_NORM_J(TPR, 2); QLLM_NORM_J(TPR, 3); QLLM_NORM_J(TPR, 4);     \
        QLLM_NORM_J(TPR, 5); QLLM_NORM_J(TPR, 6); QLLM_NORM_J(TPR, 7); QLLM_NORM_J(TPR, 8);     \
        default: return set_error(QLLM_CUDA_ERR_ARG, "rms_norm: internal: %d vectors per thread", nj); \
    }
        if (small) {
            QLLM_NORM_TPR(32)
        } else {
            QLLM_NORM_TPR(kNormThreads)
        }
#undef QLLM_NORM_TPR
#undef QLLM_NORM_J
        return check_launch("rms_norm_vec_kernel");
    }
    if (small)
        rms_norm_any_kernel<T, 32><<<g, kNormThreads, 0, stream>>>(a);
    else
        rms_norm_any_kernel<T, kNormThreads><<<g, kNormThreads, 0, stream>>>(a);
    return check_launch("rms_norm_any_kernel");
}

/* ---------------------------------------------------------------- silu_mul */

struct MulArgs {
    const void *g, *u;
    int64_t g_rs, u_rs; /* row strides (elements) */
    void *out;          /* [rows, cols] contiguous */
    int64_t rows, cols;
};

/* out = dtype(dtype(silu(g)) * u) for one element, torch's steps */
template <typename T> __device__ __forceinline__ float silu_mul_1(float g, float u) {
    const float s = Cvt<T>::to_f(Cvt<T>::from_f(g / (1.0f + expf(-g))));
    return __fmul_rn(s, u);
}

/* VEC: thread i of the x-grid handles vector i of a row (8 elements; the
 * cols % 8 tail, one row only, goes to the first CTA's threads); rows over
 * the y-grid.  !VEC: one element per thread.  Both grid-stride. */
template <typename T, bool VEC> __global__ void __launch_bounds__(kMulThreads) silu_mul_kernel(MulArgs a) {
    constexpr int W = VEC ? 8 : 1;
    const int64_t nv = a.cols / W;
    const int tail = static_cast<int>(a.cols - nv * W);
    const int64_t x0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t xs = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t row = blockIdx.y; row < a.rows; row += gridDim.y) {
        const T *gr = static_cast<const T *>(a.g) + row * a.g_rs;
        const T *ur = static_cast<const T *>(a.u) + row * a.u_rs;
        T *orow = static_cast<T *>(a.out) + row * a.cols;
        for (int64_t v = x0; v < nv; v += xs) {
            if constexpr (VEC) {
                float gf[8], uf[8];
                unpack8<T>(reinterpret_cast<const uint4 *>(gr)[v], gf);
                unpack8<T>(reinterpret_cast<const uint4 *>(ur)[v], uf);
#pragma unroll
                for (int i = 0; i < 8; ++i) gf[i] = silu_mul_1<T>(gf[i], uf[i]);
                reinterpret_cast<uint4 *>(orow)[v] = pack8<T>(gf);
            } else {
                orow[v] = Cvt<T>::from_f(silu_mul_1<T>(Cvt<T>::to_f(gr[v]), Cvt<T>::to_f(ur[v])));
            }
        }
        if (VEC && blockIdx.x == 0 && static_cast<int>(threadIdx.x) < tail) {
            const int64_t i = nv * W + threadIdx.x;
            orow[i] = Cvt<T>::from_f(silu_mul_1<T>(Cvt<T>::to_f(gr[i]), Cvt<T>::to_f(ur[i])));
        }
    }
}

template <typename T> int launch_silu_mul(const MulArgs &a, bool vec, cudaStream_t stream) {
    const int64_t per_row = vec ? a.cols / 8 : a.cols;
    const int64_t bx = std::min<int64_t>(std::max<int64_t>((per_row + kMulThreads - 1) / kMulThreads, 1),
                                         1 << 30);
    const int64_t by = std::min<int64_t>(a.rows, 65535);
    const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(by));
    if (vec)
        silu_mul_kernel<T, true><<<grid, kMulThreads, 0, stream>>>(a);
    else
        silu_mul_kernel<T, false><<<grid, kMulThreads, 0, stream>>>(a);
    return check_launch("silu_mul_kernel");
}

bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace
}  // namespace qllm_cuda

using namespace qllm_cuda;

extern "C" int qllm_cuda_rms_norm(int dtype, const void *x, int64_t x_rs, const void *weight, float eps,
                                  void *out, int64_t rows, int64_t H, cudaStream_t stream) {
    if (dtype != QLLM_DTYPE_F16 && dtype != QLLM_DTYPE_BF16)
        return set_error(QLLM_CUDA_ERR_ARG, "rms_norm: dtype %d is not f16 (1) or bf16 (2)", dtype);
    if (rows < 0 || H < 1 || x_rs < 0)
        return set_error(QLLM_CUDA_ERR_ARG, "rms_norm: bad sizes rows=%lld H=%lld row stride=%lld",
                         (long long)rows, (long long)H, (long long)x_rs);
    if (rows == 0) return QLLM_CUDA_OK;
    NormArgs a;
    a.x = x;
    a.x_rs = x_rs;
    a.w = weight;
    a.out = out;
    a.rows = rows;
    a.H = H;
    /* torch's mean multiplies the sum by float(outputs) / numel (ReduceMomentKernel.cu) */
    a.factor = static_cast<float>(rows) / static_cast<float>(rows * H);
    a.eps = eps;
    const bool vec = aligned16(x) && aligned16(weight) && aligned16(out) &&
                     (rows == 1 || (H % 8 == 0 && x_rs % 8 == 0));
    return dtype == QLLM_DTYPE_F16 ? launch_rms_norm<__half>(a, vec, stream)
                                   : launch_rms_norm<__nv_bfloat16>(a, vec, stream);
}

extern "C" int qllm_cuda_silu_mul(int dtype, const void *gate, int64_t g_rs, const void *up, int64_t u_rs,
                                  void *out, int64_t rows, int64_t cols, cudaStream_t stream) {
    if (dtype != QLLM_DTYPE_F16 && dtype != QLLM_DTYPE_BF16)
        return set_error(QLLM_CUDA_ERR_ARG, "silu_mul: dtype %d is not f16 (1) or bf16 (2)", dtype);
    if (rows < 0 || cols < 0 || g_rs < 0 || u_rs < 0)
        return set_error(QLLM_CUDA_ERR_ARG, "silu_mul: bad sizes rows=%lld cols=%lld", (long long)rows,
                         (long long)cols);
    if (rows == 0 || cols == 0) return QLLM_CUDA_OK;
    MulArgs a;
    a.g = gate;
    a.u = up;
    a.g_rs = g_rs;
    a.u_rs = u_rs;
    a.out = out;
    a.rows = rows;
    a.cols = cols;
    const bool vec = aligned16(gate) && aligned16(up) && aligned16(out) &&
                     (rows == 1 || (cols % 8 == 0 && g_rs % 8 == 0 && u_rs % 8 == 0));
    return dtype == QLLM_DTYPE_F16 ? launch_silu_mul<__half>(a, vec, stream)
                                   : launch_silu_mul<__nv_bfloat16>(a, vec, stream);
}
