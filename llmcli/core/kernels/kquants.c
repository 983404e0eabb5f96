/* The K-quants: Q2_K, Q3_K, Q4_K, Q5_K and Q6_K weights (super-blocks of 256 values) against
 * activations quantized to block_q8_K, as the BlockTypes block_type_q2_K .. block_type_q6_K.
 *
 * Per type: dequantize_row (bit-identical to ggml / gguf-py), quantize_row (byte-identical to
 * llama.cpp's quantize_row_<t>_ref, what llama_model_quantize writes without an importance
 * matrix), vec_dot and tile. quantize_act is one shared quantize_row_q8_K.
 *
 * How a dot product is summed, on every ISA (blocks.h's contract). Every K-quant super-block is
 * 16 groups of 16 values; value v of group g is  d * sc[g] * q[v]  -  dmin * mn[g]  with small
 * integers q, sc, mn (mn = 0 for Q3_K and Q6_K, which have no mins). Against a q8_K block
 * (float dx, int8 a[256], int16 bsums[16] = sums of each group of 16 a) a super-block gives 8
 * exact int32 lanes isum[l] (products in bytes 4l..4l+3 of each chunk of 32 values, times their
 * scale: what AVX2's maddubs + madd leave in lane l) and 8 lanes msum[l] of mins times bsums
 * (the exact partition is written at sb_lanes). The row's float result is 8 float lanes,
 * super-block after super-block, in this order:
 *     acc[l] = acc[l] + (d * dx) * (float)isum[l];
 *     acc[l] = acc[l] - (dmin * dx) * (float)msum[l];    (types with mins only)
 * from acc = 0, then ((acc0+acc4) + (acc2+acc6)) + ((acc1+acc5) + (acc3+acc7)). The integer lanes
 * are exact whatever the order of their terms (at most 256 * 63 * 127 * 128 < 2^31), the float
 * operations are lane-wise the same and compiled with -ffp-contract=off, so the portable, AVX2,
 * AVX-512 and NEON paths give the same bits, and a tile element equals vec_dot of its row pair.
 *
 * Paths: AVX2 (also used by AVX-512 builds: the per-super-block work is 256-bit shaped),
 * NEON (vdotq_s32 with __ARM_FEATURE_DOTPROD, widening multiplies otherwise) on the unpacked
 * super-block, portable C otherwise.
 */
#include "blocks.h"

#include <math.h>
#include <stdbool.h>

#if defined(__AVX2__)
#include <immintrin.h>
#define KQ_AVX2 1
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#define KQ_NEON 1
#endif

#define KQ_MAX(a, b) ((a) > (b) ? (a) : (b))
#define KQ_MIN(a, b) ((a) < (b) ? (a) : (b))
#define KQ_INLINE static inline __attribute__((always_inline))

/* ggml's GROUP_MAX_EPS: below it a group counts as all zero */
#define KQ_GROUP_MAX_EPS 1e-15f

/* round to nearest, ties to even, for |f| < 2^22: the float-add trick ggml uses, so the rounding
 * is the one llama.cpp's quantizers do */
static inline int nearest_int(float f) {
    const float val = f + 12582912.f;
    int i;
    memcpy(&i, &val, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

static inline float kq_half(ggml_half h) {
#if defined(__F16C__)
    return _cvtsh_ss(h); /* exact, like half_to_float */
#else
    return half_to_float(h);
#endif
}

/* ================================================================== q8_K activations */

/* ggml's quantize_row_q8_K_ref: d from the signed value of largest magnitude (the first one),
 * q = nearest(-127/max * x), bsums per 16. Scalar on every ISA, so the rounding is one. An
 * all-zero block gets zero bsums too (ggml leaves them unset; they multiply nothing there). */
static void quantize_row_q8_K(const float *x, void *vy, int K) {
    block_q8_K *y = (block_q8_K *)vy;
    const int nb = K / QK_K;
    for (int i = 0; i < nb; i++, x += QK_K) {
        float max = 0, amax = 0;
        for (int j = 0; j < QK_K; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        if (!amax) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QK_K; j++) {
            const int v = nearest_int(iscale * x[j]);
            y[i].qs[j] = (int8_t)KQ_MIN(127, v);
        }
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) sum += y[i].qs[16 * g + l];
            y[i].bsums[g] = (int16_t)sum;
        }
        y[i].d = 1 / iscale;
    }
}

/* ================================================================== scale unpacking */

/* Q4_K / Q5_K: all 8 scales (bytes 0..7) and 8 mins (bytes 8..15) at once, branch-free */
static inline void scales_mins_k4(const uint8_t *q, uint8_t out[16]) {
    uint32_t u[4];
    memcpy(u, q, 12);
    const uint32_t m6 = 0x3f3f3f3f, m4 = 0x0f0f0f0f, m2 = 0x03030303;
    u[3] = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4); /* mins 4..7 */
    const uint32_t mins03 = u[1] & m6;
    u[1] = (u[2] & m4) | (((u[0] >> 6) & m2) << 4); /* scales 4..7 */
    u[2] = mins03;
    u[0] &= m6; /* scales 0..3 */
    memcpy(out, u, 16);
}

/* Q3_K: 16 scales of 6 bits in 12 bytes (low 4 bits in bytes 0..7, high 2 bits in bytes 8..11),
 * stored with +32; returns them signed */
static inline void scales_q3_K(const uint8_t *s, int8_t out[16]) {
    uint32_t u[4];
    memcpy(u, s, 12);
    const uint32_t m4 = 0x0f0f0f0f, m2 = 0x03030303, hi = u[2];
    u[2] = ((u[0] >> 4) & m4) | (((hi >> 4) & m2) << 4);
    u[3] = ((u[1] >> 4) & m4) | (((hi >> 6) & m2) << 4);
    u[0] = (u[0] & m4) | (((hi >> 0) & m2) << 4);
    u[1] = (u[1] & m4) | (((hi >> 2) & m2) << 4);
    uint8_t b[16];
    memcpy(b, u, 16);
    for (int j = 0; j < 16; j++) out[j] = (int8_t)(b[j] - 32);
}

