/*
 * attend_checks.cuh -- argument checks and the Meta implementation of
 * qllm.attend_run, the fused per-forward-call op of the GPU path
 * (qllm/gpu.py).  Host C++ only (ATen); included by csrc/torch/ops.cpp (Meta)
 * and csrc/torch/ops_cuda.cpp (CUDA), so both run the same checks.
 *
 * attend_run(q, k_store, v_store, scores!, reprs!, retrieved!, out!, cos, sin,
 *            question?, schedule, scaling, weight, cfg) -> ()
 *
 *   q          [hq, T, D] f16|bf16, stride(2) == 1     un-rotated queries
 *   k_store,   [hkv, cap, D] q's dtype, contiguous      un-rotated K/V by text
 *   v_store                                             position (already holding
 *                                                       this call's tokens)
 *   scores     [hq, R] f32 contiguous, R a power of 2   token-score ring
 *   reprs      [cap_b, hq, D] f32 contiguous            block representatives
 *   retrieved  [n_exec, kk] int32 contiguous            out: retrieved ids per
 *                                                       execution block, ascending, -1 padded
 *   out        [hq, T, D] q's dtype, stride(2) == 1     out: attention output
 *   cos, sin   [P, D] f32 contiguous                    RoPE table (positions 0..P-1)
 *   question   [hq, D] f32 contiguous or None           (already gated by strategy)
 *   schedule   [n_exec, 10] int64, CPU, contiguous      per execution block:
 *              t0, E, P0, T0, init_len, n_blocks, n_ret, m, cut_b0, cut_n
 *   cfg        [n_init, n_local, block_size, topk, repr_topk, streaming]
 *
 * Question heads (qllm/retrieval.py QuestionRelevance; all optional):
 *   qh_raw     [rows, n_cols] f32 contiguous, q's device: raw block scores of
 *              every question head of the sequence (written for this layer's
 *              heads when blocks are cut, read for the selection)
 *   qh_tokens  [hq, n_tok, D] f32 contiguous: fixed-position question queries
 *              (needed when this layer has heads)
 *   qh_cfg     [] (no question heads) or [n_sel, col0, h_0, .., h_{m-1}]:
 *              selection uses columns 0 .. n_sel-1 (the heads of layers <= this
 *              one, a prefix of the sorted columns; 0: the usual scores);
 *              this layer's heads h_i own columns col0 + i.  With n_sel > 0 the
 *              block score is z(qbar . r) + weight * mean_c z(raw[:, c]) and
 *              question must be None.
 */
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace qllm_torch {

/* Numbers and shapes in messages are formatted here (std::to_string), not by
 * streaming integers into c10::str: on the GPU machine's toolchain that
 * stream insertion segfaults inside _C (see benchmarks/NOTES_gpu.md). */
inline std::string num_str(int64_t v) { return std::to_string(v); }
inline std::string shape_str(at::IntArrayRef s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
}
inline std::string shape_str(c10::SymIntArrayRef s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i)
        out += (i ? ", " : "") + (s[i].is_symbolic() ? std::string("s") : std::to_string(s[i].as_int_unchecked()));
    return out + "]";
}
inline std::string dtype_str(at::ScalarType t) { return std::string(c10::toString(t)); }

constexpr const char *kAttendRun = "qllm.attend_run";
constexpr int kScheduleFields = 10;
constexpr int kCfgFields = 6;
/* = QLLM_CUDA_QH_MAX_COLS of qllm_cuda.cuh (not included here: ops.cpp builds without CUDA). */
constexpr int64_t kQhMaxCols = 4096;
/* = QLLM_DYN_FIELDS of qllm_cuda.cuh: the decode step's device row (ops_cuda.cpp checks). */
constexpr int kDynFields = 9;

