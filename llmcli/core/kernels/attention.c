/* Causal attention over a slot KV cache, one query row at a time in one fixed order.
 *
 * The scheduler (engine/scheduler.py) puts decode tokens and prefill chunks of many sequences into
 * one forward. For a sequence's numbers not to depend on what else is in that forward, or on how
 * its prompt was chunked, each query row's result must be a function of that row's query and its
 * own keys and values only. torch's SDPA does not promise that (its CPU kernel tiles queries and
 * keys by the call's shapes), so attention runs here:
 *
 *   - every (token, head) pair is computed as on its own: scores over keys lo..pos of the token's
 *     cache row in key order, max, exp, sum and the weighted sum of values, each in one written
 *     order. The thread, the number of tokens in the call and where a chunk starts do not enter.
 *     The loops of a tile (the query heads of one key head, a few tokens of one row) are only
 *     interleaved, so that each key and value is read once for all of them.
 *   - the AVX2 and portable paths give the same bits: both accumulate dot products in 8 lanes
 *     (lane j takes elements j, j+8, ...) and combine the lanes in one order, exp is one
 *     polynomial written with the same operations in both (vexp.h), and this file is compiled with
 *     -ffp-contract=off (no fused multiply-add anywhere).
 *   - a decode step (attn_decode_f32, which matvec.c's decode_blocks_f32 calls) runs the same row
 *     function after roping in C with separately rounded products, which is exactly what torch's
 *     x * cos + rotate_half(x) * sin computes: a token decoded by the native block step gets the
 *     same bits as in a mixed step through the torch blocks.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "attention.h"
#include "blocks.h" /* block_pool_run */
#include "vexp.h"


static float dot_lanes(const float *x, const float *y, int n) {
    float lanes[LANES];
    int i = 0;
#ifdef VEC_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + LANES <= n; i += LANES) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    if (i == n) { /* combine_lanes' order in registers: (a0+a4, a1+a5, a2+a6, a3+a7), then halves, then the two */
        __m128 quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
    }
    _mm256_storeu_ps(lanes, acc);
#else
    for (int j = 0; j < LANES; j++) lanes[j] = 0.0f;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) lanes[j] = lanes[j] + x[i + j] * y[i + j];
#endif
    for (int j = 0; i < n; i++, j++) lanes[j] = lanes[j] + x[i] * y[i];
    return combine_lanes(lanes);
}

/* a[i] = exp(a[i] - top) for i < n; returns their sum (8 lanes, combined in one order) */
static float softmax_numerators(float *a, int n, float top) {
    float lanes[LANES];
    int i = 0;
#ifdef VEC_AVX2
    __m256 sum = _mm256_setzero_ps(), t = _mm256_set1_ps(top);
    for (; i + LANES <= n; i += LANES) {
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(a + i), t));
        _mm256_storeu_ps(a + i, e);
        sum = _mm256_add_ps(sum, e);
    }
    _mm256_storeu_ps(lanes, sum);
#else
    for (int j = 0; j < LANES; j++) lanes[j] = 0.0f;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) lanes[j] = lanes[j] + (a[i + j] = exp_scalar(a[i + j] - top));
#endif
    for (int j = 0; i < n; i++, j++) lanes[j] = lanes[j] + (a[i] = exp_scalar(a[i] - top));
    return combine_lanes(lanes);
}

/* acc[d] += p * v[d]: element by element (no reduction), so both paths round alike */
static void axpy(float *acc, float p, const float *v, int D) {
    int i = 0;
#ifdef VEC_AVX2
    __m256 pv = _mm256_set1_ps(p);
    for (; i + LANES <= D; i += LANES) _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), _mm256_mul_ps(pv, _mm256_loadu_ps(v + i))));
#endif
    for (; i < D; i++) acc[i] = acc[i] + p * v[i];
}

/* A tile: the `nqt` queries that read the same keys, the query heads of one key head for up to
 * TILE_TOKENS consecutive tokens of one cache row. Each query is computed exactly as on its own:
 * scores over its keys lo..hi in key order, max, exp and sum, the weighted sum of values in key
 * order; only the loops are interleaved, so that every key and value is read once per tile. */
#define TILE_TOKENS 4