/* ================================================================== dequantize */

static void dequantize_row_q2_K(const void *vx, float *y, int K) {
    const block_q2_K *x = (const block_q2_K *)vx;
    for (int i = 0; i < K / QK_K; i++) {
        const float d = half_to_float(x[i].d), min = half_to_float(x[i].dmin);
        const uint8_t *q = x[i].qs;
        int is = 0;
        for (int n = 0; n < QK_K; n += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int half = 0; half < 2; half++) {
                    const uint8_t sc = x[i].scales[is++];
                    const float dl = d * (sc & 0xF), ml = min * (sc >> 4);
                    for (int l = 0; l < 16; l++) *y++ = dl * ((q[16 * half + l] >> shift) & 3) - ml;
                }
            }
        }
    }
}

static void dequantize_row_q3_K(const void *vx, float *y, int K) {
    const block_q3_K *x = (const block_q3_K *)vx;
    for (int i = 0; i < K / QK_K; i++) {
        const float d = half_to_float(x[i].d);
        int8_t sc[16];
        scales_q3_K(x[i].scales, sc);
        const uint8_t *q = x[i].qs, *hm = x[i].hmask;
        uint8_t m = 1;
        int is = 0;
        for (int n = 0; n < QK_K; n += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
                for (int half = 0; half < 2; half++) {
                    const float dl = d * sc[is++];
                    for (int l = 16 * half; l < 16 * half + 16; l++)
                        *y++ = dl * (((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
                }
            }
        }
    }
}

static void dequantize_row_q4_K(const void *vx, float *y, int K) {
    const block_q4_K *x = (const block_q4_K *)vx;
    for (int i = 0; i < K / QK_K; i++) {
        const float d = half_to_float(x[i].d), min = half_to_float(x[i].dmin);
        const uint8_t *q = x[i].qs;
        uint8_t sm[16];
        scales_mins_k4(x[i].scales, sm);
        for (int j = 0; j < 4; j++, q += 32) {
            const float d1 = d * sm[2 * j], m1 = min * sm[8 + 2 * j];
            const float d2 = d * sm[2 * j + 1], m2 = min * sm[9 + 2 * j];
            for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
        }
    }
}

static void dequantize_row_q5_K(const void *vx, float *y, int K) {
    const block_q5_K *x = (const block_q5_K *)vx;
    for (int i = 0; i < K / QK_K; i++) {
        const float d = half_to_float(x[i].d), min = half_to_float(x[i].dmin);
        const uint8_t *ql = x[i].qs, *qh = x[i].qh;
        uint8_t sm[16];
        scales_mins_k4(x[i].scales, sm);
        for (int j = 0; j < 4; j++, ql += 32) {
            const float d1 = d * sm[2 * j], m1 = min * sm[8 + 2 * j];
            const float d2 = d * sm[2 * j + 1], m2 = min * sm[9 + 2 * j];
            const uint8_t u1 = (uint8_t)(1u << (2 * j)), u2 = (uint8_t)(2u << (2 * j));
            for (int l = 0; l < 32; l++) *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
        }
    }
}

static void dequantize_row_q6_K(const void *vx, float *y, int K) {
    const block_q6_K *x = (const block_q6_K *)vx;
    for (int i = 0; i < K / QK_K; i++) {
        const float d = half_to_float(x[i].d);
        const uint8_t *ql = x[i].ql, *qh = x[i].qh;
        const int8_t *sc = x[i].scales;
        for (int n = 0; n < QK_K; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l + 0] = d * sc[is + 0] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
        }
    }
}

/* ================================================================== reference quantizers */
/* Same arithmetic, in the same order, as llama.cpp's quantize_row_<t>_ref (ggml-quants.c), so
 * the bytes are the same: that file is compiled without FMA contraction on x86-64 too. */

/* fit x ~ scale * L + min with L in [0, nmax] and min <= 0, weighted; returns scale, -min in *the_min */
static float fit_scale_min(int n, int nmax, const float *x, const float *weights, uint8_t *L, float *the_min,
                           uint8_t *Laux, float rmin, float rdelta, int nstep, bool use_mad) {
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        const float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; i++) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; i++) {
        const int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)KQ_MAX(0, KQ_MIN(nmax, l));
        float diff = scale * L[i] + min - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best_error += weights[i] * diff;
    }
    if (nstep < 1) {
        *the_min = -min;
        return scale;
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale * (x[i] - min));
            l = KQ_MAX(0, KQ_MIN(nmax, l));
            Laux[i] = (uint8_t)l;
            const float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff * diff;
                cur_error += weights[i] * diff;
            }
            if (cur_error < best_error) {
                memcpy(L, Laux, (size_t)n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* symmetric fit x ~ scale * (L - nmax), L in [0, 2 nmax), weights x^2, trying 18 scales around nmax/max
 * (ggml's make_qx_quants with rmse_type 1 and no importance) */
static float fit_scale_sym(int n, int nmax, const float *x, int8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        const float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < KQ_GROUP_MAX_EPS) {
        for (int i = 0; i < n; i++) L[i] = 0;
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * x[i]);
        l = KQ_MAX(-nmax, KQ_MIN(nmax - 1, l));
        L[i] = (int8_t)(l + nmax);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale * x[i]);
            l = KQ_MAX(-nmax, KQ_MIN(nmax - 1, l));
            const float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) {
                const int l = nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + KQ_MAX(-nmax, KQ_MIN(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Q3_K's symmetric fit: L in [-nmax, nmax), then up to 5 passes moving single values when that
 * improves the weighted fit (ggml's make_q3_quants with do_rmse); returns L + nmax */
static float fit_scale_q3(int n, int nmax, const float *x, int8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        const float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < KQ_GROUP_MAX_EPS) {
        for (int i = 0; i < n; i++) L[i] = 0;
        return 0.f;
    }
    const float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * x[i]);
        l = KQ_MAX(-nmax, KQ_MIN(nmax - 1, l));
        L[i] = (int8_t)l;
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; itry++) {
        int n_changed = 0;
        for (int i = 0; i < n; i++) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = KQ_MAX(-nmax, KQ_MIN(nmax - 1, new_l));
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed++;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; i++) L[i] = (int8_t)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* 2-bit values L[0..255] into qs as Q2_K/Q3_K store them: byte l of each 32 holds values l, l+32, l+64, l+96 */
static void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < QK_K; j += 128)
        for (int l = 0; l < 32; l++)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

static void quantize_row_q2_K(const float *x, void *vy, int K) {
    block_q2_K *y = (block_q2_K *)vy;
    uint8_t L[QK_K], Laux[16];
    float weights[16], mins[QK_K / 16], scales[QK_K / 16];
    const float q4scale = 15.f;
    for (int i = 0; i < K / QK_K; i++, x += QK_K) {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < QK_K / 16; j++) {
            for (int l = 0; l < 16; l++) weights[l] = fabsf(x[16 * j + l]);
            scales[j] = fit_scale_min(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], Laux, -0.5f, 0.1f, 15, true);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        if (max_scale > 0) {
            const float iscale = q4scale / max_scale;
            for (int j = 0; j < QK_K / 16; j++) y[i].scales[j] = (uint8_t)nearest_int(iscale * scales[j]);
            y[i].d = float_to_half(max_scale / q4scale);
        } else {
            for (int j = 0; j < QK_K / 16; j++) y[i].scales[j] = 0;
            y[i].d = float_to_half(0.f);
        }
        if (max_min > 0) {
            const float iscale = q4scale / max_min;
            for (int j = 0; j < QK_K / 16; j++) y[i].scales[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
            y[i].dmin = float_to_half(max_min / q4scale);
        } else {
            y[i].dmin = float_to_half(0.f);
        }
        for (int j = 0; j < QK_K / 16; j++) {
            const float d = half_to_float(y[i].d) * (y[i].scales[j] & 0xF);
            if (!d) continue;
            const float dm = half_to_float(y[i].dmin) * (y[i].scales[j] >> 4);
            for (int l = 0; l < 16; l++) {
                const int q = nearest_int((x[16 * j + l] + dm) / d);
                L[16 * j + l] = (uint8_t)KQ_MAX(0, KQ_MIN(3, q));
            }
        }
        pack_2bit(L, y[i].qs);
    }
}

static void quantize_row_q3_K(const float *x, void *vy, int K) {
    block_q3_K *y = (block_q3_K *)vy;
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int i = 0; i < K / QK_K; i++, x += QK_K) {
        float max_scale = 0, amax = 0;
        for (int j = 0; j < QK_K / 16; j++) {
            scales[j] = fit_scale_q3(16, 4, x + 16 * j, L + 16 * j);
            const float scale = fabsf(scales[j]);
            if (scale > amax) {
                amax = scale;
                max_scale = scales[j];
            }
        }
        memset(y[i].scales, 0, 12);
        if (max_scale) {
            const float iscale = -32.f / max_scale;
            for (int j = 0; j < QK_K / 16; j++) {
                int8_t l = (int8_t)nearest_int(iscale * scales[j]);
                l = (int8_t)(KQ_MAX(-32, KQ_MIN(31, l)) + 32);
                if (j < 8)
                    y[i].scales[j] = l & 0xF;
                else
                    y[i].scales[j - 8] |= (uint8_t)((l & 0xF) << 4);
                l >>= 4;
                y[i].scales[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
            }
            y[i].d = float_to_half(1 / iscale);
        } else {
            y[i].d = float_to_half(0.f);
        }
        int8_t sc[16];
        scales_q3_K(y[i].scales, sc);
        for (int j = 0; j < QK_K / 16; j++) {
            const float d = half_to_float(y[i].d) * sc[j];
            if (!d) continue;
            for (int l = 0; l < 16; l++) {
                const int q = nearest_int(x[16 * j + l] / d);
                L[16 * j + l] = (int8_t)(KQ_MAX(-4, KQ_MIN(3, q)) + 4);
            }
        }
        /* high bit of value j: bit j / 32 of hmask[j % 32] */
        memset(y[i].hmask, 0, QK_K / 8);
        for (int j = 0; j < QK_K; j++) {
            if (L[j] > 3) {
                y[i].hmask[j % 32] |= (uint8_t)(1u << (j / 32));
                L[j] -= 4;
            }
        }
        pack_2bit((const uint8_t *)L, y[i].qs);
    }
}

/* Q4_K and Q5_K share everything but the number of levels and the packing */
static void quantize_scales_mins_k4(const float *x, int nmax, float rmin, int nstep, uint8_t *L, ggml_half *dd,
                                    ggml_half *dmin, uint8_t *packed) {
    uint8_t Laux[32];
    float weights[32], mins[QK_K / 32], scales[QK_K / 32];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / 32; j++) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; l++) sum_x2 += x[32 * j + l] * x[32 * j + l];
        const float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; l++) weights[l] = av_x + fabsf(x[32 * j + l]);
        scales[j] = fit_scale_min(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, rmin, 0.1f, nstep, false);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < QK_K / 32; j++) {
        uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
        ls = KQ_MIN(63, ls);
        lm = KQ_MIN(63, lm);
        if (j < 4) {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
            packed[j - 4] |= (uint8_t)((ls >> 4) << 6);
            packed[j - 0] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    *dd = float_to_half(max_scale / 63.f);
    *dmin = float_to_half(max_min / 63.f);
    uint8_t sm[16];
    scales_mins_k4(packed, sm);
    for (int j = 0; j < QK_K / 32; j++) {
        const float d = half_to_float(*dd) * sm[j];
        if (!d) continue;
        const float dm = half_to_float(*dmin) * sm[8 + j];
        for (int l = 0; l < 32; l++) {
            const int q = nearest_int((x[32 * j + l] + dm) / d);
            L[32 * j + l] = (uint8_t)KQ_MAX(0, KQ_MIN(nmax, q));
        }
    }
}

static void quantize_row_q4_K(const float *x, void *vy, int K) {
    block_q4_K *y = (block_q4_K *)vy;
    uint8_t L[QK_K];
    for (int i = 0; i < K / QK_K; i++, x += QK_K) {
        quantize_scales_mins_k4(x, 15, -1.f, 20, L, &y[i].d, &y[i].dmin, y[i].scales);
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++) y[i].qs[32 * j + l] = (uint8_t)(L[64 * j + l] | (L[64 * j + l + 32] << 4));
    }
}

