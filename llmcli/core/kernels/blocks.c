/* The block-kernel framework: y = x W^T + bias with W in GGML's block formats, read as the GGUF
 * file stores it (blocks.h), plus dequantization (embedding lookups) and quantization (llmcli
 * quantize, --quantize) of whole rows.
 *
 * Driver (block_matmul, block_matmul_parts): each activation row is quantized once into a buffer
 * shared by all threads (8-bit blocks for the quantized types, float32 as it is for F32/F16/BF16),
 * then threads take tasks of (a chunk of weight rows x a chunk of activation rows). A chunk of
 * weight rows is sized to stay in L2 while the activation rows of its task stream past it; for one
 * activation row (decode) the threads split the weight rows and each row is read once. Inside a
 * task a type's `tile` computes up to 4 weight rows x 4 activation rows, unpacking each weight
 * block once for all of them; for 8 rows or more the types with a `tile8` (the 32-value types on
 * every ISA, the K-quants on x86) take the activation rows in groups of 8, interleaved once per
 * call by the type's `group_act` (one vector lane per row), and `tile8` runs 4 weight rows x 2
 * groups at a time.
 *
 * The 32-value types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) take the activation as 8-bit blocks: a float32
 * delta d = amax / 127, 32 int8 values round(x / d) (round half to even) and s = d * sum(q) for the
 * types with a min. Their dot product, on every ISA, is this one sequence of float operations:
 *
 *     for each block b in order, j = b mod 8 (8 accumulators, so consecutive blocks do not wait
 *     on each other):
 *         acc[j] = fma((float)isum, dw * da, acc[j])    (isum: the exact int32 sum of the block's
 *                                                        32 products; dw: the weight's delta)
 *         types with a min:  acc[j] = fma(mw, sa, acc[j])
 *     result = hsum8(acc),  hsum8(a) = ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))
 *
 * A fused multiply-add is one rounding on every ISA (fmaf in C). Decode vectorizes this over 8
 * consecutive blocks of one row pair, a prompt over 8 activation rows (one block at a time): the
 * same operations on the same values.
 *
 * F32/F16/BF16 take float32 activations: 32 lanes, lane j summing w[32i+j]*x[32i+j] over i in
 * order (mul, then add; the last chunk zero-padded), then lanes l, l+8, l+16, l+24 combined as
 * (a_l + a_{l+8}) + (a_{l+16} + a_{l+24}) and hsum8 of those 8.
 *
 * No other fused multiply-add (this file is compiled with -ffp-contract=off), so the portable C,
 * AVX2, AVX-512 and NEON paths give the same bits, and an output element never depends on the
 * number of rows, the tile or the thread (blocks.h's contract).
 */
#include "blocks.h"

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(LLMCLI_PORTABLE)
#define ISA_NAME "portable"
#elif defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define USE_AVX2 1
#define USE_AVX512 1
#define ISA_NAME "avx512"
#elif defined(__AVX2__) && defined(__F16C__)
#define USE_AVX2 1
#define ISA_NAME "avx2"
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define USE_NEON 1
#define ISA_NAME "neon"
#else
#define ISA_NAME "portable"
#endif

#if defined(USE_AVX2)
#include <immintrin.h> /* AVX-512 builds use the AVX2 code, with an even and an odd block per register in the 32-value dot products */
#elif defined(USE_NEON)
#include <arm_neon.h>
#endif

/* ------------------------------------------------------------------ threads
 * matvec.c's thread count (kernels.set_threads) when it is linked in; a standalone build (the C
 * test harness) runs on OpenMP's own count, or on one thread without OpenMP. */
int matvec_threads(void) __attribute__((weak));

int block_threads(void) {
    if (matvec_threads) return matvec_threads();
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* ------------------------------------------------------------------ the task pool
 * Why not `omp parallel for`: every OpenMP region ends in a barrier that waits for every thread
 * of the team, including one the OS has not scheduled yet. A decode step runs about five regions
 * per layer, and on a machine busier than its cores each of those waits lasts a scheduler slice:
 * SmolLM2 decoded at 0.6 tokens/s on 2 threads at load 15. Here the tasks of a call are claimed
 * one at a time from a shared counter, and the caller waits only for tasks a helper has claimed
 * and not yet finished: a helper that has not woken up by the time the caller ran every task finds
 * nothing left, so a call is never slower than running it alone. Which thread runs a task never
 * changes the bits (blocks.h's contract). Helpers spin briefly between calls (a decode step issues
 * one every few tens of microseconds), then sleep on a condition variable. One caller at a time:
 * a second concurrent caller (another Python thread) runs its tasks on its own thread. */

#define POOL_MAX_HELPERS 63
#define POOL_CLOSED 0xFFFFFFFFu /* the task index while the caller rewrites the job */
#define POOL_SPINS 4000         /* about 50 us of pause instructions before a helper sleeps */

static struct {
    pthread_mutex_t lock;       /* held by the one caller running a job */
    pthread_mutex_t sleep_lock; /* with `wake`: helpers waiting for a job */
    pthread_cond_t wake;
    _Atomic int sleepers;
    _Atomic uint64_t next;      /* job generation << 32 | the next task index */
    _Atomic int done;           /* tasks of the current job finished */
    _Atomic(block_task_fn) fn;
    _Atomic(void *) ctx;
    _Atomic int ntasks;
    _Atomic int helpers;        /* helpers 1..helpers take part in the current job */
    int started;                /* helper threads created */
    uint32_t gen;               /* the caller's generation counter */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#if defined(USE_AVX2)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* the caller's job generation, changed by each call (the helpers' signal) */
static inline uint32_t pool_gen(void) { return (uint32_t)(atomic_load(&pool.next) >> 32); }

static void *pool_helper(void *arg) {
    const int id = (int)(intptr_t)arg;
    uint32_t seen = pool_gen();
    for (;;) {
        uint64_t v = atomic_load(&pool.next);
        const uint32_t g = (uint32_t)(v >> 32);
        if (g != seen && (uint32_t)v != POOL_CLOSED) {
            /* A claim succeeds only while `next` still holds v: the caller closes the job before it
             * rewrites the fields, so fields read between the load and a successful claim are this
             * job's (every access is sequentially consistent). */
            const block_task_fn fn = atomic_load(&pool.fn);
            void *const ctx = atomic_load(&pool.ctx);
            const uint32_t n = (uint32_t)atomic_load(&pool.ntasks);
            if (id <= atomic_load(&pool.helpers)) {
                while ((uint32_t)(v >> 32) == g && (uint32_t)v < n) {
                    if (atomic_compare_exchange_weak(&pool.next, &v, v + 1)) {
                        fn(ctx, (int)(uint32_t)v, id);
                        atomic_fetch_add(&pool.done, 1);
                        v = atomic_load(&pool.next);
                    }
                }
                if ((uint32_t)(v >> 32) != g) continue; /* a newer job already: look at it */
            }
            seen = g;
            continue;
        }
        if (g != seen) continue; /* the caller is between closing and opening a job */
        for (int spin = 0; spin < POOL_SPINS && pool_gen() == seen; spin++) cpu_relax();
        if (pool_gen() != seen) continue;
        pthread_mutex_lock(&pool.sleep_lock);
        atomic_fetch_add(&pool.sleepers, 1);
        while (pool_gen() == seen) pthread_cond_wait(&pool.wake, &pool.sleep_lock);
        atomic_fetch_sub(&pool.sleepers, 1);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
    return NULL;
}

/* a forked child has no helpers: it starts its own (and the locks may have been held at the fork) */
static void pool_after_fork(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.sleep_lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    atomic_store(&pool.sleepers, 0);
    pool.started = 0;
}

static void pool_start(int helpers) {
    if (pool.started == 0) pthread_atfork(NULL, NULL, pool_after_fork);
    while (pool.started < helpers) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&thread, &attr, pool_helper, (void *)(intptr_t)(pool.started + 1));
        pthread_attr_destroy(&attr);
        if (failed) break; /* fewer helpers: the caller runs what they do not */
        pool.started++;
    }
}

void block_pool_run(int ntasks, int threads, block_task_fn fn, void *ctx) {
    int helpers = (threads > 0 ? threads : block_threads()) - 1;
    helpers = helpers > POOL_MAX_HELPERS ? POOL_MAX_HELPERS : helpers;
    if (ntasks <= 0) return;
    if (ntasks == 1 || helpers <= 0 || pthread_mutex_trylock(&pool.lock) != 0) {
        for (int t = 0; t < ntasks; t++) fn(ctx, t, 0);
        return;
    }
    pool_start(helpers);
    const uint64_t g = (uint64_t)(++pool.gen == 0 ? ++pool.gen : pool.gen) << 32; /* 0: the helpers' first `seen` */
    atomic_store(&pool.next, g | POOL_CLOSED);
    atomic_store(&pool.fn, fn);
    atomic_store(&pool.ctx, ctx);
    atomic_store(&pool.ntasks, ntasks);
    atomic_store(&pool.helpers, helpers);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.next, g);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.sleep_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
    for (;;) {
        const uint32_t t = (uint32_t)atomic_fetch_add(&pool.next, 1);
        if (t >= (uint32_t)ntasks) break;
        fn(ctx, (int)t, 0);
        atomic_fetch_add(&pool.done, 1);
    }
    /* only tasks a helper claimed and has not finished are left */
    for (int spin = 0; atomic_load(&pool.done) < ntasks; spin++) {
        if (spin < POOL_SPINS) cpu_relax();
        else sched_yield(); /* that helper lost its core: give it ours */
    }
    pthread_mutex_unlock(&pool.lock);
}

