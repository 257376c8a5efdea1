/* Hopper warpgroup MMA (wgmma, sm_90a) helpers: accumulate-only wrappers
 * (scale-d = 1: d += a * b; zero d first), fences, shared-memory matrix
 * descriptors and the 128-byte-swizzled tile layout they read.
 *
 * Tile layout (qllm_swz_off): a [rows x cols] 16-bit tile is stored in column
 * blocks of 64 elements (128 bytes per row, rows * 128 bytes per block), row r
 * of a block at r * 128 bytes, its 16-byte chunk c at chunk c ^ (r % 8).  A
 * tile must start on a 1024-byte boundary.
 *
 * The accumulator fragment of m64nNk16 per thread of the warpgroup: warp w
 * holds rows 16w..16w+15; element 4j + e is row 16w + g + 8 (e / 2), column
 * 8j + 2 tq + (e % 2) (g = lane / 4, tq = lane % 4): the mma.sync m16n8
 * layout, 8-column chunk after chunk.  A from registers (the _rs forms) takes
 * the mma.sync m16n8k16 A fragment of the warp's 16 rows.
 * benchmarks/micro/wgmma_probe.cu checks the layouts and descriptor offsets.
 *
 * Built only for sm_90a (QLLM_CUDA_ARCH=90a): elsewhere the wrappers trap,
 * and the host never launches them (attend.cu, QLLM_SM90A). */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace qllm_cuda {

/* Descriptor offsets (bytes) of the swizzled tiles: K-major operands (Q, K:
 * the head dim contiguous) and MN-major ones (V as the B of P V). */
#ifndef QLLM_WG_KMAJ_LBO
#define QLLM_WG_KMAJ_LBO 16
#endif
#ifndef QLLM_WG_KMAJ_SBO
#define QLLM_WG_KMAJ_SBO 1024
#endif
#ifndef QLLM_WG_MNMAJ_LBO
#define QLLM_WG_MNMAJ_LBO 8192
#endif
#ifndef QLLM_WG_MNMAJ_SBO
#define QLLM_WG_MNMAJ_SBO 1024
#endif

__host__ __device__ __forceinline__ uint32_t qllm_swz_off(int r, int c) {
    return static_cast<uint32_t>((c / 64) * 8192 + r * 128 + (((c % 64) / 8) ^ (r % 8)) * 16 + (c % 8) * 2);
}

/* The same for a tile of `rows` rows (column blocks of rows * 128 bytes). */
__host__ __device__ __forceinline__ uint32_t qllm_swz_off_rows(int rows, int r, int c) {
    return static_cast<uint32_t>((c / 64) * rows * 128 + r * 128 + (((c % 64) / 8) ^ (r % 8)) * 16 + (c % 8) * 2);
}

__device__ __forceinline__ uint64_t qllm_sdesc(const void *p, uint32_t lbo, uint32_t sbo) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    return static_cast<uint64_t>((a & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((lbo >> 4) & 0x3FFFu) << 16) |
           (static_cast<uint64_t>((sbo >> 4) & 0x3FFFu) << 32) | (1ull << 62); /* 128-byte swizzle */
}

/* The descriptor of the address off bytes past that of d (off a multiple of
 * 16): the start address is the field (address >> 4) in bits 0-13, and shared
 * addresses stay below 256 KB, so the sum never carries out of it.  Lets a
 * loop build one descriptor per tile and add constants per k step. */
__device__ __forceinline__ uint64_t qllm_sdesc_add(uint64_t d, uint32_t off) {
    return d + static_cast<uint64_t>(off >> 4);
}

__device__ __forceinline__ void wg_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
/* wait until at most N committed wgmma groups of this warp are pending */
template <int N>
__device__ __forceinline__ void wg_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
/* Pins the registers of a wgmma operand at this point of the program, so the
 * compiler neither reads them before the wait nor moves writes past the issue. */
template <int N>
__device__ __forceinline__ void wg_fence_operand(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
/* ordinary (and cp.async) shared-memory writes -> reads by the tensor cores */
__device__ __forceinline__ void fence_async_smem() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

/* S = A B (acc false) or S += A B: A [64 x 16] and B [N = 64 x 16] from
 * shared memory, both K-major (the reduction dim contiguous: Q and K rows). */
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t da, uint64_t db, bool acc);
/* O += P V: P [64 x 16] from registers, V [16 keys x N = 128] from shared
 * memory, MN-major (the N dim contiguous: V rows). */
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t db);

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QLLM_WG_PRED "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n" /* scale-d = true: accumulate */
#define QLLM_WG_PRED_ARG(N) "{\n.reg .pred p;\nsetp.ne.b32 p, %" #N ", 0;\n" /* scale-d from operand N */
#define QLLM_WGMMA_SS(CT, TY)                                                                              \
    template <>                                                                                            \
    __device__ __forceinline__ void wgmma_m64n64k16_ss<CT>(float (&d)[32], uint64_t da, uint64_t db,       \
                                                           bool acc) {                                     \
        asm volatile(QLLM_WG_PRED_ARG(34) "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY                 \
                     " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                   \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                                                            \
                     : "l"(da), "l"(db), "r"(static_cast<int>(acc)));                                      \
    }
#define QLLM_WGMMA_RS(CT, TY)                                                                              \
    template <>                                                                                            \
    __device__ __forceinline__ void wgmma_m64n128k16_rs<CT>(float (&d)[64], const uint32_t (&a)[4],        \
                                                            uint64_t db) {                                 \
        asm volatile(QLLM_WG_PRED "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY                \
                     " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                     \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                                                                            \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));                              \
    }
#else /* not sm_90a: never launched (the host checks QLLM_SM90A) */
#define QLLM_WGMMA_SS(CT, TY)                                                                              \
    template <>                                                                                            \
    __device__ __forceinline__ void wgmma_m64n64k16_ss<CT>(float (&)[32], uint64_t, uint64_t, bool) {      \
        __trap();                                                                                          \
    }
#define QLLM_WGMMA_RS(CT, TY)                                                                              \
    template <>                                                                                            \
    __device__ __forceinline__ void wgmma_m64n128k16_rs<CT>(float (&)[64], const uint32_t (&)[4], uint64_t) { \
        __trap();                                                                                          \
    }
#endif

QLLM_WGMMA_SS(__nv_bfloat16, "bf16")
QLLM_WGMMA_SS(__half, "f16")
QLLM_WGMMA_RS(__nv_bfloat16, "bf16")
QLLM_WGMMA_RS(__half, "f16")

}  // namespace qllm_cuda
