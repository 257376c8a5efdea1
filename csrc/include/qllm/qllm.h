/*
 * qllm.h -- public API of the qllm C11 core.
 *
 * The core keeps the block memory of query-aware context memory (Q-LLM):
 *   - a block store (per layer): which block lives in which slot of which tier,
 *     with LRU bookkeeping, and optionally the K/V data itself;
 *   - representative-token selection (per block and query head);
 *   - query-weighted block scoring and deterministic top-k retrieval.
 *
 * No Python, no torch: tensors cross this ABI as qllm_tensor views
 * (pointer + int64 shape + strides in elements + dtype).  Storage dtypes are
 * f32 / f16 / bf16; every accumulation is f32.
 *
 * Conventions
 *   - Every fallible call returns a qllm_status.  On failure a thread-local
 *     message is available from qllm_last_error() naming the argument and the
 *     expectation, e.g. "keys: expected 4 dims (blocks, kv_heads, tokens, dim), got 3".
 *   - The caller allocates every output.  The core never hands out memory the
 *     caller must free, except opaque handles released by their _free().
 *   - *_free(NULL) is a no-op.
 *   - Functions are thread-safe on distinct handles; a handle must not be
 *     used from two threads at once.
 */
#ifndef QLLM_QLLM_H
#define QLLM_QLLM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ status */

typedef enum {
    QLLM_OK = 0,
    QLLM_ERR_INVALID_ARG = 1, /* bad rank / shape / dtype / value of an argument */
    QLLM_ERR_NOMEM = 2,       /* allocation failed */
    QLLM_ERR_NOT_FOUND = 3,   /* unknown block id */
    QLLM_ERR_NONFINITE = 4,   /* NaN or Inf where a finite value is required */
    QLLM_ERR_CAPACITY = 5,    /* request exceeds a fixed capacity (e.g. device slots) */
    QLLM_ERR_INTERNAL = 6     /* broken internal invariant (a bug: please report) */
} qllm_status;

/* Message of the last failed call on this thread ("" if none).  The pointer
 * stays valid until the next failing call on the same thread. */
const char *qllm_last_error(void);

/* Static name of a status code ("QLLM_ERR_INVALID_ARG", ...). */
const char *qllm_status_str(qllm_status status);

/* ------------------------------------------------------------------ tensors */

typedef enum {
    QLLM_DTYPE_F32 = 0,
    QLLM_DTYPE_F16 = 1,
    QLLM_DTYPE_BF16 = 2,
    QLLM_DTYPE_I32 = 3 /* indices only */
} qllm_dtype;

/* Bytes per element of a dtype; 0 for an unknown value. */
size_t qllm_dtype_size(qllm_dtype dtype);

/* Static name of a dtype ("f32", "f16", "bf16", "i32"). */
const char *qllm_dtype_str(qllm_dtype dtype);

#define QLLM_MAX_DIMS 8

/* A strided view of memory the core does not own.  strides are in elements
 * and may be any non-negative values (non-contiguous views are accepted by
 * every function that reads a tensor; outputs may be strided too). */
typedef struct {
    void *data;
    qllm_dtype dtype;
    int32_t ndim;
    int64_t shape[QLLM_MAX_DIMS];
    int64_t strides[QLLM_MAX_DIMS];
} qllm_tensor;

/* Fill *t as a C-contiguous view of data with the given shape. */
qllm_status qllm_tensor_contiguous(qllm_tensor *t, void *data, qllm_dtype dtype,
                                   int32_t ndim, const int64_t *shape);

/* Scalar conversion helpers (exact round-to-nearest-even on the way down). */
float qllm_f16_to_f32(uint16_t h);
uint16_t qllm_f32_to_f16(float f);
float qllm_bf16_to_f32(uint16_t h);
uint16_t qllm_f32_to_bf16(float f);