static void quantize_row_q5_K(const float *x, void *vy, int K) {
    block_q5_K *y = (block_q5_K *)vy;
    uint8_t L[QK_K];
    for (int i = 0; i < K / QK_K; i++, x += QK_K) {
        quantize_scales_mins_k4(x, 31, -0.5f, 15, L, &y[i].d, &y[i].dmin, y[i].scales);
        memset(y[i].qh, 0, QK_K / 8);
        for (int j = 0; j < 4; j++) {
            for (int l = 0; l < 32; l++) {
                int l1 = L[64 * j + l], l2 = L[64 * j + l + 32];
                if (l1 > 15) {
                    l1 -= 16;
                    y[i].qh[l] |= (uint8_t)(1u << (2 * j));
                }
                if (l2 > 15) {
                    l2 -= 16;
                    y[i].qh[l] |= (uint8_t)(2u << (2 * j));
                }
                y[i].qs[32 * j + l] = (uint8_t)(l1 | (l2 << 4));
            }
        }
    }
}

static void quantize_row_q6_K(const float *x, void *vy, int K) {
    block_q6_K *y = (block_q6_K *)vy;
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int i = 0; i < K / QK_K; i++, x += QK_K) {
        float max_scale = 0, max_abs_scale = 0;
        for (int ib = 0; ib < QK_K / 16; ib++) {
            const float scale = fit_scale_sym(16, 32, x + 16 * ib, L + 16 * ib);
            scales[ib] = scale;
            const float abs_scale = fabsf(scale);
            if (abs_scale > max_abs_scale) {
                max_abs_scale = abs_scale;
                max_scale = scale;
            }
        }
        if (max_abs_scale < KQ_GROUP_MAX_EPS) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -128.f / max_scale;
        y[i].d = float_to_half(1 / iscale);
        for (int ib = 0; ib < QK_K / 16; ib++) y[i].scales[ib] = (int8_t)KQ_MIN(127, nearest_int(iscale * scales[ib]));
        for (int j = 0; j < QK_K / 16; j++) {
            const float d = half_to_float(y[i].d) * y[i].scales[j];
            if (!d) continue;
            for (int l = 0; l < 16; l++) {
                const int q = nearest_int(x[16 * j + l] / d);
                L[16 * j + l] = (int8_t)(KQ_MAX(-32, KQ_MIN(31, q)) + 32);
            }
        }
        uint8_t *ql = y[i].ql, *qh = y[i].qh;
        for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; l++) {
                const uint8_t q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF;
                const uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
                ql[l] = (uint8_t)(q1 | (q3 << 4));
                ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
                qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                                  ((L[j + l + 96] >> 4) << 6));
            }
        }
    }
}

