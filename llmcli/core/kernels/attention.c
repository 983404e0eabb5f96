/* Causal attention over a slot KV cache, one query row at a time in one fixed order.
 *
 * The scheduler (engine/scheduler.py) puts decode tokens and prefill chunks of many sequences into
 * one forward. For a sequence's numbers not to depend on what else is in that forward, or on how
 * its prompt was chunked, each query row's result must be a function of that row's query and its
 * own keys and values only. torch's SDPA does not promise that (its CPU kernel tiles queries and
 * keys by the call's shapes), so attention runs here:
 *
 *   - every (token, head) pair is computed on its own: scores over keys lo..pos of the token's
 *     cache row in key order, max, exp, sum and the weighted sum of values, each in one written
 *     order. The thread, the number of tokens in the call and where a chunk starts do not enter.
 *   - the AVX2 and portable paths give the same bits: both accumulate dot products in 8 lanes
 *     (lane j takes elements j, j+8, ...) and combine the lanes in one order, exp is one
 *     polynomial written with the same operations in both, and this file is compiled with
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
#include <omp.h>

#include "attention.h"

#if defined(__AVX2__) && !defined(LLMCLI_PORTABLE)
#include <immintrin.h>
#define ATTN_AVX2 1
#endif

int matvec_threads(void); /* matvec.c: --threads, shared by every parallel region */

#define LANES 8

/* the 8 lane sums combined in one order, the same in both paths */
static inline float combine_lanes(const float *a) { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }

static float dot_lanes(const float *x, const float *y, int n) {
    float lanes[LANES];
    int i = 0;
#ifdef ATTN_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + LANES <= n; i += LANES) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    _mm256_storeu_ps(lanes, acc);
#else
    for (int j = 0; j < LANES; j++) lanes[j] = 0.0f;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) lanes[j] = lanes[j] + x[i + j] * y[i + j];
#endif
    for (int j = 0; i < n; i++, j++) lanes[j] = lanes[j] + x[i] * y[i];
    return combine_lanes(lanes);
}

/* exp(x) for x <= 0 (scores minus their max): x = n ln2 + f, |f| <= ln2 / 2, a degree-6
 * polynomial for exp(f) (Cephes' expf coefficients), times 2^n built from its bits. Inputs below
 * -87 give exp(-87) ~ 1.6e-38, which adds nothing next to the max's 1. Relative error ~2e-7. */
#define EXP_LOW -87.0f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_ROUND 12582912.0f /* 1.5 * 2^23: adding and subtracting it rounds to the nearest integer */
static const float EXP_P[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

static inline float exp_scalar(float x) {
    x = x < EXP_LOW ? EXP_LOW : x;
    float n = (x * EXP_LOG2E + EXP_ROUND) - EXP_ROUND;
    float f = x - n * EXP_LN2_HI;
    f = f - n * EXP_LN2_LO;
    float p = EXP_P[0];
    for (int i = 1; i < 6; i++) p = p * f + EXP_P[i];
    p = p * (f * f) + (f + 1.0f);
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#ifdef ATTN_AVX2
static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(EXP_LOW));
    const __m256 round = _mm256_set1_ps(EXP_ROUND);
    __m256 n = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)), round), round);
    __m256 f = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(EXP_LN2_HI)));
    f = _mm256_sub_ps(f, _mm256_mul_ps(n, _mm256_set1_ps(EXP_LN2_LO)));
    __m256 p = _mm256_set1_ps(EXP_P[0]);
    for (int i = 1; i < 6; i++) p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(EXP_P[i]));
    p = _mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(f, f)), _mm256_add_ps(f, _mm256_set1_ps(1.0f)));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

/* a[i] = exp(a[i] - top) for i < n; returns their sum (8 lanes, combined in one order) */
static float softmax_numerators(float *a, int n, float top) {
    float lanes[LANES];
    int i = 0;
#ifdef ATTN_AVX2
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
#ifdef ATTN_AVX2
    __m256 pv = _mm256_set1_ps(p);
    for (; i + LANES <= D; i += LANES) _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), _mm256_mul_ps(pv, _mm256_loadu_ps(v + i))));
#endif
    for (; i < D; i++) acc[i] = acc[i] + p * v[i];
}

/* One query row: out = softmax(scale * q . k[lo..hi)) v[lo..hi); scores: scratch of hi - lo */
static void attend_row(const float *q, const float *kh, const float *vh, int64_t ss, int64_t lo, int64_t hi, int D, float scale, float *scores,
                       float *out) {
    float top = -INFINITY;
    for (int64_t s = lo; s < hi; s++) {
        float score = dot_lanes(q, kh + s * ss, D) * scale;
        scores[s - lo] = score;
        top = score > top ? score : top;
    }
    float total = softmax_numerators(scores, (int)(hi - lo), top);
    for (int i = 0; i < D; i++) out[i] = 0.0f;
    for (int64_t s = lo; s < hi; s++) axpy(out, scores[s - lo], vh + s * ss, D);
    float inv = 1.0f / total;
    for (int i = 0; i < D; i++) out[i] = out[i] * inv;
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
    int group = nq / nk, failed = 0;
    int pairs = N * nq;
#pragma omp parallel num_threads(matvec_threads()) reduction(| : failed) if (pairs > 1)
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)longest);
        const int mine = scores == NULL; /* every thread runs the loop below: no thread may skip the worksharing */
        failed |= mine;
#pragma omp for schedule(static)
        for (int th = 0; th < pairs; th++) {
            if (mine) continue;
            int t = th / nq, h = th % nq, g = h / group;
            int64_t b = row ? row[t] : t;
            int64_t hi = pos[t] + 1, lo = (window > 0 && hi > window) ? hi - window : 0;
            attend_row(q + (size_t)th * D, kc + b * sb + g * sh, vc + b * sb + g * sh, ss, lo, hi, D, scale, scores, out + (size_t)th * D);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* rotate-half rope of one head (HF layout: cos/sin hold the frequencies twice), each product
 * rounded on its own as torch's x * cos + rotate_half(x) * sin rounds it */
static void rope_head(const float *x, const float *cos, const float *sin, int D, float *out) {
    int half = D / 2;
    for (int i = 0; i < half; i++) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    for (int i = half; i < D; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

int attn_decode_f32(const float *qkv, const float *cos, const float *sin, const int64_t *pos, float *kc, float *vc, int64_t sb, int64_t sh, int64_t ss,
                    int B, int nq, int nk, int D, int window, float *out) {
    int heads = nq + 2 * nk;
    float *q = (float *)malloc(sizeof(float) * ((size_t)B * nq * D + 1));
    if (q == NULL) return -1;
    for (int b = 0; b < B; b++) {
        const float *x = qkv + (size_t)b * heads * D;
        const float *cb = cos + (size_t)b * D, *sn = sin + (size_t)b * D;
        for (int h = 0; h < nq; h++) rope_head(x + (size_t)h * D, cb, sn, D, q + ((size_t)b * nq + h) * D);
        for (int h = 0; h < nk; h++) {
            rope_head(x + (size_t)(nq + h) * D, cb, sn, D, kc + b * sb + h * sh + pos[b] * ss);
            memcpy(vc + b * sb + h * sh + pos[b] * ss, x + (size_t)(nq + nk + h) * D, sizeof(float) * (size_t)D);
        }
    }
    int status = attn_tokens_f32(q, NULL, pos, kc, vc, sb, sh, ss, B, nq, nk, D, window, 0.0f, out);
    free(q);
    return status;
}
