"""Soak test for `llmcli serve` (issue 15, Reliability): is memory flat and is every answer a 2xx/4xx?

Starts `python -m llmcli serve` on the default model (or --model) on a free loopback port and
keeps --clients client loops busy for --minutes (10 by default). Each loop picks, from a seeded
random stream, one of:
  - a streamed chat (read to [DONE]),
  - a non-streamed chat or completion,
  - a streamed chat that disconnects after its first chunks (the server must free the row),
  - a non-streamed request that gives up after a moment (a client timeout),
with a shared system prompt on about half of them (prefix-cache hits, blocks of replies inserted)
and unique text on the rest (new blocks, so the prefix cache fills up and evicts under its bound).
Everything is bounded: the client count, max_tokens per request, the run length; only
127.0.0.1 is touched.

A sampler reads the server's RSS (/proc/PID/status VmRSS) every second and the prefix cache's
bytes every 5 s. Warm-up lasts --warmup minutes and, beyond that, until the prefix cache is 90%
full (the model mapped, the cache at its bound, the allocator's pools grown; half the run at
most). The growth is the mean RSS of the last minute over the mean of the first minute after
warm-up (target at most 5%), and
the count of 5xx answers (target 0). /metrics is read at the end for the prefix cache's bytes,
evictions and hit rate.

Example: python benchmarks/soak.py --minutes 10
Prints a JSON summary on stdout (or -o FILE) and a readable one on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.served import ServerProcess, free_port  # noqa: E402

SYSTEM = (
    "You are a patient tutor for a class of curious children. Answer in one or two short sentences, "
    "use simple words, and never invent facts. If you do not know, say so. "
) * 4
TOPICS = "rain volcanoes bees the moon magnets rainbows clouds whales bread bicycles trains ice deserts owls stars tides".split()
WORDS = "red blue quiet fast old new small large bright dark happy tired early late warm cold soft loud".split()


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def question(rng: random.Random) -> str:
    return f"Why do {rng.choice(TOPICS)} matter, and what is one {rng.choice(WORDS)} fact about them?"


def unique_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS + TOPICS) for _ in range(rng.randint(30, 120)))


def note(r: httpx.Response, statuses: Counter, counts: Counter) -> None:
    statuses[r.status_code] += 1
    if r.status_code != 200:  # the first message of each kind, for the report
        counts[f"status {r.status_code}: {r.text[:160]}"] = counts.get(f"status {r.status_code}: {r.text[:160]}", 0) + 1


async def one_request(client: httpx.AsyncClient, rng: random.Random, max_tokens: int, counts: Counter, statuses: Counter) -> None:
    kind = rng.choices(["stream", "chat", "completion", "disconnect", "give_up"], weights=[4, 3, 2, 2, 1])[0]
    shared = rng.random() < 0.5
    messages = [{"role": "system", "content": SYSTEM}] if shared else []
    messages.append({"role": "user", "content": question(rng) if shared else unique_text(rng)})
    body = {"messages": messages, "max_tokens": rng.randint(4, max_tokens), "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 1000)}
    counts[kind] += 1
    try:
        if kind == "completion":
            prompt = (SYSTEM if shared else "") + unique_text(rng)
            r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": body["max_tokens"], "temperature": body["temperature"]})
            note(r, statuses, counts)
        elif kind in ("chat", "give_up"):
            timeout = 0.3 if kind == "give_up" else None
            try:
                r = await client.post("/v1/chat/completions", json=body, timeout=timeout)
                note(r, statuses, counts)
            except httpx.TimeoutException:
                counts["gave_up"] += 1
        else:
            async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
                statuses[r.status_code] += 1
                chunks = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        chunks += 1
                        if '"error"' in line:
                            counts["stream_error_events"] += 1
                        if kind == "disconnect" and chunks >= 3:
                            counts["disconnected"] += 1
                            break  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as exc:
        counts[f"client_error:{type(exc).__name__}"] += 1


async def client_loop(base: str, seed: int, deadline: float, max_tokens: int, counts: Counter, statuses: Counter) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        while time.monotonic() < deadline:
            await one_request(client, rng, max_tokens, counts, statuses)


async def sample_rss(pid: int, base: str, start: float, deadline: float, samples: list[tuple[float, int]], cache: list[tuple[float, float]]) -> None:
    """RSS every second; the prefix cache's bytes every 5 s (from /metrics)."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        tick = 0
        while time.monotonic() < deadline:
            rss = rss_bytes(pid)
            if rss is not None:
                samples.append((time.monotonic() - start, rss))
            if tick % 5 == 0:
                try:
                    text = (await client.get("/metrics")).text
                    held = [float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith("llmcli_prefix_cache_bytes ")]
                    if held:
                        cache.append((time.monotonic() - start, held[0]))
                except httpx.HTTPError:
                    pass
            tick += 1
            await asyncio.sleep(1.0)


