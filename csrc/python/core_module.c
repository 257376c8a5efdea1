/*
 * core_module.c -- qllm._core: the CPython + NumPy binding of the qllm C core.
 *
 * Thin and check-heavy (STYLE.md, Bindings): every entry point validates the
 * Python types, dtypes, ranks, shapes, strides and value ranges of its
 * arguments with messages naming the argument and the expectation, then makes
 * exactly one call into the core with the GIL released, and turns a failing
 * qllm_status into a Python exception carrying qllm_last_error():
 *
 *   QLLM_ERR_INVALID_ARG  ValueError        QLLM_ERR_NOT_FOUND  IndexError
 *   QLLM_ERR_NONFINITE    ValueError        QLLM_ERR_CAPACITY   ValueError
 *   QLLM_ERR_NOMEM        MemoryError       QLLM_ERR_INTERNAL   RuntimeError
 *
 * Wrong Python types and dtypes raise TypeError before the core runs.
 *
 * Dtypes: numpy float32 -> f32, float16 -> f16, uint16 -> bf16 (the array
 * holds bfloat16 bit patterns; numpy has no bfloat16).  Index arguments are
 * int32; integer arrays of other widths and lists/tuples of ints are
 * converted, with every value range-checked.
 *
 * Layout: inputs may be any strided view; element strides are passed to the
 * core as they are when every byte stride is a non-negative multiple of the
 * itemsize and the data is aligned and native-endian, otherwise the binding
 * reads from a C-contiguous copy (negative strides included).  Outputs are new
 * C-contiguous arrays.
 *
 * No algorithm lives here: the only loops are argument checks and the
 * conversion of index lists and move records.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef NPY_NO_DEPRECATED_API
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#endif
#include <numpy/arrayobject.h>

#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "qllm/qllm.h"

/* ================================================================== errors */

/* Whether a message already says NaN/Inf (case-insensitive "nan" or "inf"). */
static int mentions_nonfinite(const char *msg)
{
    char low[512];
    size_t i = 0;
    for (; msg[i] != '\0' && i + 1 < sizeof low; ++i)
        low[i] = (char)tolower((unsigned char)msg[i]);
    low[i] = '\0';
    return strstr(low, "nan") != NULL || strstr(low, "inf") != NULL;
}

/* Raise the Python exception for a failing core status; always NULL. */
static PyObject *raise_status(qllm_status status)
{
    const char *msg = qllm_last_error();
    if (msg == NULL || msg[0] == '\0')
        msg = qllm_status_str(status);
    switch (status) {
    case QLLM_ERR_INVALID_ARG:
    case QLLM_ERR_CAPACITY:
        PyErr_SetString(PyExc_ValueError, msg);
        break;
    case QLLM_ERR_NONFINITE:
        if (mentions_nonfinite(msg))
            PyErr_SetString(PyExc_ValueError, msg);
        else
            PyErr_Format(PyExc_ValueError, "%s (NaN or Inf)", msg);
        break;
    case QLLM_ERR_NOT_FOUND:
        PyErr_SetString(PyExc_IndexError, msg);
        break;
    case QLLM_ERR_NOMEM:
        PyErr_SetString(PyExc_MemoryError, msg);
        break;
    case QLLM_ERR_INTERNAL:
        PyErr_SetString(PyExc_RuntimeError, msg);
        break;
    case QLLM_OK:
    default:
        PyErr_Format(PyExc_RuntimeError, "qllm core returned unexpected status %d (%s)",
                     (int)status, msg);
        break;
    }
    return NULL;
}

/* ================================================================== dtypes */

static int dtype_from_typenum(int typenum, qllm_dtype *out)
{
    switch (typenum) {
    case NPY_FLOAT32:
        *out = QLLM_DTYPE_F32;
        return 1;
    case NPY_FLOAT16:
        *out = QLLM_DTYPE_F16;
        return 1;
    case NPY_UINT16:
        *out = QLLM_DTYPE_BF16;
        return 1;
    default:
        return 0;
    }
}

static int typenum_from_dtype(qllm_dtype dtype)
{
    switch (dtype) {
    case QLLM_DTYPE_F16:
        return NPY_FLOAT16;
    case QLLM_DTYPE_BF16:
        return NPY_UINT16;
    case QLLM_DTYPE_I32:
        return NPY_INT32;
    case QLLM_DTYPE_F32:
    default:
        return NPY_FLOAT32;
    }
}

static const char *dtype_pyname(qllm_dtype dtype)
{
    switch (dtype) {
    case QLLM_DTYPE_F16:
        return "float16";
    case QLLM_DTYPE_BF16:
        return "bfloat16";
    case QLLM_DTYPE_I32:
        return "int32";
    case QLLM_DTYPE_F32:
    default:
        return "float32";
    }
}

/* ================================================================== arrays */

/* An input array and the core's view of it.  `arr` is owned: the caller's
 * array, or a C-contiguous copy of it when its layout cannot be expressed as
 * non-negative element strides. */
typedef struct {
    PyArrayObject *arr;
    qllm_tensor t;
} arg_array;

#define ARG_ARRAY_INIT {NULL, {NULL, QLLM_DTYPE_F32, 0, {0}, {0}}}

static void arg_release(arg_array *a)
{
    Py_CLEAR(a->arr);
}

/* "(2, 4, 15)" */
static void format_shape(PyArrayObject *a, char *buf, size_t cap)
{
    size_t used = 0;
    int nd = PyArray_NDIM(a);
    buf[0] = '\0';
    used += (size_t)snprintf(buf, cap, "(");
    for (int i = 0; i < nd && used < cap; ++i)
        used += (size_t)snprintf(buf + used, cap - used, "%s%lld", i ? ", " : "",
                                 (long long)PyArray_DIM(a, i));
    if (used < cap)
        snprintf(buf + used, cap - used, nd == 1 ? ",)" : ")");
}

/* Fill out->t as the core's view of `a` (a copy where needed). */
static int view_tensor(PyArrayObject *a, qllm_dtype dtype, arg_array *out)
{
    const int nd = PyArray_NDIM(a);
    const npy_intp item = PyArray_ITEMSIZE(a);
    int need_copy = !PyArray_ISALIGNED(a) || PyArray_ISBYTESWAPPED(a) || nd > QLLM_MAX_DIMS;
    for (int i = 0; i < nd && !need_copy; ++i) {
        const npy_intp s = PyArray_STRIDE(a, i);
        if (PyArray_DIM(a, i) > 1 && (s < 0 || s % item != 0))
            need_copy = 1;
    }
    if (nd > QLLM_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "array of %d dims exceeds the core's limit of %d", nd,
                     QLLM_MAX_DIMS);
        return -1;
    }
    if (need_copy) {
        PyArray_Descr *descr = PyArray_DescrFromType(PyArray_TYPE(a)); /* native order */
        if (descr == NULL)
            return -1;
        a = (PyArrayObject *)PyArray_FromArray(
            a, descr, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_ENSURECOPY);
        if (a == NULL)
            return -1;
    } else {
        Py_INCREF(a);
    }
    out->arr = a;
    memset(&out->t, 0, sizeof out->t);
    out->t.data = PyArray_DATA(a);
    out->t.dtype = dtype;
    out->t.ndim = nd;
    for (int i = 0; i < nd; ++i) {
        out->t.shape[i] = (int64_t)PyArray_DIM(a, i);
        out->t.strides[i] = PyArray_DIM(a, i) > 1 ? (int64_t)(PyArray_STRIDE(a, i) / item) : 0;
    }
    return 0;
}

#define STORAGE_DTYPES "float32, float16 or uint16 (bfloat16 bit patterns)"

/*
 * A float input: a numpy.ndarray of rank `ndim` (dims named by `dims`, e.g.
 * "(n_blocks, n_q_heads, head_dim)") whose dtype is a storage dtype, or
 * exactly `want_typenum` when that is >= 0.
 */