/* Number of worker threads the core may use for one call (default: the
 * number of online CPUs, at most 64).  n <= 0 restores the default.  Calls
 * whose work is too small to pay for threads always run on the caller. */
void qllm_set_num_threads(int n);
int qllm_get_num_threads(void);

/* ------------------------------------------------------------ representatives */

/*
 * qllm_repr_compute -- representative keys of memory blocks.
 *
 * For every block b and query head h, pick the repr_topk tokens of the block
 * with the highest score[b, h, t] (ties toward the lower token index) and
 * average their keys.  Query head h reads the keys of KV head
 * h / (n_q_heads / n_kv_heads) (grouped-query attention).
 *
 *   keys    [n_blocks, n_kv_heads, block_len, head_dim]   f32 | f16 | bf16
 *   scores  [n_blocks, n_q_heads, block_len]              f32 | f16 | bf16, finite
 *   out     [n_blocks, n_q_heads, head_dim]               f32 | f16 | bf16 (written)
 *
 * Constraints: n_blocks >= 1, block_len >= 1, head_dim >= 1,
 * n_q_heads % n_kv_heads == 0, repr_topk >= 1.  repr_topk > block_len uses
 * every token of the block.  Accumulates in f32, rounds once into out.
 *
 * Returns QLLM_OK, QLLM_ERR_INVALID_ARG (shapes, dtypes, repr_topk),
 * QLLM_ERR_NONFINITE (a NaN/Inf score; out is then unspecified),
 * QLLM_ERR_NOMEM.
 */
qllm_status qllm_repr_compute(const qllm_tensor *keys, const qllm_tensor *scores,
                              int64_t repr_topk, qllm_tensor *out);

/* -------------------------------------------------------- scoring + retrieval */

/*
 * qllm_retrieval_score -- query-weighted block scores.
 *
 *   s[b] = sum_h query[h] . reprs[b, h]  +  weight * sum_h question[h] . reprs[b, h]
 *
 *   reprs     [n_blocks, n_q_heads, head_dim]   f32 | f16 | bf16
 *   query     [n_q_heads, head_dim]             f32 | f16 | bf16 (mean query of the execution block)
 *   question  [n_q_heads, head_dim] or NULL     f32 | f16 | bf16 (NULL: no question, weight ignored)
 *   out       [n_blocks]                        f32 (written)
 *
 * n_blocks may be 0 (nothing written).  weight must be finite.
 * Returns QLLM_OK, QLLM_ERR_INVALID_ARG, QLLM_ERR_NONFINITE (weight, or a
 * score came out NaN/Inf because an input was not finite).
 */
qllm_status qllm_retrieval_score(const qllm_tensor *reprs, const qllm_tensor *query,
                                 const qllm_tensor *question, float weight,
                                 qllm_tensor *out);

/*
 * qllm_retrieval_topk -- indices of the k highest scores.
 *
 *   scores   [n]            f32, finite
 *   out_idx  [min(k, n)]    i32 (written): sorted by descending score, ties
 *                           toward the lower index -- fully deterministic.
 *
 * k >= 1 is required; k > n returns all n indices.  n == 0 writes nothing.
 * *out_count (may be NULL) receives min(k, n).
 * Returns QLLM_OK, QLLM_ERR_INVALID_ARG, QLLM_ERR_NONFINITE (NaN/Inf score).
 */
qllm_status qllm_retrieval_topk(const qllm_tensor *scores, int64_t k,
                                qllm_tensor *out_idx, int64_t *out_count);

/* Both of the above in one call: scores into out_scores [n_blocks] (f32),
 * top-k into out_idx [min(k, n_blocks)] (i32). */
qllm_status qllm_retrieval_select(const qllm_tensor *reprs, const qllm_tensor *query,
                                  const qllm_tensor *question, float weight, int64_t k,
                                  qllm_tensor *out_scores, qllm_tensor *out_idx,
                                  int64_t *out_count);

/* ------------------------------------------------------------- block gather */

