/*
 * blocks.c -- the block store (tiers, slots, LRU, optional data) and the
 * slot gathers (qllm_blocks_gather_slots, qllm_blocks_gather).
 *
 * Bookkeeping
 *   - Every block has a tier (DEVICE | HOST), a slot in that tier and a
 *     last-use stamp from a per-store clock that only grows.  append and
 *     touch give each block its own tick (in order); fetch gives all of its
 *     ids one common tick.
 *   - Device slots: owner table + free stack (slot 0 handed out first).
 *     The eviction victim is the device block with the smallest (last use,
 *     id), never one of the ids being fetched: a linear scan of the device
 *     tier per eviction.
 *   - Host slots: free stack + high-water mark; host_capacity = high-water
 *     mark (highest slot ever handed out + 1).  clear() keeps the mark and
 *     refills the free stack with every host slot.
 *   - Every fallible allocation (block tables, host free stack, host data)
 *     is reserved before the first state change, so an error leaves the
 *     store exactly as it was.
 * Data mode (device_k / device_v given): the store copies the data itself;
 * the host tier lives in memory it allocates and grows geometrically.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qllm_internal.h"

struct qllm_blocks {
    qllm_blocks_params p;
    int data_mode;
    size_t esize;         /* bytes per element */
    int64_t block_elems;  /* n_kv_heads * block_size * head_dim */
    size_t block_bytes;

    /* per block, indexed by id */
    int64_t count, cap;
    int8_t *tier;
    int32_t *slot;
    uint64_t *last_use;
    uint64_t *mark; /* == epoch while the block is in the current fetch */

    /* device tier */
    int64_t dev_slots;
    int32_t *dev_owner; /* block id or -1 */
    int32_t *dev_free;  /* stack; top = dev_free[n_dev_free - 1] */
    int64_t n_dev_free;

    /* host tier */
    int32_t *host_free; /* stack */
    int64_t n_host_free, host_free_cap;
    int64_t host_hwm; /* highest host slot handed out + 1 */
    char *host_k, *host_v;
    int64_t host_data_cap; /* host slots the data buffers hold */

    uint64_t clock, epoch;
};

static const qllm_block_move k_empty_move = {-1, QLLM_TIER_NONE, -1, QLLM_TIER_NONE, -1};

/* Default parameters (see qllm.h). */
qllm_blocks_params qllm_blocks_default_params(void) {
    qllm_blocks_params p;
    memset(&p, 0, sizeof p);
    p.block_size = 128;
    p.n_kv_heads = 8;
    p.head_dim = 128;
    p.dtype = QLLM_DTYPE_BF16;
    p.device_slots = 1024;
    p.device_k = NULL;
    p.device_v = NULL;
    return p;
}

/* ------------------------------------------------------------ allocation */

/* Grow the per-block tables to hold at least `need` blocks. */
static qllm_status reserve_blocks(qllm_blocks_t *s, int64_t need) {
    if (need <= s->cap)
        return QLLM_OK;
    int64_t cap = s->cap < 64 ? 64 : s->cap;
    while (cap < need)
        cap = cap > INT64_MAX / 2 ? need : cap * 2;
    if (cap > (int64_t)INT32_MAX)
        cap = need > (int64_t)INT32_MAX ? need : (int64_t)INT32_MAX;
    int8_t *tier = (int8_t *)realloc(s->tier, (size_t)cap * sizeof *tier);
    if (tier != NULL)
        s->tier = tier;
    int32_t *slot = tier ? (int32_t *)realloc(s->slot, (size_t)cap * sizeof *slot) : NULL;
    if (slot != NULL)
        s->slot = slot;
    uint64_t *lu = slot ? (uint64_t *)realloc(s->last_use, (size_t)cap * sizeof *lu) : NULL;
    if (lu != NULL)
        s->last_use = lu;
    uint64_t *mark = lu ? (uint64_t *)realloc(s->mark, (size_t)cap * sizeof *mark) : NULL;
    if (mark == NULL)
        return qllm_error_set(QLLM_ERR_NOMEM, "out of memory: block tables for %" PRId64 " blocks", cap);
    s->mark = mark;
    for (int64_t i = s->cap; i < cap; ++i)
        mark[i] = 0;
    s->cap = cap;
    return QLLM_OK;
}