inline void check_attend_run_args(const at::Tensor &q, const at::Tensor &k_store,
                                  const at::Tensor &v_store, const at::Tensor &scores,
                                  const at::Tensor &reprs, const at::Tensor &retrieved,
                                  const at::Tensor &out, const at::Tensor &cos,
                                  const at::Tensor &sin, const std::optional<at::Tensor> &question,
                                  const at::Tensor &schedule, at::IntArrayRef cfg,
                                  const char *op = kAttendRun) {
    TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
                     ": q: expected dtype float16 or bfloat16, got ", dtype_str(q.scalar_type()));
    TORCH_CHECK_VALUE(q.dim() == 3, op, ": q: expected 3 dims (q_heads, tokens, dim), got ", num_str(q.dim()));
    const int64_t hq = q.size(0), T = q.size(1), D = q.size(2);
    TORCH_CHECK_VALUE(D == 64 || D == 128, op, ": q: head_dim must be 64 or 128, got ", num_str(D));
    TORCH_CHECK_VALUE(T >= 1 && hq >= 1, op, ": q: expected >= 1 tokens and heads, got ", shape_str(q.sizes()));
    TORCH_CHECK_VALUE(q.stride(2) == 1, op, ": q: expected stride 1 along dim");
    for (const auto &pr : {std::make_pair("k_store", &k_store), std::make_pair("v_store", &v_store)}) {
        const at::Tensor &t = *pr.second;
        TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", pr.first,
                         ": expected q's dtype ", dtype_str(q.scalar_type()), ", got ", dtype_str(t.scalar_type()));
        TORCH_CHECK_VALUE(t.dim() == 3 && t.size(2) == D && t.is_contiguous(), op, ": ", pr.first,
                          ": expected a contiguous [kv_heads, capacity, ", num_str(D), "] tensor, got ",
                          shape_str(t.sizes()));
        TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", pr.first, ": expected device ",
                          q.device(), ", got ", t.device());
    }
    TORCH_CHECK_VALUE(v_store.sizes() == k_store.sizes(), op, ": v_store: expected k_store's shape");
    const int64_t hkv = k_store.size(0);
    TORCH_CHECK_VALUE(hkv >= 1 && hq % hkv == 0, op, ": q_heads ", num_str(hq),
                      " must be a multiple of kv_heads ", num_str(hkv));
    TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat, op, ": scores: expected float32");
    TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(0) == hq && scores.is_contiguous(), op,
                      ": scores: expected a contiguous [", num_str(hq), ", R] tensor, got ",
                      shape_str(scores.sizes()));
    const int64_t R = scores.size(1);
    TORCH_CHECK_VALUE(R >= 1 && (R & (R - 1)) == 0, op, ": scores: ring size ", num_str(R),
                      " must be a power of two");
    TORCH_CHECK_TYPE(reprs.scalar_type() == at::kFloat, op, ": reprs: expected float32");
    TORCH_CHECK_VALUE(reprs.dim() == 3 && reprs.size(1) == hq && reprs.size(2) == D &&
                          reprs.is_contiguous(),
                      op, ": reprs: expected a contiguous [blocks, ", num_str(hq), ", ", num_str(D),
                      "] tensor, got ", shape_str(reprs.sizes()));
    TORCH_CHECK_TYPE(retrieved.scalar_type() == at::kInt, op, ": retrieved: expected int32");
    TORCH_CHECK_VALUE(retrieved.dim() == 2 && retrieved.size(1) >= 1 && retrieved.is_contiguous(),
                      op, ": retrieved: expected a contiguous [exec_blocks, k] tensor");
    TORCH_CHECK_TYPE(out.scalar_type() == q.scalar_type(), op, ": out: expected q's dtype");
    TORCH_CHECK_VALUE(out.sizes() == q.sizes() && out.stride(2) == 1, op,
                      ": out: expected q's shape with stride 1 along dim, got ", shape_str(out.sizes()));
    for (const auto &pr : {std::make_pair("cos", &cos), std::make_pair("sin", &sin)}) {
        const at::Tensor &t = *pr.second;
        TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", pr.first, ": expected float32");
        TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == D && t.is_contiguous(), op, ": ", pr.first,
                          ": expected a contiguous [positions, ", num_str(D), "] tensor");
        TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", pr.first, ": expected device ", q.device());
    }
    TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), op, ": sin: expected cos's shape");
    if (question.has_value()) {
        const at::Tensor &t = *question;
        TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": question: expected float32");
        TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == hq && t.size(1) == D && t.is_contiguous(), op,
                          ": question: expected a contiguous [", num_str(hq), ", ", num_str(D), "] tensor");
        TORCH_CHECK_VALUE(t.device() == q.device(), op, ": question: expected device ", q.device());
    }
    for (const at::Tensor *t : {&scores, &reprs, &retrieved, &out})
        TORCH_CHECK_VALUE(t->device() == q.device(), op, ": outputs must be on q's device ", q.device());
    TORCH_CHECK_TYPE(schedule.scalar_type() == at::kLong, op, ": schedule: expected int64");
    TORCH_CHECK_VALUE(schedule.dim() == 2 && schedule.size(1) == kScheduleFields &&
                          schedule.size(0) == retrieved.size(0) && schedule.size(0) >= 1,
                      op, ": schedule: expected [exec_blocks, ", num_str(kScheduleFields),
                      "] matching retrieved, got ", shape_str(schedule.sizes()));
    TORCH_CHECK_VALUE(cfg.size() == kCfgFields, op, ": cfg: expected ", num_str(kCfgFields),
                      " values, got ", num_str(static_cast<int64_t>(cfg.size())));
}

