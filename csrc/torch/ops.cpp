/*
 * ops.cpp -- torch.ops.qllm: schemas, CPU implementations (calling the C
 * core) and Meta (fake) implementations.
 *
 * Every implementation is thin: named argument checks from tensor_view.h,
 * output allocation, one core call, status -> Python exception.  No
 * algorithm logic lives here.  The CUDA implementations (ops_cuda.cpp)
 * register for the same schemas and reuse the same checks.
 *
 * Exceptions: wrong dtype -> TypeError; wrong rank / shape / value / mixed
 * devices -> ValueError; core errors per qllm_torch::check_status.
 */
#include <Python.h> /* first: it may set feature macros */

#include <torch/library.h>

#include <tuple>

#include "tensor_view.h"

namespace qllm_torch {
namespace {

constexpr const char* kReprCompute = "qllm.repr_compute";
constexpr const char* kReprComputeOut = "qllm.repr_compute_out";
constexpr const char* kRetrievalScore = "qllm.retrieval_score";
constexpr const char* kRetrievalTopk = "qllm.retrieval_topk";
constexpr const char* kRetrievalSelect = "qllm.retrieval_select";
constexpr const char* kGatherSlots = "qllm.gather_slots";

/* ================================================================== CPU */

void repr_compute_out_cpu_impl(const char* op, const at::Tensor& keys, const at::Tensor& scores,
                               int64_t repr_topk, const at::Tensor& out) {
    const qllm_tensor k = input_view(keys);
    const qllm_tensor s = input_view(scores);
    qllm_tensor o = output_view(out);
    check_status(op, qllm_repr_compute(&k, &s, repr_topk, &o));
}

/* host_check: the core checks the scores itself, without waiting on anything:
 * ignored on the CPU. */
at::Tensor repr_compute_cpu(const at::Tensor& keys, const at::Tensor& scores, int64_t repr_topk,
                            bool /*host_check*/) {
    const auto shape = check_repr_compute_args(kReprCompute, keys, scores, repr_topk);
    at::Tensor out = at::empty_symint(shape, keys.options().dtype(at::kFloat));
    repr_compute_out_cpu_impl(kReprCompute, keys, scores, repr_topk, out);
    return out;
}

void repr_compute_out_cpu(const at::Tensor& keys, const at::Tensor& scores, int64_t repr_topk,
                          const at::Tensor& out) {
    const auto shape = check_repr_compute_args(kReprComputeOut, keys, scores, repr_topk);
    check_repr_compute_out(kReprComputeOut, out, keys, shape);
    check_out_no_overlap(kReprComputeOut, out, {{"keys", &keys}, {"scores", &scores}});
    repr_compute_out_cpu_impl(kReprComputeOut, keys, scores, repr_topk, out);
}

at::Tensor retrieval_score_cpu(const at::Tensor& reprs, const at::Tensor& query,
                               const std::optional<at::Tensor>& question, double weight) {
    const auto shape = check_retrieval_score_args(kRetrievalScore, reprs, query, question, weight);
    at::Tensor out = at::empty_symint(shape, reprs.options().dtype(at::kFloat));
    const qllm_tensor r = input_view(reprs);
    const qllm_tensor q = input_view(query);
    const qllm_tensor qq = question.has_value() ? input_view(*question) : qllm_tensor{};
    qllm_tensor o = output_view(out);
    check_status(kRetrievalScore,
                 qllm_retrieval_score(&r, &q, question.has_value() ? &qq : nullptr,
                                      static_cast<float>(weight), &o));
    return out;
}

/* The core reports how many indices it wrote: it must be what we allocated. */
void check_count(const char* op, int64_t got, const at::Tensor& idx) {
    TORCH_CHECK(got == idx.size(0), op, ": internal error: the core returned ", got,
                " indices, expected ", idx.size(0));
}

at::Tensor retrieval_topk_cpu(const at::Tensor& scores, int64_t k) {
    const auto shape = check_retrieval_topk_args(kRetrievalTopk, scores, k);
    at::Tensor idx = at::empty_symint(shape, scores.options().dtype(at::kInt));
    const qllm_tensor s = input_view(scores);
    qllm_tensor o = output_view(idx);
    int64_t count = -1;
    check_status(kRetrievalTopk, qllm_retrieval_topk(&s, k, &o, &count));
    check_count(kRetrievalTopk, count, idx);
    return idx;
}

std::tuple<at::Tensor, at::Tensor> retrieval_select_cpu(const at::Tensor& reprs,
                                                        const at::Tensor& query,
                                                        const std::optional<at::Tensor>& question,
                                                        double weight, int64_t k) {
    const char* op = kRetrievalSelect;
    const auto shapes = check_retrieval_select_args(op, reprs, query, question, weight, k);
    at::Tensor idx = at::empty_symint(shapes.indices, reprs.options().dtype(at::kInt));
    at::Tensor scores = at::empty_symint(shapes.scores, reprs.options().dtype(at::kFloat));
    const qllm_tensor r = input_view(reprs);
    const qllm_tensor q = input_view(query);
    const qllm_tensor qq = question.has_value() ? input_view(*question) : qllm_tensor{};
    qllm_tensor os = output_view(scores);
    qllm_tensor oi = output_view(idx);
    int64_t count = -1;
    check_status(op, qllm_retrieval_select(&r, &q, question.has_value() ? &qq : nullptr,
                                           static_cast<float>(weight), k, &os, &oi, &count));
    check_count(op, count, idx);
    return {idx, scores};
}

at::Tensor gather_slots_cpu(const at::Tensor& pool, const at::Tensor& slots) {
    const auto shape = check_gather_slots_args(kGatherSlots, pool, slots);
    /* Data marshalling, not logic: the core takes int32 slots.  Range-check
     * int64 values first so that none can wrap into range when narrowed. */
    at::Tensor slots32 = slots;
    if (slots.scalar_type() == at::kLong) {
        check_index_range(kGatherSlots, "slots", slots, pool.size(0));
        slots32 = slots.to(at::kInt);
    }
    at::Tensor out = at::empty_symint(shape, pool.options());
    const qllm_tensor p = input_view(pool);
    const qllm_tensor s = input_view(slots32);
    qllm_tensor o = output_view(out);
    check_status(kGatherSlots, qllm_blocks_gather_slots(&p, &s, &o));
    return out;
}

/* ================================================================= Meta */
/* Same checks, correctly shaped / typed empty outputs; symbolic sizes work. */

at::Tensor repr_compute_meta(const at::Tensor& keys, const at::Tensor& scores,
                             int64_t repr_topk, bool /*host_check*/) {
    const auto shape = check_repr_compute_args(kReprCompute, keys, scores, repr_topk);
    return at::empty_symint(shape, keys.options().dtype(at::kFloat));
}

void repr_compute_out_meta(const at::Tensor& keys, const at::Tensor& scores, int64_t repr_topk,
                           const at::Tensor& out) {
    const auto shape = check_repr_compute_args(kReprComputeOut, keys, scores, repr_topk);
    check_repr_compute_out(kReprComputeOut, out, keys, shape);
}

at::Tensor retrieval_score_meta(const at::Tensor& reprs, const at::Tensor& query,
                                const std::optional<at::Tensor>& question, double weight) {
    const auto shape = check_retrieval_score_args(kRetrievalScore, reprs, query, question, weight);
    return at::empty_symint(shape, reprs.options().dtype(at::kFloat));
}

at::Tensor retrieval_topk_meta(const at::Tensor& scores, int64_t k) {
    const auto shape = check_retrieval_topk_args(kRetrievalTopk, scores, k);
    return at::empty_symint(shape, scores.options().dtype(at::kInt));
}

std::tuple<at::Tensor, at::Tensor> retrieval_select_meta(
    const at::Tensor& reprs, const at::Tensor& query, const std::optional<at::Tensor>& question,
    double weight, int64_t k) {
    const auto shapes =
        check_retrieval_select_args(kRetrievalSelect, reprs, query, question, weight, k);
    return {at::empty_symint(shapes.indices, reprs.options().dtype(at::kInt)),
            at::empty_symint(shapes.scores, reprs.options().dtype(at::kFloat))};
}

at::Tensor gather_slots_meta(const at::Tensor& pool, const at::Tensor& slots) {
    const auto shape = check_gather_slots_args(kGatherSlots, pool, slots);
    return at::empty_symint(shape, pool.options());
}

}  // namespace
}  // namespace qllm_torch