/* ================================================================== dot products */

/* The 8 lanes (see the header comment): lane l of a super-block's isum takes bytes 4l..4l+3 of
 * each of its 8 chunks of 32 values, each product times its group's scale, on the quants as
 * stored unsigned (Q3_K: q + 4, Q6_K: q + 32), less off * (sc[2l] bsums[2l] + sc[2l+1] bsums[2l+1]);
 * lane l of msum takes groups 2l, 2l+1 (Q2_K) or 4l..4l+3 (Q4_K, Q5_K, lanes 4..7 zero). This
 * is what AVX2's maddubs/madd give; the other paths compute the same integers. */

/* ((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7)): the final sum of the 8 float lanes */
static inline float kq_hsum8(const float v[8]) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

#if !defined(KQ_AVX2)

/* A super-block unpacked: the stored unsigned quants, per-16 scales and mins, the offset the
 * stored quants carry (0, or 4 for Q3_K, 32 for Q6_K) and the number of min lanes (8 or 4) */
typedef struct {
    int8_t q[QK_K];
    int16_t sc[16];
    int16_t mn[16];
    int off, min_lanes;
} kq_unpacked;

static void unpack_q2_K(const void *vw, kq_unpacked *u) {
    const block_q2_K *w = (const block_q2_K *)vw;
    for (int g = 0; g < 16; g++) {
        u->sc[g] = w->scales[g] & 0xF;
        u->mn[g] = w->scales[g] >> 4;
    }
    u->off = 0;
    u->min_lanes = 8;
    for (int n = 0; n < 2; n++)
        for (int s = 0; s < 4; s++)
            for (int l = 0; l < 32; l++) u->q[128 * n + 32 * s + l] = (int8_t)((w->qs[32 * n + l] >> (2 * s)) & 3);
}

