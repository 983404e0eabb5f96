/* Matrix-vector kernels for the decode path: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]).
 *
 * Decoding one token per sequence reads every weight once per step, so its speed limit is
 * memory bandwidth. torch's sgemm for a handful of rows reaches less than half of it on the
 * CPUs we measured (benchmarks/README.md); these loops stream each weight row once for all M
 * input rows and split the rows across torch's own OpenMP threads (the library links the
 * libgomp that torch has already loaded, so there is one thread pool, not two).
 *
 * Every output element is one dot product in a fixed order whatever M is: a sequence gets
 * bit-identical results alone or in a batch.
 *
 * q8 weights are llama.cpp's Q8_0 layout split in two arrays: int8 values [N, K] and one float
 * scale per block of 32 consecutive values of a row [N, K/32]. K must be a multiple of 32.
 *
 * AVX-512 intrinsics where the build machine has it (-march=native); elsewhere portable C whose
 * `omp simd` loops the compiler vectorizes for the machine (AVX2, NEON). Built here with AVX-512
 * turned off, the portable paths still stream the weights about twice as fast as torch's sgemm
 * for one row; tests run both builds.
 */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define ROWS 4 /* weight rows per inner block: independent accumulators, and x loaded once for 4 rows */
#define QBLOCK 32

int matvec_simd_width(void) {
#ifdef __AVX512F__
    return 16;
#else
    return 1;
#endif
}

#ifdef __AVX512F__
/* The sum of a vector's 16 lanes in one fixed order: halves, quarters, then (q0+q2)+(q1+q3).
 * hsum16 below sums 16 vectors at once in exactly this order, so a dot product has the same
 * bits whichever path computed it. */
static inline float hsum(__m512 v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    __m128 s = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

/* out[i] = hsum(v[i]) for 16 vectors, with 30 shuffles and 30 adds instead of 16 separate sums */
static inline void hsum16(const __m512 *v, float *out) {
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88), _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44), _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xEE));
    __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
    float lanes[16];
    _mm512_storeu_ps(lanes, r);
    for (int j = 0; j < 4; j++)
        for (int k = 0; k < 4; k++) out[j + 4 * k] = lanes[4 * j + k]; /* lane 4j + k holds vector j + 4k */
}
#endif

/* out[r] = dot(x, w_r) for the 4 consecutive rows w_0..w_3 (row stride K) */
static void dot4_f32(const float *restrict x, const float *restrict w, int K, float *restrict out) {
    const float *w0 = w, *w1 = w + K, *w2 = w + 2 * (size_t)K, *w3 = w + 3 * (size_t)K;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv = _mm512_loadu_ps(x + k);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), xv, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + k), xv, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + k), xv, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + k), xv, a3);
    }
    if (k < K) {
        __mmask16 tail = (__mmask16)((1u << (K - k)) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(tail, x + k);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w0 + k), xv, a0);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w1 + k), xv, a1);
        a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w2 + k), xv, a2);
        a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w3 + k), xv, a3);
    }
    out[0] = hsum(a0);
    out[1] = hsum(a1);
    out[2] = hsum(a2);
    out[3] = hsum(a3);
#else
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int k = 0; k < K; k++) {
        float xv = x[k];
        a0 += w0[k] * xv; a1 += w1[k] * xv; a2 += w2[k] * xv; a3 += w3[k] * xv;
    }
    out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3;
#endif
}

static float dot1_f32(const float *restrict x, const float *restrict w, int K) {
#ifdef __AVX512F__
    __m512 a = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a);
    if (k < K) {
        __mmask16 tail = (__mmask16)((1u << (K - k)) - 1);
        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w + k), _mm512_maskz_loadu_ps(tail, x + k), a);
    }
    return hsum(a);
#else
    float a = 0.0f;
#pragma omp simd reduction(+ : a)
    for (int k = 0; k < K; k++) a += w[k] * x[k];
    return a;
#endif
}

#ifdef __AVX512F__
/* 4 weight rows x 4 input rows: 16 accumulators, 8 loads per 16 FMAs (dot4_f32 needs 5 per 4).
 * Each accumulator sums the same products in the same order as dot4_f32, so the results are
 * bit-identical to computing the 4 input rows one by one. */
