/*
 * test_core.c -- tests of the qllm C core against naive references.
 *
 * Every public function is run on random inputs (fixed-seed PRNG), all three
 * storage dtypes, edge sizes, non-contiguous / broadcast views and ties, and
 * compared with a slow reference written here.  Every error path checks the
 * status code and that qllm_last_error() names the argument.  The block store
 * is checked against an independent model in both modes (LRU victims, move
 * order, slot recycling, data integrity).  Output views are surrounded by
 * sentinel bytes that must survive (strided writes stay inside the view).
 *
 * Prints one summary line; exits non-zero on any failure.
 */
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qllm/qllm.h"

/* ASan reads this at start-up: let malloc return NULL so that the
 * QLLM_ERR_NOMEM paths can be tested (ASAN_OPTIONS still overrides). */
const char *__asan_default_options(void);
/* ASan default options for this test binary (see above). */
const char *__asan_default_options(void) { return "allocator_may_return_null=1"; }

/* ------------------------------------------------------------ framework */

static long g_checks, g_failures;

static void fail_at(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    g_failures++;
    if (g_failures > 60)
        return; /* keep the log readable */
    fprintf(stderr, "FAIL %s:%d: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

#define CHECK(cond, ...)                                   \
    do {                                                   \
        g_checks++;                                        \
        if (!(cond))                                       \
            fail_at(__FILE__, __LINE__, __VA_ARGS__);      \
    } while (0)

/* Status must be `want` and the last error must contain `needle`. */
#define CHECK_ERR(expr, want, needle)                                                        \
    do {                                                                                     \
        qllm_status st_ = (expr);                                                            \
        g_checks++;                                                                          \
        if (st_ != (want) || strstr(qllm_last_error(), (needle)) == NULL)                    \
            fail_at(__FILE__, __LINE__, "%s: got %s \"%s\", want %s containing \"%s\"", #expr, \
                    qllm_status_str(st_), qllm_last_error(), qllm_status_str(want), (needle));  \
    } while (0)

#define CHECK_OK(expr)                                                                       \
    do {                                                                                     \
        qllm_status st_ = (expr);                                                            \
        g_checks++;                                                                          \
        if (st_ != QLLM_OK)                                                                  \
            fail_at(__FILE__, __LINE__, "%s: got %s \"%s\"", #expr, qllm_status_str(st_),    \
                    qllm_last_error());                                                      \
    } while (0)

/* ------------------------------------------------------------------ PRNG */

static uint64_t g_rng = 0x243F6A8885A308D3ull;

static uint64_t rng_u64(void) { /* splitmix64 */
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_unit(void) { return (double)(rng_u64() >> 11) * 0x1.0p-53; }

static int64_t rng_int(int64_t lo, int64_t hi) { /* [lo, hi) */
    return lo + (int64_t)(rng_u64() % (uint64_t)(hi - lo));
}

static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* --------------------------------------------------------- test tensors */

enum { L_CONTIG, L_PADDED, L_PERMUTED, L_BROADCAST, L_COUNT };
static const char *layout_name[] = {"contig", "padded", "permuted", "broadcast"};

#define SENTINEL 0xA5

typedef struct {
    qllm_tensor t;
    unsigned char *buf;
    size_t bytes;
} tt;

#define IDX(...) ((const int64_t[]){__VA_ARGS__})

static size_t tt_esize(const tt *x) { return qllm_dtype_size(x->t.dtype); }

static int64_t tt_numel(const tt *x) {
    int64_t n = 1;
    for (int i = 0; i < x->t.ndim; ++i)
        n *= x->t.shape[i];
    return n;
}

/* A view of `shape` in a fresh buffer filled with SENTINEL bytes.
 * contig: C order; padded: last stride 2, gaps between rows; permuted:
 * Fortran order (last dim not unit-stride); broadcast: the first dim of size
 * > 1 has stride 0 (inputs only). */
static void tt_make(tt *x, qllm_dtype dt, int ndim, const int64_t *shape, int layout) {
    memset(x, 0, sizeof *x);
    x->t.dtype = dt;
    x->t.ndim = ndim;
    for (int i = 0; i < ndim; ++i)
        x->t.shape[i] = shape[i];
    int64_t st = layout == L_PADDED ? 2 : 1;
    if (layout == L_PERMUTED) {
        for (int i = 0; i < ndim; ++i) {
            x->t.strides[i] = st;
            st *= shape[i] > 1 ? shape[i] : 1;
        }
    } else {
        for (int i = ndim - 1; i >= 0; --i) {
            x->t.strides[i] = st;
            st = st * (shape[i] > 1 ? shape[i] : 1) + (layout == L_PADDED ? 3 : 0);
        }
        if (layout == L_BROADCAST)
            for (int i = 0; i < ndim; ++i)
                if (shape[i] > 1) {
                    x->t.strides[i] = 0;
                    break;
                }
    }
    int64_t max_off = 0;
    if (tt_numel(x) > 0)
        for (int i = 0; i < ndim; ++i)
            max_off += (shape[i] - 1) * x->t.strides[i];
    x->bytes = (size_t)(max_off + 1) * tt_esize(x) + 32;
    x->buf = (unsigned char *)malloc(x->bytes);
    if (x->buf == NULL) {
        fprintf(stderr, "test: out of memory\n");
        exit(2);
    }
    memset(x->buf, SENTINEL, x->bytes);
    x->t.data = x->buf;
}

static void tt_free(tt *x) {
    free(x->buf);
    x->buf = NULL;
}

static int64_t tt_off(const tt *x, const int64_t *idx) {
    int64_t off = 0;
    for (int i = 0; i < x->t.ndim; ++i)
        off += idx[i] * x->t.strides[i];
    return off;
}

static uint32_t tt_raw(const tt *x, const int64_t *idx) {
    const unsigned char *p = x->buf + (size_t)tt_off(x, idx) * tt_esize(x);
    if (tt_esize(x) == 4) {
        uint32_t u;
        memcpy(&u, p, 4);
        return u;
    }
    uint16_t h;
    memcpy(&h, p, 2);
    return h;
}

static void tt_set_raw(tt *x, const int64_t *idx, uint32_t raw) {
    unsigned char *p = x->buf + (size_t)tt_off(x, idx) * tt_esize(x);
    if (tt_esize(x) == 4) {
        memcpy(p, &raw, 4);
    } else {
        uint16_t h = (uint16_t)raw;
        memcpy(p, &h, 2);
    }
}

static float raw_to_f32(qllm_dtype dt, uint32_t raw) {
    switch (dt) {
    case QLLM_DTYPE_F32: return bits_f32(raw);
    case QLLM_DTYPE_F16: return qllm_f16_to_f32((uint16_t)raw);
    case QLLM_DTYPE_BF16: return qllm_bf16_to_f32((uint16_t)raw);
    default: return (float)(int32_t)raw;
    }
}

static uint32_t f32_to_raw(qllm_dtype dt, float v) {
    switch (dt) {
    case QLLM_DTYPE_F32: return f32_bits(v);
    case QLLM_DTYPE_F16: return qllm_f32_to_f16(v);
    case QLLM_DTYPE_BF16: return qllm_f32_to_bf16(v);
    default: return (uint32_t)(int32_t)v;
    }
}

static float tt_get(const tt *x, const int64_t *idx) { return raw_to_f32(x->t.dtype, tt_raw(x, idx)); }

static void tt_set(tt *x, const int64_t *idx, float v) { tt_set_raw(x, idx, f32_to_raw(x->t.dtype, v)); }

/* Advance a multi-index in C order; 0 when done. */
static int idx_next(const tt *x, int64_t *idx) {
    for (int i = x->t.ndim - 1; i >= 0; --i) {
        if (++idx[i] < x->t.shape[i])
            return 1;
        idx[i] = 0;
    }
    return 0;
}

/* Fill every element: uniform in [lo, hi), or integers in [lo, hi) if ints. */
static void tt_fill(tt *x, double lo, double hi, int ints) {
    if (tt_numel(x) == 0)
        return;
    int64_t idx[QLLM_MAX_DIMS] = {0};
    do {
        double v = ints ? (double)rng_int((int64_t)lo, (int64_t)hi) : lo + (hi - lo) * rng_unit();
        tt_set(x, idx, (float)v);
    } while (idx_next(x, idx));
}

/* Every byte outside the view's elements still holds the sentinel. */
static int tt_sentinel_ok(const tt *x) {
    unsigned char *mark = (unsigned char *)calloc(x->bytes, 1);
    if (tt_numel(x) > 0) {
        int64_t idx[QLLM_MAX_DIMS] = {0};
        do {
            memset(mark + (size_t)tt_off(x, idx) * tt_esize(x), 1, tt_esize(x));
        } while (idx_next(x, idx));
    }
    int ok = 1;
    for (size_t i = 0; i < x->bytes; ++i)
        if (!mark[i] && x->buf[i] != SENTINEL)
            ok = 0;
    free(mark);
    return ok;
}

static const qllm_dtype k_float_dtypes[3] = {QLLM_DTYPE_F32, QLLM_DTYPE_F16, QLLM_DTYPE_BF16};

/* ------------------------------------------------------ status, dtypes */

static void test_status_dtype(void) {
    CHECK(strcmp(qllm_status_str(QLLM_OK), "QLLM_OK") == 0, "status_str OK");
    CHECK(strcmp(qllm_status_str(QLLM_ERR_INVALID_ARG), "QLLM_ERR_INVALID_ARG") == 0, "invalid");
    CHECK(strcmp(qllm_status_str(QLLM_ERR_NOMEM), "QLLM_ERR_NOMEM") == 0, "nomem");
    CHECK(strcmp(qllm_status_str(QLLM_ERR_NOT_FOUND), "QLLM_ERR_NOT_FOUND") == 0, "not found");
    CHECK(strcmp(qllm_status_str(QLLM_ERR_NONFINITE), "QLLM_ERR_NONFINITE") == 0, "nonfinite");
    CHECK(strcmp(qllm_status_str(QLLM_ERR_CAPACITY), "QLLM_ERR_CAPACITY") == 0, "capacity");
    CHECK(strcmp(qllm_status_str(QLLM_ERR_INTERNAL), "QLLM_ERR_INTERNAL") == 0, "internal");
    CHECK(qllm_status_str((qllm_status)99) != NULL && strlen(qllm_status_str((qllm_status)99)) > 0,
          "unknown status has a name");
    CHECK(qllm_dtype_size(QLLM_DTYPE_F32) == 4 && qllm_dtype_size(QLLM_DTYPE_F16) == 2 &&
              qllm_dtype_size(QLLM_DTYPE_BF16) == 2 && qllm_dtype_size(QLLM_DTYPE_I32) == 4 &&
              qllm_dtype_size((qllm_dtype)7) == 0,
          "dtype sizes");
    CHECK(strcmp(qllm_dtype_str(QLLM_DTYPE_F32), "f32") == 0 && strcmp(qllm_dtype_str(QLLM_DTYPE_F16), "f16") == 0 &&
              strcmp(qllm_dtype_str(QLLM_DTYPE_BF16), "bf16") == 0 &&
              strcmp(qllm_dtype_str(QLLM_DTYPE_I32), "i32") == 0,
          "dtype names");
    CHECK(qllm_dtype_str((qllm_dtype)-3) != NULL, "unknown dtype has a name");

    /* qllm_tensor_contiguous */
    qllm_tensor t;
    float data[24];
    CHECK_OK(qllm_tensor_contiguous(&t, data, QLLM_DTYPE_F32, 3, IDX(2, 3, 4)));
    CHECK(t.data == data && t.ndim == 3 && t.dtype == QLLM_DTYPE_F32 && t.shape[0] == 2 &&
              t.shape[1] == 3 && t.shape[2] == 4 && t.strides[0] == 12 && t.strides[1] == 4 &&
              t.strides[2] == 1,
          "contiguous strides");
    CHECK_OK(qllm_tensor_contiguous(&t, NULL, QLLM_DTYPE_BF16, 3, IDX(2, 0, 5)));
    CHECK(t.shape[1] == 0 && t.strides[2] == 1 && t.strides[1] == 5 && t.strides[0] == 5,
          "zero-size dim strides");
    CHECK_OK(qllm_tensor_contiguous(&t, data, QLLM_DTYPE_I32, 0, NULL));
    CHECK(t.ndim == 0, "0-dim view");
    CHECK_ERR(qllm_tensor_contiguous(NULL, data, QLLM_DTYPE_F32, 1, IDX(3)), QLLM_ERR_INVALID_ARG, "t:");
    CHECK_ERR(qllm_tensor_contiguous(&t, data, QLLM_DTYPE_F32, 9, IDX(1, 1, 1, 1, 1, 1, 1, 1, 1)),
              QLLM_ERR_INVALID_ARG, "ndim");
    CHECK_ERR(qllm_tensor_contiguous(&t, data, QLLM_DTYPE_F32, -1, IDX(1)), QLLM_ERR_INVALID_ARG, "ndim");
    CHECK_ERR(qllm_tensor_contiguous(&t, data, QLLM_DTYPE_F32, 2, NULL), QLLM_ERR_INVALID_ARG, "shape");
    CHECK_ERR(qllm_tensor_contiguous(&t, data, QLLM_DTYPE_F32, 2, IDX(2, -1)), QLLM_ERR_INVALID_ARG, "shape");
    CHECK_ERR(qllm_tensor_contiguous(&t, data, (qllm_dtype)11, 1, IDX(2)), QLLM_ERR_INVALID_ARG, "dtype");
    CHECK_ERR(qllm_tensor_contiguous(&t, data, QLLM_DTYPE_F32, 3, IDX(INT64_MAX / 2, 4, 4)),
              QLLM_ERR_INVALID_ARG, "shape");
}

/* --------------------------------------------------------- conversions */

/* Independent f16 decoder (ldexp). */
static double ref_f16(uint16_t h) {
    int sign = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 0)
        v = ldexp((double)m, -24);
    else if (e == 31)
        v = m ? NAN : INFINITY;
    else
        v = ldexp((double)(1024 + m), e - 25);
    return sign ? -v : v;
}

/* Is h the round-to-nearest-even f16 of x?  (x finite) */
static int f16_is_rne(float x, uint16_t h) {
    double dx = (double)x;
    if ((signbit(x) != 0) != ((h >> 15) != 0))
        return 0;
    double ax = fabs(dx);
    uint16_t mag = h & 0x7fff;
    if (ax >= 65520.0)
        return mag == 0x7c00;
    if (mag >= 0x7c00)
        return 0;
    double d = fabs(ax - ref_f16(mag));
    if (mag > 0 && fabs(ax - ref_f16((uint16_t)(mag - 1))) < d)
        return 0;
    if (mag < 0x7bff && fabs(ax - ref_f16((uint16_t)(mag + 1))) < d)
        return 0;
    if (mag > 0 && fabs(ax - ref_f16((uint16_t)(mag - 1))) == d && (mag & 1))
        return 0;
    if (mag < 0x7bff && fabs(ax - ref_f16((uint16_t)(mag + 1))) == d && (mag & 1))
        return 0;
    return 1;
}

static double ref_bf16(uint16_t h) { return (double)bits_f32((uint32_t)h << 16); }

static int bf16_is_rne(float x, uint16_t h) {
    if ((signbit(x) != 0) != ((h >> 15) != 0))
        return 0;
    double ax = fabs((double)x);
    uint16_t mag = h & 0x7fff;
    const double max_bf16 = ref_bf16(0x7f7f), half_ulp = ldexp(1.0, 127 - 8);
    if (ax >= max_bf16 + half_ulp) /* ties at the top round to even = Inf */
        return mag == 0x7f80;
    if (mag >= 0x7f80)
        return 0;
    double d = fabs(ax - ref_bf16(mag));
    for (int s = -1; s <= 1; s += 2) {
        int nb = (int)mag + s;
        if (nb < 0 || nb > 0x7f7f)
            continue;
        double dn = fabs(ax - ref_bf16((uint16_t)nb));
        if (dn < d || (dn == d && (mag & 1)))
            return 0;
    }
    return 1;
}

static void test_conversions(void) {
    long bad = 0;
    for (uint32_t h = 0; h < 65536; ++h) {
        float f = qllm_f16_to_f32((uint16_t)h);
        double r = ref_f16((uint16_t)h);
        if (isnan(r)) {
            uint16_t back = qllm_f32_to_f16(f);
            if (!isnan(f) || (back & 0x7c00) != 0x7c00 || (back & 0x3ff) == 0)
                bad++; /* NaN must stay NaN both ways */
        } else {
            if ((double)f != r || (signbit(f) != 0) != (signbit(r) != 0))
                bad++;
            if (qllm_f32_to_f16(f) != h) /* round trip of every finite/inf f16 */
                bad++;
        }
        float b = qllm_bf16_to_f32((uint16_t)h);
        if (f32_bits(b) != (h << 16))
            bad++;
        if (!isnan(b) && qllm_f32_to_bf16(b) != h)
            bad++;
        if (isnan(b) && !isnan(qllm_bf16_to_f32(qllm_f32_to_bf16(b))))
            bad++;
    }
    CHECK(bad == 0, "exhaustive f16/bf16 decode + round trip: %ld mismatches", bad);

    /* f32 -> f16 / bf16: special values, boundaries, random bit patterns */
    const float specials[] = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, -65520.0f,
                              65536.0f, 1e30f, -1e30f, FLT_MAX, FLT_MIN, 0x1p-24f, 0x1p-25f,
                              0x1.000002p-25f, 0x1.8p-24f, 0x1.4p-24f, 0x1.cp-24f, 0x1p-14f,
                              0x1.ffcp-15f, 0x1.ffdp-15f, 0x1.ffep-15f, 0x1.002p0f, 0x1.006p0f,
                              0x1.001p0f, 0x1.003p0f, 1e-45f, 3.0e-8f, 0x1.0101p0f, 0x1.0080p0f,
                              0x1.0180p0f, 0x1.fffffep127f, 0x1.ff8p127f, 0x1.ff7fffp127f};
    for (size_t i = 0; i < sizeof specials / sizeof specials[0]; ++i) {
        float x = specials[i];
        CHECK(f16_is_rne(x, qllm_f32_to_f16(x)), "f32_to_f16(%a) = 0x%04x not RNE", (double)x,
              qllm_f32_to_f16(x));
        CHECK(bf16_is_rne(x, qllm_f32_to_bf16(x)), "f32_to_bf16(%a) = 0x%04x not RNE", (double)x,
              qllm_f32_to_bf16(x));
    }
    CHECK(qllm_f32_to_f16(INFINITY) == 0x7c00 && qllm_f32_to_f16(-INFINITY) == 0xfc00, "f16 inf");
    CHECK(qllm_f32_to_bf16(INFINITY) == 0x7f80 && qllm_f32_to_bf16(-INFINITY) == 0xff80, "bf16 inf");
    CHECK(isnan(qllm_f16_to_f32(qllm_f32_to_f16(NAN))), "f16 nan");
    CHECK(isnan(qllm_bf16_to_f32(qllm_f32_to_bf16(NAN))), "bf16 nan");
    CHECK(isnan(qllm_f16_to_f32(qllm_f32_to_f16(bits_f32(0x7f800001u)))), "f16 snan stays nan");
    CHECK(isnan(qllm_bf16_to_f32(qllm_f32_to_bf16(bits_f32(0x7f800001u)))), "bf16 snan stays nan");
    CHECK(qllm_f32_to_f16(0x1p-25f) == 0 && qllm_f32_to_f16(0x1.8p-24f) == 2 &&
              qllm_f32_to_f16(0x1.000002p-25f) == 1,
          "f16 subnormal ties");
    CHECK(qllm_f32_to_bf16(0x1.03p0f) == 0x3f82 && qllm_f32_to_bf16(0x1.01p0f) == 0x3f80 &&
              qllm_f32_to_bf16(0x1.010002p0f) == 0x3f81,
          "bf16 ties to even");
    CHECK(qllm_f32_to_f16(0x1.006p0f) == 0x3c02 && qllm_f32_to_f16(0x1.002p0f) == 0x3c00 &&
              qllm_f32_to_f16(0x1.002002p0f) == 0x3c01,
          "f16 ties to even");
    bad = 0;
    for (int i = 0; i < 400000; ++i) {
        uint32_t u = (uint32_t)rng_u64();
        if (i & 1) /* concentrate on the f16 range */
            u = (u & 0x80000000u) | (0x33000000u + (u % (0x47800000u - 0x33000000u)));
        float x = bits_f32(u);
        if (isnan(x)) {
            if (!isnan(qllm_f16_to_f32(qllm_f32_to_f16(x))) || !isnan(qllm_bf16_to_f32(qllm_f32_to_bf16(x))))
                bad++;
            continue;
        }
        if (!f16_is_rne(x, qllm_f32_to_f16(x)))
            bad++;
        if (!bf16_is_rne(x, qllm_f32_to_bf16(x)))
            bad++;
    }
    CHECK(bad == 0, "random f32 -> f16/bf16 rounding: %ld mismatches", bad);
}

/* The vectorised row converters (inside repr_compute) agree with the scalar
 * ones on every f16 / bf16 pattern: keys [1, 1, 1, 65536], top-1 of 1 token,
 * so out = key / 1 exactly.  And f32 -> bf16 / f16 rounding of the output. */
static void test_row_conversions(void) {
    for (int which = 0; which < 2; ++which) {
        qllm_dtype dt = which ? QLLM_DTYPE_BF16 : QLLM_DTYPE_F16;
        tt keys, scores, out;
        tt_make(&keys, dt, 4, IDX(1, 1, 1, 65536), L_CONTIG);
        tt_make(&scores, QLLM_DTYPE_F32, 3, IDX(1, 1, 1), L_CONTIG);
        tt_make(&out, QLLM_DTYPE_F32, 3, IDX(1, 1, 65536), L_CONTIG);
        for (int64_t d = 0; d < 65536; ++d)
            tt_set_raw(&keys, IDX(0, 0, 0, d), (uint32_t)d);
        tt_set(&scores, IDX(0, 0, 0), 1.0f);
        CHECK_OK(qllm_repr_compute(&keys.t, &scores.t, 1, &out.t));
        long bad = 0;
        for (int64_t d = 0; d < 65536; ++d) {
            float want = raw_to_f32(dt, (uint32_t)d), got = tt_get(&out, IDX(0, 0, d));
            if (isnan(want) ? !isnan(got) : got != want)
                bad++;
        }
        CHECK(bad == 0, "vector %s->f32 conversion: %ld mismatches", qllm_dtype_str(dt), bad);
        tt_free(&keys);
        tt_free(&scores);
        tt_free(&out);
    }
    /* f32 -> f16 / bf16 stores: random values, every rounding midpoint of
     * both formats and its neighbours, NaN / Inf; compared with the scalar
     * conversions (themselves checked above). */
    const int64_t n_rand = 4096, n_f16 = 4 * 0x7c00, n_bf16 = 4 * 0x7f80;
    const int64_t n = n_rand + n_f16 + n_bf16;
    uint32_t *vals = (uint32_t *)malloc((size_t)n * sizeof *vals);
    for (int64_t d = 0; d < n_rand; ++d) {
        uint32_t u = (uint32_t)rng_u64();
        if (d % 3 != 0)
            u = (u & 0x80000000u) | (0x33000000u + (u % (0x47800000u - 0x33000000u)));
        vals[d] = u;
    }
    vals[0] = 0x7fc00001u; /* NaN */
    vals[1] = 0xff800000u; /* -Inf */
    vals[2] = 0x7f800001u; /* signalling NaN, payload only in the low bits */
    vals[4] = 0xff800100u; /* negative NaN */
    for (uint32_t h = 0; h < 0x7c00; ++h) {
        double lo = ref_f16((uint16_t)h), hi = h + 1 < 0x7c00 ? ref_f16((uint16_t)(h + 1)) : 65536.0;
        uint32_t mid = f32_bits((float)((lo + hi) / 2)); /* exact: 12 significant bits */
        uint32_t *v = vals + n_rand + 4 * (int64_t)h;
        v[0] = mid;
        v[1] = mid + 1;
        v[2] = mid - (mid > 0);
        v[3] = mid | 0x80000000u;
    }
    for (uint32_t h = 0; h < 0x7f80; ++h) {
        uint32_t mid = (h << 16) | 0x8000u; /* exact midpoint of h and h + 1 */
        uint32_t *v = vals + n_rand + n_f16 + 4 * (int64_t)h;
        v[0] = mid;
        v[1] = mid + 1;
        v[2] = mid - 1;
        v[3] = mid | 0x80000000u;
    }
    for (int which = 0; which < 2; ++which) {
        qllm_dtype dt = which ? QLLM_DTYPE_BF16 : QLLM_DTYPE_F16;
        tt keys, scores, out;
        tt_make(&keys, QLLM_DTYPE_F32, 4, IDX(1, 1, 1, n), L_CONTIG);
        tt_make(&scores, QLLM_DTYPE_F32, 3, IDX(1, 1, 1), L_CONTIG);
        tt_make(&out, dt, 3, IDX(1, 1, n), which ? L_CONTIG : L_PADDED);
        for (int64_t d = 0; d < n; ++d)
            tt_set_raw(&keys, IDX(0, 0, 0, d), vals[d]);
        tt_set(&scores, IDX(0, 0, 0), 0.5f);
        CHECK_OK(qllm_repr_compute(&keys.t, &scores.t, 3, &out.t));
        long bad = 0;
        for (int64_t d = 0; d < n; ++d) {
            float x = tt_get(&keys, IDX(0, 0, 0, d)) + 0.0f; /* acc starts at +0: -0 -> +0 */
            uint32_t want = f32_to_raw(dt, x), got = tt_raw(&out, IDX(0, 0, d));
            if (isnan(x) ? !isnan(raw_to_f32(dt, got)) : got != want)
                bad++;
        }
        CHECK(bad == 0, "vector f32->%s rounding: %ld mismatches", qllm_dtype_str(dt), bad);
        CHECK(tt_sentinel_ok(&out), "row store stays inside the view");
        tt_free(&keys);
        tt_free(&scores);
        tt_free(&out);
    }
    free(vals);
}

/* ------------------------------------------------------------ repr_compute */

/* Order of the k best of s[0..n) (descending, ties to the lower index):
 * O(n * k) selection, obviously correct. */
static void ref_topk(const float *s, int64_t n, int64_t k, int64_t *idx) {
    unsigned char *taken = (unsigned char *)calloc((size_t)n + 1, 1);
    for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t t = 0; t < n; ++t)
            if (!taken[t] && (best < 0 || s[t] > s[best]))
                best = t;
        taken[best] = 1;
        idx[j] = best;
    }
    free(taken);
}

