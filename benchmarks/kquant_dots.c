/* K-quant dot products, one thread: llmcli's kquants.c against llama.cpp's ggml-cpu on the same
 * blocks. See benchmarks/README.md ("K-quant kernels") for the command line.
 *
 * For each type, a matrix of N = 2048 weight rows by K = 8192 (random quants, small finite scales)
 * and M activation rows quantized to q8_K; times, best of REPEAT runs:
 *   ours vec_dot   N x 1 products (batch-1 decode)
 *   ggml vec_dot   the same with ggml_vec_dot_<t>_q8_K (llama.cpp's SIMD path for this CPU)
 *   ggml generic   ggml_vec_dot_<t>_q8_K_generic (llama.cpp's scalar loop)
 *   ours tile 4x1  N x 1 products with the tile on 4 weight rows (how blocks.c runs decode)
 *   ours tile 4x4  N x 4 products with the 4x4 tile (a prompt's last rows), per activation row
 *   ours tile8     N x 16 products with tile8 on two interleaved groups of 8 rows (prompts), per row
 * and checks that ours and ggml agree within 1e-4 relative to the row's scale (they sum in
 * different orders, so bits differ). Then quantize_row (64 rows of 4096 floats) against
 * llama.cpp's quantize_row_<t>_ref from libggml-base.so beside libggml-cpu.so, in ns a value,
 * with the bytes compared (they must be equal).
 *
 * usage: kquant_dots PATH/libggml-cpu.so [repeat]
 */
#define _POSIX_C_SOURCE 199309L
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "blocks.h"
#include "ggml_bench.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

enum { N = 2048, K = 8192, M = 16 }; /* the 4x4 tile takes the first 4 rows */

