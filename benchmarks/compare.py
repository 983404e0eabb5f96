"""llmcli against its peers on SmolLM2-135M-Instruct, in one run: transformers and llama.cpp.

    python benchmarks/compare.py                # 3 interleaved repetitions, ~5-10 minutes on 2 cores
    python benchmarks/compare.py --reps 1 --gen 32   # a quick look

Tools (each repetition runs every tool once, one fresh subprocess per tool and repetition, so
the peak RSS of one tool never includes another's, and slow drifts of the machine hit all alike):
  llmcli           the engine on the GGUF's own blocks, mapped from the file (core prefill; Engine greedy decode)
  llmcli int8      the same with --quantize int8 (Q8_0-style 8-bit weights, float32 activations)
  transformers     AutoModelForCausalLM.from_pretrained(dir, gguf_file=...), float32 (forward; generate)
  llama.cpp Q4_1   llama_cpp.Llama on the original Q4_1 GGUF
  llama.cpp Q8_0   llama_cpp.Llama on a Q8_0 GGUF made from it with llama.cpp's own quantizer

Same file (issue 13, item 7): for every GGUF in --files, llmcli (its blocks mapped from the file,
activations rounded to 8-bit blocks as ggml does) and llama.cpp on that very file, one after the other in each
repetition: SmolLM2 Q4_1, a Q8_0 and a Q4_K_M that llama.cpp's quantizer makes of it, and the
random-weight Llama-3.2-1B-shaped Q4_K_M of benchmarks/make_random_gguf.py. llmcli loads each file
once before the repetitions, untimed (its first load compiles the kernels and writes the
tokenizer cache; the measured loads are the later ones every command sees). Each row also has the
load time, the time to first token (start of the load to the argmax of a cold --prompt-token
prefill, page cache warm) and peak RSS against issue 13's budget, 1.25 x file + KV cache + 200 MiB.

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

--llamacpp-path DIR runs the llama.cpp workers on the llama_cpp package installed in DIR (pip
install --target DIR), e.g. a build for the AVX2 level, to compare with llmcli at LLMCLI_ISA=avx2:
the pip build compiles for the machine it is built on (AVX-512 here). benchmarks/README.md has the
build line.

Results: benchmarks/out/compare.md (the tables, also printed) and compare.json (every sample).
The workers run with LLMCLI_HOME=benchmarks/out/llmcli-home, so llmcli's caches of these files
stay out of the user's cache.
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
FILE_TOOLS = ("llmcli-file", "llamacpp-file")  # both run on each of --files
# --files keys: how each file is made (a path to any .gguf works too)
FILES = {
    "smollm2-q4_1": "the catalogue's SmolLM2-135M-Instruct Q4_1",
    "smollm2-q8_0": "SmolLM2 requantized to Q8_0 by llama.cpp",
    "smollm2-q4_k_m": "SmolLM2 requantized to Q4_K_M by llama.cpp",
    "random-1b-q4_k_m": "benchmarks/make_random_gguf.py --shape 1b (Llama-3.2-1B shape, random weights)",
}  # and random-<shape>-<type> for any other file make_random_gguf.py writes
LABELS = {"llmcli": "llmcli (float32)", "llmcli-int8": "llmcli int8 (Q8_0-style)", "transformers": "transformers (float32)", "llamacpp-q4_1": "llama.cpp Q4_1", "llamacpp-q8_0": "llama.cpp Q8_0", "llmcli-file": "llmcli", "llamacpp-file": "llama.cpp"}
BATCHED = {"llmcli", "llmcli-int8", "transformers", "llmcli-file"}
OURS = ("llmcli", "llmcli-int8")


# ---------------------------------------------------------------- helpers shared by parent and workers


def status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM, ...) in bytes (Linux only)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise SystemExit(f"no {field} in /proc/self/status: these benchmarks measure memory on Linux only")


def peak_rss() -> int:
    """This process's peak RSS: VmHWM, since ru_maxrss keeps the parent's peak across exec."""
    return status_bytes("VmHWM")


def random_ids(seed: int, vocab: int, shape: tuple[int, ...]) -> list:
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, size=shape).tolist()


def smollm2_gguf() -> Path:
    from llmcli.catalog import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct", lambda m: print(m, file=sys.stderr))


def requantized(src: Path, preset: str, threads: int) -> Path:
    """OUT/<src stem with its type replaced>.<preset>.gguf, made once by llama.cpp's own quantizer from src."""
    from make_random_gguf import quantize_gguf

    name = src.name.replace("Q4_1", preset) if "Q4_1" in src.name else f"{src.stem}.{preset}.gguf"
    dst = OUT / name
    return dst if dst.is_file() else quantize_gguf(src, dst, preset, threads=threads)


