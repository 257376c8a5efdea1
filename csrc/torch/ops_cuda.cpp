/*
 * ops_cuda.cpp -- CUDA implementations of torch.ops.qllm (schemas in ops.cpp).
 *
 * The generic ops (repr_compute[_out], retrieval_score/topk/select,
 * gather_slots) run the same argument checks as the CPU ones (tensor_view.h)
 * and then one launcher of csrc/cuda on the current stream.  Where the CPU
 * core reports non-finite values or out-of-range indices, these do too: that
 * check reads a flag back from the device (a synchronisation), acceptable for
 * the generic per-block Python path; the fast path (attend_run) never does.
 *
 * attend_run: one call per forward call and layer of qllm/gpu.py.  It loops
 * over the execution blocks of a host-side schedule (all sizes are known on
 * the host from token counts) and enqueues the kernels of attend.cu; block
 * ids chosen by the device top-k stay on the device and drive the attention.
 */
#ifdef QLLM_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../cuda/attend_checks.cuh"
#include "../cuda/qllm_cuda.cuh"
#include "tensor_view.h"

static_assert(qllm_torch::kQhMaxCols == QLLM_CUDA_QH_MAX_COLS, "question-head column limits differ");
static_assert(qllm_torch::kDynFields == QLLM_DYN_FIELDS, "decode row sizes differ");

