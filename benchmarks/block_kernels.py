"""The block kernels (llmcli/core/kernels/blocks.c) alone: y = x W^T on GGML blocks, per type.

For each type and shape: batch-1 decode (M=1) as weight GB/s, and prefill (M=512) as GFLOP/s,
for this CPU's SIMD build and the portable C build (LLMCLI_ISA=portable: the scalar reference
loop the SIMD paths must reproduce), beside torch.matmul on the float32 dequantized weights (what
prefill would cost on torch's own GEMM). Shapes: SmolLM2-135M's gate_up and down, Llama-3.2-1B's
gate_up.

    python benchmarks/block_kernels.py [--threads 2] [--types Q4_0,Q8_0] [--prefill 512 | 0: decode only]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from llmcli.core import kernels as kmod
from llmcli.core.kernels import available_isas, load_kernels

SHAPES = {"smollm2 gate_up": (3072, 576), "smollm2 down": (576, 1536), "llama1b gate_up": (16384, 2048)}
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32", "Q4_K", "Q6_K"]


def best_time(fn, budget: float = 0.4, at_least: int = 3) -> float:
    fn()
    times, start = [], time.perf_counter()
    while len(times) < at_least or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def weights(t: T, N: int, K: int) -> np.ndarray:
    w = np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)
    if t == T.F32:
        return w.view(np.uint8)
    if t == T.F16:
        return w.astype(np.float16).view(np.uint8)
    return np.ascontiguousarray(quants.quantize(w, t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    best = available_isas()[0]
    builds = {isa: load_kernels(isa=isa) for isa in dict.fromkeys([best, "portable"])}
    kmod.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; decode: weight GB/s at M=1; prefill: GFLOP/s at M={args.prefill}")
    print(f"| type | shape | decode {best} | decode portable | prefill {best} | prefill portable | prefill torch f32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.types.split(","):
        t = T[name]
        if not builds[best].block_type_supported(int(t)):
            continue
        for shape in args.shapes.split(","):
            N, K = SHAPES[shape]
            w = weights(t, N, K)
            x1 = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)
            xp = np.random.default_rng(2).standard_normal((args.prefill, K)).astype(np.float32)
            y = np.empty((max(args.prefill, 1), N), np.float32)
            row = []
            for isa, k in builds.items():

                def run(x, k=k):
                    assert k.block_matmul(int(t), x.ctypes.data, w.ctypes.data, None, y.ctypes.data, x.shape[0], N, K) == 0

                row.append(f"{w.nbytes / best_time(lambda: run(x1)) / 1e9:.1f}")
            for isa, k in builds.items() if args.prefill else ():

                def run_p(k=k):
                    assert k.block_matmul(int(t), xp.ctypes.data, w.ctypes.data, None, y.ctypes.data, args.prefill, N, K) == 0

                row.append(f"{2 * args.prefill * N * K / best_time(run_p, at_least=1) / 1e9:.1f}")
            wf = torch.from_numpy(quants.dequantize(w, t).reshape(N, K).astype(np.float32))
            xt = torch.from_numpy(xp)
            if args.prefill:
                row.append(f"{2 * args.prefill * N * K / best_time(lambda: torch.matmul(xt, wf.T), at_least=1) / 1e9:.1f}")
            print(f"| {name} | {shape} ({N}x{K}) | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