/* Make sure `extra` more host slots can be handed out without allocating. */
static qllm_status reserve_host(qllm_blocks_t *s, int64_t extra) {
    int64_t fresh = extra - s->n_host_free;
    if (fresh <= 0)
        return QLLM_OK;
    int64_t need = s->host_hwm + fresh;
    if (need > (int64_t)INT32_MAX)
        return qllm_error_set(QLLM_ERR_CAPACITY, "host tier: more than INT32_MAX slots");
    if (need > s->host_free_cap) {
        int64_t cap = s->host_free_cap < 64 ? 64 : s->host_free_cap;
        while (cap < need)
            cap *= 2;
        int32_t *f = (int32_t *)realloc(s->host_free, (size_t)cap * sizeof *f);
        if (f == NULL)
            return qllm_error_set(QLLM_ERR_NOMEM, "out of memory: host free list of %" PRId64 " slots", cap);
        s->host_free = f;
        s->host_free_cap = cap;
    }
    if (s->data_mode && need > s->host_data_cap) {
        int64_t cap = s->host_data_cap < 4 ? 4 : s->host_data_cap;
        while (cap < need)
            cap *= 2;
        if ((uint64_t)cap > (uint64_t)SIZE_MAX / s->block_bytes)
            return qllm_error_set(QLLM_ERR_NOMEM, "out of memory: host tier of %" PRId64 " blocks", cap);
        size_t bytes = (size_t)cap * s->block_bytes;
        char *k = (char *)realloc(s->host_k, bytes ? bytes : 1);
        if (k == NULL)
            return qllm_error_set(QLLM_ERR_NOMEM, "out of memory: host tier of %" PRId64 " blocks (%zu bytes for K)", cap, bytes);
        s->host_k = k;
        char *v = (char *)realloc(s->host_v, bytes ? bytes : 1);
        if (v == NULL)
            return qllm_error_set(QLLM_ERR_NOMEM, "out of memory: host tier of %" PRId64 " blocks (%zu bytes for V)", cap, bytes);
        s->host_v = v;
        s->host_data_cap = cap;
    }
    return QLLM_OK;
}

/* Hand out a host slot (reserved beforehand). */
static int32_t host_alloc(qllm_blocks_t *s) {
    if (s->n_host_free > 0)
        return s->host_free[--s->n_host_free];
    return (int32_t)s->host_hwm++;
}

static void host_release(qllm_blocks_t *s, int32_t slot) { s->host_free[s->n_host_free++] = slot; }

static void reset_device(qllm_blocks_t *s) {
    for (int64_t i = 0; i < s->dev_slots; ++i) {
        s->dev_owner[i] = -1;
        s->dev_free[i] = (int32_t)(s->dev_slots - 1 - i); /* slot 0 on top */
    }
    s->n_dev_free = s->dev_slots;
}

/* --------------------------------------------------------------- data copy */

static char *dev_data(const qllm_blocks_t *s, int kv, int32_t slot) {
    char *base = (char *)(kv ? s->p.device_v : s->p.device_k);
    return base + (size_t)slot * s->block_bytes;
}

static char *host_data(const qllm_blocks_t *s, int kv, int32_t slot) {
    char *base = kv ? s->host_v : s->host_k;
    return base + (size_t)slot * s->block_bytes;
}

static char *block_data(const qllm_blocks_t *s, int kv, int32_t id) {
    return s->tier[id] == QLLM_TIER_DEVICE ? dev_data(s, kv, s->slot[id]) : host_data(s, kv, s->slot[id]);
}

