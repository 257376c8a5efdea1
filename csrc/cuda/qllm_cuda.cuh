/*
 * qllm_cuda.cuh -- extern "C" launchers of qllm's CUDA kernels.
 *
 * Host-only declarations (no device code): included by the .cu files and by
 * csrc/torch/ops_cuda.cpp.  Every launcher takes raw device pointers (or
 * qllm_tensor views of device memory) plus the stream to run on, enqueues its
 * kernel(s) without synchronising, checks every launch, and returns a status:
 *
 *   QLLM_CUDA_OK (0)       enqueued
 *   QLLM_CUDA_ERR_ARG      a size / shape / dtype the kernels do not handle
 *   QLLM_CUDA_ERR_LAUNCH   cudaGetLastError() after a launch was not cudaSuccess
 *
 * qllm_cuda_last_error() returns a thread-local message for the last failure.
 * Nothing here allocates device memory: callers pass outputs and workspaces.
 */
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "qllm/qllm.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { QLLM_CUDA_OK = 0, QLLM_CUDA_ERR_ARG = 1, QLLM_CUDA_ERR_LAUNCH = 2 };

/* Message of the last failed launcher call on this thread ("" if none). */
const char *qllm_cuda_last_error(void);

/* ===================================================== generic op kernels */
/* Views may be strided (strides in elements, >= 0), dtypes f32/f16/bf16
 * unless stated; shapes were validated by the binding. */

/* Representatives: keys [nb, hkv, T, D], scores [nb, hq, T] (finite),
 * out [nb, hq, D]: mean key of the repr_topk best tokens (ties: lower token),
 * summed in selection order in f32 and divided by k once. */
int qllm_cuda_repr_compute(const qllm_tensor *keys, const qllm_tensor *scores, int64_t repr_topk,
                           const qllm_tensor *out, cudaStream_t stream);

/* Block scores: reprs [nb, hq, D], query [hq, D], question [hq, D] or NULL
 * -> out f32 [nb] = sum q.r + weight * sum Q.r. */
int qllm_cuda_retrieval_score(const qllm_tensor *reprs, const qllm_tensor *query,
                              const qllm_tensor *question, float weight, const qllm_tensor *out,
                              cudaStream_t stream);

/* Top-k: scores f32 [n] (finite), out int32 [k] (k <= n), descending,
 * ties toward the lower index.  One thread block. */
int qllm_cuda_retrieval_topk(const qllm_tensor *scores, int64_t k, const qllm_tensor *out,
                             cudaStream_t stream);

/* Gather: pool [n_slots, H, T, D] (any dtype of 2 or 4 bytes), slots int32 or
 * int64 [n] with values in range (checked by the caller), out contiguous
 * [H, n*T, D] of pool's dtype.  slots_is_i64 selects the index type. */
int qllm_cuda_gather_slots(const qllm_tensor *pool, const void *slots, int slots_is_i64,
                           int64_t n, int64_t slots_stride, void *out, cudaStream_t stream);

/* ============================================== fused attention (gpu path) */
/* Kernels of qllm/gpu.py's attend_cuda, driven per execution block by
 * csrc/torch/ops_cuda.cpp.  Storage dtype: f16 (dtype 1) or bf16 (2);
 * head_dim 64 or 128.  Layouts (all contiguous, elements):
 *   k_store / v_store [hkv, cap, D]   un-rotated K/V by text position: row
 *                                    kv_row(pos) = pos below n_init, else
 *                                    n_init + ((pos - n_init) & wmask) (wmask
 *                                    all ones: every position has its row;
 *                                    W - 1: a ring of W rows, tiered mode)
 *   scores            [hq, R]        f32 token-score ring, slot pos & (R-1)
 *   reprs             [cap_b, hq, D] f32 block representatives
 *   qfix / qloc       [hq, E, D]     rotated queries of the execution block
 *   krot              [hkv, L, D]    keys of the recent segment, rotated by
 *                                    their index in it (position - T0)
 *   lse               [hq, E]        f32 log2-sum-exp2 of each query row
 */
