/*
 * repr.c -- representative keys of memory blocks (qllm_repr_compute).
 *
 * Per (block b, query head h): top-k tokens of scores[b, h, :] (descending,
 * ties toward the lower token), then the f32 mean of their keys, summed in
 * selection order and divided by k once, rounded once into out.
 * Parallel over blocks when the call is large (qllm_parallel_for).
 */
#include <inttypes.h>
#include <math.h>
#include <string.h>

#include "qllm_internal.h"

typedef struct {
    const qllm_tensor *keys, *scores, *out;
    int64_t n_q, block_len, head_dim, k, group;
    /* first non-finite score seen by each chunk: flat (b, h, t); -1 if none */
    int64_t bad_b[QLLM_MAX_THREADS], bad_h[QLLM_MAX_THREADS], bad_t[QLLM_MAX_THREADS];
} repr_ctx;

static void repr_range(void *vctx, int64_t b0, int64_t b1, void *scratch, int chunk) {
    repr_ctx *c = (repr_ctx *)vctx;
    const qllm_tensor *K = c->keys, *S = c->scores, *O = c->out;
    const int64_t T = c->block_len, D = c->head_dim, k = c->k;
    int64_t *idx = (int64_t *)scratch;  /* k */
    float *srow = (float *)(idx + k);   /* T */
    float *acc = srow + T;              /* D */
    float *krow = acc + D;              /* D */
    const int k_fast = K->dtype == QLLM_DTYPE_F32 && K->strides[3] == 1;

    for (int64_t b = b0; b < b1; ++b) {
        for (int64_t h = 0; h < c->n_q; ++h) {
            const char *sp = qllm_tensor_ptr(S, b * S->strides[0] + h * S->strides[1]);
            const float *s = srow;
            int64_t sst = 1;
            if (S->dtype == QLLM_DTYPE_F32) {
                s = (const float *)sp;
                sst = S->strides[2];
            } else {
                qllm_row_to_f32(sp, S->dtype, S->strides[2], T, srow);
            }
            int64_t bad = qllm_find_nonfinite_f32(s, sst, T);
            if (bad >= 0) {
                c->bad_b[chunk] = b;
                c->bad_h[chunk] = h;
                c->bad_t[chunk] = bad;
                return;
            }
            qllm_topk_select(s, sst, T, k, idx);

            const int64_t kh = h / c->group;
            memset(acc, 0, (size_t)D * sizeof *acc);
            for (int64_t j = 0; j < k; ++j) {
                const char *kp = qllm_tensor_ptr(
                    K, b * K->strides[0] + kh * K->strides[1] + idx[j] * K->strides[2]);
                if (k_fast) {
                    qllm_add_f32(acc, (const float *)kp, D);
                } else {
                    qllm_row_to_f32(kp, K->dtype, K->strides[3], D, krow);
                    qllm_add_f32(acc, krow, D);
                }
            }
            qllm_div_f32(acc, (float)k, D);
            qllm_row_from_f32(acc, qllm_tensor_ptr(O, b * O->strides[0] + h * O->strides[1]),
                              O->dtype, O->strides[2], D);
        }
    }
}

