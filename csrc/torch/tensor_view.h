/*
 * tensor_view.h -- at::Tensor <-> qllm_tensor plumbing for the torch ops.
 *
 * Three groups of inline helpers, shared by every TORCH_LIBRARY_IMPL of
 * qllm (CPU in ops.cpp, CUDA in ops_cuda.cpp, Meta in ops.cpp):
 *
 *   1. Argument checks (check_*_args, check_*_out).  Device-agnostic: they
 *      read only dtype, rank, (symbolic) sizes and device, never data, so the
 *      Meta / fake implementations run exactly the same checks as the real
 *      ones, symbolic shapes included.  They return the output shape(s).
 *      Failures raise with a message naming the op and the argument:
 *        dtype           -> TORCH_CHECK_TYPE   (Python TypeError)
 *        rank/shape/value/device mixing -> TORCH_CHECK_VALUE (ValueError)
 *
 *   2. Real-tensor checks (check_out_no_overlap, check_index_range).  They
 *      need strides / storage or read data; not for Meta.
 *
 *   3. Views and status mapping (input_view / output_view, check_status).
 *      input_view / output_view describe a tensor to the core without copying
 *      (pointer + sizes + strides in elements); torch strides are never
 *      negative.  check_status turns a failed qllm_status into the matching
 *      Python exception, carrying qllm_last_error().
 *
 * Messages follow "qllm.<op>: <argument>: expected ..., got ...".
 */
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <utility>

#include "qllm/qllm.h"

namespace qllm_torch {

/* ------------------------------------------------------------------ dtypes */

/* Short torch-style dtype name for messages ("float32", "int64", ...). */
inline const char* dtype_name(at::ScalarType s) {
    switch (s) {
        case at::kFloat: return "float32";
        case at::kHalf: return "float16";
        case at::kBFloat16: return "bfloat16";
        case at::kDouble: return "float64";
        case at::kInt: return "int32";
        case at::kLong: return "int64";
        case at::kShort: return "int16";
        case at::kChar: return "int8";
        case at::kByte: return "uint8";
        case at::kBool: return "bool";
        default: return c10::toString(s);
    }
}

/* The storage dtypes of the core: f32 / f16 / bf16. */
inline bool is_storage_dtype(at::ScalarType s) {
    return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

inline qllm_dtype to_qllm_dtype(at::ScalarType s) {
    switch (s) {
        case at::kFloat: return QLLM_DTYPE_F32;
        case at::kHalf: return QLLM_DTYPE_F16;
        case at::kBFloat16: return QLLM_DTYPE_BF16;
        case at::kInt: return QLLM_DTYPE_I32;
        default: break;
    }
    /* Every caller checked the dtype first: reaching this is a binding bug. */
    TORCH_CHECK(false, "qllm: internal error: no qllm dtype for ", dtype_name(s));
    return QLLM_DTYPE_F32;
}

/* ------------------------------------------------------- generic checks */

/* t has one of the storage dtypes (f32 / f16 / bf16). */
inline void check_storage_dtype(const char* op, const char* name, const at::Tensor& t) {
    TORCH_CHECK_TYPE(is_storage_dtype(t.scalar_type()), op, ": ", name,
                     ": expected dtype float32, float16 or bfloat16, got ",
                     dtype_name(t.scalar_type()));
}

/* t has exactly dtype s. */
inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        at::ScalarType s) {
    TORCH_CHECK_TYPE(t.scalar_type() == s, op, ": ", name, ": expected dtype ", dtype_name(s),
                     ", got ", dtype_name(t.scalar_type()));
}

/* t.dim() == ndim; `dims` names the axes, e.g. "(blocks, kv_heads, tokens, dim)". */
inline void check_ndim(const char* op, const char* name, const at::Tensor& t, int64_t ndim,
                       const char* dims) {
    TORCH_CHECK_VALUE(t.dim() == ndim, op, ": ", name, ": expected ", ndim, " dims ", dims,
                      ", got ", t.dim());
}

/* t.size(axis) >= 1 (axis named `axis_name`). */
inline void check_nonempty_axis(const char* op, const char* name, const at::Tensor& t,
                                int64_t axis, const char* axis_name) {
    TORCH_CHECK_VALUE(t.sym_size(axis) >= 1, op, ": ", name, ": expected ", axis_name,
                      " (shape[", axis, "]) >= 1, got shape ", t.sym_sizes());
}

/* t.size(axis) == ref.size(ref_axis): the shared axis `axis_name` agrees. */
inline void check_axis_match(const char* op, const char* name, const at::Tensor& t,
                             int64_t axis, const char* ref_name, const at::Tensor& ref,
                             int64_t ref_axis, const char* axis_name) {
    TORCH_CHECK_VALUE(t.sym_size(axis) == ref.sym_size(ref_axis), op, ": ", name,
                      ": expected shape[", axis, "] (", axis_name, ") == ", ref.sym_size(ref_axis),
                      " to match ", ref_name, " shape[", ref_axis, "], got shape ",
                      t.sym_sizes());
}

/* t lives on the same device as ref (the op's first tensor argument). */
inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
    TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, ": expected a tensor on ",
                      ref.device(), " (the device of ", ref_name, "), got ", t.device());
}