/* Copy a [n_kv_heads, block_size, head_dim] view into a contiguous block. */
static void copy_in(const qllm_blocks_t *s, const qllm_tensor *t, char *dst) {
    const int64_t H = s->p.n_kv_heads, T = s->p.block_size, D = s->p.head_dim;
    for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < T; ++i)
            qllm_row_copy(qllm_tensor_ptr(t, h * t->strides[0] + i * t->strides[1]), t->strides[2],
                          dst + (size_t)((h * T + i) * D) * s->esize, 1, D, s->esize);
}

/* Copy contiguous block `src` to rows [row0, row0 + block_size) of a
 * [n_kv_heads, rows, head_dim] view. */
static void copy_out(const qllm_blocks_t *s, const char *src, const qllm_tensor *t, int64_t row0) {
    const int64_t H = s->p.n_kv_heads, T = s->p.block_size, D = s->p.head_dim;
    for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < T; ++i)
            qllm_row_copy(src + (size_t)((h * T + i) * D) * s->esize, 1,
                          qllm_tensor_ptr(t, h * t->strides[0] + (row0 + i) * t->strides[1]),
                          t->strides[2], D, s->esize);
}

/* -------------------------------------------------------------- movements */

static void put_move(qllm_block_move *moves, int64_t *n, int32_t block, int32_t ft, int32_t fs,
                     int32_t tt, int32_t ts) {
    if (moves != NULL) {
        qllm_block_move m = {block, ft, fs, tt, ts};
        moves[*n] = m;
    }
    ++*n;
}

/* Device block with the smallest (last use, id) that is not marked with
 * `epoch` (epoch 0: exclude nothing; fetch epochs start at 1); -1 if none. */
static int32_t lru_victim(const qllm_blocks_t *s, uint64_t epoch) {
    int32_t best = -1;
    for (int64_t i = 0; i < s->dev_slots; ++i) {
        int32_t id = s->dev_owner[i];
        if (id < 0 || (epoch != 0 && s->mark[id] == epoch))
            continue;
        if (best < 0 || s->last_use[id] < s->last_use[best] ||
            (s->last_use[id] == s->last_use[best] && id < best))
            best = id;
    }
    return best;
}

/* Move device block `id` to a (reserved) host slot; returns the device slot
 * it left, now owned by nobody and NOT on the free stack. */
static int32_t evict_to_host(qllm_blocks_t *s, int32_t id, qllm_block_move *moves, int64_t *n) {
    const int32_t dslot = s->slot[id];
    const int32_t hslot = host_alloc(s);
    if (s->data_mode) {
        memcpy(host_data(s, 0, hslot), dev_data(s, 0, dslot), s->block_bytes);
        memcpy(host_data(s, 1, hslot), dev_data(s, 1, dslot), s->block_bytes);
    }
    put_move(moves, n, id, QLLM_TIER_DEVICE, dslot, QLLM_TIER_HOST, hslot);
    s->tier[id] = QLLM_TIER_HOST;
    s->slot[id] = hslot;
    s->dev_owner[dslot] = -1;
    return dslot;
}

/* Fill records [from, to) with the empty record. */
static void fill_empty(qllm_block_move *moves, int64_t from, int64_t to) {
    if (moves == NULL)
        return;
    for (int64_t i = from; i < to; ++i)
        moves[i] = k_empty_move;
}

/* ------------------------------------------------------------------- API */