static int get_float_array(PyObject *obj, const char *name, int ndim, const char *dims,
                           int want_typenum, arg_array *out)
{
    qllm_dtype dtype;
    if (!PyArray_Check(obj)) {
        if (want_typenum >= 0)
            PyErr_Format(PyExc_TypeError, "%s: expected a numpy.ndarray of dtype %s, got %.200s",
                         name, want_typenum == NPY_UINT16 ? "uint16 (bfloat16 bit patterns)"
                                                          : (want_typenum == NPY_FLOAT16
                                                                 ? "float16"
                                                                 : "float32"),
                         Py_TYPE(obj)->tp_name);
        else
            PyErr_Format(PyExc_TypeError, "%s: expected a numpy.ndarray of " STORAGE_DTYPES
                                          ", got %.200s",
                         name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (!dtype_from_typenum(PyArray_TYPE(a), &dtype) ||
        (want_typenum >= 0 && PyArray_TYPE(a) != want_typenum)) {
        if (want_typenum >= 0)
            PyErr_Format(PyExc_TypeError, "%s: expected dtype %s, got %S", name,
                         want_typenum == NPY_UINT16 ? "uint16 (bfloat16 bit patterns)"
                                                    : (want_typenum == NPY_FLOAT16 ? "float16"
                                                                                   : "float32"),
                         (PyObject *)PyArray_DESCR(a));
        else
            PyErr_Format(PyExc_TypeError, "%s: expected dtype " STORAGE_DTYPES ", got %S", name,
                         (PyObject *)PyArray_DESCR(a));
        return -1;
    }
    if (PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d dims %s, got %d", name, ndim, dims,
                     PyArray_NDIM(a));
        return -1;
    }
    return view_tensor(a, dtype, out);
}

/* A new C-contiguous output array and the core's view of it. */
static int new_output(int nd, const npy_intp *dims, qllm_dtype dtype, arg_array *out)
{
    PyArrayObject *a = (PyArrayObject *)PyArray_SimpleNew(nd, (npy_intp *)dims,
                                                          typenum_from_dtype(dtype));
    if (a == NULL)
        return -1;
    int rc = view_tensor(a, dtype, out);
    Py_DECREF(a);
    return rc;
}

/*
 * An index input: a 1-D integer numpy array or a list/tuple of ints.  Returns
 * a new C-contiguous int32 array whose values are checked to lie in
 * [0, bound): `what` names the kind of index ("block id", "slot") and
 * `bound_desc` says where the bound comes from.
 */
static PyArrayObject *get_indices(PyObject *obj, const char *name, int64_t bound,
                                  const char *what, const char *bound_desc)
{
    PyArrayObject *a = NULL, *a64 = NULL, *out = NULL;
    int from_sequence = 0;
    if (PyArray_Check(obj)) {
        a = (PyArrayObject *)obj;
        Py_INCREF(a);
    } else if (PyList_Check(obj) || PyTuple_Check(obj)) {
        a = (PyArrayObject *)PyArray_FROM_O(obj);
        if (a == NULL)
            return NULL;
        from_sequence = 1;
    } else {
        PyErr_Format(PyExc_TypeError,
                     "%s: expected a 1-D numpy array of int32 or int64, or a list of ints, "
                     "got %.200s",
                     name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    if (PyArray_NDIM(a) != 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected 1 dim (n,), got %d", name, PyArray_NDIM(a));
        goto fail;
    }
    npy_intp n = PyArray_DIM(a, 0);
    if (!PyArray_ISINTEGER(a) && !(from_sequence && n == 0)) {
        PyErr_Format(PyExc_TypeError, "%s: expected integer indices (int32 or int64), got %S",
                     name, (PyObject *)PyArray_DESCR(a));
        goto fail;
    }
    out = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_INT32);
    if (out == NULL || n == 0)
        goto done;
    a64 = (PyArrayObject *)PyArray_FromArray(
        a, PyArray_DescrFromType(NPY_INT64),
        NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST);
    if (a64 == NULL)
        goto fail;
    {
        const int64_t *src = (const int64_t *)PyArray_DATA(a64);
        int32_t *dst = (int32_t *)PyArray_DATA(out);
        int unsigned_wrap = PyArray_ISUNSIGNED(a);
        for (npy_intp i = 0; i < n; ++i) {
            if (src[i] < 0 || src[i] >= bound || src[i] > INT32_MAX) {
                if (unsigned_wrap && src[i] < 0)
                    PyErr_Format(PyExc_IndexError, "%s[%zd]: %s %llu out of range [0, %lld) (%s)",
                                 name, (Py_ssize_t)i, what, (unsigned long long)src[i],
                                 (long long)bound, bound_desc);
                else
                    PyErr_Format(PyExc_IndexError, "%s[%zd]: %s %lld out of range [0, %lld) (%s)",
                                 name, (Py_ssize_t)i, what, (long long)src[i], (long long)bound,
                                 bound_desc);
                goto fail;
            }
            dst[i] = (int32_t)src[i];
        }
    }
done:
    Py_XDECREF(a64);
    Py_DECREF(a);
    return out;
fail:
    Py_XDECREF(a64);
    Py_XDECREF(out);
    Py_DECREF(a);
    return NULL;
}

/* ================================================================== scalars */

/* An integer argument (int or anything with __index__).  Values beyond int64
 * saturate when `saturate`, else raise ValueError. */
static int get_int64(PyObject *obj, const char *name, int saturate, int64_t *out)
{
    if (!PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected an int, got %.200s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *idx = PyNumber_Index(obj);
    if (idx == NULL)
        return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        Py_DECREF(idx);
        return -1;
    }
    if (overflow != 0) {
        if (!saturate) {
            PyErr_Format(PyExc_ValueError, "%s: %R does not fit in int64", name, idx);
            Py_DECREF(idx);
            return -1;
        }
        v = overflow > 0 ? LLONG_MAX : LLONG_MIN;
    }
    Py_DECREF(idx);
    *out = (int64_t)v;
    return 0;
}

/* k-like argument: >= 1; huge values saturate (they mean "all"). */
static int get_positive_count(PyObject *obj, const char *name, int64_t *out)
{
    if (get_int64(obj, name, 1, out) < 0)
        return -1;
    if (*out < 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected an int >= 1, got %lld", name,
                     (long long)*out);
        return -1;
    }
    return 0;
}

/* A finite weight that also fits a float32. */
static int get_weight(PyObject *obj, float *out)
{
    double w = PyFloat_AsDouble(obj);
    if (w == -1.0 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "weight: expected a float, got %.200s",
                         Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    if (!isfinite(w) || !isfinite((float)w)) {
        PyErr_Format(PyExc_ValueError, "weight: expected a finite float32 value, got %R "
                                       "(NaN/Inf or out of float32 range)",
                     obj);
        return -1;
    }
    *out = (float)w;
    return 0;
}

/* ====================================================== repr_compute */

PyDoc_STRVAR(repr_compute_doc,
"repr_compute(keys, scores, repr_topk)\n--\n"
"\n"
"Representative keys of memory blocks.\n"
"\n"
"For every block b and query head h, averages the keys of the ``repr_topk``\n"
"tokens with the highest ``scores[b, h, t]`` (ties toward the lower token\n"
"index).  Query head h reads KV head ``h // (n_q_heads // n_kv_heads)``.\n"
"\n"
"Parameters\n"
"----------\n"
"keys : numpy.ndarray [n_blocks, n_kv_heads, block_len, head_dim]\n"
"    float32, float16, or uint16 holding bfloat16 bit patterns.\n"
"scores : numpy.ndarray [n_blocks, n_q_heads, block_len]\n"
"    float32, float16 or uint16 (bfloat16 bits); finite.  n_q_heads must be a\n"
"    multiple of n_kv_heads.\n"
"repr_topk : int\n"
"    >= 1; a value above block_len uses every token.\n"
"\n"
"Returns\n"
"-------\n"
"numpy.ndarray float32 [n_blocks, n_q_heads, head_dim]\n"
"\n"
"Raises TypeError (types/dtypes), ValueError (ranks, shapes, repr_topk < 1,\n"
"NaN/Inf in scores).  Any strided view is accepted.");

static PyObject *py_repr_compute(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"keys", "scores", "repr_topk", NULL};
    PyObject *keys_o, *scores_o, *topk_o;
    arg_array keys = ARG_ARRAY_INIT, scores = ARG_ARRAY_INIT, out = ARG_ARRAY_INIT;
    PyObject *result = NULL;
    char shp[160];
    int64_t topk;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO:repr_compute", kwlist, &keys_o,
                                     &scores_o, &topk_o))
        return NULL;
    if (get_float_array(keys_o, "keys", 4, "(n_blocks, n_kv_heads, block_len, head_dim)", -1,
                        &keys) < 0)
        goto done;
    if (get_float_array(scores_o, "scores", 3, "(n_blocks, n_q_heads, block_len)", -1,
                        &scores) < 0)
        goto done;
    if (get_positive_count(topk_o, "repr_topk", &topk) < 0)
        goto done;
    {
        const int64_t nb = keys.t.shape[0], hkv = keys.t.shape[1], t = keys.t.shape[2],
                      d = keys.t.shape[3], hq = scores.t.shape[1];
        if (nb < 1 || hkv < 1 || t < 1 || d < 1) {
            format_shape(keys.arr, shp, sizeof shp);
            PyErr_Format(PyExc_ValueError,
                         "keys: expected every dim of (n_blocks, n_kv_heads, block_len, "
                         "head_dim) >= 1, got %s",
                         shp);
            goto done;
        }
        if (scores.t.shape[0] != nb || scores.t.shape[2] != t) {
            format_shape(scores.arr, shp, sizeof shp);
            PyErr_Format(PyExc_ValueError,
                         "scores: expected shape (n_blocks=%lld, n_q_heads, block_len=%lld) "
                         "matching keys, got %s",
                         (long long)nb, (long long)t, shp);
            goto done;
        }
        if (hq < 1 || hq % hkv != 0) {
            PyErr_Format(PyExc_ValueError,
                         "scores: n_q_heads=%lld must be a positive multiple of keys' "
                         "n_kv_heads=%lld",
                         (long long)hq, (long long)hkv);
            goto done;
        }
        npy_intp dims[3] = {(npy_intp)nb, (npy_intp)hq, (npy_intp)d};
        if (new_output(3, dims, QLLM_DTYPE_F32, &out) < 0)
            goto done;
    }
    {
        qllm_status st;
        Py_BEGIN_ALLOW_THREADS
        st = qllm_repr_compute(&keys.t, &scores.t, topk, &out.t);
        Py_END_ALLOW_THREADS
        if (st != QLLM_OK) {
            raise_status(st);
            goto done;
        }
    }
    result = (PyObject *)out.arr;
    out.arr = NULL;
