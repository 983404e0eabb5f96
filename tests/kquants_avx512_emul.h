/* The AVX-512 intrinsics kquants.c uses, written as plain C on 64-byte arrays, so that its
 * AVX-512 path runs (slowly) on a machine without AVX-512. tests/test_kquants.py compiles
 * kquants.c with `-mavx2 -mfma -mf16c -DKQ_AVX512_EMULATED -include tests/kquants_avx512_emul.h`
 * and checks those bits against the portable path. Semantics as in Intel's intrinsics guide. */
#ifndef KQUANTS_AVX512_EMUL_H
#define KQUANTS_AVX512_EMUL_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    union {
        int8_t b[64];
        uint8_t ub[64];
        int16_t w[32];
        uint16_t uw[32];
        int32_t d[16];
        __m256i h[2];
    };
} kq_m512i;

static inline kq_m512i kq512_setzero(void) {
    kq_m512i r;
    memset(&r, 0, sizeof r);
    return r;
}
static inline kq_m512i kq512_set1_epi8(char v) {
    kq_m512i r;
    memset(r.b, v, 64);
    return r;
}
static inline kq_m512i kq512_set1_epi16(short v) {
    kq_m512i r;
    for (int i = 0; i < 32; i++) r.w[i] = v;
    return r;
}
static inline kq_m512i kq512_inserti64x4(kq_m512i a, __m256i b, int imm) {
    a.h[imm & 1] = b;
    return a;
}
static inline kq_m512i kq512_castsi256_si512(__m256i v) {
    kq_m512i r = kq512_setzero();
    r.h[0] = v;
    return r;
}
static inline __m256i kq512_castsi512_si256(kq_m512i a) { return a.h[0]; }
static inline __m256i kq512_extracti64x4_epi64(kq_m512i a, int imm) { return a.h[imm & 1]; }
static inline kq_m512i kq512_broadcast_i64x4(__m256i v) {
    kq_m512i r;
    r.h[0] = r.h[1] = v;
    return r;
}
static inline kq_m512i kq512_srlv_epi16(kq_m512i a, kq_m512i c) {
    for (int i = 0; i < 32; i++) a.uw[i] = c.uw[i] > 15 ? 0 : (uint16_t)(a.uw[i] >> c.uw[i]);
    return a;
}
static inline kq_m512i kq512_sllv_epi16(kq_m512i a, kq_m512i c) {
    for (int i = 0; i < 32; i++) a.uw[i] = c.uw[i] > 15 ? 0 : (uint16_t)(a.uw[i] << c.uw[i]);
    return a;
}
static inline kq_m512i kq512_srli_epi16(kq_m512i a, unsigned n) {
    for (int i = 0; i < 32; i++) a.uw[i] = n > 15 ? 0 : (uint16_t)(a.uw[i] >> n);
    return a;
}
static inline kq_m512i kq512_slli_epi16(kq_m512i a, unsigned n) {
    for (int i = 0; i < 32; i++) a.uw[i] = n > 15 ? 0 : (uint16_t)(a.uw[i] << n);
    return a;
}
static inline kq_m512i kq512_and_si512(kq_m512i a, kq_m512i b) {
    for (int i = 0; i < 64; i++) a.ub[i] &= b.ub[i];
    return a;
}
static inline kq_m512i kq512_or_si512(kq_m512i a, kq_m512i b) {
    for (int i = 0; i < 64; i++) a.ub[i] |= b.ub[i];
    return a;
}
static inline kq_m512i kq512_loadu_si512(const void *p) {
    kq_m512i r;
    memcpy(r.b, p, 64);
    return r;
}
static inline kq_m512i kq512_load_si512(const void *p) {
    if ((uintptr_t)p % 64) __builtin_trap(); /* the real one faults on a misaligned address */
    return kq512_loadu_si512(p);
}
static inline kq_m512i kq512_permutexvar_epi16(kq_m512i idx, kq_m512i a) {
    kq_m512i r;
    for (int i = 0; i < 32; i++) r.w[i] = a.w[idx.uw[i] & 31];
    return r;
}
static inline kq_m512i kq512_maddubs_epi16(kq_m512i a, kq_m512i b) {
    kq_m512i r;
    for (int i = 0; i < 32; i++) {
        const int v = a.ub[2 * i] * b.b[2 * i] + a.ub[2 * i + 1] * b.b[2 * i + 1];
        r.w[i] = (int16_t)(v > 32767 ? 32767 : v < -32768 ? -32768 : v);
    }
    return r;
}
static inline kq_m512i kq512_madd_epi16(kq_m512i a, kq_m512i b) {
    kq_m512i r;
    for (int i = 0; i < 16; i++) r.d[i] = (int32_t)((int64_t)a.w[2 * i] * b.w[2 * i] + (int64_t)a.w[2 * i + 1] * b.w[2 * i + 1]);
    return r;
}
static inline kq_m512i kq512_add_epi32(kq_m512i a, kq_m512i b) {
    for (int i = 0; i < 16; i++) a.d[i] = (int32_t)((uint32_t)a.d[i] + (uint32_t)b.d[i]);
    return a;
}

#define __m512i kq_m512i
#define _mm512_setzero_si512 kq512_setzero
#define _mm512_set1_epi8 kq512_set1_epi8
#define _mm512_set1_epi16 kq512_set1_epi16
#define _mm512_inserti64x4 kq512_inserti64x4
#define _mm512_castsi256_si512 kq512_castsi256_si512
#define _mm512_castsi512_si256 kq512_castsi512_si256
#define _mm512_extracti64x4_epi64 kq512_extracti64x4_epi64
#define _mm512_broadcast_i64x4 kq512_broadcast_i64x4
#define _mm512_srlv_epi16 kq512_srlv_epi16
#define _mm512_sllv_epi16 kq512_sllv_epi16
#define _mm512_srli_epi16 kq512_srli_epi16
#define _mm512_slli_epi16 kq512_slli_epi16
#define _mm512_and_si512 kq512_and_si512
#define _mm512_or_si512 kq512_or_si512
#define _mm512_loadu_si512 kq512_loadu_si512
#define _mm512_load_si512 kq512_load_si512
#define _mm512_permutexvar_epi16 kq512_permutexvar_epi16
#define _mm512_maddubs_epi16 kq512_maddubs_epi16
#define _mm512_madd_epi16 kq512_madd_epi16
#define _mm512_add_epi32 kq512_add_epi32

#endif