/* Create a store (see qllm.h). */
qllm_status qllm_blocks_init(const qllm_blocks_params *params, qllm_blocks_t **out) {
    if (out == NULL)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "out: must not be NULL");
    *out = NULL;
    if (params == NULL)
        return qllm_error_set(QLLM_ERR_INVALID_ARG,
                              "params: must not be NULL (start from qllm_blocks_default_params())");
    const qllm_blocks_params *p = params;
    if (p->block_size < 1)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "params.block_size: must be >= 1, got %" PRId64, p->block_size);
    if (p->n_kv_heads < 1)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "params.n_kv_heads: must be >= 1, got %" PRId64, p->n_kv_heads);
    if (p->head_dim < 1)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "params.head_dim: must be >= 1, got %" PRId64, p->head_dim);
    if (p->dtype != QLLM_DTYPE_F32 && p->dtype != QLLM_DTYPE_F16 && p->dtype != QLLM_DTYPE_BF16)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "params.dtype: expected f32, f16 or bf16, got %s (%d)",
                              qllm_dtype_str(p->dtype), (int)p->dtype);
    if (p->device_slots < 0 || p->device_slots > (int64_t)INT32_MAX)
        return qllm_error_set(QLLM_ERR_INVALID_ARG,
                              "params.device_slots: expected 0 .. INT32_MAX, got %" PRId64, p->device_slots);
    if ((p->device_k == NULL) != (p->device_v == NULL))
        return qllm_error_set(QLLM_ERR_INVALID_ARG,
                              "params.device_k/device_v: give both (data mode) or neither (bookkeeping mode)");
    const size_t esize = qllm_dtype_size(p->dtype);
    const int64_t lim = QLLM_MAX_ELEM_OFFSET;
    if (p->n_kv_heads > lim / p->block_size || p->n_kv_heads * p->block_size > lim / p->head_dim)
        return qllm_error_set(QLLM_ERR_INVALID_ARG,
                              "params: n_kv_heads x block_size x head_dim overflows int64");
    const int64_t block_elems = p->n_kv_heads * p->block_size * p->head_dim;
    const int data_mode = p->device_k != NULL;
    if (data_mode) {
        if (((uintptr_t)p->device_k % esize) != 0 || ((uintptr_t)p->device_v % esize) != 0)
            return qllm_error_set(QLLM_ERR_INVALID_ARG,
                                  "params.device_k/device_v: not aligned to %zu-byte elements", esize);
        if (p->device_slots > 0 && block_elems > lim / p->device_slots)
            return qllm_error_set(QLLM_ERR_INVALID_ARG,
                                  "params.device_slots: pool of %" PRId64 " blocks overflows int64",
                                  p->device_slots);
    }
    if ((uint64_t)block_elems > (uint64_t)SIZE_MAX / esize)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "params: block too large for size_t");

    qllm_blocks_t *s = (qllm_blocks_t *)calloc(1, sizeof *s);
    if (s == NULL)
        return qllm_error_set(QLLM_ERR_NOMEM, "out of memory: block store");
    s->p = *p;
    s->data_mode = data_mode;
    s->esize = esize;
    s->block_elems = block_elems;
    s->block_bytes = (size_t)block_elems * esize;
    s->dev_slots = p->device_slots;
    s->dev_owner = (int32_t *)qllm_alloc_array(s->dev_slots, sizeof(int32_t));
    s->dev_free = (int32_t *)qllm_alloc_array(s->dev_slots, sizeof(int32_t));
    if (s->dev_owner == NULL || s->dev_free == NULL) {
        qllm_blocks_free(s);
        return qllm_error_set(QLLM_ERR_NOMEM, "out of memory: tables for %" PRId64 " device slots",
                              p->device_slots);
    }
    reset_device(s);
    *out = s;
    return QLLM_OK;
}

/* Release a store and its host memory (NULL: no-op). */
void qllm_blocks_free(qllm_blocks_t *store) {
    if (store == NULL)
        return;
    free(store->tier);
    free(store->slot);
    free(store->last_use);
    free(store->mark);
    free(store->dev_owner);
    free(store->dev_free);
    free(store->host_free);
    free(store->host_k);
    free(store->host_v);
    free(store);
}

/* Drop every block; capacities, pools and host_capacity are kept. */
void qllm_blocks_clear(qllm_blocks_t *store) {
    if (store == NULL)
        return;
    store->count = 0;
    reset_device(store);
    /* every host slot ever handed out is free again; slot 0 on top */
    for (int64_t i = 0; i < store->host_hwm; ++i)
        store->host_free[i] = (int32_t)(store->host_hwm - 1 - i);
    store->n_host_free = store->host_hwm;
}

