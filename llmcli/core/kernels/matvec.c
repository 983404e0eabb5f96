/* Native kernels for the CPU path: float32 matrix products, and the rest of a decode step.
 *
 * Decoding one token per sequence reads every weight once per step, so its speed limit is
 * memory bandwidth; a batch of decoding sequences, or a prompt, is arithmetic-bound. torch's
 * sgemm for a handful of rows reaches less than half of the bandwidth on the CPUs we measured
 * (benchmarks/README.md). float32 weights are stored in panels that stream once for all rows
 * (matmul_panels_f32), split across torch's own OpenMP threads (the library links the libgomp
 * that torch has already loaded). The decode step's pieces (block products, attention, norms,
 * SiLU) run on blocks.c's task pool instead (block_pool_run: no barrier waits for a thread the OS
 * has not scheduled).
 *
 * Every output element is computed in one fixed order whatever M is: a sequence gets
 * bit-identical results alone or in a batch.
 *
 * Weights in GGML's block formats (Q4_0, Q4_K, ... as the GGUF file stores them) run on blocks.c,
 * which this library links in: Linear kind 2, and kind 3 for fused projections made of parts.
 *
 * AVX-512 intrinsics where the build machine has it (-march=native); elsewhere portable C whose
 * `omp simd` loops the compiler vectorizes for the machine (AVX2, NEON). Built here with AVX-512
 * turned off, the portable paths still run well ahead of torch's sgemm for one row; tests run
 * both builds.
 */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <omp.h>

#include "blocks.h" /* block_matmul_parts: Linear kinds 2 and 3 */
#include "attention.h" /* attn_decode_f32 */
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* Threads for every parallel region: set by matvec_set_threads (llmcli's --threads), else OpenMP's
 * own count. An explicit count, because OpenMP's is per calling thread: torch.set_num_threads in the
 * main thread does not reach a server's engine thread. */
static int n_threads = 0;
#define THREADS (n_threads > 0 ? n_threads : omp_get_max_threads())

void matvec_set_threads(int n) { n_threads = n > 0 ? n : 0; }

int matvec_threads(void) { return THREADS; }

int matvec_simd_width(void) {
#ifdef __AVX512F__
    return 16;
#else
    return 1;
#endif
}


/* ------------------------------------------------------------------ matrix products on panels
 * The weights are stored in panels of 32 output columns, each panel k-major: panel p holds
 * W[32p .. 32p+31, k] for k = 0..K-1 as [K][32] (the last panel [K][N mod 32] when N is not a
 * multiple of 32), so the layout holds exactly N*K values. A panel is one contiguous stream from
 * memory, and a tile of up to 8 activation rows x 32 columns keeps 16 accumulators in registers
 * while each weight vector is loaded once for all 8 rows: measured on 2 Zen 4 cores, 16 rows of
 * SmolLM2's projections take about half the time of dot products on row-major weights, and
 * every shape we use runs faster than torch's sgemm (benchmarks/README.md).
 *
 * Output element (m, n) is always the chain acc = fma(x[m, k], W[n, k], acc) for k = 0..K-1
 * starting from 0, then + bias[n]: the same operations whatever M, the tile or the thread, so a
 * sequence gets bit-identical results alone or in a batch.
 */
#define PANEL 32
#define TILE_ROWS 8  /* activation rows per tile: 8 x 2 accumulators + the weight vectors fit 32 registers */
#define ROW_BLOCK 64 /* rows per task: threads split (panel, row block) pairs, panel-major */

typedef struct {
    const float *values; /* this panel's [K][ldw] */
    int ldw;            /* the panel's width: 32, or N mod 32 for the last one */
} Panel;

/* rows of this tile (xt: the tile's activations transposed, [K][mr]) against one panel. `full`
 * (ldw == PANEL) is a compile-time constant at each call: full panels get unmasked loads at a constant
 * stride, which runs about twice as fast as the general form. */
static inline __attribute__((always_inline)) void panel_tile(const int mr, const int full, const float *restrict xt, Panel panel, int K,
                                                             const float *restrict bias, float *restrict y, size_t ldy) {
    const int ldw = full ? PANEL : panel.ldw;
    const float *wf = panel.values;
#ifdef __AVX512F__
    __mmask16 m0 = ldw >= 16 ? 0xFFFF : (__mmask16)((1u << ldw) - 1);
    __mmask16 m1 = ldw >= 32 ? 0xFFFF : ldw <= 16 ? 0 : (__mmask16)((1u << (ldw - 16)) - 1);
    __m512 a[TILE_ROWS][2];
    for (int m = 0; m < mr; m++) a[m][0] = a[m][1] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        const float *wk = wf + (size_t)k * ldw;
        const __m512 w0 = full ? _mm512_loadu_ps(wk) : _mm512_maskz_loadu_ps(m0, wk);
        const __m512 w1 = full ? _mm512_loadu_ps(wk + 16) : _mm512_maskz_loadu_ps(m1, wk + 16);
        const float *xk = xt + (size_t)k * mr;
        for (int m = 0; m < mr; m++) {
            __m512 b = _mm512_set1_ps(xk[m]);
            a[m][0] = _mm512_fmadd_ps(b, w0, a[m][0]);
            a[m][1] = _mm512_fmadd_ps(b, w1, a[m][1]);
        }
    }
    __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    for (int m = 0; m < mr; m++) {
        _mm512_mask_storeu_ps(y + m * ldy, m0, _mm512_add_ps(a[m][0], b0));
        _mm512_mask_storeu_ps(y + m * ldy + 16, m1, _mm512_add_ps(a[m][1], b1));
    }
#else
    /* the same loop order for every mr: one function, one code path, so the bits do not depend on M */
    float a[TILE_ROWS][PANEL];
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < PANEL; j++) a[m][j] = 0.0f;
    for (int k = 0; k < K; k++) {
        const float *wk = wf + (size_t)k * ldw;
        for (int m = 0; m < mr; m++) {
            float xv = xt[(size_t)k * mr + m];
#pragma omp simd
            for (int j = 0; j < ldw; j++) a[m][j] = fmaf(xv, wk[j], a[m][j]);
        }
    }
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < ldw; j++) y[m * ldy + j] = a[m][j] + (bias ? bias[j] : 0.0f);
#endif
}