typedef struct {
    int dtype;       /* 1 = f16, 2 = bf16 */
    int head_dim;    /* 64 | 128 */
    int hq, hkv;     /* heads; hq % hkv == 0 */
    int n_init, n_local, block_size, streaming;
    int64_t cap;     /* k/v store rows per head */
    int64_t ring;    /* R, a power of two */
    const float *cos, *sin; /* [P, D] */
    int64_t rope_len;       /* P */
    void *k_store, *v_store;
    float *scores;
    float *reprs;
    int64_t reprs_cap;      /* cap_b */
    int64_t wmask;          /* see kv_row above: INT64_MAX, or W - 1 (tiered) */
    /* tiered block memory (k_cache == NULL: blocks are read from the store).
     * Blocks live in pinned host chunks (written by the caller after each cut,
     * on a side stream) and in a device cache of n_slots slots, LRU: cut blocks
     * enter the cache, retrieved ones are fetched into it before the attention
     * reads them (qllm_cuda_tier_touch); all decisions are made on the device. */
    void *k_cache, *v_cache;   /* [n_slots, hkv, bs, D] */
    int n_slots;
    int32_t *tier;             /* QLLM_TIER_* layout below */
    int64_t tier_nb;           /* slot_of entries (block capacity) */
    int miss_cap;              /* (block, slot) pairs the miss list holds */
    const int64_t *host_k, *host_v; /* device tables: chunk c -> pinned [chunk_blocks, hkv, bs, D] */
    int64_t n_chunks;          /* table entries */
    int chunk_blocks;
} qllm_gpu_layer;

/* int32 tier state: clock, miss count of the last touch, blocks fetched into
 * the cache for retrieval (total), cut blocks placed in the cache (total),
 * miss pairs [miss_cap][2], block of each slot [n_slots] (-1 free), last use
 * of each slot [n_slots] (-1 never), slot of each block [tier_nb] (-1: not on
 * the device). */
#define QLLM_TIER_CLOCK 0
#define QLLM_TIER_NMISS 1
#define QLLM_TIER_FETCHED 2
#define QLLM_TIER_PLACED 3
#define QLLM_TIER_MISS 4
#define QLLM_TIER_WORDS(n_slots, miss_cap, nb) (4 + 2 * (int64_t)(miss_cap) + 2 * (int64_t)(n_slots) + (int64_t)(nb))

/* One execution block: queries at text positions P0 .. P0+E-1 (rows t0 ..
 * t0+E-1 of q), tail = positions T0 .. P0-1, recent segment length
 * L = P0 - T0 + E. */
typedef struct {
    int64_t P0, T0;
    int E, L;
    int init_len;   /* init keys (positions 0 .. init_len-1) in memory */
    int n_ret;      /* retrieved blocks (ids from `ids`) */
    int m;          /* tail keys that may be memory (positions T0 .. T0+m-1) */
} qllm_gpu_exec;

/* Rotate: qfix/qloc [hq, E, D] from q rows (q + t0*q_ts), krot [hkv, L, D]
 * from k_store positions T0 .. T0+L-1. */
int qllm_cuda_exec_prep(const qllm_gpu_layer *ly, const qllm_gpu_exec *ex, const void *q,
                        int64_t q_hs, int64_t q_ts, void *qfix, void *qloc, void *krot,
                        cudaStream_t stream);

/* Mean fixed-position query per execution block plus weight * question:
 * qcomb[i, h, :] for the blocks i = 0 .. n_exec-1 of a call of T rows of q
 * (block i = rows i*exc .. min((i+1)*exc, T) - 1).  question [hq, D] f32 may
 * be NULL (then weight is ignored). */
int qllm_cuda_query_comb(const qllm_gpu_layer *ly, const void *q, int64_t q_hs, int64_t q_ts,
                         int64_t T, int exc, int n_exec, const float *question, float weight,
                         float *qcomb, cudaStream_t stream);

/* bscore[i, b] = qcomb[i] . reprs[b] (flattened hq*D) for i in [i0, i1),
 * b in [b0, b1); bscore row stride ld. */
int qllm_cuda_block_scores(const qllm_gpu_layer *ly, const float *qcomb, int i0, int i1,
                           int64_t b0, int64_t b1, float *bscore, int64_t ld,
                           cudaStream_t stream);

/* Top-k of bscore[0..n) -> ids[0..k) in ascending block order. */
int qllm_cuda_select_blocks(const float *bscore, int64_t n, int k, int32_t *ids,
                            cudaStream_t stream);

/* Early start of an attention right after a seam (qllm_cuda_exec_seam): the
 * attention launches while the seam still runs (programmatic dependent launch)
 * and waits on device counters instead of the seam's end: for the seam's prep
 * CTAs before it reads its rotated queries and keys, for block i+1's ids only
 * before its retrieved tiles.  So the seam's cut-and-select chain overlaps the
 * attention's local, init and tail tiles.
 * sig: int32 [2] on the device, zero before the call's first seam: prep CTAs
 * done, selections written.  The seam adds to prep / ids (host counts: the
 * targets the next attention waits for) and sets ok = 0 when the next block's
 * ids come from a launch of their own (exec_attention then launches plainly). */
