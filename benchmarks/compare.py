"""llmcli against its peers on SmolLM2-135M-Instruct, in one run: transformers and llama.cpp.

    python benchmarks/compare.py                # 3 interleaved repetitions, ~5-10 minutes on 2 cores
    python benchmarks/compare.py --reps 1 --gen 32   # a quick look

Tools (each repetition runs every tool once, one fresh subprocess per tool and repetition, so
the peak RSS of one tool never includes another's, and slow drifts of the machine hit all alike):
  llmcli           the engine on the GGUF dequantized to float32 (core prefill; Engine greedy decode)
  llmcli int8      the same with --quantize int8 (Q8_0-style 8-bit weights, float32 activations)
  transformers     AutoModelForCausalLM.from_pretrained(dir, gguf_file=...), float32 (forward; generate)
  llama.cpp Q4_1   llama_cpp.Llama on the original Q4_1 GGUF
  llama.cpp Q8_0   llama_cpp.Llama on a Q8_0 GGUF made from it with llama.cpp's own quantizer

Tests (random token ids, seeded, the same for every tool):
  pp<P> b1   one prompt of P tokens into an empty cache; tokens/s = P / time
  tg<N> b1   N tokens generated greedily after a 1-token prompt (N forwards); tokens/s = N / time
  tg<N> b16  the same for 16 sequences at once (llmcli engine, transformers generate; llama.cpp's
             Python API has no batched generation); tokens/s = 16 N / time
  pp<P> b16  only with --batch-prefill: 16 prompts of P tokens in one forward (slow on 2 cores,
             and prefill is compute-bound already at b1, so it changes little)

The memory-bandwidth bound of batch-1 decode is copy bandwidth (torch's copy on --threads threads,
counted as bytes read + bytes written, STREAM's convention) / the weight bytes read per token (every matrix once;
the tied embedding matrix is read whole by the output projection).

Results: benchmarks/out/compare.md (the table, also printed) and compare.json (every sample).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
TOOLS = ("llmcli", "llmcli-int8", "transformers", "llamacpp-q4_1", "llamacpp-q8_0")
LABELS = {"llmcli": "llmcli (float32)", "llmcli-int8": "llmcli int8 (Q8_0-style)", "transformers": "transformers (float32)", "llamacpp-q4_1": "llama.cpp Q4_1", "llamacpp-q8_0": "llama.cpp Q8_0"}
BATCHED = {"llmcli", "llmcli-int8", "transformers"}
OURS = ("llmcli", "llmcli-int8")


# ---------------------------------------------------------------- helpers shared by parent and workers


def peak_rss() -> int:
    """This process's peak RSS: VmHWM, since ru_maxrss keeps the parent's peak across exec (Linux only)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status: these benchmarks measure memory on Linux only")


def random_ids(seed: int, vocab: int, shape: tuple[int, ...]) -> list:
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, size=shape).tolist()


def smollm2_gguf() -> Path:
    from llmcli.catalog import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct", lambda m: print(m, file=sys.stderr))


def make_q8_0(src: Path, dst: Path, threads: int) -> Path:
    """A Q8_0 copy of the GGUF, made by llama.cpp's own quantizer (requantizing the Q4_1 values)."""
    if dst.is_file():
        return dst
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True  # the source is already quantized: Q8_0 of its dequantized values
    params.nthread = threads
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")
    tmp.rename(dst)
    return dst


def gguf_weight_bytes(path: Path) -> tuple[int, int]:
    """(bytes of every tensor as stored, number of weights) of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors), sum(int(t.n_elements) for t in reader.tensors)


def copy_bandwidth(threads: int, nbytes: int = 256 * 2**20, repeats: int = 7) -> float:
    """Bytes/s of a copy of a buffer far larger than the caches (read + write counted), on as many
    threads as the tools get: one thread cannot saturate the memory system, so a one-thread copy
    would understate the bound for tools that stream the weights on every thread."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


# ---------------------------------------------------------------- workers (one subprocess each)