#define PANEL_TILE_CASES(full)                                                     \
    switch (mr) { /* constant row counts: every accumulator stays in a register */     \
    case 8: panel_tile(8, full, xt, panel, K, bias, y, ldy); break;              \
    case 7: panel_tile(7, full, xt, panel, K, bias, y, ldy); break;              \
    case 6: panel_tile(6, full, xt, panel, K, bias, y, ldy); break;              \
    case 5: panel_tile(5, full, xt, panel, K, bias, y, ldy); break;              \
    case 4: panel_tile(4, full, xt, panel, K, bias, y, ldy); break;              \
    case 3: panel_tile(3, full, xt, panel, K, bias, y, ldy); break;              \
    case 2: panel_tile(2, full, xt, panel, K, bias, y, ldy); break;              \
    default: panel_tile(1, full, xt, panel, K, bias, y, ldy); break;             \
    }

static void panel_rows(int mr, const float *xt, Panel panel, int K, const float *bias, float *y, size_t ldy) {
    if (panel.ldw == PANEL)
        PANEL_TILE_CASES(1)
    else
        PANEL_TILE_CASES(0)
}

/* y (M, N) = x (M, K) W^T + bias on float32 panels.
 * Returns 0, or -1 when the transposed copy of x cannot be allocated (y is then untouched). */