/*
 * qllm_blocks_gather_slots -- copy pool slots into a contiguous layout.
 *
 *   pool   [n_slots, n_kv_heads, block_size, head_dim]      any storage dtype
 *   slots  [n]                                              i32, each in [0, n_slots)
 *   out    [n_kv_heads, n * block_size, head_dim]           same dtype as pool (written)
 *
 * out[h, i*block_size + t, :] = pool[slots[i], h, t, :].  n may be 0.
 * Returns QLLM_OK or QLLM_ERR_INVALID_ARG (shapes, dtypes, slot out of range).
 */
qllm_status qllm_blocks_gather_slots(const qllm_tensor *pool, const qllm_tensor *slots,
                                     qllm_tensor *out);

/* -------------------------------------------------------------- block store */

/* Where a block's data lives. */
typedef enum {
    QLLM_TIER_NONE = -1,  /* no such block / no source (fresh block) */
    QLLM_TIER_DEVICE = 0, /* compute-device pool slot (GPU pool, or CPU pool) */
    QLLM_TIER_HOST = 1    /* host memory (pinned on the GPU path) */
} qllm_tier;

/* One data movement the caller must perform (bookkeeping mode) or that the
 * store has performed (data mode): copy block `block` from (from_tier,
 * from_slot) to (to_tier, to_slot).  from_tier == QLLM_TIER_NONE means "the
 * new block's data goes here".  block == -1 marks an empty record. */
typedef struct {
    int32_t block;
    int32_t from_tier;
    int32_t from_slot;
    int32_t to_tier;
    int32_t to_slot;
} qllm_block_move;

typedef struct qllm_blocks qllm_blocks_t;

typedef struct {
    int64_t block_size;   /* tokens per block, >= 1 (default 128) */
    int64_t n_kv_heads;   /* >= 1 (default 8) */
    int64_t head_dim;     /* >= 1 (default 128) */
    qllm_dtype dtype;     /* f32 | f16 | bf16 (default bf16) */
    int64_t device_slots; /* capacity of the compute-device tier in blocks, >= 0
                             (default 1024); beyond it the least recently used
                             blocks move to the host tier */
    /* Data mode: when device_k and device_v are both non-NULL they are the
     * caller-owned device-tier pools, C-contiguous
     * [device_slots, n_kv_heads, block_size, head_dim] of dtype, addressable by
     * the CPU; the store then copies data itself on append / eviction / fetch
     * and keeps the host tier in memory it allocates.  Both NULL (default):
     * bookkeeping mode -- the store only assigns slots and reports moves; the
     * caller owns all data (e.g. a GPU pool and a pinned host pool). */
    void *device_k;
    void *device_v;
} qllm_blocks_params;

/* Defaults listed above. */
qllm_blocks_params qllm_blocks_default_params(void);

/* Create a store.  *out receives the handle (free with qllm_blocks_free).
 * Returns QLLM_OK, QLLM_ERR_INVALID_ARG, QLLM_ERR_NOMEM. */
qllm_status qllm_blocks_init(const qllm_blocks_params *params, qllm_blocks_t **out);

/* Release a store and the host memory it allocated.  NULL is a no-op. */
void qllm_blocks_free(qllm_blocks_t *store);

/* Drop every block (capacity and pools are kept). */
void qllm_blocks_clear(qllm_blocks_t *store);

/* Number of blocks appended so far (ids are 0 .. count-1, in append order). */
int64_t qllm_blocks_count(const qllm_blocks_t *store);

/* Blocks currently in the device tier. */
int64_t qllm_blocks_device_used(const qllm_blocks_t *store);

/* Host-tier slots in use (in bookkeeping mode the caller's host pool must hold
 * at least qllm_blocks_host_capacity() slots: the highest host slot index
 * handed out so far plus one). */