/* Number of blocks appended so far (0 for NULL). */
int64_t qllm_blocks_count(const qllm_blocks_t *store) { return store ? store->count : 0; }

/* Blocks in the device tier (0 for NULL). */
int64_t qllm_blocks_device_used(const qllm_blocks_t *store) {
    return store ? store->dev_slots - store->n_dev_free : 0;
}

/* Host slots in use (0 for NULL). */
int64_t qllm_blocks_host_used(const qllm_blocks_t *store) {
    return store ? store->host_hwm - store->n_host_free : 0;
}

/* Highest host slot handed out so far + 1 (0 for NULL). */
int64_t qllm_blocks_host_capacity(const qllm_blocks_t *store) { return store ? store->host_hwm : 0; }

static qllm_status check_store(const qllm_blocks_t *store) {
    if (store == NULL)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "store: must not be NULL");
    return QLLM_OK;
}

static qllm_status check_block_view(const qllm_blocks_t *s, const qllm_tensor *t, const char *name) {
    qllm_status st = qllm_tensor_check(t, name, 3, "kv_heads, tokens, dim", QLLM_DTYPE_BIT(s->p.dtype));
    if (st == QLLM_OK)
        st = qllm_tensor_check_dim(t, name, 0, "kv_heads", s->p.n_kv_heads, "n_kv_heads of the store");
    if (st == QLLM_OK)
        st = qllm_tensor_check_dim(t, name, 1, "tokens", s->p.block_size, "block_size of the store");
    if (st == QLLM_OK)
        st = qllm_tensor_check_dim(t, name, 2, "dim", s->p.head_dim, "head_dim of the store");
    return st;
}

/* Add one block as the newest id (see qllm.h). */
qllm_status qllm_blocks_append(qllm_blocks_t *store, const qllm_tensor *k, const qllm_tensor *v,
                               int32_t *out_id, qllm_block_move *out_moves, int64_t *out_n_moves) {
    qllm_status st;
    if ((st = check_store(store)) != QLLM_OK)
        return st;
    qllm_blocks_t *s = store;
    if (s->data_mode) {
        if (k == NULL || v == NULL)
            return qllm_error_set(QLLM_ERR_INVALID_ARG,
                                  "%s: must not be NULL in data mode (the store has device pools)",
                                  k == NULL ? "k" : "v");
        if ((st = check_block_view(s, k, "k")) != QLLM_OK || (st = check_block_view(s, v, "v")) != QLLM_OK)
            return st;
    } else {
        if (k != NULL || v != NULL)
            return qllm_error_set(QLLM_ERR_INVALID_ARG,
                                  "%s: must be NULL in bookkeeping mode (the store has no device pools)",
                                  k != NULL ? "k" : "v");
        if (out_moves == NULL)
            return qllm_error_set(QLLM_ERR_INVALID_ARG,
                                  "out_moves: must not be NULL in bookkeeping mode");
    }
    if (s->count >= (int64_t)INT32_MAX)
        return qllm_error_set(QLLM_ERR_CAPACITY, "store: already holds INT32_MAX blocks");

    const int to_host = s->dev_slots == 0;
    const int evict = !to_host && s->n_dev_free == 0;
    if ((st = reserve_blocks(s, s->count + 1)) != QLLM_OK)
        return st;
    if ((to_host || evict) && (st = reserve_host(s, 1)) != QLLM_OK)
        return st;

    const int32_t id = (int32_t)s->count;
    int64_t n = 0;
    if (to_host) {
        const int32_t hslot = host_alloc(s);
        if (s->data_mode) {
            copy_in(s, k, host_data(s, 0, hslot));
            copy_in(s, v, host_data(s, 1, hslot));
        }
        put_move(out_moves, &n, id, QLLM_TIER_NONE, -1, QLLM_TIER_HOST, hslot);
        s->tier[id] = QLLM_TIER_HOST;
        s->slot[id] = hslot;
    } else {
        int32_t dslot;
        if (evict) {
            const int32_t victim = lru_victim(s, 0);
            if (victim < 0)
                return qllm_error_set(QLLM_ERR_INTERNAL, "append: full device tier without a victim");
            dslot = evict_to_host(s, victim, out_moves, &n);
        } else {
            dslot = s->dev_free[--s->n_dev_free];
        }
        if (s->data_mode) {
            copy_in(s, k, dev_data(s, 0, dslot));
            copy_in(s, v, dev_data(s, 1, dslot));
        }
        put_move(out_moves, &n, id, QLLM_TIER_NONE, -1, QLLM_TIER_DEVICE, dslot);
        s->tier[id] = QLLM_TIER_DEVICE;
        s->slot[id] = dslot;
        s->dev_owner[dslot] = id;
    }
    s->last_use[id] = ++s->clock;
    s->mark[id] = 0;
    s->count++;
    fill_empty(out_moves, n, 2);
    if (out_id != NULL)
        *out_id = id;
    if (out_n_moves != NULL)
        *out_n_moves = n;
    return QLLM_OK;
}