/* Tasks of a call on M activation rows: the pool for decode-sized calls (many small calls a step,
 * where OpenMP's barriers cost the most), OpenMP's team for prompts, whose few large regions
 * alternate with torch's own OpenMP ops: the same runtime then keeps its threads. A decode step
 * must then start no OpenMP region at all (attention, activations and norms run here too, torch
 * on one thread: threads.serial_torch_ops): a team's threads spin for milliseconds after a region,
 * on the cores the pool's helpers need. */
void block_tasks_run(int M, int ntasks, int threads, block_task_fn fn, void *ctx) {
#ifdef _OPENMP
    if (M > BLOCK_POOL_MAX_ROWS && ntasks > 1) {
        const int n = threads > 0 ? threads : block_threads();
#pragma omp parallel for schedule(static) num_threads(n)
        for (int t = 0; t < ntasks; t++) fn(ctx, t, omp_get_thread_num());
        return;
    }
#endif
    (void)M;
    block_pool_run(ntasks, threads, fn, ctx);
}

typedef struct {
    block_row_fn fn;
    void *ctx;
    int M, rows; /* rows per task */
} RowsJob;

static void rows_task(void *ctx, int t, int worker) {
    (void)worker;
    const RowsJob *j = (const RowsJob *)ctx;
    for (int m = t * j->rows; m < j->M && m < (t + 1) * j->rows; m++) j->fn(j->ctx, m);
}

void block_rows_run(int M, long cost, block_row_fn fn, void *ctx) {
    if (M <= 0) return; /* a packed step may ask for no rows (no logits wanted): nothing to run */
    /* one task when splitting would cost more than it saves */
    const int threads = block_threads();
    const int tasks = (long)M * cost < 65536 ? 1 : M < 4 * threads ? M : 4 * threads;
    RowsJob job = {fn, ctx, M, (M + tasks - 1) / tasks};
    block_tasks_run(M, (M + job.rows - 1) / job.rows, 0, rows_task, &job);
}

/* ------------------------------------------------------------------ shared pieces */

#if defined(USE_AVX2)
#define H2F(h) _cvtsh_ss(h) /* F16C: exact, as half_to_float */
#elif defined(USE_NEON)
static inline float h2f_neon(ggml_half h) {
    __fp16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v; /* exact */
}
#define H2F(h) h2f_neon(h)
#else
#define H2F(h) half_to_float(h)
#endif

/* the fixed horizontal sum of 8 lanes */
static inline float hsum8_scalar(const float *a) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* round to nearest, ties to even, for |v| < 2^22 (what nearbyintf and the SIMD rounding give) */
static inline float round_even(float v) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    return (v + magic) - magic; /* not simplified: no -ffast-math */
}

#if defined(USE_AVX2)
static inline float hsum8_avx(__m256 a) {
    __m128 v4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)); /* a_i + a_{i+4} */
    __m128 v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));                            /* (a0+a4)+(a2+a6), (a1+a5)+(a3+a7) */
    return _mm_cvtss_f32(_mm_add_ss(v2, _mm_movehdup_ps(v2)));
}

/* 32 nibbles -> 32 bytes: low nibbles (values 0..15) then high nibbles (values 16..31) */
static inline __m256i nibbles32(const uint8_t *q) {
    const __m128i t = _mm_loadu_si128((const __m128i *)q);
    const __m256i b = _mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
    return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
}

/* 32 bits -> 32 bytes, 0xFF where the bit is set */
static inline __m256i bits32(const uint8_t *qh) {
    uint32_t v;
    memcpy(&v, qh, sizeof v);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)v), shuf);
    b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL));
    return _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
}

/* unsigned bytes a . signed bytes b: 8 int32 lanes, lane j = the sum over bytes 4j..4j+3 */
static inline __m256i dot_us8(__m256i a, __m256i b) { return dpbusd_avx2(_mm256_setzero_si256(), a, b); }
#endif

#if defined(USE_NEON)
/* 16 signed bytes . 16 signed bytes: 4 int32 lanes, lane j = bytes 4j..4j+3 */
static inline int32x4_t dot_s8x16(int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(vdupq_n_s32(0), a, b);
#else
    int16x8_t p0 = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    int16x8_t p1 = vmull_s8(vget_high_s8(a), vget_high_s8(b));
    int32x4_t s0 = vpaddlq_s16(p0), s1 = vpaddlq_s16(p1); /* pairs */
    return vpaddq_s32(s0, s1);                            /* fours, in order */
#endif
}
#endif

/* ------------------------------------------------------------------ 8-bit activation rows
 * One activation row of K values (nb = K / 32 blocks) quantized for the 32-value types, laid out
 * as arrays so that 8 consecutive blocks' deltas load as one vector:
 *     int8_t qs[nb][32]; float d[nb]; float s[nb]; int32_t sum[nb];      (44 bytes a block)
 * d: delta amax / 127 rounded to binary16 as ggml keeps it (the values are rounded with the exact
 * one); s = d * sum(q) rounded to binary16 (the min term of Q4_1 / Q5_1); sum: sum(q) itself. */

#define Q8A_BLOCK_BYTES 44

typedef struct {
    const int8_t *qs;
    const float *d, *s;
    const int32_t *sum;
} q8a_row;

static inline q8a_row q8a_view(const void *row, int nb) {
    const char *base = (const char *)row;
    q8a_row v = {(const int8_t *)base, (const float *)(base + (size_t)32 * nb), (const float *)(base + (size_t)36 * nb),
                 (const int32_t *)(base + (size_t)40 * nb)};
    return v;
}

static void quantize_act_q8a(const float *x, void *vy, int K) {
    const int nb = K / 32;
    const q8a_row row = q8a_view(vy, nb); /* the layout in one place; this function writes it */
    int8_t *qs = (int8_t *)row.qs;
    float *dd = (float *)row.d, *ss = (float *)row.s;
    int32_t *sums = (int32_t *)row.sum;
    for (int b = 0; b < nb; b++, x += 32) {
        int8_t *q = qs + (size_t)32 * b;
#if defined(USE_AVX2)
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 v[4], mx = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + 8 * i);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        const __m256 idv = _mm256_set1_ps(id);
        __m256i qv[4], sum = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            qv[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], idv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            sum = _mm256_add_epi32(sum, qv[i]);
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        const int isum = _mm_cvtsi128_si32(s4);
        /* packs work per 128-bit lane: put the values back in order */
        __m256i pk = _mm256_packs_epi16(_mm256_packs_epi32(qv[0], qv[1]), _mm256_packs_epi32(qv[2], qv[3]));
        pk = _mm256_permutevar8x32_epi32(pk, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)q, pk);
#elif defined(USE_NEON)
        float32x4_t v[8], mx = vdupq_n_f32(0.0f);
        for (int i = 0; i < 8; i++) {
            v[i] = vld1q_f32(x + 4 * i);
            mx = vmaxq_f32(mx, vabsq_f32(v[i]));
        }
        const float amax = vmaxvq_f32(mx);
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int isum = 0;
        for (int i = 0; i < 8; i++) {
            int32x4_t qi = vcvtq_s32_f32(vrndnq_f32(vmulq_n_f32(v[i], id)));
            isum += vaddvq_s32(qi);
            int16x4_t q16 = vmovn_s32(qi);
            int8x8_t q8 = vmovn_s16(vcombine_s16(q16, q16));
            vst1_lane_s32((int32_t *)(void *)(q + 4 * i), vreinterpret_s32_s8(q8), 0);
        }
#else
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int isum = 0;
        for (int j = 0; j < 32; j++) {
            const int qj = (int)round_even(x[j] * id);
            q[j] = (int8_t)qj;
            isum += qj;
        }
