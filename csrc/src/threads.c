/*
 * threads.c -- thread-count setting and a minimal fork/join parallel-for.
 *
 * No pool is kept alive between calls: a call that is worth threading spawns
 * its workers, runs one chunk itself and joins them all before returning.
 * The only global state is the requested thread count (an atomic).
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "qllm_internal.h"

/* Requested thread count; 0 means "the default". */
static atomic_int g_num_threads = 0;

static int default_num_threads(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1)
        n = 1;
    if (n > QLLM_MAX_THREADS)
        n = QLLM_MAX_THREADS;
    return (int)n;
}

/* Set the number of worker threads a call may use (n <= 0: default; values
 * above QLLM_MAX_THREADS are clamped to it). */
void qllm_set_num_threads(int n) {
    if (n < 0)
        n = 0;
    if (n > QLLM_MAX_THREADS)
        n = QLLM_MAX_THREADS;
    atomic_store(&g_num_threads, n);
}

/* Number of worker threads a call may use (the default when unset). */
int qllm_get_num_threads(void) {
    int n = atomic_load(&g_num_threads);
    return n > 0 ? n : default_num_threads();
}

typedef struct {
    qllm_range_fn fn;
    void *ctx;
    int64_t begin, end;
    void *scratch;
    int chunk;
} par_job;

static void *par_worker(void *arg) {
    par_job *job = (par_job *)arg;
    job->fn(job->ctx, job->begin, job->end, job->scratch, job->chunk);
    return NULL;
}

/* Run fn over [0, n) in contiguous chunks, threaded when the work is large. */
qllm_status qllm_parallel_for(int64_t n, double work, size_t scratch_bytes, qllm_range_fn fn,
                              void *ctx, int *out_chunks) {
    int chunks = 1;
    if (n > 1 && work >= QLLM_PARALLEL_MIN_WORK) {
        /* one chunk per thread, but no chunk below a quarter of the threshold:
         * a thread costs tens of microseconds to start */
        const double by_work = work / (QLLM_PARALLEL_MIN_WORK / 4);
        int64_t c = qllm_get_num_threads();
        if (c > n)
            c = n;
        if ((double)c > by_work)
            c = (int64_t)by_work;
        chunks = c > 1 ? (int)c : 1;
    }
    if (out_chunks != NULL)
        *out_chunks = n > 0 ? chunks : 0;
    if (n <= 0)
        return QLLM_OK;

    /* Scratch per chunk, each aligned to 64 bytes. */
    size_t stride = (scratch_bytes + 63u) & ~(size_t)63u;
    char *scratch = NULL;
    if (stride > 0) {
        scratch = (char *)qllm_alloc_array(chunks, stride);
        if (scratch == NULL)
            return qllm_error_set(QLLM_ERR_NOMEM,
                                  "out of memory: %d x %zu bytes of scratch", chunks, scratch_bytes);
    }

    if (chunks == 1) {
        fn(ctx, 0, n, scratch, 0);
        free(scratch);
        return QLLM_OK;
    }

    par_job jobs[QLLM_MAX_THREADS];
    pthread_t tids[QLLM_MAX_THREADS];
    int started[QLLM_MAX_THREADS];
    const int64_t base = n / chunks, extra = n % chunks;
    for (int c = 0; c < chunks; ++c) {
        jobs[c].fn = fn;
        jobs[c].ctx = ctx;
        jobs[c].begin = c * base + (c < extra ? c : extra);
        jobs[c].end = jobs[c].begin + base + (c < extra ? 1 : 0);
        jobs[c].scratch = scratch != NULL ? scratch + (size_t)c * stride : NULL;
        jobs[c].chunk = c;
        started[c] = 0;
    }
    for (int c = 1; c < chunks; ++c)
        started[c] = pthread_create(&tids[c], NULL, par_worker, &jobs[c]) == 0;
    par_worker(&jobs[0]);
    for (int c = 1; c < chunks; ++c) {
        if (started[c])
            pthread_join(tids[c], NULL);
        else
            par_worker(&jobs[c]); /* could not start a thread: run it here */
    }
    free(scratch);
    return QLLM_OK;
}