def metrics(base: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def mean_between(samples: list[tuple[float, int]], lo: float, hi: float) -> float:
    values = [rss for t, rss in samples if lo <= t < hi]
    return statistics.fmean(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model for llmcli serve (default: its default model)")
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the whole run, warm-up included")
    ap.add_argument("--warmup", type=float, default=2.0, help="minutes before RSS counts (longer while the prefix cache fills, up to half the run)")
    ap.add_argument("--clients", type=int, default=12, help="client loops at once")
    ap.add_argument("--max-tokens", type=int, default=48, help="most tokens per request")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-arg", action="append", default=[], help="extra argument for llmcli serve (repeatable)")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args()
    if args.minutes <= args.warmup + 1:
        ap.error("--minutes must leave at least a minute after --warmup")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llmcli", "serve", "--host", "127.0.0.1", "--port", str(port), "--batch-size", str(args.batch_size), "--max-queue", str(4 * args.clients)]
    cmd += ["--model", args.model] if args.model else []
    cmd += args.serve_arg
    with ServerProcess("llmcli serve", cmd, port, ready="/health", timeout=600) as server:
        counts: Counter = Counter()
        statuses: Counter = Counter()
        samples: list[tuple[float, int]] = []
        cache_bytes: list[tuple[float, float]] = []
        start = time.monotonic()
        end = start + args.minutes * 60

        async def run() -> None:
            loops = [client_loop(base, args.seed * 1000 + i, end, args.max_tokens, counts, statuses) for i in range(args.clients)]
            await asyncio.gather(sample_rss(server.pid, base, start, end, samples, cache_bytes), *loops)

        asyncio.run(run())
        after = metrics(base)
        total = args.minutes * 60
        # warm-up ends after --warmup and once the prefix cache is 90% full (its bound is memory the
        # server is meant to take), but by half the run at the latest
        capacity = after.get("llmcli_prefix_cache_capacity_bytes", 0)
        full = next((t for t, held in cache_bytes if held >= 0.9 * capacity), total) if capacity else 0
        warm = min(max(args.warmup * 60, full), total / 2)
        first = mean_between(samples, warm, warm + 60)
        last = mean_between(samples, total - 60, total + 60)
        post = [rss for t, rss in samples if t >= warm]

        def held_at(t: float) -> float:  # the prefix cache's bytes at time t (the last sample before it)
            return next((held for at, held in reversed(cache_bytes) if at <= t), 0.0)

        # the RSS less what the bounded prefix cache holds: growth that the cache filling does not explain
        net = [(t, rss - held_at(t)) for t, rss in samples]
        net_growth = mean_between(net, total - 60, total + 60) / mean_between(net, warm, warm + 60) - 1
        summary = {
            "model": args.model or "default",
            "minutes": args.minutes,
            "warmup_minutes": warm / 60,
            "prefix_cache_90pct_full_at_minute": full / 60 if full < total else None,
            "clients": args.clients,
            "batch_size": args.batch_size,
            "requests": dict(counts),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "http_5xx": sum(v for k, v in statuses.items() if k >= 500),
            "rss_mib_start": samples[0][1] / 2**20 if samples else None,
            "rss_mib_after_warmup": first / 2**20,
            "rss_mib_last_minute": last / 2**20,
            "rss_mib_max_after_warmup": max(post) / 2**20 if post else None,
            "rss_growth_after_warmup": last / first - 1,
            "rss_less_prefix_cache_growth_after_warmup": net_growth,
            "prefix_cache_bytes": after.get("llmcli_prefix_cache_bytes"),
            "prefix_cache_capacity_bytes": capacity,
            "prefix_cache_bytes_samples": cache_bytes[:: max(1, len(cache_bytes) // 60)],
            "prefix_cache_evictions": after.get("llmcli_prefix_cache_evictions_total"),
            "prefix_cache_hit_rate": after.get("llmcli_prefix_cache_hit_rate"),
            "finished": {k: v for k, v in after.items() if k.startswith("llmcli_requests_finished_total")},
            "requests_running_at_end": after.get("llmcli_requests_running"),
            "load_average": os.getloadavg(),
            "rss_samples": [(round(t, 1), rss) for t, rss in samples[:: max(1, len(samples) // 120)]],
        }
    text = json.dumps(summary, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    ok = summary["http_5xx"] == 0 and summary["rss_growth_after_warmup"] <= 0.05
    print(
        f"soak {args.minutes:g} min, {args.clients} clients: requests {sum(v for k, v in counts.items() if k in ('stream', 'chat', 'completion', 'disconnect', 'give_up'))}, "
        f"statuses {summary['statuses']}, 5xx {summary['http_5xx']}; RSS {summary['rss_mib_after_warmup']:.0f} MiB after warm-up -> "
        f"{summary['rss_mib_last_minute']:.0f} MiB in the last minute ({100 * summary['rss_growth_after_warmup']:+.1f}%; "
        f"less the prefix cache's bytes {100 * net_growth:+.1f}%); "
        f"prefix cache {summary['prefix_cache_bytes'] or 0:.0f} bytes, {summary['prefix_cache_evictions'] or 0:.0f} evictions; "
        f"load average {summary['load_average'][0]:.1f} -> {'PASS' if ok else 'FAIL'}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