#endif
        /* ggml keeps these two in binary16 (block_q8_0.d, block_q8_1.d and .s): rounded the same
         * way, the products with the weights equal llama.cpp's up to summation order */
        dd[b] = half_to_float(float_to_half(d));
        ss[b] = half_to_float(float_to_half(d * (float)isum));
        sums[b] = isum;
    }
}

static void quantize_act_f32(const float *x, void *y, int K) { memcpy(y, x, sizeof(float) * (size_t)K); }

/* ------------------------------------------------------------------ weight rows -> floats */

static void dequantize_row_q8_0(const void *vw, float *y, int K) {
    const block_q8_0 *w = (const block_q8_0 *)vw;
    for (int b = 0; b < K / 32; b++) {
        const float d = H2F(w[b].d);
        for (int j = 0; j < 32; j++) y[32 * b + j] = (float)w[b].qs[j] * d;
    }
}

static void dequantize_row_q4_0(const void *vw, float *y, int K) {
    const block_q4_0 *w = (const block_q4_0 *)vw;
    for (int b = 0; b < K / 32; b++) {
        const float d = H2F(w[b].d);
        for (int j = 0; j < 16; j++) {
            y[32 * b + j] = (float)((w[b].qs[j] & 0x0F) - 8) * d;
            y[32 * b + j + 16] = (float)((w[b].qs[j] >> 4) - 8) * d;
        }
    }
}

static void dequantize_row_q4_1(const void *vw, float *y, int K) {
    const block_q4_1 *w = (const block_q4_1 *)vw;
    for (int b = 0; b < K / 32; b++) {
        const float d = H2F(w[b].d), m = H2F(w[b].m);
        for (int j = 0; j < 16; j++) {
            y[32 * b + j] = (float)(w[b].qs[j] & 0x0F) * d + m;
            y[32 * b + j + 16] = (float)(w[b].qs[j] >> 4) * d + m;
        }
    }
}

static inline uint32_t load_qh(const uint8_t *qh) {
    return (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
}

static void dequantize_row_q5_0(const void *vw, float *y, int K) {
    const block_q5_0 *w = (const block_q5_0 *)vw;
    for (int b = 0; b < K / 32; b++) {
        const float d = H2F(w[b].d);
        const uint32_t qh = load_qh(w[b].qh);
        for (int j = 0; j < 16; j++) {
            const int lo = (w[b].qs[j] & 0x0F) | (int)((qh >> j) & 1) << 4;
            const int hi = (w[b].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            y[32 * b + j] = (float)(lo - 16) * d;
            y[32 * b + j + 16] = (float)(hi - 16) * d;
        }
    }
}

static void dequantize_row_q5_1(const void *vw, float *y, int K) {
    const block_q5_1 *w = (const block_q5_1 *)vw;
    for (int b = 0; b < K / 32; b++) {
        const float d = H2F(w[b].d), m = H2F(w[b].m);
        const uint32_t qh = load_qh(w[b].qh);
        for (int j = 0; j < 16; j++) {
            const int lo = (w[b].qs[j] & 0x0F) | (int)((qh >> j) & 1) << 4;
            const int hi = (w[b].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            y[32 * b + j] = (float)lo * d + m;
            y[32 * b + j + 16] = (float)hi * d + m;
        }
    }
}

static void dequantize_row_f32(const void *w, float *y, int K) { memcpy(y, w, sizeof(float) * (size_t)K); }

static void dequantize_row_f16(const void *vw, float *y, int K) {
    const ggml_half *w = (const ggml_half *)vw;
    for (int k = 0; k < K; k++) y[k] = half_to_float(w[k]);
}

static void dequantize_row_bf16(const void *vw, float *y, int K) {
    const uint16_t *w = (const uint16_t *)vw;
    for (int k = 0; k < K; k++) y[k] = bf16_to_float(w[k]);
}

/* ------------------------------------------------------------------ floats -> weight rows
 * Byte for byte llama.cpp's quantize_row_<t>_ref (ggml-quants.c), including its truncating casts. */

static void quantize_row_q8_0(const float *x, void *vw, int K) {
    block_q8_0 *w = (block_q8_0 *)vw;
    for (int b = 0; b < K / 32; b++, x += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
        w[b].d = float_to_half(d);
        for (int j = 0; j < 32; j++) w[b].qs[j] = (int8_t)roundf(x[j] * id);
    }
}

/* the value of largest magnitude (the first one on ties), as llama.cpp picks it */
static float signed_absmax(const float *x) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; j++)
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    return max;
}

/* the block's min, and the delta (max - min) / levels with its inverse (0 for a constant block) */
static float min_delta(const float *x, int levels, float *min, float *inv) {
    float mn = FLT_MAX, mx = -FLT_MAX;
    for (int j = 0; j < 32; j++) {
        if (x[j] < mn) mn = x[j];
        if (x[j] > mx) mx = x[j];
    }
    const float d = (mx - mn) / (float)levels;
    *min = mn;
    *inv = d ? 1.0f / d : 0.0f;
    return d;
}

static void quantize_row_q4_0(const float *x, void *vw, int K) {
    block_q4_0 *w = (block_q4_0 *)vw;
    for (int b = 0; b < K / 32; b++, x += 32) {
        const float d = signed_absmax(x) / -8, id = d ? 1.0f / d : 0.0f;
        w[b].d = float_to_half(d);
        for (int j = 0; j < 16; j++) {
            const int8_t a = (int8_t)(x[j] * id + 8.5f), c = (int8_t)(x[j + 16] * id + 8.5f);
            w[b].qs[j] = (uint8_t)((a < 15 ? a : 15) | (c < 15 ? c : 15) << 4);
        }
    }
}

static void quantize_row_q4_1(const float *x, void *vw, int K) {
    block_q4_1 *w = (block_q4_1 *)vw;
    for (int b = 0; b < K / 32; b++, x += 32) {
        float mn, id;
        const float d = min_delta(x, 15, &mn, &id);
        w[b].d = float_to_half(d);
        w[b].m = float_to_half(mn);
        for (int j = 0; j < 16; j++) {
            const int8_t a = (int8_t)((x[j] - mn) * id + 0.5f), c = (int8_t)((x[j + 16] - mn) * id + 0.5f);
            w[b].qs[j] = (uint8_t)((a < 15 ? a : 15) | (c < 15 ? c : 15) << 4);
        }
    }
}

static void store_q5(const int *q, uint8_t *qs, uint8_t *qh_bytes) {
    uint32_t qh = 0;
    for (int j = 0; j < 16; j++) {
        qs[j] = (uint8_t)((q[j] & 0x0F) | (q[j + 16] & 0x0F) << 4);
        qh |= (uint32_t)((q[j] & 0x10) >> 4) << j;
        qh |= (uint32_t)((q[j + 16] & 0x10) >> 4) << (j + 16);
    }
    memcpy(qh_bytes, &qh, 4); /* little-endian, as ggml's memcpy on the machines it runs on */
}

static void quantize_row_q5_0(const float *x, void *vw, int K) {
    block_q5_0 *w = (block_q5_0 *)vw;
    for (int b = 0; b < K / 32; b++, x += 32) {
        const float d = signed_absmax(x) / -16, id = d ? 1.0f / d : 0.0f;
        w[b].d = float_to_half(d);
        int q[32];
        for (int j = 0; j < 32; j++) {
            const int8_t v = (int8_t)(x[j] * id + 16.5f);
            q[j] = v < 31 ? v : 31;
        }
        store_q5(q, w[b].qs, w[b].qh);
    }
}

static void quantize_row_q5_1(const float *x, void *vw, int K) {
    block_q5_1 *w = (block_q5_1 *)vw;
    for (int b = 0; b < K / 32; b++, x += 32) {
        float mn, id;
        const float d = min_delta(x, 31, &mn, &id);
        w[b].d = float_to_half(d);
        w[b].m = float_to_half(mn);
        int q[32];
        for (int j = 0; j < 32; j++) q[j] = (uint8_t)((x[j] - mn) * id + 0.5f);
        store_q5(q, w[b].qs, w[b].qh);
    }
}

static void quantize_row_f32(const float *x, void *w, int K) { memcpy(w, x, sizeof(float) * (size_t)K); }

static void quantize_row_f16(const float *x, void *vw, int K) {
    ggml_half *w = (ggml_half *)vw;
    for (int k = 0; k < K; k++) w[k] = float_to_half(x[k]);
}

/* float -> bf16 as ggml_compute_fp32_to_bf16: nan stays a quiet nan, else round to nearest even */
static void quantize_row_bf16(const float *x, void *vw, int K) {
    uint16_t *w = (uint16_t *)vw;
    for (int k = 0; k < K; k++) {
        uint32_t u;
        memcpy(&u, &x[k], sizeof u);
        if ((u & 0x7fffffffu) > 0x7f800000u)
            w[k] = (uint16_t)((u >> 16) | 64);
        else
            w[k] = (uint16_t)((u + (0x7fff + ((u >> 16) & 1))) >> 16);
    }
}

/* ------------------------------------------------------------------ 32-value dot products
 * One kernel per type: NW weight rows x NX activation rows (compile-time constants at each call),
 * every weight block unpacked once for the NX rows. Each (weight row, activation row) pair follows
 * the sequence in the header comment, so a tile's element equals vec_dot's. */

enum { KIND_Q8_0, KIND_Q4_0, KIND_Q4_1, KIND_Q5_0, KIND_Q5_1 };

#define HAS_MIN(kind) ((kind) == KIND_Q4_1 || (kind) == KIND_Q5_1)

/* weight block bytes and the offsets of its fields, per kind */
static inline size_t q_block_bytes(int kind) {
    return kind == KIND_Q8_0 ? sizeof(block_q8_0) : kind == KIND_Q4_0 ? sizeof(block_q4_0) : kind == KIND_Q4_1 ? sizeof(block_q4_1)
         : kind == KIND_Q5_0 ? sizeof(block_q5_0) : sizeof(block_q5_1);
}

#if !defined(USE_AVX2) && !defined(USE_NEON)
/* the 32 integer values of a weight block, as used in the dot (Q4_0/Q5_0/Q8_0 signed, Q4_1/Q5_1 unsigned) */
static inline void unpack_q(int kind, const uint8_t *blk, int *q, float *d, float *m) {
    switch (kind) {
    case KIND_Q8_0: {
        const block_q8_0 *w = (const block_q8_0 *)blk;
        *d = H2F(w->d);
        for (int j = 0; j < 32; j++) q[j] = w->qs[j];
        break;
    }
    case KIND_Q4_0: {
        const block_q4_0 *w = (const block_q4_0 *)blk;
        *d = H2F(w->d);
        for (int j = 0; j < 16; j++) q[j] = (w->qs[j] & 0x0F) - 8, q[j + 16] = (w->qs[j] >> 4) - 8;
        break;
    }
    case KIND_Q4_1: {
        const block_q4_1 *w = (const block_q4_1 *)blk;
        *d = H2F(w->d), *m = H2F(w->m);
        for (int j = 0; j < 16; j++) q[j] = w->qs[j] & 0x0F, q[j + 16] = w->qs[j] >> 4;
        break;
    }
    case KIND_Q5_0: {
        const block_q5_0 *w = (const block_q5_0 *)blk;
        const uint32_t qh = load_qh(w->qh);
        *d = H2F(w->d);
        for (int j = 0; j < 16; j++) {
            q[j] = ((w->qs[j] & 0x0F) | (int)((qh >> j) & 1) << 4) - 16;
            q[j + 16] = ((w->qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4) - 16;
        }
        break;
    }
    default: {
        const block_q5_1 *w = (const block_q5_1 *)blk;
        const uint32_t qh = load_qh(w->qh);
        *d = H2F(w->d), *m = H2F(w->m);
        for (int j = 0; j < 16; j++) {
            q[j] = (w->qs[j] & 0x0F) | (int)((qh >> j) & 1) << 4;
            q[j + 16] = (w->qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        }
        break;
    }
    }
}
#endif

#if defined(USE_NEON)
/* the weight block as two 16-byte halves in value order (signed for every kind: the unsigned
 * values of Q4_1 / Q5_1 are below 32) */
static inline void unpack_neon(int kind, const uint8_t *blk, int8x16_t *lo, int8x16_t *hi, float *d, float *m) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    switch (kind) {
    case KIND_Q8_0: {
        const block_q8_0 *w = (const block_q8_0 *)blk;
        *d = H2F(w->d);
        *lo = vld1q_s8(w->qs), *hi = vld1q_s8(w->qs + 16);
        return;
    }
    case KIND_Q4_0:
    case KIND_Q4_1: {
        const uint8_t *qs = kind == KIND_Q4_0 ? ((const block_q4_0 *)blk)->qs : ((const block_q4_1 *)blk)->qs;
        const uint8x16_t v = vld1q_u8(qs);
        int8x16_t l = vreinterpretq_s8_u8(vandq_u8(v, m4)), h = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        if (kind == KIND_Q4_0) {
            const block_q4_0 *w = (const block_q4_0 *)blk;
            *d = H2F(w->d);
            l = vsubq_s8(l, vdupq_n_s8(8)), h = vsubq_s8(h, vdupq_n_s8(8));
        } else {
            const block_q4_1 *w = (const block_q4_1 *)blk;
            *d = H2F(w->d), *m = H2F(w->m);
        }
        *lo = l, *hi = h;
        return;
    }
    default: {
        const uint8_t *qs, *qhp;
        if (kind == KIND_Q5_0) {
            const block_q5_0 *w = (const block_q5_0 *)blk;
            qs = w->qs, qhp = w->qh, *d = H2F(w->d);
        } else {
            const block_q5_1 *w = (const block_q5_1 *)blk;
            qs = w->qs, qhp = w->qh, *d = H2F(w->d), *m = H2F(w->m);
        }
        const uint32_t qh = load_qh(qhp);
        /* the 5th bits as bytes 0x10: byte j takes bit j of qh */
        static const uint8_t bit_of_byte[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
        const uint8x16_t sel = vld1q_u8(bit_of_byte);
        const uint8x8_t b0 = vdup_n_u8((uint8_t)qh), b1 = vdup_n_u8((uint8_t)(qh >> 8));
        const uint8x8_t b2 = vdup_n_u8((uint8_t)(qh >> 16)), b3 = vdup_n_u8((uint8_t)(qh >> 24));
        const uint8x16_t hb_lo = vandq_u8(vtstq_u8(vcombine_u8(b0, b1), sel), vdupq_n_u8(0x10));
        const uint8x16_t hb_hi = vandq_u8(vtstq_u8(vcombine_u8(b2, b3), sel), vdupq_n_u8(0x10));
        const uint8x16_t v = vld1q_u8(qs);
        int8x16_t l = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(v, m4), hb_lo));
        int8x16_t h = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(v, 4), hb_hi));
        if (kind == KIND_Q5_0) l = vsubq_s8(l, vdupq_n_s8(16)), h = vsubq_s8(h, vdupq_n_s8(16));
        *lo = l, *hi = h;
        return;
    }
    }
}
#endif

