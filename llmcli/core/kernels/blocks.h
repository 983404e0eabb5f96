/* GGML block layouts, byte for byte as llama.cpp writes them into GGUF files (ggml-common.h),
 * and the contract every block kernel of llmcli follows.
 *
 * Weights stay in these structs, read straight from the memory-mapped GGUF file. Activations are
 * quantized on the fly, one row at a time, to an 8-bit block type (block_q8_0-like for the
 * 32-value types, block_q8_K for the K-quants), and a dot product of a weight row with an
 * activation row is done in integers, as ggml does.
 *
 * Determinism contract (what the tests check):
 *   1. An output element y[m, n] depends only on activation row m and weight row n: never on the
 *      number of rows M, the tile, the thread count or the thread that computes it. So a record's
 *      numbers are the same alone or in a batch of any size.
 *   2. Every ISA path (portable C, AVX2, AVX-512, NEON) gives the same bits as the portable path:
 *      integer partial sums are exact whatever their order, and the float operations that combine
 *      them (scales, accumulation, the final horizontal sum) follow one written order per type,
 *      with no fused multiply-add unless the portable reference uses fmaf at the same place.
 *      Block sources are compiled with -ffp-contract=off so the compiler cannot fuse differently
 *      per ISA.
 */
#ifndef LLMCLI_BLOCKS_H
#define LLMCLI_BLOCKS_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#if defined(__AVX2__) && !defined(LLMCLI_PORTABLE)
#include <immintrin.h>

#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define BLOCK_VNNI 1 /* dpbusd on ymm registers */
#endif

/* Without VNNI: of maddubs steps whose int16 pair sums are at most 2 * qmax * 127 each, how many
 * can be added in int16 before a sum could overflow (at most max_steps) */
#define BLOCK_INT16_STEPS(qmax, max_steps) \
    (32767 / (2 * (qmax) * 127) < (max_steps) ? 32767 / (2 * (qmax) * 127) : (max_steps))

/* acc + unsigned bytes a . signed bytes b: lane j adds the sum over bytes 4j..4j+3 (exact: without
 * VNNI the byte pairs' sums must stay below 2^15, which the callers' value ranges guarantee) */
static inline __m256i dpbusd_avx2(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

/* Keeps v in a register at this point: GCC otherwise reassociates exact integer sums into all
 * products first and spills them to the stack */
#define BLOCK_PIN(v) __asm__("" : "+x"(v))

/* the 8 lane sums of v[0..7] as one vector: lane j = sum of v[j]'s lanes (exact: int32 adds) */
static inline __m256i reduce8_epi32(const __m256i *v) {
    const __m256i a0 = _mm256_hadd_epi32(v[0], v[1]), a1 = _mm256_hadd_epi32(v[2], v[3]);
    const __m256i a2 = _mm256_hadd_epi32(v[4], v[5]), a3 = _mm256_hadd_epi32(v[6], v[7]);
    const __m256i b0 = _mm256_hadd_epi32(a0, a1), b1 = _mm256_hadd_epi32(a2, a3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20), _mm256_permute2x128_si256(b0, b1, 0x31));
}
#endif

typedef uint16_t ggml_half; /* IEEE binary16 bits */

/* ggml_type ids (ggml.h), the numbers GGUF stores per tensor */
enum {
    GGML_TYPE_F32 = 0,
    GGML_TYPE_F16 = 1,
    GGML_TYPE_Q4_0 = 2,
    GGML_TYPE_Q4_1 = 3,
    GGML_TYPE_Q5_0 = 6,
    GGML_TYPE_Q5_1 = 7,
    GGML_TYPE_Q8_0 = 8,
    GGML_TYPE_Q8_1 = 9,
    GGML_TYPE_Q2_K = 10,
    GGML_TYPE_Q3_K = 11,
    GGML_TYPE_Q4_K = 12,
    GGML_TYPE_Q5_K = 13,
    GGML_TYPE_Q6_K = 14,
    GGML_TYPE_Q8_K = 15,
    GGML_TYPE_BF16 = 30,
};

/* ------------------------------------------------------------------ 32-value blocks */

#define QK4_0 32
typedef struct {
    ggml_half d;           /* delta */
    uint8_t qs[QK4_0 / 2]; /* nibbles: value j in the low nibble of qs[j], value j+16 in the high one */
} block_q4_0;              /* 18 bytes; x = d * (q - 8) */

#define QK4_1 32
typedef struct {
    ggml_half d;           /* delta */
    ggml_half m;           /* min */
    uint8_t qs[QK4_1 / 2]; /* nibbles, as block_q4_0 */
} block_q4_1;              /* 20 bytes; x = d * q + m */

#define QK5_0 32
typedef struct {
    ggml_half d;           /* delta */
    uint8_t qh[4];         /* 5th bit of each value (little-endian uint32, bit j = value j) */
    uint8_t qs[QK5_0 / 2]; /* low 4 bits, as block_q4_0 */
} block_q5_0;              /* 22 bytes; x = d * (q - 16) */