/* Views with the negative bit set (e.g. complex.conj().imag) would be read
 * without the sign flip: refuse them instead of computing a silently wrong
 * result.  The dispatcher's Negative fallback resolves the bit on the inputs
 * of the functional ops before they get here; repr_compute_out opts out of
 * that fallback (see ops.cpp), so this check is what guards it. */
inline void check_no_neg_bit(const char* op, const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(!t.is_neg(), op, ": ", name,
                      ": expected a tensor without the negative bit, call .resolve_neg() first");
}

/* ------------------------------------------------------ per-op checks */

/* repr_compute(keys, scores, repr_topk): returns the output shape
 * [n_blocks, n_q_heads, head_dim]. */
inline c10::SymDimVector check_repr_compute_args(const char* op, const at::Tensor& keys,
                                                 const at::Tensor& scores, int64_t repr_topk) {
    check_storage_dtype(op, "keys", keys);
    check_storage_dtype(op, "scores", scores);
    check_no_neg_bit(op, "keys", keys);
    check_no_neg_bit(op, "scores", scores);
    check_ndim(op, "keys", keys, 4, "(blocks, kv_heads, tokens, dim)");
    check_ndim(op, "scores", scores, 3, "(blocks, q_heads, tokens)");
    check_same_device(op, "scores", scores, "keys", keys);
    check_nonempty_axis(op, "keys", keys, 0, "blocks");
    check_nonempty_axis(op, "keys", keys, 1, "kv_heads");
    check_nonempty_axis(op, "keys", keys, 2, "tokens");
    check_nonempty_axis(op, "keys", keys, 3, "dim");
    check_axis_match(op, "scores", scores, 0, "keys", keys, 0, "blocks");
    check_axis_match(op, "scores", scores, 2, "keys", keys, 2, "tokens");
    const c10::SymInt hq = scores.sym_size(1);
    const c10::SymInt hkv = keys.sym_size(1);
    TORCH_CHECK_VALUE(hq >= 1 && hq % hkv == 0, op,
                      ": scores: expected q_heads (shape[1]) to be a positive multiple of "
                      "keys' kv_heads (",
                      hkv, "), got ", hq);
    TORCH_CHECK_VALUE(repr_topk >= 1, op, ": repr_topk: expected >= 1, got ", repr_topk);
    return c10::SymDimVector{keys.sym_size(0), hq, keys.sym_size(3)};
}

/* repr_compute_out's `out`: dtype f32/f16/bf16, shape `shape`, on keys' device. */
inline void check_repr_compute_out(const char* op, const at::Tensor& out,
                                   const at::Tensor& keys, c10::SymIntArrayRef shape) {
    check_storage_dtype(op, "out", out);
    check_same_device(op, "out", out, "keys", keys);
    check_ndim(op, "out", out, 3, "(blocks, q_heads, dim)");
    TORCH_CHECK_VALUE(out.sym_sizes() == shape, op, ": out: expected shape ", shape,
                      " (blocks, q_heads, dim), got ", out.sym_sizes());
    check_no_neg_bit(op, "out", out);
}