/* The sequence of float operations of one (weight row, activation row) pair, on every ISA (the
 * header comment): block b's exact integer sum goes into accumulator b mod 8 with one fused
 * multiply-add, the min term (Q4_1, Q5_1) with a second one, and the 8 accumulators are summed
 * by hsum8. Decode vectorizes over 8 consecutive blocks of one pair (lane j = accumulator j);
 * prompts over 8 activation rows (lane c = row c, tile8); both give these bits. */

#define LANES8 8

#if defined(USE_AVX2)

/* the weight block as 32 unsigned bytes, and what to subtract (off * sum(a)) to get the
 * signed product: Q4_0 q = nibble - 8, Q5_0 q = 5 bits - 16; Q8_0 q ^ 0x80 = q + 128 where the
 * product is exact (VNNI: no 16-bit saturation), else signed (*off = -1: the sign trick) */
static inline __m256i unpack_u8_avx2(int kind, const uint8_t *blk, float *d, float *m, int *off) {
    switch (kind) {
    case KIND_Q8_0: {
        const block_q8_0 *w = (const block_q8_0 *)blk;
        *d = H2F(w->d);
        const __m256i q = _mm256_loadu_si256((const __m256i *)w->qs);
#if defined(BLOCK_VNNI) /* the products of q + 128 need dpbusd: maddubs would saturate */
        *off = 128;
        return _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80));
#else
        *off = -1;
        return q;
#endif
    }
    case KIND_Q4_0: {
        const block_q4_0 *w = (const block_q4_0 *)blk;
        *d = H2F(w->d), *off = 8;
        return nibbles32(w->qs);
    }
    case KIND_Q4_1: {
        const block_q4_1 *w = (const block_q4_1 *)blk;
        *d = H2F(w->d), *m = H2F(w->m), *off = 0;
        return nibbles32(w->qs);
    }
    case KIND_Q5_0: {
        const block_q5_0 *w = (const block_q5_0 *)blk;
        *d = H2F(w->d), *off = 16;
        return _mm256_or_si256(nibbles32(w->qs), _mm256_and_si256(bits32(w->qh), _mm256_set1_epi8(0x10)));
    }
    default: {
        const block_q5_1 *w = (const block_q5_1 *)blk;
        *d = H2F(w->d), *m = H2F(w->m), *off = 0;
        return _mm256_or_si256(nibbles32(w->qs), _mm256_and_si256(bits32(w->qh), _mm256_set1_epi8(0x10)));
    }
    }
}