static void dot4x4_f32(const float *restrict x, const float *restrict w, int K, float *restrict out /* [4 x][4 w] */, const float *prefetch) {
    __m512 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv[4];
        if (prefetch) /* the next weight rows, while these are computed: memory and arithmetic overlap */
            for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(prefetch + (size_t)r * K + k), _MM_HINT_T0);
        for (int r = 0; r < 4; r++) wv[r] = _mm512_loadu_ps(w + (size_t)r * K + k);
        for (int i = 0; i < 4; i++) {
            __m512 xv = _mm512_loadu_ps(x + (size_t)i * K + k);
            for (int r = 0; r < 4; r++) acc[i][r] = _mm512_fmadd_ps(wv[r], xv, acc[i][r]);
        }
    }
    if (k < K) {
        __mmask16 tail = (__mmask16)((1u << (K - k)) - 1);
        __m512 wv[4];
        for (int r = 0; r < 4; r++) wv[r] = _mm512_maskz_loadu_ps(tail, w + (size_t)r * K + k);
        for (int i = 0; i < 4; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(tail, x + (size_t)i * K + k);
            for (int r = 0; r < 4; r++) acc[i][r] = _mm512_fmadd_ps(wv[r], xv, acc[i][r]);
        }
    }
    hsum16(&acc[0][0], out); /* acc[i][r] is vector 4i + r: out[i * 4 + r] */
}
#endif

/* weight rows n0..n0+count-1 (count <= ROWS; w points at row n0, row stride K) against all M rows of x */
static void rows_f32(const float *x, const float *w, const float *bias, float *y, int M, int N, int K, int n0, int count) {
    int m = 0;
#ifdef __AVX512F__
    if (count == ROWS)
        for (; m + 4 <= M; m += 4) {
            float out[16];
            dot4x4_f32(x + (size_t)m * K, w, K, out, m == 0 && n0 + 2 * ROWS <= N ? w + (size_t)ROWS * K : NULL);
            for (int i = 0; i < 4; i++)
                for (int r = 0; r < ROWS; r++) y[(size_t)(m + i) * N + n0 + r] = out[i * 4 + r] + (bias ? bias[n0 + r] : 0.0f);
        }
#endif
    for (; m < M; m++) {
        const float *xm = x + (size_t)m * K;
        float *ym = y + (size_t)m * N + n0;
        if (count == ROWS) {
            float out[ROWS];
            dot4_f32(xm, w, K, out);
            for (int r = 0; r < ROWS; r++) ym[r] = out[r] + (bias ? bias[n0 + r] : 0.0f);
        } else {
            for (int r = 0; r < count; r++) ym[r] = dot1_f32(xm, w + (size_t)r * K, K) + (bias ? bias[n0 + r] : 0.0f);
        }
    }
}

void matvec_f32(const float *x, const float *W, const float *bias, float *y, int M, int N, int K) {
    int groups = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static)
    for (int g = 0; g < groups; g++) {
        int n0 = g * ROWS;
        rows_f32(x, W + (size_t)n0 * K, bias, y, M, N, K, n0, N - n0 < ROWS ? N - n0 : ROWS);
    }
}

/* One q8 row against one activation row, without a dequantized copy (the M = 1 case). */
static float dot_q8(const float *restrict x, const int8_t *restrict q, const float *restrict s, int K) {
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (int b = 0; b < K / QBLOCK; b++) {
        const int8_t *qb = q + b * QBLOCK;
        const float *xb = x + b * QBLOCK;
        __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qb)));
        __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qb + 16))));
        __m512 d = _mm512_fmadd_ps(f0, _mm512_loadu_ps(xb), _mm512_mul_ps(f1, _mm512_loadu_ps(xb + 16)));
        acc = _mm512_fmadd_ps(d, _mm512_set1_ps(s[b]), acc);
    }
    return hsum(acc);