/* Question-head arguments (see the top of this file); n_sel / heads out. */
inline void check_qheads_args(const char *op, const at::Tensor &q, const std::optional<at::Tensor> &question,
                              const std::optional<at::Tensor> &qh_raw, const std::optional<at::Tensor> &qh_tokens,
                              at::IntArrayRef qh_cfg) {
    if (qh_cfg.empty()) {
        TORCH_CHECK_VALUE(!qh_raw.has_value() && !qh_tokens.has_value(), op,
                          ": qh_raw / qh_tokens given without qh_cfg");
        return;
    }
    TORCH_CHECK_VALUE(qh_cfg.size() >= 2 && qh_cfg[0] >= 0 && qh_cfg[0] <= kQhMaxCols && qh_cfg[1] >= 0,
                      op, ": qh_cfg: expected [n_sel (0..", num_str(kQhMaxCols),
                      "), col0 >= 0, heads...], got ", shape_str(qh_cfg));
    const int64_t n_sel = qh_cfg[0], col0 = qh_cfg[1];
    const int64_t n_own = static_cast<int64_t>(qh_cfg.size()) - 2;
    const int64_t hq = q.size(0), D = q.size(2);
    if (n_sel == 0 && n_own == 0) {
        TORCH_CHECK_VALUE(!qh_tokens.has_value(), op, ": qh_tokens given without question heads");
        return;
    }
    TORCH_CHECK_VALUE(qh_raw.has_value(), op, ": qh_raw: needed by question heads");
    const at::Tensor &raw = *qh_raw;
    TORCH_CHECK_TYPE(raw.scalar_type() == at::kFloat, op, ": qh_raw: expected float32");
    TORCH_CHECK_VALUE(raw.dim() == 2 && raw.is_contiguous() && raw.device() == q.device(), op,
                      ": qh_raw: expected a contiguous [blocks, columns] tensor on q's device");
    const int64_t n_cols = raw.size(1);
    TORCH_CHECK_VALUE(n_sel <= n_cols && col0 + n_own <= n_cols, op, ": qh_cfg ", shape_str(qh_cfg),
                      ": columns out of range for qh_raw with ", num_str(n_cols), " columns");
    TORCH_CHECK_VALUE(n_sel == 0 || !question.has_value(), op,
                      ": question must be None when question heads select the blocks");
    for (int64_t i = 0; i < n_own; ++i)
        TORCH_CHECK_VALUE(qh_cfg[2 + i] >= 0 && qh_cfg[2 + i] < hq, op, ": qh_cfg: head ",
                          num_str(qh_cfg[2 + i]), " of a layer with ", num_str(hq), " query heads");
    if (n_own > 0) {
        TORCH_CHECK_VALUE(qh_tokens.has_value(), op, ": qh_tokens: needed by this layer's question heads");
        const at::Tensor &t = *qh_tokens;
        TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": qh_tokens: expected float32");
        TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == hq && t.size(1) >= 1 && t.size(1) <= INT32_MAX &&
                              t.size(2) == D && t.is_contiguous() && t.device() == q.device(),
                          op, ": qh_tokens: expected a contiguous [", num_str(hq), ", tokens, ", num_str(D),
                          "] tensor on q's device, got ", shape_str(t.sizes()));
    } else {
        TORCH_CHECK_VALUE(!qh_tokens.has_value(), op, ": qh_tokens given without this layer's heads");
    }
}