/* Where block id lives (see qllm.h). */
qllm_status qllm_blocks_lookup(const qllm_blocks_t *store, int32_t id, int32_t *tier, int32_t *slot) {
    qllm_status st = check_store(store);
    if (st != QLLM_OK)
        return st;
    if (id < 0 || id >= store->count)
        return qllm_error_set(QLLM_ERR_NOT_FOUND, "id: block %" PRId32 " not found (the store holds %" PRId64 ")",
                              id, store->count);
    if (tier != NULL)
        *tier = store->tier[id];
    if (slot != NULL)
        *slot = store->slot[id];
    return QLLM_OK;
}

/* Check ids[0..n) against the store. */
static qllm_status check_ids(const qllm_blocks_t *s, const int32_t *ids, int64_t n) {
    if (n < 0)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "n: must be >= 0, got %" PRId64, n);
    if (n > 0 && ids == NULL)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "ids: must not be NULL when n > 0");
    for (int64_t i = 0; i < n; ++i)
        if (ids[i] < 0 || ids[i] >= s->count)
            return qllm_error_set(QLLM_ERR_NOT_FOUND,
                                  "ids: block %" PRId32 " at index %" PRId64 " not found (the store holds %" PRId64 ")",
                                  ids[i], i, s->count);
    return QLLM_OK;
}

/* Mark ids as used now, in order (see qllm.h). */
qllm_status qllm_blocks_touch(qllm_blocks_t *store, const int32_t *ids, int64_t n) {
    qllm_status st;
    if ((st = check_store(store)) != QLLM_OK || (st = check_ids(store, ids, n)) != QLLM_OK)
        return st;
    for (int64_t i = 0; i < n; ++i)
        store->last_use[ids[i]] = ++store->clock;
    return QLLM_OK;
}

/* Move one block to the host tier (see qllm.h). */
qllm_status qllm_blocks_evict(qllm_blocks_t *store, int32_t id, qllm_block_move *out_moves,
                              int64_t *out_n_moves) {
    qllm_status st;
    if ((st = check_store(store)) != QLLM_OK)
        return st;
    qllm_blocks_t *s = store;
    if (!s->data_mode && out_moves == NULL)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "out_moves: must not be NULL in bookkeeping mode");
    if (id < 0 || id >= s->count)
        return qllm_error_set(QLLM_ERR_NOT_FOUND, "id: block %" PRId32 " not found (the store holds %" PRId64 ")",
                              id, s->count);
    int64_t n = 0;
    if (s->tier[id] == QLLM_TIER_DEVICE) {
        if ((st = reserve_host(s, 1)) != QLLM_OK)
            return st;
        const int32_t dslot = evict_to_host(s, id, out_moves, &n);
        s->dev_free[s->n_dev_free++] = dslot;
    }
    fill_empty(out_moves, n, 1);
    if (out_n_moves != NULL)
        *out_n_moves = n;
    return QLLM_OK;
}