done:
    arg_release(&keys);
    arg_release(&scores);
    arg_release(&out);
    return result;
}

/* ================================================ scoring + retrieval */

/* reprs [nb, hq, d], query [hq, d], question [hq, d] or None. */
static int get_score_inputs(PyObject *reprs_o, PyObject *query_o, PyObject *question_o,
                            arg_array *reprs, arg_array *query, arg_array *question)
{
    char shp[160];
    if (get_float_array(reprs_o, "reprs", 3, "(n_blocks, n_q_heads, head_dim)", -1, reprs) < 0)
        return -1;
    if (get_float_array(query_o, "query", 2, "(n_q_heads, head_dim)", -1, query) < 0)
        return -1;
    if (query->t.shape[0] != reprs->t.shape[1] || query->t.shape[1] != reprs->t.shape[2]) {
        format_shape(query->arr, shp, sizeof shp);
        PyErr_Format(PyExc_ValueError,
                     "query: expected shape (n_q_heads=%lld, head_dim=%lld) matching reprs, "
                     "got %s",
                     (long long)reprs->t.shape[1], (long long)reprs->t.shape[2], shp);
        return -1;
    }
    if (question_o != NULL && question_o != Py_None) {
        if (get_float_array(question_o, "question", 2, "(n_q_heads, head_dim)", -1, question) <
            0)
            return -1;
        if (question->t.shape[0] != reprs->t.shape[1] ||
            question->t.shape[1] != reprs->t.shape[2]) {
            format_shape(question->arr, shp, sizeof shp);
            PyErr_Format(PyExc_ValueError,
                         "question: expected shape (n_q_heads=%lld, head_dim=%lld) matching "
                         "reprs, got %s",
                         (long long)reprs->t.shape[1], (long long)reprs->t.shape[2], shp);
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(retrieval_score_doc,
"retrieval_score(reprs, query, question=None, weight=0.0)\n--\n"
"\n"
"Query-weighted block scores::\n"
"\n"
"    s[b] = sum_h query[h] . reprs[b, h] + weight * sum_h question[h] . reprs[b, h]\n"
"\n"
"Parameters\n"
"----------\n"
"reprs : numpy.ndarray [n_blocks, n_q_heads, head_dim]\n"
"    float32, float16 or uint16 (bfloat16 bit patterns); n_blocks may be 0.\n"
"query : numpy.ndarray [n_q_heads, head_dim]\n"
"    Same dtype choices (mean query of the execution block).\n"
"question : numpy.ndarray [n_q_heads, head_dim] or None\n"
"    Question query; None drops the second term.\n"
"weight : float\n"
"    Finite (checked even when question is None).\n"
"\n"
"Returns\n"
"-------\n"
"numpy.ndarray float32 [n_blocks]\n"
"\n"
"Raises TypeError (types/dtypes), ValueError (ranks, shapes, non-finite\n"
"weight, a score that came out NaN/Inf).");

static PyObject *py_retrieval_score(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"reprs", "query", "question", "weight", NULL};
    PyObject *reprs_o, *query_o, *question_o = Py_None, *weight_o = NULL;
    arg_array reprs = ARG_ARRAY_INIT, query = ARG_ARRAY_INIT, question = ARG_ARRAY_INIT,
              out = ARG_ARRAY_INIT;
    PyObject *result = NULL;
    float weight = 0.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|OO:retrieval_score", kwlist, &reprs_o,
                                     &query_o, &question_o, &weight_o))
        return NULL;
    if (get_score_inputs(reprs_o, query_o, question_o, &reprs, &query, &question) < 0)
        goto done;
    if (weight_o != NULL && get_weight(weight_o, &weight) < 0)
        goto done;
    {
        npy_intp dims[1] = {(npy_intp)reprs.t.shape[0]};
        if (new_output(1, dims, QLLM_DTYPE_F32, &out) < 0)
            goto done;
    }
    {
        qllm_status st;
        const qllm_tensor *qp = question.arr != NULL ? &question.t : NULL;
        Py_BEGIN_ALLOW_THREADS
        st = qllm_retrieval_score(&reprs.t, &query.t, qp, weight, &out.t);
        Py_END_ALLOW_THREADS
        if (st != QLLM_OK) {
            raise_status(st);
            goto done;
        }
    }
    result = (PyObject *)out.arr;
    out.arr = NULL;
done:
    arg_release(&reprs);
    arg_release(&query);
    arg_release(&question);
    arg_release(&out);
    return result;
}