/* Reference representatives, rounded to out's dtype (raw bits). */
static void ref_repr(const tt *keys, const tt *scores, int64_t repr_topk, qllm_dtype odt,
                     uint32_t *want) {
    const int64_t B = keys->t.shape[0], Hkv = keys->t.shape[1], T = keys->t.shape[2],
                  D = keys->t.shape[3], Hq = scores->t.shape[1];
    const int64_t k = repr_topk < T ? repr_topk : T, group = Hq / Hkv;
    float *s = (float *)malloc((size_t)T * sizeof *s);
    int64_t *idx = (int64_t *)malloc((size_t)k * sizeof *idx);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Hq; ++h) {
            for (int64_t t = 0; t < T; ++t)
                s[t] = tt_get(scores, IDX(b, h, t));
            ref_topk(s, T, k, idx);
            for (int64_t d = 0; d < D; ++d) {
                float acc = 0.0f; /* f32, in selection order, one division */
                for (int64_t j = 0; j < k; ++j)
                    acc += tt_get(keys, IDX(b, h / group, idx[j], d));
                want[(b * Hq + h) * D + d] = f32_to_raw(odt, acc / (float)k);
            }
        }
    free(s);
    free(idx);
}

static void repr_case(qllm_dtype kdt, qllm_dtype sdt, qllm_dtype odt, int64_t B, int64_t Hkv,
                      int64_t Hq, int64_t T, int64_t D, int64_t topk, int lk, int ls, int lo,
                      int ties) {
    tt keys, scores, out;
    tt_make(&keys, kdt, 4, IDX(B, Hkv, T, D), lk);
    tt_make(&scores, sdt, 3, IDX(B, Hq, T), ls);
    tt_make(&out, odt, 3, IDX(B, Hq, D), lo);
    tt_fill(&keys, -2.0, 2.0, 0);
    if (ties)
        tt_fill(&scores, 0, 3, 1); /* many equal scores */
    else
        tt_fill(&scores, -1.0, 1.0, 0);
    qllm_status st = qllm_repr_compute(&keys.t, &scores.t, topk, &out.t);
    CHECK(st == QLLM_OK, "repr %s: %s", qllm_status_str(st), qllm_last_error());
    uint32_t *want = (uint32_t *)malloc((size_t)(B * Hq * D + 1) * sizeof *want);
    ref_repr(&keys, &scores, topk, odt, want);
    long bad = 0;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Hq; ++h)
            for (int64_t d = 0; d < D; ++d)
                if (tt_raw(&out, IDX(b, h, d)) != want[(b * Hq + h) * D + d])
                    bad++;
    CHECK(bad == 0,
          "repr keys=%s scores=%s out=%s B=%" PRId64 " Hkv=%" PRId64 " Hq=%" PRId64 " T=%" PRId64
          " D=%" PRId64 " k=%" PRId64 " layouts=%s/%s/%s ties=%d: %ld mismatches",
          qllm_dtype_str(kdt), qllm_dtype_str(sdt), qllm_dtype_str(odt), B, Hkv, Hq, T, D, topk,
          layout_name[lk], layout_name[ls], layout_name[lo], ties, bad);
    CHECK(tt_sentinel_ok(&out), "repr wrote outside out (%s)", layout_name[lo]);
    free(want);
    tt_free(&keys);
    tt_free(&scores);
    tt_free(&out);
}