namespace qllm_torch {
namespace {

constexpr const char *kReprCompute = "qllm.repr_compute";
constexpr const char *kReprComputeOut = "qllm.repr_compute_out";
constexpr const char *kRetrievalScore = "qllm.retrieval_score";
constexpr const char *kRetrievalTopk = "qllm.retrieval_topk";
constexpr const char *kRetrievalSelect = "qllm.retrieval_select";
constexpr const char *kGatherSlots = "qllm.gather_slots";

void check_cuda(const char *op, int st) {
    TORCH_CHECK(st == QLLM_CUDA_OK, op, ": ", qllm_cuda_last_error());
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

/* The decode step's side stream and fork / join events, per host thread and
 * device (qllm_gpu_decode.side): a dedicated pool stream, so the rotations
 * never queue behind unrelated work, and events no other thread records. */
struct DecodeFork {
    cudaStream_t side = nullptr;
    cudaEvent_t fork = nullptr, join = nullptr;
};

struct DecodeForks {
    std::vector<DecodeFork> dev;
    ~DecodeForks() {
        for (auto &f : dev) { /* at thread exit; errors (CUDA shut down) are moot */
            if (f.fork != nullptr) (void)cudaEventDestroy(f.fork);
            if (f.join != nullptr) (void)cudaEventDestroy(f.join);
        }
    }
};

const DecodeFork &decode_fork(c10::DeviceIndex device) {
    thread_local DecodeForks forks;
    const size_t i = static_cast<size_t>(device);
    if (forks.dev.size() <= i) forks.dev.resize(i + 1);
    DecodeFork &f = forks.dev[i];
    if (f.side == nullptr) {
        C10_CUDA_CHECK(cudaEventCreateWithFlags(&f.fork, cudaEventDisableTiming));
        C10_CUDA_CHECK(cudaEventCreateWithFlags(&f.join, cudaEventDisableTiming));
        f.side = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device).stream();
    }
    return f;
}

/* Thread blocks of one attention launch over E queries, before key splits:
 * row tiles x query heads, or one per KV head when a single query packs its
 * heads (attend.cu attn_packs). */
int64_t attention_ctas(int64_t E, int64_t hq, int64_t hkv) {
    if (qllm_cuda_attention_packs(E, static_cast<int>(hq / hkv))) return hkv;
    const int64_t bm = qllm_cuda_attention_rows();
    return ((E + bm - 1) / bm) * hq;
}

/* Multiprocessors of the current device (queried once per device). */
int multiprocessors() {
    static int cached[64] = {0};
    int dev = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    if (dev < 0 || dev >= 64) return 132;
    if (cached[dev] == 0) {
        int n = 0;
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
        cached[dev] = n > 0 ? n : 1;
    }
    return cached[dev];
}

/* Non-finite values raise like the CPU core (QLLM_ERR_NONFINITE -> ValueError). */
void check_finite(const char *op, const char *name, const at::Tensor &t) {
    if (t.numel() == 0) return;
    const bool ok = at::isfinite(t).all().item<bool>();
    TORCH_CHECK_VALUE(ok, op, ": ", name, ": contains NaN or Inf [QLLM_ERR_NONFINITE]");
}

/* ---------------------------------------------------------- repr_compute */

void repr_compute_out_impl(const char *op, const at::Tensor &keys, const at::Tensor &scores,
                           int64_t repr_topk, const at::Tensor &out, bool host_check = true) {
    if (host_check) check_finite(op, "scores", scores); /* reads the device: a host sync */
    const qllm_tensor k = input_view(keys);
    const qllm_tensor s = input_view(scores);
    const qllm_tensor o = output_view(out);
    check_cuda(op, qllm_cuda_repr_compute(&k, &s, repr_topk, &o, stream()));
}

at::Tensor repr_compute_cuda(const at::Tensor &keys, const at::Tensor &scores, int64_t repr_topk,
                             bool host_check) {
    const auto shape = check_repr_compute_args(kReprCompute, keys, scores, repr_topk);
    const c10::cuda::CUDAGuard guard(keys.device());
    at::Tensor out = at::empty_symint(shape, keys.options().dtype(at::kFloat));
    repr_compute_out_impl(kReprCompute, keys, scores, repr_topk, out, host_check);
    return out;
}

void repr_compute_out_cuda(const at::Tensor &keys, const at::Tensor &scores, int64_t repr_topk,
                           const at::Tensor &out) {
    const auto shape = check_repr_compute_args(kReprComputeOut, keys, scores, repr_topk);
    check_repr_compute_out(kReprComputeOut, out, keys, shape);
    check_out_no_overlap(kReprComputeOut, out, {{"keys", &keys}, {"scores", &scores}});
    const c10::cuda::CUDAGuard guard(keys.device());
    repr_compute_out_impl(kReprComputeOut, keys, scores, repr_topk, out);
}

/* -------------------------------------------------------------- retrieval */

at::Tensor score_impl(const char *op, const at::Tensor &reprs, const at::Tensor &query,
                      const std::optional<at::Tensor> &question, double weight,
                      c10::SymDimVector shape) {
    at::Tensor out = at::empty_symint(shape, reprs.options().dtype(at::kFloat));
    const qllm_tensor r = input_view(reprs);
    const qllm_tensor q = input_view(query);
    const qllm_tensor qq = question.has_value() ? input_view(*question) : qllm_tensor{};
    const qllm_tensor o = output_view(out);
    check_cuda(op, qllm_cuda_retrieval_score(&r, &q, question.has_value() ? &qq : nullptr,
                                             static_cast<float>(weight), &o, stream()));
    check_finite(op, "block scores (reprs, query or question)", out);
    return out;
}

at::Tensor retrieval_score_cuda(const at::Tensor &reprs, const at::Tensor &query,
                                const std::optional<at::Tensor> &question, double weight) {
    const auto shape = check_retrieval_score_args(kRetrievalScore, reprs, query, question, weight);
    const c10::cuda::CUDAGuard guard(reprs.device());
    return score_impl(kRetrievalScore, reprs, query, question, weight, shape);
}

at::Tensor topk_impl(const char *op, const at::Tensor &scores, int64_t k, c10::SymDimVector shape) {
    at::Tensor idx = at::empty_symint(shape, scores.options().dtype(at::kInt));
    const qllm_tensor s = input_view(scores);
    const qllm_tensor o = output_view(idx);
    check_cuda(op, qllm_cuda_retrieval_topk(&s, idx.size(0), &o, stream()));
    return idx;
}

at::Tensor retrieval_topk_cuda(const at::Tensor &scores, int64_t k) {
    const auto shape = check_retrieval_topk_args(kRetrievalTopk, scores, k);
    const c10::cuda::CUDAGuard guard(scores.device());
    check_finite(kRetrievalTopk, "scores", scores);
    return topk_impl(kRetrievalTopk, scores, k, shape);
}

std::tuple<at::Tensor, at::Tensor> retrieval_select_cuda(const at::Tensor &reprs,
                                                         const at::Tensor &query,
                                                         const std::optional<at::Tensor> &question,
                                                         double weight, int64_t k) {
    const auto shapes = check_retrieval_select_args(kRetrievalSelect, reprs, query, question, weight, k);
    const c10::cuda::CUDAGuard guard(reprs.device());
    at::Tensor scores = score_impl(kRetrievalSelect, reprs, query, question, weight, shapes.scores);
    at::Tensor idx = topk_impl(kRetrievalSelect, scores, k, shapes.indices);
    return {idx, scores};
}

/* ---------------------------------------------------------- gather_slots */

/* As tensor_view.h's check_index_range (same message), numbers formatted with
 * std::to_string: see num_str in attend_checks.cuh. */
void check_slot_range(const char *op, const at::Tensor &idx, int64_t bound) {
    if (idx.numel() == 0) return;
    const auto mm = at::aminmax(idx);
    const int64_t lo = std::get<0>(mm).item<int64_t>();
    const int64_t hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < bound, op, ": slots: expected values in [0, ", num_str(bound),
                      "), got values in [", num_str(lo), ", ", num_str(hi), "]");
}

at::Tensor gather_slots_cuda(const at::Tensor &pool, const at::Tensor &slots) {
    const auto shape = check_gather_slots_args(kGatherSlots, pool, slots);
    const c10::cuda::CUDAGuard guard(pool.device());
    check_slot_range(kGatherSlots, slots, pool.size(0));
    at::Tensor out = at::empty_symint(shape, pool.options());
    if (out.numel() == 0) return out;
    const qllm_tensor p = input_view(pool);
    check_cuda(kGatherSlots,
               qllm_cuda_gather_slots(&p, slots.const_data_ptr(), slots.scalar_type() == at::kLong,
                                      slots.size(0), slots.stride(0), out.mutable_data_ptr(),
                                      stream()));
    return out;
}

/* ------------------------------------------------------------ attend_run */

struct ExecRow {
    int64_t t0, E, P0, T0, init_len, n_blocks, n_ret, m, cut_b0, cut_n;
};

ExecRow read_row(const int64_t *s, int64_t i) {
    const int64_t *r = s + i * kScheduleFields;
    return ExecRow{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]};
}