PyDoc_STRVAR(retrieval_topk_doc,
"retrieval_topk(scores, k)\n--\n"
"\n"
"Indices of the k highest scores, by descending score, ties toward the lower\n"
"index (fully deterministic).\n"
"\n"
"Parameters\n"
"----------\n"
"scores : numpy.ndarray float32 [n]\n"
"    Finite; n may be 0.\n"
"k : int\n"
"    >= 1; k > n returns all n indices.\n"
"\n"
"Returns\n"
"-------\n"
"numpy.ndarray int32 [min(k, n)]\n"
"\n"
"Raises TypeError (not a float32 array, k not an int), ValueError (rank,\n"
"k < 1, NaN/Inf in scores).");

static int64_t min_i64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

static PyObject *py_retrieval_topk(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"scores", "k", NULL};
    PyObject *scores_o, *k_o;
    arg_array scores = ARG_ARRAY_INIT, out = ARG_ARRAY_INIT;
    PyObject *result = NULL;
    int64_t k, count = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:retrieval_topk", kwlist, &scores_o, &k_o))
        return NULL;
    if (get_float_array(scores_o, "scores", 1, "(n,)", NPY_FLOAT32, &scores) < 0)
        goto done;
    if (get_positive_count(k_o, "k", &k) < 0)
        goto done;
    {
        npy_intp dims[1] = {(npy_intp)min_i64(k, scores.t.shape[0])};
        if (new_output(1, dims, QLLM_DTYPE_I32, &out) < 0)
            goto done;
    }
    {
        qllm_status st;
        Py_BEGIN_ALLOW_THREADS
        st = qllm_retrieval_topk(&scores.t, k, &out.t, &count);
        Py_END_ALLOW_THREADS
        if (st != QLLM_OK) {
            raise_status(st);
            goto done;
        }
    }
    if (count != out.t.shape[0]) {
        PyErr_Format(PyExc_RuntimeError,
                     "qllm_retrieval_topk: reported %lld indices, expected %lld (core bug)",
                     (long long)count, (long long)out.t.shape[0]);
        goto done;
    }
    result = (PyObject *)out.arr;
    out.arr = NULL;
done:
    arg_release(&scores);
    arg_release(&out);
    return result;
}

PyDoc_STRVAR(retrieval_select_doc,
"retrieval_select(reprs, query, question=None, weight=0.0, k=8)\n--\n"
"\n"
"retrieval_score followed by retrieval_topk, in one core call.\n"
"\n"
"Parameters\n"
"----------\n"
"reprs : numpy.ndarray [n_blocks, n_q_heads, head_dim]\n"
"    float32, float16 or uint16 (bfloat16 bit patterns); n_blocks may be 0.\n"
"query : numpy.ndarray [n_q_heads, head_dim]\n"
"question : numpy.ndarray [n_q_heads, head_dim] or None\n"
"weight : float\n"
"    Finite.\n"
"k : int\n"
"    >= 1; k > n_blocks selects every block.\n"
"\n"
"Returns\n"
"-------\n"
"idx : numpy.ndarray int32 [min(k, n_blocks)]\n"
"    Descending score, ties toward the lower index.\n"
"scores : numpy.ndarray float32 [n_blocks]\n"
"\n"
"Raises as retrieval_score and retrieval_topk.");

static PyObject *py_retrieval_select(PyObject *Py_UNUSED(mod), PyObject *args,
                                     PyObject *kwargs)
{
    static char *kwlist[] = {"reprs", "query", "question", "weight", "k", NULL};
    PyObject *reprs_o, *query_o, *question_o = Py_None, *weight_o = NULL, *k_o = NULL;
    arg_array reprs = ARG_ARRAY_INIT, query = ARG_ARRAY_INIT, question = ARG_ARRAY_INIT,
              out_scores = ARG_ARRAY_INIT, out_idx = ARG_ARRAY_INIT;
    PyObject *result = NULL;
    float weight = 0.0f;
    int64_t k = 8, count = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|OOO:retrieval_select", kwlist, &reprs_o,
                                     &query_o, &question_o, &weight_o, &k_o))
        return NULL;
    if (get_score_inputs(reprs_o, query_o, question_o, &reprs, &query, &question) < 0)
        goto done;
    if (weight_o != NULL && get_weight(weight_o, &weight) < 0)
        goto done;
    if (k_o != NULL && get_positive_count(k_o, "k", &k) < 0)
        goto done;
    {
        npy_intp nb = (npy_intp)reprs.t.shape[0];
        npy_intp nk = (npy_intp)min_i64(k, reprs.t.shape[0]);
        if (new_output(1, &nb, QLLM_DTYPE_F32, &out_scores) < 0 ||
            new_output(1, &nk, QLLM_DTYPE_I32, &out_idx) < 0)
            goto done;
    }
    {
        qllm_status st;
        const qllm_tensor *qp = question.arr != NULL ? &question.t : NULL;
        Py_BEGIN_ALLOW_THREADS
        st = qllm_retrieval_select(&reprs.t, &query.t, qp, weight, k, &out_scores.t, &out_idx.t,
                                   &count);
        Py_END_ALLOW_THREADS
        if (st != QLLM_OK) {
            raise_status(st);
            goto done;
        }
    }
    if (count != out_idx.t.shape[0]) {
        PyErr_Format(PyExc_RuntimeError,
                     "qllm_retrieval_select: reported %lld indices, expected %lld (core bug)",
                     (long long)count, (long long)out_idx.t.shape[0]);
        goto done;
    }
    result = Py_BuildValue("(OO)", (PyObject *)out_idx.arr, (PyObject *)out_scores.arr);
done:
    arg_release(&reprs);
    arg_release(&query);
    arg_release(&question);
    arg_release(&out_scores);
    arg_release(&out_idx);
    return result;
}

/* ====================================================== gather_slots */

PyDoc_STRVAR(gather_slots_doc,
"gather_slots(pool, slots)\n--\n"
"\n"
"Copy pool slots into a contiguous layout:\n"
"``out[h, i*block_size + t, :] = pool[slots[i], h, t, :]``.\n"
"\n"
"Parameters\n"
"----------\n"
"pool : numpy.ndarray [n_slots, n_kv_heads, block_size, head_dim]\n"
"    float32, float16 or uint16 (bfloat16 bit patterns).\n"
"slots : 1-D int32 array [n] (int64 / other integer arrays and lists of ints\n"
"    are converted); each in [0, n_slots); n may be 0.\n"
"\n"
"Returns\n"
"-------\n"
"numpy.ndarray [n_kv_heads, n * block_size, head_dim], same dtype as pool.\n"
"\n"
"Raises TypeError (types/dtypes), ValueError (ranks), IndexError (a slot out\n"
"of range).");

static PyObject *py_gather_slots(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"pool", "slots", NULL};
    PyObject *pool_o, *slots_o;
    arg_array pool = ARG_ARRAY_INIT, slots = ARG_ARRAY_INIT, out = ARG_ARRAY_INIT;
    PyArrayObject *idx = NULL;
    PyObject *result = NULL;
    char bound_desc[96];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:gather_slots", kwlist, &pool_o, &slots_o))
        return NULL;
    if (get_float_array(pool_o, "pool", 4, "(n_slots, n_kv_heads, block_size, head_dim)", -1,
                        &pool) < 0)
        goto done;
    snprintf(bound_desc, sizeof bound_desc, "pool has %lld slots", (long long)pool.t.shape[0]);
    idx = get_indices(slots_o, "slots", pool.t.shape[0], "slot", bound_desc);
    if (idx == NULL || view_tensor(idx, QLLM_DTYPE_I32, &slots) < 0)
        goto done;
    {
        const int64_t n = slots.t.shape[0], bs = pool.t.shape[2];
        if (bs > 0 && n > INT64_MAX / bs) {
            PyErr_Format(PyExc_ValueError, "slots: %lld slots of block_size %lld overflow",
                         (long long)n, (long long)bs);
            goto done;
        }
        npy_intp dims[3] = {(npy_intp)pool.t.shape[1], (npy_intp)(n * bs),
                            (npy_intp)pool.t.shape[3]};
        if (new_output(3, dims, pool.t.dtype, &out) < 0)
            goto done;
    }
    {
        qllm_status st;
        Py_BEGIN_ALLOW_THREADS
        st = qllm_blocks_gather_slots(&pool.t, &slots.t, &out.t);
        Py_END_ALLOW_THREADS
        if (st != QLLM_OK) {
            raise_status(st);
            goto done;
        }
    }
    result = (PyObject *)out.arr;
    out.arr = NULL;