static void test_repr(void) {
    /* {B, Hkv, Hq, T, D, topk} */
    static const int64_t shapes[][6] = {
        {1, 1, 1, 1, 1, 1},      /* everything 1 */
        {1, 1, 1, 1, 4, 4},      /* 1 token, topk > block_len */
        {3, 2, 4, 7, 5, 3},      /* GQA group 2 */
        {2, 2, 2, 3, 16, 8},     /* block_len < repr_topk, group 1 */
        {4, 1, 3, 16, 33, 16},   /* topk == block_len, group 3, odd head_dim */
        {2, 4, 8, 64, 128, 4},   /* realistic */
        {2, 2, 6, 40, 17, 39},   /* large topk: heap path */
    };
    const int nshapes = (int)(sizeof shapes / sizeof shapes[0]);
    for (int si = 0; si < nshapes; ++si) {
        const int64_t *p = shapes[si];
        for (int di = 0; di < 3; ++di) {
            qllm_dtype dt = k_float_dtypes[di];
            for (int l = 0; l < 3; ++l)
                repr_case(dt, dt, dt, p[0], p[1], p[2], p[3], p[4], p[5], l, l, l, (si + l) & 1);
            repr_case(dt, dt, dt, p[0], p[1], p[2], p[3], p[4], p[5], L_BROADCAST, L_BROADCAST,
                      L_PADDED, 1);
            /* mixed dtypes */
            repr_case(dt, k_float_dtypes[(di + 1) % 3], k_float_dtypes[(di + 2) % 3], p[0], p[1],
                      p[2], p[3], p[4], p[5], L_PERMUTED, L_CONTIG, L_PERMUTED, 1);
        }
    }
    /* repr_topk far above block_len */
    repr_case(QLLM_DTYPE_F32, QLLM_DTYPE_F32, QLLM_DTYPE_F32, 2, 1, 2, 5, 8, INT64_MAX,
              L_CONTIG, L_CONTIG, L_CONTIG, 1);

    /* explicit tie order: equal scores pick the lower token */
    {
        tt keys, scores, out;
        tt_make(&keys, QLLM_DTYPE_F32, 4, IDX(1, 1, 4, 1), L_CONTIG);
        tt_make(&scores, QLLM_DTYPE_F32, 3, IDX(1, 1, 4), L_CONTIG);
        tt_make(&out, QLLM_DTYPE_F32, 3, IDX(1, 1, 1), L_CONTIG);
        const float kv[4] = {1.0f, 10.0f, 100.0f, 1000.0f}, sv[4] = {0.5f, 2.0f, 0.5f, 0.5f};
        for (int64_t t = 0; t < 4; ++t) {
            tt_set(&keys, IDX(0, 0, t, 0), kv[t]);
            tt_set(&scores, IDX(0, 0, t), sv[t]);
        }
        CHECK_OK(qllm_repr_compute(&keys.t, &scores.t, 2, &out.t));
        CHECK(tt_get(&out, IDX(0, 0, 0)) == 5.5f, "tie -> lower token: got %g want 5.5",
              (double)tt_get(&out, IDX(0, 0, 0)));
        CHECK_OK(qllm_repr_compute(&keys.t, &scores.t, 3, &out.t));
        CHECK(tt_get(&out, IDX(0, 0, 0)) == 37.0f, "ties: got %g want 37", (double)tt_get(&out, IDX(0, 0, 0)));
        tt_free(&keys);
        tt_free(&scores);
        tt_free(&out);
    }

    /* n_q_heads == 0: valid, nothing written */
    {
        tt keys, scores, out;
        tt_make(&keys, QLLM_DTYPE_F32, 4, IDX(2, 2, 3, 4), L_CONTIG);
        tt_make(&scores, QLLM_DTYPE_F32, 3, IDX(2, 0, 3), L_CONTIG);
        tt_make(&out, QLLM_DTYPE_F32, 3, IDX(2, 0, 4), L_CONTIG);
        tt_fill(&keys, -1, 1, 0);
        CHECK_OK(qllm_repr_compute(&keys.t, &scores.t, 2, &out.t));
        CHECK(tt_sentinel_ok(&out), "n_q_heads == 0 writes nothing");
        tt_free(&keys);
        tt_free(&scores);
        tt_free(&out);
    }
}

static void test_repr_errors(void) {
    tt keys, scores, out;
    tt_make(&keys, QLLM_DTYPE_F32, 4, IDX(2, 2, 4, 3), L_CONTIG);
    tt_make(&scores, QLLM_DTYPE_F16, 3, IDX(2, 4, 4), L_CONTIG);
    tt_make(&out, QLLM_DTYPE_BF16, 3, IDX(2, 4, 3), L_CONTIG);
    tt_fill(&keys, -1, 1, 0);
    tt_fill(&scores, 0, 1, 0);
    qllm_tensor k = keys.t, s = scores.t, o = out.t;
    CHECK_OK(qllm_repr_compute(&k, &s, 2, &o));

    CHECK_ERR(qllm_repr_compute(NULL, &s, 2, &o), QLLM_ERR_INVALID_ARG, "keys: must not be NULL");
    CHECK_ERR(qllm_repr_compute(&k, NULL, 2, &o), QLLM_ERR_INVALID_ARG, "scores: must not be NULL");
    CHECK_ERR(qllm_repr_compute(&k, &s, 2, NULL), QLLM_ERR_INVALID_ARG, "out: must not be NULL");
    qllm_tensor bad = k;
    bad.ndim = 3;
    CHECK_ERR(qllm_repr_compute(&bad, &s, 2, &o), QLLM_ERR_INVALID_ARG,
              "keys: expected 4 dims (blocks, kv_heads, tokens, dim), got 3");
    bad = s;
    bad.ndim = 4;
    CHECK_ERR(qllm_repr_compute(&k, &bad, 2, &o), QLLM_ERR_INVALID_ARG, "scores: expected 3 dims");
    bad = o;
    bad.ndim = 2;
    CHECK_ERR(qllm_repr_compute(&k, &s, 2, &bad), QLLM_ERR_INVALID_ARG, "out: expected 3 dims");
    bad = k;
    bad.dtype = QLLM_DTYPE_I32;
    CHECK_ERR(qllm_repr_compute(&bad, &s, 2, &o), QLLM_ERR_INVALID_ARG, "keys: expected dtype f32, f16 or bf16, got i32");
    bad.dtype = (qllm_dtype)42;
    CHECK_ERR(qllm_repr_compute(&bad, &s, 2, &o), QLLM_ERR_INVALID_ARG, "keys: expected dtype");
    bad = o;
    bad.dtype = QLLM_DTYPE_I32;
    CHECK_ERR(qllm_repr_compute(&k, &s, 2, &bad), QLLM_ERR_INVALID_ARG, "out: expected dtype");
    bad = s;
    bad.strides[1] = -1;
    CHECK_ERR(qllm_repr_compute(&k, &bad, 2, &o), QLLM_ERR_INVALID_ARG, "scores: stride of dim 1");
    bad = o;
    bad.strides[2] = -2;
    CHECK_ERR(qllm_repr_compute(&k, &s, 2, &bad), QLLM_ERR_INVALID_ARG, "out: stride of dim 2");
    bad = k;
    bad.shape[2] = -4;
    CHECK_ERR(qllm_repr_compute(&bad, &s, 2, &o), QLLM_ERR_INVALID_ARG, "keys: dim 2 has negative size");
    bad = k;
    bad.data = NULL;
    CHECK_ERR(qllm_repr_compute(&bad, &s, 2, &o), QLLM_ERR_INVALID_ARG, "keys: data is NULL");
    bad = k;
    bad.data = keys.buf + 2;
    CHECK_ERR(qllm_repr_compute(&bad, &s, 2, &o), QLLM_ERR_INVALID_ARG, "keys: data pointer is not aligned");
    bad = k;
    bad.strides[0] = INT64_MAX / 2;
    CHECK_ERR(qllm_repr_compute(&bad, &s, 2, &o), QLLM_ERR_INVALID_ARG, "keys: view too large");

    /* zero sizes the header forbids */
    qllm_tensor k0 = k, s0 = s, o0 = o;
    k0.shape[0] = s0.shape[0] = o0.shape[0] = 0;
    CHECK_ERR(qllm_repr_compute(&k0, &s0, 2, &o0), QLLM_ERR_INVALID_ARG, "keys: n_blocks (dim 0) must be >= 1");
    k0 = k, s0 = s, o0 = o;
    k0.shape[2] = s0.shape[2] = 0;
    CHECK_ERR(qllm_repr_compute(&k0, &s0, 2, &o0), QLLM_ERR_INVALID_ARG, "keys: block_len (dim 2) must be >= 1");
    k0 = k, s0 = s, o0 = o;
    k0.shape[3] = o0.shape[2] = 0;
    CHECK_ERR(qllm_repr_compute(&k0, &s0, 2, &o0), QLLM_ERR_INVALID_ARG, "keys: head_dim (dim 3) must be >= 1");
    k0 = k;
    k0.shape[1] = 0;
    CHECK_ERR(qllm_repr_compute(&k0, &s, 2, &o), QLLM_ERR_INVALID_ARG, "keys: n_kv_heads (dim 1) must be >= 1");

    /* shape mismatches */
    bad = s;
    bad.shape[0] = 1;
    CHECK_ERR(qllm_repr_compute(&k, &bad, 2, &o), QLLM_ERR_INVALID_ARG, "scores: dim 0 (blocks) expected 2");
    bad = s;
    bad.shape[2] = 3;
    CHECK_ERR(qllm_repr_compute(&k, &bad, 2, &o), QLLM_ERR_INVALID_ARG, "scores: dim 2 (tokens) expected 4");
    bad = s;
    bad.shape[1] = 3;
    qllm_tensor o3 = o;
    o3.shape[1] = 3;
    CHECK_ERR(qllm_repr_compute(&k, &bad, 2, &o3), QLLM_ERR_INVALID_ARG, "must be a multiple of n_kv_heads");
    bad = o;
    bad.shape[0] = 3;
    CHECK_ERR(qllm_repr_compute(&k, &s, 2, &bad), QLLM_ERR_INVALID_ARG, "out: dim 0 (blocks) expected 2");
    bad = o;
    bad.shape[1] = 2;
    CHECK_ERR(qllm_repr_compute(&k, &s, 2, &bad), QLLM_ERR_INVALID_ARG, "out: dim 1 (q_heads) expected 4");
    bad = o;
    bad.shape[2] = 4;
    CHECK_ERR(qllm_repr_compute(&k, &s, 2, &bad), QLLM_ERR_INVALID_ARG, "out: dim 2 (dim) expected 3");
    CHECK_ERR(qllm_repr_compute(&k, &s, 0, &o), QLLM_ERR_INVALID_ARG, "repr_topk: must be >= 1, got 0");
    CHECK_ERR(qllm_repr_compute(&k, &s, -7, &o), QLLM_ERR_INVALID_ARG, "repr_topk: must be >= 1, got -7");

    /* non-finite scores, the first one is named */
    tt_set(&scores, IDX(1, 2, 3), NAN);
    tt_set(&scores, IDX(1, 3, 0), INFINITY);
    CHECK_ERR(qllm_repr_compute(&k, &s, 2, &o), QLLM_ERR_NONFINITE, "scores: contains NaN at block 1, head 2, token 3");
    tt_set(&scores, IDX(1, 2, 3), 0.0f);
    CHECK_ERR(qllm_repr_compute(&k, &s, 2, &o), QLLM_ERR_NONFINITE, "scores: contains Inf at block 1, head 3, token 0");
    tt_set(&scores, IDX(1, 3, 0), -INFINITY);
    CHECK_ERR(qllm_repr_compute(&k, &s, 2, &o), QLLM_ERR_NONFINITE, "scores: contains Inf");
    tt_set(&scores, IDX(1, 3, 0), 0.0f);
    CHECK_OK(qllm_repr_compute(&k, &s, 2, &o));
    tt_free(&keys);
    tt_free(&scores);
    tt_free(&out);

    /* scratch too large: QLLM_ERR_NOMEM (broadcast views of 2^46 tokens) */
    {
        static float one[4] = {1.0f, 1.0f, 1.0f, 1.0f};
        qllm_tensor bk = {one, QLLM_DTYPE_F32, 4, {1, 1, (int64_t)1 << 46, 1}, {0, 0, 0, 0}};
        qllm_tensor bs = {one, QLLM_DTYPE_F32, 3, {1, 1, (int64_t)1 << 46}, {0, 0, 0}};
        qllm_tensor bo = {one, QLLM_DTYPE_F32, 3, {1, 1, 1}, {1, 1, 1}};
        CHECK_ERR(qllm_repr_compute(&bk, &bs, 1, &bo), QLLM_ERR_NOMEM, "out of memory");
    }
}

/* --------------------------------------------------------------- retrieval */

/* Reference score in double, plus the magnitude used for the tolerance. */
static double ref_score(const tt *r, const tt *q, const tt *qq, double w, int64_t b, double *mag) {
    const int64_t Hq = r->t.shape[1], D = r->t.shape[2];
    double s1 = 0, s2 = 0, m1 = 0, m2 = 0;
    for (int64_t h = 0; h < Hq; ++h)
        for (int64_t d = 0; d < D; ++d) {
            double rv = tt_get(r, IDX(b, h, d));
            double a = (double)tt_get(q, IDX(h, d)) * rv;
            s1 += a;
            m1 += fabs(a);
            if (qq != NULL) {
                double c = (double)tt_get(qq, IDX(h, d)) * rv;
                s2 += c;
                m2 += fabs(c);
            }
        }
    *mag = m1 + fabs(w) * m2;
    return qq != NULL ? s1 + w * s2 : s1;
}

/* Naive top-k of the n floats of a view into idx. */
static void ref_topk_view(const tt *s, int64_t k, int64_t *idx) {
    const int64_t n = s->t.shape[0];
    float *v = (float *)malloc((size_t)(n + 1) * sizeof *v);
    for (int64_t i = 0; i < n; ++i)
        v[i] = tt_get(s, IDX(i));
    ref_topk(v, n, k < n ? k : n, idx);
    free(v);
}

