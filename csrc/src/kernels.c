/*
 * kernels.c -- row kernels of the core: dtype conversion of strided rows,
 * f32 dot products and accumulation.
 *
 * Every loop on a unit-stride row is written so that gcc vectorises it at
 * -O3 without -ffast-math (check with `make vec-report`):
 *   - conversions are branch-free bit manipulation;
 *   - reductions keep QLLM_LANES independent partial sums (one vector lane
 *     each), reduced in a fixed tree at the end, so the result does not depend
 *     on the vector width, the thread count or the caller -- only on n.
 * Strided rows take a plain scalar loop.
 */
#include <float.h>
#include <math.h>
#include <string.h>

#include "qllm_internal.h"

#define QLLM_LANES 16

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* f16 -> f32, exact and branch-free (vectorisable).  Normal numbers: shift
 * exponent and mantissa into place with the exponent rebiased by +224 and
 * rescale by 2^-112 (exact); Inf/NaN come out of the rescale as Inf/NaN.
 * Subnormals (and zero): the float 0.5 + man * 2^-24, built with a magic
 * exponent, minus 0.5 (exact). */
static inline float h2f(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = f32_from_bits((two_w >> 4) + (0xe0u << 23)) * 0x1.0p-112f;
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t sub = 0u - (uint32_t)(two_w < (1u << 27)); /* all ones for subnormals */
    const uint32_t mag = (f32_bits(denormalized) & sub) | (f32_bits(normalized) & ~sub);
    return f32_from_bits(sign | mag);
}