/* Make ids resident in the device tier (see qllm.h). */
qllm_status qllm_blocks_fetch(qllm_blocks_t *store, const int32_t *ids, int64_t n,
                              qllm_block_move *out_moves, int64_t *out_n_moves) {
    qllm_status st;
    if ((st = check_store(store)) != QLLM_OK || (st = check_ids(store, ids, n)) != QLLM_OK)
        return st;
    qllm_blocks_t *s = store;
    if (!s->data_mode && out_moves == NULL && n > 0)
        return qllm_error_set(QLLM_ERR_INVALID_ARG, "out_moves: must not be NULL in bookkeeping mode");

    const uint64_t epoch = ++s->epoch;
    int64_t distinct = 0, misses = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int32_t id = ids[i];
        if (s->mark[id] != epoch) {
            s->mark[id] = epoch;
            distinct++;
            if (s->tier[id] != QLLM_TIER_DEVICE)
                misses++;
        }
    }
    if (distinct > s->dev_slots)
        return qllm_error_set(QLLM_ERR_CAPACITY,
                              "ids: %" PRId64 " distinct blocks requested but the device tier has %" PRId64
                              " slots (nothing moved)",
                              distinct, s->dev_slots);
    const int64_t evictions = misses > s->n_dev_free ? misses - s->n_dev_free : 0;
    if ((st = reserve_host(s, evictions)) != QLLM_OK)
        return st;

    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int32_t id = ids[i];
        if (s->tier[id] == QLLM_TIER_DEVICE)
            continue; /* resident, or fetched earlier in this call */
        int32_t dslot;
        if (s->n_dev_free > 0) {
            dslot = s->dev_free[--s->n_dev_free];
        } else {
            const int32_t victim = lru_victim(s, epoch);
            if (victim < 0)
                return qllm_error_set(QLLM_ERR_INTERNAL, "fetch: no eviction victim");
            dslot = evict_to_host(s, victim, out_moves, &m);
        }
        const int32_t hslot = s->slot[id];
        if (s->data_mode) {
            memcpy(dev_data(s, 0, dslot), host_data(s, 0, hslot), s->block_bytes);
            memcpy(dev_data(s, 1, dslot), host_data(s, 1, hslot), s->block_bytes);
        }
        put_move(out_moves, &m, id, QLLM_TIER_HOST, hslot, QLLM_TIER_DEVICE, dslot);
        host_release(s, hslot);
        s->tier[id] = QLLM_TIER_DEVICE;
        s->slot[id] = dslot;
        s->dev_owner[dslot] = id;
    }
    const uint64_t now = ++s->clock;
    for (int64_t i = 0; i < n; ++i)
        s->last_use[ids[i]] = now;
    fill_empty(out_moves, m, 2 * n);
    if (out_n_moves != NULL)
        *out_n_moves = m;
    return QLLM_OK;
}

