/* exp in float32 and the 8-lane sum order, written once with the same operations for the AVX2
 * and the portable paths, so both give the same bits (the sources that include it are compiled with -ffp-contract=off: no
 * fused multiply-add). Included by attention.c and activations.c; VEC_AVX2 selects the vectors. */
#ifndef LLMCLI_VEXP_H
#define LLMCLI_VEXP_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && !defined(LLMCLI_PORTABLE)
#include <immintrin.h>
#define VEC_AVX2 1
#endif

/* sums in 8 lanes (lane j takes elements j, j+8, ...), combined in this one order in both paths */
#define LANES 8
static inline float combine_lanes(const float *a) { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }

/* exp(x): x = n ln2 + f, |f| <= ln2 / 2, a degree-6 polynomial for exp(f) (Cephes' expf
 * coefficients), times 2^n built from its bits. x is clamped to [-87, 88], where 2^n is a normal
 * float: exp(-87) ~ 1.6e-38 adds nothing next to a softmax's max of 1, exp(88) ~ 1.7e38 makes
 * x / (1 + e) zero in an activation. Relative error ~2e-7. */
#define EXP_LOW -87.0f
#define EXP_HIGH 88.0f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_ROUND 12582912.0f /* 1.5 * 2^23: adding and subtracting it rounds to the nearest integer */
static const float EXP_P[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

static inline float exp_scalar(float x) {
    x = x < EXP_LOW ? EXP_LOW : x > EXP_HIGH ? EXP_HIGH : x;
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

#ifdef VEC_AVX2
static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LOW)), _mm256_set1_ps(EXP_HIGH));
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

#endif
