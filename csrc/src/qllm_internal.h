/*
 * qllm_internal.h -- private helpers shared by the C core's translation units.
 *
 * Not installed, not part of the ABI.  Four groups:
 *   - errors: the thread-local last-error message (status.c);
 *   - tensor validation with named messages (status.c);
 *   - row kernels: dtype conversion, dot products, accumulation (kernels.c);
 *   - top-k selection (retrieval.c) and the parallel-for (threads.c).
 */
#ifndef QLLM_INTERNAL_H
#define QLLM_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "qllm/qllm.h"

#if defined(__GNUC__)
#define QLLM_PRINTF(fmt_idx, arg_idx) __attribute__((format(printf, fmt_idx, arg_idx)))
#else
#define QLLM_PRINTF(fmt_idx, arg_idx)
#endif

/* ------------------------------------------------------------------ errors */

/* Format the thread-local last-error message (printf-style) and return
 * status, so that failures read `return qllm_error_set(QLLM_ERR_..., ...)`. */
qllm_status qllm_error_set(qllm_status status, const char *fmt, ...) QLLM_PRINTF(2, 3);

/* ------------------------------------------------------------------ tensors */

/* Bit of a dtype in a dtype mask. */
#define QLLM_DTYPE_BIT(d) (1u << (unsigned)(d))
/* The storage dtypes f32 | f16 | bf16. */
#define QLLM_FLOAT_DTYPES \
    (QLLM_DTYPE_BIT(QLLM_DTYPE_F32) | QLLM_DTYPE_BIT(QLLM_DTYPE_F16) | QLLM_DTYPE_BIT(QLLM_DTYPE_BF16))

/* Largest element offset a view may reach: keeps byte offsets
 * (offset * element size) far from int64 overflow. */
#define QLLM_MAX_ELEM_OFFSET (INT64_MAX / 16)

/*
 * Validate a tensor argument named `name`: non-NULL, `ndim` dims (described
 * by `dims`, e.g. "blocks, kv_heads, tokens, dim"), a dtype in `dtype_mask`,
 * non-negative shape and strides, no int64 overflow in its element count or
 * its largest element offset, data non-NULL unless the view is empty, data
 * aligned to the element size.  Returns QLLM_OK or QLLM_ERR_INVALID_ARG with
 * a message such as "keys: expected 4 dims (blocks, kv_heads, tokens, dim), got 3".
 */
qllm_status qllm_tensor_check(const qllm_tensor *t, const char *name, int32_t ndim,
                              const char *dims, unsigned dtype_mask);

/*
 * Check that dim `axis` (called `axis_name`) of tensor `name` equals
 * `expected`; `why` says where the expectation comes from (e.g. "n_blocks of
 * keys").  Returns QLLM_OK or QLLM_ERR_INVALID_ARG with a message such as
 * "scores: dim 0 (blocks) expected 4 (n_blocks of keys), got 3".
 */
qllm_status qllm_tensor_check_dim(const qllm_tensor *t, const char *name, int32_t axis,
                                  const char *axis_name, int64_t expected, const char *why);

/* Number of elements of a validated view (product of its shape). */
int64_t qllm_tensor_numel(const qllm_tensor *t);

/* Address of the element at element offset `off` of a validated view. */
static inline char *qllm_tensor_ptr(const qllm_tensor *t, int64_t off) {
    return (char *)t->data + off * (int64_t)qllm_dtype_size(t->dtype);
}

/* malloc(n * size) with overflow check; NULL on overflow or failure (n == 0
 * allocates one byte so that NULL always means failure). */
void *qllm_alloc_array(int64_t n, size_t size);

/* ------------------------------------------------------------- row kernels */

/* dst[0..n) = src[i * stride] converted from dtype (f32 | f16 | bf16) to f32. */
void qllm_row_to_f32(const void *src, qllm_dtype dtype, int64_t stride, int64_t n,
                     float *dst);

/* dst[i * stride] = src[i] rounded (nearest-even) to dtype (f32 | f16 | bf16), i < n. */
void qllm_row_from_f32(const float *src, void *dst, qllm_dtype dtype, int64_t stride,
                       int64_t n);

/* Copy n elements of esize (2 or 4) bytes between strided rows (same dtype). */
void qllm_row_copy(const void *src, int64_t src_stride, void *dst, int64_t dst_stride,
                   int64_t n, size_t esize);

/* sum_i a[i] * b[i] in f32, accumulated in 16 interleaved lanes then reduced
 * in a fixed tree: deterministic for a given n. */
float qllm_dot_f32(const float *a, const float *b, int64_t n);

/* Index of the first NaN or Inf among s[i * stride], i < n; -1 if none. */
int64_t qllm_find_nonfinite_f32(const float *s, int64_t stride, int64_t n);

/* acc[i] += x[i], i < n. */
void qllm_add_f32(float *acc, const float *x, int64_t n);

/* x[i] = x[i] / d, i < n. */
void qllm_div_f32(float *x, float d, int64_t n);

/* ------------------------------------------------------------------ top-k */

/*
 * Indices of the k best of n scores s[i * stride] (0 < k <= n): idx[0..k)
 * sorted by descending score, ties toward the lower index.  Scores must be
 * finite (not checked).  O(n log k) with a k-entry heap kept in idx.
 */
void qllm_topk_select(const float *s, int64_t stride, int64_t n, int64_t k, int64_t *idx);

/* ----------------------------------------------------------------- threads */

/* Calls with less estimated work (multiply-adds or element visits) than
 * this run on the caller's thread. */
#define QLLM_PARALLEL_MIN_WORK 1.0e6
/* Upper bound of qllm_get_num_threads(). */
#define QLLM_MAX_THREADS 64

/* Body of a parallel loop: handle items [begin, end) using `scratch`
 * (scratch_bytes bytes private to this chunk, NULL if 0).  `chunk` is the
 * index of the chunk (0 .. n_chunks-1, ordered like the item ranges). */
typedef void (*qllm_range_fn)(void *ctx, int64_t begin, int64_t end, void *scratch, int chunk);

/*
 * Run fn over items [0, n) split into contiguous chunks, one per thread (at
 * most qllm_get_num_threads(), and none with less than a quarter of
 * QLLM_PARALLEL_MIN_WORK), when `work` (estimated total cost) is at least
 * QLLM_PARALLEL_MIN_WORK; otherwise one chunk on the caller.  Every thread is joined before return; a thread that
 * cannot be created runs its chunk on the caller.  The number of chunks used
 * is stored in *out_chunks (may be NULL).  Returns QLLM_OK or QLLM_ERR_NOMEM
 * (scratch allocation, message set; fn not called).
 */
qllm_status qllm_parallel_for(int64_t n, double work, size_t scratch_bytes, qllm_range_fn fn,
                              void *ctx, int *out_chunks);

#endif /* QLLM_INTERNAL_H */
