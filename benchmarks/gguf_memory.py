"""Issue 13, item 5: peak RSS while generating from a GGUF against 1.25 x file + KV cache + 200 MiB, and load time.

    python benchmarks/gguf_memory.py                       # SmolLM2 Q4_1 / Q8_0 / Q4_K_M and the random 1B Q4_K_M
    python benchmarks/gguf_memory.py --files random-8b-q4_k_m --gen 16   # after make_random_gguf.py --shape 8b

For every file, in a fresh process each (VmHWM is the process's own): the file is read once
first (warm page cache, as the issue's "< 2 s" load target says), then
  llmcli      Engine(file) as `llmcli generate` builds it (its cache as every command uses it:
              the process before the measured one loads the file once, untimed), then a greedy
              completion of --gen tokens after a --prompt-token prompt at batch 1
  llama.cpp   llama_cpp.Llama(file) and the same prompt and tokens, for scale
Columns: RSS after the imports, load time, peak RSS (VmHWM: loading and generating), the budget
1.25 x file + KV cache for prompt + gen tokens (llmcli's float32 K/V; llama.cpp's F16 would be
half) + 200 MiB, and peak / budget (item 5 holds when it is at most 1). --files takes compare.py's
keys (smollm2-q4_1, smollm2-q8_0, smollm2-q4_k_m, random-1b-q4_k_m, random-8b-q4_k_m) or paths.
Results: benchmarks/out/gguf_memory.md (also printed) and gguf_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from compare import OUT, kv_bytes_per_token, peak_rss, random_ids, resolve_file, status_bytes, warm_page_cache

LOADERS = ("llmcli", "llamacpp")


def worker(loader: str, path: str, prompt: int, gen: int, threads: int) -> dict:
    if loader == "llmcli":
        import torch

        from llmcli.core.generate import Request
        from llmcli.core.sampling import SamplingParams
        from llmcli.engine import Engine

        torch.set_num_threads(threads)
        baseline = status_bytes("VmRSS")
        start = time.perf_counter()
        engine = Engine(path, dtype="float32", batch_size=1, max_context=prompt + gen + 8)
        seconds = time.perf_counter() - start
        ids = random_ids(0, engine.loaded.config.vocab_size, (prompt,))
        req = Request(id=0, prompt_ids=ids, params=SamplingParams(temperature=0.0), max_tokens=gen, ignore_eos=True)
        (result,) = list(engine.iter_results([req], batch_size=1))
        assert len(result.generated_ids) == gen
    else:
        import llama_cpp
        import numpy as np

        baseline = status_bytes("VmRSS")
        start = time.perf_counter()
        llm = llama_cpp.Llama(model_path=path, n_ctx=prompt + gen + 8, n_batch=prompt, n_threads=threads, n_threads_batch=threads, verbose=False)
        seconds = time.perf_counter() - start
        vocab = llm.n_vocab()
        llm.eval(random_ids(0, vocab, (prompt,)))
        for _ in range(gen):
            token = int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)).argmax())
            llm.eval([token])
    return {"loader": loader, "baseline": baseline, "load_seconds": seconds, "peak": peak_rss(), "after": status_bytes("VmRSS")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", default="smollm2-q4_1,smollm2-q8_0,smollm2-q4_k_m,random-1b-q4_k_m")
    ap.add_argument("--loaders", default=",".join(LOADERS))
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.prompt, args.gen, args.threads)))
        return
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    files = {key: resolve_file(key, args.threads) for key in (k.strip() for k in args.files.split(",")) if key}
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", LLMCLI_HOME=str(OUT / "llmcli-home"))
    common = ["--prompt", str(args.prompt), "--gen", str(args.gen), "--threads", str(args.threads)]
    results = []
    for key, path in files.items():
        for loader in loaders:
            warm_page_cache(path)
            runs = 2 if loader == "llmcli" else 1  # llmcli: the first load of a file fills its cache (today's loader)
            for _ in range(runs):
                print(f"{loader} {key} ...", file=sys.stderr, flush=True)
                proc = subprocess.run([sys.executable, __file__, "--worker", loader, str(path), *common], capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-3000:])
                    raise SystemExit(f"{loader} {key} failed ({proc.returncode})")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(file=key, bytes=path.stat().st_size, budget=1.25 * path.stat().st_size + kv_bytes_per_token(path) * (args.prompt + args.gen) + 200 * 2**20)
            results.append(row)
    mib = 2**20
    lines = [
        f"Peak RSS while generating {args.gen} tokens after a {args.prompt}-token prompt, {args.threads} threads, page cache warm",
        "",
        "| file | size | loader | RSS after imports | load time | peak RSS | budget | peak / budget |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['file']} | {r['bytes'] / mib:.0f} MiB | {r['loader']} | {r['baseline'] / mib:.0f} MiB | {r['load_seconds']:.2f} s | "
            f"{r['peak'] / mib:.0f} MiB | {r['budget'] / mib:.0f} MiB | {r['peak'] / r['budget']:.2f} |"
        )
    lines += ["", "budget (issue 13, item 5): 1.25 x file size + float32 K/V for prompt + gen tokens + 200 MiB; item 5 holds at peak / budget <= 1."]
    table = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gguf_memory.md").write_text(table)
    (OUT / "gguf_memory.json").write_text(json.dumps(results, indent=2))
    print(table)


if __name__ == "__main__":
    main()