static void score_case(qllm_dtype rdt, qllm_dtype qdt, int64_t B, int64_t Hq, int64_t D,
                       int question, float w, int64_t k, int lr, int lq, int lo, int dup) {
    tt r, q, qq, out, out2, idx;
    tt_make(&r, rdt, 3, IDX(B, Hq, D), lr);
    tt_make(&q, qdt, 2, IDX(Hq, D), lq);
    tt_make(&qq, qdt, 2, IDX(Hq, D), lq == L_PERMUTED ? L_CONTIG : L_PERMUTED);
    tt_make(&out, QLLM_DTYPE_F32, 1, IDX(B), lo);
    tt_make(&out2, QLLM_DTYPE_F32, 1, IDX(B), lo);
    const int64_t kk = k < B ? k : B;
    tt_make(&idx, QLLM_DTYPE_I32, 1, IDX(kk), lo);
    tt_fill(&r, -1, 1, 0);
    tt_fill(&q, -1, 1, 0);
    tt_fill(&qq, -1, 1, 0);
    if (dup) /* block b repeats block b % 3: exact ties */
        for (int64_t b = 3; b < B; ++b)
            for (int64_t h = 0; h < Hq; ++h)
                for (int64_t d = 0; d < D; ++d)
                    tt_set_raw(&r, IDX(b, h, d), tt_raw(&r, IDX(b % 3, h, d)));
    const qllm_tensor *qp = question ? &qq.t : NULL;
    CHECK_OK(qllm_retrieval_score(&r.t, &q.t, qp, w, &out.t));
    long bad = 0;
    for (int64_t b = 0; b < B; ++b) {
        double mag, want = ref_score(&r, &q, question ? &qq : NULL, w, b, &mag);
        double got = tt_get(&out, IDX(b));
        if (!(fabs(got - want) <= 1e-5 * mag + 1e-6))
            bad++;
        if (dup && b >= 3 && f32_bits(tt_get(&out, IDX(b))) != f32_bits(tt_get(&out, IDX(b % 3))))
            bad++;
    }
    CHECK(bad == 0,
          "score r=%s q=%s B=%" PRId64 " Hq=%" PRId64 " D=%" PRId64 " question=%d w=%g layouts=%s/%s/%s: %ld bad",
          qllm_dtype_str(rdt), qllm_dtype_str(qdt), B, Hq, D, question, (double)w, layout_name[lr],
          layout_name[lq], layout_name[lo], bad);
    CHECK(tt_sentinel_ok(&out), "score wrote outside out");

    /* select: same scores bitwise, top-k of them */
    int64_t count = -1;
    CHECK_OK(qllm_retrieval_select(&r.t, &q.t, qp, w, k, &out2.t, &idx.t, &count));
    CHECK(count == kk, "select count %" PRId64 " want %" PRId64, count, kk);
    bad = 0;
    for (int64_t b = 0; b < B; ++b)
        if (tt_raw(&out, IDX(b)) != tt_raw(&out2, IDX(b)))
            bad++;
    CHECK(bad == 0, "select scores differ from score: %ld", bad);
    int64_t *want = (int64_t *)malloc((size_t)(kk + 1) * sizeof *want);
    ref_topk_view(&out, k, want);
    bad = 0;
    for (int64_t i = 0; i < kk; ++i)
        if ((int64_t)(int32_t)tt_raw(&idx, IDX(i)) != want[i])
            bad++;
    CHECK(bad == 0, "select indices (B=%" PRId64 " k=%" PRId64 " dup=%d): %ld wrong", B, k, dup, bad);
    CHECK(tt_sentinel_ok(&out2) && tt_sentinel_ok(&idx), "select wrote outside its outputs");
    free(want);
    tt_free(&r);
    tt_free(&q);
    tt_free(&qq);
    tt_free(&out);
    tt_free(&out2);
    tt_free(&idx);
}

/* A strided f32 copy of the same logical values gives bitwise the same scores. */
static void test_score_layout_invariance(void) {
    for (int di = 0; di < 3; ++di) {
        qllm_dtype dt = k_float_dtypes[di];
        const int64_t B = 9, Hq = 4, D = 37;
        tt r1, r2, q1, q2, o1, o2;
        tt_make(&r1, dt, 3, IDX(B, Hq, D), L_CONTIG);
        tt_make(&r2, dt, 3, IDX(B, Hq, D), L_PERMUTED);
        tt_make(&q1, dt, 2, IDX(Hq, D), L_CONTIG);
        tt_make(&q2, dt, 2, IDX(Hq, D), L_PADDED);
        tt_make(&o1, QLLM_DTYPE_F32, 1, IDX(B), L_CONTIG);
        tt_make(&o2, QLLM_DTYPE_F32, 1, IDX(B), L_PADDED);
        tt_fill(&r1, -1, 1, 0);
        tt_fill(&q1, -1, 1, 0);
        int64_t i3[3] = {0, 0, 0}, i2[2] = {0, 0};
        do tt_set_raw(&r2, i3, tt_raw(&r1, i3)); while (idx_next(&r1, i3));
        do tt_set_raw(&q2, i2, tt_raw(&q1, i2)); while (idx_next(&q1, i2));
        CHECK_OK(qllm_retrieval_score(&r1.t, &q1.t, &q1.t, 0.75f, &o1.t));
        CHECK_OK(qllm_retrieval_score(&r2.t, &q2.t, &q2.t, 0.75f, &o2.t));
        long bad = 0;
        for (int64_t b = 0; b < B; ++b)
            if (tt_raw(&o1, IDX(b)) != tt_raw(&o2, IDX(b)))
                bad++;
        CHECK(bad == 0, "strided vs contiguous scores (%s): %ld differ", qllm_dtype_str(dt), bad);
        tt_free(&r1);
        tt_free(&r2);
        tt_free(&q1);
        tt_free(&q2);
        tt_free(&o1);
        tt_free(&o2);
    }
}

static void test_retrieval(void) {
    /* {B, Hq, D, k} */
    static const int64_t shapes[][4] = {
        {1, 1, 1, 1}, {1, 3, 5, 4}, {7, 2, 16, 3}, {10, 4, 33, 10}, {13, 8, 128, 5}, {40, 3, 17, 64}, {300, 2, 8, 8},
    };
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; ++si) {
        const int64_t *p = shapes[si];
        for (int di = 0; di < 3; ++di) {
            qllm_dtype dt = k_float_dtypes[di];
            for (int l = 0; l < 3; ++l) {
                score_case(dt, dt, p[0], p[1], p[2], 0, 0.0f, p[3], l, l, l, 0);
                score_case(dt, k_float_dtypes[(di + l) % 3], p[0], p[1], p[2], 1, 1.5f, p[3], l,
                           (l + 1) % 3, l == 2 ? L_PADDED : l, (int)(si & 1));
            }
            score_case(dt, dt, p[0], p[1], p[2], 1, -4.0f, p[3], L_BROADCAST, L_BROADCAST, L_CONTIG, 1);
            score_case(dt, dt, p[0], p[1], p[2], 1, 0.0f, p[3], L_CONTIG, L_CONTIG, L_CONTIG, 1);
        }
    }
    /* k == n, k > n, n == 0 */
    score_case(QLLM_DTYPE_F32, QLLM_DTYPE_F32, 6, 2, 4, 1, 1.0f, 6, L_CONTIG, L_CONTIG, L_CONTIG, 1);
    score_case(QLLM_DTYPE_F32, QLLM_DTYPE_F32, 6, 2, 4, 1, 1.0f, 1000, L_CONTIG, L_CONTIG, L_PADDED, 1);
    score_case(QLLM_DTYPE_BF16, QLLM_DTYPE_F16, 0, 2, 4, 1, 1.0f, 3, L_CONTIG, L_CONTIG, L_CONTIG, 0);
    test_score_layout_invariance();

    /* n_blocks == 0 with NULL data everywhere it is empty */
    {
        float qv[8] = {0};
        qllm_tensor r = {NULL, QLLM_DTYPE_F32, 3, {0, 2, 4}, {8, 4, 1}};
        qllm_tensor q = {qv, QLLM_DTYPE_F32, 2, {2, 4}, {4, 1}};
        qllm_tensor o = {NULL, QLLM_DTYPE_F32, 1, {0}, {1}};
        qllm_tensor oi = {NULL, QLLM_DTYPE_I32, 1, {0}, {1}};
        int64_t count = -1;
        CHECK_OK(qllm_retrieval_score(&r, &q, NULL, 0.0f, &o));
        CHECK_OK(qllm_retrieval_select(&r, &q, &q, 2.0f, 5, &o, &oi, &count));
        CHECK(count == 0, "select on 0 blocks: count %" PRId64, count);
        CHECK_OK(qllm_retrieval_topk(&o, 5, &oi, &count));
        CHECK(count == 0, "topk on 0 scores: count %" PRId64, count);
    }
    /* empty sums: head_dim == 0 gives zero scores */
    {
        float ov[3] = {7, 7, 7};
        qllm_tensor r = {NULL, QLLM_DTYPE_F16, 3, {3, 2, 0}, {0, 0, 1}};
        qllm_tensor q = {NULL, QLLM_DTYPE_F16, 2, {2, 0}, {0, 1}};
        qllm_tensor o = {ov, QLLM_DTYPE_F32, 1, {3}, {1}};
        CHECK_OK(qllm_retrieval_score(&r, &q, &q, 1.0f, &o));
        CHECK(ov[0] == 0.0f && ov[1] == 0.0f && ov[2] == 0.0f, "head_dim 0 -> scores 0");
    }

    /* topk alone: ties, strides, k >= n, larger out_idx, NULL out_count */
    static const int64_t ns[] = {1, 2, 7, 100, 1000};
    static const int64_t ks[] = {1, 2, 3, 6, 7, 99, 100, 257, 300, 1000, 5000};
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ++ni)
        for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ++ki)
            for (int l = 0; l < 4; ++l) {
                const int64_t n = ns[ni], k = ks[ki], kk = k < n ? k : n;
                tt s, idx;
                tt_make(&s, QLLM_DTYPE_F32, 1, IDX(n), l);
                tt_make(&idx, QLLM_DTYPE_I32, 1, IDX(kk + 2), l == L_BROADCAST ? L_PADDED : l);
                if (l & 1)
                    tt_fill(&s, -3, 3, 1); /* ties */
                else
                    tt_fill(&s, -1e3, 1e3, 0);
                int64_t count = -1;
                CHECK_OK(qllm_retrieval_topk(&s.t, k, &idx.t, (ki & 1) ? NULL : &count));
                if (!(ki & 1))
                    CHECK(count == kk, "topk count %" PRId64 " want %" PRId64, count, kk);
                int64_t *want = (int64_t *)malloc((size_t)kk * sizeof *want);
                ref_topk_view(&s, k, want);
                long bad = 0;
                for (int64_t i = 0; i < kk; ++i)
                    if ((int64_t)(int32_t)tt_raw(&idx, IDX(i)) != want[i])
                        bad++;
                /* the two spare entries stay untouched */
                for (int64_t i = kk; i < kk + 2; ++i)
                    if (tt_raw(&idx, IDX(i)) != 0xA5A5A5A5u)
                        bad++;
                CHECK(bad == 0, "topk n=%" PRId64 " k=%" PRId64 " layout=%s: %ld wrong", n, k, layout_name[l], bad);
                CHECK(tt_sentinel_ok(&idx), "topk wrote outside out_idx");
                free(want);
                tt_free(&s);
                tt_free(&idx);
            }
    /* explicit ties and -0.0 == +0.0 */
    {
        float sv[6] = {1.0f, 3.0f, -0.0f, 3.0f, 0.0f, 1.0f};
        int32_t iv[6];
        qllm_tensor s = {sv, QLLM_DTYPE_F32, 1, {6}, {1}};
        qllm_tensor oi = {iv, QLLM_DTYPE_I32, 1, {6}, {1}};
        CHECK_OK(qllm_retrieval_topk(&s, 6, &oi, NULL));
        CHECK(iv[0] == 1 && iv[1] == 3 && iv[2] == 0 && iv[3] == 5 && iv[4] == 2 && iv[5] == 4,
              "tie order: %d %d %d %d %d %d", iv[0], iv[1], iv[2], iv[3], iv[4], iv[5]);
    }
}

