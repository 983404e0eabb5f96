"""Memory of one long completion in the serving engine: RSS before, peak during and after it.

    python benchmarks/prompt_memory.py                      # SmolLM2, 8101 tokens: minutes on 2 cores
    python benchmarks/prompt_memory.py --tokens 1024,4096   # several lengths, to see the growth

Each prompt length runs in a fresh process: an EngineService as `llmcli serve` builds it (batch
size 8, the model's whole context), one short warm-up request, then one greedy completion of 4
tokens whose prompt is sample_data/sonnet18.txt repeated and cut to N tokens. Peak RSS is VmHWM,
reset just before the request (/proc/self/clear_refs), so it is this request's own peak.
Columns: prompt tokens, RSS before, peak RSS, RSS after the request, peak - before, after -
before, and the request's seconds (the prefill dominates). Results:
benchmarks/out/prompt_memory.md (also printed) and prompt_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from compare import status_bytes  # benchmarks/ is on the path of a script run from it

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
TEXT = HERE.parent / "sample_data" / "sonnet18.txt"


def worker(model: str, n_tokens: int, batch_size: int) -> dict:
    from llmcli.core.generate import Request
    from llmcli.core.sampling import SamplingParams
    from llmcli.engine import Engine
    from llmcli.engine.service import EngineService

    engine = Engine(model, batch_size=batch_size)
    service = EngineService(engine)
    tokenizer = engine.tokenizer
    text = TEXT.read_text(encoding="utf-8")
    ids = tokenizer.encode(text * (n_tokens // 100 + 1)).ids[:n_tokens]
    if len(ids) < n_tokens:
        raise SystemExit(f"the sample text gave {len(ids)} tokens, fewer than {n_tokens}")
    greedy = SamplingParams(temperature=0.0)
    list(service.submit(Request(id="warm-up", prompt_ids=ids[:16], params=greedy, max_tokens=2)))
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # VmHWM := VmRSS now
    before = status_bytes("VmRSS")
    start = time.perf_counter()
    list(service.submit(Request(id="long", prompt_ids=ids, params=greedy, max_tokens=4, ignore_eos=True)))
    seconds = time.perf_counter() - start
    result = {"tokens": n_tokens, "before": before, "peak": status_bytes("VmHWM"), "after": status_bytes("VmRSS"), "seconds": seconds}
    service.shutdown()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name, HF directory or .gguf (default: SmolLM2, context 8192)")
    ap.add_argument("--tokens", default="8101", help="prompt lengths, comma-separated")
    ap.add_argument("--batch-size", type=int, default=8, help="the engine's rows, as `llmcli serve --batch-size`")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.worker, args.batch_size)))
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results = []
    for n in (int(t) for t in args.tokens.split(",") if t.strip()):
        print(f"{n} tokens ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--worker", str(n), "--model", args.model, "--batch-size", str(args.batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"{n} tokens failed ({proc.returncode})")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mib = 2**20
    lines = [
        f"One completion (4 tokens) in an EngineService with batch size {args.batch_size}, model {args.model}",
        "",
        "| prompt tokens | RSS before | peak RSS | RSS after | peak - before | after - before | seconds |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['tokens']} | {r['before'] / mib:.0f} MiB | {r['peak'] / mib:.0f} MiB | {r['after'] / mib:.0f} MiB | "
            f"{(r['peak'] - r['before']) / mib:.0f} MiB | {(r['after'] - r['before']) / mib:.0f} MiB | {r['seconds']:.1f} |"
        )
    lines.append(f"\nload average: {os.getloadavg()[0]:.2f}")
    table = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prompt_memory.md").write_text(table)
    (OUT / "prompt_memory.json").write_text(json.dumps(results, indent=2))
    print(table)


if __name__ == "__main__":
    main()