typedef struct {
    const float *q; /* the query, D values */
    float *out;     /* its output, D values */
    float *scores;  /* its scratch, hi - lo values */
    int64_t lo, hi; /* its keys */
    float top, total;
} Query;

static void attend_tile(Query *qs, int nqt, const float *kh, const float *vh, int64_t ss, int D, float scale) {
    int64_t lo = qs[0].lo, hi = qs[0].hi;
    for (int j = 0; j < nqt; j++) {
        lo = qs[j].lo < lo ? qs[j].lo : lo;
        hi = qs[j].hi > hi ? qs[j].hi : hi;
        qs[j].top = -INFINITY;
    }
    for (int64_t s = lo; s < hi; s++) {
        const float *k = kh + s * ss;
        for (int j = 0; j < nqt; j++) {
            Query *p = &qs[j];
            if (s < p->lo || s >= p->hi) continue;
            float score = dot_lanes(p->q, k, D) * scale;
            p->scores[s - p->lo] = score;
            p->top = score > p->top ? score : p->top;
        }
    }
    for (int j = 0; j < nqt; j++) {
        qs[j].total = softmax_numerators(qs[j].scores, (int)(qs[j].hi - qs[j].lo), qs[j].top);
        for (int i = 0; i < D; i++) qs[j].out[i] = 0.0f;
    }
    for (int64_t s = lo; s < hi; s++) {
        const float *v = vh + s * ss;
        for (int j = 0; j < nqt; j++)
            if (s >= qs[j].lo && s < qs[j].hi) axpy(qs[j].out, qs[j].scores[s - qs[j].lo], v, D);
    }
    for (int j = 0; j < nqt; j++) {
        float inv = 1.0f / qs[j].total;
        for (int i = 0; i < D; i++) qs[j].out[i] = qs[j].out[i] * inv;
    }
}

/* one call's tiles as tasks: on blocks.c's pool for a decode step, on OpenMP's team for a prompt
 * (attn_tokens_f32 says why); scratch per worker */
typedef struct {
    const float *q;
    const int64_t *row, *pos;
    const float *kc, *vc;
    int64_t sb, sh, ss;
    int nq, nk, D, window;
    float scale;
    float *out;
    const int *first; /* token runs: up to TILE_TOKENS consecutive tokens of one row start at first[r] */
    int group;
    int64_t longest;
    int per_tile;
    float *scores; /* per worker: longest x per_tile */
    Query *qs;     /* per worker: per_tile */
} AttnJob;

static void attend_task(void *ctx, int tile, int worker) {
    const AttnJob *j = (const AttnJob *)ctx;
    float *scores = j->scores + (size_t)worker * j->longest * j->per_tile;
    Query *qs = j->qs + (size_t)worker * j->per_tile;
    int r = tile / j->nk, g = tile % j->nk, nqt = 0;
    int64_t b = j->row ? j->row[j->first[r]] : j->first[r];
    for (int t = j->first[r]; t < j->first[r + 1]; t++) {
        int64_t hi = j->pos[t] + 1, lo = (j->window > 0 && hi > j->window) ? hi - j->window : 0;
        for (int h = g * j->group; h < (g + 1) * j->group; h++, nqt++) {
            size_t at = ((size_t)t * j->nq + h) * j->D;
            qs[nqt] = (Query){j->q + at, j->out + at, scores + (size_t)nqt * j->longest, lo, hi, 0.0f, 0.0f};
        }
    }
    attend_tile(qs, nqt, j->kc + b * j->sb + g * j->sh, j->vc + b * j->sb + g * j->sh, j->ss, j->D, j->scale);
}