/* the deltas (and mins) of the weight blocks at w, w + wb, ... (the lanes set in `live`) as
 * vectors: one gather of each block's first 4 bytes (d, then m or the next field) */
static inline __attribute__((always_inline)) void block_scales8(const uint8_t *w, __m256i offsets, __m256i live, __m256 *d, __m256 *m) {
    const __m256i g = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int *)w, offsets, live, 1);
    const __m256i lo = _mm256_and_si256(g, _mm256_set1_epi32(0xFFFF)), hi = _mm256_srli_epi32(g, 16);
    const __m256i halves = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8); /* d0..d7, m0..m7 */
    *d = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
    *m = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
}

/* NX activation rows . one weight row: 8 blocks at a time, lane j of acc[c] is accumulator j */
static inline __attribute__((always_inline)) void q_dot_rows(const int kind, const int NX, int nb, const uint8_t *w, const q8a_row *xa,
                                                             float *out, size_t ldo) {
    const int wb = (int)q_block_bytes(kind);
    const __m256i offsets = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(wb));
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 acc[4];
    for (int c = 0; c < NX; c++) acc[c] = _mm256_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += LANES8) {
        const int n = nb - b0 < LANES8 ? nb - b0 : LANES8;
        const uint8_t *wg = w + (size_t)b0 * wb;
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes); /* a missing block adds fma(0, 0, acc) = acc: acc is never -0 */
        __m256 dw, mw;
        block_scales8(wg, offsets, live, &dw, &mw);
        for (int c = 0; c < NX; c++) {
            __m256i v[LANES8];
            int off = 0;
#pragma GCC unroll 8
            for (int j = 0; j < LANES8; j++) {
                if (j < n) {
                    float d_, m_;
                    const __m256i qw = unpack_u8_avx2(kind, wg + (size_t)j * wb, &d_, &m_, &off);
                    const __m256i qa = _mm256_loadu_si256((const __m256i *)(xa[c].qs + (size_t)(b0 + j) * 32));
                    v[j] = off < 0 ? dot_us8(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qa, qw)) : dot_us8(qw, qa);
                } else {
                    v[j] = _mm256_setzero_si256();
                }
            }
            __m256i isum = reduce8_epi32(v);
            if (off > 0) /* the unsigned weights' offset times each block's sum(a) */
                isum = _mm256_sub_epi32(isum, _mm256_mullo_epi32(_mm256_set1_epi32(off), _mm256_maskload_epi32(xa[c].sum + b0, live)));
            const __m256 dx = _mm256_maskload_ps(xa[c].d + b0, live);
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, dx), acc[c]);
            if (HAS_MIN(kind)) acc[c] = _mm256_fmadd_ps(mw, _mm256_maskload_ps(xa[c].s + b0, live), acc[c]);
        }
    }
    for (int c = 0; c < NX; c++) out[c * ldo] = hsum8_avx(acc[c]);
}

#endif

/* ------------------------------------------------------------------ 8 activation rows interleaved
 * For a prompt the 32-value types take 8 activation rows at a time as one group (q8a_group, their
 * group_act; kquants.c has the K-quants' own), interleaved so that a vector holds 4 values of
 * each of the 8 rows: per block b,
 * q8a_group_block (4 values of row c in qs[g][c]; d, s and sum by row), 352 bytes a block. A weight row then meets 8 rows with 8 multiply-adds of a broadcast weight
 * group, and the 8 rows' float operations run in one vector (lane c = row c). */

typedef struct {
    int32_t qs[8][BLOCK_GROUP_ROWS]; /* [4-value group][row]: values 4g..4g+3 of row c */
    float d[BLOCK_GROUP_ROWS], s[BLOCK_GROUP_ROWS];
    int32_t sum[BLOCK_GROUP_ROWS];
} q8a_group_block; /* one block of a group */
_Static_assert(sizeof(q8a_group_block) == 352, "q8a_group_block layout");

/* BlockType.group_act of the 32-value types: nx (<= 8) q8a rows -> one group (the missing rows zero) */
static void q8a_group(const void *xqv, size_t xrow, int nx, int K, void *groupv) {
    const char *xq = (const char *)xqv;
    q8a_group_block *group = (q8a_group_block *)groupv;
    const int nb = K / 32;
    for (int b = 0; b < nb; b++) {
        q8a_group_block *g = &group[b];
        for (int c = 0; c < BLOCK_GROUP_ROWS; c++) {
            if (c < nx) {
                const q8a_row r = q8a_view(xq + (size_t)c * xrow, nb);
                int32_t v[8];
                memcpy(v, r.qs + (size_t)b * 32, 32);
                for (int k = 0; k < 8; k++) g->qs[k][c] = v[k];
                g->d[c] = r.d[b], g->s[c] = r.s[b], g->sum[c] = r.sum[b];
            } else {
                for (int k = 0; k < 8; k++) g->qs[k][c] = 0;
                g->d[c] = g->s[c] = 0.0f, g->sum[c] = 0;
            }
        }
    }
}

#if defined(USE_AVX2)
/* Without VNNI: maddubs steps summed in int16 (BLOCK_INT16_STEPS of the 8 steps of a block): Q4_0
 * / Q4_1 (unpacked quants <= 15) a whole block, Q5_0 / Q5_1 (<= 31) half; Q8_0 takes dpbusd */
static inline int q_int16_steps(int kind) {
    return kind == KIND_Q4_0 || kind == KIND_Q4_1 ? BLOCK_INT16_STEPS(15, 8) : BLOCK_INT16_STEPS(31, 8);
}

/* NW weight rows x NG consecutive groups of 8 activation rows (nx rows stored in all): each
 * activation vector loaded once for the NW rows, each 4 weight values broadcast once for the NG
 * groups (as kquants.c's tile8; the loads were the limit) */
static inline __attribute__((always_inline)) void q_tile8_rows(const int kind, const int NW, const int NG, int K, const void *w, size_t wrb,
                                                               const q8a_group_block *group, int nx, float *y, size_t ldy, int prefetch) {
    const int nb = K / 32;
    const size_t wb = q_block_bytes(kind);
    __m256 acc[2][4][LANES8];
    for (int h = 0; h < NG; h++)
        for (int r = 0; r < NW; r++)
            for (int j = 0; j < LANES8; j++) acc[h][r][j] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const q8a_group_block *g[2] = {&group[b], &group[(NG > 1 ? nb : 0) + b]};
        int32_t wq[4][8] __attribute__((aligned(32)));
        float d[4], m[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int off = 0;
        for (int r = 0; r < NW; r++) {
            const uint8_t *blk = (const uint8_t *)w + (size_t)r * wrb + (size_t)b * wb;
            if (prefetch) _mm_prefetch((const char *)blk + (size_t)NW * wrb, _MM_HINT_T0); /* the next call's rows (BlockType.tile8) */
            _mm256_store_si256((__m256i *)wq[r], unpack_u8_avx2(kind, blk, &d[r], &m[r], &off));
        }
        __asm__ __volatile__("" : : "r"(wq) : "memory"); /* broadcasts from memory, not extracts */
        /* is: the exact int32 sums; p (without VNNI): int16 sums of maddubs steps, q_int16_steps at a time */
        __m256i is[2][4], p[2][4];
        for (int h = 0; h < NG; h++)
            for (int r = 0; r < NW; r++) is[h][r] = p[h][r] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            __m256i a[2];
            for (int h = 0; h < NG; h++) {
                a[h] = _mm256_loadu_si256((const __m256i *)g[h]->qs[k]);
                BLOCK_PIN(a[h]);
            }
            for (int r = 0; r < NW; r++) {
                const __m256i wk = _mm256_set1_epi32(wq[r][k]);
                for (int h = 0; h < NG; h++) {
#if defined(BLOCK_VNNI)
                    is[h][r] = dpbusd_avx2(is[h][r], wk, a[h]);
                    BLOCK_PIN(is[h][r]);
#else
                    if (kind == KIND_Q8_0 && off < 0) { /* signed . signed: |w| and x with w's sign */
                        is[h][r] = dpbusd_avx2(is[h][r], _mm256_sign_epi8(wk, wk), _mm256_sign_epi8(a[h], wk));
                    } else {
                        p[h][r] = _mm256_add_epi16(p[h][r], _mm256_maddubs_epi16(wk, a[h]));
                        BLOCK_PIN(p[h][r]); /* else GCC does every maddubs first and spills them */
                    }
#endif
                }
            }
#if !defined(BLOCK_VNNI)
            if (!(kind == KIND_Q8_0 && off < 0) && (k + 1) % q_int16_steps(kind) == 0)
                for (int h = 0; h < NG; h++)
                    for (int r = 0; r < NW; r++) {
                        is[h][r] = _mm256_add_epi32(is[h][r], _mm256_madd_epi16(p[h][r], _mm256_set1_epi16(1)));
                        p[h][r] = _mm256_setzero_si256();
                    }
#endif
        }
        const int j = b % LANES8;
        for (int h = 0; h < NG; h++) {
            const __m256 gd = _mm256_loadu_ps(g[h]->d);
            for (int r = 0; r < NW; r++) {
                __m256i isum = is[h][r];
                if (off > 0) isum = _mm256_sub_epi32(isum, _mm256_mullo_epi32(_mm256_set1_epi32(off), _mm256_loadu_si256((const __m256i *)g[h]->sum)));
                const __m256 pd = _mm256_mul_ps(_mm256_set1_ps(d[r]), gd);
                acc[h][r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), pd, acc[h][r][j]);
                if (HAS_MIN(kind)) acc[h][r][j] = _mm256_fmadd_ps(_mm256_set1_ps(m[r]), _mm256_loadu_ps(g[h]->s), acc[h][r][j]);
            }
        }
    }
    for (int h = 0; h < NG; h++)
        for (int r = 0; r < NW; r++) {
            /* hsum8 of each row's 8 accumulators: lanes are rows, so the same adds vertically */
            const __m256 *a = acc[h][r];
            const __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6])),
                                             _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7])));
            float out[8];
            _mm256_storeu_ps(out, sum);
            for (int c = 0; c < BLOCK_GROUP_ROWS && BLOCK_GROUP_ROWS * h + c < nx; c++) y[(size_t)(BLOCK_GROUP_ROWS * h + c) * ldy + r] = out[c];
        }
}