/* retrieval_score(reprs, query, question, weight): returns [n_blocks].
 * n_blocks may be 0. */
inline c10::SymDimVector check_retrieval_score_args(const char* op, const at::Tensor& reprs,
                                                    const at::Tensor& query,
                                                    const std::optional<at::Tensor>& question,
                                                    double weight) {
    check_storage_dtype(op, "reprs", reprs);
    check_storage_dtype(op, "query", query);
    if (question.has_value()) check_storage_dtype(op, "question", *question);
    check_no_neg_bit(op, "reprs", reprs);
    check_no_neg_bit(op, "query", query);
    if (question.has_value()) check_no_neg_bit(op, "question", *question);
    check_ndim(op, "reprs", reprs, 3, "(blocks, q_heads, dim)");
    check_ndim(op, "query", query, 2, "(q_heads, dim)");
    if (question.has_value()) check_ndim(op, "question", *question, 2, "(q_heads, dim)");
    check_same_device(op, "query", query, "reprs", reprs);
    if (question.has_value()) check_same_device(op, "question", *question, "reprs", reprs);
    check_nonempty_axis(op, "reprs", reprs, 1, "q_heads");
    check_nonempty_axis(op, "reprs", reprs, 2, "dim");
    check_axis_match(op, "query", query, 0, "reprs", reprs, 1, "q_heads");
    check_axis_match(op, "query", query, 1, "reprs", reprs, 2, "dim");
    if (question.has_value()) {
        check_axis_match(op, "question", *question, 0, "reprs", reprs, 1, "q_heads");
        check_axis_match(op, "question", *question, 1, "reprs", reprs, 2, "dim");
    }
    /* The core takes a float: a double that overflows float32 is not finite there. */
    TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(weight)), op,
                      ": weight: expected a finite float32 value, got ", weight);
    return c10::SymDimVector{reprs.sym_size(0)};
}

/* The k of a top-k: at least 1. */
inline void check_k(const char* op, int64_t k) {
    TORCH_CHECK_VALUE(k >= 1, op, ": k: expected >= 1, got ", k);
}

/* retrieval_topk(scores, k): returns [min(k, n)]. */
inline c10::SymDimVector check_retrieval_topk_args(const char* op, const at::Tensor& scores,
                                                   int64_t k) {
    check_dtype(op, "scores", scores, at::kFloat);
    check_no_neg_bit(op, "scores", scores);
    check_ndim(op, "scores", scores, 1, "(blocks)");
    check_k(op, k);
    return c10::SymDimVector{scores.sym_size(0).min(c10::SymInt(k))};
}

/* retrieval_select(reprs, query, question, weight, k): the shapes of
 * (indices [min(k, n_blocks)], scores [n_blocks]). */
struct SelectShapes {
    c10::SymDimVector indices;
    c10::SymDimVector scores;
};
inline SelectShapes check_retrieval_select_args(const char* op, const at::Tensor& reprs,
                                                const at::Tensor& query,
                                                const std::optional<at::Tensor>& question,
                                                double weight, int64_t k) {
    SelectShapes shapes;
    shapes.scores = check_retrieval_score_args(op, reprs, query, question, weight);
    check_k(op, k);
    shapes.indices = c10::SymDimVector{shapes.scores[0].min(c10::SymInt(k))};
    return shapes;
}

/* gather_slots(pool, slots): returns [n_kv_heads, n * block_size, head_dim]. */
inline c10::SymDimVector check_gather_slots_args(const char* op, const at::Tensor& pool,
                                                 const at::Tensor& slots) {
    check_storage_dtype(op, "pool", pool);
    TORCH_CHECK_TYPE(slots.scalar_type() == at::kInt || slots.scalar_type() == at::kLong, op,
                     ": slots: expected dtype int32 or int64, got ",
                     dtype_name(slots.scalar_type()));
    check_no_neg_bit(op, "pool", pool);
    check_ndim(op, "pool", pool, 4, "(slots, kv_heads, tokens, dim)");
    check_ndim(op, "slots", slots, 1, "(n)");
    check_same_device(op, "slots", slots, "pool", pool);
    return c10::SymDimVector{pool.sym_size(1), slots.sym_size(0) * pool.sym_size(2),
                             pool.sym_size(3)};
}