static void unpack_q3_K(const void *vw, kq_unpacked *u) {
    const block_q3_K *w = (const block_q3_K *)vw;
    int8_t sc[16];
    scales_q3_K(w->scales, sc);
    for (int g = 0; g < 16; g++) {
        u->sc[g] = sc[g];
        u->mn[g] = 0;
    }
    u->off = 4;
    u->min_lanes = 0;
    for (int n = 0; n < 2; n++)
        for (int s = 0; s < 4; s++)
            for (int l = 0; l < 32; l++) {
                const int q = (w->qs[32 * n + l] >> (2 * s)) & 3;
                const int h = (w->hmask[l] >> (4 * n + s)) & 1;
                u->q[128 * n + 32 * s + l] = (int8_t)(q | (h << 2));
            }
}

static void unpack_k4(const uint8_t *packed, kq_unpacked *u) {
    uint8_t sm[16];
    scales_mins_k4(packed, sm);
    for (int j = 0; j < 8; j++) {
        u->sc[2 * j] = u->sc[2 * j + 1] = sm[j];
        u->mn[2 * j] = u->mn[2 * j + 1] = sm[8 + j];
    }
    u->off = 0;
    u->min_lanes = 4;
}

static void unpack_q4_K(const void *vw, kq_unpacked *u) {
    const block_q4_K *w = (const block_q4_K *)vw;
    unpack_k4(w->scales, u);
    for (int j = 0; j < 4; j++)
        for (int l = 0; l < 32; l++) {
            u->q[64 * j + l] = (int8_t)(w->qs[32 * j + l] & 0xF);
            u->q[64 * j + 32 + l] = (int8_t)(w->qs[32 * j + l] >> 4);
        }
}

static void unpack_q5_K(const void *vw, kq_unpacked *u) {
    const block_q5_K *w = (const block_q5_K *)vw;
    unpack_k4(w->scales, u);
    for (int j = 0; j < 4; j++)
        for (int l = 0; l < 32; l++) {
            const int h = w->qh[l] >> (2 * j);
            u->q[64 * j + l] = (int8_t)((w->qs[32 * j + l] & 0xF) | ((h & 1) << 4));
            u->q[64 * j + 32 + l] = (int8_t)((w->qs[32 * j + l] >> 4) | ((h & 2) << 3));
        }
}

static void unpack_q6_K(const void *vw, kq_unpacked *u) {
    const block_q6_K *w = (const block_q6_K *)vw;
    for (int g = 0; g < 16; g++) {
        u->sc[g] = w->scales[g];
        u->mn[g] = 0;
    }
    u->off = 32;
    u->min_lanes = 0;
    for (int n = 0; n < 2; n++) {
        const uint8_t *ql = w->ql + 64 * n, *qh = w->qh + 32 * n;
        int8_t *q = u->q + 128 * n;
        for (int l = 0; l < 32; l++) {
            q[l] = (int8_t)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4));
            q[l + 32] = (int8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4));
            q[l + 64] = (int8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
            q[l + 96] = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
        }
    }
}

/* il[l] += scale * (sum of the 4 products in bytes 4l..4l+3), for the 16 values of group g */
KQ_INLINE void dot_group(const int8_t *q, const int8_t *a, int32_t scale, int32_t *il) {
#if defined(KQ_NEON)
#if defined(__ARM_FEATURE_DOTPROD)
    const int32x4_t d = vdotq_s32(vdupq_n_s32(0), vld1q_s8(q), vld1q_s8(a));
#else
    const int8x16_t vq = vld1q_s8(q), va = vld1q_s8(a);
    const int32x4_t p01 = vpaddlq_s16(vmull_s8(vget_low_s8(vq), vget_low_s8(va)));
    const int32x4_t p23 = vpaddlq_s16(vmull_s8(vget_high_s8(vq), vget_high_s8(va)));
    const int32x4_t d = vpaddq_s32(p01, p23);
#endif
    vst1q_s32(il, vmlaq_n_s32(vld1q_s32(il), d, scale));
#else
    for (int l = 0; l < 4; l++)
        il[l] += scale * (q[4 * l] * a[4 * l] + q[4 * l + 1] * a[4 * l + 1] + q[4 * l + 2] * a[4 * l + 2] + q[4 * l + 3] * a[4 * l + 3]);
#endif
}

/* the integer lanes of one unpacked super-block against one q8_K block */
static void sb_lanes(const kq_unpacked *u, const block_q8_K *x, int32_t il[8], int32_t ml[8]) {
    for (int l = 0; l < 8; l++) il[l] = ml[l] = 0;
    /* group g = chunk g/2, half g%2: bytes 0..15 feed lanes 0..3, bytes 16..31 lanes 4..7 */
    for (int g = 0; g < 16; g++) dot_group(u->q + 16 * g, x->qs + 16 * g, u->sc[g], il + 4 * (g & 1));
    if (u->off)
        for (int l = 0; l < 8; l++) il[l] -= u->off * (u->sc[2 * l] * x->bsums[2 * l] + u->sc[2 * l + 1] * x->bsums[2 * l + 1]);
    const int per_lane = u->min_lanes ? 16 / u->min_lanes : 0;
    for (int l = 0; l < u->min_lanes; l++)
        for (int g = per_lane * l; g < per_lane * (l + 1); g++) ml[l] += u->mn[g] * x->bsums[g];
}

