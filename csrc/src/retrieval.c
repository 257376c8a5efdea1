/*
 * retrieval.c -- query-weighted block scores and deterministic top-k.
 *
 *   qllm_retrieval_score   s[b] = sum_h q[h].r[b,h] + w * sum_h Q[h].r[b,h]
 *   qllm_retrieval_topk    top-k indices, descending, ties toward lower index
 *   qllm_retrieval_select  both
 *   qllm_topk_select       the shared O(n log k) heap selection (internal)
 */
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>

#include "qllm_internal.h"

/* ------------------------------------------------------------------ top-k */

/* Is entry a ranked after entry b?  (lower score, or equal score and higher index) */
static inline int rank_after(const float *s, int64_t st, int64_t a, int64_t b) {
    const float sa = s[a * st], sb = s[b * st];
    return sa < sb || (sa == sb && a > b);
}

/* Restore the heap property below position i: each parent ranks after (is
 * worse than) its children, so heap[0] is the worst entry kept. */
static void sift_down(const float *s, int64_t st, int64_t *heap, int64_t n, int64_t i) {
    for (;;) {
        int64_t w = 2 * i + 1;
        if (w >= n)
            return;
        if (w + 1 < n && rank_after(s, st, heap[w + 1], heap[w]))
            w = w + 1;
        if (!rank_after(s, st, heap[w], heap[i]))
            return;
        int64_t tmp = heap[i];
        heap[i] = heap[w];
        heap[w] = tmp;
        i = w;
    }
}

/* k best of n scores, sorted best first (see qllm_internal.h). */
void qllm_topk_select(const float *s, int64_t st, int64_t n, int64_t k, int64_t *idx) {
    if (k == 1) { /* argmax, first occurrence wins ties */
        int64_t best = 0;
        for (int64_t i = 1; i < n; ++i)
            if (s[i * st] > s[best * st])
                best = i;
        idx[0] = best;
        return;
    }
    for (int64_t i = 0; i < k; ++i)
        idx[i] = i;
    for (int64_t i = k / 2; i-- > 0;)
        sift_down(s, st, idx, k, i);
    /* Later entries never win a tie against the kept ones (higher index), so
     * an entry enters only with a strictly higher score than the worst kept. */
    float worst = s[idx[0] * st];
    for (int64_t i = k; i < n; ++i) {
        const float v = s[i * st];
        if (v > worst) {
            idx[0] = i;
            sift_down(s, st, idx, k, 0);
            worst = s[idx[0] * st];
        }
    }
    /* heap sort: move the worst to the back, best ends up first */
    for (int64_t m = k - 1; m > 0; --m) {
        int64_t tmp = idx[0];
        idx[0] = idx[m];
        idx[m] = tmp;
        sift_down(s, st, idx, m, 0);
    }
}

/* ------------------------------------------------------------------ score */

static qllm_status check_query(const qllm_tensor *t, const char *name, const qllm_tensor *reprs) {
    qllm_status st = qllm_tensor_check(t, name, 2, "q_heads, dim", QLLM_FLOAT_DTYPES);
    if (st == QLLM_OK)
        st = qllm_tensor_check_dim(t, name, 0, "q_heads", reprs->shape[1], "n_q_heads of reprs");
    if (st == QLLM_OK)
        st = qllm_tensor_check_dim(t, name, 1, "dim", reprs->shape[2], "head_dim of reprs");
    return st;
}