#else
    /* lane-parallel over the 32 values of a block, scaled per block; the compiler vectorizes the k loops */
    float lanes[QBLOCK] = {0.0f};
    for (int b = 0; b < K / QBLOCK; b++) {
        const int8_t *qb = q + b * QBLOCK;
        const float *xb = x + b * QBLOCK;
        float scale = s[b];
#pragma omp simd
        for (int k = 0; k < QBLOCK; k++) lanes[k] += (float)qb[k] * xb[k] * scale;
    }
    float acc = 0.0f;
    for (int k = 0; k < QBLOCK; k++) acc += lanes[k];
    return acc;
#endif
}

/* dot_q8 on a row whose int8 values were already converted to float (exactly, unscaled): the same
 * operations in the same order, so it gives dot_q8's bits. For several activation rows the
 * conversion is done once per weight row instead of once per activation row. */
static float dot_q8_converted(const float *restrict x, const float *restrict qf, const float *restrict s, int K) {
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (int b = 0; b < K / QBLOCK; b++) {
        const float *fb = qf + b * QBLOCK;
        const float *xb = x + b * QBLOCK;
        __m512 d = _mm512_fmadd_ps(_mm512_loadu_ps(fb), _mm512_loadu_ps(xb), _mm512_mul_ps(_mm512_loadu_ps(fb + 16), _mm512_loadu_ps(xb + 16)));
        acc = _mm512_fmadd_ps(d, _mm512_set1_ps(s[b]), acc);
    }
    return hsum(acc);
#else
    float lanes[QBLOCK] = {0.0f};
    for (int b = 0; b < K / QBLOCK; b++) {
        const float *fb = qf + b * QBLOCK;
        const float *xb = x + b * QBLOCK;
        float scale = s[b];
#pragma omp simd
        for (int k = 0; k < QBLOCK; k++) lanes[k] += fb[k] * xb[k] * scale;
    }
    float acc = 0.0f;
    for (int k = 0; k < QBLOCK; k++) acc += lanes[k];
    return acc;
#endif
}

void matvec_q8(const float *x, const int8_t *Q, const float *S, const float *bias, float *y, int M, int N, int K) {
    int nb = K / QBLOCK;
    if (M == 1) {
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) y[n] = dot_q8(x, Q + (size_t)n * K, S + (size_t)n * nb, K) + (bias ? bias[n] : 0.0f);
        return;
    }
    /* several rows: convert each weight row once into a thread's buffer (it stays in L1) and reuse
     * it for every m, with dot_q8's own arithmetic: a sequence gets the same bits in any batch */
#pragma omp parallel
    {
        float *buf = (float *)aligned_alloc(64, ((sizeof(float) * (size_t)K + 63) / 64) * 64);
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const int8_t *q = Q + (size_t)n * K;
            for (int k = 0; k < K; k++) buf[k] = (float)q[k];
            for (int m = 0; m < M; m++)
                y[(size_t)m * N + n] = dot_q8_converted(x + (size_t)m * K, buf, S + (size_t)n * nb, K) + (bias ? bias[n] : 0.0f);
        }
        free(buf);
    }
}

/* ------------------------------------------------------------------ the rest of a decode step
 * Small ops that cost torch more in dispatch than in arithmetic at one position per sequence.
 */

/* out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w, the float32 statistics as HF computes them */
void rms_norm_f32(const float *x, const float *w, float *out, int M, int K, float eps) {
#pragma omp parallel for schedule(static) if (M > 8)
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * K;
        float *om = out + (size_t)m * K;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int k = 0; k < K; k++) ss += xm[k] * xm[k];
        float inv = 1.0f / sqrtf(ss / (float)K + eps);
#pragma omp simd
        for (int k = 0; k < K; k++) om[k] = xm[k] * inv * w[k];
    }
}

#ifdef __AVX512F__
/* exp(x) for 16 lanes: x = n ln2 + f with |f| <= ln2 / 2, a degree-6 polynomial for exp(f), then
 * scalef by 2^n (which saturates to 0 and inf by itself). Relative error about 2e-7. */