int matmul_panels_f32(const float *x, const float *W, const float *bias, float *y, int M, int N, int K) {
    int panels = (N + PANEL - 1) / PANEL, blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
    /* each tile's activations transposed to [K][mr] (one row needs no transposing) */
    float *xt = M == 1 ? NULL : (float *)malloc(sizeof(float) * (size_t)M * K);
    if (M > 1 && xt == NULL) return -1;
    if (M > 1) {
#pragma omp parallel for schedule(static) num_threads(THREADS)
        for (int m0 = 0; m0 < M; m0 += TILE_ROWS) {
            int mr = M - m0 < TILE_ROWS ? M - m0 : TILE_ROWS;
            float *dst = xt + (size_t)m0 * K;
            for (int m = 0; m < mr; m++)
                for (int k = 0; k < K; k++) dst[(size_t)k * mr + m] = x[(size_t)(m0 + m) * K + k];
        }
    }
    const float *xs = M == 1 ? x : xt;
#pragma omp parallel for schedule(static) num_threads(THREADS)
    for (int task = 0; task < panels * blocks; task++) {
        int p = task / blocks, n0 = p * PANEL;
        Panel panel = {W + (size_t)n0 * K, N - n0 < PANEL ? N - n0 : PANEL}; /* every panel before p is full: 32 K values each */
        int end = (task % blocks + 1) * ROW_BLOCK < M ? (task % blocks + 1) * ROW_BLOCK : M;
        for (int m0 = task % blocks * ROW_BLOCK; m0 < end; m0 += TILE_ROWS) {
            int mr = end - m0 < TILE_ROWS ? end - m0 : TILE_ROWS;
            panel_rows(mr, xs + (size_t)m0 * K, panel, K, bias ? bias + n0 : NULL, y + (size_t)m0 * N + n0, (size_t)N);
        }
    }
    free(xt);
    return 0;
}


/* ------------------------------------------------------------------ the rest of a decode step
 * Small ops that cost torch more in dispatch than in arithmetic at one position per sequence.
 */

/* out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w, the float32 statistics as HF computes them */
static void rms_norm_row(const float *xm, const float *w, float *om, int K, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int k = 0; k < K; k++) ss += xm[k] * xm[k];
    float inv = 1.0f / sqrtf(ss / (float)K + eps);
#pragma omp simd
    for (int k = 0; k < K; k++) om[k] = xm[k] * inv * w[k];
}

typedef struct {
    const float *x, *w;
    float *out;
    int K;
    float eps;
} RmsJob;

static void rms_norm_at(void *ctx, int m) {
    const RmsJob *j = (const RmsJob *)ctx;
    rms_norm_row(j->x + (size_t)m * j->K, j->w, j->out + (size_t)m * j->K, j->K, j->eps);
}