static inline float b2f(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

/* f32 -> bf16, nearest even, branch-free (vectorisable); NaN -> quiet NaN. */
static inline uint16_t f2b(float f) {
    const uint32_t x = f32_bits(f);
    const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    const uint32_t quiet = (x >> 16) | 0x40u;
    return (uint16_t)((x & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

/* f32 -> f16, nearest even, branch-free (vectorisable); bitwise equal to
 * qllm_f32_to_f16.  Normal results: rebias and round on the integer bits;
 * subnormal results: add a magic float whose ulp is the f16 subnormal step
 * (2^-24), letting the FPU round to nearest even; >= 65520: Inf; NaN: quiet,
 * top payload bits kept. */
static inline uint16_t f2h(float f) {
    const uint32_t x = f32_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    const uint32_t norm = (ax - 0x38000000u + 0xfffu + ((ax >> 13) & 1u)) >> 13;
    const uint32_t magic = 0x3f000000u; /* 0.5f: ulp 2^-24 */
    const uint32_t sub = f32_bits(f32_from_bits(ax) + f32_from_bits(magic)) - magic;
    const uint32_t nan = 0x7e00u | ((ax >> 13) & 0x3ffu);
    const uint32_t is_sub = 0u - (uint32_t)(ax < 0x38800000u);
    const uint32_t is_inf = 0u - (uint32_t)(ax >= 0x47800000u);
    const uint32_t is_nan = 0u - (uint32_t)(ax > 0x7f800000u);
    uint32_t r = (sub & is_sub) | (norm & ~is_sub);
    r = (0x7c00u & is_inf) | (r & ~is_inf);
    r = (nan & is_nan) | (r & ~is_nan);
    return (uint16_t)(sign | r);
}

/* Convert a strided row of f32 | f16 | bf16 to contiguous f32. */
void qllm_row_to_f32(const void *src, qllm_dtype dtype, int64_t stride, int64_t n,
                     float *restrict dst) {
    if (n <= 0)
        return;
    if (dtype == QLLM_DTYPE_F32) {
        const float *s = (const float *)src;
        if (stride == 1) {
            memcpy(dst, s, (size_t)n * sizeof *dst);
        } else {
            for (int64_t i = 0; i < n; ++i)
                dst[i] = s[i * stride];
        }
    } else if (dtype == QLLM_DTYPE_F16) {
        const uint16_t *restrict s = (const uint16_t *)src;
        if (stride == 1) {
            for (int64_t i = 0; i < n; ++i)
                dst[i] = h2f(s[i]);
        } else {
            for (int64_t i = 0; i < n; ++i)
                dst[i] = h2f(s[i * stride]);
        }
    } else {
        const uint16_t *restrict s = (const uint16_t *)src;
        if (stride == 1) {
            for (int64_t i = 0; i < n; ++i)
                dst[i] = b2f(s[i]);
        } else {
            for (int64_t i = 0; i < n; ++i)
                dst[i] = b2f(s[i * stride]);
        }
    }
}

/* Round a contiguous f32 row into a strided row of f32 | f16 | bf16.  With a
 * stride of 0 the elements are written in order (the last one stays). */
void qllm_row_from_f32(const float *restrict src, void *dst, qllm_dtype dtype, int64_t stride,
                       int64_t n) {
    if (n <= 0)
        return;
    if (dtype == QLLM_DTYPE_F32) {
        float *d = (float *)dst;
        if (stride == 1) {
            memcpy(d, src, (size_t)n * sizeof *d);
        } else {
            for (int64_t i = 0; i < n; ++i)
                d[i * stride] = src[i];
        }
    } else if (dtype == QLLM_DTYPE_F16) {
        uint16_t *restrict d = (uint16_t *)dst;
        if (stride == 1) {
            for (int64_t i = 0; i < n; ++i)
                d[i] = f2h(src[i]);
        } else {
            for (int64_t i = 0; i < n; ++i)
                d[i * stride] = f2h(src[i]);
        }
    } else {
        uint16_t *restrict d = (uint16_t *)dst;
        if (stride == 1) {
            for (int64_t i = 0; i < n; ++i)
                d[i] = f2b(src[i]);
        } else {
            for (int64_t i = 0; i < n; ++i)
                d[i * stride] = f2b(src[i]);
        }
    }
}

/* Copy n elements of esize (2 or 4) bytes between strided rows. */
void qllm_row_copy(const void *src, int64_t src_stride, void *dst, int64_t dst_stride,
                   int64_t n, size_t esize) {
    if (n <= 0)
        return;
    if (src_stride == 1 && dst_stride == 1) {
        memmove(dst, src, (size_t)n * esize);
    } else if (esize == 4) {
        const uint32_t *s = (const uint32_t *)src;
        uint32_t *d = (uint32_t *)dst;
        for (int64_t i = 0; i < n; ++i)
            d[i * dst_stride] = s[i * src_stride];
    } else {
        const uint16_t *s = (const uint16_t *)src;
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; ++i)
            d[i * dst_stride] = s[i * src_stride];
    }
}

/* Index of the first NaN/Inf among s[i * stride], i < n, or -1. */
int64_t qllm_find_nonfinite_f32(const float *s, int64_t stride, int64_t n) {
    if (stride == 1) { /* vectorised any-reduction first: the common case is "none" */
        int bad = 0;
        for (int64_t i = 0; i < n; ++i)
            bad |= !(fabsf(s[i]) <= FLT_MAX);
        if (!bad)
            return -1;
    }
    for (int64_t i = 0; i < n; ++i)
        if (!isfinite(s[i * stride]))
            return i;
    return -1;
}

/* Fixed-tree reduction of the lanes. */
static inline float lanes_sum(float *acc) {
    for (int w = QLLM_LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; ++j)
            acc[j] += acc[j + w];
    return acc[0];
}

/* Dot product in f32 over QLLM_LANES interleaved partial sums. */
float qllm_dot_f32(const float *restrict a, const float *restrict b, int64_t n) {
    float acc[QLLM_LANES] = {0};
    int64_t i = 0;
    for (; i + QLLM_LANES <= n; i += QLLM_LANES)
        for (int j = 0; j < QLLM_LANES; ++j)
            acc[j] += a[i + j] * b[i + j];
    for (int j = 0; i < n; ++i, ++j)
        acc[j] += a[i] * b[i];
    return lanes_sum(acc);
}

/* acc += x. */
void qllm_add_f32(float *restrict acc, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        acc[i] += x[i];
}

/* x /= d. */
void qllm_div_f32(float *restrict x, float d, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        x[i] = x[i] / d;
}
