/* The K-quants: Q2_K, Q3_K, Q4_K, Q5_K and Q6_K weights (super-blocks of 256 values) against
 * activations quantized to block_q8_K, as the BlockTypes block_type_q2_K .. block_type_q6_K.
 *
 * Per type: dequantize_row (bit-identical to ggml / gguf-py), quantize_row (byte-identical to
 * llama.cpp's quantize_row_<t>_ref, what llama_model_quantize writes without an importance
 * matrix), vec_dot and tile. quantize_act is one shared quantize_row_q8_K. The quantizers do
 * ggml's float operations group by group, with 4 or 8 groups side by side in vector lanes
 * (fit_scale_min_lanes, fit_scale_sym_lanes), which is where their speed comes from.
 *
 * How a dot product is summed, on every ISA (blocks.h's contract). Every K-quant super-block is
 * 16 groups of 16 values; value v of group g is  d * sc[g] * q[v]  -  dmin * mn[g]  with small
 * integers q, sc, mn (mn = 0 for Q3_K and Q6_K, which have no mins). Against a q8_K block
 * (float dx, int8 a[256], int16 bsums[16] = sums of each group of 16 a) super-block i gives two
 * exact integers, isum = sum over g of sc[g] * (q . a over group g) and msum = sum over g of
 * mn[g] * bsums[g] (at most 256 * 63 * 127 * 128 < 2^31 in magnitude, so exact whatever the order
 * of their terms). The row's float result is 8 float accumulators, super-block i into acc[i % 8]:
 *     acc[j] = acc[j] + (d * dx) * (float)isum;
 *     acc[j] = acc[j] - (dmin * dx) * (float)msum;    (types with mins only)
 * from acc = 0, then ((acc0+acc4) + (acc2+acc6)) + ((acc1+acc5) + (acc3+acc7)), as the 32-value
 * types sum their blocks. The float operations are compiled with -ffp-contract=off, so the
 * portable, AVX2, AVX-512 and NEON paths give the same bits, and every tile or tile8 element
 * equals vec_dot of its row pair. Because a super-block's result is one integer, a prompt's rows
 * can sit in vector lanes (tile8: 8 activation rows interleaved, one lane each), and the group
 * scales multiply 8 rows' sums at once.
 *
 * Paths: AVX2 (and tile8 for prompts); AVX-512 (Q6_K: two chunks of 32 values per 512-bit
 * register in vec_dot and tile; the other types run the AVX2 code, which was faster there on Zen
 * 4); NEON (vdotq_s32 with __ARM_FEATURE_DOTPROD, widening multiplies otherwise) on the unpacked
 * super-block; portable C otherwise. KQ_AVX512_EMULATED (tests only) runs the AVX-512 code on
 * AVX2 with its intrinsics written in C (tests/kquants_avx512_emul.h).
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
#if defined(__F16C__) && defined(KQ_AVX2)
    return _cvtsh_ss(h); /* exact, like half_to_float */
#else
    return half_to_float(h);
#endif
}

/* ================================================================== q8_K activations */

/* the first value of largest magnitude (0 when all are 0) */
static inline float max_by_magnitude(int n, const float *x) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        const float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    return max;
}


/* ggml's quantize_row_q8_K_ref: d from the signed value of largest magnitude (the first one),
 * q = nearest(-127/max * x), bsums per 16. Scalar on every ISA, so the rounding is one. An
 * all-zero block gets zero bsums too (ggml leaves them unset; they multiply nothing there). */