void rms_norm_f32(const float *x, const float *w, float *out, int M, int K, float eps) {
    RmsJob job = {x, w, out, K, eps};
    block_rows_run(M, K, rms_norm_at, &job);
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

/* gate_up (M, 2I) = [gate | up] -> out (M, I) = silu(gate) * up */
static void silu_mul_row(const float *g, float *o, int I) {
    const float *u = g + I;
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

typedef struct {
    const float *gate_up;
    float *out;
    int I;
} SiluJob;

static void silu_mul_at(void *ctx, int m) {
    const SiluJob *j = (const SiluJob *)ctx;
    silu_mul_row(j->gate_up + (size_t)m * 2 * j->I, j->out + (size_t)m * j->I, j->I);
}

void silu_mul_f32(const float *gate_up, float *out, int M, int I) {
    SiluJob job = {gate_up, out, I};
    block_rows_run(M, 8L * I, silu_mul_at, &job); /* expf: about 8 times a norm's work per value */
}

/* attention: attention.c (attn_decode_f32), one fixed order per query row on every ISA */

/* ------------------------------------------------------------------ a whole decode step
 * Every layer of a Llama-family block at one position per row, in one call: the Python side
 * would otherwise spend longer dispatching ~10 small calls per layer than the arithmetic takes
 * (SmolLM2 in 8 bits reads its weights in about 5 ms per token).
 */

/* One projection's weights. Field order is the ABI shared with kernels.LinearDesc. */
typedef struct Linear {
    int kind;             /* 0: float32 weight in panels (see above);
                           * 2: GGML blocks (`type`, rows from `weight`, as the GGUF file stores them, blocks.c);
                           * 3: a concatenation: `nparts` Linears whose outputs lie side by side (n = the sum of theirs) */
    const void *weight;
    const float *bias;    /* NULL for none (kind 3: each part has its own) */
    int n, k;
    int type;             /* kind 2: GGML_TYPE_* */
    const struct Linear *parts; /* kind 3 */
    int nparts;
} Linear;

typedef struct {
    const float *input_norm, *post_norm; /* RMSNorm weights [d] */
    Linear qkv, o, gate_up, down;
} Block;

#define MAX_PARTS 16

/* y (M, lin->n) = x (M, lin->k) W^T + bias. Returns 0, -1 (no memory), -2 (a type or kind this build
 * cannot run), -3 (K not a whole number of blocks). */
static int linear_apply(const Linear *lin, const float *x, float *y, int M) {
    switch (lin->kind) {
    case 0: return matmul_panels_f32(x, (const float *)lin->weight, lin->bias, y, M, lin->n, lin->k);
    case 2: {
        const BlockPart part = {lin->type, lin->weight, lin->bias, lin->n, 0};
        return block_matmul_parts(&part, 1, x, y, M, lin->n, lin->k);
    }
    case 3: {
        /* block parts run together (one quantized activation, one parallel region); panel parts,
         * which write whole rows, go through a buffer */
        BlockPart bp[MAX_PARTS];
        int nb = 0, col = 0, status = 0;
        if (lin->nparts > MAX_PARTS) return -2;
        for (int i = 0; i < lin->nparts; i++) {
            const Linear *p = &lin->parts[i];
            if (p->k != lin->k || p->kind == 3) return -2;
            if (p->kind == 2) bp[nb++] = (BlockPart){p->type, p->weight, p->bias, p->n, col};
            col += p->n;
        }
        if (col != lin->n) return -2;
        status = block_matmul_parts(bp, nb, x, y, M, lin->n, lin->k);
        col = 0;
        for (int i = 0; i < lin->nparts && status == 0; i++) {
            const Linear *p = &lin->parts[i];
            if (p->kind != 2) {
                float *tmp = (float *)malloc(sizeof(float) * (size_t)M * p->n);
                if (tmp == NULL) return -1;
                status = linear_apply(p, x, tmp, M);
                for (int m = 0; m < M && status == 0; m++)
                    for (int j = 0; j < p->n; j++) y[(size_t)m * lin->n + col + j] = tmp[(size_t)m * p->n + j];
                free(tmp);
            }
            col += p->n;
        }
        return status;
    }
    default: return -2;
    }
}

/* the Linear API for Python (kernels.LinearDesc): tests and one-off projections */
int linear_forward(const Linear *lin, const float *x, float *y, int M) { return linear_apply(lin, x, y, M); }

/* x (B, d): the residual stream, updated in place through every block.
 * kcs[l], vcs[l]: layer l's cache rows (B, nk, cap, D) with strides sb, sh, ss.
 * Returns 0, or linear_apply's / attn_decode_f32's error (x is then partly updated: discard it). */
int decode_blocks_f32(const Block *blocks, int L, float *x, int B, int d, float eps, int nq, int nk, int D, int window,
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
    int status = normed && qkv && att && gate_up && h && delta ? 0 : -1;
    for (int l = 0; l < L && status == 0; l++) {
        const Block *blk = &blocks[l];
        rms_norm_f32(x, blk->input_norm, normed, B, d, eps);
        if ((status = linear_apply(&blk->qkv, normed, qkv, B)) != 0) break;
        if ((status = attn_decode_f32(qkv, cos, sin, pos, kcs[l], vcs[l], sb, sh, ss, B, nq, nk, D, window, att)) != 0) break;
        if ((status = linear_apply(&blk->o, att, delta, B)) != 0) break;
        for (size_t i = 0; i < (size_t)B * d; i++) x[i] += delta[i];
        rms_norm_f32(x, blk->post_norm, normed, B, d, eps);
        if ((status = linear_apply(&blk->gate_up, normed, gate_up, B)) != 0) break;
        silu_mul_f32(gate_up, h, B, inter);
        if ((status = linear_apply(&blk->down, h, delta, B)) != 0) break;
        for (size_t i = 0; i < (size_t)B * d; i++) x[i] += delta[i];
    }
    free(normed); free(qkv); free(att); free(gate_up); free(h); free(delta);
    return status;
}
