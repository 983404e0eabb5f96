/* The 32-value block dot products, one thread: llmcli's blocks.c against llama.cpp's ggml-cpu on
 * the same weight blocks. See benchmarks/README.md ("Block kernels") for the command line.
 *
 * For each of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: N = 2048 weight rows by K = 8192 (quantized from
 * seeded floats by blocks.c's reference quantizers, byte-identical to llama.cpp's) and M = 4
 * activation rows; times, best of REPEAT runs, as G weight values per second:
 *   ours vec_dot   N x 1 products (batch-1 decode)
 *   ours tile 4x1  the same through the tile on 4 weight rows (how block_matmul runs decode)
 *   ggml vec_dot   ggml_vec_dot_<t>_q8_<0|1> (llama.cpp's SIMD path for this CPU)
 *   ggml generic   ggml_vec_dot_<t>_q8_<0|1>_generic (llama.cpp's scalar loop)
 *   tile 4x4/row   N x 4 products with the 4x4 tile (prefill), per activation row
 * ggml's activation blocks (half-precision delta, and sum for q8_1) are made from ours, and the
 * results are checked to agree within 1e-3 of the row's scale (different activation deltas and
 * summation orders, so the bits differ).
 *
 * usage: block_dots PATH/libggml-cpu.so [repeat]
 */
#define _POSIX_C_SOURCE 199309L
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "blocks.h"
#include "ggml_bench.h"

const BlockType *block_type_get(int type);

typedef struct { /* ggml's block_q8_1 (block_q8_0 is its d and qs: the first 2 and last 32 bytes) */
    ggml_half d, s;
    int8_t qs[32];
} ggml_q8_1;

static uint32_t rng_state = 2463534242u;
static float rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return (float)((int32_t)rng_state >> 8) * (1.0f / 8388608.0f);
}

enum { N = 2048, K = 8192, M = 4 };

int main(int argc, char **argv) {
    int repeat;
    void *ggml = open_ggml_cpu(argc, argv, &repeat);
    const struct {
        const char *name, *act;
        int type;
    } types[] = {{"q8_0", "q8_0", GGML_TYPE_Q8_0}, {"q4_0", "q8_0", GGML_TYPE_Q4_0}, {"q4_1", "q8_1", GGML_TYPE_Q4_1},
                 {"q5_0", "q8_0", GGML_TYPE_Q5_0}, {"q5_1", "q8_1", GGML_TYPE_Q5_1}};
    float *wf = malloc(sizeof(float) * N * K), *x = malloc(sizeof(float) * M * K);
    /* yg: ggml's SIMD vec_dot (what llama.cpp runs), the reference below; ygen: its scalar loop,
     * timed only (llama-cpp-python 0.3.36's generic Q5_0 disagrees with its own SIMD path) */
    float *y = malloc(sizeof(float) * N * M), *yg = malloc(sizeof(float) * N), *ygen = malloc(sizeof(float) * N);
    for (int i = 0; i < N * K; i++) wf[i] = rnd();
    for (int i = 0; i < M * K; i++) x[i] = rnd();
    printf("%-5s %13s %13s %13s %13s %13s %10s %10s\n", "type", "ours vec_dot", "ours tile4x1", "ggml vec_dot", "ggml generic",
           "tile4x4/row", "ours/ggml", "4x4 gain");
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        const BlockType *bt = block_type_get(types[t].type);
        char name[64];
        snprintf(name, sizeof name, "ggml_vec_dot_%s_%s", types[t].name, types[t].act);
        ggml_dot_fn gdot = (ggml_dot_fn)dlsym(ggml, name);
        snprintf(name, sizeof name, "ggml_vec_dot_%s_%s_generic", types[t].name, types[t].act);
        ggml_dot_fn ggen = (ggml_dot_fn)dlsym(ggml, name);
        if (!gdot || !ggen) {
            fprintf(stderr, "error: %s not in %s\n", name, argv[1]);
            return 1;
        }
        const size_t wrow = (size_t)(K / 32) * bt->block_bytes, xrow = (size_t)(K / 32) * bt->act_block_bytes;
        unsigned char *w = malloc(wrow * N), *xq = malloc(xrow * M);
        ggml_q8_1 *g1 = malloc(sizeof(ggml_q8_1) * (K / 32));
        unsigned char *g0 = malloc(34 * (K / 32));
        for (int n = 0; n < N; n++) bt->quantize_row(wf + (size_t)n * K, w + n * wrow, K);
        for (int m = 0; m < M; m++) bt->quantize_act(x + (size_t)m * K, xq + m * xrow, K);
        /* blocks.c's activation row: int8 qs[nb][32], then float d[nb], s[nb] (and int32 sums) */
        const int nb = K / 32;
        const int8_t *aqs = (const int8_t *)xq;
        const float *ad = (const float *)(xq + 32 * nb), *as = (const float *)(xq + 36 * nb);
        for (int b = 0; b < nb; b++) {
            g1[b].d = float_to_half(ad[b]);
            g1[b].s = float_to_half(as[b]);
            memcpy(g1[b].qs, aqs + 32 * b, 32);
            memcpy(g0 + 34 * b, &g1[b].d, 2);
            memcpy(g0 + 34 * b + 2, aqs + 32 * b, 32);
        }
        const void *gact = types[t].act[3] == '1' ? (const void *)g1 : (const void *)g0;
        double best[5] = {1e9, 1e9, 1e9, 1e9, 1e9};
        for (int r = 0; r < repeat; r++) {
            double t0 = now();
            for (int n = 0; n < N; n++) bt->vec_dot(K, &y[n], w + n * wrow, xq);
            double t1 = now();
            for (int n = 0; n < N; n += 4) bt->tile(K, w + n * wrow, wrow, 4, xq, xrow, 1, &y[n], N);
            double t2 = now();
            for (int n = 0; n < N; n++) gdot(K, &yg[n], 0, w + n * wrow, 0, gact, 0, 1);
            double t3 = now();
            for (int n = 0; n < N; n++) ggen(K, &ygen[n], 0, w + n * wrow, 0, gact, 0, 1);
            double t4 = now();
            for (int n = 0; n < N; n += 4) bt->tile(K, w + n * wrow, wrow, 4, xq, xrow, M, &y[n], N);
            double t5 = now();
            const double dt[5] = {t1 - t0, t2 - t1, t3 - t2, t4 - t3, (t5 - t4) / M};
            for (int i = 0; i < 5; i++) best[i] = dt[i] < best[i] ? dt[i] : best[i];
        }
        /* y row 0 (from the 4x4 tile) against ggml's SIMD vec_dot */
        for (int n = 0; n < N; n++) {
            double scale = 0;
            const float *wr = wf + (size_t)n * K;
            for (int k = 0; k < K; k++) scale += fabs(wr[k] * x[k]);
            if (fabs(y[n] - yg[n]) > 1e-3 * scale) {
                fprintf(stderr, "error: %s row %d: ours %g, ggml %g\n", types[t].name, n, y[n], yg[n]);
                return 1;
            }
        }
        const double values = (double)N * K / 1e9;
        printf("%-5s %13.2f %13.2f %13.2f %13.2f %13.2f %10.2f %10.2f\n", types[t].name, values / best[0], values / best[1],
               values / best[2], values / best[3], values / best[4], best[2] / best[1], best[1] / best[4]);
        free(w);
        free(xq);
        free(g1);
        free(g0);
    }
    return 0;
}