static void quantize_row_q8_K(const float *x, void *vy, int K) {
    block_q8_K *y = (block_q8_K *)vy;
    const int nb = K / QK_K;
    for (int i = 0; i < nb; i++, x += QK_K) {
        const float max = max_by_magnitude(QK_K, x);
        if (!max) {
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

/* Fit x ~ scale * L + min with L in [0, nmax] and min <= 0, weighted (ggml's make_qkx2_quants),
 * for KQ_LANES groups of n (<= 32) values at once: group g is x[g n ..], weights[g n ..], L[g n ..]; its
 * scale goes to scale[g] and -min to the_min[g]. Each group runs ggml's sequence of float
 * operations unchanged, in its own lane of GCC vector types (element-wise IEEE operations, so the
 * bytes are ggml's on every ISA): the groups are independent, and the lanes turn the latency-bound
 * chains of one group into SIMD work (Q4_K about 6-10x faster than one group at a time on AVX2). */
#if defined(__AVX2__)
#define KQ_LANES 8 /* one ymm */
#else
#define KQ_LANES 4 /* one xmm / NEON register: wider GCC vectors are lowered badly there */
#endif
typedef float kq_vf __attribute__((vector_size(4 * KQ_LANES)));
typedef int32_t kq_vi __attribute__((vector_size(4 * KQ_LANES)));

/* macros rather than functions: a function passing these vectors by value draws GCC's x86-64
 * ABI note (-Wpsabi) on the baseline build */
#if KQ_LANES == 8
#define VF_SPLAT(v) ((kq_vf){(v), (v), (v), (v), (v), (v), (v), (v)})
#define VI_SPLAT(v) ((kq_vi){(v), (v), (v), (v), (v), (v), (v), (v)})
#else
#define VF_SPLAT(v) ((kq_vf){(v), (v), (v), (v)})
#define VI_SPLAT(v) ((kq_vi){(v), (v), (v), (v)})
#endif
/* m ? a : b per lane, m lanes all ones or zero */
#define VF_SEL(m, a, b) ((kq_vf)(((kq_vi)(a) & (m)) | ((kq_vi)(b) & ~(m))))
#define VI_SEL(m, a, b) (((a) & (m)) | ((b) & ~(m)))
/* out = nearest_int(f) per lane, clamped to [0, nmax] */
#define VL_LEVEL(out, f, nmax)                                                                                      \
    do {                                                                                                            \
        const kq_vi i_ = (kq_vi)((f) + VF_SPLAT(12582912.f));                                                    \
        kq_vi l_ = (i_ & 0x007fffff) - 0x00400000;                                                                 \
        l_ = VI_SEL(l_ > (nmax), VI_SPLAT(nmax), l_);                                                             \
        (out) = VI_SEL(l_ < 0, VI_SPLAT(0), l_);                                                                  \
    } while (0)
#define VL_ERR(diff, use_mad) ((use_mad) ? (kq_vf)((kq_vi)(diff) & 0x7fffffff) : (diff) * (diff))

static void fit_scale_min_lanes(int n, int nmax, const float *x, const float *weights, uint8_t *L, float *scale,
                                float *the_min, float rmin, float rdelta, int nstep, bool use_mad) {
    kq_vf xt[32], wt[32];
    kq_vi Lt[32], La[32];
    for (int i = 0; i < n; i++)
        for (int g = 0; g < KQ_LANES; g++) {
            xt[i][g] = x[g * n + i];
            wt[i][g] = weights[g * n + i];
        }
    kq_vf min = xt[0], max = xt[0], sum_w = wt[0], sum_x = wt[0] * xt[0];
    for (int i = 1; i < n; i++) {
        min = VF_SEL(xt[i] < min, xt[i], min);
        max = VF_SEL(xt[i] > max, xt[i], max);
        sum_w += wt[i];
        sum_x += wt[i] * xt[i];
    }
    min = VF_SEL(min > 0, VF_SPLAT(0), min);
    const kq_vi flat = max == min; /* ggml returns at once there: all zero, scale 0, -min */
    const kq_vf min0 = min;
    const float fnmax = (float)nmax;
    kq_vf iscale = VF_SPLAT(fnmax) / (max - min);
    kq_vf sc = VF_SPLAT(1) / iscale, best = VF_SPLAT(0);
    for (int i = 0; i < n; i++) {
        VL_LEVEL(Lt[i], iscale * (xt[i] - min), nmax);
        const kq_vf diff = sc * __builtin_convertvector(Lt[i], kq_vf) + min - xt[i];
        best += wt[i] * VL_ERR(diff, use_mad);
    }
    for (int is = 0; is <= nstep; is++) {
        const float num = rmin + rdelta * is + nmax;
        iscale = VF_SPLAT(num) / (max - min);
        kq_vf sum_l = VF_SPLAT(0), sum_l2 = VF_SPLAT(0), sum_xl = VF_SPLAT(0), err = VF_SPLAT(0);
        for (int i = 0; i < n; i++) {
            VL_LEVEL(La[i], iscale * (xt[i] - min), nmax);
            const kq_vf l = __builtin_convertvector(La[i], kq_vf), w = wt[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * xt[i];
        }
        const kq_vf D = sum_w * sum_l2 - sum_l * sum_l;
        kq_vf this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        kq_vf this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        const kq_vi pos = this_min > 0;
        this_min = VF_SEL(pos, VF_SPLAT(0), this_min);
        this_scale = VF_SEL(pos, sum_xl / sum_l2, this_scale);
        for (int i = 0; i < n; i++) {
            const kq_vf diff = this_scale * __builtin_convertvector(La[i], kq_vf) + this_min - xt[i];
            err += wt[i] * VL_ERR(diff, use_mad);
        }
        const kq_vi take = (D > 0) & (err < best);
        best = VF_SEL(take, err, best);
        sc = VF_SEL(take, this_scale, sc);
        min = VF_SEL(take, this_min, min);
        for (int i = 0; i < n; i++) Lt[i] = VI_SEL(take, La[i], Lt[i]);
    }
    for (int g = 0; g < KQ_LANES; g++) {
        for (int i = 0; i < n; i++) L[g * n + i] = flat[g] ? 0 : (uint8_t)Lt[i][g];
        scale[g] = flat[g] ? 0.f : sc[g];
        the_min[g] = -(flat[g] ? min0[g] : min[g]);
    }
}

/* The symmetric fits (Q3_K, Q6_K) for KQ_LANES groups of n (<= 16) values at once, as
 * fit_scale_min_lanes: group g is x[g n ..] and L[g n ..]. sym_start transposes the groups, finds
 * each one's first value of largest magnitude and whether it is all (near) zero. */
typedef struct {
    kq_vf xt[16], max;
    kq_vi zero;
} kq_sym;

static void sym_start(int n, const float *x, kq_sym *s) {
    for (int i = 0; i < n; i++) {
        kq_vf v = VF_SPLAT(0.f);
        for (int g = 0; g < KQ_LANES; g++) v[g] = x[g * n + i];
        s->xt[i] = v;
    }
    kq_vf max = VF_SPLAT(0.f), amax = VF_SPLAT(0.f);
    for (int i = 0; i < n; i++) {
        const kq_vf ax = (kq_vf)((kq_vi)s->xt[i] & 0x7fffffff);
        const kq_vi m = ax > amax;
        amax = VF_SEL(m, ax, amax);
        max = VF_SEL(m, s->xt[i], max);
    }
    s->max = max;
    s->zero = amax < KQ_GROUP_MAX_EPS;
}

/* Lv[i] = clamp(nearest(iscale x), -nmax, nmax - 1); lx = sum x^2 x l, l2 = sum x^2 l^2 (ggml's order) */
#define KQ_SYM_LEVELS(s, n, nmax, Lv, iscale, lx, l2)                                                               \
    do {                                                                                                            \
        const kq_vi hi_ = VI_SPLAT((nmax) - 1), lo_ = VI_SPLAT(-(nmax));                                            \
        lx = l2 = VF_SPLAT(0.f);                                                                                    \
        for (int i = 0; i < (n); i++) {                                                                             \
            const kq_vf x_ = (s)->xt[i];                                                                            \
            const kq_vi i_ = (kq_vi)((iscale) * x_ + VF_SPLAT(12582912.f));                                         \
            kq_vi l_ = (i_ & 0x007fffff) - 0x00400000;                                                              \
            l_ = VI_SEL(l_ > hi_, hi_, l_);                                                                         \
            l_ = VI_SEL(l_ < lo_, lo_, l_);                                                                         \
            Lv[i] = l_;                                                                                             \
            const kq_vf w_ = x_ * x_, lf_ = __builtin_convertvector(l_, kq_vf);                                     \
            lx += w_ * x_ * lf_;                                                                                    \
            l2 += w_ * lf_ * lf_;                                                                                   \
        }                                                                                                           \
    } while (0)

/* symmetric fit x ~ scale * (L - nmax), L in [0, 2 nmax), weights x^2, trying 18 scales around
 * nmax/max (ggml's make_qx_quants with rmse_type 1 and no importance); scale[g] per group */
static void fit_scale_sym_lanes(int n, int nmax, const float *x, int8_t *L, float *scale) {
    kq_sym s;
    sym_start(n, x, &s);
    const float fnmax = (float)nmax, fnmaxm = (float)-nmax;
    kq_vi Lt[16], La[16];
    kq_vf sumlx, suml2;
    KQ_SYM_LEVELS(&s, n, nmax, Lt, VF_SPLAT(fnmaxm) / s.max, sumlx, suml2);
    kq_vf sc = VF_SEL(suml2 != 0, sumlx / suml2, VF_SPLAT(0.f));
    kq_vf best = sc * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        const float num = -(fnmax + 0.1f * is);
        KQ_SYM_LEVELS(&s, n, nmax, La, VF_SPLAT(num) / s.max, sumlx, suml2);
        const kq_vi take = (suml2 > 0) & (sumlx * sumlx > best * suml2);
        const kq_vf new_sc = sumlx / suml2;
        sc = VF_SEL(take, new_sc, sc);
        best = VF_SEL(take, new_sc * sumlx, best);
        for (int i = 0; i < n; i++) Lt[i] = VI_SEL(take, La[i], Lt[i]);
    }
    for (int g = 0; g < KQ_LANES; g++) {
        for (int i = 0; i < n; i++) L[g * n + i] = s.zero[g] ? 0 : (int8_t)(Lt[i][g] + nmax);
        scale[g] = s.zero[g] ? 0.f : sc[g];
    }
}

/* Q3_K's symmetric fit: L in [-nmax, nmax), then up to 5 passes moving single values when that
 * improves the weighted fit (ggml's make_q3_quants with do_rmse); L + nmax and scale[g] per group.
 * A lane whose pass changed nothing is unchanged by further passes, so running them all while any
 * lane still changes gives each group ggml's result. */
static void fit_scale_q3_lanes(int n, int nmax, const float *x, int8_t *L, float *scale) {
    kq_sym s;
    sym_start(n, x, &s);
    const float fnmaxm = (float)-nmax;
    const kq_vi hi = VI_SPLAT(nmax - 1), lo = VI_SPLAT(-nmax);
    kq_vi Lt[16];
    kq_vf sumlx, suml2;
    KQ_SYM_LEVELS(&s, n, nmax, Lt, VF_SPLAT(fnmaxm) / s.max, sumlx, suml2);
    for (int itry = 0; itry < 5; itry++) {
        kq_vi changed = VI_SPLAT(0);
        for (int i = 0; i < n; i++) {
            const kq_vf xi = s.xt[i], w = xi * xi, li = __builtin_convertvector(Lt[i], kq_vf);
            kq_vf slx = sumlx - w * xi * li;
            const kq_vi pos = slx > 0;
            kq_vf sl2 = suml2 - w * li * li;
            const kq_vi r_ = (kq_vi)(xi * sl2 / slx + VF_SPLAT(12582912.f));
            kq_vi nl = (r_ & 0x007fffff) - 0x00400000;
            nl = VI_SEL(nl > hi, hi, nl);
            nl = VI_SEL(nl < lo, lo, nl);
            const kq_vf nlf = __builtin_convertvector(nl, kq_vf);
            slx += w * xi * nlf;
            sl2 += w * nlf * nlf;
            const kq_vi take = pos & (nl != Lt[i]) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2);
            Lt[i] = VI_SEL(take, nl, Lt[i]);
            sumlx = VF_SEL(take, slx, sumlx);
            suml2 = VF_SEL(take, sl2, suml2);
            changed |= take;
        }
        int any = 0;
        for (int g = 0; g < KQ_LANES; g++) any |= changed[g];
        if (!any) break;
    }
    const kq_vf sc = VF_SEL(suml2 > 0, sumlx / suml2, VF_SPLAT(0.f));
    for (int g = 0; g < KQ_LANES; g++) {
        for (int i = 0; i < n; i++) L[g * n + i] = s.zero[g] ? 0 : (int8_t)(Lt[i][g] + nmax);
        scale[g] = s.zero[g] ? 0.f : sc[g];
    }
}

/* 2-bit values L[0..255] into qs as Q2_K/Q3_K store them: byte l of each 32 holds values l, l+32, l+64, l+96 */
static void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < QK_K; j += 128)
        for (int l = 0; l < 32; l++)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

static void quantize_row_q2_K(const float *x, void *vy, int K) {
    block_q2_K *y = (block_q2_K *)vy;
    uint8_t L[QK_K];
    float weights[QK_K], mins[QK_K / 16], scales[QK_K / 16];
    const float q4scale = 15.f;
    for (int i = 0; i < K / QK_K; i++, x += QK_K) {
        float max_scale = 0, max_min = 0;
        for (int l = 0; l < QK_K; l++) weights[l] = fabsf(x[l]);
        for (int j = 0; j < QK_K / 16; j += KQ_LANES)
            fit_scale_min_lanes(16, 3, x + 16 * j, weights + 16 * j, L + 16 * j, scales + j, mins + j, -0.5f, 0.1f, 15, true);
        for (int j = 0; j < QK_K / 16; j++) {
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
        for (int j = 0; j < QK_K / 16; j += KQ_LANES) fit_scale_q3_lanes(16, 4, x + 16 * j, L + 16 * j, scales + j);
        for (int j = 0; j < QK_K / 16; j++) {
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
    float weights[QK_K], mins[QK_K / 32], scales[QK_K / 32];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / 32; j++) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; l++) sum_x2 += x[32 * j + l] * x[32 * j + l];
        const float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; l++) weights[32 * j + l] = av_x + fabsf(x[32 * j + l]);
    }
    for (int j = 0; j < QK_K / 32; j += KQ_LANES)
        fit_scale_min_lanes(32, nmax, x + 32 * j, weights + 32 * j, L + 32 * j, scales + j, mins + j, rmin, 0.1f, nstep, false);
    for (int j = 0; j < QK_K / 32; j++) {
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
        for (int ib = 0; ib < QK_K / 16; ib += KQ_LANES) fit_scale_sym_lanes(16, 32, x + 16 * ib, L + 16 * ib, scales + ib);
        for (int ib = 0; ib < QK_K / 16; ib++) {
            const float scale = scales[ib];
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

/* The integer lanes each path sums a super-block in before adding them up into isum and msum
 * (see the header comment): lane l takes bytes 4l..4l+3 of each of the 8 chunks of 32 values,
 * each product times its group's scale, on the quants as stored unsigned (Q3_K: q + 4, Q6_K:
 * q + 32), less off * (sc[2l] bsums[2l] + sc[2l+1] bsums[2l+1]); msum's lane l takes groups 2l,
 * 2l+1 (Q2_K) or 4l..4l+3 (Q4_K, Q5_K, lanes 4..7 zero). This is what AVX2's maddubs/madd give. */

/* ((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7)): the final sum of the 8 float accumulators */
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
                    int32_t il[8], ml[8], isum = 0, msum = 0;                                                      \
                    sb_lanes(&u, a, il, ml);                                                                       \
                    for (int l = 0; l < 8; l++) isum += il[l], msum += ml[l];                                      \
                    float *s = &acc[r][c][i % 8];                                                                  \
                    *s = *s + (d * a->d) * (float)isum;                                                            \
                    if (has_min) *s = *s - (dmin * a->d) * (float)msum;                                            \
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
        BLOCK_PIN(acc[c]);                                                                                          \
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


/* Q4_K, Q5_K: AVX2 code on every x86 level. Their AVX-512 form (two 32-value chunks per register,
 * scales by permutexvar) ran 16-17% slower in decode and 7% in the 4x4 tile on Zen 4 (kquant_dots,
 * 2048 x 8192, one thread: Q4_K vec_dot 0.52 -> 0.43 ms, Q5_K 0.68 -> 0.57 ms), whose 512-bit
 * integer ops take two 256-bit passes anyway. */

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

#if defined(__AVX512BW__) || defined(KQ_AVX512_EMULATED)

/* AVX-512 (Q6_K): two chunks of 32 values per 512-bit register; the 16 int32 lanes fold into the 8
 * of the header comment (lane l + lane l + 8: the same bytes 4l..4l+3 of each chunk), exactly. */
/* int16 a in the low 256 bits, b in the high 256 */
KQ_INLINE __m512i kq_halves16(short a, short b) {
    return _mm512_inserti64x4(_mm512_set1_epi16(a), _mm256_set1_epi16(b), 1);
}

#define KQ_ACC512(q, s, off)                                                                                        \
    for (int c = 0; c < NX; c++) {                                                                                  \
        const __m512i a_ = _mm512_loadu_si512((const void *)(xs[c]->qs + (off)));                                   \
        acc5[c] = _mm512_add_epi32(acc5[c], _mm512_madd_epi16((s), _mm512_maddubs_epi16((q), a_)));                 \
    }

#define KQ_FOLD512()                                                                                                \
    for (int c = 0; c < NX; c++)                                                                                    \
        acc[c] = _mm256_add_epi32(_mm512_castsi512_si256(acc5[c]), _mm512_extracti64x4_epi64(acc5[c], 1))

/* [scale 4p x8, 4p+1 x8, 4p+2 x8, 4p+3 x8] from the 16 int16 scales */
static const int16_t kq_idx_q6[4][32] __attribute__((aligned(64))) = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9, 10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13, 14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15},
};

KQ_INLINE void sb_q6_K(const block_q6_K *w, const block_q8_K *const *xs, const int NX, __m256i *acc, __m256i *m) {
    (void)m;
    const __m512i m15 = _mm512_set1_epi8(15);
    const __m128i sc8 = _mm_loadu_si128((const __m128i *)w->scales);
    const __m512i sc = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(sc8));
    /* values 128n + 0..63: low nibbles of ql[64n..64n+63], high bits (qh >> 0) & 3 then (qh >> 2) & 3;
     * values 128n + 64..127: high nibbles, high bits (qh >> 4) & 3 then (qh >> 6) & 3 */
    const __m512i mask01 = _mm512_inserti64x4(_mm512_set1_epi8(3), _mm256_set1_epi8(12), 1);
    const __m512i mask23 = _mm512_inserti64x4(_mm512_set1_epi8(48), _mm256_set1_epi8((char)0xC0), 1);
    const __m512i shl01 = kq_halves16(4, 2), shr23 = kq_halves16(0, 2);
    __m512i acc5[4];
    for (int c = 0; c < NX; c++) acc5[c] = _mm512_setzero_si512();
    for (int n = 0; n < 2; n++) {
        const __m512i b = _mm512_loadu_si512((const void *)(w->ql + 64 * n));
        const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w->qh + 32 * n)));
        const __m512i q01 = _mm512_or_si512(_mm512_and_si512(b, m15), _mm512_sllv_epi16(_mm512_and_si512(h, mask01), shl01));
        KQ_ACC512(q01, _mm512_permutexvar_epi16(_mm512_load_si512((const void *)kq_idx_q6[2 * n]), sc), 128 * n)
        const __m512i q23 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(b, 4), m15),
                                            _mm512_srlv_epi16(_mm512_and_si512(h, mask23), shr23));
        KQ_ACC512(q23, _mm512_permutexvar_epi16(_mm512_load_si512((const void *)kq_idx_q6[2 * n + 1]), sc), 128 * n + 64)
    }
    KQ_FOLD512();
    KQ_BSUM_CORRECTION(sc8, 5);
}

