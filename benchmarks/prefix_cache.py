"""Prefix cache under `llmcli bench serve` (issue 15, item 4's last bullet), beside llama-cpp-python's server.

Every request carries the same ~500-token system prompt and its own short question. For each
server (llmcli serve with --prefix-cache-mb 0 and with its default cache; llama-cpp-python's
server without and with --cache), in one run, on the same GGUF:

  1. first:  one request on a fresh server (nothing cached)            -> its TTFT
  2. repeat: the same request again                                     -> its TTFT
  3. load:   --num-prompts requests (other questions) at once, at most
             --concurrency in flight                                    -> TTFT p50 / p99

Targets: llmcli's repeated TTFT at most 1/3 of its first; llmcli's cached TTFT p50 under load
at most 1/10 of the uncached server's. All runs go through `python -m llmcli bench serve`.
Every figure depends on the machine's load: the load average is printed beside them.

Example: python benchmarks/prefix_cache.py --num-prompts 16 --concurrency 16
Prints the table (markdown) on stderr and the JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.served import ServerProcess, free_port  # noqa: E402

SYSTEM_PARAGRAPH = (
    "You are the help desk of a small public library. Be brief, friendly and exact. The library opens at nine "
    "in the morning and closes at six in the evening on weekdays, and at one in the afternoon on Saturdays; it is "
    "closed on Sundays and public holidays. Members may borrow up to eight books for three weeks, renew them twice "
    "online or at the desk, and reserve titles that are on loan. Late returns cost ten cents a day per book. "
)
QUESTIONS = [
    "When do you open on Saturday?", "How many books can I borrow?", "Can I renew a book twice?", "What does a late book cost?",
    "Are you open on Sunday?", "How long is a loan?", "Can I reserve a title?", "When do you close on weekdays?",
    "Do you open on public holidays?", "Can I renew online?", "What time do you open?", "How often can I renew?",
    "Is there a fee for late returns?", "Can I borrow ten books?", "Where can I renew?", "What are your hours?",
]


def system_prompt(path: Path, tokens: int) -> tuple[str, int]:
    """The paragraph repeated until the prompt holds about `tokens` tokens (by the model's own tokenizer)."""
    from llmcli.core.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    text = SYSTEM_PARAGRAPH
    while len(tok.encode(text + SYSTEM_PARAGRAPH, add_special=False).ids) <= tokens:
        text += SYSTEM_PARAGRAPH
    return text, len(tok.encode(text, add_special=False).ids)


def bench(base: str, dataset: Path, n: int, concurrency: int, output_len: int, work: Path) -> dict:
    out = work / "summary.json"
    cmd = [sys.executable, "-m", "llmcli", "bench", "serve", base, "--dataset", str(dataset), "-N", str(n), "--max-concurrency", str(concurrency)]
    cmd += ["--output-len", str(output_len), "--no-ignore-eos", "--temperature", "0", "-o", str(out)]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())  # failed requests are counted there, in no latency


def write_jsonl(path: Path, system: str, questions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]}) + "\n" for q in questions))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: the catalogue's smollm2-135m-instruct)")
    ap.add_argument("--system-tokens", type=int, default=500)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16, help="llmcli serve --batch-size")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--servers", default="llmcli-off,llmcli,llama-cpp-off,llama-cpp", help="which servers, comma-separated")
    args = ap.parse_args()
    if args.model:
        path = Path(args.model)
    else:
        from llmcli.catalog import pull

        path = pull("smollm2-135m-instruct", notify=lambda _m: None)
    system, system_tokens = system_prompt(path, args.system_tokens)
    work = Path(tempfile.mkdtemp(prefix="llmcli-prefix-bench-"))
    first = write_jsonl(work / "first.jsonl", system, QUESTIONS[:1])
    load = write_jsonl(work / "load.jsonl", system, [f"{q} (ticket {i})" for i, q in enumerate(QUESTIONS * (1 + args.num_prompts // len(QUESTIONS)))][1 : args.num_prompts + 1])
    commands = {
        "llmcli-off": lambda port: [sys.executable, "-m", "llmcli", "serve", "-m", str(path), "--port", str(port), "--batch-size", str(args.batch_size),
                                    "--threads", str(args.threads), "--max-queue", str(4 * args.num_prompts), "--request-timeout", "0", "--prefix-cache-mb", "0"],
        "llmcli": lambda port: [sys.executable, "-m", "llmcli", "serve", "-m", str(path), "--port", str(port), "--batch-size", str(args.batch_size),
                                "--threads", str(args.threads), "--max-queue", str(4 * args.num_prompts), "--request-timeout", "0"],
        "llama-cpp-off": lambda port: [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port), "--n_ctx", "2048",
                                       "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--cache", "false"],
        "llama-cpp": lambda port: [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port), "--n_ctx", "2048",
                                   "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--cache", "true"],
    }
    results = {}
    for name in args.servers.split(","):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with ServerProcess(name, commands[name](port), port, timeout=600, log=work / f"{name}.log"):
            row = {"load_average_before": os.getloadavg()[0]}
            row["first"] = bench(base, first, 1, 1, args.output_len, work)
            row["repeat"] = bench(base, first, 1, 1, args.output_len, work)
            row["load"] = bench(base, load, args.num_prompts, args.concurrency, args.output_len, work)
            row["load_average_after"] = os.getloadavg()[0]
            if name.startswith("llmcli"):
                row["metrics"] = {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in httpx.get(base + "/metrics").text.splitlines()
                                  if line.startswith("llmcli_prefix_cache")}
            results[name] = row
        print(f"{name}: first {row['first']['median_ttft_ms']:.0f} ms, repeat {row['repeat']['median_ttft_ms']:.0f} ms, "
              f"load p50 {row['load']['median_ttft_ms']:.0f} ms (load average {row['load_average_after']:.1f})", file=sys.stderr)
    lines = [
        f"system prompt {system_tokens} tokens, {args.num_prompts} requests at concurrency {args.concurrency}, {args.output_len} output tokens, {path.name}",
        "",
        "| server | first TTFT ms | repeat TTFT ms | repeat/first | load TTFT p50 ms | load TTFT p99 ms | output tok/s | failed | load average |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        f, r, ld = row["first"]["median_ttft_ms"], row["repeat"]["median_ttft_ms"], row["load"]
        lines.append(f"| {name} | {f:.0f} | {r:.0f} | {r / f:.2f} | {ld['median_ttft_ms']:.0f} | {ld['p99_ttft_ms']:.0f} | {ld['output_throughput']:.1f} | {ld['failed']} | "
                     f"{row['load_average_before']:.1f}–{row['load_average_after']:.1f} |")
    targets = {}
    if "llmcli" in results:
        row = results["llmcli"]
        targets["repeat_over_first"] = row["repeat"]["median_ttft_ms"] / row["first"]["median_ttft_ms"]
        lines.append(f"\nllmcli repeat/first TTFT: {targets['repeat_over_first']:.3f} (target <= 0.333)")
    if "llmcli" in results and "llmcli-off" in results:
        targets["cached_over_uncached_p50"] = results["llmcli"]["load"]["median_ttft_ms"] / results["llmcli-off"]["load"]["median_ttft_ms"]
        lines.append(f"llmcli cached/uncached TTFT p50 under load: {targets['cached_over_uncached_p50']:.3f} (target <= 0.1)")
    print("\n".join(lines), file=sys.stderr)
    json.dump({"system_tokens": system_tokens, "model": str(path), "args": vars(args), "targets": targets, "results": results}, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
