/*
 * common.cuh -- device helpers shared by qllm's CUDA kernels (device code;
 * included by .cu files only).
 *
 *   - launcher status: set_error / check_launch (thread-local message)
 *   - dtype-generic scalar loads and stores (f32 / f16 / bf16)
 *   - the (score, index) order of every top-k: higher score first, ties
 *     toward the lower index; a block-wide "best" reduction
 *   - Ampere+/Hopper warp-level MMA helpers: mma.sync m16n8k16 (f16 / bf16 in,
 *     f32 accumulate), ldmatrix, cp.async with zero fill
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#include <cfloat>
#include <climits>

#include "qllm_cuda.cuh"

namespace qllm_cuda {

/* ------------------------------------------------------------ status */

int set_error(int code, const char *fmt, ...);

/* cudaGetLastError after a launch; names the kernel on failure. */
int check_launch(const char *what);

/* ------------------------------------------------------------ dtypes */

__device__ __forceinline__ float load_f32(const void *p, int64_t i, int dtype) {
    if (dtype == QLLM_DTYPE_F32) return static_cast<const float *>(p)[i];
    if (dtype == QLLM_DTYPE_F16) return __half2float(static_cast<const __half *>(p)[i]);
    return __bfloat162float(static_cast<const __nv_bfloat16 *>(p)[i]);
}

__device__ __forceinline__ void store_f32(void *p, int64_t i, int dtype, float v) {
    if (dtype == QLLM_DTYPE_F32)
        static_cast<float *>(p)[i] = v;
    else if (dtype == QLLM_DTYPE_F16)
        static_cast<__half *>(p)[i] = __float2half_rn(v);
    else
        static_cast<__nv_bfloat16 *>(p)[i] = __float2bfloat16_rn(v);
}

/* Typed helpers for the fast path (T = __half or __nv_bfloat16). */
template <typename T> struct Cvt;
template <> struct Cvt<__half> {
    static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
    static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&v);
    }
};
template <> struct Cvt<__nv_bfloat16> {
    static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
    static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&v);
    }
};

/* ------------------------------------------------------------ top-k order */

/* (sa, ia) ranks before (sb, ib): higher score, ties toward the lower index.
 * Index -1 marks "no candidate" and ranks after everything. */
__device__ __forceinline__ bool ranks_before(float sa, int64_t ia, float sb, int64_t ib) {
    if (ia < 0) return false;
    if (ib < 0) return true;
    return sa > sb || (sa == sb && ia < ib);
}

/* Block-wide best (score, index) pair; every thread gets the result.
 * sh_s / sh_i: shared arrays of (blockDim.x / 32) entries.  All threads of
 * the block must call it. */
__device__ __forceinline__ void block_best(float &s, int64_t &i, float *sh_s, int64_t *sh_i) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float so = __shfl_xor_sync(0xffffffffu, s, off);
        const int64_t io = __shfl_xor_sync(0xffffffffu, i, off);
        if (ranks_before(so, io, s, i)) {
            s = so;
            i = io;
        }
    }
    __syncthreads(); /* previous users of sh_s / sh_i are done */
    if (lane == 0) {
        sh_s[warp] = s;
        sh_i[warp] = i;
    }
    __syncthreads();
    s = sh_s[0];
    i = sh_i[0];
    for (int w = 1; w < nw; ++w)
        if (ranks_before(sh_s[w], sh_i[w], s, i)) {
            s = sh_s[w];
            i = sh_i[w];
        }
}

/* k rounds of a block-wide best search over candidates 0..n-1: the r-th round
 * finds the best candidate ranking after the (r-1)-th winner (descending score,
 * ties toward the lower index -- exact top-k order) and hands it to
 * emit(r, index) on thread 0 (index -1 once candidates run out).
 * score(t) returns candidate t's score.  All threads of the block must call it;
 * the caller synchronises before reading what emit wrote to shared memory. */
template <typename ScoreFn, typename EmitFn>
__device__ __forceinline__ void block_select_best(ScoreFn score, int64_t n, int64_t k, EmitFn emit,
                                                  float *sh_s, int64_t *sh_i) {
    float prev_s = 0.0f;
    int64_t prev_i = -1;
    for (int64_t r = 0; r < k; ++r) {
        float best_s = -FLT_MAX;
        int64_t best_i = -1;
        for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
            const float v = score(t);
            if (prev_i >= 0 && !ranks_before(prev_s, prev_i, v, t)) continue;
            if (ranks_before(v, t, best_s, best_i)) {
                best_s = v;
                best_i = t;
            }
        }
        block_best(best_s, best_i, sh_s, sh_i);
        if (threadIdx.x == 0) emit(r, best_i);
        prev_s = best_s;
        prev_i = best_i;
    }
}

/* ------------------------------------------------------------ MMA helpers */

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                       uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/* Four 8x8 b16 matrices; lane l supplies the row address of matrix l/8. */
__device__ __forceinline__ void ldsm_x4(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3,
                                        const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3,
                                          const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p)));
}

/* 2^x on the special-function unit (flush to zero; 2^-inf = 0): the
 * attention and token-score exponents, already in the log2 domain */
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* 16-byte async copy global -> shared; zero-fills when !valid (src unread). */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(n));
}
/* cp_async16 of 16 live bytes (no source-size operand) */
__device__ __forceinline__ void cp_async16_all(void *dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace qllm_cuda
