"""Issue 15 item 4 (TTFT and throughput): N simultaneous ~120-token prompts against three servers
in one run, with `llmcli bench serve`, and TTFT p99 against the prefill limit.

When N requests arrive at once, the last first token cannot come before all N prompts are
prefilled, so the limit is (total prompt tokens) / (the best prefill rate on the machine): the
higher of transformers' float32 pp512 and llmcli's pp512, both measured here, in this run, right
before each server starts (this VM's speed drifts within minutes).

Servers, each started in turn on the same GGUF with 2 threads, then loaded with -N 32 and -N 64
requests sent at once (/v1/completions, greedy, ignore_eos):
  - llmcli: this tree's `llmcli serve` (the chunked-prefill scheduler), --batch-size 64;
  - llmcli-before: the same command from `git archive a3c8005^` (--before-rev: the last commit
    before the chunked-prefill scheduler, one whole-prompt prefill per admission), --batch-size 64:
    the old scheduler's output tokens/s and TTFT;
  - llama-cpp-python: `python -m llama_cpp.server --model FILE --n_threads 2`.

`--chunk-rates 8,32,128,256,512` instead measures llmcli's prompt rate for one forward of each
size (how --max-batched-tokens' default was chosen) and exits.

Example: python benchmarks/serve_ttft.py --out benchmarks/out/serve_ttft.json
(--rounds 3 --servers llmcli,llmcli-before: the two schedulers three times, alternating which goes first.)
The table goes to stderr (markdown, with the load average), the JSON to --out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.served import ServerProcess, free_port  # noqa: E402


def pp512_rates(gguf: Path, threads: int) -> dict[str, float]:
    """Prefill tokens/s of one 512-token forward: llmcli (forward_packed, the scheduler's forward)
    and transformers float32 on the same weights; best of 3 after a warm-up, interleaved."""
    import torch
    import transformers

    from llmcli.core.loader import load_model
    from llmcli.core.models.base import KVCache
    from llmcli.core.threads import apply_threads

    apply_threads(threads)
    ours = load_model(gguf)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32).eval()
    ids = torch.randint(100, 40000, (512,), generator=torch.Generator().manual_seed(0))
    best = {"llmcli": 0.0, "transformers": 0.0}

    def run_ours():
        cache = KVCache.for_model(ours.config, 1, 1024, initial_len=1024, initial_rows=1)
        ours.module.forward_packed(ids, torch.zeros(512, dtype=torch.long), cache, torch.tensor([511]))

    def run_theirs():
        with torch.no_grad():
            theirs(ids[None], logits_to_keep=1)

    for rep in range(4):
        for name, fn in (("llmcli", run_ours), ("transformers", run_theirs)):
            t = time.perf_counter()
            fn()
            if rep:  # the first round warms up
                best[name] = max(best[name], 512 / (time.perf_counter() - t))
    return best


def chunk_rates(gguf: Path, threads: int, sizes: list[int], reps: int = 3) -> dict[int, float]:
    """llmcli's prompt tokens/s for one packed forward of n tokens, best of `reps` rounds, sizes interleaved."""
    import torch

    from llmcli.core.loader import load_model
    from llmcli.core.models.base import KVCache
    from llmcli.core.threads import apply_threads

    apply_threads(threads)
    loaded = load_model(gguf)
    best = dict.fromkeys(sizes, 0.0)
    for _ in range(reps):
        for n in sizes:
            ids = torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(n))
            calls = max(1, 256 // n)  # about the same work per size
            t = time.perf_counter()
            for _ in range(calls):
                cache = KVCache.for_model(loaded.config, 1, 1024, initial_len=1024, initial_rows=1)
                loaded.module.forward_packed(ids, torch.zeros(n, dtype=torch.long), cache, torch.tensor([n - 1]))
            best[n] = max(best[n], n * calls / (time.perf_counter() - t))
    return best


def bench(base: str, n: int, args, seed: int) -> dict:
    """One round of n simultaneous requests. Each round of a server gets its own seed: prompts of an
    earlier round would be served from the prefix cache."""
    cmd = [sys.executable, "-m", "llmcli", "bench", "serve", base, "--endpoint", "/v1/completions", "-N", str(n)]
    cmd += ["--input-len", str(args.input_len), "--output-len", str(args.output_len), "--seed", str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if done.returncode != 0:
        raise SystemExit(f"bench serve failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache/llmcli/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", default="32,64", help="simultaneous requests, comma-separated")
    parser.add_argument("--input-len", type=int, default=120, help="words per synthetic prompt (about as many tokens)")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--servers", default="llmcli,llmcli-before,llama-cpp-python")
    parser.add_argument("--rounds", type=int, default=1, help="run the servers this many times, each round in the reverse order of the one before (this VM's speed drifts within minutes)")
    parser.add_argument("--before-rev", default="a3c8005^", help="the tree llmcli-before serves from (default: the last commit before the chunked-prefill scheduler)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra argument for the llmcli server of this tree (repeatable)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--chunk-rates", default=None, help="only measure the prompt rate of one forward of each of these sizes")
    args = parser.parse_args()
    gguf = Path(args.model).expanduser()
    if args.chunk_rates:
        load = os.getloadavg()
        rates = chunk_rates(gguf, args.threads, [int(n) for n in args.chunk_rates.split(",")])
        top = max(rates.values())
        print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n| tokens per forward | tokens/s | of the best |\n| --- | --- | --- |", file=sys.stderr)
        for n, rate in rates.items():
            print(f"| {n} | {rate:.0f} | {rate / top:.0%} |", file=sys.stderr)
        return 0
    streams = [int(s) for s in args.streams.split(",")]
    load_before = os.getloadavg()

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(args.threads))
    serve = ["-m", "llmcli", "serve", "--model", str(gguf), "--threads", str(args.threads), "--batch-size", str(max(streams)), "--max-queue", str(2 * max(streams))]
    before_tree = Path(tempfile.mkdtemp(prefix="llmcli-before-"))
    results: list[dict] = []
    prompt_tokens: dict[int, int] = {}  # per N: the same seeded prompts for every server; a server that reports no usage takes these
    names = args.servers.split(",")
    order = [name for r in range(args.rounds) for name in (names if r % 2 == 0 else names[::-1])]
    all_rates: list[dict[str, float]] = []
    for run, name in enumerate(order):
        # the limit's rate right before each server: this VM's speed drifts by 20-30% within minutes
        rates = pp512_rates(gguf, args.threads)
        all_rates.append(rates)
        limit_rate = max(rates.values())
        print(f"pp512 before {name}: llmcli {rates['llmcli']:.0f} tok/s, transformers {rates['transformers']:.0f} tok/s", file=sys.stderr)
        port = free_port()
        cwd = ROOT  # `python -m llmcli` imports the llmcli in its working directory first, whatever PYTHONPATH says
        if name == "llmcli":
            cmd, server_env = [sys.executable, *serve, *args.serve_arg, "--port", str(port)], dict(env, PYTHONPATH=str(ROOT))
        elif name == "llmcli-before":
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before_rev], capture_output=True, check=True).stdout
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(before_tree, filter="data")
            # that tree has no --max-batched-tokens; everything else is the same command
            cmd, server_env, cwd = [sys.executable, *serve, "--port", str(port)], dict(env, PYTHONPATH=str(before_tree)), before_tree
        elif name == "llama-cpp-python":
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(args.threads), "--n_ctx", "2048", "--port", str(port)]
            server_env = env
        else:
            raise SystemExit(f"unknown server {name}")
        with ServerProcess(name, cmd, port, env=server_env, cwd=cwd) as server:
            bench(server.base, 4, args, seed=1_000_000)  # warm-up: kernels, caches, first allocations
            for n in streams:
                load = os.getloadavg()[0]
                summary = bench(server.base, n, args, seed=n)  # the same prompts for every server and round (each starts afresh)
                tokens = summary["total_input_tokens"] or prompt_tokens.get(n, 0)
                prompt_tokens.setdefault(n, tokens)
                limit = tokens / limit_rate
                row = {
                    "server": name, "streams": n, "prompt_tokens": tokens, "limit_s": limit, "limit_rate": limit_rate,
                    "ttft_p99_s": summary["p99_ttft_ms"] / 1000, "ttft_p50_s": summary["median_ttft_ms"] / 1000,
                    "ttft_p99_over_limit": summary["p99_ttft_ms"] / 1000 / limit, "output_tok_s": summary["output_throughput"],
                    "itl_p50_ms": summary["median_itl_ms"], "itl_p99_ms": summary["p99_itl_ms"],
                    "failed": summary["failed"], "load_1min": load, "round": run // len(names),
                }  # fmt: skip
                results.append(row)
                print(json.dumps(row), file=sys.stderr)
    print(f"\nload average before: {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}; after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", file=sys.stderr)
    print("pp512 before each server (tok/s): " + ", ".join(f"llmcli {r['llmcli']:.0f} / transformers {r['transformers']:.0f}" for r in all_rates) + "\n", file=sys.stderr)
    print("| round | server | streams | prompt tokens | limit (s) | TTFT p50 (s) | TTFT p99 (s) | p99 / limit | output tok/s | ITL p50 / p99 (ms) | failed | load (1 min) |", file=sys.stderr)
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", file=sys.stderr)
    for r in results:
        print(
            f"| {r['round'] + 1} | {r['server']} | {r['streams']} | {r['prompt_tokens']} | {r['limit_s']:.1f} | {r['ttft_p50_s']:.1f} | {r['ttft_p99_s']:.1f} | "
            f"{r['ttft_p99_over_limit']:.2f} | {r['output_tok_s']:.1f} | {r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f} | {r['failed']} | {r['load_1min']:.1f} |",
            file=sys.stderr,
        )
    if args.rounds > 1:
        print("\nMedians over the rounds:\n\n| server | streams | p99 / limit | output tok/s |\n| --- | --- | --- | --- |", file=sys.stderr)
        for name in names:
            for n in streams:
                mine = [r for r in results if r["server"] == name and r["streams"] == n]
                p99 = statistics.median(r["ttft_p99_over_limit"] for r in mine)
                out = statistics.median(r["output_tok_s"] for r in mine)
                print(f"| {name} | {n} | {p99:.2f} | {out:.1f} |", file=sys.stderr)
    report = {"pp512": all_rates, "load_before": load_before, "rows": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    else:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