/* The kernels' description of one layer's state: shapes from the tensors, the
 * algorithm constants from cfg (n_init, n_local, block_size, topk, repr_topk, streaming). */
qllm_gpu_layer describe_layer(const at::Tensor &q, const at::Tensor &k_store, const at::Tensor &v_store,
                              const at::Tensor &scores, const at::Tensor &reprs, const at::Tensor &cos,
                              const at::Tensor &sin, at::IntArrayRef cfg) {
    qllm_gpu_layer ly;
    ly.dtype = q.scalar_type() == at::kHalf ? QLLM_DTYPE_F16 : QLLM_DTYPE_BF16;
    ly.head_dim = static_cast<int>(q.size(2));
    ly.hq = static_cast<int>(q.size(0));
    ly.hkv = static_cast<int>(k_store.size(0));
    ly.n_init = static_cast<int>(cfg[0]);
    ly.n_local = static_cast<int>(cfg[1]);
    ly.block_size = static_cast<int>(cfg[2]);
    ly.streaming = static_cast<int>(cfg[5]);
    ly.cap = k_store.size(1);
    ly.ring = scores.size(1);
    ly.cos = cos.const_data_ptr<float>();
    ly.sin = sin.const_data_ptr<float>();
    ly.rope_len = cos.size(0);
    ly.k_store = const_cast<void *>(k_store.const_data_ptr());
    ly.v_store = const_cast<void *>(v_store.const_data_ptr());
    ly.scores = const_cast<float *>(scores.const_data_ptr<float>());
    ly.reprs = const_cast<float *>(reprs.const_data_ptr<float>());
    ly.reprs_cap = reprs.size(0);
    ly.wmask = INT64_MAX;
    ly.k_cache = ly.v_cache = nullptr;
    ly.n_slots = 0;
    ly.tier = nullptr;
    ly.tier_nb = 0;
    ly.miss_cap = 0;
    ly.host_k = ly.host_v = nullptr;
    ly.n_chunks = 0;
    ly.chunk_blocks = 0;
    return ly;
}

/* The tier fields of a layer (arguments checked by check_tier_args). */
void describe_tiers(qllm_gpu_layer &ly, const std::optional<at::Tensor> &k_cache,
                    const std::optional<at::Tensor> &v_cache, const std::optional<at::Tensor> &tier,
                    const std::optional<at::Tensor> &host_tab, at::IntArrayRef tier_cfg) {
    if (tier_cfg.empty()) return;
    ly.wmask = tier_cfg[0] - 1;
    ly.chunk_blocks = static_cast<int>(tier_cfg[1]);
    ly.miss_cap = static_cast<int>(tier_cfg[2]);
    ly.k_cache = k_cache->mutable_data_ptr();
    ly.v_cache = v_cache->mutable_data_ptr();
    ly.n_slots = static_cast<int>(k_cache->size(0));
    ly.tier = tier->mutable_data_ptr<int32_t>();
    ly.tier_nb = tier->size(0) - (4 + 2 * tier_cfg[2] + 2 * k_cache->size(0));
    ly.host_k = host_tab->const_data_ptr<int64_t>();
    ly.host_v = ly.host_k + host_tab->size(1);
    ly.n_chunks = host_tab->size(1);
}

