"""Memory while loading SmolLM2-135M-Instruct as float32: peak RSS against the float32 weight bytes.

    python benchmarks/load_memory.py            # about a minute on 2 cores

Each loader runs in a fresh subprocess (peak RSS = VmHWM, which exec resets, unlike ru_maxrss):
  llmcli          llmcli.core.loader.load_model(gguf, "float32")   (GGUF Q4_1 -> float32, fused layout)
  llmcli cached   the same through the llmcli cache, as every command loads: a later load maps the
                  dequantized, fused weights the first load wrote (run any llmcli command once first)
  llmcli int8     the same with quantize="int8"                   (float32 first, then int8 linears)
  transformers    AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)

Columns: RSS after the imports (the baseline a loader cannot avoid), peak RSS during the load,
RSS once loaded, and peak / weights and (peak - baseline) / weights, where weights = the float32
bytes of every weight once (tied embedding once). (peak - baseline) / weights near 1.0 means the
loader never holds two copies of the weights; 2.0 means a full extra copy at some point.
Results: benchmarks/out/load_memory.md (also printed) and load_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
LOADERS = ("llmcli", "llmcli-cached", "llmcli-int8", "transformers")


def status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise SystemExit(f"no {field} in /proc/self/status: this benchmark runs on Linux only")


def worker(loader: str, gguf: Path) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch  # noqa: F401  (part of every loader's baseline)

    if loader.startswith("llmcli"):
        from llmcli.catalog import cache_root
        from llmcli.core.loader import load_model

        cache = cache_root() if loader == "llmcli-cached" else None
        baseline = status_bytes("VmRSS")
        start = time.perf_counter()
        loaded = load_model(gguf, dtype="float32", quantize="int8" if loader == "llmcli-int8" else None, cache_dir=cache)
        seconds = time.perf_counter() - start
        held = loaded.module
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        baseline = status_bytes("VmRSS")
        start = time.perf_counter()
        held = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        seconds = time.perf_counter() - start
    assert held is not None
    return {"loader": loader, "baseline": baseline, "peak": status_bytes("VmHWM"), "after": status_bytes("VmRSS"), "seconds": seconds}


def float32_weight_bytes(gguf: Path) -> int:
    from gguf import GGUFReader

    return 4 * sum(int(t.n_elements) for t in GGUFReader(str(gguf)).tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="the SmolLM2 GGUF (default: the llmcli catalogue copy)")
    ap.add_argument("--loaders", default=",".join(LOADERS))
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.gguf)))
        return
    if args.gguf is None:
        from llmcli.catalog import resolve_model_path

        args.gguf = resolve_model_path("smollm2-135m-instruct", lambda m: print(m, file=sys.stderr))
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    weights = float32_weight_bytes(args.gguf)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results: dict[str, list[dict]] = {}
    for rep in range(args.reps):
        for loader in loaders:
            print(f"[rep {rep + 1}/{args.reps}] {loader} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--worker", loader, "--gguf", str(args.gguf)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"{loader} failed ({proc.returncode})")
            results.setdefault(loader, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mib = 2**20
    lines = [
        f"Loading {args.gguf.name} as float32; float32 weights = {weights / mib:.0f} MiB; worst of {args.reps} run(s) per loader",
        "",
        "| loader | RSS after imports | peak RSS | RSS loaded | peak / weights | (peak - imports) / weights | load time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for loader in loaders:
        r = max(results[loader], key=lambda x: x["peak"])
        lines.append(
            f"| {loader} | {r['baseline'] / mib:.0f} MiB | {r['peak'] / mib:.0f} MiB | {r['after'] / mib:.0f} MiB | "
            f"{r['peak'] / weights:.2f} | {(r['peak'] - r['baseline']) / weights:.2f} | {r['seconds']:.1f} s |"
        )
    table = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "load_memory.md").write_text(table)
    (OUT / "load_memory.json").write_text(json.dumps({"weights_float32": weights, "results": results}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