int64_t qllm_blocks_host_used(const qllm_blocks_t *store);
int64_t qllm_blocks_host_capacity(const qllm_blocks_t *store);

/*
 * qllm_blocks_append -- add one block as the newest id.
 *
 *   k, v  [n_kv_heads, block_size, head_dim] of the store's dtype (data mode),
 *         or both NULL (bookkeeping mode; passing data in bookkeeping mode,
 *         or none in data mode, is QLLM_ERR_INVALID_ARG).
 *   out_id       receives the new id (may be NULL).
 *   out_moves    caller array of at least 2 records (may be NULL only in data
 *                mode); *out_n_moves receives how many were filled:
 *                  an eviction of the LRU device block to the host tier (when
 *                  the device tier is full), then the placement of the new
 *                  block (from_tier == QLLM_TIER_NONE).
 * The new block counts as most recently used.  With device_slots == 0 blocks
 * go straight to the host tier.
 * Returns QLLM_OK, QLLM_ERR_INVALID_ARG, QLLM_ERR_NOMEM, QLLM_ERR_CAPACITY
 * (more than INT32_MAX blocks).
 */
qllm_status qllm_blocks_append(qllm_blocks_t *store, const qllm_tensor *k,
                               const qllm_tensor *v, int32_t *out_id,
                               qllm_block_move *out_moves, int64_t *out_n_moves);

/* Where block `id` lives: *tier (QLLM_TIER_DEVICE | QLLM_TIER_HOST) and *slot.
 * Returns QLLM_OK or QLLM_ERR_NOT_FOUND. */
qllm_status qllm_blocks_lookup(const qllm_blocks_t *store, int32_t id, int32_t *tier,
                               int32_t *slot);

/* Mark ids[0..n) as used now (LRU), in order.  Returns QLLM_OK or
 * QLLM_ERR_NOT_FOUND (nothing is touched then). */
qllm_status qllm_blocks_touch(qllm_blocks_t *store, const int32_t *ids, int64_t n);

/* Move block `id` from the device tier to the host tier (no-op if already on
 * the host: *out_n_moves = 0).  out_moves: at least 1 record.
 * Returns QLLM_OK, QLLM_ERR_NOT_FOUND, QLLM_ERR_NOMEM. */
qllm_status qllm_blocks_evict(qllm_blocks_t *store, int32_t id, qllm_block_move *out_moves,
                              int64_t *out_n_moves);

/*
 * qllm_blocks_fetch -- make ids[0..n) resident in the device tier.
 *
 * Blocks already there stay; each missing one takes a free device slot or
 * the slot of the least recently used device block that is not in ids
 * (which moves to the host tier).  All of ids count as used now.
 * out_moves: caller array of at least 2*n records; *out_n_moves receives the
 * number filled, in the order they must be performed.
 * Duplicate ids are allowed.  Returns QLLM_OK, QLLM_ERR_NOT_FOUND,
 * QLLM_ERR_CAPACITY (more distinct ids than device slots; nothing moved),
 * QLLM_ERR_NOMEM.
 */
qllm_status qllm_blocks_fetch(qllm_blocks_t *store, const int32_t *ids, int64_t n,
                              qllm_block_move *out_moves, int64_t *out_n_moves);

/*
 * qllm_blocks_gather -- copy blocks ids[0..n) (any tier) into contiguous K/V
 * (data mode only).
 *
 *   out_k, out_v  [n_kv_heads, n * block_size, head_dim] of the store's dtype
 *
 * Does not change LRU state.  Returns QLLM_OK, QLLM_ERR_INVALID_ARG
 * (bookkeeping mode, shapes, dtype), QLLM_ERR_NOT_FOUND.
 */
qllm_status qllm_blocks_gather(const qllm_blocks_t *store, const int32_t *ids, int64_t n,
                               qllm_tensor *out_k, qllm_tensor *out_v);

#ifdef __cplusplus
}
#endif

#endif /* QLLM_QLLM_H */