#define KQ_GENERIC_DOT(t, has_min, DMIN)                                                                           \
    static void tile_##t(int K, const void *w, size_t w_row_bytes, int nw, const void *xq, size_t xq_row_bytes,    \
                         int nx, float *y, size_t ldy) {                                                            \
        float acc[4][4][8] = {{{0}}};                                                                              \
        kq_unpacked u;                                                                                             \
        for (int i = 0; i < K / QK_K; i++) {                                                                       \
            for (int r = 0; r < nw; r++) {                                                                         \
                const block_##t *b = (const block_##t *)((const char *)w + r * w_row_bytes) + i;                   \
                unpack_##t(b, &u);                                                                                 \
                const float d = half_to_float(b->d), dmin = has_min ? half_to_float(DMIN) : 0.f;                   \
                for (int c = 0; c < nx; c++) {                                                                     \
                    const block_q8_K *a = (const block_q8_K *)((const char *)xq + c * xq_row_bytes) + i;           \
                    int32_t il[8], ml[8];                                                                          \
                    sb_lanes(&u, a, il, ml);                                                                       \
                    const float dd = d * a->d, dm = dmin * a->d;                                                   \
                    for (int l = 0; l < 8; l++) {                                                                  \
                        acc[r][c][l] = acc[r][c][l] + dd * (float)il[l];                                           \
                        if (has_min) acc[r][c][l] = acc[r][c][l] - dm * (float)ml[l];                              \
                    }                                                                                              \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        for (int r = 0; r < nw; r++)                                                                               \
            for (int c = 0; c < nx; c++) y[c * ldy + r] = kq_hsum8(acc[r][c]);                                     \
    }                                                                                                              \
    static void vec_dot_##t(int K, float *s, const void *w, const void *xq) {                                      \
        tile_##t(K, w, 0, 1, xq, 0, 1, s, 1);                                                                      \
    }

KQ_GENERIC_DOT(q2_K, true, b->dmin)
KQ_GENERIC_DOT(q3_K, false, b->d)
KQ_GENERIC_DOT(q4_K, true, b->dmin)
KQ_GENERIC_DOT(q5_K, true, b->dmin)
KQ_GENERIC_DOT(q6_K, false, b->d)

#else /* KQ_AVX2 */

/* The per-16-scale types: the 16 scales as int16, elements 0..7 in both 128-bit lanes (lo) and
 * 8..15 in both (hi); scale_pair16 then gives [scale 2r x8 | scale 2r+1 x8] with one shuffle. */
typedef struct {
    __m256i lo, hi;
} kq_scales16;

KQ_INLINE kq_scales16 scales16(__m128i sc8) {
    const __m256i s = _mm256_cvtepi8_epi16(sc8);
    const kq_scales16 r = {_mm256_broadcastsi128_si256(_mm256_castsi256_si128(s)),
                           _mm256_broadcastsi128_si256(_mm256_extracti128_si256(s, 1))};
    return r;
}

KQ_INLINE __m256i scale_pair16(const kq_scales16 *s, int r) {
    const int e = 4 * (r & 3); /* byte of int16 element 2(r mod 4) */
    const __m256i idx = _mm256_set_m128i(_mm_set1_epi16((short)((e + 2) | ((e + 3) << 8))),
                                         _mm_set1_epi16((short)(e | ((e + 1) << 8))));
    return _mm256_shuffle_epi8(r < 4 ? s->lo : s->hi, idx);
}

/* acc[c] += scales16 . maddubs(q, a_c) for the 32 activation bytes at offset off of each row */
#define KQ_ACC(q, s16, off)                                                                                         \
    for (int c = 0; c < NX; c++) {                                                                                  \
        const __m256i a_ = _mm256_loadu_si256((const __m256i *)(xs[c]->qs + (off)));                                \
        acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16((s16), _mm256_maddubs_epi16((q), a_)));                 \
    }

/* Each sb_<t> sets, for one weight super-block and NX activation blocks, acc[c] (the 8 isum
 * lanes) and m[c] (the 8 msum lanes) of activation row c. */

/* Q4_K and Q5_K: the 8 scales as int16 in both 128-bit lanes; m[c] = mins . (bsum pairs) in lanes 0..3 */
KQ_INLINE __m256i k4_scales(const uint8_t *packed, const block_q8_K *const *xs, const int NX, __m256i *m) {
    uint8_t smb[16];
    scales_mins_k4(packed, smb);
    const __m128i sm = _mm_loadu_si128((const __m128i *)smb);
    const __m128i mins16 = _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8));
    for (int c = 0; c < NX; c++) {
        const __m128i b0 = _mm_loadu_si128((const __m128i *)xs[c]->bsums);
        const __m128i b1 = _mm_loadu_si128((const __m128i *)(xs[c]->bsums + 8));
        m[c] = _mm256_set_m128i(_mm_setzero_si128(), _mm_madd_epi16(mins16, _mm_hadd_epi16(b0, b1)));
    }
    return _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
}

/* int16 element e of v in all 16 places */
#define KQ_BCAST16(v, e) _mm256_shuffle_epi8((v), _mm256_set1_epi16((short)((2 * (e)) | ((2 * (e) + 1) << 8))))

KQ_INLINE void sb_q4_K(const block_q4_K *w, const block_q8_K *const *xs, const int NX, __m256i *acc, __m256i *m) {
    const __m256i sc16 = k4_scales(w->scales, xs, NX, m);
    const __m256i m4 = _mm256_set1_epi8(0xF);
    for (int c = 0; c < NX; c++) acc[c] = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
        const __m256i bits = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * j));
        const __m256i lo = _mm256_and_si256(bits, m4), hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
        const __m256i s1 = KQ_BCAST16(sc16, 2 * j), s2 = KQ_BCAST16(sc16, 2 * j + 1);
        KQ_ACC(lo, s1, 64 * j)
        KQ_ACC(hi, s2, 64 * j + 32)
    }
}