typedef struct qllm_gpu_early {
    int32_t *sig;
    int64_t prep, ids;
    int ok;
} qllm_gpu_early;

/* 1 unless QLLM_ATTN_EARLY=0 (read once). */
int qllm_cuda_early_enabled(void);

/* Attention of the execution block over [init | retrieved blocks | tail
 * memory] (fixed positions) and the local window, one softmax.
 * out [hq, E, D] at out + h*o_hs + r*o_ts; lse [hq, E].  With n_split > 1
 * the key tiles are split over n_split thread blocks per row tile and merged:
 * part_o [n_split, hq, E, D] f32 and part_lse [n_split, hq, E] are scratch.
 * after: NULL, or the early start after the seam just launched (used when
 * after->ok and the wgmma kernel runs; a plain launch otherwise). */
int qllm_cuda_exec_attention(const qllm_gpu_layer *ly, const qllm_gpu_exec *ex,
                             const void *qfix, const void *qloc, const void *krot,
                             const int32_t *ids, float scaling, void *out, int64_t o_hs,
                             int64_t o_ts, float *lse, int n_split, float *part_o,
                             float *part_lse, const qllm_gpu_early *after,
                             cudaStream_t stream);

/* Token scores: for every key of the recent segment add the probability mass
 * it received as a LOCAL key from this block's queries (merged softmax, lse
 * from exec_attention) into the score ring; slots of new positions (>= P0)
 * start from zero. */
int qllm_cuda_exec_token_scores(const qllm_gpu_layer *ly, const qllm_gpu_exec *ex,
                                const void *qloc, const void *krot, const float *lse,
                                float scaling, cudaStream_t stream);

/* Representatives of blocks b0 .. b0+n-1 (positions n_init + b*block_size ..)
 * from the k store and the score ring. */
int qllm_cuda_cut_blocks(const qllm_gpu_layer *ly, int64_t b0, int64_t n, int repr_topk,
                         cudaStream_t stream);

/* The work between the token scores of execution block i and the attention
 * of block i+1 in one launch: the representatives of the blocks block i cut
 * (qllm_cuda_cut_blocks) with their scores for the later blocks i0 .. i1-1
 * (qllm_cuda_block_scores, summed over heads in order), the top-k of block
 * i+1 (qllm_cuda_select_blocks; after the cut when it ranks a block cut now)
 * and block i+1's rotations (qllm_cuda_exec_prep).  Each part is optional:
 * next == NULL (no prep), cut_n == 0 (no cut), sel_k == 0 (no selection).
 * Workspaces: pdot f32 [cut_n * (i1 - i0) * hq]; cnt int32
 * [QLLM_SEAM_CNT_INTS]: an arrival counter, zero before the first call (each
 * call leaves it zero), then room for the select CTA's list. */
#define QLLM_SEAM_CNT_INTS 17
/* the early-start signals (qllm_gpu_early.sig) after the counter workspace */
#define QLLM_SEAM_SIG_INTS 2
typedef struct {
    const qllm_gpu_exec *next;
    const void *q;            /* block i+1's first q row, strides as exec_prep */
    int64_t q_hs, q_ts;
    void *qfix, *qloc, *krot;
    int64_t cut_b0, cut_n;
    int repr_topk;
    const float *qcomb;
    int i0, i1;
    float *bscore;
    int64_t ld;
    float *pdot;
    int32_t *cnt;
    const float *sel_scores;  /* bscore row of block i+1 */
    int64_t sel_n;
    int sel_k;
    int32_t *sel_ids;
    qllm_gpu_early *early;    /* NULL, or signals for the next attention's early start */
} qllm_gpu_seam;

int qllm_cuda_exec_seam(const qllm_gpu_layer *ly, const qllm_gpu_seam *s, cudaStream_t stream);

/* 0 when QLLM_SEAM=0 (attend_run then launches the four kernels one by one). */
int qllm_cuda_seam_enabled(void);

