"""Load test for `llmcli serve`: many concurrent streaming chats vs the same requests one at a time.

Starts `python -m llmcli serve` on the real SmolLM2 GGUF (or --model) twice:
  1. with --batch-size 1, the best a lone client gets: --baseline requests, streamed, one after
     the other -> the one-request-at-a-time tokens/s;
  2. with --batch-size N: --concurrency streaming chat requests at once, while a poller hits
     /health every 0.25 s (and, with --same-server-baseline, first the lone requests again on
     this server, whose every step decodes all N rows);
and reports: did every request complete with a full answer (finish_reason "stop": the model
ended its turn; "length" means it hit --max-tokens), total generated tokens/s and its ratio to
the one-at-a-time figure (goal >= 4x), p50/p95 time to first token, and /health's answers.

For TTFT/TPOT/ITL percentiles under other loads (a Poisson rate, a prompt file, another server
such as llama-server), use `llmcli bench serve URL`, whose percentile this script shares.

Example: python benchmarks/serve_load.py --model ~/.cache/llmcli/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
Prints a JSON summary on stdout and a readable one on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.served import ServerProcess, free_port  # noqa: E402
from llmcli.cli.bench_serve import percentile  # `llmcli bench serve`'s (numpy's linear) percentile, q in 0..100

QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
    "Name the largest planet in the solar system.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "What language is spoken in Brazil?",
    "What is the chemical symbol for gold?",
    "How many days are in a leap year?",
    "What is the tallest mountain on Earth?",
    "Which ocean is the largest?",
    "What gas do plants take in from the air?",
    "What is the square root of 81?",
    "In which continent is Kenya?",
]


async def chat_stream(client: httpx.AsyncClient, model: str, question: str, max_tokens: int) -> dict:
    """One streamed chat: time to first token, tokens, finish reason, the answer."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    text, finish, usage = [], None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter() - start
                    text.append(piece)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
    return {
        "ttft": first,
        "seconds": time.perf_counter() - start,
        "tokens": usage["completion_tokens"] if usage else None,
        "finish_reason": finish,
        "answer": "".join(text),
    }


async def health_poller(base: str, stop: asyncio.Event, out: list) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                status = (await client.get("/health")).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            out.append((status, time.perf_counter() - t))
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except asyncio.TimeoutError:
                pass


async def one_at_a_time(base: str, model: str, args) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
        await chat_stream(client, model, "Hello!", 8)  # warm-up
        t0 = time.perf_counter()
        lone = [await chat_stream(client, model, QUESTIONS[i % len(QUESTIONS)], args.max_tokens) for i in range(args.baseline)]
        seconds = time.perf_counter() - t0
    tokens = sum(r.get("tokens") or 0 for r in lone)
    return {"requests": len(lone), "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 2)}


async def concurrent(base: str, model: str, args) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    async with httpx.AsyncClient(base_url=base, timeout=3600, limits=limits) as client:
        await chat_stream(client, model, "Hello!", 8)  # warm-up
        stop = asyncio.Event()
        health: list = []
        poller = asyncio.create_task(health_poller(base, stop, health))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(chat_stream(client, model, QUESTIONS[i % len(QUESTIONS)], args.max_tokens) for i in range(args.concurrency)))
        seconds = time.perf_counter() - t0
        stop.set()
        await poller
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] or 0 for r in ok)
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": [r["error"] for r in results if "error" in r][:5],
        "finished_stop": sum(r.get("finish_reason") == "stop" for r in ok),
        "finished_length": sum(r.get("finish_reason") == "length" for r in ok),
        "empty_answers": sum(not r.get("answer", "").strip() for r in ok),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2),
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p95_s": round(percentile(ttfts, 95), 3),
        "ttft_p99_s": round(percentile(ttfts, 99), 3),
        "health": {"polls": len(health), "ok": sum(s == 200 for s, _ in health), "max_latency_s": round(max((t for _, t in health), default=float("nan")), 3)},
        "sample_answers": {QUESTIONS[i]: results[i].get("answer", "") for i in range(min(3, len(results)))},
    }


class Served(ServerProcess):
    """`python -m llmcli serve` in a subprocess, for the length of a with-block; `model` is the name it serves."""

    def __init__(self, args, batch_size: int):
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        port = free_port()
        cmd = [sys.executable, "-m", "llmcli", "serve", "--port", str(port), "--batch-size", str(batch_size)]
        cmd += ["--max-queue", str(args.concurrency * 2), "--max-context", str(args.max_context), "--device", args.device]
        if args.model:
            cmd += ["--model", args.model]
        super().__init__("llmcli serve", cmd, port, env=env, ready="/health")

    def __enter__(self) -> "Served":
        super().__enter__()
        self.model = httpx.get(self.base + "/v1/models").json()["data"][0]["id"]
        return self


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a .gguf file, HF directory or catalogue name (default: the smollm2 catalogue model)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--baseline", type=int, default=4, help="requests for the one-at-a-time figure")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-context", type=int, default=512, help="KV-cache length per row (memory: batch x context)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server (OMP_NUM_THREADS); 1 is fastest on a busy shared machine")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--same-server-baseline", action="store_true", help="also time the lone requests on the batched server")
    args = parser.parse_args()

    with Served(args, 1) as lone_server:
        lone = asyncio.run(one_at_a_time(lone_server.base, lone_server.model, args))
    with Served(args, args.batch_size) as server:
        same = asyncio.run(one_at_a_time(server.base, server.model, args)) if args.same_server_baseline else None
        load = asyncio.run(concurrent(server.base, server.model, args))
    summary = {
        "model": server.model,
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "one_at_a_time": lone,
        "one_at_a_time_same_server": same,
        "concurrent": load,
        "speedup": round(load["tokens_per_s"] / lone["tokens_per_s"], 2),
    }
    c, h = load, load["health"]
    sys.stderr.write(
        f"{summary['model']}: {c['completed']}/{c['requests']} concurrent streams completed "
        f"({c['finished_stop']} ended their answer, {c['finished_length']} hit max_tokens, {c['empty_answers']} empty)\n"
        f"  one at a time (--batch-size 1): {lone['tokens_per_s']} tokens/s ({lone['tokens']} tokens in {lone['seconds']} s)\n"
        + (f"  one at a time (--batch-size {args.batch_size}): {same['tokens_per_s']} tokens/s\n" if same else "")
        + f"  {c['requests']} at once (--batch-size {args.batch_size}): {c['tokens_per_s']} tokens/s ({c['tokens']} tokens in {c['seconds']} s) -> {summary['speedup']}x\n"
        f"  time to first token: p50 {c['ttft_p50_s']} s, p95 {c['ttft_p95_s']} s, p99 {c['ttft_p99_s']} s\n"
        f"  /health during the load: {h['ok']}/{h['polls']} answered 200, slowest {h['max_latency_s']} s\n"
    )
    print(json.dumps(summary, ensure_ascii=False))
    return 0 if c["completed"] == c["requests"] and h["ok"] == h["polls"] else 1


if __name__ == "__main__":
    sys.exit(main())