void attend_run_cuda(const at::Tensor &q, const at::Tensor &k_store, const at::Tensor &v_store,
                     const at::Tensor &scores, const at::Tensor &reprs, const at::Tensor &retrieved,
                     const at::Tensor &out, const at::Tensor &cos, const at::Tensor &sin,
                     const std::optional<at::Tensor> &question, const at::Tensor &schedule,
                     double scaling, double weight, at::IntArrayRef cfg,
                     const std::optional<at::Tensor> &qh_raw, const std::optional<at::Tensor> &qh_tokens,
                     at::IntArrayRef qh_cfg, const std::optional<at::Tensor> &k_cache,
                     const std::optional<at::Tensor> &v_cache, const std::optional<at::Tensor> &tier,
                     const std::optional<at::Tensor> &host_tab, at::IntArrayRef tier_cfg) {
    const char *op = kAttendRun;
    check_attend_run_args(q, k_store, v_store, scores, reprs, retrieved, out, cos, sin, question,
                          schedule, cfg);
    check_qheads_args(op, q, question, qh_raw, qh_tokens, qh_cfg);
    check_tier_args(op, q, k_store, reprs, cfg, k_cache, v_cache, tier, host_tab, tier_cfg, 4);
    const bool tiered = !tier_cfg.empty();
    TORCH_CHECK_VALUE(schedule.device().is_cpu() && schedule.is_contiguous(), op,
                      ": schedule: expected a contiguous CPU tensor");
    TORCH_CHECK_VALUE(q.is_cuda(), op, ": q: expected a CUDA tensor");
    const c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t st = stream();

    const int64_t hq = q.size(0), T = q.size(1), D = q.size(2);
    const int64_t hkv = k_store.size(0), cap = k_store.size(1);
    const int64_t R = scores.size(1), cap_b = reprs.size(0), P = cos.size(0);
    const int64_t n_exec = schedule.size(0), kk = retrieved.size(1);
    const int64_t n_init = cfg[0], n_local = cfg[1], bs = cfg[2], topk = cfg[3],
                  repr_topk = cfg[4], streaming = cfg[5];
    TORCH_CHECK_VALUE(n_init >= 0 && n_local >= 1 && bs >= 1 && topk >= 0 && repr_topk >= 1 &&
                          (streaming == 0 || streaming == 1) && n_local <= P,
                      op, ": cfg: bad values ", shape_str(cfg));
    const bool uses_blocks = streaming == 0;

    /* Host-side validation of the schedule: every index the kernels form
     * stays inside the tensors. */
    const int64_t *sched = schedule.const_data_ptr<int64_t>();
    int64_t e_max = 1, l_max = 1, t_next = 0;
    for (int64_t i = 0; i < n_exec; ++i) {
        const ExecRow r = read_row(sched, i);
        const int64_t L = r.P0 - r.T0 + r.E;
        TORCH_CHECK_VALUE(r.t0 == t_next && r.E >= 1 && r.t0 + r.E <= T, op,
                          ": schedule row ", num_str(i), ": rows ", num_str(r.t0), "+", num_str(r.E),
                          " do not tile q's ", num_str(T), " tokens");
        t_next = r.t0 + r.E;
        TORCH_CHECK_VALUE(r.T0 >= 0 && r.T0 <= r.P0 && (tiered || r.P0 + r.E <= cap) && L <= P && L <= R, op,
                          ": schedule row ", num_str(i), ": positions P0=", num_str(r.P0), " T0=",
                          num_str(r.T0), " E=", num_str(r.E), " exceed store ", num_str(cap),
                          ", rope table ", num_str(P), " or score ring ", num_str(R));
        TORCH_CHECK_VALUE(r.init_len >= 0 && r.init_len <= r.T0 && r.m >= 0 && r.m <= L, op,
                          ": schedule row ", num_str(i), ": init_len / m out of range");
        TORCH_CHECK_VALUE(r.n_blocks >= 0 && r.n_blocks <= cap_b &&
                              (r.n_blocks == 0 || n_init + r.n_blocks * bs <= r.T0) &&
                              r.n_ret >= 0 && r.n_ret <= std::min(r.n_blocks, std::min(kk, topk)) &&
                              (uses_blocks || r.n_ret == 0),
                          op, ": schedule row ", num_str(i), ": blocks out of range");
        TORCH_CHECK_VALUE(r.n_ret == 0 || r.init_len == n_init, op, ": schedule row ", num_str(i),
                          ": retrieval needs the init tokens in memory");
        TORCH_CHECK_VALUE(r.cut_n >= 0 && (r.cut_n == 0 || (uses_blocks && r.cut_b0 >= 0 &&
                                                            r.cut_b0 + r.cut_n <= cap_b &&
                                                            n_init + (r.cut_b0 + r.cut_n) * bs <= r.P0 + r.E &&
                                                            n_init + r.cut_b0 * bs >= r.T0)),
                          op, ": schedule row ", num_str(i), ": cut blocks out of range");
        e_max = std::max(e_max, r.E);
        l_max = std::max(l_max, L);
    }
    TORCH_CHECK_VALUE(t_next == T, op, ": schedule covers ", num_str(t_next), " of ", num_str(T), " tokens");
    /* tiered: the ring holds every position of the call from the first tail start on */
    const int64_t ring_hi = read_row(sched, 0).P0 + T, ring_lo = tiered ? tier_cfg[3] : 0;
    if (tiered) {
        const int64_t lo = std::max<int64_t>(read_row(sched, 0).T0, n_init);
        TORCH_CHECK_VALUE(ring_lo <= lo && ring_hi - ring_lo <= tier_cfg[0], op, ": tier_cfg: the ring of ",
                          num_str(tier_cfg[0]), " rows holds positions ", num_str(ring_lo), "..", num_str(ring_hi),
                          ", the call needs ", num_str(lo), "..", num_str(ring_hi));
        int64_t cut_max = 0;
        for (int64_t i = 0; i < n_exec; ++i) cut_max = std::max(cut_max, read_row(sched, i).cut_b0 + read_row(sched, i).cut_n);
        TORCH_CHECK_VALUE(cut_max <= tier->size(0) - (4 + 2 * tier_cfg[2] + 2 * k_cache->size(0)), op,
                          ": tier: too few block entries for the schedule");
    }

    /* Question heads: selection columns 0 .. qh_sel-1, this layer's heads at
     * columns qh_col0 + i; the raw matrix must hold every block they touch. */
    const int qh_sel = qh_cfg.empty() ? 0 : static_cast<int>(qh_cfg[0]);
    const int qh_col0 = qh_cfg.empty() ? 0 : static_cast<int>(qh_cfg[1]);
    std::vector<int> qh_heads;
    for (size_t i = 2; i < qh_cfg.size(); ++i) qh_heads.push_back(static_cast<int>(qh_cfg[i]));
    float *qh_raw_p = nullptr;
    int64_t qh_ld = 0;
    if (qh_sel > 0 || !qh_heads.empty()) {
        qh_raw_p = qh_raw->mutable_data_ptr<float>();
        qh_ld = qh_raw->size(1);
        int64_t rows_needed = 0;
        for (int64_t i = 0; i < n_exec; ++i) {
            const ExecRow r = read_row(sched, i);
            if (qh_sel > 0 && r.n_ret > 0) rows_needed = std::max(rows_needed, r.n_blocks);
            if (!qh_heads.empty() && r.cut_n > 0) rows_needed = std::max(rows_needed, r.cut_b0 + r.cut_n);
        }
        TORCH_CHECK_VALUE(qh_raw->size(0) >= rows_needed, op, ": qh_raw: ", num_str(qh_raw->size(0)),
                          " rows, the schedule needs ", num_str(rows_needed));
    }

    qllm_gpu_layer ly = describe_layer(q, k_store, v_store, scores, reprs, cos, sin, cfg);
    describe_tiers(ly, k_cache, v_cache, tier, host_tab, tier_cfg);

    /* workspace (caching allocator: no synchronisation) */
    const auto opt_t = q.options();
    const auto opt_f = q.options().dtype(at::kFloat);
    at::Tensor qfix = at::empty({hq, e_max, D}, opt_t);
    at::Tensor qloc = at::empty({hq, e_max, D}, opt_t);
    at::Tensor krot = at::empty({hkv, l_max, D}, opt_t);
    at::Tensor lse = at::empty({hq, e_max}, opt_f);
    const int sms = multiprocessors();
    const int64_t bm = qllm_cuda_attention_rows();
    auto choose_split = [&](const ExecRow &r) -> int {
        const int64_t ctas = attention_ctas(r.E, hq, hkv);
        if (2 * ctas >= sms) return 1; /* enough row tiles: no split, no combine */
        const int64_t M = r.init_len + r.n_ret * bs + r.m;
        const int64_t L = r.P0 - r.T0 + r.E;
        const int64_t tiles = (M + QLLM_CUDA_ATTN_BN - 1) / QLLM_CUDA_ATTN_BN +
                              std::min(L, n_local + bm) / QLLM_CUDA_ATTN_BN + 1;
        int64_t s = (2 * sms + ctas - 1) / ctas;
        s = std::min<int64_t>({s, tiles, QLLM_CUDA_MAX_SPLIT});
        return static_cast<int>(std::max<int64_t>(s, 1));
    };
    int split_max = 1;
    for (int64_t i = 0; i < n_exec; ++i) split_max = std::max(split_max, choose_split(read_row(sched, i)));
    at::Tensor part_o, part_lse;
    if (split_max > 1) {
        part_o = at::empty({split_max, hq, e_max, D}, opt_f);
        part_lse = at::empty({split_max, hq, e_max}, opt_f);
    }
    retrieved.fill_(-1);

    const float *qq = question.has_value() ? question->const_data_ptr<float>() : nullptr;
    const float w = static_cast<float>(weight);
    const char *qbase = static_cast<const char *>(q.const_data_ptr());
    char *obase = static_cast<char *>(out.mutable_data_ptr());
    const int64_t esz = q.element_size();
    at::Tensor qcomb, bscore;
    if (uses_blocks) {
        /* Block scores for every (execution block, block existing at the start). */
        const int64_t exc = read_row(sched, 0).E; /* all rows but the last have this size */
        for (int64_t i = 0; i + 1 < n_exec; ++i)
            TORCH_CHECK_VALUE(read_row(sched, i).E == exc, op,
                              ": schedule: execution blocks must have equal sizes but the last");
        qcomb = at::empty({n_exec, hq, D}, opt_f);
        bscore = at::empty({n_exec, std::max<int64_t>(cap_b, 1)}, opt_f);
        check_cuda(op, qllm_cuda_query_comb(&ly, q.const_data_ptr(), q.stride(0), q.stride(1), T,
                                            static_cast<int>(exc), static_cast<int>(n_exec), qq, w,
                                            qcomb.mutable_data_ptr<float>(), st));
        const int64_t n_start = read_row(sched, 0).n_blocks;
        check_cuda(op, qllm_cuda_block_scores(&ly, qcomb.const_data_ptr<float>(), 0,
                                              static_cast<int>(n_exec), 0, n_start,
                                              bscore.mutable_data_ptr<float>(), bscore.size(1), st));
    }

    auto exec_of = [&](const ExecRow &r) {
        qllm_gpu_exec ex;
        ex.P0 = r.P0;
        ex.T0 = r.T0;
        ex.E = static_cast<int>(r.E);
        ex.L = static_cast<int>(r.P0 - r.T0 + r.E);
        ex.init_len = static_cast<int>(r.init_len);
        ex.n_ret = static_cast<int>(r.n_ret);
        ex.m = static_cast<int>(r.m);
        return ex;
    };
    auto ids_of = [&](int64_t i) { return retrieved.mutable_data_ptr<int32_t>() + i * kk; };
    auto attend_and_score = [&](const ExecRow &r, const qllm_gpu_exec &ex, const int32_t *ids,
                                const qllm_gpu_early *after) {
        const int n_split = choose_split(r);
        check_cuda(op, qllm_cuda_exec_attention(
                           &ly, &ex, qfix.const_data_ptr(), qloc.const_data_ptr(),
                           krot.const_data_ptr(), ids, static_cast<float>(scaling),
                           obase + r.t0 * out.stride(1) * esz, out.stride(0), out.stride(1),
                           lse.mutable_data_ptr<float>(), n_split,
                           n_split > 1 ? part_o.mutable_data_ptr<float>() : nullptr,
                           n_split > 1 ? part_lse.mutable_data_ptr<float>() : nullptr, after, st));
        check_cuda(op, qllm_cuda_exec_token_scores(&ly, &ex, qloc.const_data_ptr(),
                                                   krot.const_data_ptr(), lse.const_data_ptr<float>(),
                                                   static_cast<float>(scaling), st));
    };

    if (!tiered && qh_sel == 0 && qh_heads.empty() && qllm_cuda_seam_enabled()) {
        /* One seam launch between execution blocks: block i's cut (with the
         * later blocks' scores of the cut blocks), block i+1's top-k and
         * rotations (qllm_cuda_exec_seam). */
        int64_t cut_max = 0;
        for (int64_t i = 0; i < n_exec; ++i) cut_max = std::max(cut_max, read_row(sched, i).cut_n);
        at::Tensor pdot = at::empty({std::max<int64_t>(cut_max * n_exec * hq, 1)}, opt_f);
        /* arrival counter + list, then the early-start signals */
        at::Tensor cnt = at::zeros({QLLM_SEAM_CNT_INTS + QLLM_SEAM_SIG_INTS}, q.options().dtype(at::kInt));
        qllm_gpu_early early{};
        early.sig = qllm_cuda_early_enabled() ? cnt.mutable_data_ptr<int32_t>() + QLLM_SEAM_CNT_INTS : nullptr;
        qllm_gpu_exec next{};
        auto seam = [&](int64_t i) { /* cut of block i (i >= 0), prep and top-k of block i + 1 */
            qllm_gpu_seam sm{};
            if (i + 1 < n_exec) {
                const ExecRow rn = read_row(sched, i + 1);
                next = exec_of(rn);
                sm.next = &next;
                sm.q = qbase + rn.t0 * q.stride(1) * esz;
                sm.q_hs = q.stride(0);
                sm.q_ts = q.stride(1);
                sm.qfix = qfix.mutable_data_ptr();
                sm.qloc = qloc.mutable_data_ptr();
                sm.krot = krot.mutable_data_ptr();
                if (rn.n_ret > 0) {
                    sm.sel_scores = bscore.const_data_ptr<float>() + (i + 1) * bscore.size(1);
                    sm.sel_n = rn.n_blocks;
                    sm.sel_k = static_cast<int>(rn.n_ret);
                    sm.sel_ids = ids_of(i + 1);
                }
            }
            const ExecRow r = i >= 0 ? read_row(sched, i) : ExecRow{};
            if (r.cut_n > 0) {
                sm.cut_b0 = r.cut_b0;
                sm.cut_n = r.cut_n;
                sm.repr_topk = static_cast<int>(repr_topk);
                sm.qcomb = qcomb.const_data_ptr<float>();
                sm.i0 = static_cast<int>(i + 1);
                sm.i1 = static_cast<int>(n_exec);
                sm.bscore = bscore.mutable_data_ptr<float>();
                sm.ld = bscore.size(1);
                sm.pdot = pdot.mutable_data_ptr<float>();
                sm.cnt = cnt.mutable_data_ptr<int32_t>();
            }
            sm.early = early.sig != nullptr ? &early : nullptr;
            check_cuda(op, qllm_cuda_exec_seam(&ly, &sm, st));
        };
        seam(-1);
        for (int64_t i = 0; i < n_exec; ++i) {
            const ExecRow r = read_row(sched, i);
            /* launched while seam i-1 runs: it waits for the seam's rotations, and for the ids
               only before the retrieved tiles (qllm_gpu_early) */
            attend_and_score(r, exec_of(r), ids_of(i), early.sig != nullptr && early.ok ? &early : nullptr);
            seam(i);
        }
        return;
    }

    for (int64_t i = 0; i < n_exec; ++i) {
        const ExecRow r = read_row(sched, i);
        const qllm_gpu_exec ex = exec_of(r);
        check_cuda(op, qllm_cuda_exec_prep(&ly, &ex, qbase + r.t0 * q.stride(1) * esz, q.stride(0),
                                           q.stride(1), qfix.mutable_data_ptr(),
                                           qloc.mutable_data_ptr(), krot.mutable_data_ptr(), st));
        int32_t *ids = ids_of(i);
        if (r.n_ret > 0 && qh_sel > 0)
            check_cuda(op, qllm_cuda_select_blocks_qheads(bscore.mutable_data_ptr<float>() + i * bscore.size(1),
                                                          r.n_blocks, static_cast<int>(r.n_ret), qh_raw_p, qh_ld,
                                                          qh_sel, w, ids, st));
        else if (r.n_ret > 0)
            check_cuda(op, qllm_cuda_select_blocks(bscore.const_data_ptr<float>() + i * bscore.size(1),
                                                   r.n_blocks, static_cast<int>(r.n_ret), ids, st));
        if (r.n_ret > 0 && tiered) /* the retrieved blocks into the device cache */
            check_cuda(op, qllm_cuda_tier_touch(&ly, ids, 0, static_cast<int>(r.n_ret), ring_lo, nullptr, st));
        attend_and_score(r, ex, ids, nullptr);
        if (r.cut_n > 0) {
            check_cuda(op, qllm_cuda_cut_blocks(&ly, r.cut_b0, r.cut_n, static_cast<int>(repr_topk), st));
            if (tiered) /* new blocks enter the device cache (LRU) */
                check_cuda(op, qllm_cuda_tier_touch(&ly, nullptr, r.cut_b0, static_cast<int>(r.cut_n), ring_lo,
                                                    nullptr, st));
            if (!qh_heads.empty())
                check_cuda(op, qllm_cuda_qhead_record(&ly, r.cut_b0, r.cut_n, qh_tokens->const_data_ptr<float>(),
                                                      static_cast<int>(qh_tokens->size(1)), qh_heads.data(),
                                                      static_cast<int>(qh_heads.size()), qh_raw_p, qh_ld, qh_col0,
                                                      st));
            if (i + 1 < n_exec)
                check_cuda(op, qllm_cuda_block_scores(&ly, qcomb.const_data_ptr<float>(),
                                                      static_cast<int>(i + 1),
                                                      static_cast<int>(n_exec), r.cut_b0,
                                                      r.cut_b0 + r.cut_n,
                                                      bscore.mutable_data_ptr<float>(),
                                                      bscore.size(1), st));
        }
    }
}