#else

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

#endif

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

/* lane c: the sum of v[c]'s 8 int32 lanes (exact), for 4 vectors */
KQ_INLINE __m128i kq_row_sums4(const __m256i *v) {
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

/* ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7)) lane by lane: kq_hsum8 of each lane's accumulators */
#define KQ_HSUM8_LANES(add, a) add(add(add(a[0], a[4]), add(a[2], a[6])), add(add(a[1], a[5]), add(a[3], a[7])))

/* The tile for nw weight rows and NX activation rows. A super-block's integer lanes (one ymm per
 * activation row) become isum and msum, the float steps run with lane c = activation row c.
 * Decode (NX = 1) takes one weight row at a time: a two-row interleave ran 30-70% slower per row
 * than this in kquant_dots (2048 x 8192, AVX2). */
#define KQ_AVX2_TILE(t, has_min, DMIN)                                                                              \
    KQ_INLINE void tile_##t##_rows(int K, const void *w, size_t w_row_bytes, int nw, const void *xq,                \
                                   size_t xq_row_bytes, const int NX, float *y, size_t ldy) {                       \
        const int nb = K / QK_K;                                                                                    \
        for (int r = 0; r < nw; r++) {                                                                              \
            const block_##t *row = (const block_##t *)((const char *)w + r * w_row_bytes);                          \
            __m128 accf[8];                                                                                         \
            for (int j = 0; j < 8; j++) accf[j] = _mm_setzero_ps();                                                 \
            for (int i = 0; i < nb; i++) { /* super-block i into accumulator i % 8 */                               \
                const int j = i % 8;                                                                                \
                const block_q8_K *xs[4];                                                                            \
                for (int c = 0; c < NX; c++) xs[c] = (const block_q8_K *)((const char *)xq + c * xq_row_bytes) + i; \
                /* lane c = row c's scale (built in registers: a vector load of 4 scalar stores stalls) */          \
                __m128 vdx = _mm_load_ss(&xs[0]->d);                                                                \
                if (NX > 1) vdx = _mm_insert_ps(vdx, _mm_load_ss(&xs[NX > 1 ? 1 : 0]->d), 0x10);                    \
                if (NX > 2) vdx = _mm_insert_ps(vdx, _mm_load_ss(&xs[NX > 2 ? 2 : 0]->d), 0x20);                    \
                if (NX > 3) vdx = _mm_insert_ps(vdx, _mm_load_ss(&xs[NX > 3 ? 3 : 0]->d), 0x30);                    \
                const block_##t *bb = row + i;                                                                      \
                __m256i acc[4], m[4];                                                                               \
                sb_##t(bb, xs, NX, acc, m);                                                                         \
                for (int c = NX; c < 4; c++) acc[c] = m[c] = _mm256_setzero_si256();                                \
                const __m128i isum = kq_row_sums4(acc), msum = has_min ? kq_row_sums4(m) : isum;                    \
                const __m128 dd = _mm_mul_ps(_mm_set1_ps(kq_half(bb->d)), vdx);                                     \
                accf[j] = _mm_add_ps(accf[j], _mm_mul_ps(dd, _mm_cvtepi32_ps(isum)));                               \
                if (has_min) {                                                                                      \
                    const __m128 dm = _mm_mul_ps(_mm_set1_ps(kq_half(DMIN)), vdx);                                  \
                    accf[j] = _mm_sub_ps(accf[j], _mm_mul_ps(dm, _mm_cvtepi32_ps(msum)));                           \
                }                                                                                                   \
            }                                                                                                       \
            float out[4];                                                                                           \
            _mm_storeu_ps(out, KQ_HSUM8_LANES(_mm_add_ps, accf));                                                   \
            for (int c = 0; c < NX; c++) y[c * ldy + r] = out[c];                                                   \
        }                                                                                                           \
    }                                                                                                               \
    /* Decode, one activation row: 8 super-blocks at a time, whose integers (lane j = super-block          \
     * i0 + j, so accumulator j) then take the float steps as one vector, as the 32-value types do */     \
    __attribute__((noinline)) static void vec_dot_##t(int K, float *y, const void *w, const void *xq) {             \
        const int nb = K / QK_K;                                                                                    \
        const block_##t *row = (const block_##t *)w;                                                                \
        __m256 accf = _mm256_setzero_ps();                                                                          \
        for (int i0 = 0; i0 < nb; i0 += 8) {                                                                        \
            __m256i ia[8], ma[8];                                                                                   \
            float dd[8], dm[8];                                                                                     \
            _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) {                                                   \
                const int i = i0 + j;                                                                               \
                if (i >= nb) { /* no super-block: 0 * 0 leaves the accumulator as it is */                          \
                    ia[j] = ma[j] = _mm256_setzero_si256();                                                         \
                    dd[j] = dm[j] = 0.f;                                                                            \
                    continue;                                                                                       \
                }                                                                                                   \
                const block_q8_K *xs[1] = {(const block_q8_K *)xq + i};                                             \
                const block_##t *bb = row + i;                                                                      \
                __m256i m[1];                                                                                       \
                sb_##t(bb, xs, 1, &ia[j], m);                                                                       \
                ma[j] = has_min ? m[0] : _mm256_setzero_si256();                                                    \
                dd[j] = kq_half(bb->d) * xs[0]->d;                                                                  \
                dm[j] = has_min ? kq_half(DMIN) * xs[0]->d : 0.f;                                                   \
            }                                                                                                       \
            const __m256 vdd = _mm256_setr_ps(dd[0], dd[1], dd[2], dd[3], dd[4], dd[5], dd[6], dd[7]);              \
            accf = _mm256_add_ps(accf, _mm256_mul_ps(vdd, _mm256_cvtepi32_ps(reduce8_epi32(ia))));                  \
            if (has_min) {                                                                                          \
                const __m256 vdm = _mm256_setr_ps(dm[0], dm[1], dm[2], dm[3], dm[4], dm[5], dm[6], dm[7]);          \
                accf = _mm256_sub_ps(accf, _mm256_mul_ps(vdm, _mm256_cvtepi32_ps(reduce8_epi32(ma))));              \
            }                                                                                                       \
        }                                                                                                           \
        float a[8];                                                                                                 \
        _mm256_storeu_ps(a, accf);                                                                                  \
        *y = kq_hsum8(a);                                                                                           \
    }                                                                                                               \
    static void tile_##t(int K, const void *w, size_t w_row_bytes, int nw, const void *xq, size_t xq_row_bytes,     \
                         int nx, float *y, size_t ldy) {                                                            \
        switch (nx) {                                                                                               \
        case 1: /* one call per weight row: inlined into a loop over rows, Q3_K ran at half speed */                \
            for (int r = 0; r < nw; r++) vec_dot_##t(K, y + r, (const char *)w + r * w_row_bytes, xq);              \
            break;                                                                                                  \
        case 2: tile_##t##_rows(K, w, w_row_bytes, nw, xq, xq_row_bytes, 2, y, ldy); break;                         \
        case 3: tile_##t##_rows(K, w, w_row_bytes, nw, xq, xq_row_bytes, 3, y, ldy); break;                         \
        default: tile_##t##_rows(K, w, w_row_bytes, nw, xq, xq_row_bytes, 4, y, ldy); break;                        \
        }                                                                                                           \
    }