/* --------------------------------------------- checks on real tensors */

/* [first byte, one past the last byte] spanned by t; empty for numel == 0. */
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
    if (t.numel() == 0) return {0, 0};
    int64_t last = 0; /* offset in elements of the last element (strides >= 0) */
    for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
    const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    return {begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

/* `out` must not write one element twice (an expanded / zero-stride view) and
 * must not share memory with an input.  Conservative: any intersection of the
 * address spans counts as sharing, even interleaved views that never touch
 * the same element.  Needs real storage: CPU / CUDA only, not Meta. */
inline void check_out_no_overlap(
    const char* op, const at::Tensor& out,
    std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
                      ": out: expected a tensor whose elements do not overlap in memory "
                      "(an expanded / zero-stride view was given)");
    const auto o = byte_span(out);
    if (o.first == o.second) return;
    for (const auto& in : inputs) {
        const auto s = byte_span(*in.second);
        const bool disjoint = s.first == s.second || s.second <= o.first || o.second <= s.first;
        TORCH_CHECK_VALUE(disjoint, op, ": out: expected memory not shared with ", in.first);
    }
}

/* Every value of the integer tensor idx lies in [0, bound).  Reads the data
 * (a device sync on CUDA); used before narrowing int64 indices to int32 so
 * that no value can wrap into range. */
inline void check_index_range(const char* op, const char* name, const at::Tensor& idx,
                              int64_t bound) {
    if (idx.numel() == 0) return;
    const auto mm = at::aminmax(idx);
    const int64_t lo = std::get<0>(mm).item<int64_t>();
    const int64_t hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < bound, op, ": ", name, ": expected values in [0, ",
                      bound, "), got values in [", lo, ", ", hi, "]");
}

/* ------------------------------------------------------------------ views */

namespace detail {
inline qllm_tensor make_view(const at::Tensor& t, void* data) {
    TORCH_CHECK(t.dim() <= QLLM_MAX_DIMS, "qllm: internal error: ", t.dim(),
                " dims exceed QLLM_MAX_DIMS");
    qllm_tensor v;
    std::memset(&v, 0, sizeof(v));
    v.data = data;
    v.dtype = to_qllm_dtype(t.scalar_type());
    v.ndim = static_cast<int32_t>(t.dim());
    for (int64_t i = 0; i < t.dim(); ++i) {
        v.shape[i] = t.size(i);
        v.strides[i] = t.stride(i); /* in elements, never negative in torch */
    }
    return v;
}
}  // namespace detail

/* A read-only view of t (the core takes it through a const qllm_tensor*). */
inline qllm_tensor input_view(const at::Tensor& t) {
    return detail::make_view(t, const_cast<void*>(t.const_data_ptr()));
}

/* A view of t the core writes into. */
inline qllm_tensor output_view(const at::Tensor& t) {
    return detail::make_view(t, t.mutable_data_ptr());
}

/* ----------------------------------------------------------- core status */

/* Raise for a failed core call with the core's own message:
 *   QLLM_ERR_INVALID_ARG, QLLM_ERR_NONFINITE -> ValueError
 *   QLLM_ERR_NOT_FOUND                       -> IndexError
 *   anything else (NOMEM, CAPACITY, INTERNAL) -> RuntimeError */
inline void check_status(const char* op, qllm_status st) {
    if (st == QLLM_OK) return;
    const char* msg = qllm_last_error();
    if (msg == nullptr || msg[0] == '\0') msg = "(no message)";
    const char* code = qllm_status_str(st);
    switch (st) {
        case QLLM_ERR_INVALID_ARG:
        case QLLM_ERR_NONFINITE:
            TORCH_CHECK_VALUE(false, op, ": ", msg, " [", code, "]");
            break;
        case QLLM_ERR_NOT_FOUND:
            TORCH_CHECK_INDEX(false, op, ": ", msg, " [", code, "]");
            break;
        default:
            TORCH_CHECK(false, op, ": ", msg, " [", code, "]");
    }
}

}  // namespace qllm_torch