def worker_llmcli(spec: dict) -> list[dict]:
    import torch

    from llmcli.core.generate import Request, prefill
    from llmcli.core.models.base import KVCache
    from llmcli.core.sampling import SamplingParams
    from llmcli.engine import Engine

    torch.set_num_threads(spec["threads"])
    # The context is bounded to what the tests use, as llama.cpp's n_ctx is bounded below (the
    # engine's cache grows on demand, so this caps it rather than sizing it).
    quantize = "int8" if spec["tool"] == "llmcli-int8" else None
    engine = Engine(spec["gguf"], dtype="float32", quantize=quantize, batch_size=max(spec["batches"]), max_context=spec["prompt"] + spec["gen"] + 8)
    loaded = engine.loaded
    vocab = loaded.config.vocab_size

    def pp(batch: int) -> float:
        ids = random_ids(spec["seed"], vocab, (batch, spec["prompt"]))
        if batch == 1:
            cache = KVCache.for_model(loaded.config, 1, spec["prompt"] + 1)
            start = time.perf_counter()
            prefill(loaded.module, cache, 0, ids[0]).argmax().item()  # the engine's own admission path
            return time.perf_counter() - start
        cache = KVCache.for_model(loaded.config, batch, spec["prompt"] + 1)
        last = torch.full((batch,), spec["prompt"] - 1)
        with torch.inference_mode():
            start = time.perf_counter()
            loaded.module(torch.tensor(ids), cache=cache, logits_index=last).logits.argmax(-1).tolist()
            return time.perf_counter() - start

    def tg(batch: int, n: int) -> float:
        firsts = random_ids(spec["seed"] + 1, vocab, (batch,))
        reqs = [Request(id=i, prompt_ids=[t], params=SamplingParams(temperature=0.0), max_tokens=n, ignore_eos=True) for i, t in enumerate(firsts)]
        start = time.perf_counter()
        results = list(engine.iter_results(reqs, batch_size=batch))
        elapsed = time.perf_counter() - start
        assert all(len(r.generated_ids) == n for r in results)
        return elapsed

    tg(1, 4)  # warm-up: threads started, weights paged in
    return _measure(spec, pp, tg, batched=True)


def worker_transformers(spec: dict) -> list[dict]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    gguf = Path(spec["gguf"])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    vocab = model.config.vocab_size

    def pp(batch: int) -> float:
        ids = torch.tensor(random_ids(spec["seed"], vocab, (batch, spec["prompt"])))
        with torch.inference_mode():
            start = time.perf_counter()
            # logits_to_keep=1: only the last position's logits, as generate() asks for them
            model(ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
            return time.perf_counter() - start

    def tg(batch: int, n: int) -> float:
        ids = torch.tensor(random_ids(spec["seed"] + 1, vocab, (batch, 1)))
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
            elapsed = time.perf_counter() - start
        assert out.shape == (batch, n + 1)
        return elapsed

    tg(1, 4)
    return _measure(spec, pp, tg, batched=True)


def worker_llamacpp(spec: dict) -> list[dict]:
    import llama_cpp
    import numpy as np

    path = spec["gguf"] if spec["tool"] == "llamacpp-q4_1" else spec["q8_0"]
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=spec["prompt"] + spec["gen"] + 8, n_batch=spec["prompt"], n_ubatch=spec["prompt"], n_threads=spec["threads"], n_threads_batch=spec["threads"], verbose=False
    )
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    def pp(batch: int) -> float:
        ids = random_ids(spec["seed"], vocab, (1, spec["prompt"]))[0]
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        int(last_logits().argmax())
        return time.perf_counter() - start

    def tg(batch: int, n: int) -> float:
        token = random_ids(spec["seed"] + 1, vocab, (1,))[0]
        llm.reset()
        start = time.perf_counter()
        for _ in range(n):
            llm.eval([token])
            token = int(last_logits().argmax())
        return time.perf_counter() - start

    tg(1, 4)
    return _measure(spec, pp, tg, batched=False)