KQ_AVX2_TILE(q2_K, true, bb->dmin)
KQ_AVX2_TILE(q3_K, false, bb->d)
KQ_AVX2_TILE(q4_K, true, bb->dmin)
KQ_AVX2_TILE(q5_K, true, bb->dmin)
KQ_AVX2_TILE(q6_K, false, bb->d)

/* ------------------------------------------------------------------ tile8: prompts
 * A prompt's activation rows 8 at a time, interleaved (group_q8_K), so that a ymm holds 4 values
 * of each of 8 rows: a weight super-block is unpacked once, each 4 of its values broadcast meet
 * the 8 rows in one dpbusd, and a group's scale multiplies the 8 rows' sums at once. Per row the
 * integers and float steps are those of the header comment, so every element is vec_dot's. */

/* one super-block of 8 activation rows (rows past the stored ones are zero) */
typedef struct {
    int32_t qs[QK_K / 4][BLOCK_GROUP_ROWS]; /* [4-value group k][row c]: values 4k..4k+3 of row c */
    /* row c's activation sums, [group][row c], so that one vector holds a group's 8 rows: */
    int32_t bsums_by_lane[16][BLOCK_GROUP_ROWS]; /* of 16 values (its bsums); pairs16 holds them too, but
                                                  * widening them there cost Q6_K's VNNI tile8 7% */
    int32_t pairs16[8][BLOCK_GROUP_ROWS];        /* of 16 values, groups 2q and 2q + 1 as two int16 (for madd) */
    int32_t pairs32[4][BLOCK_GROUP_ROWS];        /* of 32 values, groups 2q and 2q + 1 as two int16 */
    float d[BLOCK_GROUP_ROWS];
} kq_group_block;