/* Tiered block memory (qllm/gpu.py, QLLMConfig.device_blocks), optional:
 *   tier_cfg   [] (off: the other tier tensors absent) or [W, chunk_blocks, miss_cap,
 *              ring_lo] (attend_decode: the first three; ring_lo comes from dyn):
 *              the store is init + a ring of W rows (power of two, k_store
 *              [hkv, n_init + W, D]) holding positions ring_lo .. (after this
 *              call's K/V are written); host chunks of chunk_blocks blocks;
 *              miss list of miss_cap (block, slot) pairs
 *   k_cache,   [n_slots, hkv, block_size, D] q's dtype, contiguous: the device
 *   v_cache    block cache
 *   tier       int32 [4 + 2*miss_cap + 2*n_slots + nb] contiguous, nb >= the
 *              reprs rows (qllm_cuda.cuh QLLM_TIER_*)
 *   host_tab   int64 [2, n_chunks] contiguous, q's device: K / V chunk
 *              pointers (pinned host memory), n_chunks * chunk_blocks >= nb */
inline void check_tier_args(const char *op, const at::Tensor &q, const at::Tensor &k_store, const at::Tensor &reprs,
                            at::IntArrayRef cfg, const std::optional<at::Tensor> &k_cache,
                            const std::optional<at::Tensor> &v_cache, const std::optional<at::Tensor> &tier,
                            const std::optional<at::Tensor> &host_tab, at::IntArrayRef tier_cfg, size_t n_cfg) {
    if (tier_cfg.empty()) {
        TORCH_CHECK_VALUE(!k_cache.has_value() && !v_cache.has_value() && !tier.has_value() && !host_tab.has_value(),
                          op, ": k_cache / v_cache / tier / host_tab given without tier_cfg");
        return;
    }
    TORCH_CHECK_VALUE(tier_cfg.size() == n_cfg, op, ": tier_cfg: expected [W, chunk_blocks, miss_cap",
                      n_cfg == 4 ? ", ring_lo" : "", "], got ", shape_str(tier_cfg));
    const int64_t W = tier_cfg[0], cb = tier_cfg[1], miss = tier_cfg[2];
    TORCH_CHECK_VALUE(W >= 1 && (W & (W - 1)) == 0 && cb >= 1 && miss >= 1 && miss <= 65536, op,
                      ": tier_cfg: W must be a power of two, chunk_blocks >= 1, miss_cap in 1..65536, got ",
                      shape_str(tier_cfg));
    TORCH_CHECK_VALUE(cfg.size() == kCfgFields && cfg[5] == 0, op, ": tier_cfg: tiers need a strategy with blocks");
    TORCH_CHECK_VALUE(k_store.size(1) == cfg[0] + W, op, ": k_store: tiered mode expects n_init + W = ",
                      num_str(cfg[0] + W), " rows, got ", num_str(k_store.size(1)));
    TORCH_CHECK_VALUE(k_cache.has_value() && v_cache.has_value() && tier.has_value() && host_tab.has_value(), op,
                      ": tier_cfg needs k_cache, v_cache, tier and host_tab");
    const int64_t hkv = k_store.size(0), D = q.size(2), bs = cfg[2];
    for (const auto &pr : {std::make_pair("k_cache", &*k_cache), std::make_pair("v_cache", &*v_cache)}) {
        const at::Tensor &t = *pr.second;
        TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", pr.first, ": expected q's dtype");
        TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) >= 1 && t.size(0) <= INT32_MAX && t.size(1) == hkv &&
                              t.size(2) == bs && t.size(3) == D && t.is_contiguous() && t.device() == q.device(),
                          op, ": ", pr.first, ": expected a contiguous [slots, ", num_str(hkv), ", ", num_str(bs),
                          ", ", num_str(D), "] tensor on q's device, got ", shape_str(t.sizes()));
    }
    TORCH_CHECK_VALUE(v_cache->sizes() == k_cache->sizes(), op, ": v_cache: expected k_cache's shape");
    const int64_t n_slots = k_cache->size(0);
    TORCH_CHECK_TYPE(tier->scalar_type() == at::kInt, op, ": tier: expected int32");
    const int64_t fixed = 4 + 2 * miss + 2 * n_slots;
    TORCH_CHECK_VALUE(tier->dim() == 1 && tier->is_contiguous() && tier->device() == q.device() &&
                          tier->size(0) - fixed >= reprs.size(0) && tier->size(0) - fixed <= INT32_MAX,
                      op, ": tier: expected a contiguous int32 vector of ", num_str(fixed), " + >= ",
                      num_str(reprs.size(0)), " words on q's device, got ", shape_str(tier->sizes()));
    TORCH_CHECK_TYPE(host_tab->scalar_type() == at::kLong, op, ": host_tab: expected int64");
    TORCH_CHECK_VALUE(host_tab->dim() == 2 && host_tab->size(0) == 2 && host_tab->is_contiguous() &&
                          host_tab->device() == q.device() && host_tab->size(1) * cb >= tier->size(0) - fixed,
                      op, ": host_tab: expected a contiguous [2, chunks] int64 tensor on q's device covering ",
                      num_str(tier->size(0) - fixed), " blocks, got ", shape_str(host_tab->sizes()));
}