done:
    Py_XDECREF(idx);
    arg_release(&pool);
    arg_release(&slots);
    arg_release(&out);
    return result;
}

/* ====================================================== threads */

PyDoc_STRVAR(set_num_threads_doc,
"set_num_threads(n)\n--\n"
"\n"
"Number of worker threads the core may use for one call; n <= 0 restores the\n"
"default (the number of online CPUs, at most 64).  Process-wide.");

static PyObject *py_set_num_threads(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"n", NULL};
    PyObject *n_o;
    int64_t n;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:set_num_threads", kwlist, &n_o))
        return NULL;
    if (get_int64(n_o, "n", 0, &n) < 0)
        return NULL;
    if (n > INT_MAX || n < INT_MIN) {
        PyErr_Format(PyExc_ValueError, "n: expected an int in the C int range, got %lld",
                     (long long)n);
        return NULL;
    }
    qllm_set_num_threads((int)n);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(get_num_threads_doc,
"get_num_threads()\n--\n"
"\n"
"Returns the number of worker threads (an int) the core may use for one call.");

static PyObject *py_get_num_threads(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(qllm_get_num_threads());
}

/* ====================================================== BlockStore */

typedef struct {
    PyObject_HEAD
    qllm_blocks_t *store;
    PyThread_type_lock lock; /* one core call at a time on this handle */
    int64_t block_size, n_kv_heads, head_dim, device_slots;
    qllm_dtype dtype;
    int store_data;
    PyObject *device_k; /* read-only ndarrays (data mode) or NULL */
    PyObject *device_v;
} BlockStoreObject;

static PyTypeObject BlockStoreType;

/* Run `stmt` (core calls on self->store) with the GIL released and the
 * handle's lock held: the core forbids using one handle from two threads. */
#define STORE_CALL(self, stmt)                                                                    \
    do {                                                                                          \
        Py_BEGIN_ALLOW_THREADS PyThread_acquire_lock((self)->lock, WAIT_LOCK);                    \
        stmt;                                                                                     \
        PyThread_release_lock((self)->lock);                                                      \
        Py_END_ALLOW_THREADS                                                                      \
    } while (0)

static const char *tier_name(int32_t tier)
{
    switch (tier) {
    case QLLM_TIER_NONE:
        return "none";
    case QLLM_TIER_DEVICE:
        return "device";
    case QLLM_TIER_HOST:
        return "host";
    default:
        return NULL;
    }
}

/* Move records -> [(block, from_tier, from_slot, to_tier, to_slot), ...]. */
static PyObject *moves_to_list(const qllm_block_move *moves, int64_t n, int64_t cap)
{
    if (n < 0 || n > cap) {
        PyErr_Format(PyExc_RuntimeError,
                     "qllm core reported %lld moves for a buffer of %lld (core bug)",
                     (long long)n, (long long)cap);
        return NULL;
    }
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list == NULL)
        return NULL;
    for (int64_t i = 0; i < n; ++i) {
        const qllm_block_move *m = &moves[i];
        const char *from = tier_name(m->from_tier), *to = tier_name(m->to_tier);
        if (from == NULL || to == NULL) {
            PyErr_Format(PyExc_RuntimeError, "qllm core reported unknown tier %d (core bug)",
                         from == NULL ? (int)m->from_tier : (int)m->to_tier);
            Py_DECREF(list);
            return NULL;
        }
        PyObject *tup = Py_BuildValue("(isisi)", (int)m->block, from, (int)m->from_slot, to,
                                      (int)m->to_slot);
        if (tup == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, tup);
    }
    return list;
}

static void pool_capsule_free(PyObject *capsule)
{
    PyMem_Free(PyCapsule_GetPointer(capsule, "qllm._core.pool"));
}

/* A zeroed, C-contiguous, read-only pool array [slots, hkv, bs, d] whose memory
 * is owned by a capsule (so it cannot be made writeable from Python). */