/* BlockType.group_act: nx (<= 8) q8_K rows, xq_row_bytes apart -> K / 256 kq_group_blocks */
static void group_q8_K(const void *xq, size_t xq_row_bytes, int nx, int K, void *group) {
    kq_group_block *g = (kq_group_block *)group;
    for (int i = 0; i < K / QK_K; i++, g++) {
        for (int c = 0; c < BLOCK_GROUP_ROWS; c++) {
            if (c >= nx) {
                for (int k = 0; k < QK_K / 4; k++) g->qs[k][c] = 0;
                for (int s = 0; s < 16; s++) g->bsums_by_lane[s][c] = 0;
                for (int q = 0; q < 8; q++) g->pairs16[q][c] = 0;
                for (int q = 0; q < 4; q++) g->pairs32[q][c] = 0;
                g->d[c] = 0.f;
                continue;
            }
            const block_q8_K *x = (const block_q8_K *)((const char *)xq + (size_t)c * xq_row_bytes) + i;
            int32_t v[QK_K / 4];
            memcpy(v, x->qs, sizeof v);
            for (int k = 0; k < QK_K / 4; k++) g->qs[k][c] = v[k];
            for (int s = 0; s < 16; s++) g->bsums_by_lane[s][c] = x->bsums[s];
            for (int q = 0; q < 8; q++) memcpy(&g->pairs16[q][c], x->bsums + 2 * q, 4); /* low half: group 2q */
            for (int q = 0; q < 4; q++) {
                const int16_t sums32[2] = {(int16_t)(x->bsums[4 * q] + x->bsums[4 * q + 1]), (int16_t)(x->bsums[4 * q + 2] + x->bsums[4 * q + 3])};
                memcpy(&g->pairs32[q][c], sums32, 4); /* |sum| <= 32 * 128: an int16 */
            }
            g->d[c] = x->d;
        }
    }
}