/* =============================================================== schemas */

TORCH_LIBRARY(qllm, m) {
    /* keys [n_blocks, n_kv_heads, block_len, head_dim] f32|f16|bf16,
     * scores [n_blocks, n_q_heads, block_len] f32|f16|bf16 (finite)
     * -> float32 [n_blocks, n_q_heads, head_dim]: per (block, query head) the
     * mean key of the repr_topk highest-scoring tokens (ties: lower index).
     * Non-finite scores raise; on CUDA that check reads the device (a host
     * sync).  host_check=False skips it on CUDA: a non-finite score then
     * raises nothing and ranks as -inf (NaN) or by value (+-inf), so the
     * result stays defined (the CPU core always checks: nothing to wait on). */
    m.def("repr_compute(Tensor keys, Tensor scores, int repr_topk, *, bool host_check=True) -> Tensor");
    /* As repr_compute, written into out [n_blocks, n_q_heads, head_dim]
     * (f32|f16|bf16, may be a strided view, e.g. rows of a larger buffer). */
    m.def("repr_compute_out(Tensor keys, Tensor scores, int repr_topk, Tensor(a!) out) -> ()");
    /* reprs [n_blocks, n_q_heads, head_dim], query / question [n_q_heads, head_dim]
     * -> float32 [n_blocks]: sum_h query[h].reprs[b,h] + weight * sum_h question[h].reprs[b,h]. */
    m.def("retrieval_score(Tensor reprs, Tensor query, Tensor? question, float weight) -> Tensor");
    /* scores [n] float32 (finite) -> int32 [min(k, n)], descending, ties toward
     * the lower index. */
    m.def("retrieval_topk(Tensor scores, int k) -> Tensor");
    /* retrieval_score + retrieval_topk -> (int32 indices [min(k, n)], float32 scores [n]). */
    m.def(
        "retrieval_select(Tensor reprs, Tensor query, Tensor? question, float weight, int k)"
        " -> (Tensor, Tensor)");
    /* pool [n_slots, n_kv_heads, block_size, head_dim], slots int32|int64 [n]
     * -> [n_kv_heads, n * block_size, head_dim], pool's dtype. */
    m.def("gather_slots(Tensor pool, Tensor slots) -> Tensor");

    /* ---- GPU path (qllm/gpu.py) -- owned by the CUDA work (issue 4) ----
     * attend_run: one forward call of one layer through the GPU layer memory:
     * loops over the execution blocks of `schedule` on the device (no host
     * synchronisation).  Arguments and layouts: csrc/cuda/attend_checks.cuh
     * (qh_*: the question heads of qllm/retrieval.py, optional).
     * CUDA impl: ops_cuda.cpp; Meta impl: end of this file. */
    m.def(
        "attend_run(Tensor q, Tensor k_store, Tensor v_store, Tensor(a!) scores, "
        "Tensor(b!) reprs, Tensor(c!) retrieved, Tensor(d!) out, Tensor cos, Tensor sin, "
        "Tensor? question, Tensor schedule, float scaling, float weight, int[] cfg, "
        "Tensor(e!)? qh_raw=None, Tensor? qh_tokens=None, int[] qh_cfg=[], Tensor(f!)? k_cache=None, "
        "Tensor(g!)? v_cache=None, Tensor(h!)? tier=None, Tensor? host_tab=None, int[] tier_cfg=[]) -> ()");
    /* attend_decode: one decoded token whose per-step sizes are read on the
     * device from `dyn` (set by decode_set), so it can be captured in a CUDA
     * graph; writes the token's K/V into the stores.  cut=True: the step also
     * cuts block dyn[8] after its token scores (a second graph for the tokens
     * that cut a block). */
    m.def(
        "attend_decode(Tensor q, Tensor k, Tensor v, Tensor(a!) k_store, Tensor(b!) v_store, "
        "Tensor(c!) scores, Tensor(d!) reprs, Tensor(e!) retrieved, Tensor(f!) out, Tensor cos, "
        "Tensor sin, Tensor? question, Tensor dyn, float scaling, float weight, int[] cfg, "
        "int[] limits, Tensor? qh_raw=None, int[] qh_cfg=[], Tensor(g!)? k_cache=None, "
        "Tensor(h!)? v_cache=None, Tensor(i!)? tier=None, Tensor? host_tab=None, int[] tier_cfg=[], "
        "bool cut=False) -> ()");
    m.def("decode_set(Tensor(a!) dyn, int[] values) -> ()");
    /* ---- end of GPU path section ---- */
}

