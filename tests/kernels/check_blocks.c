/* The block kernels' outputs on seeded random data, printed as hex: one build per ISA path, the
 * outputs compared bit for bit by tests/test_block_kernels.py (portable C on x86 against NEON
 * under qemu-aarch64, with and without the dot-product extension).
 *
 * Built with llmcli/core/kernels/blocks.c and, when present, kquants.c; the K-quants are weak
 * symbols, so a type this build lacks prints nothing (the test checks which types were covered).
 * The data come from integer arithmetic only (xorshift), so every machine sees the same floats.
 */
#include <stdio.h>
#include <stdlib.h>

#include "../../llmcli/core/kernels/blocks.h"

const char *block_isa(void);
int block_matmul(int type, const float *x, const void *w, const float *bias, float *y, int M, int N, int K);

static uint32_t state = 2463534242u;

static uint32_t next_u32(void) {
    state ^= state << 13;
    state ^= state >> 17;
    state ^= state << 5;
    return state;
}

/* about N(0, scale^2): four uniforms in [-1, 1), each exact in float */
static float next_float(float scale) {
    float s = 0.0f;
    for (int i = 0; i < 4; i++) s += (float)((int32_t)next_u32() >> 8) * (1.0f / 8388608.0f);
    return s * scale;
}

static void print_hex(const char *what, int type, const void *p, size_t bytes) {
    const unsigned char *b = (const unsigned char *)p;
    printf("%d %s ", type, what);
    for (size_t i = 0; i < bytes; i++) printf("%02x", b[i]);
    printf("\n");
}

static const int TYPES[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0,
                            GGML_TYPE_Q5_1, GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K};

static int check(const BlockType *bt, int K) {
    enum { N = 7, M = 5 };
    const int nb = K / bt->block;
    const size_t wrow = (size_t)nb * bt->block_bytes, xrow = (size_t)nb * bt->act_block_bytes;
    float *wf = malloc(sizeof(float) * N * K), *x = malloc(sizeof(float) * M * K), *deq = malloc(sizeof(float) * N * K);
    float *y = malloc(sizeof(float) * M * N), *bias = malloc(sizeof(float) * N), *dots = malloc(sizeof(float) * M * N);
    unsigned char *w = malloc(wrow * N), *xq = malloc(xrow * M);
    if (!wf || !x || !deq || !y || !bias || !dots || !w || !xq) return 1;
    for (int i = 0; i < N * K; i++) wf[i] = next_float(i % 97 == 0 ? 4.0f : 0.05f); /* a few outliers per row */
    for (int i = 0; i < M * K; i++) x[i] = next_float(1.0f);
    for (int n = 0; n < N; n++) bias[n] = next_float(0.1f);
    for (int n = 0; n < N; n++) bt->quantize_row(wf + (size_t)n * K, w + n * wrow, K);
    for (int n = 0; n < N; n++) bt->dequantize_row(w + n * wrow, deq + (size_t)n * K, K);
    for (int m = 0; m < M; m++) bt->quantize_act(x + (size_t)m * K, xq + m * xrow, K);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) bt->vec_dot(K, &dots[m * N + n], w + n * wrow, xq + m * xrow);
    if (block_matmul(bt->type, x, w, bias, y, M, N, K) != 0) return 1;
    print_hex("quantize_row", bt->type, w, wrow * N);
    print_hex("dequantize_row", bt->type, deq, sizeof(float) * N * K);
    print_hex("quantize_act", bt->type, xq, xrow * M);
    print_hex("vec_dot", bt->type, dots, sizeof(float) * M * N);
    print_hex("block_matmul", bt->type, y, sizeof(float) * M * N);
    if (bt->tile) { /* every tile shape, against vec_dot */
        float t[4 * 4];
        for (int nx = 1; nx <= 4; nx++)
            for (int nw = 1; nw <= 4; nw++) {
                bt->tile(K, w, wrow, nw, xq, xrow, nx, t, 4);
                for (int c = 0; c < nx; c++)
                    for (int r = 0; r < nw; r++)
                        if (memcmp(&t[c * 4 + r], &dots[c * N + r], sizeof(float)) != 0) {
                            printf("%d tile %dx%d differs from vec_dot at (%d, %d)\n", bt->type, nw, nx, r, c);
                            return 1;
                        }
            }
    }
    free(wf); free(x); free(deq); free(y); free(bias); free(dots); free(w); free(xq);
    return 0;
}

int main(void) {
    printf("isa %s\n", block_isa()); /* the path this build runs (the test checks it, then compares the rest) */
    for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++) {
        const BlockType *bt = block_type_get(TYPES[i]);
        if (bt == NULL) continue;
        printf("%d covered\n", TYPES[i]);
        /* K: two super-blocks; the float types also a ragged K */
        if (check(bt, 512) != 0 || (bt->block == 1 && check(bt, 77) != 0)) {
            printf("%d failed\n", TYPES[i]);
            return 1;
        }
    }
    return 0;
}