def resolve_file(key: str, threads: int) -> Path:
    """A --files entry: one of FILES' keys, or the path of a GGUF."""
    if key == "smollm2-q4_1":
        return smollm2_gguf()
    if key in ("smollm2-q8_0", "smollm2-q4_k_m"):
        return requantized(smollm2_gguf(), key.split("-", 1)[1].upper(), threads)
    if key.startswith("random-") and key.count("-") == 2:
        _, shape, preset = key.split("-")
        path = OUT / f"random-{shape}-{preset.upper()}.gguf"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run `python benchmarks/make_random_gguf.py --shape {shape} --type {preset.upper()}` first")
        return path
    if key.endswith(".gguf") and Path(key).is_file():
        return Path(key)
    raise SystemExit(f"--files {key}: not a .gguf file nor one of {', '.join(FILES)}")


def kv_bytes_per_token(path: Path) -> int:
    """llmcli's float32 K and V for one token of every layer, from the GGUF's metadata."""
    return gguf_token_bytes(path)[0]


def gguf_token_bytes(path: Path) -> tuple[int, int]:
    """(llmcli's float32 K and V bytes for one token of every layer, the weight bytes one batch-1
    decode step reads), from one read of the header: gguf's reader takes seconds on a 128k-token
    vocabulary. A decode step reads every tensor once, except the token embedding, of which it
    reads one row, unless the output projection is tied to it (then all of it)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    meta = {k: reader.fields[f"{arch}.{k}"].contents() for k in ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv")}
    head_dim = meta["embedding_length"] // meta["attention.head_count"]
    tied = "output.weight" not in {t.name for t in reader.tensors}
    decode_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight" or tied)
    return meta["block_count"] * 2 * meta["attention.head_count_kv"] * head_dim * 4, decode_bytes


def gguf_weight_bytes(path: Path) -> tuple[int, int]:
    """(bytes of every tensor as stored, number of weights) of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors), sum(int(t.n_elements) for t in reader.tensors)