static void test_retrieval_errors(void) {
    tt r, q, qq, out, idx, s;
    tt_make(&r, QLLM_DTYPE_F16, 3, IDX(5, 2, 4), L_CONTIG);
    tt_make(&q, QLLM_DTYPE_F32, 2, IDX(2, 4), L_CONTIG);
    tt_make(&qq, QLLM_DTYPE_BF16, 2, IDX(2, 4), L_CONTIG);
    tt_make(&out, QLLM_DTYPE_F32, 1, IDX(5), L_CONTIG);
    tt_make(&idx, QLLM_DTYPE_I32, 1, IDX(3), L_CONTIG);
    tt_make(&s, QLLM_DTYPE_F32, 1, IDX(5), L_CONTIG);
    tt_fill(&r, -1, 1, 0);
    tt_fill(&q, -1, 1, 0);
    tt_fill(&qq, -1, 1, 0);
    tt_fill(&s, -1, 1, 0);
    qllm_tensor bad;
    int64_t count;
    CHECK_OK(qllm_retrieval_score(&r.t, &q.t, &qq.t, 1.0f, &out.t));
    CHECK_ERR(qllm_retrieval_score(NULL, &q.t, &qq.t, 1.0f, &out.t), QLLM_ERR_INVALID_ARG, "reprs: must not be NULL");
    CHECK_ERR(qllm_retrieval_score(&r.t, NULL, &qq.t, 1.0f, &out.t), QLLM_ERR_INVALID_ARG, "query: must not be NULL");
    CHECK_ERR(qllm_retrieval_score(&r.t, &q.t, &qq.t, 1.0f, NULL), QLLM_ERR_INVALID_ARG, "out: must not be NULL");
    bad = r.t;
    bad.ndim = 2;
    CHECK_ERR(qllm_retrieval_score(&bad, &q.t, NULL, 1.0f, &out.t), QLLM_ERR_INVALID_ARG,
              "reprs: expected 3 dims (blocks, q_heads, dim), got 2");
    bad = q.t;
    bad.shape[0] = 3;
    CHECK_ERR(qllm_retrieval_score(&r.t, &bad, NULL, 1.0f, &out.t), QLLM_ERR_INVALID_ARG, "query: dim 0 (q_heads) expected 2");
    bad = qq.t;
    bad.shape[1] = 5;
    CHECK_ERR(qllm_retrieval_score(&r.t, &q.t, &bad, 1.0f, &out.t), QLLM_ERR_INVALID_ARG, "question: dim 1 (dim) expected 4");
    bad = qq.t;
    bad.dtype = QLLM_DTYPE_I32;
    CHECK_ERR(qllm_retrieval_score(&r.t, &q.t, &bad, 1.0f, &out.t), QLLM_ERR_INVALID_ARG, "question: expected dtype");
    bad = out.t;
    bad.dtype = QLLM_DTYPE_F16;
    CHECK_ERR(qllm_retrieval_score(&r.t, &q.t, &qq.t, 1.0f, &bad), QLLM_ERR_INVALID_ARG, "out: expected dtype f32, got f16");
    bad = out.t;
    bad.shape[0] = 4;
    CHECK_ERR(qllm_retrieval_score(&r.t, &q.t, &qq.t, 1.0f, &bad), QLLM_ERR_INVALID_ARG, "out: dim 0 (blocks) expected 5");
    bad = r.t;
    bad.strides[2] = -1;
    CHECK_ERR(qllm_retrieval_score(&bad, &q.t, &qq.t, 1.0f, &out.t), QLLM_ERR_INVALID_ARG, "reprs: stride of dim 2");
    CHECK_ERR(qllm_retrieval_score(&r.t, &q.t, &qq.t, NAN, &out.t), QLLM_ERR_NONFINITE, "weight: must be finite");
    CHECK_ERR(qllm_retrieval_score(&r.t, &q.t, &qq.t, INFINITY, &out.t), QLLM_ERR_NONFINITE, "weight");
    CHECK_OK(qllm_retrieval_score(&r.t, &q.t, NULL, NAN, &out.t)); /* weight ignored without question */

    /* non-finite inputs: the argument holding them is named */
    tt_set(&r, IDX(3, 1, 2), INFINITY);
    CHECK_ERR(qllm_retrieval_score(&r.t, &q.t, &qq.t, 1.0f, &out.t), QLLM_ERR_NONFINITE,
              "reprs: contains Inf at block 3, head 1, dim 2");
    tt_set(&r, IDX(3, 1, 2), 0.5f);
    tt_set(&qq, IDX(1, 3), NAN);
    CHECK_ERR(qllm_retrieval_score(&r.t, &q.t, &qq.t, 1.0f, &out.t), QLLM_ERR_NONFINITE,
              "question: contains NaN at head 1, dim 3");
    CHECK_OK(qllm_retrieval_score(&r.t, &q.t, NULL, 1.0f, &out.t)); /* question unused */
    tt_set(&qq, IDX(1, 3), 0.5f);
    tt_set(&q, IDX(0, 0), -INFINITY);
    CHECK_ERR(qllm_retrieval_select(&r.t, &q.t, &qq.t, 1.0f, 2, &out.t, &idx.t, &count),
              QLLM_ERR_NONFINITE, "query: contains Inf at head 0, dim 0");
    tt_set(&q, IDX(0, 0), 1e35f);
    tt_set(&r, IDX(2, 0, 0), 6e4f); /* f16: finite, product overflows f32 */
    CHECK_ERR(qllm_retrieval_score(&r.t, &q.t, &qq.t, 1.0f, &out.t), QLLM_ERR_NONFINITE,
              "out: score of block 2 is");
    CHECK_ERR(qllm_retrieval_select(&r.t, &q.t, &qq.t, 1.0f, 2, &out.t, &idx.t, &count),
              QLLM_ERR_NONFINITE, "out_scores: score of block 2 is");
    tt_set(&q, IDX(0, 0), 0.5f);

    /* topk */
    CHECK_OK(qllm_retrieval_topk(&s.t, 3, &idx.t, &count));
    CHECK_ERR(qllm_retrieval_topk(NULL, 3, &idx.t, &count), QLLM_ERR_INVALID_ARG, "scores: must not be NULL");
    CHECK_ERR(qllm_retrieval_topk(&s.t, 3, NULL, &count), QLLM_ERR_INVALID_ARG, "out_idx: must not be NULL");
    CHECK_ERR(qllm_retrieval_topk(&s.t, 0, &idx.t, &count), QLLM_ERR_INVALID_ARG, "k: must be >= 1, got 0");
    CHECK_ERR(qllm_retrieval_topk(&s.t, -2, &idx.t, &count), QLLM_ERR_INVALID_ARG, "k: must be >= 1, got -2");
    CHECK_ERR(qllm_retrieval_topk(&s.t, 4, &idx.t, &count), QLLM_ERR_INVALID_ARG,
              "out_idx: dim 0 (k) expected at least 4");
    bad = s.t;
    bad.ndim = 2;
    bad.shape[1] = 1;
    CHECK_ERR(qllm_retrieval_topk(&bad, 3, &idx.t, &count), QLLM_ERR_INVALID_ARG, "scores: expected 1 dims");
    bad = s.t;
    bad.dtype = QLLM_DTYPE_BF16;
    CHECK_ERR(qllm_retrieval_topk(&bad, 3, &idx.t, &count), QLLM_ERR_INVALID_ARG, "scores: expected dtype f32, got bf16");
    bad = idx.t;
    bad.dtype = QLLM_DTYPE_F32;
    CHECK_ERR(qllm_retrieval_topk(&s.t, 3, &bad, &count), QLLM_ERR_INVALID_ARG, "out_idx: expected dtype i32, got f32");
    bad = idx.t;
    bad.strides[0] = -1;
    CHECK_ERR(qllm_retrieval_topk(&s.t, 3, &bad, &count), QLLM_ERR_INVALID_ARG, "out_idx: stride of dim 0");
    {
        static float big[1];
        qllm_tensor huge = {big, QLLM_DTYPE_F32, 1, {(int64_t)INT32_MAX + 2}, {0}};
        CHECK_ERR(qllm_retrieval_topk(&huge, 3, &idx.t, &count), QLLM_ERR_INVALID_ARG, "scores: at most 2^31");
    }
    tt_set(&s, IDX(3), NAN);
    CHECK_ERR(qllm_retrieval_topk(&s.t, 3, &idx.t, &count), QLLM_ERR_NONFINITE, "scores: contains NaN at block 3");
    tt_set(&s, IDX(3), 0.0f);
    tt_set(&s, IDX(4), -INFINITY);
    CHECK_ERR(qllm_retrieval_topk(&s.t, 3, &idx.t, &count), QLLM_ERR_NONFINITE, "scores: contains Inf at block 4");
    tt_set(&s, IDX(4), 0.0f);

    /* select validates everything before writing anything */
    memset(out.buf, SENTINEL, out.bytes);
    CHECK_ERR(qllm_retrieval_select(&r.t, &q.t, &qq.t, 1.0f, 0, &out.t, &idx.t, &count),
              QLLM_ERR_INVALID_ARG, "k: must be >= 1");
    CHECK_ERR(qllm_retrieval_select(&r.t, &q.t, &qq.t, 1.0f, 4, &out.t, &idx.t, &count),
              QLLM_ERR_INVALID_ARG, "out_idx: dim 0 (k) expected at least 4");
    CHECK_ERR(qllm_retrieval_select(&r.t, &q.t, &qq.t, 1.0f, 2, &out.t, NULL, &count),
              QLLM_ERR_INVALID_ARG, "out_idx: must not be NULL");
    CHECK_ERR(qllm_retrieval_select(&r.t, &q.t, &qq.t, 1.0f, 2, NULL, &idx.t, &count),
              QLLM_ERR_INVALID_ARG, "out_scores: must not be NULL");
    bad = out.t;
    bad.shape[0] = 6;
    CHECK_ERR(qllm_retrieval_select(&r.t, &q.t, &qq.t, 1.0f, 2, &bad, &idx.t, &count),
              QLLM_ERR_INVALID_ARG, "out_scores: dim 0 (blocks) expected 5");
    CHECK_ERR(qllm_retrieval_select(&r.t, &q.t, &qq.t, NAN, 2, &out.t, &idx.t, &count),
              QLLM_ERR_NONFINITE, "weight");
    long touched = 0;
    for (size_t i = 0; i < out.bytes; ++i)
        touched += out.buf[i] != SENTINEL;
    CHECK(touched == 0, "failed select wrote %ld bytes of out_scores", touched);

    /* NOMEM: a broadcast query of 1 x 2^46 needs a huge f32 copy */
    {
        static float one[2] = {1.0f, 1.0f};
        qllm_tensor hr = {one, QLLM_DTYPE_F32, 3, {1, 1, (int64_t)1 << 46}, {0, 0, 0}};
        qllm_tensor hq = {one, QLLM_DTYPE_F32, 2, {1, (int64_t)1 << 46}, {0, 0}};
        qllm_tensor ho = {one, QLLM_DTYPE_F32, 1, {1}, {1}};
        CHECK_ERR(qllm_retrieval_score(&hr, &hq, NULL, 0.0f, &ho), QLLM_ERR_NOMEM, "out of memory");
    }
    tt_free(&r);
    tt_free(&q);
    tt_free(&qq);
    tt_free(&out);
    tt_free(&idx);
    tt_free(&s);
}

/* ------------------------------------------------------------ gather_slots */

static void gather_slots_case(qllm_dtype dt, int64_t n_slots, int64_t H, int64_t T, int64_t D,
                              int64_t n, int lp, int ls, int lo) {
    tt pool, slots, out;
    tt_make(&pool, dt, 4, IDX(n_slots, H, T, D), lp);
    tt_make(&slots, QLLM_DTYPE_I32, 1, IDX(n), ls);
    tt_make(&out, dt, 3, IDX(H, n * T, D), lo);
    if (tt_numel(&pool) > 0) {
        int64_t i4[4] = {0, 0, 0, 0};
        do tt_set_raw(&pool, i4, (uint32_t)rng_u64()); while (idx_next(&pool, i4));
    }
    for (int64_t i = 0; i < n; ++i)
        tt_set_raw(&slots, IDX(i), (uint32_t)rng_int(0, n_slots));
    CHECK_OK(qllm_blocks_gather_slots(&pool.t, &slots.t, &out.t));
    long bad = 0;
    for (int64_t i = 0; i < n; ++i) {
        int64_t sl = (int32_t)tt_raw(&slots, IDX(i));
        for (int64_t h = 0; h < H; ++h)
            for (int64_t t = 0; t < T; ++t)
                for (int64_t d = 0; d < D; ++d)
                    if (tt_raw(&out, IDX(h, i * T + t, d)) != tt_raw(&pool, IDX(sl, h, t, d)))
                        bad++;
    }
    CHECK(bad == 0, "gather_slots %s n_slots=%" PRId64 " n=%" PRId64 " layouts=%s/%s/%s: %ld wrong",
          qllm_dtype_str(dt), n_slots, n, layout_name[lp], layout_name[ls], layout_name[lo], bad);
    CHECK(tt_sentinel_ok(&out), "gather_slots wrote outside out");
    tt_free(&pool);
    tt_free(&slots);
    tt_free(&out);
}

static void test_gather_slots(void) {
    for (int di = 0; di < 3; ++di)
        for (int l = 0; l < 3; ++l) {
            qllm_dtype dt = k_float_dtypes[di];
            gather_slots_case(dt, 1, 1, 1, 1, 1, l, l, l);
            gather_slots_case(dt, 5, 2, 3, 7, 9, l, (l + 1) % 3, (l + 2) % 3);
            gather_slots_case(dt, 4, 3, 8, 16, 4, L_BROADCAST, L_BROADCAST, l);
            gather_slots_case(dt, 3, 2, 4, 5, 0, l, l, l); /* n == 0 */
        }
    tt pool, slots, out;
    tt_make(&pool, QLLM_DTYPE_F16, 4, IDX(4, 2, 3, 5), L_CONTIG);
    tt_make(&slots, QLLM_DTYPE_I32, 1, IDX(3), L_CONTIG);
    tt_make(&out, QLLM_DTYPE_F16, 3, IDX(2, 9, 5), L_CONTIG);
    tt_fill(&pool, -1, 1, 0);
    tt_set_raw(&slots, IDX(0), 0);
    tt_set_raw(&slots, IDX(1), 3);
    tt_set_raw(&slots, IDX(2), 1);
    CHECK_OK(qllm_blocks_gather_slots(&pool.t, &slots.t, &out.t));
    memset(out.buf, SENTINEL, out.bytes);
    qllm_tensor bad;
    CHECK_ERR(qllm_blocks_gather_slots(NULL, &slots.t, &out.t), QLLM_ERR_INVALID_ARG, "pool: must not be NULL");
    CHECK_ERR(qllm_blocks_gather_slots(&pool.t, NULL, &out.t), QLLM_ERR_INVALID_ARG, "slots: must not be NULL");
    CHECK_ERR(qllm_blocks_gather_slots(&pool.t, &slots.t, NULL), QLLM_ERR_INVALID_ARG, "out: must not be NULL");
    bad = pool.t;
    bad.ndim = 3;
    CHECK_ERR(qllm_blocks_gather_slots(&bad, &slots.t, &out.t), QLLM_ERR_INVALID_ARG, "pool: expected 4 dims");
    bad = pool.t;
    bad.dtype = QLLM_DTYPE_I32;
    CHECK_ERR(qllm_blocks_gather_slots(&bad, &slots.t, &out.t), QLLM_ERR_INVALID_ARG, "pool: expected dtype");
    bad = slots.t;
    bad.dtype = QLLM_DTYPE_F32;
    CHECK_ERR(qllm_blocks_gather_slots(&pool.t, &bad, &out.t), QLLM_ERR_INVALID_ARG, "slots: expected dtype i32, got f32");
    bad = out.t;
    bad.dtype = QLLM_DTYPE_BF16;
    CHECK_ERR(qllm_blocks_gather_slots(&pool.t, &slots.t, &bad), QLLM_ERR_INVALID_ARG, "out: expected dtype f16, got bf16");
    bad = out.t;
    bad.shape[0] = 3;
    CHECK_ERR(qllm_blocks_gather_slots(&pool.t, &slots.t, &bad), QLLM_ERR_INVALID_ARG, "out: dim 0 (kv_heads) expected 2");
    bad = out.t;
    bad.shape[1] = 8;
    CHECK_ERR(qllm_blocks_gather_slots(&pool.t, &slots.t, &bad), QLLM_ERR_INVALID_ARG, "out: dim 1 (tokens) expected 9");
    bad = out.t;
    bad.shape[2] = 4;
    CHECK_ERR(qllm_blocks_gather_slots(&pool.t, &slots.t, &bad), QLLM_ERR_INVALID_ARG, "out: dim 2 (dim) expected 5");
    bad = slots.t;
    bad.strides[0] = -1;
    CHECK_ERR(qllm_blocks_gather_slots(&pool.t, &bad, &out.t), QLLM_ERR_INVALID_ARG, "slots: stride of dim 0");
    tt_set_raw(&slots, IDX(1), 4);
    CHECK_ERR(qllm_blocks_gather_slots(&pool.t, &slots.t, &out.t), QLLM_ERR_INVALID_ARG,
              "slots: value 4 at index 1 out of range [0, 4)");
    tt_set_raw(&slots, IDX(1), (uint32_t)-1);
    CHECK_ERR(qllm_blocks_gather_slots(&pool.t, &slots.t, &out.t), QLLM_ERR_INVALID_ARG, "slots: value -1 at index 1");
    long touched = 0;
    for (size_t i = 0; i < out.bytes; ++i)
        touched += out.buf[i] != SENTINEL;
    CHECK(touched == 0, "failed gather_slots wrote %ld bytes", touched);
    tt_free(&pool);
    tt_free(&slots);
    tt_free(&out);
}

/* ------------------------------------------------------------- block store */

static int move_eq(const qllm_block_move *m, int32_t block, int32_t ft, int32_t fs, int32_t tt_,
                   int32_t ts) {
    return m->block == block && m->from_tier == ft && m->from_slot == fs && m->to_tier == tt_ &&
           m->to_slot == ts;
}

static int move_empty(const qllm_block_move *m) { return m->block == -1; }

#define DEV QLLM_TIER_DEVICE
#define HOST QLLM_TIER_HOST
#define NONE QLLM_TIER_NONE

static void garbage_moves(qllm_block_move *mv, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        qllm_block_move g = {12345, 7, 7, 7, 7};
        mv[i] = g;
    }
}

static void check_where(qllm_blocks_t *s, int32_t id, int32_t tier, int32_t slot, int line) {
    int32_t t = -9, sl = -9;
    qllm_status st = qllm_blocks_lookup(s, id, &t, &sl);
    g_checks++;
    if (st != QLLM_OK || t != tier || sl != slot)
        fail_at(__FILE__, line, "lookup(%d) = %s tier %d slot %d, want tier %d slot %d", (int)id,
                qllm_status_str(st), (int)t, (int)sl, (int)tier, (int)slot);
}
#define WHERE(s, id, tier, slot) check_where((s), (id), (tier), (slot), __LINE__)

static qllm_blocks_t *bk_store(int64_t device_slots) {
    qllm_blocks_params p = qllm_blocks_default_params();
    p.block_size = 4;
    p.n_kv_heads = 1;
    p.head_dim = 2;
    p.device_slots = device_slots;
    qllm_blocks_t *s = NULL;
    CHECK_OK(qllm_blocks_init(&p, &s));
    return s;
}

