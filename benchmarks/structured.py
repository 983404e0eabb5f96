"""Structured output (issue 17): what a grammar costs, and llguidance against xgrammar.

1. Engine throughput on SmolLM2 (the catalogue's GGUF), constrained vs unconstrained, at batch 1
   and 16: `--tokens` new tokens per sequence, greedy, the same prompts. The constrained runs
   follow a JSON schema that cannot be complete within the budget (an array of at least 500
   strings), so both runs generate the same number of tokens and tokens/s compare like for like.
   The modes are interleaved, `--reps` times each; the median ratio is reported, of wall-clock
   tokens/s and of tokens per CPU-second of the whole process (the mask worker included), which
   a shared machine disturbs much less than wall time.
2. llguidance vs xgrammar on the same tokenizer (SmolLM2's 49152 ids, given to both as raw token
   bytes) and the same 23 schemas as tests/test_structured.py: tokenizer set-up time, compile time
   per schema (xgrammar's cache off), and mask time per token along the same token walk (a seeded
   random walk through the tokens llguidance allows; xgrammar is fed the same tokens).

    python benchmarks/structured.py [--tokens 48] [--reps 3] [--batches 1,16] [--threads 1] [--skip-engine] [--skip-libs]

Needs xgrammar for part 2 (`pip install -e '.[bench]'`). Prints the load average beside every
table: on a shared machine the absolute numbers move, the interleaved ratios much less.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_structured import SCHEMAS  # noqa: E402

# an array that cannot close within the token budget: the whole run is under the grammar
LONG_SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 500}}, "required": ["items"]}
PROMPTS = [
    "List the ingredients of a pancake as JSON.",
    "Name some European capitals as JSON.",
    "Give me a shopping list in JSON.",
    "What animals live on a farm? Answer in JSON.",
]


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def engine_throughput(args) -> list[dict]:
    from llmcli.catalog import pull
    from llmcli.core.constrained import guidance_tokenizer, json_schema_grammar
    from llmcli.core.generate import Request
    from llmcli.core.threads import apply_threads
    from llmcli.engine import Engine

    apply_threads(args.threads)  # one thread: no OpenMP spin-waits, so CPU time measures work even on a busy machine
    path = pull("smollm2-135m-instruct", notify=lambda m: print(m, file=sys.stderr))
    engine = Engine(str(path), batch_size=max(args.batches))
    tok = engine.tokenizer
    t0 = time.perf_counter()
    guidance_tokenizer(tok, engine.config.vocab_size)
    print(f"llguidance tokenizer for SmolLM2: {time.perf_counter() - t0:.2f} s (once per process)")
    grammar = json_schema_grammar(LONG_SCHEMA)
    prompts = [tok.encode_chat([{"role": "user", "content": p}])[1].ids for p in PROMPTS]
    rows = []
    for batch in args.batches:
        times: dict[str, list[float]] = {"plain": [], "constrained": []}
        cpu: dict[str, list[float]] = {"plain": [], "constrained": []}
        counts: dict[str, int] = {}
        for rep in range(args.reps + 1):  # the first round warms up and is not counted
            for mode in ("plain", "constrained"):
                requests = [
                    Request(id=i, prompt_ids=prompts[i % len(prompts)], max_tokens=args.tokens, ignore_eos=True, grammar=grammar if mode == "constrained" else None)
                    for i in range(batch)
                ]
                start, start_cpu = time.perf_counter(), time.process_time()
                n = sum(len(r.generated_ids) for r in engine.iter_results(requests, batch_size=batch))
                if rep:
                    times[mode].append(time.perf_counter() - start)
                    cpu[mode].append(time.process_time() - start_cpu)  # every thread of the process: the mask worker's too
                    counts[mode] = n
        plain = [counts["plain"] / t for t in times["plain"]]
        constrained = [counts["constrained"] / t for t in times["constrained"]]
        ratios = [c / p for c, p in zip(constrained, plain)]
        cpu_ratios = [p / c for c, p in zip(cpu["constrained"], cpu["plain"])]  # tokens per CPU-second, constrained / plain
        rows.append(
            {
                "batch": batch,
                "tokens": counts["plain"],
                "plain_tok_s": statistics.median(plain),
                "constrained_tok_s": statistics.median(constrained),
                "ratio_median": statistics.median(ratios),
                "ratios": ratios,
                "cpu_ratio_median": statistics.median(cpu_ratios),
                "cpu_ratios": cpu_ratios,
                "load": load(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def libraries(args) -> dict:
    import llguidance
    import torch
    import xgrammar as xgr

    from llmcli.catalog import pull
    from llmcli.core.constrained import JSON_OPTIONS, json_schema_grammar, token_bytes
    from llmcli.core.tokenizer import load_tokenizer

    path = pull("smollm2-135m-instruct", notify=lambda m: print(m, file=sys.stderr))
    tok = load_tokenizer(path)
    vocab = tok.vocab_size
    t0 = time.perf_counter()
    from llmcli.core.constrained import _TokenizerView

    lt = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(tok, vocab)), n_vocab=vocab, eos_token=tok.eos_token_ids)
    llg_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(token_bytes(tok, vocab), xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=tok.eos_token_ids)
    xgr_setup = time.perf_counter() - t0
    rng = random.Random(0)
    per_schema = []
    words = (vocab + 31) // 32
    bit_values = torch.tensor([1 << b for b in range(32)], dtype=torch.int64).to(torch.int32)
    for name, schema in SCHEMAS.items():
        grammar = json_schema_grammar(schema)
        t0 = time.perf_counter()
        matcher = llguidance.LLMatcher(lt, grammar.text, log_level=0)
        llg_compile = time.perf_counter() - t0
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        t0 = time.perf_counter()
        try:
            compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(JSON_OPTIONS["item_separator"], JSON_OPTIONS["key_separator"]))
        except Exception as exc:  # noqa: BLE001 - a schema xgrammar refuses is a result too
            per_schema.append({"schema": name, "llg_compile_ms": llg_compile * 1e3, "xgr_error": str(exc).splitlines()[0][:120]})
            continue
        xgr_compile = time.perf_counter() - t0
        xmatcher = xgr.GrammarMatcher(compiled)
        lbits = torch.zeros(words, dtype=torch.int32)
        xbits = xgr.allocate_token_bitmask(1, vocab)
        llg_t, xgr_t, steps, diverged = 0.0, 0.0, 0, None
        for _ in range(64):
            t0 = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(lbits.data_ptr(), words * 4)
            llg_t += time.perf_counter() - t0
            t0 = time.perf_counter()
            xmatcher.fill_next_token_bitmask(xbits)
            xgr_t += time.perf_counter() - t0
            steps += 1
            allowed_mask = ((lbits[:, None] & bit_values) != 0).reshape(-1)[:vocab]
            allowed_mask[tok.eos_token_ids] = False
            allowed = allowed_mask.nonzero().flatten().tolist()
            if not allowed:
                break
            token = rng.choice(allowed)
            matcher.consume_token(token)
            if not xmatcher.accept_token(token):
                diverged = steps
                break
            if matcher.is_stopped():
                break
        per_schema.append(
            {
                "schema": name,
                "llg_compile_ms": llg_compile * 1e3,
                "xgr_compile_ms": xgr_compile * 1e3,
                "steps": steps,
                "llg_mask_us": llg_t / steps * 1e6,
                "xgr_mask_us": xgr_t / steps * 1e6,
                **({"xgr_refused_token_at_step": diverged} if diverged else {}),
            }
        )
        print(json.dumps(per_schema[-1]), flush=True)
    ok = [r for r in per_schema if "llg_mask_us" in r]
    summary = {
        "tokenizer_setup_s": {"llguidance": llg_setup, "xgrammar": xgr_setup},
        "compile_ms_median": {"llguidance": statistics.median(r["llg_compile_ms"] for r in per_schema), "xgrammar": statistics.median(r["xgr_compile_ms"] for r in ok)},
        "mask_us_per_token_median": {"llguidance": statistics.median(r["llg_mask_us"] for r in ok), "xgrammar": statistics.median(r["xgr_mask_us"] for r in ok)},
        "mask_us_per_token_max": {"llguidance": max(r["llg_mask_us"] for r in ok), "xgrammar": max(r["xgr_mask_us"] for r in ok)},
        "xgrammar_refused": [r["schema"] for r in per_schema if "xgr_error" in r],
        "load": load(),
        "versions": {"llguidance": version("llguidance"), "xgrammar": version("xgrammar")},
    }
    print(json.dumps(summary, indent=1))
    return {"per_schema": per_schema, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="model threads (the mask worker is one more)")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--skip-libs", action="store_true")
    args = ap.parse_args()
    out = {}
    if not args.skip_libs:
        out["libraries"] = libraries(args)
    if not args.skip_engine:
        out["engine"] = engine_throughput(args)
    target = Path(__file__).parent / "out"
    target.mkdir(exist_ok=True)
    (target / "structured.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