static PyObject *new_pool(BlockStoreObject *s, const char *name)
{
    const int64_t dims64[4] = {s->device_slots, s->n_kv_heads, s->block_size, s->head_dim};
    const int64_t item = (int64_t)qllm_dtype_size(s->dtype);
    int64_t nbytes = item;
    for (int i = 0; i < 4; ++i) {
        if (dims64[i] != 0 && nbytes > PY_SSIZE_T_MAX / dims64[i]) {
            PyErr_Format(PyExc_MemoryError,
                         "%s: a device pool of %lld x %lld x %lld x %lld elements does not fit "
                         "in memory",
                         name, (long long)dims64[0], (long long)dims64[1], (long long)dims64[2],
                         (long long)dims64[3]);
            return NULL;
        }
        nbytes *= dims64[i];
    }
    void *mem = PyMem_Calloc((size_t)(nbytes > 0 ? nbytes : 1), 1);
    if (mem == NULL)
        return PyErr_NoMemory();
    PyObject *capsule = PyCapsule_New(mem, "qllm._core.pool", pool_capsule_free);
    if (capsule == NULL) {
        PyMem_Free(mem);
        return NULL;
    }
    npy_intp dims[4] = {(npy_intp)dims64[0], (npy_intp)dims64[1], (npy_intp)dims64[2],
                        (npy_intp)dims64[3]};
    PyObject *arr = PyArray_New(&PyArray_Type, 4, dims, typenum_from_dtype(s->dtype), NULL, mem,
                                0, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED, NULL);
    if (arr == NULL) {
        Py_DECREF(capsule);
        return NULL;
    }
    if (PyArray_SetBaseObject((PyArrayObject *)arr, capsule) < 0) { /* steals capsule */
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

static int get_dim_param(PyObject *obj, const char *name, int64_t min, int64_t *out)
{
    if (get_int64(obj, name, 0, out) < 0)
        return -1;
    if (*out < min || *out > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: expected an int in [%lld, %lld], got %lld", name,
                     (long long)min, (long long)INT32_MAX, (long long)*out);
        return -1;
    }
    return 0;
}

static int parse_dtype_name(PyObject *obj, qllm_dtype *out)
{
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError,
                     "dtype: expected one of 'float32', 'float16', 'bfloat16' (a str), got "
                     "%.200s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *s = PyUnicode_AsUTF8(obj);
    if (s == NULL)
        return -1;
    if (!strcmp(s, "float32") || !strcmp(s, "f32"))
        *out = QLLM_DTYPE_F32;
    else if (!strcmp(s, "float16") || !strcmp(s, "f16"))
        *out = QLLM_DTYPE_F16;
    else if (!strcmp(s, "bfloat16") || !strcmp(s, "bf16"))
        *out = QLLM_DTYPE_BF16;
    else {
        PyErr_Format(PyExc_ValueError,
                     "dtype: expected one of 'float32', 'float16', 'bfloat16', got %R", obj);
        return -1;
    }
    return 0;
}

static PyObject *BlockStore_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"block_size", "n_kv_heads", "head_dim",   "dtype",
                             "device_slots", "store_data", NULL};
    PyObject *bs_o, *hkv_o, *d_o, *dtype_o = NULL, *slots_o = NULL, *data_o = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|OOO:BlockStore", kwlist, &bs_o, &hkv_o,
                                     &d_o, &dtype_o, &slots_o, &data_o))
        return NULL;

    int64_t block_size, n_kv_heads, head_dim, device_slots = 1024;
    qllm_dtype dtype = QLLM_DTYPE_F32;
    int store_data = 1;
    if (get_dim_param(bs_o, "block_size", 1, &block_size) < 0 ||
        get_dim_param(hkv_o, "n_kv_heads", 1, &n_kv_heads) < 0 ||
        get_dim_param(d_o, "head_dim", 1, &head_dim) < 0)
        return NULL;
    if (dtype_o != NULL && parse_dtype_name(dtype_o, &dtype) < 0)
        return NULL;
    if (slots_o != NULL && get_dim_param(slots_o, "device_slots", 0, &device_slots) < 0)
        return NULL;
    if (data_o != NULL) {
        if (!PyLong_Check(data_o) && !PyArray_IsScalar(data_o, Bool) &&
            !PyArray_IsScalar(data_o, Integer)) {
            PyErr_Format(PyExc_TypeError, "store_data: expected a bool, got %.200s",
                         Py_TYPE(data_o)->tp_name);
            return NULL;
        }
        store_data = PyObject_IsTrue(data_o);
        if (store_data < 0)
            return NULL;
    }

    BlockStoreObject *self = (BlockStoreObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->store = NULL;
    self->device_k = self->device_v = NULL;
    self->block_size = block_size;
    self->n_kv_heads = n_kv_heads;
    self->head_dim = head_dim;
    self->device_slots = device_slots;
    self->dtype = dtype;
    self->store_data = store_data;
    self->lock = PyThread_allocate_lock();
    if (self->lock == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    if (store_data) {
        self->device_k = new_pool(self, "device_k");
        if (self->device_k == NULL) {
            Py_DECREF(self);
            return NULL;
        }
        self->device_v = new_pool(self, "device_v");
        if (self->device_v == NULL) {
            Py_DECREF(self);
            return NULL;
        }
    }

    qllm_blocks_params params = qllm_blocks_default_params();
    params.block_size = block_size;
    params.n_kv_heads = n_kv_heads;
    params.head_dim = head_dim;
    params.dtype = dtype;
    params.device_slots = device_slots;
    params.device_k = store_data ? PyArray_DATA((PyArrayObject *)self->device_k) : NULL;
    params.device_v = store_data ? PyArray_DATA((PyArrayObject *)self->device_v) : NULL;
    qllm_status st;
    qllm_blocks_t *store = NULL;
    Py_BEGIN_ALLOW_THREADS
    st = qllm_blocks_init(&params, &store);
    Py_END_ALLOW_THREADS
    if (st != QLLM_OK) {
        qllm_blocks_free(store);
        Py_DECREF(self);
        return raise_status(st);
    }
    self->store = store;
    return (PyObject *)self;
}

static void BlockStore_dealloc(BlockStoreObject *self)
{
    qllm_blocks_free(self->store); /* before the pools it writes into */
    self->store = NULL;
    Py_CLEAR(self->device_k);
    Py_CLEAR(self->device_v);
    if (self->lock != NULL) {
        PyThread_free_lock(self->lock);
        self->lock = NULL;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Block-id bound for argument checks (the core re-checks under its lock). */
static int64_t store_count(BlockStoreObject *self)
{
    int64_t n;
    STORE_CALL(self, n = qllm_blocks_count(self->store));
    return n;
}

static PyArrayObject *get_block_ids(BlockStoreObject *self, PyObject *obj)
{
    char desc[96];
    int64_t n = store_count(self);
    snprintf(desc, sizeof desc, "unknown block: the store holds %lld blocks", (long long)n);
    return get_indices(obj, "ids", n, "block id", desc);
}

static int get_block_id(BlockStoreObject *self, PyObject *obj, int32_t *out)
{
    int64_t id;
    if (get_int64(obj, "id", 1, &id) < 0)
        return -1;
    int64_t n = store_count(self);
    if (id < 0 || id >= n) {
        PyErr_Format(PyExc_IndexError,
                     "id: unknown block id %R (the store holds %lld blocks: ids 0..%lld)", obj,
                     (long long)n, (long long)n - 1);
        return -1;
    }
    *out = (int32_t)id;
    return 0;
}

PyDoc_STRVAR(BlockStore_append_doc,
"append($self, /, k=None, v=None)\n--\n"
"\n"
"Add one block as the newest id (most recently used).\n"
"\n"
"Data mode (store_data=True): k and v are required, numpy arrays\n"
"[n_kv_heads, block_size, head_dim] of the store's dtype (uint16 bit patterns\n"
"for 'bfloat16'), any strides; the store copies them.  Bookkeeping mode: pass\n"
"neither; copy the data yourself as the moves say.\n"
"\n"
"Returns the new id and the moves performed (data mode) or to perform\n"
"(bookkeeping mode), in order: the eviction of the least recently used device\n"
"block to the host tier when the device tier is full, then the placement of\n"
"the new block (from_tier 'none').  Each move is a tuple\n"
"(block, from_tier, from_slot, to_tier, to_slot), tiers 'none' | 'device' |\n"
"'host'.");

static PyObject *BlockStore_append(BlockStoreObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"k", "v", NULL};
    PyObject *k_o = Py_None, *v_o = Py_None, *result = NULL;
    arg_array k = ARG_ARRAY_INIT, v = ARG_ARRAY_INIT;
    char shp[160];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OO:append", kwlist, &k_o, &v_o))
        return NULL;
    if (self->store_data) {
        if (k_o == Py_None || v_o == Py_None) {
            PyErr_Format(PyExc_ValueError,
                         "%s: this BlockStore keeps data (store_data=True): append needs both k "
                         "and v arrays",
                         k_o == Py_None ? "k" : "v");
            return NULL;
        }
        const int want = typenum_from_dtype(self->dtype);
        const char *dims = "(n_kv_heads, block_size, head_dim)";
        if (get_float_array(k_o, "k", 3, dims, want, &k) < 0 ||
            get_float_array(v_o, "v", 3, dims, want, &v) < 0)
            goto done;
        arg_array *kv[2] = {&k, &v};
        for (int i = 0; i < 2; ++i) {
            const qllm_tensor *t = &kv[i]->t;
            if (t->shape[0] != self->n_kv_heads || t->shape[1] != self->block_size ||
                t->shape[2] != self->head_dim) {
                format_shape(kv[i]->arr, shp, sizeof shp);
                PyErr_Format(PyExc_ValueError,
                             "%s: expected shape (n_kv_heads=%lld, block_size=%lld, "
                             "head_dim=%lld), got %s",
                             i == 0 ? "k" : "v", (long long)self->n_kv_heads,
                             (long long)self->block_size, (long long)self->head_dim, shp);
                goto done;
            }
        }
    } else if (k_o != Py_None || v_o != Py_None) {
        PyErr_Format(PyExc_ValueError,
                     "%s: this BlockStore is in bookkeeping mode (store_data=False): append "
                     "takes no k/v data",
                     k_o != Py_None ? "k" : "v");
        return NULL;
    }
    {
        qllm_block_move moves[2];
        int64_t n_moves = 0;
        int32_t id = -1;
        qllm_status st;
        const qllm_tensor *kp = k.arr != NULL ? &k.t : NULL, *vp = v.arr != NULL ? &v.t : NULL;
        STORE_CALL(self, st = qllm_blocks_append(self->store, kp, vp, &id, moves, &n_moves));
        if (st != QLLM_OK) {
            raise_status(st);
            goto done;
        }
        PyObject *list = moves_to_list(moves, n_moves, 2);
        if (list == NULL)
            goto done;
        result = Py_BuildValue("(iN)", (int)id, list);
    }
done:
    arg_release(&k);
    arg_release(&v);
    return result;
}

PyDoc_STRVAR(BlockStore_lookup_doc,
"lookup($self, /, id)\n--\n"
"\n"
"Where block ``id`` lives.  Returns (tier, slot): tier 'device' or 'host' and\n"
"the slot in that tier.  IndexError for an unknown id.");

static PyObject *BlockStore_lookup(BlockStoreObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"id", NULL};
    PyObject *id_o;
    int32_t id, tier = QLLM_TIER_NONE, slot = -1;
    qllm_status st;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:lookup", kwlist, &id_o))
        return NULL;
    if (get_block_id(self, id_o, &id) < 0)
        return NULL;
    STORE_CALL(self, st = qllm_blocks_lookup(self->store, id, &tier, &slot));
    if (st != QLLM_OK)
        return raise_status(st);
    const char *name = tier_name(tier);
    if (name == NULL)
        return PyErr_Format(PyExc_RuntimeError, "qllm core reported unknown tier %d (core bug)",
                            (int)tier);
    return Py_BuildValue("(si)", name, (int)slot);
}

PyDoc_STRVAR(BlockStore_touch_doc,
"touch($self, /, ids)\n--\n"
"\n"
"Mark ids as used now (LRU), in order.  ids: 1-D int32 array [n] (int64 arrays\n"
"and lists of ints are converted).  IndexError for an unknown id (nothing is\n"
"touched then).");

static PyObject *BlockStore_touch(BlockStoreObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"ids", NULL};
    PyObject *ids_o;
    qllm_status st;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:touch", kwlist, &ids_o))
        return NULL;
    PyArrayObject *ids = get_block_ids(self, ids_o);
    if (ids == NULL)
        return NULL;
    const int32_t *p = (const int32_t *)PyArray_DATA(ids);
    const int64_t n = (int64_t)PyArray_DIM(ids, 0);
    STORE_CALL(self, st = qllm_blocks_touch(self->store, p, n));
    Py_DECREF(ids);
    if (st != QLLM_OK)
        return raise_status(st);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(BlockStore_evict_doc,
"evict($self, /, id)\n--\n"
"\n"
"Move block ``id`` from the device tier to the host tier.  Returns the moves:\n"
"[(block, 'device', from_slot, 'host', to_slot)], or [] if it is already on\n"
"the host.  IndexError for an unknown id.");

static PyObject *BlockStore_evict(BlockStoreObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"id", NULL};
    PyObject *id_o;
    int32_t id;
    qllm_block_move moves[1];
    int64_t n_moves = 0;
    qllm_status st;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:evict", kwlist, &id_o))
        return NULL;
    if (get_block_id(self, id_o, &id) < 0)
        return NULL;
    STORE_CALL(self, st = qllm_blocks_evict(self->store, id, moves, &n_moves));
    if (st != QLLM_OK)
        return raise_status(st);
    return moves_to_list(moves, n_moves, 1);
}