TORCH_LIBRARY_IMPL(qllm, CPU, m) {
    m.impl("repr_compute", &qllm_torch::repr_compute_cpu);
    m.impl("repr_compute_out", &qllm_torch::repr_compute_out_cpu);
    m.impl("retrieval_score", &qllm_torch::retrieval_score_cpu);
    m.impl("retrieval_topk", &qllm_torch::retrieval_topk_cpu);
    m.impl("retrieval_select", &qllm_torch::retrieval_select_cpu);
    m.impl("gather_slots", &qllm_torch::gather_slots_cpu);
}

TORCH_LIBRARY_IMPL(qllm, Meta, m) {
    m.impl("repr_compute", &qllm_torch::repr_compute_meta);
    m.impl("repr_compute_out", &qllm_torch::repr_compute_out_meta);
    m.impl("retrieval_score", &qllm_torch::retrieval_score_meta);
    m.impl("retrieval_topk", &qllm_torch::retrieval_topk_meta);
    m.impl("retrieval_select", &qllm_torch::retrieval_select_meta);
    m.impl("gather_slots", &qllm_torch::gather_slots_meta);
}

/* repr_compute_out skips the Negative / Conjugate math-bit fallbacks.  That
 * fallback clones a mutable argument with the bit set, runs the op, then
 * reads the op's return value as the result to copy back: with `-> ()` there
 * is none, and it reads past the end of the stack.  Falling through instead
 * lets the shared checks reject such a tensor with a ValueError (negative
 * bit) or TypeError (conjugate bit: complex dtype).  The functional ops keep
 * the fallback, which resolves the bit on their inputs. */