/* A weight super-block for tile8: the quants as stored unsigned, in value order (written with
 * vector stores, read back by 4-byte broadcasts); the scale of each GS-value group as int32; and
 * what multiplies the activation sums, as int16 pairs against the group block's pairs16 (per-16
 * groups: Q2_K's mins, Q3_K's and Q6_K's scales for their offset) or pairs32 (Q4_K's and Q5_K's
 * mins). */
typedef struct {
    int8_t q[QK_K] __attribute__((aligned(32)));
    int32_t sc[16] __attribute__((aligned(32)));
    int32_t corr[8] __attribute__((aligned(32)));
} kq_unpacked8;

/* Q4_K, Q5_K: 8 scales and 8 mins (scales_mins_k4), each for 32 values */
KQ_INLINE void unpack8_k4_scales(const uint8_t *packed, kq_unpacked8 *u) {
    uint8_t sm[16];
    scales_mins_k4(packed, sm);
    const __m128i v = _mm_loadu_si128((const __m128i *)sm);
    _mm256_store_si256((__m256i *)u->sc, _mm256_cvtepu8_epi32(v));
    _mm_store_si128((__m128i *)u->corr, _mm_cvtepu8_epi16(_mm_srli_si128(v, 8))); /* the 8 mins: 4 pairs */
}

/* the per-16 types: 16 signed scales */
KQ_INLINE void unpack8_scales16(__m128i sc8, kq_unpacked8 *u) {
    _mm256_store_si256((__m256i *)u->sc, _mm256_cvtepi8_epi32(sc8));
    _mm256_store_si256((__m256i *)(u->sc + 8), _mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8)));
    _mm256_store_si256((__m256i *)u->corr, _mm256_cvtepi8_epi16(sc8)); /* against the offset (Q2_K overwrites: mins) */
}

KQ_INLINE void unpack8_q4_K(const block_q4_K *w, kq_unpacked8 *u) {
    unpack8_k4_scales(w->scales, u);
    const __m256i m4 = _mm256_set1_epi8(0xF);
    for (int j = 0; j < 4; j++) {
        const __m256i bits = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * j));
        _mm256_store_si256((__m256i *)(u->q + 64 * j), _mm256_and_si256(bits, m4));
        _mm256_store_si256((__m256i *)(u->q + 64 * j + 32), _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4));
    }
}

KQ_INLINE void unpack8_q5_K(const block_q5_K *w, kq_unpacked8 *u) {
    unpack8_k4_scales(w->scales, u);
    const __m256i m4 = _mm256_set1_epi8(0xF), m1 = _mm256_set1_epi8(1);
    __m256i hb = _mm256_loadu_si256((const __m256i *)w->qh);
    for (int j = 0; j < 4; j++) {
        const __m256i bits = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * j));
        /* hb shifted right by 2j in 16-bit lanes: bits 0 and 1 of each byte are still its own */
        const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(hb, m1), 4);
        const __m256i h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 1), m1), 4);
        hb = _mm256_srli_epi16(hb, 2);
        _mm256_store_si256((__m256i *)(u->q + 64 * j), _mm256_or_si256(_mm256_and_si256(bits, m4), h1));
        _mm256_store_si256((__m256i *)(u->q + 64 * j + 32), _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits, 4), m4), h2));
    }
}

KQ_INLINE void unpack8_q6_K(const block_q6_K *w, kq_unpacked8 *u) {
    unpack8_scales16(_mm_loadu_si128((const __m128i *)w->scales), u);
    const __m256i m15 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
    for (int n = 0; n < 2; n++) {
        const __m256i b1 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * n));
        const __m256i b2 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * n + 32));
        const __m256i h = _mm256_loadu_si256((const __m256i *)(w->qh + 32 * n));
        int8_t *q = u->q + 128 * n;
        _mm256_store_si256((__m256i *)q, _mm256_or_si256(_mm256_and_si256(b1, m15), _mm256_slli_epi16(_mm256_and_si256(h, m3), 4)));
        _mm256_store_si256((__m256i *)(q + 32), _mm256_or_si256(_mm256_and_si256(b2, m15),
                                                                _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(12)), 2)));
        _mm256_store_si256((__m256i *)(q + 64), _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b1, 4), m15),
                                                                _mm256_and_si256(h, _mm256_set1_epi8(48))));
        _mm256_store_si256((__m256i *)(q + 96), _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b2, 4), m15),
                                                                _mm256_srli_epi16(_mm256_and_si256(h, _mm256_set1_epi8((char)0xC0)), 2)));
    }
}

KQ_INLINE void unpack8_q2_K(const block_q2_K *w, kq_unpacked8 *u) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)w->scales), m4 = _mm_set1_epi8(0xF);
    unpack8_scales16(_mm_and_si128(raw, m4), u);
    _mm256_store_si256((__m256i *)u->corr, _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), m4))); /* 16 mins */
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int n = 0; n < 2; n++) {
        const __m256i bits = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * n));
        for (int s = 0; s < 4; s++) _mm256_store_si256((__m256i *)(u->q + 128 * n + 32 * s), _mm256_and_si256(kq_field2(bits, s), m3));
    }
}

KQ_INLINE void unpack8_q3_K(const block_q3_K *w, kq_unpacked8 *u) {
    int8_t sc[16];
    scales_q3_K(w->scales, sc);
    unpack8_scales16(_mm_loadu_si128((const __m128i *)sc), u);
    const __m256i m3 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi8(4);
    const __m256i hm = _mm256_loadu_si256((const __m256i *)w->hmask);
    for (int n = 0; n < 2; n++) {
        const __m256i bits = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * n));
        for (int s = 0; s < 4; s++) { /* the high bit moved to bit 2, as in sb_q3_K */
            const int k = 4 * n + s;
            const __m256i hk = k < 2 ? _mm256_slli_epi16(hm, 2 - k) : k == 2 ? hm : _mm256_srli_epi16(hm, k - 2);
            _mm256_store_si256((__m256i *)(u->q + 32 * k),
                               _mm256_or_si256(_mm256_and_si256(kq_field2(bits, s), m3), _mm256_and_si256(hk, m4)));
        }
    }
}