PyDoc_STRVAR(BlockStore_fetch_doc,
"fetch($self, /, ids)\n--\n"
"\n"
"Make ids resident in the device tier.  Each missing block takes a free device\n"
"slot or the slot of the least recently used device block not in ids, which\n"
"moves to the host tier.  All of ids count as used now; duplicates allowed.\n"
"\n"
"ids: 1-D int32 array [n] (int64 arrays and lists of ints are converted).\n"
"Returns the moves in the order they must be performed, each\n"
"(block, from_tier, from_slot, to_tier, to_slot).  IndexError for an unknown\n"
"id; ValueError when ids hold more distinct blocks than device_slots (nothing\n"
"moved).");

static PyObject *BlockStore_fetch(BlockStoreObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"ids", NULL};
    PyObject *ids_o, *result = NULL;
    qllm_status st;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:fetch", kwlist, &ids_o))
        return NULL;
    PyArrayObject *ids = get_block_ids(self, ids_o);
    if (ids == NULL)
        return NULL;
    const int32_t *p = (const int32_t *)PyArray_DATA(ids);
    const int64_t n = (int64_t)PyArray_DIM(ids, 0);
    const int64_t cap = 2 * n;
    qllm_block_move *moves = PyMem_New(qllm_block_move, (size_t)(cap > 0 ? cap : 1));
    int64_t n_moves = 0;
    if (moves == NULL) {
        Py_DECREF(ids);
        return PyErr_NoMemory();
    }
    STORE_CALL(self, st = qllm_blocks_fetch(self->store, p, n, moves, &n_moves));
    if (st != QLLM_OK)
        raise_status(st);
    else
        result = moves_to_list(moves, n_moves, cap);
    PyMem_Free(moves);
    Py_DECREF(ids);
    return result;
}

PyDoc_STRVAR(BlockStore_gather_doc,
"gather($self, /, ids)\n--\n"
"\n"
"Copy blocks ids (any tier) into contiguous K/V (data mode only; LRU state is\n"
"not changed).\n"
"\n"
"ids: 1-D int32 array [n] (int64 arrays and lists of ints are converted).\n"
"Returns k, v: numpy arrays [n_kv_heads, n * block_size, head_dim] of the\n"
"store's dtype (uint16 bit patterns for 'bfloat16').");

static PyObject *BlockStore_gather(BlockStoreObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"ids", NULL};
    PyObject *ids_o, *result = NULL;
    arg_array k = ARG_ARRAY_INIT, v = ARG_ARRAY_INIT;
    qllm_status st;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:gather", kwlist, &ids_o))
        return NULL;
    if (!self->store_data) {
        PyErr_SetString(PyExc_ValueError,
                        "gather: this BlockStore is in bookkeeping mode (store_data=False) and "
                        "holds no data");
        return NULL;
    }
    PyArrayObject *ids = get_block_ids(self, ids_o);
    if (ids == NULL)
        return NULL;
    const int64_t n = (int64_t)PyArray_DIM(ids, 0);
    if (n > INT64_MAX / self->block_size) {
        PyErr_Format(PyExc_ValueError, "ids: %lld blocks overflow", (long long)n);
        goto done;
    }
    {
        npy_intp dims[3] = {(npy_intp)self->n_kv_heads, (npy_intp)(n * self->block_size),
                            (npy_intp)self->head_dim};
        if (new_output(3, dims, self->dtype, &k) < 0 || new_output(3, dims, self->dtype, &v) < 0)
            goto done;
    }
    {
        const int32_t *p = (const int32_t *)PyArray_DATA(ids);
        STORE_CALL(self, st = qllm_blocks_gather(self->store, p, n, &k.t, &v.t));
    }
    if (st != QLLM_OK) {
        raise_status(st);
        goto done;
    }
    result = Py_BuildValue("(OO)", (PyObject *)k.arr, (PyObject *)v.arr);
done:
    Py_DECREF(ids);
    arg_release(&k);
    arg_release(&v);
    return result;
}

PyDoc_STRVAR(BlockStore_clear_doc,
"clear($self, /)\n--\n"
"\n"
"Drop every block (capacity and pools are kept; ids restart at 0).");

static PyObject *BlockStore_clear(BlockStoreObject *self, PyObject *Py_UNUSED(ignored))
{
    STORE_CALL(self, qllm_blocks_clear(self->store));
    Py_RETURN_NONE;
}

static Py_ssize_t BlockStore_len(BlockStoreObject *self)
{
    return (Py_ssize_t)store_count(self);
}

static PyObject *BlockStore_repr(BlockStoreObject *self)
{
    int64_t count, dev, host;
    STORE_CALL(self, {
        count = qllm_blocks_count(self->store);
        dev = qllm_blocks_device_used(self->store);
        host = qllm_blocks_host_used(self->store);
    });
    return PyUnicode_FromFormat(
        "BlockStore(block_size=%lld, n_kv_heads=%lld, head_dim=%lld, dtype='%s', "
        "device_slots=%lld, store_data=%s, count=%lld, device_used=%lld, host_used=%lld)",
        (long long)self->block_size, (long long)self->n_kv_heads, (long long)self->head_dim,
        dtype_pyname(self->dtype), (long long)self->device_slots,
        self->store_data ? "True" : "False", (long long)count, (long long)dev, (long long)host);
}