/* nw weight rows x one or two groups (nx rows): 4 rows at a time where there are 4 */
static inline __attribute__((always_inline)) void q_tile8(const int kind, int K, const void *w, size_t wrb, int nw, const q8a_group_block *group,
                                                          int nx, float *y, size_t ldy, int prefetch) {
    if (nw == 4 && nx > BLOCK_GROUP_ROWS) {
        q_tile8_rows(kind, 4, 2, K, w, wrb, group, nx, y, ldy, prefetch);
    } else if (nw == 4) {
        q_tile8_rows(kind, 4, 1, K, w, wrb, group, nx, y, ldy, prefetch);
    } else { /* the matrix's last rows: nothing after them to prefetch */
        for (int h = 0; BLOCK_GROUP_ROWS * h < nx; h++)
            for (int r = 0; r < nw; r++)
                q_tile8_rows(kind, 1, 1, K, (const char *)w + (size_t)r * wrb, 0, group + (size_t)h * (K / 32), nx - BLOCK_GROUP_ROWS * h,
                             y + (size_t)BLOCK_GROUP_ROWS * h * ldy + r, ldy, 0);
    }
}
#endif

#if !defined(USE_AVX2)
/* the exact integer sum of one weight block . one activation block */
static inline int q_block_isum(int kind, const uint8_t *blk, const int8_t *a, float *d, float *m) {
#if defined(USE_NEON)
    int8x16_t wl, wh;
    unpack_neon(kind, blk, &wl, &wh, d, m);
    return vaddvq_s32(vaddq_s32(dot_s8x16(wl, vld1q_s8(a)), dot_s8x16(wh, vld1q_s8(a + 16))));
#else
    int q[32];
    unpack_q(kind, blk, q, d, m);
    int s = 0;
    for (int j = 0; j < 32; j++) s += q[j] * a[j];
    return s;
#endif
}

/* NX activation rows . one weight row, the sequence written out */
static inline __attribute__((always_inline)) void q_dot_rows(const int kind, const int NX, int nb, const uint8_t *w, const q8a_row *xa,
                                                             float *out, size_t ldo) {
    const size_t wb = q_block_bytes(kind);
    float acc[4][LANES8];
    for (int c = 0; c < NX; c++)
        for (int j = 0; j < LANES8; j++) acc[c][j] = 0.0f;
    for (int b = 0; b < nb; b++) {
        const int j = b % LANES8;
        for (int c = 0; c < NX; c++) {
            float d, m = 0.0f;
            const int s = q_block_isum(kind, w + (size_t)b * wb, xa[c].qs + (size_t)b * 32, &d, &m);
            acc[c][j] = fmaf((float)s, d * xa[c].d[b], acc[c][j]);
            if (HAS_MIN(kind)) acc[c][j] = fmaf(m, xa[c].s[b], acc[c][j]);
        }
    }
    for (int c = 0; c < NX; c++) out[c * ldo] = hsum8_scalar(acc[c]);
}

/* the portable tile8, one group: each row of the group as q_dot_rows computes it */
static inline void q_tile8_group(const int kind, int K, const void *w, size_t wrb, int nw, const q8a_group_block *group, int nx, float *y,
                                 size_t ldy) {
    const int nb = K / 32;
    const size_t wb = q_block_bytes(kind);
    for (int r = 0; r < nw; r++) {
        const uint8_t *wr = (const uint8_t *)w + (size_t)r * wrb;
        float acc[BLOCK_GROUP_ROWS][LANES8] = {{0.0f}};
        for (int b = 0; b < nb; b++) {
            const q8a_group_block *g = &group[b];
            const int j = b % LANES8;
            for (int c = 0; c < nx; c++) {
                int8_t a[32];
                for (int k = 0; k < 8; k++) memcpy(a + 4 * k, &g->qs[k][c], 4);
                float d, m = 0.0f;
                const int s = q_block_isum(kind, wr + (size_t)b * wb, a, &d, &m);
                acc[c][j] = fmaf((float)s, d * g->d[c], acc[c][j]);
                if (HAS_MIN(kind)) acc[c][j] = fmaf(m, g->s[c], acc[c][j]);
            }
        }
        for (int c = 0; c < nx; c++) y[c * ldy + r] = hsum8_scalar(acc[c]);
    }
}

/* one or two consecutive groups (nx rows in all) */
static inline void q_tile8(const int kind, int K, const void *w, size_t wrb, int nw, const q8a_group_block *group, int nx, float *y,
                           size_t ldy, int prefetch) {
    (void)prefetch; /* portable C has no prefetch */
    for (int h = 0; BLOCK_GROUP_ROWS * h < nx; h++)
        q_tile8_group(kind, K, w, wrb, nw, group + (size_t)h * (K / 32), nx - BLOCK_GROUP_ROWS * h < BLOCK_GROUP_ROWS ? nx - BLOCK_GROUP_ROWS * h : BLOCK_GROUP_ROWS,
                      y + (size_t)BLOCK_GROUP_ROWS * h * ldy, ldy);
}
#endif

/* nw weight rows x nx activation rows: each weight row's blocks unpacked once for the nx rows */
static inline __attribute__((always_inline)) void q_tile(const int kind, int K, const void *w, size_t w_row_bytes, int nw, const void *xq,
                                                         size_t xq_row_bytes, int nx, float *y, size_t ldy) {
    const int nb = K / 32;
    q8a_row xa[4];
    for (int c = 0; c < nx; c++) xa[c] = q8a_view((const char *)xq + (size_t)c * xq_row_bytes, nb);
    for (int r = 0; r < nw; r++) {
        const uint8_t *wr = (const uint8_t *)w + (size_t)r * w_row_bytes;
        switch (nx) { /* constant row counts: the accumulators stay in registers */
        case 4: q_dot_rows(kind, 4, nb, wr, xa, y + r, ldy); break;
        case 3: q_dot_rows(kind, 3, nb, wr, xa, y + r, ldy); break;
        case 2: q_dot_rows(kind, 2, nb, wr, xa, y + r, ldy); break;
        default: q_dot_rows(kind, 1, nb, wr, xa, y + r, ldy); break;
        }
    }
}

#define Q_KERNELS(name, kind)                                                                                                    \
    static void vec_dot_##name(int K, float *s, const void *w, const void *xq) {                                                 \
        const q8a_row xa[1] = {q8a_view(xq, K / 32)};                                                                            \
        q_dot_rows(kind, 1, K / 32, (const uint8_t *)w, xa, s, 1);                                                               \
    }                                                                                                                            \
    static void tile_##name(int K, const void *w, size_t wrb, int nw, const void *xq, size_t xrb, int nx, float *y, size_t ldy) { \
        q_tile(kind, K, w, wrb, nw, xq, xrb, nx, y, ldy);                                                                        \
    }                                                                                                                            \
    static void tile8_##name(int K, const void *w, size_t wrb, int nw, const void *group, int nx, float *y, size_t ldy, int prefetch) { \
        q_tile8(kind, K, w, wrb, nw, (const q8a_group_block *)group, nx, y, ldy, prefetch);                                      \
    }