static void test_blocks_scenarios(void) {
    qllm_blocks_params d = qllm_blocks_default_params();
    CHECK(d.block_size == 128 && d.n_kv_heads == 8 && d.head_dim == 128 && d.dtype == QLLM_DTYPE_BF16 &&
              d.device_slots == 1024 && d.device_k == NULL && d.device_v == NULL,
          "default params");

    qllm_block_move mv[8];
    int64_t n = -1;
    int32_t id = -1;
    qllm_blocks_t *s = bk_store(2);

    /* LRU order, eviction records, host slot recycling */
    garbage_moves(mv, 8);
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, &id, mv, &n));
    CHECK(id == 0 && n == 1 && move_eq(&mv[0], 0, NONE, -1, DEV, 0) && move_empty(&mv[1]), "append 0");
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, &id, mv, &n));
    CHECK(id == 1 && n == 1 && move_eq(&mv[0], 1, NONE, -1, DEV, 1), "append 1");
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, &id, mv, &n));
    CHECK(id == 2 && n == 2 && move_eq(&mv[0], 0, DEV, 0, HOST, 0) && move_eq(&mv[1], 2, NONE, -1, DEV, 0),
          "append 2 evicts 0 first");
    CHECK(qllm_blocks_count(s) == 3 && qllm_blocks_device_used(s) == 2 && qllm_blocks_host_used(s) == 1 &&
              qllm_blocks_host_capacity(s) == 1,
          "counters after 3 appends");
    CHECK_OK(qllm_blocks_touch(s, (const int32_t[]){1}, 1));
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, &id, mv, &n));
    CHECK(id == 3 && n == 2 && move_eq(&mv[0], 2, DEV, 0, HOST, 1) && move_eq(&mv[1], 3, NONE, -1, DEV, 0),
          "touched block 1 survives, 2 is evicted");
    garbage_moves(mv, 8);
    CHECK_OK(qllm_blocks_fetch(s, (const int32_t[]){0, 0, 2}, 3, mv, &n));
    CHECK(n == 4 && move_eq(&mv[0], 1, DEV, 1, HOST, 2) && move_eq(&mv[1], 0, HOST, 0, DEV, 1) &&
              move_eq(&mv[2], 3, DEV, 0, HOST, 0) && move_eq(&mv[3], 2, HOST, 1, DEV, 0) &&
              move_empty(&mv[4]) && move_empty(&mv[5]) && mv[6].block == 12345,
          "fetch with duplicates: n=%d [%d %d %d %d %d] [%d %d %d %d %d]", (int)n, mv[0].block,
          mv[0].from_tier, mv[0].from_slot, mv[0].to_tier, mv[0].to_slot, mv[2].block, mv[2].from_tier,
          mv[2].from_slot, mv[2].to_tier, mv[2].to_slot);
    WHERE(s, 0, DEV, 1);
    WHERE(s, 1, HOST, 2);
    WHERE(s, 2, DEV, 0);
    WHERE(s, 3, HOST, 0);
    CHECK(qllm_blocks_host_capacity(s) == 3 && qllm_blocks_host_used(s) == 2 && qllm_blocks_device_used(s) == 2,
          "counters after fetch");
    n = -1;
    CHECK_ERR(qllm_blocks_fetch(s, (const int32_t[]){1, 3, 0, 1}, 4, mv, &n), QLLM_ERR_CAPACITY,
              "ids: 3 distinct blocks");
    CHECK(n == -1, "failed fetch reports no moves");
    WHERE(s, 0, DEV, 1);
    WHERE(s, 1, HOST, 2);
    WHERE(s, 2, DEV, 0);
    WHERE(s, 3, HOST, 0);
    garbage_moves(mv, 8);
    CHECK_OK(qllm_blocks_fetch(s, (const int32_t[]){2}, 1, mv, &n));
    CHECK(n == 0 && move_empty(&mv[0]) && move_empty(&mv[1]), "fetch of a resident block moves nothing");
    CHECK_OK(qllm_blocks_fetch(s, NULL, 0, NULL, &n));
    CHECK(n == 0, "fetch of nothing");
    CHECK_OK(qllm_blocks_evict(s, 0, mv, &n));
    CHECK(n == 1 && move_eq(&mv[0], 0, DEV, 1, HOST, 1), "evict 0 -> recycled host slot 1");
    garbage_moves(mv, 8);
    CHECK_OK(qllm_blocks_evict(s, 0, mv, &n));
    CHECK(n == 0 && move_empty(&mv[0]), "evict of a host block is a no-op");
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, &id, mv, &n));
    CHECK(id == 4 && n == 1 && move_eq(&mv[0], 4, NONE, -1, DEV, 1), "append takes the freed device slot");
    CHECK(qllm_blocks_host_capacity(s) == 3 && qllm_blocks_host_used(s) == 3, "host counters");
    /* after the fetch above (one common tick for 2), 4 is newest: victim is 2 */
    CHECK_OK(qllm_blocks_fetch(s, (const int32_t[]){3}, 1, mv, &n));
    /* the eviction comes first, so the victim cannot reuse the host slot 3 is leaving */
    CHECK(n == 2 && move_eq(&mv[0], 2, DEV, 0, HOST, 3) && move_eq(&mv[1], 3, HOST, 0, DEV, 0),
          "fetch evicts the LRU block first");
    CHECK(qllm_blocks_host_capacity(s) == 4 && qllm_blocks_host_used(s) == 3, "host counters after fetch");

    qllm_blocks_clear(s);
    CHECK(qllm_blocks_count(s) == 0 && qllm_blocks_device_used(s) == 0 && qllm_blocks_host_used(s) == 0 &&
              qllm_blocks_host_capacity(s) == 4,
          "clear keeps host capacity");
    CHECK_ERR(qllm_blocks_lookup(s, 0, NULL, NULL), QLLM_ERR_NOT_FOUND, "id: block 0 not found");
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, &id, mv, &n));
    CHECK(id == 0 && n == 1 && move_eq(&mv[0], 0, NONE, -1, DEV, 0), "append after clear");
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, &id, mv, NULL));
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, &id, mv, &n));
    CHECK(n == 2 && move_eq(&mv[0], 0, DEV, 0, HOST, 0) && move_eq(&mv[1], 2, NONE, -1, DEV, 0),
          "host slots reused from 0 after clear");
    CHECK(qllm_blocks_host_capacity(s) == 4, "host capacity unchanged");
    qllm_blocks_free(s);

    /* ties in last use go to the lower id: fetch gives its ids one tick */
    s = bk_store(2);
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, NULL, mv, NULL));
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, NULL, mv, NULL));
    CHECK_OK(qllm_blocks_fetch(s, (const int32_t[]){1, 0}, 2, mv, &n));
    CHECK(n == 0, "resident fetch");
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, &id, mv, &n));
    CHECK(n == 2 && move_eq(&mv[0], 0, DEV, 0, HOST, 0), "tie -> lower id evicted");
    /* touch gives one tick per id, in order: the last one is the newest */
    CHECK_OK(qllm_blocks_touch(s, (const int32_t[]){1, 2}, 2));
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, &id, mv, &n));
    CHECK(n == 2 && move_eq(&mv[0], 1, DEV, 1, HOST, 1), "touch order: 1 older than 2");
    qllm_blocks_free(s);

    /* a failed touch touches nothing */
    s = bk_store(2);
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, NULL, mv, NULL));
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, NULL, mv, NULL));
    CHECK_ERR(qllm_blocks_touch(s, (const int32_t[]){0, 99}, 2), QLLM_ERR_NOT_FOUND, "ids: block 99 at index 1 not found");
    CHECK_ERR(qllm_blocks_touch(s, (const int32_t[]){0, -1}, 2), QLLM_ERR_NOT_FOUND, "ids: block -1");
    CHECK_ERR(qllm_blocks_touch(s, NULL, 2), QLLM_ERR_INVALID_ARG, "ids: must not be NULL");
    CHECK_ERR(qllm_blocks_touch(s, (const int32_t[]){0}, -1), QLLM_ERR_INVALID_ARG, "n: must be >= 0");
    CHECK_OK(qllm_blocks_touch(s, NULL, 0));
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, &id, mv, &n));
    CHECK(n == 2 && move_eq(&mv[0], 0, DEV, 0, HOST, 0), "failed touch left LRU order alone");
    /* a failed fetch (unknown id) moves nothing and touches nothing */
    CHECK_ERR(qllm_blocks_fetch(s, (const int32_t[]){0, 7}, 2, mv, &n), QLLM_ERR_NOT_FOUND, "ids: block 7 at index 1");
    CHECK_ERR(qllm_blocks_fetch(s, (const int32_t[]){0}, -3, mv, &n), QLLM_ERR_INVALID_ARG, "n: must be >= 0");
    CHECK_ERR(qllm_blocks_fetch(s, (const int32_t[]){0}, 1, NULL, &n), QLLM_ERR_INVALID_ARG, "out_moves");
    WHERE(s, 0, HOST, 0);
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, &id, mv, &n));
    CHECK(n == 2 && move_eq(&mv[0], 1, DEV, 1, HOST, 1), "failed fetch left LRU order alone");
    qllm_blocks_free(s);

    /* device_slots == 0: everything lives on the host */
    s = bk_store(0);
    for (int32_t i = 0; i < 3; ++i) {
        CHECK_OK(qllm_blocks_append(s, NULL, NULL, &id, mv, &n));
        CHECK(id == i && n == 1 && move_eq(&mv[0], i, NONE, -1, HOST, i) && move_empty(&mv[1]),
              "device_slots 0: append %d to host", (int)i);
    }
    CHECK(qllm_blocks_device_used(s) == 0 && qllm_blocks_host_used(s) == 3 && qllm_blocks_host_capacity(s) == 3,
          "device_slots 0 counters");
    CHECK_ERR(qllm_blocks_fetch(s, (const int32_t[]){1}, 1, mv, &n), QLLM_ERR_CAPACITY, "device tier has 0 slots");
    CHECK_OK(qllm_blocks_fetch(s, NULL, 0, mv, &n));
    CHECK_OK(qllm_blocks_evict(s, 1, mv, &n));
    CHECK(n == 0, "evict with device_slots 0");
    WHERE(s, 1, HOST, 1);
    qllm_blocks_free(s);

    /* argument errors */
    qllm_blocks_params p = qllm_blocks_default_params();
    qllm_blocks_t *o = (qllm_blocks_t *)&p; /* must be reset to NULL on failure */
    CHECK_ERR(qllm_blocks_init(NULL, &o), QLLM_ERR_INVALID_ARG, "params: must not be NULL");
    CHECK(o == NULL, "init failure sets *out = NULL");
    CHECK_ERR(qllm_blocks_init(&p, NULL), QLLM_ERR_INVALID_ARG, "out: must not be NULL");
    p.block_size = 0;
    CHECK_ERR(qllm_blocks_init(&p, &o), QLLM_ERR_INVALID_ARG, "params.block_size: must be >= 1");
    p = qllm_blocks_default_params();
    p.n_kv_heads = -1;
    CHECK_ERR(qllm_blocks_init(&p, &o), QLLM_ERR_INVALID_ARG, "params.n_kv_heads");
    p = qllm_blocks_default_params();
    p.head_dim = 0;
    CHECK_ERR(qllm_blocks_init(&p, &o), QLLM_ERR_INVALID_ARG, "params.head_dim");
    p = qllm_blocks_default_params();
    p.dtype = QLLM_DTYPE_I32;
    CHECK_ERR(qllm_blocks_init(&p, &o), QLLM_ERR_INVALID_ARG, "params.dtype: expected f32, f16 or bf16, got i32");
    p = qllm_blocks_default_params();
    p.device_slots = -1;
    CHECK_ERR(qllm_blocks_init(&p, &o), QLLM_ERR_INVALID_ARG, "params.device_slots");
    p.device_slots = (int64_t)INT32_MAX + 1;
    CHECK_ERR(qllm_blocks_init(&p, &o), QLLM_ERR_INVALID_ARG, "params.device_slots");
    p = qllm_blocks_default_params();
    float pool[64];
    p.device_k = pool;
    CHECK_ERR(qllm_blocks_init(&p, &o), QLLM_ERR_INVALID_ARG, "params.device_k/device_v: give both");
    p = qllm_blocks_default_params();
    p.block_size = INT64_MAX / 4;
    p.head_dim = INT64_MAX / 4;
    CHECK_ERR(qllm_blocks_init(&p, &o), QLLM_ERR_INVALID_ARG, "overflows");
    p = qllm_blocks_default_params();
    p.device_k = (char *)pool + 1;
    p.device_v = pool;
    CHECK_ERR(qllm_blocks_init(&p, &o), QLLM_ERR_INVALID_ARG, "not aligned");
    CHECK(o == NULL, "no store on failure");

    s = bk_store(2);
    tt k;
    tt_make(&k, QLLM_DTYPE_BF16, 3, IDX(1, 4, 2), L_CONTIG);
    CHECK_ERR(qllm_blocks_append(NULL, NULL, NULL, &id, mv, &n), QLLM_ERR_INVALID_ARG, "store: must not be NULL");
    CHECK_ERR(qllm_blocks_append(s, &k.t, &k.t, &id, mv, &n), QLLM_ERR_INVALID_ARG, "k: must be NULL in bookkeeping mode");
    CHECK_ERR(qllm_blocks_append(s, NULL, &k.t, &id, mv, &n), QLLM_ERR_INVALID_ARG, "v: must be NULL in bookkeeping mode");
    CHECK_ERR(qllm_blocks_append(s, NULL, NULL, &id, NULL, &n), QLLM_ERR_INVALID_ARG, "out_moves: must not be NULL");
    CHECK(qllm_blocks_count(s) == 0, "failed appends add nothing");
    CHECK_OK(qllm_blocks_append(s, NULL, NULL, &id, mv, &n));
    CHECK_ERR(qllm_blocks_lookup(s, 1, NULL, NULL), QLLM_ERR_NOT_FOUND, "id: block 1 not found");
    CHECK_ERR(qllm_blocks_lookup(s, -1, NULL, NULL), QLLM_ERR_NOT_FOUND, "id: block -1 not found");
    CHECK_ERR(qllm_blocks_lookup(NULL, 0, NULL, NULL), QLLM_ERR_INVALID_ARG, "store");
    CHECK_ERR(qllm_blocks_evict(s, 5, mv, &n), QLLM_ERR_NOT_FOUND, "id: block 5 not found");
    CHECK_ERR(qllm_blocks_evict(s, 0, NULL, &n), QLLM_ERR_INVALID_ARG, "out_moves");
    CHECK_ERR(qllm_blocks_evict(NULL, 0, mv, &n), QLLM_ERR_INVALID_ARG, "store");
    CHECK_ERR(qllm_blocks_touch(NULL, NULL, 0), QLLM_ERR_INVALID_ARG, "store");
    CHECK_ERR(qllm_blocks_fetch(NULL, NULL, 0, mv, &n), QLLM_ERR_INVALID_ARG, "store");
    tt ok_, ov_;
    tt_make(&ok_, QLLM_DTYPE_BF16, 3, IDX(1, 4, 2), L_CONTIG);
    tt_make(&ov_, QLLM_DTYPE_BF16, 3, IDX(1, 4, 2), L_CONTIG);
    CHECK_ERR(qllm_blocks_gather(s, (const int32_t[]){0}, 1, &ok_.t, &ov_.t), QLLM_ERR_INVALID_ARG, "data mode");
    CHECK_ERR(qllm_blocks_gather(NULL, (const int32_t[]){0}, 1, &ok_.t, &ov_.t), QLLM_ERR_INVALID_ARG, "store");
    tt_free(&ok_);
    tt_free(&ov_);
    tt_free(&k);
    qllm_blocks_free(s);

    /* NULL handle */
    qllm_blocks_free(NULL);
    qllm_blocks_clear(NULL);
    CHECK(qllm_blocks_count(NULL) == 0 && qllm_blocks_device_used(NULL) == 0 &&
              qllm_blocks_host_used(NULL) == 0 && qllm_blocks_host_capacity(NULL) == 0,
          "NULL store counters");
}

