"""Issue 13, item 2: which 4-bit CPU matmul to build on, measured on Llama-3.2-1B's MLP shapes.

    python benchmarks/int4_compare.py                 # ~2-4 min on 2 cores
    pip install torchao                               # optional: the torchao rows (never an llmcli dependency)

Shapes: weight (N, K) = (8192, 2048) (gate / up) and (2048, 8192) (down); M = 1 activation row
(decode) and M = 512 (prefill). Weights N(0, 0.02), activations N(0, 1), float32 in and out.
Candidates, each on --threads threads, each quantizing the same float weights its own way:

  llmcli Q4_K          kernels.block_matmul on llama.cpp's Q4_K blocks (what a Q4_K_M GGUF holds),
                       8-bit activation blocks as ggml's (blocks.c / kquants.c)
  llmcli Q4_0          the same on Q4_0 blocks (groups of 32, one delta)
  torch int4 g32/g128  torch.ops.aten._weight_int4pack_mm_for_cpu on the layout of
                       _convert_weight_to_int4pack_for_cpu (asymmetric 4-bit, float scale and zero
                       per group of 32 / 128), float32 activations
  torchao 8da4w        torchao's Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                       group 32), the one torchao int4 config that runs on an x86 CPU in torchao
                       0.18 (its int4 weight-only configs need CUDA or mslk, its packed CPU kernels a
                       build with the torchao kernel library); other configs are tried and listed
  torch f32            the float32 weights and torch's own sgemm (F.linear): the dispatch reference
                       ("prefill is never slower than torch's own GEMM")
  torch f32 + deq      the same plus dequantizing the Q4_K blocks first (what a dispatch to
                       torch.matmul would cost per call when only the blocks are kept)

Each repetition runs every candidate on every shape in turn (interleaved); the table gives the
best repetition (other jobs can only slow a run down): milliseconds, decode as weight GB/s
(bytes of that candidate's packed weights / time), prefill as GFLOP/s, and the relative error
max|y - y_f32| / max|y_f32| against the float32 product with the unquantized weights.
Results: benchmarks/out/int4_compare.md (also printed).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcli.core import kernels as kmod
from llmcli.core.formats import TYPES
from llmcli.core.formats.blocks import dequantize_rows, quantize_rows

OUT = Path(__file__).resolve().parent / "out"
SHAPES = {"gate/up 8192x2048": (8192, 2048), "down 2048x8192": (2048, 8192)}


def int4pack(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """torch's CPU int4 layout: 4-bit q in 0..15 per group, value = (q - 8) * scale + zero."""
    n, k = w.shape
    g = w.view(n, k // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
    zero = lo + 8 * scale
    scales_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous()  # (K/group, N, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return packed, scales_zeros, packed.numel() * packed.element_size() + scales_zeros.numel() * 4


def candidates(w: torch.Tensor, kernels) -> tuple[dict, dict[str, str]]:
    """name -> (fn(x) -> y, weight bytes); and name -> why a candidate is unavailable."""
    n, k = w.shape
    found, missing = {}, {}
    for tname in ("Q4_K", "Q4_0"):
        gtype = TYPES[tname]
        blocks = quantize_rows(w, gtype, kernels)

        def run(x, blocks=blocks, gtype=gtype):
            y = torch.empty((x.shape[0], n))
            assert kernels.block_matmul(gtype.id, x.data_ptr(), blocks.data_ptr(), None, y.data_ptr(), x.shape[0], n, k) == 0
            return y

        found[f"llmcli {tname}"] = (run, blocks.numel())
        if tname == "Q4_K":
            q4k = blocks
    for group in (32, 128):
        packed, sz, nbytes = int4pack(w, group)
        found[f"torch int4 g{group}"] = (lambda x, p=packed, s=sz, g=group: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, g, s), nbytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationIntxWeightConfig, quantize_
        tries = {
            "torchao 8da4w": lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4),
            "torchao 8da4w packed": lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, intx_packing_format="opaque_torchao_auto"),
            "torchao int4 weight-only": lambda: Int4WeightOnlyConfig(group_size=32),
        }
        for name, config in tries.items():
            try:
                lin = torch.nn.Linear(k, n, bias=False)
                lin.weight.data.copy_(w)
                quantize_(lin, config())
                lin(torch.zeros(1, k))
                found[name] = (lambda x, lin=lin: lin(x), n * k // 2 + n * k // 32 * 4)  # int4 values + a float scale per 32
            except Exception as exc:  # noqa: BLE001 - a config this machine cannot run is reported, not fatal
                missing[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    except ImportError:
        missing["torchao"] = "not installed (pip install torchao)"
    found["torch f32"] = (lambda x: F.linear(x, w), n * k * 4)
    found["torch f32 + deq"] = (lambda x: F.linear(x, dequantize_rows(q4k, TYPES["Q4_K"], k, kernels)), q4k.numel())
    return found, missing


def best_time(fn, x, repeat: int) -> float:
    fn(x)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels = kmod.load_kernels()
    kmod.set_threads(args.threads)
    torch.manual_seed(0)
    setups = {}
    for label, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.02
        xs = {1: torch.randn(1, k), args.prefill: torch.randn(args.prefill, k)}
        found, missing = candidates(w, kernels)
        setups[label] = (w, xs, found, missing)
    best: dict[tuple[str, int, str], float] = {}
    for _ in range(args.reps):
        for label, (w, xs, found, _) in setups.items():
            for m, x in xs.items():
                for name, (fn, _) in found.items():
                    key = (label, m, name)
                    best[key] = min(best.get(key, float("inf")), best_time(fn, x, 10 if m == 1 else 1))
    lines = [
        f"threads {args.threads}, best of {args.reps} interleaved repetitions, load average {os.getloadavg()[0]:.1f}",
        "",
        "| shape | M | candidate | ms | decode GB/s or prefill GFLOP/s | rel. error vs f32 |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for label, (w, xs, found, missing) in setups.items():
        for m, x in xs.items():
            ref = F.linear(x, w)
            for name, (fn, nbytes) in found.items():
                t = best[(label, m, name)]
                rate = f"{nbytes / t / 1e9:.1f} GB/s" if m == 1 else f"{2 * m * w.numel() / t / 1e9:.1f} GFLOP/s"
                err = float((fn(x) - ref).abs().max() / ref.abs().max())
                lines.append(f"| {label} | {m} | {name} | {1e3 * t:.2f} | {rate} | {err:.4f} |")
    for name, why in next(iter(setups.values()))[3].items():
        lines.append(f"\n{name}: unavailable here ({why})")
    table = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "int4_compare.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