int attn_tokens_f32(const float *q, const int64_t *row, const int64_t *pos, const float *kc, const float *vc, int64_t sb, int64_t sh, int64_t ss,
                    int N, int nq, int nk, int D, int window, float scale, float *out) {
    if (N <= 0) return 0;
    int64_t longest = 1;
    for (int i = 0; i < N; i++) {
        int64_t span = pos[i] + 1;
        if (window > 0 && span > window) span = window;
        longest = span > longest ? span : longest;
    }
    if (!(scale > 0.0f)) scale = 1.0f / sqrtf((float)D);
    /* token runs: up to TILE_TOKENS consecutive tokens of one row start at first[r] */
    int *first = (int *)malloc(sizeof(int) * ((size_t)N + 1));
    if (first == NULL) return -1;
    int runs = 0;
    for (int t = 0; t < N; t++)
        if (t == 0 || t - first[runs - 1] == TILE_TOKENS || (row ? row[t] != row[t - 1] : 1)) first[runs++] = t;
    first[runs] = N;
    const int threads = block_threads();
    AttnJob job = {q, row, pos, kc, vc, sb, sh, ss, nq, nk, D, window, scale, out, first, nq / nk, longest, TILE_TOKENS * (nq / nk), NULL, NULL};
    job.scores = (float *)malloc(sizeof(float) * (size_t)threads * longest * job.per_tile);
    job.qs = (Query *)malloc(sizeof(Query) * (size_t)threads * job.per_tile);
    const int failed = job.scores == NULL || job.qs == NULL;
    /* tile t = (run t / nk, key head t % nk). A decode step's few tiles go to the pool, which a step's
     * products use too: an OpenMP team here would spin beside the pool's helpers on the same cores
     * (SmolLM2 decoded 82 tokens/s with it, 130 with neither waiting on the other). A prompt's tiles
     * go round robin to OpenMP's team: a causal prefill's later tiles read more keys, so contiguous
     * halves would leave one thread most of the work. */
    const int tiles = runs * nk;
    if (!failed && (N <= BLOCK_POOL_MAX_ROWS || tiles == 1)) {
        block_pool_run(tiles, threads, attend_task, &job);
    } else if (!failed) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static, 1) num_threads(threads)
        for (int tile = 0; tile < tiles; tile++) attend_task(&job, tile, omp_get_thread_num());
#else
        for (int tile = 0; tile < tiles; tile++) attend_task(&job, tile, 0);
#endif
    }
    free(job.scores);
    free(job.qs);
    free(first);
    return failed ? -1 : 0;
}

/* rotate-half rope of one head (HF layout: cos/sin hold the frequencies twice), each product
 * rounded on its own as torch's x * cos + rotate_half(x) * sin rounds it */
static void rope_head(const float *x, const float *cos, const float *sin, int D, float *out) {
    int half = D / 2;
    for (int i = 0; i < half; i++) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    for (int i = half; i < D; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

int attn_rope_tokens_f32(const float *qk, int64_t qk_stride, const float *v, int64_t v_stride, const float *cos, const float *sin, const int64_t *row,
                         const int64_t *pos, float *kc, float *vc, int64_t sb, int64_t sh, int64_t ss, int N, int nq, int nk, int D, int window, float scale,
                         float *out) {
    float *q = (float *)malloc(sizeof(float) * ((size_t)N * nq * D + 1));
    if (q == NULL) return -1;
    for (int t = 0; t < N; t++) {
        const float *x = qk + t * qk_stride, *vt = v + t * v_stride;
        const float *cb = cos + (size_t)t * D, *sn = sin + (size_t)t * D;
        int64_t at = (row ? row[t] : t) * sb + pos[t] * ss;
        for (int h = 0; h < nq; h++) rope_head(x + (size_t)h * D, cb, sn, D, q + ((size_t)t * nq + h) * D);
        for (int h = 0; h < nk; h++) {
            rope_head(x + (size_t)(nq + h) * D, cb, sn, D, kc + at + h * sh);
            memcpy(vc + at + h * sh, vt + (size_t)h * D, sizeof(float) * (size_t)D);
        }
    }
    int status = attn_tokens_f32(q, row, pos, kc, vc, sb, sh, ss, N, nq, nk, D, window, scale, out);
    free(q);
    return status;
}

int attn_decode_f32(const float *qkv, const float *cos, const float *sin, const int64_t *pos, float *kc, float *vc, int64_t sb, int64_t sh, int64_t ss,
                    int B, int nq, int nk, int D, int window, float *out) {
    int64_t heads = nq + 2 * nk;
    return attn_rope_tokens_f32(qkv, heads * D, qkv + (nq + nk) * (size_t)D, heads * D, cos, sin, NULL, pos, kc, vc, sb, sh, ss, B, nq, nk, D, window, 0.0f, out);
}