static inline __m512 exp16(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.9f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, ln2_hi, x);
    f = _mm512_fnmadd_ps(n, ln2_lo, f);
    __m512 p = _mm512_set1_ps(1.3981999507e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

/* a[i] = exp(a[i] - top) for i < n; returns their sum */
static float softmax_numerators(float *a, int n, float top) {
    int i = 0;
    float total = 0.0f;
#ifdef __AVX512F__
    __m512 sum = _mm512_setzero_ps(), t = _mm512_set1_ps(top);
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(a + i), t));
        _mm512_storeu_ps(a + i, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (i < n) {
        __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, a + i), t));
        _mm512_mask_storeu_ps(a + i, tail, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
        i = n;
    }
    total = _mm512_reduce_add_ps(sum);
#endif
    for (; i < n; i++) total += (a[i] = expf(a[i] - top));
    return total;
}

/* gate_up (M, 2I) = [gate | up] -> out (M, I) = silu(gate) * up */
void silu_mul_f32(const float *gate_up, float *out, int M, int I) {
#pragma omp parallel for schedule(static) if (M > 1)
    for (int m = 0; m < M; m++) {
        const float *g = gate_up + (size_t)m * 2 * I, *u = g + I;
        float *o = out + (size_t)m * I;
        int i = 0;
#ifdef __AVX512F__
        for (; i + 16 <= I; i += 16) {
            __m512 gv = _mm512_loadu_ps(g + i);
            __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            _mm512_storeu_ps(o + i, _mm512_mul_ps(silu, _mm512_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* acc += p * v */
static void axpy_f32(float *restrict acc, float p, const float *restrict v, int D) {
    int i = 0;
#ifdef __AVX512F__
    __m512 pv = _mm512_set1_ps(p);
    for (; i + 16 <= D; i += 16) _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + i), _mm512_loadu_ps(acc + i)));
#endif
    for (; i < D; i++) acc[i] += p * v[i];
}

/* rotate-half rope of one head (HF layout: cos/sin hold the frequencies twice) */
static void rope_head(const float *x, const float *cos, const float *sin, int D, float *out) {
    int half = D / 2;
    for (int i = 0; i < half; i++) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    for (int i = half; i < D; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

/* One decode step of attention for B sequences, one new position each.
 *   qkv (B, nq + 2 nk, D): the fused projection's output before rope
 *   cos, sin (B, D): rope at each row's position; pos (B,): that position
 *   kc, vc: the layer's cache for these rows, (B, nk, cap, D) with strides sb, sh, ss (D contiguous)
 *   window: sliding window (keys pos - window + 1 .. pos), 0 for none
 *   out (B, nq * D)
 * Writes the new key (roped) and value into the cache at pos, then attends over keys lo..pos.
 */
void attn_decode_f32(const float *qkv, const float *cos, const float *sin, const int64_t *pos, float *kc, float *vc,
                     int64_t sb, int64_t sh, int64_t ss, int B, int nq, int nk, int D, int window, float *out) {
    int heads = nq + 2 * nk;
    for (int b = 0; b < B; b++) {
        const float *row = qkv + (size_t)b * heads * D;
        for (int h = 0; h < nk; h++) {
            float *kdst = kc + b * sb + h * sh + pos[b] * ss;
            float *vdst = vc + b * sb + h * sh + pos[b] * ss;
            rope_head(row + (size_t)(nq + h) * D, cos + (size_t)b * D, sin + (size_t)b * D, D, kdst);
            for (int i = 0; i < D; i++) vdst[i] = row[(size_t)(nq + nk + h) * D + i];
        }
    }
    int64_t longest = 0;
    for (int b = 0; b < B; b++) longest = pos[b] + 1 > longest ? pos[b] + 1 : longest;
    float scale = 1.0f / sqrtf((float)D);
    int group = nq / nk;
#pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)longest);
        float *q = (float *)malloc(sizeof(float) * (size_t)D);
        float *acc = (float *)malloc(sizeof(float) * (size_t)D);
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * nq; bh++) {
            int b = bh / nq, h = bh % nq, g = h / group;
            int64_t hi = pos[b] + 1, lo = (window > 0 && hi > window) ? hi - window : 0;
            rope_head(qkv + ((size_t)b * heads + h) * D, cos + (size_t)b * D, sin + (size_t)b * D, D, q);
            const float *kh = kc + b * sb + g * sh, *vh = vc + b * sb + g * sh;
            float top = -INFINITY;
            for (int64_t s = lo; s < hi; s++) {
                scores[s - lo] = dot1_f32(q, kh + s * ss, D) * scale;
                top = scores[s - lo] > top ? scores[s - lo] : top;
            }
            float total = softmax_numerators(scores, (int)(hi - lo), top);
            for (int i = 0; i < D; i++) acc[i] = 0.0f;
            for (int64_t s = lo; s < hi; s++) axpy_f32(acc, scores[s - lo] / total, vh + s * ss, D);
            for (int i = 0; i < D; i++) out[(size_t)b * nq * D + (size_t)h * D + i] = acc[i];
        }
        free(scores); free(q); free(acc);
    }
}

/* ------------------------------------------------------------------ a whole decode step
 * Every layer of a Llama-family block at one position per row, in one call: the Python side
 * would otherwise spend longer dispatching ~10 small calls per layer than the arithmetic takes
 * (SmolLM2 in 8 bits reads its weights in about 5 ms per token).
 */

typedef struct {
    int kind;             /* 0: float32 weight [n, k]; 1: Q8_0 (int8 [n, k] + scales [n, k/32]) */
    const void *weight;
    const float *scales;
    const float *bias;    /* NULL for none */
    int n, k;
} Linear;

typedef struct {
    const float *input_norm, *post_norm; /* RMSNorm weights [d] */
    Linear qkv, o, gate_up, down;
} Block;

static void linear_apply(const Linear *lin, const float *x, float *y, int M) {
    if (lin->kind == 1)
        matvec_q8(x, (const int8_t *)lin->weight, lin->scales, lin->bias, y, M, lin->n, lin->k);
    else
        matvec_f32(x, (const float *)lin->weight, lin->bias, y, M, lin->n, lin->k);
}

/* x (B, d): the residual stream, updated in place through every block.
 * kcs[l], vcs[l]: layer l's cache rows (B, nk, cap, D) with strides sb, sh, ss. */
void decode_blocks_f32(const Block *blocks, int L, float *x, int B, int d, float eps, int nq, int nk, int D, int window,
                       const float *cos, const float *sin, const int64_t *pos, float *const *kcs, float *const *vcs,
                       int64_t sb, int64_t sh, int64_t ss) {
    int inter = blocks[0].gate_up.n / 2;
    int qkv_n = (nq + 2 * nk) * D;
    float *normed = (float *)malloc(sizeof(float) * (size_t)B * d);
    float *qkv = (float *)malloc(sizeof(float) * (size_t)B * qkv_n);
    float *att = (float *)malloc(sizeof(float) * (size_t)B * nq * D);
    float *gate_up = (float *)malloc(sizeof(float) * (size_t)B * 2 * inter);
    float *h = (float *)malloc(sizeof(float) * (size_t)B * inter);
    float *delta = (float *)malloc(sizeof(float) * (size_t)B * d);
    for (int l = 0; l < L; l++) {
        const Block *blk = &blocks[l];
        rms_norm_f32(x, blk->input_norm, normed, B, d, eps);
        linear_apply(&blk->qkv, normed, qkv, B);
        attn_decode_f32(qkv, cos, sin, pos, kcs[l], vcs[l], sb, sh, ss, B, nq, nk, D, window, att);
        linear_apply(&blk->o, att, delta, B);
        for (size_t i = 0; i < (size_t)B * d; i++) x[i] += delta[i];
        rms_norm_f32(x, blk->post_norm, normed, B, d, eps);
        linear_apply(&blk->gate_up, normed, gate_up, B);
        silu_mul_f32(gate_up, h, B, inter);
        linear_apply(&blk->down, h, delta, B);
        for (size_t i = 0; i < (size_t)B * d; i++) x[i] += delta[i];
    }
    free(normed); free(qkv); free(att); free(gate_up); free(h); free(delta);
}
