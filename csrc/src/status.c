/*
 * status.c -- last error, status / dtype names, scalar f16 / bf16 conversions,
 * tensor validation.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qllm_internal.h"

/* ------------------------------------------------------------------ errors */

static _Thread_local char g_last_error[512];

/* Message of the last failed call on this thread ("" if none). */
const char *qllm_last_error(void) { return g_last_error; }

/* Format the thread-local last-error message and return status. */
qllm_status qllm_error_set(qllm_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_last_error, sizeof g_last_error, fmt, ap);
    va_end(ap);
    return status;
}

/* Static name of a status code. */
const char *qllm_status_str(qllm_status status) {
    switch (status) {
    case QLLM_OK: return "QLLM_OK";
    case QLLM_ERR_INVALID_ARG: return "QLLM_ERR_INVALID_ARG";
    case QLLM_ERR_NOMEM: return "QLLM_ERR_NOMEM";
    case QLLM_ERR_NOT_FOUND: return "QLLM_ERR_NOT_FOUND";
    case QLLM_ERR_NONFINITE: return "QLLM_ERR_NONFINITE";
    case QLLM_ERR_CAPACITY: return "QLLM_ERR_CAPACITY";
    case QLLM_ERR_INTERNAL: return "QLLM_ERR_INTERNAL";
    }
    return "QLLM_ERR_UNKNOWN";
}

/* ------------------------------------------------------------------ dtypes */

/* Bytes per element of a dtype; 0 for an unknown value. */
size_t qllm_dtype_size(qllm_dtype dtype) {
    switch (dtype) {
    case QLLM_DTYPE_F32: return 4;
    case QLLM_DTYPE_F16: return 2;
    case QLLM_DTYPE_BF16: return 2;
    case QLLM_DTYPE_I32: return 4;
    }
    return 0;
}

/* Static name of a dtype ("f32", "f16", "bf16", "i32"; "unknown" otherwise). */
const char *qllm_dtype_str(qllm_dtype dtype) {
    switch (dtype) {
    case QLLM_DTYPE_F32: return "f32";
    case QLLM_DTYPE_F16: return "f16";
    case QLLM_DTYPE_BF16: return "bf16";
    case QLLM_DTYPE_I32: return "i32";
    }
    return "unknown";
}

/* ------------------------------------------------------- scalar conversions */

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* f16 bits -> f32 (exact; NaN payloads kept, subnormals normalised). */
float qllm_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: value = man * 2^-24, normalise */
            uint32_t e = 113; /* biased f32 exponent of 2^-14, less one per shift */
            while ((man & 0x400u) == 0) {
                man <<= 1;
                e--;
            }
            bits = sign | (e << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    return f32_from_bits(bits);
}

/* f32 -> f16 bits, round to nearest even; overflow -> Inf, NaN stays NaN (quiet). */
uint16_t qllm_f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) /* NaN: quiet, keep the top payload bits */
        return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x47800000u) /* >= 2^16 (or Inf): Inf */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) { /* below 2^-14: f16 subnormal or zero */
        if (ax <= 0x33000000u) /* <= 2^-25: rounds to zero (2^-25 is a tie -> even) */
            return sign;
        uint32_t e = ax >> 23;                /* 102 .. 112 */
        uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e;            /* 14 .. 24: value / 2^-24 = m >> shift */
        uint32_t q = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u)))
            q++; /* may carry into the smallest normal: still the right encoding */
        return (uint16_t)(sign | q);
    }
    uint32_t r = ax - 0x38000000u; /* rebias the exponent: 127 - 15 = 112 */
    uint32_t q = r >> 13;
    uint32_t rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u)))
        q++; /* a carry into exponent 31 gives 0x7c00 = Inf, as it should */
    return (uint16_t)(sign | q);
}

/* bf16 bits -> f32 (exact). */
float qllm_bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

/* f32 -> bf16 bits, round to nearest even; NaN stays NaN (quiet). */
uint16_t qllm_f32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x0040u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

/* ------------------------------------------------------------------ tensors */

static const char *mask_desc(unsigned mask) {
    if (mask == QLLM_FLOAT_DTYPES)
        return "f32, f16 or bf16";
    if (mask == QLLM_DTYPE_BIT(QLLM_DTYPE_F32))
        return "f32";
    if (mask == QLLM_DTYPE_BIT(QLLM_DTYPE_F16))
        return "f16";
    if (mask == QLLM_DTYPE_BIT(QLLM_DTYPE_BF16))
        return "bf16";
    if (mask == QLLM_DTYPE_BIT(QLLM_DTYPE_I32))
        return "i32";
    return "a supported dtype";
}