/* ---------------------------------------------------------- decode step */

/* Split count of the decode step's attention: choose_split of attend_run for
 * E = 1 before the tile bound (the kernel applies min(split, tiles) from the
 * device row, which gives attend_run's exact choice). */
int decode_split(int64_t hq, int64_t hkv) {
    const int sms = multiprocessors();
    const int64_t ctas = attention_ctas(1, hq, hkv);
    if (2 * ctas >= sms) return 1;
    const int64_t s = std::min<int64_t>((2 * sms + ctas - 1) / ctas, QLLM_CUDA_MAX_SPLIT);
    return static_cast<int>(std::max<int64_t>(s, 1));
}

void attend_decode_cuda(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                        const at::Tensor &k_store, const at::Tensor &v_store, const at::Tensor &scores,
                        const at::Tensor &reprs, const at::Tensor &retrieved, const at::Tensor &out,
                        const at::Tensor &cos, const at::Tensor &sin,
                        const std::optional<at::Tensor> &question, const at::Tensor &dyn,
                        double scaling, double weight, at::IntArrayRef cfg, at::IntArrayRef limits,
                        const std::optional<at::Tensor> &qh_raw, at::IntArrayRef qh_cfg,
                        const std::optional<at::Tensor> &k_cache, const std::optional<at::Tensor> &v_cache,
                        const std::optional<at::Tensor> &tier, const std::optional<at::Tensor> &host_tab,
                        at::IntArrayRef tier_cfg, bool cut) {
    const char *op = kAttendDecode;
    check_attend_decode_args(q, k, v, k_store, v_store, scores, reprs, retrieved, out, cos, sin,
                             question, dyn, cfg, limits, qh_raw, qh_cfg);
    check_tier_args(op, q, k_store, reprs, cfg, k_cache, v_cache, tier, host_tab, tier_cfg, 3);
    check_decode_cut(cut, cfg, tier);
    TORCH_CHECK_VALUE(q.is_cuda(), op, ": q: expected a CUDA tensor");
    const c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t st = stream();
    const int64_t hq = q.size(0), D = q.size(2), hkv = k_store.size(0);
    const int64_t R = scores.size(1), cap_b = reprs.size(0), P = cos.size(0);
    const int64_t n_init = cfg[0], n_local = cfg[1], bs = cfg[2], topk = cfg[3], streaming = cfg[5];
    const int64_t L_max = limits[0], nb_max = limits[1];
    TORCH_CHECK_VALUE(n_init >= 0 && n_local >= 1 && bs >= 1 && topk >= 0 && (streaming == 0 || streaming == 1) &&
                          n_local <= P,
                      op, ": cfg: bad values ", shape_str(cfg));
    TORCH_CHECK_VALUE(L_max >= 1 && L_max <= std::min(R, P) && nb_max >= 1 && nb_max <= cap_b &&
                          (streaming == 1 || (topk <= retrieved.size(1) && topk <= nb_max)),
                      op, ": limits ", shape_str(limits), " exceed the ring / rope table / reprs / retrieved");

    const int qh_sel = qh_cfg.empty() ? 0 : static_cast<int>(qh_cfg[0]);
    TORCH_CHECK_VALUE(qh_sel == 0 || qh_raw->size(0) >= nb_max, op, ": qh_raw: ", num_str(qh_raw->size(0)),
                      " rows, fewer than nb_max ", num_str(nb_max));

    qllm_gpu_layer ly = describe_layer(q, k_store, v_store, scores, reprs, cos, sin, cfg);
    describe_tiers(ly, k_cache, v_cache, tier, host_tab, tier_cfg);
    TORCH_CHECK_VALUE(tier_cfg.empty() || topk <= tier_cfg[2], op, ": tier_cfg: miss_cap < topk");

    /* workspaces: allocated per call (in a graph: once, from the graph's pool) */
    const auto opt_t = q.options();
    const auto opt_f = q.options().dtype(at::kFloat);
    at::Tensor qfix = at::empty({hq, 1, D}, opt_t);
    at::Tensor qloc = at::empty({hq, 1, D}, opt_t);
    at::Tensor krot = at::empty({hkv, L_max, D}, opt_t);
    at::Tensor lse = at::empty({hq}, opt_f);
    const int n_split = decode_split(hq, hkv);
    at::Tensor part_o, part_lse;
    if (n_split > 1) {
        part_o = at::empty({n_split, hq, D}, opt_f);
        part_lse = at::empty({n_split, hq}, opt_f);
    }
    at::Tensor qcomb = at::empty({hq, D}, opt_f);
    at::Tensor bscore = at::empty({nb_max}, opt_f);
    retrieved.fill_(-1);

    qllm_gpu_decode dc{};
    dc.dyn = dyn.const_data_ptr<int64_t>();
    dc.q = q.const_data_ptr();
    dc.q_hs = q.stride(0);
    dc.k = k.const_data_ptr();
    dc.k_hs = k.stride(0);
    dc.v = v.const_data_ptr();
    dc.v_hs = v.stride(0);
    dc.out = out.mutable_data_ptr();
    dc.o_hs = out.stride(0);
    dc.ids = retrieved.mutable_data_ptr<int32_t>();
    dc.k_max = streaming ? 0 : static_cast<int>(topk);
    dc.L_max = static_cast<int>(L_max);
    dc.nb_max = nb_max;
    dc.question = question.has_value() ? question->const_data_ptr<float>() : nullptr;
    dc.weight = static_cast<float>(weight);
    dc.scaling = static_cast<float>(scaling);
    dc.n_split = n_split;
    dc.qfix = qfix.mutable_data_ptr();
    dc.qloc = qloc.mutable_data_ptr();
    dc.krot = krot.mutable_data_ptr();
    dc.lse = lse.mutable_data_ptr<float>();
    dc.part_o = n_split > 1 ? part_o.mutable_data_ptr<float>() : nullptr;
    dc.part_lse = n_split > 1 ? part_lse.mutable_data_ptr<float>() : nullptr;
    dc.qcomb = qcomb.mutable_data_ptr<float>();
    dc.bscore = bscore.mutable_data_ptr<float>();
    dc.qh_cols = qh_sel;
    dc.qh_raw = qh_sel > 0 ? qh_raw->const_data_ptr<float>() : nullptr;
    dc.qh_ld = qh_sel > 0 ? qh_raw->size(1) : 0;
    dc.cut_k = cut ? static_cast<int>(std::min<int64_t>(cfg[4], bs)) : 0;
    const DecodeFork &fk = decode_fork(q.device().index());
    dc.side = fk.side;
    dc.ev_fork = fk.fork;
    dc.ev_join = fk.join;
    check_cuda(op, qllm_cuda_decode_step(&ly, &dc, st));
}