/* Independent model of a store: placement follows the reported moves, which
 * are performed in order on simulated pools (a slot must be empty when a
 * block moves in); LRU follows the documented clock (append / touch: one
 * tick per id in order; fetch: one tick for all its ids). */
#define MODEL_MAX 2048

typedef struct {
    qllm_blocks_t *s;
    int data;
    qllm_dtype dt;
    int64_t S, bs, H, D, belems;
    size_t esize;
    void *dev_k, *dev_v;
    int64_t count;
    int tier[MODEL_MAX], slot[MODEL_MAX];
    uint64_t lu[MODEL_MAX], clock;
    int dev_pool[MODEL_MAX], host_pool[MODEL_MAX];
    int64_t host_peak;
    unsigned char *kdata[MODEL_MAX], *vdata[MODEL_MAX];
} model;

static int model_host_used(const model *m) {
    int n = 0;
    for (int i = 0; i < MODEL_MAX; ++i)
        n += m->host_pool[i] >= 0;
    return n;
}

/* Expected eviction victim: device block with the smallest (last use, id) not in ids. */
static int model_victim(const model *m, const int32_t *ids, int64_t n) {
    int best = -1;
    for (int b = 0; b < m->count; ++b) {
        if (m->tier[b] != DEV)
            continue;
        int in = 0;
        for (int64_t i = 0; i < n; ++i)
            in |= ids[i] == b;
        if (in)
            continue;
        if (best < 0 || m->lu[b] < m->lu[best])
            best = b;
    }
    return best;
}

/* Perform moves in order on the model; `ids` are excluded from eviction
 * (fetch), `explicit_evict` is the id of qllm_blocks_evict (or -1). */
static void model_apply(model *m, const qllm_block_move *mv, int64_t n, const int32_t *ids,
                        int64_t nids, int explicit_evict, int line) {
    for (int64_t i = 0; i < n; ++i) {
        const qllm_block_move *x = &mv[i];
        int b = x->block, ok = b >= 0 && b < MODEL_MAX;
        if (ok && x->from_tier == NONE) {
            ok = b == m->count && x->from_slot == -1;
            if (ok && x->to_tier == DEV)
                ok = x->to_slot >= 0 && x->to_slot < m->S && m->dev_pool[x->to_slot] < 0;
            else if (ok)
                ok = x->to_tier == HOST && x->to_slot >= 0 && x->to_slot < MODEL_MAX && m->host_pool[x->to_slot] < 0;
            if (ok) {
                m->tier[b] = x->to_tier;
                m->slot[b] = x->to_slot;
                (x->to_tier == DEV ? m->dev_pool : m->host_pool)[x->to_slot] = b;
            }
        } else if (ok && x->from_tier == DEV && x->to_tier == HOST) {
            int want = explicit_evict >= 0 ? explicit_evict : model_victim(m, ids, nids);
            ok = b == want && m->tier[b] == DEV && m->slot[b] == x->from_slot && x->to_slot >= 0 &&
                 x->to_slot < MODEL_MAX && m->host_pool[x->to_slot] < 0;
            if (ok) {
                m->dev_pool[x->from_slot] = -1;
                m->host_pool[x->to_slot] = b;
                m->tier[b] = HOST;
                m->slot[b] = x->to_slot;
            } else {
                fail_at(__FILE__, line, "eviction of %d, expected victim %d", b, want);
            }
        } else if (ok && x->from_tier == HOST && x->to_tier == DEV) {
            int in = 0;
            for (int64_t j = 0; j < nids; ++j)
                in |= ids[j] == b;
            ok = in && m->tier[b] == HOST && m->slot[b] == x->from_slot && x->to_slot >= 0 &&
                 x->to_slot < m->S && m->dev_pool[x->to_slot] < 0;
            if (ok) {
                m->host_pool[x->from_slot] = -1;
                m->dev_pool[x->to_slot] = b;
                m->tier[b] = DEV;
                m->slot[b] = x->to_slot;
            }
        } else {
            ok = 0;
        }
        g_checks++;
        if (!ok)
            fail_at(__FILE__, line, "bad move %d: block %d %d/%d -> %d/%d", (int)i, x->block,
                    x->from_tier, x->from_slot, x->to_tier, x->to_slot);
        int64_t used = model_host_used(m);
        if (used > m->host_peak)
            m->host_peak = used;
    }
}

static void model_check(model *m, int line) {
    int bad = 0, ndev = 0, nhost = 0;
    for (int b = 0; b < m->count; ++b) {
        int32_t t = -9, sl = -9;
        if (qllm_blocks_lookup(m->s, b, &t, &sl) != QLLM_OK || t != m->tier[b] || sl != m->slot[b])
            bad++;
        ndev += m->tier[b] == DEV;
        nhost += m->tier[b] == HOST;
        if (m->data && m->tier[b] == DEV) { /* the device pool holds the block's data */
            size_t bb = (size_t)m->belems * m->esize;
            if (memcmp((char *)m->dev_k + (size_t)m->slot[b] * bb, m->kdata[b], bb) != 0 ||
                memcmp((char *)m->dev_v + (size_t)m->slot[b] * bb, m->vdata[b], bb) != 0)
                bad++;
        }
    }
    g_checks++;
    if (bad || qllm_blocks_count(m->s) != m->count || qllm_blocks_device_used(m->s) != ndev ||
        qllm_blocks_host_used(m->s) != nhost || qllm_blocks_host_capacity(m->s) != m->host_peak)
        fail_at(__FILE__, line,
                "store/model mismatch: %d bad blocks; count %" PRId64 "/%" PRId64 " dev %" PRId64
                "/%d host %" PRId64 "/%d capacity %" PRId64 "/%" PRId64,
                bad, qllm_blocks_count(m->s), m->count, qllm_blocks_device_used(m->s), ndev,
                qllm_blocks_host_used(m->s), nhost, qllm_blocks_host_capacity(m->s), m->host_peak);
}

static void random_ids(const model *m, int32_t *ids, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        ids[i] = (int32_t)rng_int(0, m->count);
}

static void op_append(model *m) {
    qllm_block_move mv[2];
    garbage_moves(mv, 2);
    int64_t n = -1;
    int32_t id = -1;
    const int full = m->S > 0 && qllm_blocks_device_used(m->s) == m->S;
    qllm_status st;
    if (m->data) {
        tt k, v;
        tt_make(&k, m->dt, 3, IDX(m->H, m->bs, m->D), (int)rng_int(0, L_COUNT));
        tt_make(&v, m->dt, 3, IDX(m->H, m->bs, m->D), (int)rng_int(0, L_COUNT));
        int64_t i3[3] = {0, 0, 0};
        do {
            tt_set_raw(&k, i3, (uint32_t)rng_u64());
            tt_set_raw(&v, i3, (uint32_t)rng_u64());
        } while (idx_next(&k, i3));
        unsigned char *kd = (unsigned char *)malloc((size_t)m->belems * m->esize);
        unsigned char *vd = (unsigned char *)malloc((size_t)m->belems * m->esize);
        int64_t e = 0;
        memset(i3, 0, sizeof i3);
        do {
            uint32_t rk = tt_raw(&k, i3), rv = tt_raw(&v, i3);
            memcpy(kd + (size_t)e * m->esize, &rk, m->esize); /* little endian */
            memcpy(vd + (size_t)e * m->esize, &rv, m->esize);
            e++;
        } while (idx_next(&k, i3));
        st = qllm_blocks_append(m->s, &k.t, &v.t, &id, (rng_u64() & 1) ? mv : NULL, &n);
        if (st == QLLM_OK && m->count < MODEL_MAX) {
            m->kdata[m->count] = kd;
            m->vdata[m->count] = vd;
        } else {
            free(kd);
            free(vd);
        }
        tt_free(&k);
        tt_free(&v);
        if (mv[0].block == 12345) { /* moves not requested: rebuild them for the model */
            int32_t t, sl;
            qllm_blocks_lookup(m->s, id, &t, &sl);
            int64_t j = 0;
            if (full) {
                int victim = model_victim(m, NULL, 0);
                qllm_blocks_lookup(m->s, victim, &t, &sl);
                qllm_block_move ev = {victim, DEV, m->slot[victim], HOST, sl};
                mv[j++] = ev;
            }
            qllm_blocks_lookup(m->s, id, &t, &sl);
            qllm_block_move pl = {id, NONE, -1, t, sl};
            mv[j++] = pl;
            if (j < 2)
                mv[1].block = -1;
        }
    } else {
        st = qllm_blocks_append(m->s, NULL, NULL, &id, mv, &n);
    }
    CHECK(st == QLLM_OK, "append: %s %s", qllm_status_str(st), qllm_last_error());
    if (st != QLLM_OK)
        return;
    const int64_t want = (m->S > 0 && full) ? 2 : 1;
    CHECK(id == m->count && n == want && (n == 2 || move_empty(&mv[1])),
          "append id %d (want %d), %d moves (want %d)", (int)id, (int)m->count, (int)n, (int)want);
    CHECK(mv[n - 1].from_tier == NONE && mv[n - 1].to_tier == (m->S > 0 ? DEV : HOST), "placement last");
    model_apply(m, mv, n, NULL, 0, -1, __LINE__);
    m->lu[m->count] = ++m->clock;
    m->count++;
}

static void op_touch(model *m) {
    int32_t ids[6];
    int64_t n = rng_int(0, 6);
    random_ids(m, ids, n);
    if (n > 0 && rng_int(0, 8) == 0) {
        ids[rng_int(0, n)] = (int32_t)(m->count + rng_int(0, 3));
        CHECK_ERR(qllm_blocks_touch(m->s, ids, n), QLLM_ERR_NOT_FOUND, "ids: block");
        return;
    }
    CHECK_OK(qllm_blocks_touch(m->s, ids, n));
    for (int64_t i = 0; i < n; ++i)
        m->lu[ids[i]] = ++m->clock;
}

static void op_fetch(model *m) {
    int32_t ids[16];
    int64_t n = rng_int(0, m->S + 3 < 16 ? m->S + 3 : 16);
    random_ids(m, ids, n);
    if (n > 1 && rng_int(0, 3) == 0)
        ids[n - 1] = ids[0]; /* duplicate */
    qllm_block_move mv[32];
    garbage_moves(mv, 32);
    int64_t nm = -1;
    if (n > 0 && rng_int(0, 10) == 0) {
        ids[rng_int(0, n)] = -1 - (int32_t)rng_int(0, 3);
        CHECK_ERR(qllm_blocks_fetch(m->s, ids, n, mv, &nm), QLLM_ERR_NOT_FOUND, "ids: block -");
        CHECK(nm == -1 && mv[0].block == 12345, "failed fetch reported moves");
        return;
    }
    int64_t distinct = 0, misses = 0;
    for (int64_t i = 0; i < n; ++i) {
        int seen = 0;
        for (int64_t j = 0; j < i; ++j)
            seen |= ids[j] == ids[i];
        if (!seen) {
            distinct++;
            misses += m->tier[ids[i]] != DEV;
        }
    }
    const int use_moves = !m->data || (rng_u64() & 1);
    qllm_status st = qllm_blocks_fetch(m->s, ids, n, use_moves ? mv : NULL, &nm);
    if (distinct > m->S) {
        CHECK(st == QLLM_ERR_CAPACITY && strstr(qllm_last_error(), "ids:") != NULL,
              "fetch of %d distinct into %d slots: %s", (int)distinct, (int)m->S, qllm_status_str(st));
        CHECK(nm == -1 && mv[0].block == 12345, "capacity error reported moves");
        return; /* model_check verifies that nothing moved */
    }
    CHECK(st == QLLM_OK, "fetch: %s %s", qllm_status_str(st), qllm_last_error());
    if (st != QLLM_OK)
        return;
    int64_t placements = 0;
    if (use_moves) {
        for (int64_t i = 0; i < nm; ++i)
            placements += mv[i].to_tier == DEV;
        for (int64_t i = nm; i < 2 * n; ++i)
            CHECK(move_empty(&mv[i]), "fetch record %d past the end is not empty", (int)i);
        CHECK(mv[2 * n].block == 12345, "fetch wrote past 2n records");
        model_apply(m, mv, nm, ids, n, -1, __LINE__);
    } else { /* data mode without records: adopt the store's placement */
        for (int b = 0; b < m->count; ++b) {
            int32_t t, sl;
            qllm_blocks_lookup(m->s, b, &t, &sl);
            if (m->tier[b] != t && t == DEV)
                placements++;
        }
        for (int i = 0; i < MODEL_MAX; ++i)
            m->dev_pool[i] = m->host_pool[i] = -1;
        for (int b = 0; b < m->count; ++b) {
            int32_t t, sl;
            qllm_blocks_lookup(m->s, b, &t, &sl);
            m->tier[b] = t;
            m->slot[b] = sl;
            (t == DEV ? m->dev_pool : m->host_pool)[sl] = b;
        }
        int64_t used = model_host_used(m);
        if (qllm_blocks_host_capacity(m->s) >= used && qllm_blocks_host_capacity(m->s) <= m->host_peak + misses)
            m->host_peak = qllm_blocks_host_capacity(m->s);
    }
    CHECK(placements == misses, "fetch placed %d blocks, %d were missing", (int)placements, (int)misses);
    for (int64_t i = 0; i < n; ++i)
        CHECK(m->tier[ids[i]] == DEV, "fetched block %d not on device", ids[i]);
    const uint64_t now = ++m->clock;
    for (int64_t i = 0; i < n; ++i)
        m->lu[ids[i]] = now;
}

static void op_evict(model *m) {
    qllm_block_move mv[2];
    garbage_moves(mv, 2);
    int64_t n = -1;
    if (rng_int(0, 10) == 0) {
        CHECK_ERR(qllm_blocks_evict(m->s, (int32_t)(m->count + rng_int(0, 2)), mv, &n),
                  QLLM_ERR_NOT_FOUND, "id: block");
        return;
    }
    int32_t id = (int32_t)rng_int(0, m->count);
    const int was_dev = m->tier[id] == DEV;
    CHECK_OK(qllm_blocks_evict(m->s, id, mv, &n));
    CHECK(n == (was_dev ? 1 : 0) && (was_dev || move_empty(&mv[0])) && mv[1].block == 12345,
          "evict %d: %d moves", (int)id, (int)n);
    model_apply(m, mv, n, NULL, 0, id, __LINE__);
}