#define QK5_1 32
typedef struct {
    ggml_half d;
    ggml_half m;
    uint8_t qh[4];
    uint8_t qs[QK5_1 / 2];
} block_q5_1; /* 24 bytes; x = d * q + m */

#define QK8_0 32
typedef struct {
    ggml_half d;      /* delta */
    int8_t qs[QK8_0]; /* quants */
} block_q8_0;         /* 34 bytes; x = d * q */

/* ------------------------------------------------------------------ K-quants: super-blocks of 256 */

#define QK_K 256
#define K_SCALE_SIZE 12

typedef struct {
    uint8_t scales[QK_K / 16]; /* scales and mins, 4 bits each */
    uint8_t qs[QK_K / 4];      /* 2-bit quants */
    ggml_half d;               /* super-block scale for the quantized scales */
    ggml_half dmin;            /* super-block scale for the quantized mins */
} block_q2_K;                  /* 84 bytes */

typedef struct {
    uint8_t hmask[QK_K / 8]; /* high bit of the quants */
    uint8_t qs[QK_K / 4];    /* low 2 bits */
    uint8_t scales[12];      /* 16 scales of 6 bits */
    ggml_half d;             /* super-block scale */
} block_q3_K;                /* 110 bytes */

typedef struct {
    ggml_half d;                   /* super-block scale for the quantized scales */
    ggml_half dmin;                /* super-block scale for the quantized mins */
    uint8_t scales[K_SCALE_SIZE];  /* 8 scales and 8 mins of 6 bits */
    uint8_t qs[QK_K / 2];          /* 4-bit quants */
} block_q4_K;                      /* 144 bytes */

typedef struct {
    ggml_half d;
    ggml_half dmin;
    uint8_t scales[K_SCALE_SIZE]; /* 8 scales and 8 mins of 6 bits */
    uint8_t qh[QK_K / 8];         /* high bit of the quants */
    uint8_t qs[QK_K / 2];         /* low 4 bits */
} block_q5_K;                     /* 176 bytes */

typedef struct {
    uint8_t ql[QK_K / 2];     /* low 4 bits */
    uint8_t qh[QK_K / 4];     /* upper 2 bits */
    int8_t scales[QK_K / 16]; /* 8-bit scales */
    ggml_half d;              /* super-block scale */
} block_q6_K;                 /* 210 bytes */

/* The K-quants' activation block (ggml's block_q8_K): float delta, 256 int8 quants, and the
 * sums of each group of 16 quants (the K-quants' mins multiply these). */
typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
} block_q8_K; /* 292 bytes */

_Static_assert(sizeof(block_q4_0) == 18, "block_q4_0 layout");
_Static_assert(sizeof(block_q4_1) == 20, "block_q4_1 layout");
_Static_assert(sizeof(block_q5_0) == 22, "block_q5_0 layout");
_Static_assert(sizeof(block_q5_1) == 24, "block_q5_1 layout");
_Static_assert(sizeof(block_q8_0) == 34, "block_q8_0 layout");
_Static_assert(sizeof(block_q2_K) == 84, "block_q2_K layout");
_Static_assert(sizeof(block_q3_K) == 110, "block_q3_K layout");
_Static_assert(sizeof(block_q4_K) == 144, "block_q4_K layout");
_Static_assert(sizeof(block_q5_K) == 176, "block_q5_K layout");
_Static_assert(sizeof(block_q6_K) == 210, "block_q6_K layout");
_Static_assert(sizeof(block_q8_K) == 292, "block_q8_K layout");

/* ------------------------------------------------------------------ half precision */