/* Validate a tensor argument (see qllm_internal.h). */
qllm_status qllm_tensor_check(const qllm_tensor *t, const char *name, int32_t ndim,
                              const char *dims, unsigned dtype_mask) {
    if (t == NULL)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "%s: must not be NULL", name);
    if (t->ndim != ndim)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "%s: expected %d dims (%s), got %d", name,
                              (int)ndim, dims, (int)t->ndim);
    int dt = (int)t->dtype;
    if (dt < 0 || dt > (int)QLLM_DTYPE_I32 || (dtype_mask & (1u << dt)) == 0) {
        if (qllm_dtype_size(t->dtype) == 0)
            return qllm_error_set(QLLM_ERR_INVALID_ARG, "%s: expected dtype %s, got unknown dtype %d",
                                  name, mask_desc(dtype_mask), dt);
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "%s: expected dtype %s, got %s", name,
                              mask_desc(dtype_mask), qllm_dtype_str(t->dtype));
    }
    int64_t numel = 1, max_off = 0;
    int overflow = 0;
    for (int32_t i = 0; i < ndim; ++i) {
        if (t->shape[i] < 0)
            return qllm_error_set(QLLM_ERR_INVALID_ARG, "%s: dim %d has negative size %" PRId64,
                                  name, (int)i, t->shape[i]);
        if (t->strides[i] < 0)
            return qllm_error_set(QLLM_ERR_INVALID_ARG,
                                  "%s: stride of dim %d is %" PRId64 ", expected >= 0", name,
                                  (int)i, t->strides[i]);
    }
    for (int32_t i = 0; i < ndim; ++i) {
        int64_t n = t->shape[i];
        if (n == 0) {
            numel = 0;
            continue;
        }
        if (numel != 0 && n > INT64_MAX / numel)
            overflow = 1;
        else
            numel *= n;
    }
    if (numel != 0) {
        for (int32_t i = 0; i < ndim; ++i) {
            int64_t span = t->shape[i] - 1, st = t->strides[i];
            if (st != 0 && span > (QLLM_MAX_ELEM_OFFSET - max_off) / st) {
                overflow = 1;
                break;
            }
            max_off += span * st;
        }
    }
    if (overflow)
        return qllm_error_set(QLLM_ERR_INVALID_ARG,
                              "%s: view too large (element count or offsets overflow int64)", name);
    if (numel > 0 && t->data == NULL)
        return qllm_error_set(QLLM_ERR_INVALID_ARG,
                              "%s: data is NULL but the view has %" PRId64 " elements", name, numel);
    size_t es = qllm_dtype_size(t->dtype);
    if (numel > 0 && ((uintptr_t)t->data % es) != 0)
        return qllm_error_set(QLLM_ERR_INVALID_ARG,
                              "%s: data pointer is not aligned to its %zu-byte elements", name, es);
    return QLLM_OK;
}

/* Check one dim of a validated tensor against an expected size. */
qllm_status qllm_tensor_check_dim(const qllm_tensor *t, const char *name, int32_t axis,
                                  const char *axis_name, int64_t expected, const char *why) {
    if (t->shape[axis] == expected)
        return QLLM_OK;
    return qllm_error_set(QLLM_ERR_INVALID_ARG,
                          "%s: dim %d (%s) expected %" PRId64 " (%s), got %" PRId64, name,
                          (int)axis, axis_name, expected, why, t->shape[axis]);
}

/* Number of elements of a validated view. */
int64_t qllm_tensor_numel(const qllm_tensor *t) {
    int64_t n = 1;
    for (int32_t i = 0; i < t->ndim; ++i)
        n *= t->shape[i];
    return n;
}

/* Fill *t as a C-contiguous view of data with the given shape. */
qllm_status qllm_tensor_contiguous(qllm_tensor *t, void *data, qllm_dtype dtype, int32_t ndim,
                                   const int64_t *shape) {
    if (t == NULL)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "t: must not be NULL");
    if (ndim < 0 || ndim > QLLM_MAX_DIMS)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "ndim: expected 0 .. %d, got %d",
                              QLLM_MAX_DIMS, (int)ndim);
    if (ndim > 0 && shape == NULL)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "shape: must not be NULL when ndim > 0");
    if (qllm_dtype_size(dtype) == 0)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "dtype: unknown dtype %d", (int)dtype);
    qllm_tensor v;
    memset(&v, 0, sizeof v);
    v.data = data;
    v.dtype = dtype;
    v.ndim = ndim;
    int64_t stride = 1;
    for (int32_t i = ndim - 1; i >= 0; --i) {
        if (shape[i] < 0)
            return qllm_error_set(QLLM_ERR_INVALID_ARG, "shape: dim %d is negative (%" PRId64 ")",
                                  (int)i, shape[i]);
        v.shape[i] = shape[i];
        v.strides[i] = stride;
        int64_t n = shape[i] > 1 ? shape[i] : 1;
        if (stride > QLLM_MAX_ELEM_OFFSET / n)
            return qllm_error_set(QLLM_ERR_INVALID_ARG,
                                  "shape: too many elements (offsets overflow int64)");
        stride *= n;
    }
    *t = v;
    return QLLM_OK;
}

/* malloc(n * size) with overflow check. */
void *qllm_alloc_array(int64_t n, size_t size) {
    if (n < 0 || (size != 0 && (uint64_t)n > SIZE_MAX / size))
        return NULL;
    size_t bytes = (size_t)n * size;
    return malloc(bytes ? bytes : 1);
}