void decode_set_cuda(const at::Tensor &dyn, at::IntArrayRef values) {
    const char *op = kDecodeSet;
    check_decode_set_args(dyn, values);
    TORCH_CHECK_VALUE(dyn.is_cuda(), op, ": dyn: expected a CUDA tensor");
    const c10::cuda::CUDAGuard guard(dyn.device());
    check_cuda(op, qllm_cuda_decode_set(dyn.mutable_data_ptr<int64_t>(), values.data(),
                                        static_cast<int>(values.size()), stream()));
}

}  // namespace
}  // namespace qllm_torch

/* Which attention kernel runs for a head dim (QLLM_ATTN_* and the build's
 * arch decide, attend.cu attn_variant): no tensor arguments, so a catch-all
 * kernel; CUDA builds only (callers check hasattr). */
std::string cuda_attention_kernel(int64_t head_dim) {
    return qllm_cuda_attention_kernel(static_cast<int>(head_dim));
}

TORCH_LIBRARY_FRAGMENT(qllm, m) { m.def("cuda_attention_kernel(int head_dim) -> str", &cuda_attention_kernel); }

TORCH_LIBRARY_IMPL(qllm, CUDA, m) {
    m.impl("attend_decode", &qllm_torch::attend_decode_cuda);
    m.impl("decode_set", &qllm_torch::decode_set_cuda);
    m.impl("repr_compute", &qllm_torch::repr_compute_cuda);
    m.impl("repr_compute_out", &qllm_torch::repr_compute_out_cuda);
    m.impl("retrieval_score", &qllm_torch::retrieval_score_cuda);
    m.impl("retrieval_topk", &qllm_torch::retrieval_topk_cuda);
    m.impl("retrieval_select", &qllm_torch::retrieval_select_cuda);
    m.impl("gather_slots", &qllm_torch::gather_slots_cuda);
    m.impl("attend_run", &qllm_torch::attend_run_cuda);
}

#endif /* QLLM_WITH_CUDA */