KQ_INLINE void sb_q5_K(const block_q5_K *w, const block_q8_K *const *xs, const int NX, __m256i *acc, __m256i *m) {
    const __m256i sc16 = k4_scales(w->scales, xs, NX, m);
    const __m256i m4 = _mm256_set1_epi8(0xF), m1 = _mm256_set1_epi8(1);
    __m256i hb = _mm256_loadu_si256((const __m256i *)w->qh);
    for (int c = 0; c < NX; c++) acc[c] = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
        const __m256i bits = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * j));
        /* hb has been shifted right by 2j in 16-bit lanes; bits 0 and 1 of each byte are still its own (2j + 1 <= 7) */
        const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(hb, m1), 4);
        const __m256i h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 1), m1), 4);
        hb = _mm256_srli_epi16(hb, 2);
        const __m256i lo = _mm256_or_si256(_mm256_and_si256(bits, m4), h1);
        const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits, 4), m4), h2);
        const __m256i s1 = KQ_BCAST16(sc16, 2 * j), s2 = KQ_BCAST16(sc16, 2 * j + 1);
        KQ_ACC(lo, s1, 64 * j)
        KQ_ACC(hi, s2, 64 * j + 32)
    }
}

/* the per-16-scale types: acc[c] -= off * (sc[2l] bsums[2l] + sc[2l+1] bsums[2l+1]) (Q3_K: off 4, Q6_K: off 32) */
#define KQ_BSUM_CORRECTION(sc8, shift)                                                                              \
    do {                                                                                                            \
        const __m256i s16_ = _mm256_cvtepi8_epi16(sc8);                                                             \
        for (int c = 0; c < NX; c++) {                                                                              \
            const __m256i b_ = _mm256_loadu_si256((const __m256i *)xs[c]->bsums);                                   \
            acc[c] = _mm256_sub_epi32(acc[c], _mm256_slli_epi32(_mm256_madd_epi16(s16_, b_), (shift)));             \
        }                                                                                                           \
    } while (0)

KQ_INLINE void sb_q6_K(const block_q6_K *w, const block_q8_K *const *xs, const int NX, __m256i *acc, __m256i *m) {
    (void)m;
    const __m256i m15 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
    const __m128i sc8 = _mm_loadu_si128((const __m128i *)w->scales);
    const kq_scales16 s16 = scales16(sc8);
    for (int c = 0; c < NX; c++) acc[c] = _mm256_setzero_si256();
    for (int n = 0; n < 2; n++) {
        const __m256i b1 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * n));
        const __m256i b2 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * n + 32));
        const __m256i h = _mm256_loadu_si256((const __m256i *)(w->qh + 32 * n));
        const __m256i q0 = _mm256_or_si256(_mm256_and_si256(b1, m15), _mm256_slli_epi16(_mm256_and_si256(h, m3), 4));
        KQ_ACC(q0, scale_pair16(&s16, 4 * n + 0), 128 * n + 0)
        const __m256i q1 = _mm256_or_si256(_mm256_and_si256(b2, m15),
                                           _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(12)), 2));
        KQ_ACC(q1, scale_pair16(&s16, 4 * n + 1), 128 * n + 32)
        const __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b1, 4), m15),
                                           _mm256_and_si256(h, _mm256_set1_epi8(48)));
        KQ_ACC(q2, scale_pair16(&s16, 4 * n + 2), 128 * n + 64)
        const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b2, 4), m15),
                                           _mm256_srli_epi16(_mm256_and_si256(h, _mm256_set1_epi8((char)0xC0)), 2));
        KQ_ACC(q3, scale_pair16(&s16, 4 * n + 3), 128 * n + 96)
    }
    KQ_BSUM_CORRECTION(sc8, 5);
}

/* 2-bit field s (0..3) of each byte of v: shifts by immediates, so each is one instruction */
KQ_INLINE __m256i kq_field2(__m256i v, int s) {
    switch (s) {
    case 0: return v;
    case 1: return _mm256_srli_epi16(v, 2);
    case 2: return _mm256_srli_epi16(v, 4);
    default: return _mm256_srli_epi16(v, 6);
    }
}

KQ_INLINE void sb_q3_K(const block_q3_K *w, const block_q8_K *const *xs, const int NX, __m256i *acc, __m256i *m) {
    (void)m;
    int8_t scv[16];
    scales_q3_K(w->scales, scv);
    const __m128i sc8 = _mm_loadu_si128((const __m128i *)scv);
    const kq_scales16 s16 = scales16(sc8);
    const __m256i m3 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi8(4);
    const __m256i hm = _mm256_loadu_si256((const __m256i *)w->hmask);
    for (int c = 0; c < NX; c++) acc[c] = _mm256_setzero_si256();
    for (int n = 0; n < 2; n++) {
        const __m256i bits = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * n));
        for (int s = 0; s < 4; s++) {
            /* q + 4 * high bit, in 0..7; the -4 is the bsums correction below. The high bit of
             * group (n, s) is bit k = 4n + s of hmask, moved to bit 2 by a 16-bit shift by |k - 2| <= 5
             * (bits crossing between the two bytes land on bits other than 2 and are masked off) */
            const int k = 4 * n + s;
            const __m256i hk = k < 2 ? _mm256_slli_epi16(hm, 2 - k) : k == 2 ? hm : _mm256_srli_epi16(hm, k - 2);
            const __m256i hbit = _mm256_and_si256(hk, m4);
            const __m256i q = _mm256_or_si256(_mm256_and_si256(kq_field2(bits, s), m3), hbit);
            KQ_ACC(q, scale_pair16(&s16, k), 128 * n + 32 * s)
        }
    }
    KQ_BSUM_CORRECTION(sc8, 2);
}

