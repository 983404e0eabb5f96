/* Gated activations that are not silu, in one written order on every ISA.
 *
 * Gemma 3's GeGLU runs gelu with the tanh approximation on the gate. torch computes its tanh with
 * the vector library of the ISA it dispatches to (AVX-512, AVX2 or none), so the last bits of
 * every MLP output depended on the machine, and a quantized model's 8-bit activation rounding
 * carries such bits into different answers. Here it is exp from vexp.h, the same operations in
 * the AVX2 and portable paths, compiled with -ffp-contract=off.
 *
 * gelu_tanh(x) = x / 2 (1 + tanh(y)), y = sqrt(2 / pi) (x + 0.044715 x^3), is written
 * x / (1 + exp(-2 y)): the same function, without the cancellation of 1 + tanh(y) for y < 0.
 */
#include <omp.h>
#include <stdint.h>

#include "vexp.h"

int matvec_threads(void); /* matvec.c: --threads, shared by every parallel region */

#define GELU_2C 1.5957691216057308f /* 2 sqrt(2 / pi) */
#define GELU_A 0.044715f

static inline float gelu_tanh_scalar(float x) {
    float y = (x * x) * (x * GELU_A) + x; /* x + 0.044715 x^3 */
    return x / (1.0f + exp_scalar(-(y * GELU_2C)));
}

/* gate_up (M, 2I) = [gate | up] -> out (M, I) = gelu_tanh(gate) * up */
static void gelu_tanh_mul_row(const float *g, float *o, int I) {
    const float *u = g + I;
    int i = 0;
#ifdef VEC_AVX2
    const __m256 a = _mm256_set1_ps(GELU_A), c = _mm256_set1_ps(GELU_2C), one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; i + 8 <= I; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_mul_ps(x, a)), x);
        __m256 e = exp_avx2(_mm256_sub_ps(zero, _mm256_mul_ps(y, c)));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < I; i++) o[i] = gelu_tanh_scalar(g[i]) * u[i];
}

void gelu_tanh_mul_f32(const float *gate_up, float *out, int M, int I) {
#pragma omp parallel for schedule(static) num_threads(matvec_threads()) if ((int64_t)M * I > 65536)
    for (int m = 0; m < M; m++) gelu_tanh_mul_row(gate_up + (size_t)m * 2 * I, out + (size_t)m * I, I);
}