/* binary16 -> float, exact (every half is a float), without F16C so every ISA path agrees */
static inline float half_to_float(ggml_half h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13); /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else { /* subnormal half: normalise */
        exp = 113;
        while (!(mant & 0x400)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* float -> binary16, round to nearest even (what F16C's _cvtss_sh and numpy do) */
static inline ggml_half float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) return (ggml_half)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
    if (absx >= 0x477ff000u) return (ggml_half)(sign | 0x7c00); /* overflows to inf */
    if (absx < 0x38800000u) {                                   /* subnormal half or zero */
        if (absx < 0x33000000u) return (ggml_half)sign;
        const uint32_t e = absx >> 23, m = (absx & 0x7fffff) | 0x800000;
        const uint32_t shift = 126 - e; /* 14..24 */
        uint32_t h = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (ggml_half)(sign | h);
    }
    uint32_t h = ((absx >> 13) - (112u << 10));
    const uint32_t rem = absx & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (ggml_half)(sign | h);
}

static inline float bf16_to_float(uint16_t b) {
    const uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* ------------------------------------------------------------------ one weight type's kernels */

typedef struct {
    int type;            /* GGML_TYPE_* */
    int block;           /* values per weight block: 1 (F32/F16/BF16), 32 or 256 */
    int block_bytes;     /* bytes per weight block */
    int act_block_bytes; /* bytes of the quantized activation for `block` values (4*block: float32 activations, F32/F16/BF16) */
    void (*quantize_act)(const float *x, void *xq, int K);          /* one activation row -> activation blocks */
    void (*vec_dot)(int K, float *s, const void *w, const void *xq); /* one weight row . one activation row */
    void (*dequantize_row)(const void *w, float *y, int K);         /* one weight row -> K floats */
    void (*quantize_row)(const float *x, void *w, int K);           /* K floats -> weight blocks; bytes identical to llama.cpp's quantize_row_<t>_ref */
    /* optional (NULL if absent): nw (<= 4) weight rows x nx (<= 4) activation rows at once, every element bit-identical to vec_dot */
    void (*tile)(int K, const void *w, size_t w_row_bytes, int nw, const void *xq, size_t xq_row_bytes, int nx, float *y, size_t ldy);
    /* optional (NULL if absent), for prompts: nw (<= 4) weight rows x one or two consecutive
     * groups of BLOCK_GROUP_ROWS activation rows that group_act interleaved (nx <= 2 *
     * BLOCK_GROUP_ROWS of them stored; group 1 follows group 0's K / block blocks), every element
     * bit-identical to vec_dot. prefetch: this is the caller's first pass over these weight rows
     * and its next call takes the nw rows after them, whose blocks the kernel then prefetches
     * (their first pass comes from memory; a pass over rows already in cache gains nothing). */
    void (*tile8)(int K, const void *w, size_t w_row_bytes, int nw, const void *group, int nx, float *y, size_t ldy, int prefetch);
    /* nx (<= BLOCK_GROUP_ROWS) quantized activation rows, xq_row_bytes apart -> one group of
     * K / block blocks of group_block_bytes each (the missing rows zero) */
    void (*group_act)(const void *xq, size_t xq_row_bytes, int nx, int K, void *group);
    size_t group_block_bytes;
} BlockType;

/* activation rows per group of tile8 */
#define BLOCK_GROUP_ROWS 8

/* ------------------------------------------------------------------ the driver (blocks.c)
 * Beside the exported API (block_matmul, block_dequantize_rows, block_quantize_rows,
 * block_type_supported, block_isa): the type table, and the product of several weight matrices
 * side by side, which matvec.c's fused projections (Linear kind 3) use. */

/* this build's kernels for a ggml type, or NULL (the K-quants when kquants.c is not linked in) */
const BlockType *block_type_get(int type);

/* One part of a product: n weight rows of one type, their outputs at column `col` of y. */
typedef struct {
    int type;
    const void *w;
    const float *bias; /* NULL for none */
    int n;
    int col;
} BlockPart;

/* y[:, part.col + j] = x W_part^T + bias for every part, in one parallel region; y rows are
 * N_ld floats apart. Returns 0, -1 (no memory), -2 (a type this build lacks), -3 (K is not a
 * whole number of a part's blocks). */
int block_matmul_parts(const BlockPart *parts, int nparts, const float *x, float *y, int M, int N_ld, int K);

/* Runs fn(ctx, task, worker) for task = 0..ntasks-1 on at most `threads` threads (<= 0: the
 * kernels' thread count) of blocks.c's task pool and returns when every task has finished.
 * worker: 0 for the calling thread, 1..threads-1 for the pool's helpers (an index for per-thread
 * scratch). Tasks must write disjoint outputs. */
/* the kernels' thread count: matvec.c's (--threads) when it is linked in, else OpenMP's, else 1 */
int block_threads(void);
typedef void (*block_task_fn)(void *ctx, int task, int worker);
void block_pool_run(int ntasks, int threads, block_task_fn fn, void *ctx);
/* The same for a call on M activation rows: the pool up to BLOCK_POOL_MAX_ROWS rows (decode),
 * OpenMP above (prompts). */
#define BLOCK_POOL_MAX_ROWS 16
/* A row-wise op: fn(ctx, m) for m = 0..M-1, rows of `cost` work each, split into tasks run by
 * block_tasks_run (one task when splitting would cost more than it saves; nothing for M = 0). */
typedef void (*block_row_fn)(void *ctx, int m);
void block_rows_run(int M, long cost, block_row_fn fn, void *ctx);
void block_tasks_run(int M, int ntasks, int threads, block_task_fn fn, void *ctx);

/* the K-quants, defined in kquants.c */
extern const BlockType block_type_q2_K __attribute__((weak));
extern const BlockType block_type_q3_K __attribute__((weak));
extern const BlockType block_type_q4_K __attribute__((weak));
extern const BlockType block_type_q5_K __attribute__((weak));
extern const BlockType block_type_q6_K __attribute__((weak));

#endif