static void op_gather(model *m) {
    int32_t ids[8];
    int64_t n = rng_int(0, 8);
    random_ids(m, ids, n);
    int lk = (int)rng_int(0, 3), lv = (int)rng_int(0, 3);
    tt ok, ov;
    tt_make(&ok, m->dt, 3, IDX(m->H, n * m->bs, m->D), lk);
    tt_make(&ov, m->dt, 3, IDX(m->H, n * m->bs, m->D), lv);
    if (!m->data) {
        CHECK_ERR(qllm_blocks_gather(m->s, ids, n, &ok.t, &ov.t), QLLM_ERR_INVALID_ARG, "data mode");
    } else {
        CHECK_OK(qllm_blocks_gather(m->s, ids, n, &ok.t, &ov.t));
        long bad = 0;
        for (int64_t i = 0; i < n; ++i)
            for (int64_t h = 0; h < m->H; ++h)
                for (int64_t t = 0; t < m->bs; ++t)
                    for (int64_t d = 0; d < m->D; ++d) {
                        size_t e = (size_t)((h * m->bs + t) * m->D + d) * m->esize;
                        uint32_t wk = 0, wv = 0;
                        memcpy(&wk, m->kdata[ids[i]] + e, m->esize);
                        memcpy(&wv, m->vdata[ids[i]] + e, m->esize);
                        bad += tt_raw(&ok, IDX(h, i * m->bs + t, d)) != wk;
                        bad += tt_raw(&ov, IDX(h, i * m->bs + t, d)) != wv;
                    }
        CHECK(bad == 0, "gather of %d blocks: %ld elements differ from what was appended", (int)n, bad);
        CHECK(tt_sentinel_ok(&ok) && tt_sentinel_ok(&ov), "gather wrote outside its outputs");
    }
    tt_free(&ok);
    tt_free(&ov);
}

static void model_clear(model *m) {
    qllm_blocks_clear(m->s);
    for (int b = 0; b < m->count; ++b) {
        free(m->kdata[b]);
        free(m->vdata[b]);
        m->kdata[b] = m->vdata[b] = NULL;
    }
    m->count = 0;
    for (int i = 0; i < MODEL_MAX; ++i)
        m->dev_pool[i] = m->host_pool[i] = -1;
}

static void fuzz_store(int data, qllm_dtype dt, int64_t S, int ops) {
    model *m = (model *)calloc(1, sizeof *m);
    m->data = data;
    m->dt = dt;
    m->S = S;
    m->bs = 3;
    m->H = 2;
    m->D = 5;
    m->belems = m->bs * m->H * m->D;
    m->esize = qllm_dtype_size(dt);
    for (int i = 0; i < MODEL_MAX; ++i)
        m->dev_pool[i] = m->host_pool[i] = -1;
    qllm_blocks_params p = qllm_blocks_default_params();
    p.block_size = m->bs;
    p.n_kv_heads = m->H;
    p.head_dim = m->D;
    p.dtype = dt;
    p.device_slots = S;
    if (data) {
        m->dev_k = calloc((size_t)(S + 1) * (size_t)m->belems, m->esize);
        m->dev_v = calloc((size_t)(S + 1) * (size_t)m->belems, m->esize);
        p.device_k = m->dev_k;
        p.device_v = m->dev_v;
    }
    CHECK_OK(qllm_blocks_init(&p, &m->s));
    for (int op = 0; op < ops && m->s != NULL; ++op) {
        int r = (int)rng_int(0, 100);
        if (m->count == 0 || r < 35)
            op_append(m);
        else if (r < 50)
            op_touch(m);
        else if (r < 75)
            op_fetch(m);
        else if (r < 85)
            op_evict(m);
        else if (r < 99)
            op_gather(m);
        else
            model_clear(m);
        model_check(m, __LINE__);
    }
    model_clear(m);
    qllm_blocks_free(m->s);
    free(m->dev_k);
    free(m->dev_v);
    free(m);
}

static void test_blocks_data(void) {
    /* data-mode argument errors */
    float dk[2 * 6], dv[2 * 6];
    qllm_blocks_params p = qllm_blocks_default_params();
    p.block_size = 2;
    p.n_kv_heads = 1;
    p.head_dim = 3;
    p.dtype = QLLM_DTYPE_F32;
    p.device_slots = 2;
    p.device_k = dk;
    p.device_v = dv;
    qllm_blocks_t *s = NULL;
    CHECK_OK(qllm_blocks_init(&p, &s));
    tt k, k2, kb;
    tt_make(&k, QLLM_DTYPE_F32, 3, IDX(1, 2, 3), L_PERMUTED);
    tt_make(&k2, QLLM_DTYPE_F32, 3, IDX(1, 3, 3), L_CONTIG);
    tt_make(&kb, QLLM_DTYPE_F16, 3, IDX(1, 2, 3), L_CONTIG);
    tt_fill(&k, -1, 1, 0);
    int64_t n;
    qllm_block_move mv[4];
    CHECK_ERR(qllm_blocks_append(s, NULL, &k.t, NULL, NULL, &n), QLLM_ERR_INVALID_ARG, "k: must not be NULL in data mode");
    CHECK_ERR(qllm_blocks_append(s, &k.t, NULL, NULL, NULL, &n), QLLM_ERR_INVALID_ARG, "v: must not be NULL in data mode");
    CHECK_ERR(qllm_blocks_append(s, &k2.t, &k.t, NULL, NULL, &n), QLLM_ERR_INVALID_ARG, "k: dim 1 (tokens) expected 2");
    CHECK_ERR(qllm_blocks_append(s, &k.t, &kb.t, NULL, NULL, &n), QLLM_ERR_INVALID_ARG, "v: expected dtype f32, got f16");
    qllm_tensor bad = k.t;
    bad.ndim = 2;
    CHECK_ERR(qllm_blocks_append(s, &k.t, &bad, NULL, NULL, &n), QLLM_ERR_INVALID_ARG, "v: expected 3 dims");
    CHECK(qllm_blocks_count(s) == 0, "failed data appends add nothing");
    CHECK_OK(qllm_blocks_append(s, &k.t, &k.t, NULL, NULL, NULL));
    CHECK_OK(qllm_blocks_append(s, &k.t, &k.t, NULL, mv, &n));
    tt gk, gv;
    tt_make(&gk, QLLM_DTYPE_F32, 3, IDX(1, 4, 3), L_CONTIG);
    tt_make(&gv, QLLM_DTYPE_F32, 3, IDX(1, 4, 3), L_CONTIG);
    CHECK_ERR(qllm_blocks_gather(s, (const int32_t[]){0, 2}, 2, &gk.t, &gv.t), QLLM_ERR_NOT_FOUND, "ids: block 2 at index 1");
    CHECK_ERR(qllm_blocks_gather(s, NULL, 2, &gk.t, &gv.t), QLLM_ERR_INVALID_ARG, "ids: must not be NULL");
    CHECK_ERR(qllm_blocks_gather(s, (const int32_t[]){0}, 1, &gk.t, &gv.t), QLLM_ERR_INVALID_ARG,
              "out_k: dim 1 (tokens) expected 2");
    bad = gv.t;
    bad.dtype = QLLM_DTYPE_BF16;
    CHECK_ERR(qllm_blocks_gather(s, (const int32_t[]){0, 1}, 2, &gk.t, &bad), QLLM_ERR_INVALID_ARG,
              "out_v: expected dtype f32, got bf16");
    CHECK_ERR(qllm_blocks_gather(s, (const int32_t[]){0, 1}, 2, NULL, &gv.t), QLLM_ERR_INVALID_ARG, "out_k: must not be NULL");
    CHECK_OK(qllm_blocks_gather(s, (const int32_t[]){0, 1}, 2, &gk.t, &gv.t));
    qllm_tensor e = {NULL, QLLM_DTYPE_F32, 3, {1, 0, 3}, {0, 3, 1}};
    CHECK_OK(qllm_blocks_gather(s, NULL, 0, &e, &e));
    qllm_blocks_free(s);
    tt_free(&k);
    tt_free(&k2);
    tt_free(&kb);
    tt_free(&gk);
    tt_free(&gv);

    /* the model, both modes, every dtype, several device capacities */
    static const int64_t caps[] = {0, 1, 3, 6};
    for (int data = 0; data < 2; ++data)
        for (size_t ci = 0; ci < sizeof caps / sizeof caps[0]; ++ci)
            fuzz_store(data, k_float_dtypes[(ci + (size_t)data) % 3], caps[ci], 700);
}

/* ----------------------------------------------------------------- threads */

static void test_threads(void) {
    const int def = qllm_get_num_threads();
    CHECK(def >= 1 && def <= 64, "default thread count %d", def);
    qllm_set_num_threads(4);
    CHECK(qllm_get_num_threads() == 4, "set 4");
    qllm_set_num_threads(1000);
    CHECK(qllm_get_num_threads() == 64, "clamped to 64");
    qllm_set_num_threads(-3);
    CHECK(qllm_get_num_threads() == def, "n <= 0 restores the default");

    /* repr: 512 x 4 x (64 + 8 * 64) ~ 1.2M units: above the threading threshold */
    const int64_t B = 512, Hkv = 2, Hq = 4, T = 64, D = 64;
    tt keys, scores, out[3];
    tt_make(&keys, QLLM_DTYPE_F16, 4, IDX(B, Hkv, T, D), L_CONTIG);
    tt_make(&scores, QLLM_DTYPE_F32, 3, IDX(B, Hq, T), L_PADDED);
    tt_fill(&keys, -2, 2, 0);
    tt_fill(&scores, 0, 5, 1);
    const int nth[3] = {1, 4, 3};
    for (int i = 0; i < 3; ++i) {
        tt_make(&out[i], QLLM_DTYPE_F32, 3, IDX(B, Hq, D), L_CONTIG);
        qllm_set_num_threads(nth[i]);
        CHECK_OK(qllm_repr_compute(&keys.t, &scores.t, 8, &out[i].t));
    }
    CHECK(memcmp(out[0].buf, out[1].buf, out[0].bytes) == 0 && memcmp(out[0].buf, out[2].buf, out[0].bytes) == 0,
          "repr: 1 / 4 / 3 threads differ");
    uint32_t *want = (uint32_t *)malloc((size_t)(B * Hq * D) * sizeof *want);
    ref_repr(&keys, &scores, 8, QLLM_DTYPE_F32, want);
    long bad = 0;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Hq; ++h)
            for (int64_t d = 0; d < D; ++d)
                bad += tt_raw(&out[1], IDX(b, h, d)) != want[(b * Hq + h) * D + d];
    CHECK(bad == 0, "threaded repr vs reference: %ld mismatches", bad);
    free(want);
    /* the first non-finite score is reported whatever the thread count */
    tt_set(&scores, IDX(400, 1, 5), NAN);
    tt_set(&scores, IDX(300, 2, 9), INFINITY);
    for (int i = 0; i < 3; ++i) {
        qllm_set_num_threads(nth[i]);
        CHECK_ERR(qllm_repr_compute(&keys.t, &scores.t, 8, &out[i].t), QLLM_ERR_NONFINITE,
                  "scores: contains Inf at block 300, head 2, token 9");
    }
    for (int i = 0; i < 3; ++i)
        tt_free(&out[i]);
    tt_free(&keys);
    tt_free(&scores);

    /* score / select: 3000 x 8 x 64 x 2 ~ 3M MACs */
    const int64_t NB = 3000, NH = 8, ND = 64;
    tt r, q, qq, so[3], io[3];
    tt_make(&r, QLLM_DTYPE_BF16, 3, IDX(NB, NH, ND), L_CONTIG);
    tt_make(&q, QLLM_DTYPE_F32, 2, IDX(NH, ND), L_CONTIG);
    tt_make(&qq, QLLM_DTYPE_F32, 2, IDX(NH, ND), L_CONTIG);
    tt_fill(&r, -1, 1, 0);
    tt_fill(&q, -1, 1, 0);
    tt_fill(&qq, -1, 1, 0);
    for (int i = 0; i < 3; ++i) {
        tt_make(&so[i], QLLM_DTYPE_F32, 1, IDX(NB), L_CONTIG);
        tt_make(&io[i], QLLM_DTYPE_I32, 1, IDX(16), L_CONTIG);
        qllm_set_num_threads(nth[i]);
        CHECK_OK(qllm_retrieval_select(&r.t, &q.t, &qq.t, 2.0f, 16, &so[i].t, &io[i].t, NULL));
    }
    CHECK(memcmp(so[0].buf, so[1].buf, so[0].bytes) == 0 && memcmp(so[0].buf, so[2].buf, so[0].bytes) == 0,
          "scores: 1 / 4 / 3 threads differ");
    CHECK(memcmp(io[0].buf, io[1].buf, io[0].bytes) == 0 && memcmp(io[0].buf, io[2].buf, io[0].bytes) == 0,
          "top-k: 1 / 4 / 3 threads differ");
    bad = 0;
    for (int64_t b = 0; b < NB; ++b) {
        double mag, w = ref_score(&r, &q, &qq, 2.0, b, &mag);
        bad += !(fabs(tt_get(&so[1], IDX(b)) - w) <= 1e-5 * mag + 1e-6);
    }
    CHECK(bad == 0, "threaded scores vs reference: %ld bad", bad);
    tt_set(&r, IDX(2500, 3, 7), NAN);
    tt_set(&r, IDX(2999, 0, 0), INFINITY);
    for (int i = 0; i < 3; ++i) {
        qllm_set_num_threads(nth[i]);
        CHECK_ERR(qllm_retrieval_score(&r.t, &q.t, &qq.t, 2.0f, &so[i].t), QLLM_ERR_NONFINITE,
                  "reprs: contains NaN at block 2500, head 3, dim 7");
    }
    for (int i = 0; i < 3; ++i) {
        tt_free(&so[i]);
        tt_free(&io[i]);
    }
    tt_free(&r);
    tt_free(&q);
    tt_free(&qq);
    qllm_set_num_threads(0);
}

/* A failure on one thread does not show up in another thread's last error. */
static void test_last_error(void) {
    CHECK_ERR(qllm_retrieval_topk(NULL, 1, NULL, NULL), QLLM_ERR_INVALID_ARG, "scores");
    const char *msg = qllm_last_error();
    CHECK(msg != NULL && strlen(msg) > 0, "last error set");
    float sv[2] = {1, 2};
    int32_t iv[2];
    qllm_tensor s = {sv, QLLM_DTYPE_F32, 1, {2}, {1}};
    qllm_tensor oi = {iv, QLLM_DTYPE_I32, 1, {2}, {1}};
    CHECK_OK(qllm_retrieval_topk(&s, 2, &oi, NULL));
    CHECK(strstr(qllm_last_error(), "scores") != NULL, "success leaves the last error alone");
}

/* Run every test; print one summary line; exit 1 on any failure. */
int main(void) {
    test_status_dtype();
    test_conversions();
    test_row_conversions();
    test_repr();
    test_repr_errors();
    test_retrieval();
    test_retrieval_errors();
    test_gather_slots();
    test_blocks_scenarios();
    test_blocks_data();
    test_threads();
    test_last_error();
    printf("test_core: %ld checks, %ld failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