/* Copy blocks (any tier) into contiguous K/V (see qllm.h). */
qllm_status qllm_blocks_gather(const qllm_blocks_t *store, const int32_t *ids, int64_t n,
                               qllm_tensor *out_k, qllm_tensor *out_v) {
    qllm_status st;
    if ((st = check_store(store)) != QLLM_OK)
        return st;
    const qllm_blocks_t *s = store;
    if (!s->data_mode)
        return qllm_error_set(QLLM_ERR_INVALID_ARG,
                              "store: gather needs data mode (params.device_k/device_v), this store is bookkeeping only");
    if ((st = check_ids(s, ids, n)) != QLLM_OK)
        return st;
    const qllm_tensor *outs[2] = {out_k, out_v};
    const char *names[2] = {"out_k", "out_v"};
    const int64_t T = s->p.block_size;
    const int64_t rows = n > INT64_MAX / T ? -1 : n * T;
    for (int i = 0; i < 2; ++i) {
        const qllm_tensor *t = outs[i];
        if ((st = qllm_tensor_check(t, names[i], 3, "kv_heads, n * block_size, dim",
                                    QLLM_DTYPE_BIT(s->p.dtype))) != QLLM_OK ||
            (st = qllm_tensor_check_dim(t, names[i], 0, "kv_heads", s->p.n_kv_heads, "n_kv_heads of the store")) != QLLM_OK ||
            (st = qllm_tensor_check_dim(t, names[i], 1, "tokens", rows, "n * block_size")) != QLLM_OK ||
            (st = qllm_tensor_check_dim(t, names[i], 2, "dim", s->p.head_dim, "head_dim of the store")) != QLLM_OK)
            return st;
    }
    for (int64_t i = 0; i < n; ++i) {
        copy_out(s, block_data(s, 0, ids[i]), out_k, i * T);
        copy_out(s, block_data(s, 1, ids[i]), out_v, i * T);
    }
    return QLLM_OK;
}

/* ----------------------------------------------------------- gather_slots */

/* Copy pool slots into a contiguous layout (see qllm.h). */
qllm_status qllm_blocks_gather_slots(const qllm_tensor *pool, const qllm_tensor *slots,
                                     qllm_tensor *out) {
    qllm_status st;
    if ((st = qllm_tensor_check(pool, "pool", 4, "slots, kv_heads, tokens, dim", QLLM_FLOAT_DTYPES)) != QLLM_OK ||
        (st = qllm_tensor_check(slots, "slots", 1, "n", QLLM_DTYPE_BIT(QLLM_DTYPE_I32))) != QLLM_OK ||
        (st = qllm_tensor_check(out, "out", 3, "kv_heads, n * block_size, dim",
                                QLLM_DTYPE_BIT(pool->dtype))) != QLLM_OK)
        return st;
    const int64_t n_slots = pool->shape[0], H = pool->shape[1], T = pool->shape[2], D = pool->shape[3];
    const int64_t n = slots->shape[0];
    const int64_t rows = (T != 0 && n > INT64_MAX / T) ? -1 : n * T;
    if ((st = qllm_tensor_check_dim(out, "out", 0, "kv_heads", H, "n_kv_heads of pool")) != QLLM_OK ||
        (st = qllm_tensor_check_dim(out, "out", 1, "tokens", rows, "n * block_size of slots and pool")) != QLLM_OK ||
        (st = qllm_tensor_check_dim(out, "out", 2, "dim", D, "head_dim of pool")) != QLLM_OK)
        return st;
    const int32_t *sl = (const int32_t *)slots->data;
    for (int64_t i = 0; i < n; ++i) {
        const int32_t v = sl[i * slots->strides[0]];
        if (v < 0 || v >= n_slots)
            return qllm_error_set(QLLM_ERR_INVALID_ARG,
                                  "slots: value %" PRId32 " at index %" PRId64 " out of range [0, %" PRId64 ")",
                                  v, i, n_slots);
    }
    if (H == 0 || T == 0 || D == 0)
        return QLLM_OK;
    const size_t es = qllm_dtype_size(pool->dtype);
    for (int64_t i = 0; i < n; ++i) {
        const int64_t base = (int64_t)sl[i * slots->strides[0]] * pool->strides[0];
        for (int64_t h = 0; h < H; ++h)
            for (int64_t t = 0; t < T; ++t)
                qllm_row_copy(qllm_tensor_ptr(pool, base + h * pool->strides[1] + t * pool->strides[2]),
                              pool->strides[3],
                              qllm_tensor_ptr(out, h * out->strides[0] + (i * T + t) * out->strides[1]),
                              out->strides[2], D, es);
    }
    return QLLM_OK;
}