def _measure(spec: dict, pp, tg, batched: bool) -> list[dict]:
    rows = []
    for batch in spec["batches"]:
        if batch > 1 and not batched:
            continue
        if batch == 1 or spec["batch_prefill"]:
            rows.append({"test": f"pp{spec['prompt']}", "batch": batch, "tokens": batch * spec["prompt"], "seconds": pp(batch)})
        rows.append({"test": f"tg{spec['gen']}", "batch": batch, "tokens": batch * spec["gen"], "seconds": tg(batch, spec["gen"])})
    return rows


WORKERS = {"llmcli": worker_llmcli, "llmcli-int8": worker_llmcli, "transformers": worker_transformers, "llamacpp-q4_1": worker_llamacpp, "llamacpp-q8_0": worker_llamacpp}


def run_worker(spec: dict) -> None:
    start = time.perf_counter()
    rows = WORKERS[spec["tool"]](spec)
    print(json.dumps({"tool": spec["tool"], "rows": rows, "peak_rss_bytes": peak_rss(), "wall_seconds": time.perf_counter() - start}))


# ---------------------------------------------------------------- parent: schedule, collect, tabulate


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (each a fresh subprocess per tool)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="the batched size (besides 1) for tools that batch")
    ap.add_argument("--batch-prefill", action="store_true", help="also prefill --batch prompts at once")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf", type=Path, default=None, help="the SmolLM2 Q4_1 GGUF (default: the llmcli catalogue copy)")
    ap.add_argument("--table-from", type=Path, help="print the tables of a saved compare.json again, measuring nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(json.loads(args.worker))
        return
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        print(tabulate(saved["meta"], saved["runs"]))
        return

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        ap.error(f"unknown tool(s) {unknown}; choose from {', '.join(TOOLS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    gguf = args.gguf or smollm2_gguf()
    q8_name = gguf.name.replace("Q4_1", "Q8_0") if "Q4_1" in gguf.name else gguf.stem + ".Q8_0.gguf"
    q8 = make_q8_0(gguf, OUT / q8_name, args.threads) if "llamacpp-q8_0" in tools else None
    bandwidth = copy_bandwidth(args.threads)
    q4_bytes, n_weights = gguf_weight_bytes(gguf)
    # int8: one byte per weight plus a float32 scale per 32 (the embedding rows looked up are negligible)
    weight_bytes = {"llmcli": 4 * n_weights, "llmcli-int8": n_weights + n_weights // 8, "transformers": 4 * n_weights, "llamacpp-q4_1": q4_bytes}
    if q8 is not None:
        weight_bytes["llamacpp-q8_0"] = gguf_weight_bytes(q8)[0]
    spec = {"prompt": args.prompt, "gen": args.gen, "batches": [1, args.batch] if args.batch > 1 else [1], "batch_prefill": args.batch_prefill, "threads": args.threads, "seed": args.seed, "gguf": str(gguf), "q8_0": str(q8) if q8 else None}
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")

    runs = []
    for rep in range(args.reps):
        for tool in tools:
            print(f"[rep {rep + 1}/{args.reps}] {tool} ...", file=sys.stderr, flush=True)
            load = os.getloadavg()[0]
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps({**spec, "tool": tool})], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"{tool} worker failed ({proc.returncode})")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result.update(rep=rep, load_before=load, load_after=os.getloadavg()[0])
            runs.append(result)
            print("   " + ", ".join(f"{r['test']} b{r['batch']} {r['tokens'] / r['seconds']:.1f} t/s" for r in result["rows"]), file=sys.stderr, flush=True)

    import torch

    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = "absent"
    meta = {
        "prompt": args.prompt, "gen": args.gen, "batch": args.batch, "batch_prefill": args.batch_prefill, "threads": args.threads,
        "reps": args.reps, "tools": tools, "copy_bandwidth": bandwidth, "weight_bytes": weight_bytes,
        "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs; torch {torch.__version__}, llama-cpp-python {llama_version}",
    }  # fmt: skip
    (OUT / "compare.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    table = tabulate(meta, runs)
    (OUT / "compare.md").write_text(table)
    print(table)


def tabulate(meta: dict, runs: list[dict]) -> str:
    """The markdown tables from the raw runs: tokens/s per tool and test, then llmcli's ratios to each peer.

    On a machine shared with other jobs a run can only be slowed down, never sped up, so the
    best repetition is shown beside mean ± sd, and the ratios are given for both.
    """
    tools = meta["tools"]
    samples: dict[tuple[str, str, int], list[float]] = {}
    rss: dict[str, list[int]] = {}
    for run in runs:
        rss.setdefault(run["tool"], []).append(run["peak_rss_bytes"])
        for row in run["rows"]:
            samples.setdefault((run["tool"], row["test"], row["batch"]), []).append(row["tokens"] / row["seconds"])
    columns = [(f"pp{meta['prompt']}", 1), (f"tg{meta['gen']}", 1)]
    if meta["batch"] > 1:
        if meta["batch_prefill"]:
            columns.append((f"pp{meta['prompt']}", meta["batch"]))
        columns.append((f"tg{meta['gen']}", meta["batch"]))
    tg1 = ("tg" + str(meta["gen"]), 1)
    bandwidth = meta["copy_bandwidth"]

    def cell(tool: str, col: tuple[str, int]) -> str:
        values = samples.get((tool, *col))
        if not values:
            return "-"
        m, s = mean_sd(values)
        return f"{m:.1f} ± {s:.1f} ({max(values):.1f})"

    heads = " | ".join(f"{t} b{b}" for t, b in columns)
    lines = [
        f"SmolLM2-135M-Instruct, {meta['threads']} threads, {meta['reps']} interleaved repetitions; tokens/s as mean ± sd (best)",
        "",
        f"| tool | weights read per token | {heads} | peak RSS | tg b1 bandwidth bound | best tg b1 / bound |",
        "| --- | ---: | " + " | ".join("---:" for _ in columns) + " | ---: | ---: | ---: |",
    ]
    for tool in tools:
        bound = bandwidth / meta["weight_bytes"][tool]
        best = max(samples.get((tool, *tg1), [float("nan")]))
        lines.append(
            f"| {LABELS[tool]} | {meta['weight_bytes'][tool] / 2**20:.0f} MiB | "
            + " | ".join(cell(tool, c) for c in columns)
            + f" | {max(rss[tool]) / 2**20:.0f} MiB | {bound:.1f} | {best / bound:.0%} |"
        )
    ours = [t for t in OURS if t in tools]
    peers = [t for t in tools if t not in OURS]
    if ours and peers:
        lines += ["", f"| ratio of tokens/s: mean (best) | {heads} |", "| --- | " + " | ".join("---:" for _ in columns) + " |"]
        for tool in ours:
            for peer in peers:
                cells = []
                for col in columns:
                    a, b = samples.get((tool, *col)), samples.get((peer, *col))
                    cells.append(f"{statistics.fmean(a) / statistics.fmean(b):.2f} ({max(a) / max(b):.2f})" if a and b else "-")
                lines.append(f"| {LABELS[tool]} / {LABELS[peer]} | " + " | ".join(cells) + " |")
    loads = [r.get("load_before") for r in runs if r.get("load_before") is not None]
    lines += [
        "",
        f"copy bandwidth (torch copy, {meta['threads']} threads, read+write): {bandwidth / 1e9:.1f} GB/s; bound = bandwidth / weights read per token.",
        "peak RSS: the worker process's VmHWM (loading included), worst of the repetitions.",
        f"machine: {meta['machine']}"
        + (f"; 1-minute load average before the workers: {min(loads):.1f} to {max(loads):.1f}" if loads else "")
        + (" (other jobs were running: compare the best and the ratios)" if loads and max(loads) > 0.5 + meta["threads"] else "")
        + ".",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
