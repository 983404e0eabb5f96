/* Activations and GPT-2's LayerNorm, in one written order on every ISA.
 *
 * Gemma 3's GeGLU runs gelu with the tanh approximation on the gate. torch computes its tanh with
 * the vector library of the ISA it dispatches to (AVX-512, AVX2 or none), so the last bits of
 * every MLP output depended on the machine, and a quantized model's 8-bit activation rounding
 * carries such bits into different answers. Here it is exp from vexp.h, the same operations in
 * the AVX2 and portable paths, compiled with -ffp-contract=off.
 *
 * gelu_tanh(x) = x / 2 (1 + tanh(y)), y = sqrt(2 / pi) (x + 0.044715 x^3), is written
 * x / (1 + exp(-2 y)): the same function, without the cancellation of 1 + tanh(y) for y < 0.
 * GPT-2's LayerNorm sums in 8 lanes (lane j takes elements j, j+8, ...) combined in one order,
 * mean first, then the squared deviations from it, as the AVX2 and portable paths both do.
 */
#include <math.h>
#include <stdint.h>

#include "blocks.h" /* block_rows_run: the task pool for a decode step, OpenMP for a prompt */
#include "vexp.h"

#define GELU_2C 1.5957691216057308f /* 2 sqrt(2 / pi) */
#define GELU_A 0.044715f

static inline float gelu_tanh_scalar(float x) {
    float y = (x * x) * (x * GELU_A) + x; /* x + 0.044715 x^3 */
    return x / (1.0f + exp_scalar(-(y * GELU_2C)));
}

#ifdef VEC_AVX2
static inline __m256 gelu_tanh_avx2(__m256 x) {
    const __m256 a = _mm256_set1_ps(GELU_A), c = _mm256_set1_ps(GELU_2C);
    __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_mul_ps(x, a)), x);
    __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(y, c)));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}
#endif

/* gate_up (M, 2I) = [gate | up] -> out (M, I) = gelu_tanh(gate) * up; up == NULL: out = gelu_tanh(gate), gate (M, I) */
static void gelu_tanh_row(const float *g, const float *u, float *o, int I) {
    int i = 0;
#ifdef VEC_AVX2
    for (; i + LANES <= I; i += LANES) {
        __m256 h = gelu_tanh_avx2(_mm256_loadu_ps(g + i));
        _mm256_storeu_ps(o + i, u ? _mm256_mul_ps(h, _mm256_loadu_ps(u + i)) : h);
    }
#endif
    for (; i < I; i++) o[i] = u ? gelu_tanh_scalar(g[i]) * u[i] : gelu_tanh_scalar(g[i]);
}

/* the arguments of a row-wise op (block_rows_run): out row m from in row m */
typedef struct {
    const float *in, *w, *b;
    float *out;
    int in_ld, out_ld, n;
    float eps;
} RowJob;

static void gelu_tanh_mul_at(void *ctx, int m) {
    const RowJob *j = (const RowJob *)ctx;
    const float *g = j->in + (size_t)m * j->in_ld;
    gelu_tanh_row(g, g + j->n, j->out + (size_t)m * j->out_ld, j->n);
}

static void gelu_tanh_at(void *ctx, int m) {
    const RowJob *j = (const RowJob *)ctx;
    gelu_tanh_row(j->in + (size_t)m * j->in_ld, NULL, j->out + (size_t)m * j->out_ld, j->n);
}

void gelu_tanh_mul_f32(const float *gate_up, float *out, int M, int I) {
    RowJob job = {gate_up, NULL, NULL, out, 2 * I, I, I, 0.0f};
    block_rows_run(M, I, gelu_tanh_mul_at, &job);
}

/* x (M, I) -> out (M, I) = gelu_tanh(x), GPT-2's MLP activation */
void gelu_tanh_f32(const float *x, float *out, int M, int I) {
    RowJob job = {x, NULL, NULL, out, I, I, I, 0.0f};
    block_rows_run(M, I, gelu_tanh_at, &job);
}

/* the sum of a[i] - shift (squared when square) over i < n, in 8 lanes combined in one order */
static float sum_lanes(const float *a, int n, float shift, int square) {
    float lanes[LANES];
    int i = 0;
#ifdef VEC_AVX2
    __m256 acc = _mm256_setzero_ps(), s = _mm256_set1_ps(shift);
    for (; i + LANES <= n; i += LANES) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(a + i), s);
        acc = _mm256_add_ps(acc, square ? _mm256_mul_ps(d, d) : d);
    }
    _mm256_storeu_ps(lanes, acc);
#else
    for (int j = 0; j < LANES; j++) lanes[j] = 0.0f;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            float d = a[i + j] - shift;
            lanes[j] = lanes[j] + (square ? d * d : d);
        }
#endif
    for (int j = 0; i < n; i++, j++) {
        float d = a[i] - shift;
        lanes[j] = lanes[j] + (square ? d * d : d);
    }
    return combine_lanes(lanes);
}

static void layer_norm_at(void *ctx, int m) {
    const RowJob *j = (const RowJob *)ctx;
    const int K = j->n;
    const float *xm = j->in + (size_t)m * K;
    float *om = j->out + (size_t)m * K;
    float mean = sum_lanes(xm, K, 0.0f, 0) / (float)K;
    float rstd = 1.0f / sqrtf(sum_lanes(xm, K, mean, 1) / (float)K + j->eps);
    for (int k = 0; k < K; k++) om[k] = (xm[k] - mean) * rstd * j->w[k] + j->b[k];
}

/* out[m] = (x[m] - mean) / sqrt(var + eps) * w + b, the biased variance, as torch's LayerNorm */
void layer_norm_f32(const float *x, const float *w, const float *b, float *out, int M, int K, float eps) {
    RowJob job = {x, w, b, out, K, K, K, eps};
    block_rows_run(M, K, layer_norm_at, &job);
}