/* Validate the arguments of a score computation; out is called out_name. */
static qllm_status score_check(const qllm_tensor *reprs, const qllm_tensor *query,
                               const qllm_tensor *question, float weight,
                               const qllm_tensor *out, const char *out_name) {
    qllm_status st;
    if ((st = qllm_tensor_check(reprs, "reprs", 3, "blocks, q_heads, dim", QLLM_FLOAT_DTYPES)) != QLLM_OK ||
        (st = check_query(query, "query", reprs)) != QLLM_OK)
        return st;
    if (question != NULL && (st = check_query(question, "question", reprs)) != QLLM_OK)
        return st;
    if ((st = qllm_tensor_check(out, out_name, 1, "blocks", QLLM_DTYPE_BIT(QLLM_DTYPE_F32))) != QLLM_OK ||
        (st = qllm_tensor_check_dim(out, out_name, 0, "blocks", reprs->shape[0], "n_blocks of reprs")) != QLLM_OK)
        return st;
    if (question != NULL && !isfinite(weight))
        return qllm_error_set(QLLM_ERR_NONFINITE, "weight: must be finite, got %g", (double)weight);
    return QLLM_OK;
}

typedef struct {
    const qllm_tensor *reprs, *out;
    const float *q, *qq; /* [n_q, D] f32 contiguous; qq NULL without a question */
    float weight;
    int64_t n_q, head_dim;
    int flat_inplace; /* reprs[b] is already a contiguous f32 [n_q * head_dim] row */
    int64_t bad[QLLM_MAX_THREADS]; /* first non-finite score per chunk, -1 if none */
} score_ctx;

/* s[b] for blocks [b0, b1).  Each block's reprs are one flat f32 vector of
 * n_q * head_dim values (used in place when they already are, else converted
 * into scratch), dotted with the flat query (and question): one long dot per
 * block keeps the vector loop busy, and every layout / dtype of the same
 * values gives bitwise the same score. */
static void score_range(void *vctx, int64_t b0, int64_t b1, void *scratch, int chunk) {
    score_ctx *c = (score_ctx *)vctx;
    const qllm_tensor *R = c->reprs, *O = c->out;
    const int64_t D = c->head_dim, N = c->n_q * D;
    float *flat = (float *)scratch;
    for (int64_t b = b0; b < b1; ++b) {
        const float *r = flat;
        if (c->flat_inplace) {
            r = (const float *)qllm_tensor_ptr(R, b * R->strides[0]);
        } else {
            for (int64_t h = 0; h < c->n_q; ++h)
                qllm_row_to_f32(qllm_tensor_ptr(R, b * R->strides[0] + h * R->strides[1]),
                                R->dtype, R->strides[2], D, flat + h * D);
        }
        float s = qllm_dot_f32(c->q, r, N);
        if (c->qq != NULL)
            s = s + c->weight * qllm_dot_f32(c->qq, r, N);
        *(float *)qllm_tensor_ptr(O, b * O->strides[0]) = s;
        if (!isfinite(s) && c->bad[chunk] < 0)
            c->bad[chunk] = b;
    }
}

/* Copy a [n_q, D] tensor into contiguous f32 (caller frees); NULL on NOMEM. */
static float *load_heads(const qllm_tensor *t) {
    const int64_t n_q = t->shape[0], D = t->shape[1];
    float *v = (float *)qllm_alloc_array(n_q * D, sizeof(float));
    if (v == NULL)
        return NULL;
    for (int64_t h = 0; h < n_q; ++h)
        qllm_row_to_f32(qllm_tensor_ptr(t, h * t->strides[0]), t->dtype, t->strides[1], D,
                        v + h * D);
    return v;
}