/* lane c: row c's activation sums . the weight block's corr (GS-value groups), exact: one madd
 * per pair of groups for all 8 rows, no reduction across lanes */
KQ_INLINE __m256i kq_corr_dot(const kq_group_block *g, const kq_unpacked8 *u, const int GS) {
    const int pairs = GS == 32 ? 4 : 8;
    const int32_t(*sums)[BLOCK_GROUP_ROWS] = GS == 32 ? g->pairs32 : g->pairs16;
    __m256i acc = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)sums[0]), _mm256_set1_epi32(u->corr[0]));
    for (int q = 1; q < pairs; q++) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)sums[q]), _mm256_set1_epi32(u->corr[q])));
    return acc;
}

/* Scale groups summed side by side per pass, with NW weight rows and NG groups that many
 * independent chains each: AVX-512VL has 32 vector registers for 4 x 2 x 2 of them, AVX2 16 for
 * 4 x 2 x 1. */
#if defined(__AVX512VL__)
#define KQ_T8_PARTS 2
#else
#define KQ_T8_PARTS 1
#endif

/* NW weight rows x NG consecutive groups (8 activation rows each, lane c = row c): each activation
 * vector is loaded once for the NW rows, each 4 quants of a weight row broadcast once for the
 * NG groups. GS: values per scale (32 for Q4_K and Q5_K, whose two 16-value groups share one,
 * else 16); QMAX: the largest stored quant. With VNNI a scale group's sums run in int32 (dpbusd)
 * and the scale multiplies them once; without, maddubs' int16 pair sums (at most 2 * QMAX * 127)
 * are added in int16 while they cannot overflow (BLOCK_INT16_STEPS: 8 for Q4_K, 2 for Q6_K) and madd
 * applies the scale, which saves AVX2 the widening madd of each step and the 32-bit multiply.
 * The integers are the same either way. */
#if defined(BLOCK_VNNI)
#define KQ_T8_INT32 1
#define KQ_T8_STEP(acc, w, a) dpbusd_avx2((acc), (w), (a))
#else
#define KQ_T8_INT32 0
#define KQ_T8_STEP(acc, w, a) _mm256_add_epi16((acc), _mm256_maddubs_epi16((w), (a)))
#endif

/* The same super-block of the weight rows the driver's next call takes (rows are contiguous, NW at
 * a time), on the driver's first pass over these rows (tile8's prefetch): a batch of 16 rows uses
 * each weight byte once, and the hardware prefetcher alone kept tile8 at 2.8 GB/s a thread from
 * memory (Q4_K 78 GMAC/s against 120 from cache); on rows already in cache the prefetches cost
 * 5-15%. Prefetches past the matrix are dropped, never faults. */
#define KQ_T8_PREFETCH(block, ahead)                                                                                \
    do {                                                                                                            \
        const char *p_ = (const char *)(block) + (ahead);                                                           \
        for (size_t o_ = 0; o_ < sizeof *(block); o_ += 64) _mm_prefetch(p_ + o_, _MM_HINT_T0);                    \
    } while (0)

/* OFF_SHIFT: log2 of the offset the stored quants carry (Q3_K 2, Q6_K 5; 0: none). With VNNI a
 * 16-value group's sum then starts at -offset * (the group's activation sum, bsums_by_lane), so
 * the scale multiplies sum((q - offset) a) and no per-row bsums product is left to add: the same
 * integer, and for Q6_K's prompts 23% of the tile's time (in L1: 89 -> 115 GMAC/s). Without VNNI
 * the int16 sums cannot start there (32 x 2032 overflows), so the product is subtracted after. */