/* Representative keys of memory blocks (see qllm.h). */
qllm_status qllm_repr_compute(const qllm_tensor *keys, const qllm_tensor *scores,
                              int64_t repr_topk, qllm_tensor *out) {
    qllm_status st;
    if ((st = qllm_tensor_check(keys, "keys", 4, "blocks, kv_heads, tokens, dim",
                                QLLM_FLOAT_DTYPES)) != QLLM_OK ||
        (st = qllm_tensor_check(scores, "scores", 3, "blocks, q_heads, tokens",
                                QLLM_FLOAT_DTYPES)) != QLLM_OK ||
        (st = qllm_tensor_check(out, "out", 3, "blocks, q_heads, dim", QLLM_FLOAT_DTYPES)) !=
            QLLM_OK)
        return st;
    const int64_t B = keys->shape[0], n_kv = keys->shape[1], T = keys->shape[2],
                  D = keys->shape[3];
    if (B < 1)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "keys: n_blocks (dim 0) must be >= 1, got %" PRId64, B);
    if (n_kv < 1)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "keys: n_kv_heads (dim 1) must be >= 1, got %" PRId64, n_kv);
    if (T < 1)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "keys: block_len (dim 2) must be >= 1, got %" PRId64, T);
    if (D < 1)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "keys: head_dim (dim 3) must be >= 1, got %" PRId64, D);
    if ((st = qllm_tensor_check_dim(scores, "scores", 0, "blocks", B, "n_blocks of keys")) != QLLM_OK ||
        (st = qllm_tensor_check_dim(scores, "scores", 2, "tokens", T, "block_len of keys")) != QLLM_OK)
        return st;
    const int64_t n_q = scores->shape[1];
    if (n_q % n_kv != 0)
        return qllm_error_set(QLLM_ERR_INVALID_ARG,
                              "scores: n_q_heads (dim 1) = %" PRId64
                              " must be a multiple of n_kv_heads = %" PRId64 " (dim 1 of keys)",
                              n_q, n_kv);
    if ((st = qllm_tensor_check_dim(out, "out", 0, "blocks", B, "n_blocks of keys")) != QLLM_OK ||
        (st = qllm_tensor_check_dim(out, "out", 1, "q_heads", n_q, "n_q_heads of scores")) != QLLM_OK ||
        (st = qllm_tensor_check_dim(out, "out", 2, "dim", D, "head_dim of keys")) != QLLM_OK)
        return st;
    if (repr_topk < 1)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "repr_topk: must be >= 1, got %" PRId64, repr_topk);
    if (n_q == 0)
        return QLLM_OK; /* nothing to compute */

    repr_ctx c;
    c.keys = keys;
    c.scores = scores;
    c.out = out;
    c.n_q = n_q;
    c.block_len = T;
    c.head_dim = D;
    c.k = repr_topk < T ? repr_topk : T;
    c.group = n_q / n_kv;
    for (int i = 0; i < QLLM_MAX_THREADS; ++i)
        c.bad_b[i] = c.bad_h[i] = c.bad_t[i] = -1;

    /* scratch: k int64 indices, then T + 2 * D floats; guard the size arithmetic */
    if (T > INT64_MAX / 32 || D > INT64_MAX / 32)
        return qllm_error_set(QLLM_ERR_NOMEM, "out of memory: block_len %" PRId64
                              " x head_dim %" PRId64 " is too large for scratch", T, D);
    const uint64_t scratch = (uint64_t)c.k * 8u + ((uint64_t)T + 2u * (uint64_t)D) * 4u;
    if (scratch > (uint64_t)SIZE_MAX / 2)
        return qllm_error_set(QLLM_ERR_NOMEM, "out of memory: %" PRIu64 " bytes of scratch", scratch);
    const double work = (double)B * (double)n_q * ((double)T + (double)c.k * (double)D);
    int chunks = 0;
    st = qllm_parallel_for(B, work, (size_t)scratch, repr_range, &c, &chunks);
    if (st != QLLM_OK)
        return st;
    for (int i = 0; i < chunks; ++i) {
        if (c.bad_b[i] >= 0) {
            const char *sp = qllm_tensor_ptr(scores, c.bad_b[i] * scores->strides[0] +
                                                         c.bad_h[i] * scores->strides[1] +
                                                         c.bad_t[i] * scores->strides[2]);
            float v = 0.0f;
            qllm_row_to_f32(sp, scores->dtype, 1, 1, &v);
            return qllm_error_set(QLLM_ERR_NONFINITE,
                                  "scores: contains %s at block %" PRId64 ", head %" PRId64
                                  ", token %" PRId64,
                                  isnan(v) ? "NaN" : "Inf", c.bad_b[i], c.bad_h[i], c.bad_t[i]);
        }
    }
    return QLLM_OK;
}