int main(int argc, char **argv) {
    int repeat;
    void *ggml = open_ggml_cpu(argc, argv, &repeat);
    const struct {
        const char *name;
        const BlockType *bt;
        int half_off, n_half; /* where the block's half-precision scales are */
    } types[] = {
        {"q2_K", &block_type_q2_K, 80, 2}, {"q3_K", &block_type_q3_K, 108, 1}, {"q4_K", &block_type_q4_K, 0, 2},
        {"q5_K", &block_type_q5_K, 0, 2},  {"q6_K", &block_type_q6_K, 208, 1},
    };
    float *x = malloc(sizeof(float) * M * K);
    for (int i = 0; i < M * K; i++) x[i] = (float)((int)(rnd() % 2001) - 1000) / 1000.f;
    float *y = malloc(sizeof(float) * N * M), *yg = malloc(sizeof(float) * N);
    printf("%-5s %13s %13s %13s %13s %13s %13s %10s %10s %10s\n", "type", "ours vec_dot", "ours tile4x1", "ggml vec_dot",
           "ggml generic", "tile4x4/row", "tile8/row", "ggml/ours", "4x4 gain", "tile8 gain");
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        const BlockType *bt = types[t].bt;
        char name[64];
        snprintf(name, sizeof name, "ggml_vec_dot_%s_q8_K", types[t].name);
        ggml_dot_fn gdot = (ggml_dot_fn)dlsym(ggml, name);
        snprintf(name, sizeof name, "ggml_vec_dot_%s_q8_K_generic", types[t].name);
        ggml_dot_fn ggen = (ggml_dot_fn)dlsym(ggml, name);
        const size_t row = (size_t)K / QK_K * bt->block_bytes, xrow = (size_t)K / QK_K * bt->act_block_bytes;
        uint8_t *w = malloc(row * N);
        for (size_t i = 0; i < row * N; i++) w[i] = (uint8_t)rnd();
        for (size_t b = 0; b < (size_t)N * K / QK_K; b++)
            for (int h = 0; h < types[t].n_half; h++) {
                const ggml_half v = float_to_half((float)(rnd() % 1000 + 1) * 1e-6f);
                memcpy(w + b * bt->block_bytes + types[t].half_off + 2 * h, &v, 2);
            }
        uint8_t *xq = malloc(xrow * M);
        for (int m = 0; m < M; m++) bt->quantize_act(x + (size_t)m * K, xq + m * xrow, K);
        const size_t gsize = (size_t)K / QK_K * bt->group_block_bytes;
        char *group = bt->group_act ? malloc(2 * gsize) : NULL;
        if (group)
            for (int h = 0; h < 2; h++) bt->group_act(xq + (size_t)8 * h * xrow, xrow, 8, K, group + h * gsize);
        float *y8 = malloc(sizeof(float) * N * M);

        double best[6] = {1e30, 1e30, 1e30, 1e30, 1e30, 1e30};
        for (int r = 0; r < repeat; r++) {
            double t0 = now();
            for (int n = 0; n < N; n++) bt->vec_dot(K, &y[n], w + n * row, xq);
            double t1 = now();
            if (t1 - t0 < best[0]) best[0] = t1 - t0;
            if (gdot) {
                t0 = now();
                for (int n = 0; n < N; n++) gdot(K, &yg[n], 0, w + n * row, 0, xq, 0, 1);
                t1 = now();
                if (t1 - t0 < best[1]) best[1] = t1 - t0;
            }
            if (ggen && r == 0) {
                t0 = now();
                for (int n = 0; n < N; n++) ggen(K, &yg[n], 0, w + n * row, 0, xq, 0, 1);
                t1 = now();
                best[2] = t1 - t0;
            }
            t0 = now();
            for (int n = 0; n < N; n += 4) bt->tile(K, w + n * row, row, 4, xq, xrow, 4, y + n, N);
            t1 = now();
            if ((t1 - t0) / 4 < best[3]) best[3] = (t1 - t0) / 4;
            if (group) {
                t0 = now();
                for (int n = 0; n < N; n += 4) bt->tile8(K, w + n * row, row, 4, group, M, y8 + n, N, 0);
                t1 = now();
                if ((t1 - t0) / M < best[5]) best[5] = (t1 - t0) / M;
            }
            t0 = now();
            for (int n = 0; n < N; n += 4) bt->tile(K, w + n * row, row, 4, xq, xrow, 1, y + n, N);
            t1 = now();
            if (t1 - t0 < best[4]) best[4] = t1 - t0;
        }
        /* agreement with ggml on row 0 of the activations */
        if (gdot) {
            for (int n = 0; n < N; n++) gdot(K, &yg[n], 0, w + n * row, 0, xq, 0, 1);
            double scale = 0, maxdiff = 0;
            for (int n = 0; n < N; n++) {
                if (fabs(yg[n]) > scale) scale = fabs(yg[n]);
                if (fabs(yg[n] - y[n]) > maxdiff) maxdiff = fabs(yg[n] - y[n]);
            }
            if (maxdiff > 1e-4 * scale) {
                fprintf(stderr, "error: %s differs from ggml by %g (scale %g)\n", types[t].name, maxdiff, scale);
                return 1;
            }
        }
        /* tile8's first 4 rows are the 4x4 tile's, bit for bit */
        if (group && memcmp(y8, y, sizeof(float) * N) != 0) {
            fprintf(stderr, "error: %s tile8 differs from the tile\n", types[t].name);
            return 1;
        }
        const double decode = best[0] < best[4] ? best[0] : best[4];
        printf("%-5s %10.3f ms %10.3f ms %10.3f ms %10.3f ms %10.3f ms %10.3f ms %9.2fx %9.2fx %9.2fx\n", types[t].name,
               1e3 * best[0], 1e3 * best[4], 1e3 * best[1], 1e3 * best[2], 1e3 * best[3], group ? 1e3 * best[5] : 0.0,
               best[1] / decode, decode / best[3], group ? decode / best[5] : 0.0);
        free(w);
        free(xq);
        free(group);
        free(y8);
    }

    char base[4096];
    snprintf(base, sizeof base, "%s", argv[1]);
    char *slash = strrchr(base, '/');
    snprintf(slash ? slash + 1 : base, sizeof base - (size_t)(slash ? slash + 1 - base : 0), "libggml-base.so");
    void *gbase = dlopen(base, RTLD_NOW);
    if (!gbase) return 0;
    enum { QN = 64, QK = 4096 };
    float *xf = malloc(sizeof(float) * QN * QK);
    for (int i = 0; i < QN * QK; i++) xf[i] = (float)((int)(rnd() % 20001) - 10000) / 10000.f;
    printf("\n%-5s %16s %16s %10s\n", "type", "ours quantize", "ggml quantize", "ggml/ours");
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        const BlockType *bt = types[t].bt;
        char name[64];
        snprintf(name, sizeof name, "quantize_row_%s_ref", types[t].name);
        void (*gq)(const float *, void *, int64_t) = (void (*)(const float *, void *, int64_t))dlsym(gbase, name);
        const size_t row = (size_t)QK / QK_K * bt->block_bytes;
        uint8_t *ours = malloc(row * QN), *theirs = malloc(row * QN);
        double best[2] = {1e30, 1e30};
        for (int r = 0; r < 3; r++) {
            double t0 = now();
            for (int n = 0; n < QN; n++) bt->quantize_row(xf + (size_t)n * QK, ours + n * row, QK);
            double t1 = now();
            if (t1 - t0 < best[0]) best[0] = t1 - t0;
            t0 = now();
            if (gq) gq(xf, theirs, (int64_t)QN * QK);
            t1 = now();
            if (t1 - t0 < best[1]) best[1] = t1 - t0;
        }
        if (gq && memcmp(ours, theirs, row * QN)) {
            fprintf(stderr, "error: %s quantize_row bytes differ from llama.cpp's\n", types[t].name);
            return 1;
        }
        printf("%-5s %11.1f ns/v %11.1f ns/v %9.2fx\n", types[t].name, 1e9 * best[0] / (QN * QK), 1e9 * best[1] / (QN * QK),
               best[1] / best[0]);
        free(ours);
        free(theirs);
    }
    return 0;
}