inline void attend_run_meta(const at::Tensor &q, const at::Tensor &k_store,
                            const at::Tensor &v_store, const at::Tensor &scores,
                            const at::Tensor &reprs, const at::Tensor &retrieved,
                            const at::Tensor &out, const at::Tensor &cos, const at::Tensor &sin,
                            const std::optional<at::Tensor> &question, const at::Tensor &schedule,
                            double scaling, double weight, at::IntArrayRef cfg,
                            const std::optional<at::Tensor> &qh_raw, const std::optional<at::Tensor> &qh_tokens,
                            at::IntArrayRef qh_cfg, const std::optional<at::Tensor> &k_cache,
                            const std::optional<at::Tensor> &v_cache, const std::optional<at::Tensor> &tier,
                            const std::optional<at::Tensor> &host_tab, at::IntArrayRef tier_cfg) {
    check_attend_run_args(q, k_store, v_store, scores, reprs, retrieved, out, cos, sin, question,
                          schedule, cfg);
    check_qheads_args(kAttendRun, q, question, qh_raw, qh_tokens, qh_cfg);
    check_tier_args(kAttendRun, q, k_store, reprs, cfg, k_cache, v_cache, tier, host_tab, tier_cfg, 4);
}

/* attend_decode(q, k, v, k_store!, v_store!, scores!, reprs!, retrieved!, out!, cos, sin,
 *               question?, dyn, scaling, weight, cfg, limits) -> ()
 * One decoded token whose sizes are read on the device from dyn (int64
 * [>= 8], see qllm_cuda.cuh QLLM_DYN_*): capturable in a CUDA graph.
 *   q [hq, 1, D], k / v [hkv, 1, D] (stride 1 along dim), the rest as
 *   attend_run with retrieved [1, kk]; limits = [L_max, nb_max].
 *   qh_raw? / qh_cfg: question heads as attend_run with qh_cfg = [] or [n_sel]
 *   (a decode step cuts no block: no heads of its own to record). */
constexpr const char *kAttendDecode = "qllm.attend_decode";
constexpr const char *kDecodeSet = "qllm.decode_set";