/* Tiered mode: make blocks resident in the device cache.  The blocks are
 * ids[0 .. n) (ids != NULL, e.g. the retrieved ones; with dyn != NULL, n is
 * dyn[QLLM_DYN_NRET]) or b0 .. b0+n-1 (ids ==
 * NULL: blocks just cut).  Each call ticks the clock; resident blocks are
 * stamped, missing ones take the slot used least recently (free slots first,
 * ties to the lower slot; never one stamped by this call) and are copied in:
 * from the store ring when their rows still hold them (first position >=
 * ring_lo; with dyn: dyn[QLLM_DYN_RLO]), else from the host chunk.  Cut
 * blocks that find no slot (more than n_slots in one call) stay host-only. */
int qllm_cuda_tier_touch(const qllm_gpu_layer *ly, const int32_t *ids, int64_t b0, int n, int64_t ring_lo,
                         const int64_t *dyn, cudaStream_t stream);

/* ------------------------------------------------ question heads (qllm/retrieval.py)
 * A few (layer, query head) pairs score every block against the question's
 * tokens; the scores of all layers sit in one f32 matrix raw [rows, ld]
 * (row = block, column = question head, sorted by (layer, head)), shared by
 * the layers of a sequence (QuestionRelevance.raw). */

/* Most question-head columns one selection combines (their stats sit in
 * shared memory; calibration uses every head of the model as a column). */
#define QLLM_CUDA_QH_MAX_COLS 4096

/* Raw scores of the blocks b0 .. b0+n-1 just cut, for this layer's question
 * heads: raw[b*ld + col0 + i] = max over question tokens t < n_tok and block
 * tokens j of tokens[heads[i], t, :] . key_j (the KV head of heads[i],
 * un-rotated keys from the k store, f32 arithmetic, no scaling).
 * tokens [hq, n_tok, D] f32 contiguous (fixed-position question queries);
 * heads is a host array of n_heads query heads. */
int qllm_cuda_qhead_record(const qllm_gpu_layer *ly, int64_t b0, int64_t n, const float *tokens,
                           int n_tok, const int *heads, int n_heads, float *raw, int64_t ld, int col0,
                           cudaStream_t stream);

/* Top-k with the question-head term: over the candidates b < n,
 *   s_b = z(bscore)_b + weight * (sum_{c < n_cols} z(raw[:, c])_b) / n_cols,
 * z(x) = (x - mean) / max(std, 1e-6) (population std over the n candidates),
 * then ids[0..k) as qllm_cuda_select_blocks (descending s, ties toward the
 * lower block, written in ascending block order).  bscore is overwritten
 * with s when the candidates do not fit in shared memory. */
int qllm_cuda_select_blocks_qheads(float *bscore, int64_t n, int k, const float *raw, int64_t ld,
                                   int n_cols, float weight, int32_t *ids, cudaStream_t stream);

/* ------------------------------------------------ decode step (CUDA graphs)
 * One decoded token (E = 1) of one layer with no host scalar in any launch:
 * the per-step sizes live in a small device int64 row `dyn` (fields below),
 * written before each step (qllm_cuda_decode_set, outside a graph) and read by
 * the kernels, whose grids are sized for the maxima (L_max keys in the recent
 * segment, nb_max blocks, k_max retrieved) with inactive parts exiting.  So
 * the launch sequence is capturable in a CUDA graph and replayed per token.
 * A step that cuts one block (cut_k > 0) ends with that block's
 * representatives (block dyn[QLLM_DYN_CUTB], as qllm_cuda_cut_blocks), so a
 * second graph captured with cut_k > 0 replays the cut tokens; steps cutting
 * more blocks, tiered ones and those whose cut records question-head scores
 * are the caller's (exec_* then). */
enum {
    QLLM_DYN_P0 = 0,   /* position of the new token (= tokens before it) */
    QLLM_DYN_T0 = 1,   /* tail start */
    QLLM_DYN_L = 2,    /* P0 - T0 + 1 */
    QLLM_DYN_INIT = 3, /* init_len */
    QLLM_DYN_NRET = 4, /* retrieved blocks */
    QLLM_DYN_M = 5,    /* tail keys that may be memory */
    QLLM_DYN_NBLK = 6, /* blocks in memory */
    QLLM_DYN_RLO = 7,  /* tiered: lowest position the store ring still holds */
    QLLM_DYN_CUTB = 8, /* the block a cutting step cuts (cut_k > 0) */
    QLLM_DYN_FIELDS = 9
};