TORCH_LIBRARY_IMPL(qllm, Negative, m) {
    m.impl("repr_compute_out", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(qllm, Conjugate, m) {
    m.impl("repr_compute_out", torch::CppFunction::makeFallthrough());
}

/* ---- GPU path (issue 4): Meta impl of attend_run, same checks as CUDA ---- */
#include "../cuda/attend_checks.cuh"
TORCH_LIBRARY_IMPL(qllm, Meta, m) {
    m.impl("attend_run", &qllm_torch::attend_run_meta);
    m.impl("attend_decode", &qllm_torch::attend_decode_meta);
    m.impl("decode_set", &qllm_torch::decode_set_meta);
}
/* ---- end of GPU path section ---- */

/* `from qllm import _C` needs a module object; registration happens in the
 * static initialisers above when the shared library is loaded. */
extern "C" PyMODINIT_FUNC PyInit__C(void) {
    static PyModuleDef module_def = {
        PyModuleDef_HEAD_INIT,
        "_C",                                         /* m_name */
        "qllm torch ops (registers torch.ops.qllm)",  /* m_doc */
        -1,                                           /* m_size */
        nullptr,                                      /* m_methods */
        nullptr,                                      /* m_slots */
        nullptr,                                      /* m_traverse */
        nullptr,                                      /* m_clear */
        nullptr,                                      /* m_free */
    };
    return PyModule_Create(&module_def);
}