Q_KERNELS(q8_0, KIND_Q8_0)
Q_KERNELS(q4_0, KIND_Q4_0)
Q_KERNELS(q4_1, KIND_Q4_1)
Q_KERNELS(q5_0, KIND_Q5_0)
Q_KERNELS(q5_1, KIND_Q5_1)

/* ------------------------------------------------------------------ float weights . float32 activations
 * 32 lanes (see the header comment): lane j sums w[32i+j]*x[32i+j], the last chunk zero-padded. */

enum { FLT_F32, FLT_F16, FLT_BF16 };

#if defined(USE_AVX2)
/* 8 weights from k (n of them valid, the rest zero) as floats */
static inline __m256 load_w8(const int ft, const void *w, int k, int n) {
    if (n < 8) {
        float buf[8] = {0};
        if (ft == FLT_F32) memcpy(buf, (const float *)w + k, sizeof(float) * (size_t)n);
        else if (ft == FLT_F16)
            for (int i = 0; i < n; i++) buf[i] = H2F(((const ggml_half *)w)[k + i]);
        else
            for (int i = 0; i < n; i++) buf[i] = bf16_to_float(((const uint16_t *)w)[k + i]);
        return _mm256_loadu_ps(buf);
    }
    if (ft == FLT_F32) return _mm256_loadu_ps((const float *)w + k);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + k));
    if (ft == FLT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256 load_x8(const float *x, int k, int n) {
    if (n < 8) {
        float buf[8] = {0};
        memcpy(buf, x + k, sizeof(float) * (size_t)n);
        return _mm256_loadu_ps(buf);
    }
    return _mm256_loadu_ps(x + k);
}
#endif

static inline __attribute__((always_inline)) float float_dot(const int ft, int K, const void *w, const float *x) {
#if defined(USE_AVX2)
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int k = 0;
    for (; k + 32 <= K; k += 32)
        for (int q = 0; q < 4; q++) a[q] = _mm256_add_ps(a[q], _mm256_mul_ps(load_w8(ft, w, k + 8 * q, 8), _mm256_loadu_ps(x + k + 8 * q)));
    if (k < K)
        for (int q = 0; q < 4; q++) {
            const int n = K - k - 8 * q < 0 ? 0 : K - k - 8 * q < 8 ? K - k - 8 * q : 8;
            a[q] = _mm256_add_ps(a[q], _mm256_mul_ps(load_w8(ft, w, k + 8 * q, n), load_x8(x, k + 8 * q, n)));
        }
    return hsum8_avx(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
#else
    float a[32] = {0};
    for (int k0 = 0; k0 < K; k0 += 32)
        for (int j = 0; j < 32; j++) {
            const int k = k0 + j;
            float wv = 0.0f, xv = 0.0f;
            if (k < K) {
                xv = x[k];
                wv = ft == FLT_F32 ? ((const float *)w)[k] : ft == FLT_F16 ? H2F(((const ggml_half *)w)[k]) : bf16_to_float(((const uint16_t *)w)[k]);
            }
            a[j] = a[j] + wv * xv;
        }
    float v[8];
    for (int l = 0; l < 8; l++) v[l] = (a[l] + a[l + 8]) + (a[l + 16] + a[l + 24]);
    return hsum8_scalar(v);
#endif
}

static void vec_dot_f32(int K, float *s, const void *w, const void *x) { *s = float_dot(FLT_F32, K, w, (const float *)x); }
static void vec_dot_f16(int K, float *s, const void *w, const void *x) { *s = float_dot(FLT_F16, K, w, (const float *)x); }
static void vec_dot_bf16(int K, float *s, const void *w, const void *x) { *s = float_dot(FLT_BF16, K, w, (const float *)x); }

/* ------------------------------------------------------------------ the type table */

#define FLOAT_TYPE(t, name, bytes) \
    {t, 1, bytes, 4, quantize_act_f32, vec_dot_##name, dequantize_row_##name, quantize_row_##name, NULL, NULL, NULL, 0}
#define Q32_TYPE(t, name, blk) \
    {t, 32, (int)sizeof(blk), Q8A_BLOCK_BYTES, quantize_act_q8a, vec_dot_##name, dequantize_row_##name, quantize_row_##name, tile_##name, tile8_##name, q8a_group, sizeof(q8a_group_block)}

static const BlockType block_type_f32 = FLOAT_TYPE(GGML_TYPE_F32, f32, 4);
static const BlockType block_type_f16 = FLOAT_TYPE(GGML_TYPE_F16, f16, 2);
static const BlockType block_type_bf16 = FLOAT_TYPE(GGML_TYPE_BF16, bf16, 2);
static const BlockType block_type_q8_0 = Q32_TYPE(GGML_TYPE_Q8_0, q8_0, block_q8_0);
static const BlockType block_type_q4_0 = Q32_TYPE(GGML_TYPE_Q4_0, q4_0, block_q4_0);
static const BlockType block_type_q4_1 = Q32_TYPE(GGML_TYPE_Q4_1, q4_1, block_q4_1);
static const BlockType block_type_q5_0 = Q32_TYPE(GGML_TYPE_Q5_0, q5_0, block_q5_0);
static const BlockType block_type_q5_1 = Q32_TYPE(GGML_TYPE_Q5_1, q5_1, block_q5_1);

const BlockType *block_type_get(int type) {
    switch (type) {
    case GGML_TYPE_F32: return &block_type_f32;
    case GGML_TYPE_F16: return &block_type_f16;
    case GGML_TYPE_BF16: return &block_type_bf16;
    case GGML_TYPE_Q8_0: return &block_type_q8_0;
    case GGML_TYPE_Q4_0: return &block_type_q4_0;
    case GGML_TYPE_Q4_1: return &block_type_q4_1;
    case GGML_TYPE_Q5_0: return &block_type_q5_0;
    case GGML_TYPE_Q5_1: return &block_type_q5_1;
    case GGML_TYPE_Q2_K: return &block_type_q2_K;
    case GGML_TYPE_Q3_K: return &block_type_q3_K;
    case GGML_TYPE_Q4_K: return &block_type_q4_K;
    case GGML_TYPE_Q5_K: return &block_type_q5_K;
    case GGML_TYPE_Q6_K: return &block_type_q6_K;
    default: return NULL;
    }
}

int block_type_supported(int type) { return block_type_get(type) != NULL; }

const char *block_isa(void) { return ISA_NAME; }

/* bytes of one weight row of K values, or 0 when K is not a whole number of blocks */
static size_t row_bytes(const BlockType *bt, int K) {
    return K > 0 && K % bt->block == 0 ? (size_t)(K / bt->block) * (size_t)bt->block_bytes : 0;
}

/* bytes of one group of BLOCK_GROUP_ROWS activation rows of K values (types with group_act) */
static size_t group_bytes(const BlockType *bt, int K) { return (size_t)(K / bt->block) * bt->group_block_bytes; }

/* ------------------------------------------------------------------ the driver */

#define TILE 4                 /* weight rows and activation rows per tile */
#define ROWS_PER_TASK 64       /* activation rows per task when there are many (prefill) */
#define L2_BYTES (256 * 1024)  /* weight bytes a task keeps hot while its activation rows stream past */

enum { MAXP = 16 }; /* parts of one product */

/* one product's state, shared by its tasks */
typedef struct {
    const BlockPart *parts;
    const BlockType *bt[MAXP];
    int fmt[MAXP];       /* which activation buffer each part reads */
    size_t xrow[MAXP];   /* bytes per activation row in that buffer */
    int fmt_part[MAXP];  /* the first part of each format */
    char *xq[MAXP];      /* the quantized activations, one buffer per format */
    char *xg[MAXP];      /* the same interleaved in groups of 8 rows (types with tile8, M >= 8), or NULL */
    int chunk[MAXP], first[MAXP + 1];
    const float *x;
    float *y;
    int M, N_ld, K, mrows, mchunks;
} MatmulJob;

/* task t: activation row t % M in the format t / M */
static void quantize_task(void *ctx, int t, int worker) {
    (void)worker;
    const MatmulJob *j = (const MatmulJob *)ctx;
    const int f = t / j->M, m = t % j->M, p = j->fmt_part[f];
    j->bt[p]->quantize_act(j->x + (size_t)m * j->K, j->xq[f] + (size_t)m * j->xrow[p], j->K);
}

/* task t: group t % groups of the format t / groups (formats with xg) */
static void group_task(void *ctx, int t, int worker) {
    (void)worker;
    const MatmulJob *j = (const MatmulJob *)ctx;
    const int groups = (j->M + BLOCK_GROUP_ROWS - 1) / BLOCK_GROUP_ROWS;
    int f = 0;
    for (int k = t / groups;; f++) /* the k-th format with groups */
        if (j->xg[f] != NULL && k-- == 0) break;
    const int g = t % groups, p = j->fmt_part[f], m0 = g * BLOCK_GROUP_ROWS;
    const int nx = j->M - m0 < BLOCK_GROUP_ROWS ? j->M - m0 : BLOCK_GROUP_ROWS;
    const BlockType *b = j->bt[p];
    b->group_act(j->xq[f] + (size_t)m0 * j->xrow[p], j->xrow[p], nx, j->K, j->xg[f] + (size_t)g * group_bytes(b, j->K));
}

/* task t: (chunk of a part's weight rows) x (chunk of activation rows); consecutive tasks share a
 * weight chunk, so a thread that takes several in a row keeps it in cache */
static void product_task(void *ctx, int t, int worker) {
    (void)worker;
    const MatmulJob *j = (const MatmulJob *)ctx;
    const int nc = t / j->mchunks, mc = t % j->mchunks, K = j->K, N_ld = j->N_ld;
    int p = 0;
    while (j->first[p + 1] <= nc) p++;
    const BlockPart *part = &j->parts[p];
    const BlockType *b = j->bt[p];
    const size_t wrb = row_bytes(b, K), xrow = j->xrow[p];
    const int n0 = (nc - j->first[p]) * j->chunk[p], n1 = n0 + j->chunk[p] < part->n ? n0 + j->chunk[p] : part->n;
    const int m0 = mc * j->mrows, m1 = m0 + j->mrows < j->M ? m0 + j->mrows : j->M;
    const char *xb = j->xq[j->fmt[p]], *xg = b->tile8 != NULL ? j->xg[j->fmt[p]] : NULL;
    /* tile8 takes two groups at a time (m0 is a multiple of 16: mrows is M or ROWS_PER_TASK) */
    const int step = xg ? 2 * BLOCK_GROUP_ROWS : TILE;
    for (int n = n0; n < n1; n += TILE) {
        const int nw = n1 - n < TILE ? n1 - n : TILE;
        const char *wn = (const char *)part->w + (size_t)n * wrb;
        for (int m = m0; m < m1; m += step) {
            const int nx = m1 - m < step ? m1 - m : step;
            float *yt = j->y + (size_t)m * N_ld + part->col + n;
            if (xg) {
                /* the first pass over these rows prefetches the next ones; later passes find them in cache */
                b->tile8(K, wn, wrb, nw, xg + (size_t)(m / BLOCK_GROUP_ROWS) * group_bytes(b, K), nx, yt, (size_t)N_ld, m == m0 && n + TILE < n1);
            } else if (b->tile) {
                b->tile(K, wn, wrb, nw, xb + (size_t)m * xrow, xrow, nx, yt, (size_t)N_ld);
            } else {
                for (int c = 0; c < nx; c++)
                    for (int r = 0; r < nw; r++) b->vec_dot(K, yt + (size_t)c * N_ld + r, wn + (size_t)r * wrb, xb + (size_t)(m + c) * xrow);
            }
            if (part->bias)
                for (int c = 0; c < nx; c++)
                    for (int r = 0; r < nw; r++) yt[(size_t)c * N_ld + r] = yt[(size_t)c * N_ld + r] + part->bias[n + r];
        }
    }
}

/* block_matmul_parts (blocks.h): parts sharing an activation format share one quantized copy of x */
int block_matmul_parts(const BlockPart *parts, int nparts, const float *x, float *y, int M, int N_ld, int K) {
    if (nparts <= 0 || M <= 0) return 0;
    if (nparts > MAXP) return -2;
    MatmulJob job;
    MatmulJob *j = &job;
    j->parts = parts, j->x = x, j->y = y, j->M = M, j->N_ld = N_ld, j->K = K;
    int nfmt = 0;
    for (int p = 0; p < nparts; p++) {
        const BlockType *bp = j->bt[p] = block_type_get(parts[p].type);
        if (bp == NULL) return -2;
        if (row_bytes(bp, K) == 0) return -3;
        j->fmt[p] = -1;
        for (int f = 0; f < nfmt; f++) {
            const BlockType *o = j->bt[j->fmt_part[f]];
            if (o->quantize_act == bp->quantize_act && o->block == bp->block && o->act_block_bytes == bp->act_block_bytes) j->fmt[p] = f;
        }
        if (j->fmt[p] < 0) {
            j->fmt_part[nfmt] = p;
            j->fmt[p] = nfmt++;
        }
        j->xrow[p] = (size_t)(K / bp->block) * (size_t)bp->act_block_bytes;
    }
    const int groups = (M + BLOCK_GROUP_ROWS - 1) / BLOCK_GROUP_ROWS;
    int grouped = 0; /* formats with interleaved groups */
    for (int f = 0; f < nfmt; f++) {
        const BlockType *bf = j->bt[j->fmt_part[f]];
        const int use_groups = M >= BLOCK_GROUP_ROWS && bf->tile8 != NULL && bf->group_act != NULL;
        j->xq[f] = (char *)malloc(j->xrow[j->fmt_part[f]] * (size_t)M);
        j->xg[f] = use_groups ? (char *)malloc((size_t)groups * group_bytes(bf, K)) : NULL;
        grouped += use_groups;
        if (j->xq[f] == NULL || (use_groups && j->xg[f] == NULL)) {
            for (; f >= 0; f--) free(j->xq[f]), free(j->xg[f]);
            return -1;
        }
    }
    const int threads = block_threads();
    const int qtasks = nfmt * M;
    if ((long)qtasks * K >= 32768) {
        block_tasks_run(M, qtasks, threads, quantize_task, j);
    } else { /* a few rows (decode) are quantized faster than helpers wake up */
        for (int t = 0; t < qtasks; t++) quantize_task(j, t, 0);
    }
    if (grouped) block_tasks_run(M, grouped * groups, threads, group_task, j);

    /* the task grid: (chunk of a part's weight rows) x (chunk of activation rows) */
    j->mrows = M > ROWS_PER_TASK ? ROWS_PER_TASK : M;
    j->mchunks = (M + j->mrows - 1) / j->mrows;
    int ntotal = 0;
    for (int p = 0; p < nparts; p++) ntotal += parts[p].n;
    /* about 4 tasks per thread, each at most what fits L2, each a multiple of TILE weight rows */
    long want = ((long)ntotal * j->mchunks + 4L * threads - 1) / (4L * threads);
    j->first[0] = 0;
    for (int p = 0; p < nparts; p++) {
        long l2 = (long)(L2_BYTES / row_bytes(j->bt[p], K)) / TILE * TILE;
        long c = want < l2 ? want : l2;
        c = (c + TILE - 1) / TILE * TILE;
        j->chunk[p] = (int)(c < TILE ? TILE : c);
        j->first[p + 1] = j->first[p] + (parts[p].n + j->chunk[p] - 1) / j->chunk[p];
    }
    block_tasks_run(M, j->first[nparts] * j->mchunks, threads, product_task, j);
    for (int f = 0; f < nfmt; f++) free(j->xq[f]), free(j->xg[f]);
    return 0;
}

int block_matmul(int type, const float *x, const void *w, const float *bias, float *y, int M, int N, int K) {
    const BlockPart part = {type, w, bias, N, 0};
    return block_matmul_parts(&part, 1, x, y, M, N, K);
}

/* out[i] = row rows[i] of w, dequantized (an embedding lookup; the caller checks that every row
 * index is inside the matrix). 0, -2 (type), -3 (K). */
int block_dequantize_rows(int type, const void *w, const int64_t *rows, int nrows, int K, float *out) {
    const BlockType *bt = block_type_get(type);
    if (bt == NULL) return -2;
    const size_t rb = row_bytes(bt, K);
    if (rb == 0) return -3;
#pragma omp parallel for schedule(static) num_threads(block_threads()) if (nrows > 16)
    for (int i = 0; i < nrows; i++) bt->dequantize_row((const char *)w + (size_t)rows[i] * rb, out + (size_t)i * K, K);
    return 0;
}

/* nrows rows of K floats -> weight blocks, llama.cpp's reference quantizers. 0, -2 (type), -3 (K). */
int block_quantize_rows(int type, const float *x, void *w, int64_t nrows, int K) {
    const BlockType *bt = block_type_get(type);
    if (bt == NULL) return -2;
    const size_t rb = row_bytes(bt, K);
    if (rb == 0) return -3;
#pragma omp parallel for schedule(static) num_threads(block_threads()) if (nrows > 16)
    for (int64_t i = 0; i < nrows; i++) bt->quantize_row(x + (size_t)i * K, (char *)w + (size_t)i * rb, K);
    return 0;
}