#define KQ_T8_OFFSET_IN_SUMS(OFF_SHIFT, GS) (KQ_T8_INT32 && (OFF_SHIFT) && (GS) == 16)
#define KQ_TILE8(t, has_min, DMIN, GS, QMAX, OFF_SHIFT)                                                                 \
    KQ_INLINE void tile8_##t##_rows(int K, const void *w, size_t w_row_bytes, const int NW, const int NG,           \
                                    const kq_group_block *gb, int nx, float *y, size_t ldy, int prefetch) {         \
        const int nb = K / QK_K;                                                                                    \
        __m256 accf[2][4][8];                                                                                       \
        for (int h = 0; h < NG; h++)                                                                                \
            for (int r = 0; r < NW; r++)                                                                            \
                for (int j = 0; j < 8; j++) accf[h][r][j] = _mm256_setzero_ps();                                    \
        kq_unpacked8 un[4];                                                                                         \
        for (int i = 0; i < nb; i++) {                                                                              \
            const kq_group_block *g[2] = {gb + i, gb + (NG > 1 ? nb : 0) + i}; /* group h's super-block i */        \
            const block_##t *bb[4];                                                                                 \
            for (int r = 0; r < NW; r++) {                                                                          \
                bb[r] = (const block_##t *)((const char *)w + r * w_row_bytes) + i;                                 \
                if (prefetch) KQ_T8_PREFETCH(bb[r], NW * w_row_bytes);                                              \
                unpack8_##t(bb[r], &un[r]);                                                                         \
            }                                                                                                       \
            /* the broadcasts below then load from memory, not extract from the stored registers */                 \
            __asm__ __volatile__("" : : "r"(un) : "memory");                                                        \
            __m256i isum[2][4];                                                                                     \
            for (int h = 0; h < NG; h++)                                                                            \
                for (int r = 0; r < NW; r++) isum[h][r] = _mm256_setzero_si256();                                   \
            for (int s0 = 0; s0 < QK_K / (GS); s0 += KQ_T8_PARTS) {                                                 \
                __m256i part[2][4][KQ_T8_PARTS];                                                                    \
                for (int h = 0; h < NG; h++)                                                                        \
                    for (int s = 0; s < KQ_T8_PARTS; s++) {                                                         \
                        __m256i start = _mm256_setzero_si256();                                                     \
                        if (KQ_T8_OFFSET_IN_SUMS(OFF_SHIFT, GS)) /* -offset * the group's activation sums */        \
                            start = _mm256_sub_epi32(start, _mm256_slli_epi32(_mm256_loadu_si256(                   \
                                (const __m256i *)g[h]->bsums_by_lane[s0 + s]), (OFF_SHIFT)));                        \
                        for (int r = 0; r < NW; r++) part[h][r][s] = start;                                         \
                    }                                                                                               \
                _Pragma("GCC unroll 8") for (int k = 0; k < (GS) / 4; k++) {                                        \
                    _Pragma("GCC unroll 2") for (int s = 0; s < KQ_T8_PARTS; s++) {                                 \
                        const int e = (GS) / 4 * (s0 + s) + k; /* the 4-value group */                              \
                        __m256i a[2];                                                                               \
                        for (int h = 0; h < NG; h++) {                                                              \
                            a[h] = _mm256_loadu_si256((const __m256i *)g[h]->qs[e]);                                \
                            BLOCK_PIN(a[h]); /* one load for the NW rows, not a memory operand of each step */      \
                        }                                                                                           \
                        _Pragma("GCC unroll 4") for (int r = 0; r < NW; r++) {                                      \
                            int32_t q;                                                                              \
                            memcpy(&q, un[r].q + 4 * e, 4);                                                         \
                            const __m256i wq = _mm256_set1_epi32(q);                                                \
                            for (int h = 0; h < NG; h++) {                                                          \
                                part[h][r][s] = KQ_T8_STEP(part[h][r][s], wq, a[h]);                                \
                                BLOCK_PIN(part[h][r][s]); /* without VNNI GCC would do every maddubs first, spilling */ \
                            }                                                                                       \
                        }                                                                                           \
                    }                                                                                               \
                    if (!KQ_T8_INT32 && (k + 1) % BLOCK_INT16_STEPS(QMAX, (GS) / 4) == 0) /* the int16 sums, scaled, into isum */ \
                        for (int h = 0; h < NG; h++)                                                                \
                            for (int r = 0; r < NW; r++)                                                            \
                                for (int s = 0; s < KQ_T8_PARTS; s++) {                                             \
                                    const __m256i sc = _mm256_set1_epi16((short)un[r].sc[s0 + s]);                  \
                                    isum[h][r] = _mm256_add_epi32(isum[h][r], _mm256_madd_epi16(part[h][r][s], sc)); \
                                    part[h][r][s] = _mm256_setzero_si256();                                         \
                                }                                                                                   \
                }                                                                                                   \
                if (KQ_T8_INT32)                                                                                    \
                    for (int h = 0; h < NG; h++)                                                                    \
                        for (int r = 0; r < NW; r++)                                                                \
                            for (int s = 0; s < KQ_T8_PARTS; s++)                                                   \
                                isum[h][r] = _mm256_add_epi32(isum[h][r], _mm256_mullo_epi32(part[h][r][s], _mm256_set1_epi32(un[r].sc[s0 + s]))); \
            }                                                                                                       \
            const int j = i % 8;                                                                                    \
            for (int h = 0; h < NG; h++) {                                                                          \
                const __m256 vdx = _mm256_loadu_ps(g[h]->d);                                                        \
                for (int r = 0; r < NW; r++) {                                                                      \
                    __m256i is = isum[h][r];                                                                        \
                    if ((OFF_SHIFT) && !KQ_T8_OFFSET_IN_SUMS(OFF_SHIFT, GS)) /* the offset, not yet in the sums */  \
                        is = _mm256_sub_epi32(is, _mm256_slli_epi32(kq_corr_dot(g[h], &un[r], (GS)), (OFF_SHIFT)));  \
                    const __m256 dd = _mm256_mul_ps(_mm256_set1_ps(kq_half(bb[r]->d)), vdx);                        \
                    accf[h][r][j] = _mm256_add_ps(accf[h][r][j], _mm256_mul_ps(dd, _mm256_cvtepi32_ps(is)));        \
                    if (has_min) {                                                                                  \
                        const __m256 dm = _mm256_mul_ps(_mm256_set1_ps(kq_half(DMIN)), vdx);                        \
                        accf[h][r][j] = _mm256_sub_ps(accf[h][r][j], _mm256_mul_ps(dm, _mm256_cvtepi32_ps(kq_corr_dot(g[h], &un[r], (GS))))); \
                    }                                                                                               \
                }                                                                                                   \
            }                                                                                                       \
        }                                                                                                           \
        for (int h = 0; h < NG; h++)                                                                                \
            for (int r = 0; r < NW; r++) {                                                                          \
                float out[BLOCK_GROUP_ROWS];                                                                        \
                _mm256_storeu_ps(out, KQ_HSUM8_LANES(_mm256_add_ps, accf[h][r]));                                   \
                for (int c = 0; c < BLOCK_GROUP_ROWS && BLOCK_GROUP_ROWS * h + c < nx; c++)                         \
                    y[(BLOCK_GROUP_ROWS * h + c) * ldy + r] = out[c];                                               \
            }                                                                                                       \
    }                                                                                                               \
    static void tile8_##t(int K, const void *w, size_t w_row_bytes, int nw, const void *group, int nx, float *y,    \
                          size_t ldy, int prefetch) {                                                               \
        const kq_group_block *gb = (const kq_group_block *)group;                                                   \
        if (nw == 4 && nx > BLOCK_GROUP_ROWS) {                                                                     \
            tile8_##t##_rows(K, w, w_row_bytes, 4, 2, gb, nx, y, ldy, prefetch);                                    \
        } else if (nw == 4) {                                                                                       \
            tile8_##t##_rows(K, w, w_row_bytes, 4, 1, gb, nx, y, ldy, prefetch);                                    \
        } else { /* the matrix's last rows: nothing after them to prefetch */                                       \
            for (int h = 0; BLOCK_GROUP_ROWS * h < nx; h++)                                                         \
                for (int r = 0; r < nw; r++)                                                                        \
                    tile8_##t##_rows(K, (const char *)w + r * w_row_bytes, 0, 1, 1, gb + h * (K / QK_K),            \
                                     nx - BLOCK_GROUP_ROWS * h, y + BLOCK_GROUP_ROWS * h * ldy + r, ldy, 0);        \
        }                                                                                                           \
    }

KQ_TILE8(q2_K, true, bb[r]->dmin, 16, 3, 0)
KQ_TILE8(q3_K, false, bb[r]->d, 16, 7, 2)
KQ_TILE8(q4_K, true, bb[r]->dmin, 32, 15, 0)
KQ_TILE8(q5_K, true, bb[r]->dmin, 32, 31, 0)
KQ_TILE8(q6_K, false, bb[r]->d, 16, 63, 5)

#endif /* KQ_AVX2 */

/* ================================================================== the BlockTypes */

#if defined(KQ_AVX2)
#define KQ_PROMPT_KERNELS(t) .tile8 = tile8_##t, .group_act = group_q8_K, .group_block_bytes = sizeof(kq_group_block),
#else
#define KQ_PROMPT_KERNELS(t)
#endif

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
        KQ_PROMPT_KERNELS(t)                                                                                        \
    };

KQ_BLOCK_TYPE(q2_K, Q2_K)
KQ_BLOCK_TYPE(q3_K, Q3_K)
KQ_BLOCK_TYPE(q4_K, Q4_K)
KQ_BLOCK_TYPE(q5_K, Q5_K)
KQ_BLOCK_TYPE(q6_K, Q6_K)