def read_bandwidth(threads: int, nbytes: int = 512 * 2**20, repeats: int = 7) -> float:
    """Bytes/s of a sum over a buffer far larger than the caches on `threads` threads: what reading
    the weights once per token can reach at best (measured right before each worker, as the
    machine's bandwidth drifts; torch's sum read at the speed of a hand-written AVX-512 loop)."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


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
    started = time.perf_counter()
    engine = Engine(spec.get("file") or spec["gguf"], dtype="float32", quantize=quantize, batch_size=max(spec["batches"]), max_context=spec["prompt"] + spec["gen"] + 8)
    loaded = engine.loaded
    vocab = loaded.config.vocab_size
    loaded_at = time.perf_counter()
    cold = random_ids(spec["seed"] + 2, vocab, (spec["prompt"],))
    prefill(loaded.module, KVCache.for_model(loaded.config, 1, spec["prompt"] + 1), 0, cold).argmax().item()
    first = {"load_seconds": loaded_at - started, "ttft_seconds": time.perf_counter() - started}

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
    return first, _measure(spec, pp, tg, batched=True)


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
    return {}, _measure(spec, pp, tg, batched=True)


def worker_llamacpp(spec: dict) -> list[dict]:
    import llama_cpp
    import numpy as np

    path = spec.get("file") or (spec["gguf"] if spec["tool"] == "llamacpp-q4_1" else spec["q8_0"])
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=spec["prompt"] + spec["gen"] + 8, n_batch=spec["prompt"], n_ubatch=spec["prompt"], n_threads=spec["threads"], n_threads_batch=spec["threads"], verbose=False
    )
    vocab = llm.n_vocab()
    loaded_at = time.perf_counter()
    llm.eval(random_ids(spec["seed"] + 2, vocab, (spec["prompt"],)))
    int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)).argmax())
    first = {"load_seconds": loaded_at - started, "ttft_seconds": time.perf_counter() - started}

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
    return first, _measure(spec, pp, tg, batched=False)


def _measure(spec: dict, pp, tg, batched: bool) -> list[dict]:
    rows = []
    for batch in spec["batches"]:
        if batch > 1 and not batched:
            continue
        if batch == 1 or spec["batch_prefill"]:
            rows.append({"test": f"pp{spec['prompt']}", "batch": batch, "tokens": batch * spec["prompt"], "seconds": pp(batch)})
        rows.append({"test": f"tg{spec['gen']}", "batch": batch, "tokens": batch * spec["gen"], "seconds": tg(batch, spec["gen"])})
    return rows


WORKERS = {
    "llmcli": worker_llmcli, "llmcli-int8": worker_llmcli, "transformers": worker_transformers, "llamacpp-q4_1": worker_llamacpp,
    "llamacpp-q8_0": worker_llamacpp, "llmcli-file": worker_llmcli, "llamacpp-file": worker_llamacpp,
}  # fmt: skip


def prepare_llmcli(path: str) -> None:
    """Load the file once as every llmcli command does, so the measured loads are the ones users see
    on every later start, not the first one (which today dequantizes and writes llmcli's cache)."""
    from llmcli.catalog import cache_root
    from llmcli.core.loader import load_model

    load_model(path, dtype="float32", cache_dir=cache_root())


def run_worker(spec: dict) -> None:
    if spec["tool"] == "llmcli-prepare":
        prepare_llmcli(spec["file"])
        return
    start = time.perf_counter()
    first, rows = WORKERS[spec["tool"]](spec)
    print(json.dumps({"tool": spec["tool"], "file": spec.get("file_key"), "rows": rows, **first, "peak_rss_bytes": peak_rss(), "wall_seconds": time.perf_counter() - start}))


# ---------------------------------------------------------------- parent: schedule, collect, tabulate


def warm_page_cache(path: Path) -> None:
    """Read the file once, so a load measures mapping and setup, not the disk (item 5: warm page cache)."""
    with open(path, "rb") as f:
        while f.read(64 * 2**20):
            pass


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
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"of {', '.join(TOOLS)}; '' for none")
    ap.add_argument("--files", default=",".join(FILES), help=f"GGUFs for llmcli vs llama.cpp on the same file: {', '.join(FILES)} or paths; '' for none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf", type=Path, default=None, help="the SmolLM2 Q4_1 GGUF (default: the llmcli catalogue copy)")
    ap.add_argument("--llamacpp-path", type=Path, default=None, help="run llama.cpp from the llama_cpp package in this directory (pip install --target)")
    ap.add_argument("--table-from", type=Path, help="print the tables of a saved compare.json again, measuring nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(json.loads(args.worker))
        return
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        meta = saved["meta"]
        print(tabulate(meta, saved["runs"]) if meta["tools"] else "")
        if meta.get("files"):
            print(tabulate_files(meta, saved["runs"]))
        return

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        ap.error(f"unknown tool(s) {unknown}; choose from {', '.join(TOOLS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    gguf = args.gguf or smollm2_gguf()
    q8 = requantized(gguf, "Q8_0", args.threads) if "llamacpp-q8_0" in tools else None
    files = {key: resolve_file(key, args.threads) for key in (k.strip() for k in args.files.split(",")) if key}
    bandwidth = copy_bandwidth(args.threads)
    q4_bytes, n_weights = gguf_weight_bytes(gguf)
    # int8: one byte per weight plus a float32 scale per 32 (the embedding rows looked up are negligible)
    weight_bytes = {"llmcli": 4 * n_weights, "llmcli-int8": n_weights + n_weights // 8, "transformers": 4 * n_weights, "llamacpp-q4_1": q4_bytes}
    if q8 is not None:
        weight_bytes["llamacpp-q8_0"] = gguf_weight_bytes(q8)[0]
    spec = {"prompt": args.prompt, "gen": args.gen, "batches": [1, args.batch] if args.batch > 1 else [1], "batch_prefill": args.batch_prefill, "threads": args.threads, "seed": args.seed, "gguf": str(gguf), "q8_0": str(q8) if q8 else None}
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", LLMCLI_HOME=str(OUT / "llmcli-home"))
    llama_env = env if args.llamacpp_path is None else dict(env, PYTHONPATH=os.pathsep.join(p for p in (str(args.llamacpp_path.resolve()), env.get("PYTHONPATH")) if p))
    jobs = [({"tool": tool}, tool) for tool in tools]
    jobs += [({"tool": tool, "file": str(path), "file_key": key}, f"{tool} {key}") for key, path in files.items() for tool in FILE_TOOLS]
    file_meta = {}
    for key, path in files.items():
        kv_per_token, decode_bytes = gguf_token_bytes(path)
        file_meta[key] = {"path": str(path), "bytes": path.stat().st_size, "kv_per_token": kv_per_token, "decode_bytes": decode_bytes}

    for key, path in files.items():
        print(f"[prepare] llmcli {key} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, "--worker", json.dumps({"tool": "llmcli-prepare", "file": str(path)})], check=True, env=env)

    runs = []
    for rep in range(args.reps):
        for job, name in jobs:
            read_bw = None
            if "file" in job:
                warm_page_cache(Path(job["file"]))
                read_bw = read_bandwidth(args.threads)
            print(f"[rep {rep + 1}/{args.reps}] {name} ...", file=sys.stderr, flush=True)
            load = os.getloadavg()[0]
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps({**spec, **job})], capture_output=True, text=True, env=llama_env if job["tool"].startswith("llamacpp") else env)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"{name} worker failed ({proc.returncode})")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result.update(rep=rep, load_before=load, load_after=os.getloadavg()[0], read_bandwidth=read_bw)
            runs.append(result)
            print("   " + ", ".join(f"{r['test']} b{r['batch']} {r['tokens'] / r['seconds']:.1f} t/s" for r in result["rows"]), file=sys.stderr, flush=True)

    import torch

    probe = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True, env=llama_env)
    llama_version = probe.stdout.strip() or "absent"
    if args.llamacpp_path is not None:
        llama_version += f" from {args.llamacpp_path}"
    meta = {
        "prompt": args.prompt, "gen": args.gen, "batch": args.batch, "batch_prefill": args.batch_prefill, "threads": args.threads,
        "reps": args.reps, "tools": tools, "copy_bandwidth": bandwidth, "weight_bytes": weight_bytes, "files": file_meta,
        "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs; torch {torch.__version__}, llama-cpp-python {llama_version}"
        + (f"; llmcli at LLMCLI_ISA={os.environ['LLMCLI_ISA']}" if os.environ.get("LLMCLI_ISA") else ""),
    }  # fmt: skip
    (OUT / "compare.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    table = tabulate(meta, runs) if tools else ""
    table += ("\n" if table else "") + tabulate_files(meta, runs) if files else ""
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



def tabulate_files(meta: dict, runs: list[dict]) -> str:
    """The same-file tables: llmcli and llama.cpp per GGUF, then llmcli's ratios against issue 13's targets."""
    prompt, gen, batch = meta["prompt"], meta["gen"], meta["batch"]
    mib = 2**20
    by: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        if run.get("file"):
            by.setdefault((run["file"], run["tool"]), []).append(run)

    def speeds(key: str, tool: str, test: str, b: int) -> list[float]:
        return [r["tokens"] / r["seconds"] for run in by.get((key, tool), []) for r in run["rows"] if r["test"] == test and r["batch"] == b]

    def cell(values: list[float]) -> str:
        if not values:
            return "-"
        m, s = mean_sd(values)
        return f"{m:.1f} ± {s:.1f} ({max(values):.1f})"

    def budget(key: str) -> float:
        """Issue 13's peak RSS budget: 1.25 x file + the KV cache the run holds at most + 200 MiB."""
        f = meta["files"][key]
        return 1.25 * f["bytes"] + f["kv_per_token"] * max(prompt + 1, batch * (gen + 1)) + 200 * mib

    def ceilings(key: str, runs_of_tool: list[dict]) -> list[float]:
        """Each run's batch-1 decode ceiling, tokens/s: the read bandwidth measured right before it
        over the weight bytes a token reads."""
        per_token = meta["files"][key].get("decode_bytes")  # absent from runs saved before it was measured
        return [r["read_bandwidth"] / per_token for r in runs_of_tool if per_token and r.get("read_bandwidth")]

    def of_ceiling(key: str, runs_of_tool: list[dict]) -> str:
        """Each run's tg b1 over its own ceiling: mean (best)."""
        measured = [run for run in runs_of_tool if run.get("read_bandwidth")]
        pairs = [(r["tokens"] / r["seconds"]) / c for run, c in zip(measured, ceilings(key, measured)) for r in run["rows"] if r["test"] == tg and r["batch"] == 1]
        return f"{statistics.fmean(pairs):.0%} ({max(pairs):.0%})" if pairs else "-"

    pp, tg = f"pp{prompt}", f"tg{gen}"
    lines = [
        f"Same file: llmcli and llama.cpp on each GGUF, {meta['threads']} threads, {meta['reps']} interleaved repetitions; tokens/s as mean ± sd (best)",
        "",
        f"| file | tool | {pp} b1 | {tg} b1 | {tg} b{batch} | load | time to first token | peak RSS | RSS budget | {tg} b1 / read ceiling |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in meta["files"]:
        for tool in FILE_TOOLS:
            got = by.get((key, tool))
            if not got:
                continue
            load = min(r["load_seconds"] for r in got)
            ttft = min(r["ttft_seconds"] for r in got)
            rss = max(r["peak_rss_bytes"] for r in got)
            size = meta["files"][key]["bytes"]
            lines.append(
                f"| {key} ({size / mib:.0f} MiB) | {LABELS[tool]} | {cell(speeds(key, tool, pp, 1))} | {cell(speeds(key, tool, tg, 1))} | "
                f"{cell(speeds(key, tool, tg, batch))} | {load:.2f} s | {ttft:.2f} s | {rss / mib:.0f} MiB | {budget(key) / mib:.0f} MiB | {of_ceiling(key, got)} |"
            )
    lines += [
        "",
        f"| file | {pp} llmcli / llama.cpp (target ≥ 1.0) | {tg} b1 llmcli / llama.cpp (≥ 1.2) | llmcli {tg} b{batch} / b1 (≥ 4) | llmcli peak RSS / budget (≤ 1) | llmcli load (< 2 s for the 1B) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    def ratio(a: list[float], b: list[float]) -> str:
        return f"{statistics.fmean(a) / statistics.fmean(b):.2f} ({max(a) / max(b):.2f})" if a and b else "-"

    for key in meta["files"]:
        ours = by.get((key, "llmcli-file"))
        if not ours:
            continue
        rss = max(r["peak_rss_bytes"] for r in ours)
        lines.append(
            f"| {key} | {ratio(speeds(key, 'llmcli-file', pp, 1), speeds(key, 'llamacpp-file', pp, 1))} | "
            f"{ratio(speeds(key, 'llmcli-file', tg, 1), speeds(key, 'llamacpp-file', tg, 1))} | "
            f"{ratio(speeds(key, 'llmcli-file', tg, batch), speeds(key, 'llmcli-file', tg, 1))} | {rss / budget(key):.2f} | {min(r['load_seconds'] for r in ours):.2f} s |"
        )
    lines += [
        "",
        f"load: start of the load to a model ready to run; time to first token: start of the load to the argmax of a cold {prompt}-token prefill (page cache warm, best repetition).",
        f"read ceiling: the read bandwidth on {meta['threads']} threads (a sum over 512 MiB, measured right before each run) / the weight bytes a batch-1 token reads"
        " (every tensor once; the token embedding whole only when the output is tied to it); no decode that reads the weights once per token can pass it,"
        " so 1.2x llama.cpp cannot be reached where llama.cpp runs above 83% of it.",
        f"RSS budget (issue 13, item 5): 1.25 x file size + llmcli's float32 KV cache for max({prompt} + 1, {batch} x ({gen} + 1)) tokens + 200 MiB; peak RSS is VmHWM, loading included.",
        "ratios: mean (best); llama.cpp's Python API has no batched decode, so b" + str(batch) + " is llmcli's own.",
        f"machine: {meta['machine']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