/* Name the argument that made score b non-finite. */
static qllm_status score_nonfinite(const qllm_tensor *reprs, const qllm_tensor *query,
                                   const qllm_tensor *question, int64_t b, float s,
                                   const char *out_name) {
    const qllm_tensor *heads[2] = {query, question};
    const char *names[2] = {"query", "question"};
    const int64_t n_q = reprs->shape[1], D = reprs->shape[2];
    float v = 0.0f;
    for (int i = 0; i < 2; ++i) {
        const qllm_tensor *t = heads[i];
        if (t == NULL)
            continue;
        for (int64_t h = 0; h < n_q; ++h)
            for (int64_t d = 0; d < D; ++d) {
                qllm_row_to_f32(qllm_tensor_ptr(t, h * t->strides[0] + d * t->strides[1]),
                                t->dtype, 1, 1, &v);
                if (!isfinite(v))
                    return qllm_error_set(QLLM_ERR_NONFINITE,
                                          "%s: contains %s at head %" PRId64 ", dim %" PRId64,
                                          names[i], isnan(v) ? "NaN" : "Inf", h, d);
            }
    }
    for (int64_t h = 0; h < n_q; ++h)
        for (int64_t d = 0; d < D; ++d) {
            qllm_row_to_f32(qllm_tensor_ptr(reprs, b * reprs->strides[0] + h * reprs->strides[1] +
                                                       d * reprs->strides[2]),
                            reprs->dtype, 1, 1, &v);
            if (!isfinite(v))
                return qllm_error_set(QLLM_ERR_NONFINITE,
                                      "reprs: contains %s at block %" PRId64 ", head %" PRId64
                                      ", dim %" PRId64,
                                      isnan(v) ? "NaN" : "Inf", b, h, d);
        }
    return qllm_error_set(QLLM_ERR_NONFINITE,
                          "%s: score of block %" PRId64 " is %s although every input is finite "
                          "(f32 overflow: inputs too large)",
                          out_name, b, isnan(s) ? "NaN" : "Inf");
}

/* Compute validated scores into out. */
static qllm_status score_run(const qllm_tensor *reprs, const qllm_tensor *query,
                             const qllm_tensor *question, float weight, const qllm_tensor *out,
                             const char *out_name) {
    const int64_t B = reprs->shape[0], n_q = reprs->shape[1], D = reprs->shape[2];
    if (B == 0)
        return QLLM_OK;
    if (n_q == 0 || D == 0) { /* empty sums */
        for (int64_t b = 0; b < B; ++b)
            *(float *)qllm_tensor_ptr(out, b * out->strides[0]) = 0.0f;
        return QLLM_OK;
    }
    score_ctx c;
    c.reprs = reprs;
    c.out = out;
    c.weight = weight;
    c.n_q = n_q;
    c.head_dim = D;
    c.q = load_heads(query);
    c.qq = question != NULL ? load_heads(question) : NULL;
    if (c.q == NULL || (question != NULL && c.qq == NULL)) {
        free((void *)c.q);
        free((void *)c.qq);
        return qllm_error_set(QLLM_ERR_NOMEM, "out of memory: query/question copies of %" PRId64
                              " x %" PRId64 " floats", n_q, D);
    }
    for (int i = 0; i < QLLM_MAX_THREADS; ++i)
        c.bad[i] = -1;
    const double work = (double)B * (double)n_q * (double)D * (question != NULL ? 2.0 : 1.0);
    c.flat_inplace = reprs->dtype == QLLM_DTYPE_F32 && (reprs->strides[2] == 1 || D == 1) &&
                     (reprs->strides[1] == D || n_q == 1);
    int chunks = 0; /* n_q * D floats fit in size_t: load_heads allocated as many */
    qllm_status st = qllm_parallel_for(B, work, c.flat_inplace ? 0 : (size_t)(n_q * D) * sizeof(float),
                                       score_range, &c, &chunks);
    free((void *)c.q);
    free((void *)c.qq);
    if (st != QLLM_OK)
        return st;
    for (int i = 0; i < chunks; ++i)
        if (c.bad[i] >= 0)
            return score_nonfinite(reprs, query, question, c.bad[i],
                                   *(const float *)qllm_tensor_ptr(out, c.bad[i] * out->strides[0]),
                                   out_name);
    return QLLM_OK;
}

/* Query-weighted block scores (see qllm.h). */
qllm_status qllm_retrieval_score(const qllm_tensor *reprs, const qllm_tensor *query,
                                 const qllm_tensor *question, float weight, qllm_tensor *out) {
    qllm_status st = score_check(reprs, query, question, weight, out, "out");
    if (st != QLLM_OK)
        return st;
    return score_run(reprs, query, question, weight, out, "out");
}