/* ------------------------------------------------------------ properties */

static PyObject *BlockStore_get_count(BlockStoreObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong((long long)store_count(self));
}

static PyObject *BlockStore_get_device_used(BlockStoreObject *self, void *Py_UNUSED(closure))
{
    int64_t n;
    STORE_CALL(self, n = qllm_blocks_device_used(self->store));
    return PyLong_FromLongLong((long long)n);
}

static PyObject *BlockStore_get_host_used(BlockStoreObject *self, void *Py_UNUSED(closure))
{
    int64_t n;
    STORE_CALL(self, n = qllm_blocks_host_used(self->store));
    return PyLong_FromLongLong((long long)n);
}

static PyObject *BlockStore_get_host_capacity(BlockStoreObject *self, void *Py_UNUSED(closure))
{
    int64_t n;
    STORE_CALL(self, n = qllm_blocks_host_capacity(self->store));
    return PyLong_FromLongLong((long long)n);
}

static PyObject *BlockStore_get_block_size(BlockStoreObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong((long long)self->block_size);
}

static PyObject *BlockStore_get_n_kv_heads(BlockStoreObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong((long long)self->n_kv_heads);
}

static PyObject *BlockStore_get_head_dim(BlockStoreObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong((long long)self->head_dim);
}

static PyObject *BlockStore_get_device_slots(BlockStoreObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong((long long)self->device_slots);
}

static PyObject *BlockStore_get_dtype(BlockStoreObject *self, void *Py_UNUSED(closure))
{
    return PyUnicode_FromString(dtype_pyname(self->dtype));
}

static PyObject *BlockStore_get_store_data(BlockStoreObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->store_data);
}

static PyObject *BlockStore_get_device_k(BlockStoreObject *self, void *Py_UNUSED(closure))
{
    PyObject *o = self->device_k != NULL ? self->device_k : Py_None;
    Py_INCREF(o);
    return o;
}

static PyObject *BlockStore_get_device_v(BlockStoreObject *self, void *Py_UNUSED(closure))
{
    PyObject *o = self->device_v != NULL ? self->device_v : Py_None;
    Py_INCREF(o);
    return o;
}

#define GETTER(name, doc) {#name, (getter)BlockStore_get_##name, NULL, PyDoc_STR(doc), NULL}

static PyGetSetDef BlockStore_getset[] = {
    GETTER(count, "int: blocks appended so far (ids are 0 .. count-1)."),
    GETTER(device_used, "int: blocks currently in the device tier."),
    GETTER(host_used, "int: host-tier slots in use."),
    GETTER(host_capacity,
           "int: host slots a caller's host pool must hold (highest host slot handed out + 1)."),
    GETTER(block_size, "int: tokens per block."),
    GETTER(n_kv_heads, "int: KV heads per block."),
    GETTER(head_dim, "int: head dimension."),
    GETTER(dtype, "str: 'float32', 'float16' or 'bfloat16' (numpy arrays use uint16 bits)."),
    GETTER(device_slots, "int: capacity of the device tier in blocks."),
    GETTER(store_data, "bool: True in data mode, False in bookkeeping mode."),
    GETTER(device_k,
           "numpy.ndarray [device_slots, n_kv_heads, block_size, head_dim] (read-only view of "
           "the device-tier K pool the store writes into), or None in bookkeeping mode."),
    GETTER(device_v, "As device_k, for V."),
    {NULL, NULL, NULL, NULL, NULL},
};

#define METHOD_KW(name)                                                                           \
    {#name, (PyCFunction)(void (*)(void))BlockStore_##name, METH_VARARGS | METH_KEYWORDS,         \
     BlockStore_##name##_doc}

static PyMethodDef BlockStore_methods[] = {
    METHOD_KW(append),
    METHOD_KW(lookup),
    METHOD_KW(touch),
    METHOD_KW(evict),
    METHOD_KW(fetch),
    METHOD_KW(gather),
    {"clear", (PyCFunction)(void (*)(void))BlockStore_clear, METH_NOARGS, BlockStore_clear_doc},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods BlockStore_as_sequence = {
    .sq_length = (lenfunc)BlockStore_len,
};

PyDoc_STRVAR(BlockStore_doc,
"BlockStore(block_size, n_kv_heads, head_dim, dtype='float32', device_slots=1024, store_data=True)\n"
"--\n"
"\n"
"Block memory of one layer: which block lives in which slot of which tier\n"
"('device' pool of ``device_slots`` blocks, unbounded 'host' tier), with LRU\n"
"bookkeeping.  Ids are 0 .. count-1 in append order.\n"
"\n"
"dtype: 'float32', 'float16' or 'bfloat16' (aliases 'f32', 'f16', 'bf16');\n"
"bfloat16 data crosses as numpy uint16 arrays of bit patterns.\n"
"\n"
"store_data=True (data mode): the object allocates the device-tier pools\n"
"``device_k`` / ``device_v`` [device_slots, n_kv_heads, block_size, head_dim]\n"
"(zeroed, exposed read-only) and the store copies K/V itself on append,\n"
"eviction and fetch; ``gather`` returns block data.  store_data=False\n"
"(bookkeeping mode): the store only assigns slots and reports the moves the\n"
"caller must perform on its own pools.\n"
"\n"
"Moves are tuples (block, from_tier, from_slot, to_tier, to_slot) with tiers\n"
"'none' | 'device' | 'host'.  One call at a time runs on a store: calls from\n"
"several threads are serialised.");

static PyTypeObject BlockStoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "qllm._core.BlockStore",
    .tp_basicsize = sizeof(BlockStoreObject),
    .tp_itemsize = 0,
    .tp_dealloc = (destructor)BlockStore_dealloc,
    .tp_repr = (reprfunc)BlockStore_repr,
    .tp_as_sequence = &BlockStore_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = BlockStore_doc,
    .tp_methods = BlockStore_methods,
    .tp_getset = BlockStore_getset,
    .tp_new = BlockStore_new,
};

/* ====================================================== module */

#define FUNC_KW(name)                                                                             \
    {#name, (PyCFunction)(void (*)(void))py_##name, METH_VARARGS | METH_KEYWORDS, name##_doc}

static PyMethodDef core_methods[] = {
    FUNC_KW(repr_compute),
    FUNC_KW(retrieval_score),
    FUNC_KW(retrieval_topk),
    FUNC_KW(retrieval_select),
    FUNC_KW(gather_slots),
    FUNC_KW(set_num_threads),
    {"get_num_threads", (PyCFunction)py_get_num_threads, METH_NOARGS, get_num_threads_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(core_doc,
"qllm._core -- the qllm C core on NumPy arrays.\n"
"\n"
"Float arrays: numpy float32, float16, or uint16 holding bfloat16 bit patterns\n"
"(numpy has no bfloat16).  Index arrays: int32; int64 (and other integer)\n"
"arrays and lists of ints are converted.  Any strided view is accepted;\n"
"outputs are new C-contiguous arrays.  The GIL is released while the core\n"
"runs.\n"
"\n"
"Errors: TypeError (wrong type / dtype), ValueError (rank, shape, value,\n"
"NaN/Inf), IndexError (unknown block id, slot out of range), MemoryError,\n"
"RuntimeError (a core bug).");

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "qllm._core",
    .m_doc = core_doc,
    .m_size = -1,
    .m_methods = core_methods,
};

PyMODINIT_FUNC PyInit__core(void)
{
    import_array();
    if (PyType_Ready(&BlockStoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&core_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&BlockStoreType);
    if (PyModule_AddObject(m, "BlockStore", (PyObject *)&BlockStoreType) < 0) {
        Py_DECREF(&BlockStoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