KQ_INLINE void sb_q2_K(const block_q2_K *w, const block_q8_K *const *xs, const int NX, __m256i *acc, __m256i *m) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)w->scales);
    const __m128i m4 = _mm_set1_epi8(0xF);
    const kq_scales16 s16 = scales16(_mm_and_si128(raw, m4));
    const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), m4));
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int c = 0; c < NX; c++) acc[c] = _mm256_setzero_si256();
    for (int n = 0; n < 2; n++) {
        const __m256i bits = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * n));
        for (int s = 0; s < 4; s++) {
            const __m256i q = _mm256_and_si256(kq_field2(bits, s), m3);
            KQ_ACC(q, scale_pair16(&s16, 4 * n + s), 128 * n + 32 * s)
        }
    }
    for (int c = 0; c < NX; c++) m[c] = _mm256_madd_epi16(mins16, _mm256_loadu_si256((const __m256i *)xs[c]->bsums));
}

/* kq_hsum8 on a vector: [v0+v4 .. v3+v7], then (0+2) and (1+3), then their sum */
KQ_INLINE float kq_hsum8_avx(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

/* The tile for nw weight rows and NX activation rows: per element the 8 float lanes of the
 * header comment, one ymm per activation row. */
#define KQ_AVX2_TILE(t, has_min, DMIN)                                                                              \
    KQ_INLINE void tile_##t##_n(int K, const void *w, size_t w_row_bytes, int nw, const void *xq,                   \
                                size_t xq_row_bytes, const int NX, float *y, size_t ldy) {                          \
        const int nb = K / QK_K;                                                                                    \
        for (int r = 0; r < nw; r++) {                                                                              \
            const block_##t *row = (const block_##t *)((const char *)w + r * w_row_bytes);                          \
            __m256 accf[4];                                                                                         \
            for (int c = 0; c < NX; c++) accf[c] = _mm256_setzero_ps();                                             \
            for (int i = 0; i < nb; i++) {                                                                          \
                const block_q8_K *xs[4];                                                                            \
                for (int c = 0; c < NX; c++) xs[c] = (const block_q8_K *)((const char *)xq + c * xq_row_bytes) + i; \
                const block_##t *bb = row + i;                                                                      \
                __m256i acc[4], m[4];                                                                               \
                sb_##t(bb, xs, NX, acc, m);                                                                         \
                const float d = kq_half(bb->d);                                                                     \
                for (int c = 0; c < NX; c++) {                                                                      \
                    const __m256 dd = _mm256_set1_ps(d * xs[c]->d);                                                 \
                    accf[c] = _mm256_add_ps(accf[c], _mm256_mul_ps(dd, _mm256_cvtepi32_ps(acc[c])));                \
                }                                                                                                   \
                if (has_min) {                                                                                      \
                    const float dmin = kq_half(DMIN);                                                               \
                    for (int c = 0; c < NX; c++) {                                                                  \
                        const __m256 dm = _mm256_set1_ps(dmin * xs[c]->d);                                          \
                        accf[c] = _mm256_sub_ps(accf[c], _mm256_mul_ps(dm, _mm256_cvtepi32_ps(m[c])));              \
                    }                                                                                               \
                }                                                                                                   \
            }                                                                                                       \
            for (int c = 0; c < NX; c++) y[c * ldy + r] = kq_hsum8_avx(accf[c]);                                    \
        }                                                                                                           \
    }                                                                                                               \
    static void tile_##t(int K, const void *w, size_t w_row_bytes, int nw, const void *xq, size_t xq_row_bytes,     \
                         int nx, float *y, size_t ldy) {                                                            \
        switch (nx) {                                                                                               \
        case 1: tile_##t##_n(K, w, w_row_bytes, nw, xq, xq_row_bytes, 1, y, ldy); break;                            \
        case 2: tile_##t##_n(K, w, w_row_bytes, nw, xq, xq_row_bytes, 2, y, ldy); break;                            \
        case 3: tile_##t##_n(K, w, w_row_bytes, nw, xq, xq_row_bytes, 3, y, ldy); break;                            \
        default: tile_##t##_n(K, w, w_row_bytes, nw, xq, xq_row_bytes, 4, y, ldy); break;                           \
        }                                                                                                           \
    }                                                                                                               \
    static void vec_dot_##t(int K, float *s, const void *w, const void *xq) {                                       \
        tile_##t##_n(K, w, 0, 1, xq, 0, 1, s, 1);                                                                   \
    }

KQ_AVX2_TILE(q2_K, true, bb->dmin)
KQ_AVX2_TILE(q3_K, false, bb->d)
KQ_AVX2_TILE(q4_K, true, bb->dmin)
KQ_AVX2_TILE(q5_K, true, bb->dmin)
KQ_AVX2_TILE(q6_K, false, bb->d)

#endif /* KQ_AVX2 */

/* ================================================================== the BlockTypes */

#define KQ_BLOCK_TYPE(t, T)                                                                                         \
    const BlockType block_type_##t = {                                                                              \
        .type = GGML_TYPE_##T,                                                                                      \
        .block = QK_K,                                                                                              \
        .block_bytes = sizeof(block_##t),                                                                           \
        .act_block_bytes = sizeof(block_q8_K),                                                                      \
        .quantize_act = quantize_row_q8_K,                                                                          \
        .vec_dot = vec_dot_##t,                                                                                     \
        .dequantize_row = dequantize_row_##t,                                                                       \
        .quantize_row = quantize_row_##t,                                                                           \
        .tile = tile_##t,                                                                                           \
    };

KQ_BLOCK_TYPE(q2_K, Q2_K)
KQ_BLOCK_TYPE(q3_K, Q3_K)
KQ_BLOCK_TYPE(q4_K, Q4_K)
KQ_BLOCK_TYPE(q5_K, Q5_K)
KQ_BLOCK_TYPE(q6_K, Q6_K)