inline void check_attend_decode_args(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                     const at::Tensor &k_store, const at::Tensor &v_store,
                                     const at::Tensor &scores, const at::Tensor &reprs,
                                     const at::Tensor &retrieved, const at::Tensor &out,
                                     const at::Tensor &cos, const at::Tensor &sin,
                                     const std::optional<at::Tensor> &question, const at::Tensor &dyn,
                                     at::IntArrayRef cfg, at::IntArrayRef limits,
                                     const std::optional<at::Tensor> &qh_raw, at::IntArrayRef qh_cfg) {
    const char *op = kAttendDecode;
    check_attend_run_args(q, k_store, v_store, scores, reprs, retrieved, out, cos, sin, question,
                          at::empty({retrieved.dim() == 2 ? retrieved.size(0) : 1, kScheduleFields},
                                    at::TensorOptions().dtype(at::kLong)),
                          cfg, op);
    TORCH_CHECK_VALUE(q.size(1) == 1 && retrieved.size(0) == 1, op,
                      ": expected one token (q [hq, 1, D], retrieved [1, k])");
    for (const auto &pr : {std::make_pair("k", &k), std::make_pair("v", &v)}) {
        const at::Tensor &t = *pr.second;
        TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", pr.first, ": expected q's dtype");
        TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == k_store.size(0) && t.size(1) == 1 &&
                              t.size(2) == q.size(2) && t.stride(2) == 1,
                          op, ": ", pr.first, ": expected [kv_heads, 1, dim] with stride 1 along dim, got ",
                          shape_str(t.sizes()));
        TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", pr.first, ": expected q's device");
    }
    TORCH_CHECK_TYPE(dyn.scalar_type() == at::kLong, op, ": dyn: expected int64");
    TORCH_CHECK_VALUE(dyn.dim() == 1 && dyn.size(0) >= kDynFields && dyn.is_contiguous() && dyn.device() == q.device(),
                      op, ": dyn: expected a contiguous [>= ", kDynFields, "] tensor on q's device");
    TORCH_CHECK_VALUE(limits.size() == 2, op, ": limits: expected [L_max, nb_max]");
    TORCH_CHECK_VALUE(qh_cfg.size() <= 1, op, ": qh_cfg: expected [] or [n_sel]");
    if (qh_cfg.empty()) {
        check_qheads_args(op, q, question, qh_raw, std::nullopt, qh_cfg);
    } else {
        const int64_t full[2] = {qh_cfg[0], 0};
        check_qheads_args(op, q, question, qh_raw, std::nullopt, at::IntArrayRef(full, 2));
    }
}

/* attend_decode's cut: a step with blocks (not streaming), repr_topk >= 1, no tiers. */
inline void check_decode_cut(bool cut, at::IntArrayRef cfg, const std::optional<at::Tensor> &tier) {
    if (!cut) return;
    TORCH_CHECK_VALUE(cfg[5] == 0 && cfg[4] >= 1, kAttendDecode,
                      ": cut: expected a config with blocks (streaming 0) and repr_topk >= 1, got cfg ", shape_str(cfg));
    TORCH_CHECK_VALUE(!tier.has_value(), kAttendDecode, ": cut: tiered memories cut blocks through attend_run");
}

inline void attend_decode_meta(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                               const at::Tensor &k_store, const at::Tensor &v_store,
                               const at::Tensor &scores, const at::Tensor &reprs,
                               const at::Tensor &retrieved, const at::Tensor &out,
                               const at::Tensor &cos, const at::Tensor &sin,
                               const std::optional<at::Tensor> &question, const at::Tensor &dyn,
                               double scaling, double weight, at::IntArrayRef cfg, at::IntArrayRef limits,
                               const std::optional<at::Tensor> &qh_raw, at::IntArrayRef qh_cfg,
                               const std::optional<at::Tensor> &k_cache, const std::optional<at::Tensor> &v_cache,
                               const std::optional<at::Tensor> &tier, const std::optional<at::Tensor> &host_tab,
                               at::IntArrayRef tier_cfg, bool cut) {
    check_attend_decode_args(q, k, v, k_store, v_store, scores, reprs, retrieved, out, cos, sin, question,
                             dyn, cfg, limits, qh_raw, qh_cfg);
    check_tier_args(kAttendDecode, q, k_store, reprs, cfg, k_cache, v_cache, tier, host_tab, tier_cfg, 3);
    check_decode_cut(cut, cfg, tier);
}

inline void check_decode_set_args(const at::Tensor &dyn, at::IntArrayRef values) {
    const char *op = kDecodeSet;
    TORCH_CHECK_TYPE(dyn.scalar_type() == at::kLong, op, ": dyn: expected int64");
    TORCH_CHECK_VALUE(dyn.dim() == 1 && dyn.is_contiguous() && values.size() >= 1 &&
                          static_cast<int64_t>(values.size()) <= dyn.size(0) && values.size() <= kDynFields,
                      op, ": expected a contiguous 1-d dyn and 1..min(", kDynFields, ", len(dyn)) values");
}

inline void decode_set_meta(const at::Tensor &dyn, at::IntArrayRef values) { check_decode_set_args(dyn, values); }

}  // namespace qllm_torch
