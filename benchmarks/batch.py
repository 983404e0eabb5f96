"""`llmcli batch` on the default model: 1 against 2 local workers, and local against `--ray` with 1 worker.

    python benchmarks/batch.py                          # 32 chat requests x 32 new tokens, 1 repetition
    python benchmarks/batch.py --requests 64 --new 64 --reps 3

Every configuration runs the same OpenAI Batch file (chat completions, temperature 0,
`ignore_eos`, so every request makes exactly --new tokens) as a fresh `python -m llmcli batch`
subprocess, interleaved per repetition so a drifting machine load hits them alike:

  local 1 worker     --workers 1 --threads 2
  local 2 workers    --workers 2 --threads 1      (two processes, one model each)
  ray 1 worker       --ray ADDRESS --workers 1 --threads 2, on a `ray start --head --num-cpus 2`
                     cluster this script starts (and stops) on 127.0.0.1

Wall time is the whole command (start-up, model load, the job, the merge); tokens/s is the
summary line's (generated tokens over the job's time). The outputs of all runs are compared:
the answers must be the same (the engine is batch invariant). Needs the `ray` extra for the
Ray row (`--no-ray` leaves it out). Writes benchmarks/out/batch.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.served import free_port  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
TOPICS = ["the sea", "a library", "winter", "bread", "a train", "the moon", "music", "a garden", "rain", "mountains", "a river", "coffee", "the city", "a cat", "maps", "light"]


def write_requests(path: Path, count: int, new: int) -> None:
    with open(path, "w") as f:
        for i in range(count):
            body = {"messages": [{"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]} ({i})."}], "max_tokens": new, "temperature": 0, "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n")


def start_ray(temp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard", "false", "--temp-dir", str(temp), "--disable-usage-stats"]
    head = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return head, f"127.0.0.1:{port}"
        time.sleep(0.5)
    head.kill()
    raise SystemExit("the Ray head did not start")


def run_batch(requests: Path, output: Path, model: str, flags: list[str]) -> tuple[float, float, str]:
    """(wall seconds, tokens/s from the summary, the summary line)."""
    for leftover in (output, output.with_name(output.name + ".parts")):
        subprocess.run(["rm", "-rf", str(leftover)], check=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llmcli", "batch", str(requests), "-o", str(output), "-m", model, "--no-progress", *flags], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"llmcli batch {' '.join(flags)} failed:\n{proc.stderr}")
    summary = proc.stderr.strip().splitlines()[-1]
    rate = float(re.search(r"at ([\d.]+) tok/s", summary).group(1))
    return wall, rate, summary


def answers(path: Path) -> list:
    return [(r["custom_id"], r["response"]["body"]["choices"]) for r in map(json.loads, path.read_text().splitlines())]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llmcli-batch-bench-"))
    requests = work / "requests.jsonl"
    write_requests(requests, args.requests, args.new)
    common = ["--batch-size", str(args.batch_size), "--chunk-size", str(max(1, args.requests // 4)), "--ordered"]
    configs = {"local 1 worker": ["--workers", "1", "--threads", "2"], "local 2 workers": ["--workers", "2", "--threads", "1"]}
    head = None
    ray_temp = Path(tempfile.mkdtemp(prefix="llmcli-ray-", dir="/tmp"))  # short: Ray's socket paths must fit AF_UNIX
    if not args.no_ray:
        head, address = start_ray(ray_temp)
        configs["ray 1 worker"] = ["--ray", address, "--workers", "1", "--threads", "2"]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    loads = [os.getloadavg()[0]]
    outputs = {}
    try:
        for rep in range(args.reps):
            for name, flags in configs.items():
                output = work / f"{name.replace(' ', '-')}.jsonl"
                wall, rate, summary = run_batch(requests, output, args.model, common + flags)
                results[name].append((wall, rate))
                outputs[name] = answers(output)
                loads.append(os.getloadavg()[0])
                print(f"rep {rep + 1} {name}: {wall:.1f} s wall; {summary} (load {loads[-1]:.1f})", file=sys.stderr)
    finally:
        if head is not None:
            head.send_signal(signal.SIGTERM)
            head.wait(60)
        shutil.rmtree(ray_temp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    first = next(iter(outputs.values()))
    same = all(o == first for o in outputs.values())
    base_wall = min(w for w, _ in results["local 1 worker"])
    base_rate = max(r for _, r in results["local 1 worker"])
    lines = [
        f"`llmcli batch`, {args.model}, {args.requests} chat requests x {args.new} new tokens, batch size {args.batch_size}, best of {args.reps}; "
        f"load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores; answers identical across runs: {same}",
        "",
        "| run | wall s (whole command) | job tokens/s | wall vs local 1 worker | tokens/s vs local 1 worker |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, samples in results.items():
        wall = min(w for w, _ in samples)
        rate = max(r for _, r in samples)
        lines.append(f"| {name} | {wall:.1f} | {rate:.1f} | {wall / base_wall:.2f}x | {rate / base_rate:.2f}x |")
    table = "\n".join(lines)
    (OUT / "batch.md").write_text(table + "\n")
    print(table)
    if not same:
        raise SystemExit("the runs' answers differ")


if __name__ == "__main__":
    main()