typedef struct {
    const int64_t *dyn;              /* device [QLLM_DYN_FIELDS] */
    const void *q; int64_t q_hs;     /* [hq, 1, D], head stride (multiple of 8, 16-byte aligned) */
    const void *k; int64_t k_hs;     /* [hkv, 1, D] new key / value (un-rotated) */
    const void *v; int64_t v_hs;
    void *out; int64_t o_hs;         /* [hq, 1, D] */
    int32_t *ids; int k_max;         /* retrieved ids [k_max] (topk) */
    int L_max;                       /* bound on L (<= ring, rope_len) */
    int64_t nb_max;                  /* bound on n_blocks (<= reprs_cap) */
    const float *question; float weight; float scaling;
    int n_split;                     /* key splits of the attention (see exec_attention) */
    void *qfix, *qloc;               /* [hq, 1, D] */
    void *krot;                      /* [hkv, L_max, D] */
    float *lse;                      /* [hq] */
    float *part_o, *part_lse;        /* [n_split, hq, D], [n_split, hq] if n_split > 1 */
    float *qcomb;                    /* [hq, D] */
    float *bscore;                   /* [nb_max] */
    /* question heads (see qllm_cuda_select_blocks_qheads): qh_cols > 0 selects
     * with z(bscore) + weight * mean z(raw[:, c < qh_cols]); question must be NULL */
    const float *qh_raw; int64_t qh_ld; int qh_cols;
    /* > 0: the step cuts block dyn[QLLM_DYN_CUTB] after its token scores, with
     * the top cut_k token scores of each head (repr_topk, at most block_size);
     * not in tiered mode */
    int cut_k;
    /* optional (all three or none): the rotations (prep) run on `side`, forked
     * after the K/V store write by ev_fork and joined before the attention by
     * ev_join, so they overlap the block scoring and top-k (also under capture) */
    cudaStream_t side; cudaEvent_t ev_fork, ev_join;
} qllm_gpu_decode;

/* Enqueue one decode step: K/V into the store at P0, (blocks: qcomb, block
 * scores, top-k), rotations, attention (+ combine), token scores (and with
 * cut_k the cut block's representatives).  Outputs are bitwise those of the
 * exec_* sequence for the same row. */
int qllm_cuda_decode_step(const qllm_gpu_layer *ly, const qllm_gpu_decode *dc, cudaStream_t stream);

/* dyn[0..n) = vals (kernel arguments: no host buffer to keep alive), n <= QLLM_DYN_FIELDS. */
int qllm_cuda_decode_set(int64_t *dyn, const int64_t *vals, int n, cudaStream_t stream);

/* Max number of n_split the attention launcher accepts. */
#define QLLM_CUDA_MAX_SPLIT 32

/* Tile geometry of exec_attention, for the caller's n_split choice: key
 * tiles of QLLM_CUDA_ATTN_BN; query rows per thread block from
 * qllm_cuda_attention_rows() (64 or 128, see attend.cu). */
#define QLLM_CUDA_ATTN_BN 64
int qllm_cuda_attention_rows(void);
/* The attention kernel that runs for this head dim, in words (benchmarks record it). */
const char *qllm_cuda_attention_kernel(int head_dim);
/* 1 when a call of E queries runs with packed rows: the query heads sharing a
 * KV head in one CTA (E = 1, 1 < group <= 16); the CTA count is then hkv. */
int qllm_cuda_attention_packs(int64_t E, int group);

/* ====================================================== fused model kernels */
/* csrc/cuda/fused.cu: the model's elementwise steps around the attention,
 * with the rounding steps of the Hugging Face / torch code they replace
 * (qllm/fused.py).  dtype: f16 (1) or bf16 (2); x / gate / up are rows of a
 * row-major matrix, last dim contiguous, rows at a stride (elements, >= 0);
 * out is contiguous [rows, H] / [rows, cols] and overlaps no input.
 * 16-byte vectors when every row of every operand starts 16-byte aligned,
 * element-wise otherwise. */

/* Llama RMSNorm: out = dtype(w * dtype(x * rsqrt(mean(x^2) + eps))), f32
 * arithmetic, the mean as torch's (sum * (rows / (rows*H)) in f32); only
 * the order of the sum of squares differs from torch.  weight [H]. */
int qllm_cuda_rms_norm(int dtype, const void *x, int64_t x_rs, const void *weight, float eps,
                       void *out, int64_t rows, int64_t H, cudaStream_t stream);

/* out = dtype(dtype(silu(gate)) * up), silu(g) = g / (1 + expf(-g)) in f32:
 * torch's F.silu(gate) * up, bitwise. */
int qllm_cuda_silu_mul(int dtype, const void *gate, int64_t g_rs, const void *up, int64_t u_rs,
                       void *out, int64_t rows, int64_t cols, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