/* ------------------------------------------------------------------ top-k */

/* Validate k and the index output against n scores. */
static qllm_status topk_check(int64_t n, int64_t k, const qllm_tensor *out_idx) {
    if (k < 1)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "k: must be >= 1, got %" PRId64, k);
    qllm_status st = qllm_tensor_check(out_idx, "out_idx", 1, "k", QLLM_DTYPE_BIT(QLLM_DTYPE_I32));
    if (st != QLLM_OK)
        return st;
    if (n > (int64_t)INT32_MAX + 1)
        return qllm_error_set(QLLM_ERR_INVALID_ARG,
                              "scores: at most 2^31 entries (indices are i32), got %" PRId64, n);
    const int64_t kk = k < n ? k : n;
    if (out_idx->shape[0] < kk)
        return qllm_error_set(QLLM_ERR_INVALID_ARG,
                              "out_idx: dim 0 (k) expected at least %" PRId64 " (min(k, n)), got %" PRId64,
                              kk, out_idx->shape[0]);
    return QLLM_OK;
}

/* Top-k of validated f32 scores into out_idx. */
static qllm_status topk_run(const qllm_tensor *scores, const char *name, int64_t k,
                            const qllm_tensor *out_idx, int64_t *out_count) {
    const int64_t n = scores->shape[0], kk = k < n ? k : n;
    if (n > 0) {
        const float *s = (const float *)scores->data;
        const int64_t sst = scores->strides[0];
        const int64_t bad = qllm_find_nonfinite_f32(s, sst, n);
        if (bad >= 0)
            return qllm_error_set(QLLM_ERR_NONFINITE, "%s: contains %s at block %" PRId64, name,
                                  isnan(s[bad * sst]) ? "NaN" : "Inf", bad);
        int64_t small[256];
        int64_t *idx = kk <= 256 ? small : (int64_t *)qllm_alloc_array(kk, sizeof(int64_t));
        if (idx == NULL)
            return qllm_error_set(QLLM_ERR_NOMEM, "out of memory: %" PRId64 " top-k indices", kk);
        qllm_topk_select(s, sst, n, kk, idx);
        int32_t *o = (int32_t *)out_idx->data;
        for (int64_t i = 0; i < kk; ++i)
            o[i * out_idx->strides[0]] = (int32_t)idx[i];
        if (idx != small)
            free(idx);
    }
    if (out_count != NULL)
        *out_count = kk;
    return QLLM_OK;
}

/* Indices of the k highest scores (see qllm.h). */
qllm_status qllm_retrieval_topk(const qllm_tensor *scores, int64_t k, qllm_tensor *out_idx,
                                int64_t *out_count) {
    qllm_status st = qllm_tensor_check(scores, "scores", 1, "n", QLLM_DTYPE_BIT(QLLM_DTYPE_F32));
    if (st != QLLM_OK || (st = topk_check(scores->shape[0], k, out_idx)) != QLLM_OK)
        return st;
    return topk_run(scores, "scores", k, out_idx, out_count);
}

/* Scores and top-k in one call (see qllm.h). */
qllm_status qllm_retrieval_select(const qllm_tensor *reprs, const qllm_tensor *query,
                                  const qllm_tensor *question, float weight, int64_t k,
                                  qllm_tensor *out_scores, qllm_tensor *out_idx,
                                  int64_t *out_count) {
    qllm_status st = score_check(reprs, query, question, weight, out_scores, "out_scores");
    if (st != QLLM_OK || (st = topk_check(reprs->shape[0], k, out_idx)) != QLLM_OK)
        return st;
    if ((st = score_run(reprs, query, question, weight, out_scores, "out_scores")) != QLLM_OK)
        return st;
    return topk_run(out_scores, "out_scores", k, out_idx, out_count);
}
