/* What benchmarks/block_dots.c and benchmarks/kquant_dots.c share: a monotonic clock and opening
 * llama.cpp's CPU backend (llama-cpp-python's libggml-cpu.so) to compare against. */
#ifndef LLMCLI_GGML_BENCH_H
#define LLMCLI_GGML_BENCH_H

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef void (*ggml_dot_fn)(int n, float *s, size_t bs, const void *vx, size_t bx, const void *vy, size_t by, int nrc);

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* argv: PATH/libggml-cpu.so [repeat]. The library, initialised (ggml's half -> float table), and
 * the repeat count (default 5); exits with a message on bad usage or a library that will not load. */
static void *open_ggml_cpu(int argc, char **argv, int *repeat) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PATH/libggml-cpu.so [repeat]\n", argv[0]);
        exit(2);
    }
    void *ggml = dlopen(argv[1], RTLD_NOW);
    if (!ggml) {
        fprintf(stderr, "error: %s\n", dlerror());
        exit(1);
    }
    void (*cpu_init)(void) = (void (*)(void))dlsym(ggml, "ggml_cpu_init");
    if (cpu_init) cpu_init();
    *repeat = argc > 2 ? atoi(argv[2]) : 5;
    return ggml;
}

#endif
