"""`llmcli bench`: prompt-processing and generation speed, like llama-bench.

For every batch size b, prompt length p and generation length n given (comma lists):
  - pp<p>: one prefill forward of b rows of p random tokens into an empty KV cache;
    tokens/s = b*p / time.
  - tg<n>: n decode steps of b rows from an empty KV cache, one token per row per step, greedy
    (argmax, so the logits are really computed and used); tokens/s = b*n / time.
Each is repeated r times (after one untimed warm-up run) and reported as mean ± sd of the
tokens/s samples, as llama-bench does. Token ids are random and seeded, so no tokenizer or text
is involved and runs are repeatable. The table goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import typer
from typer.core import TyperGroup
from typing_extensions import Annotated

from llmcli.cli import app
from llmcli.cli.options import DEFAULT_MODEL, DeviceOpt, DtypeOpt, ModelOpt, ProgressOpt, QuantizeOpt, ThreadsOpt, wants_progress
from llmcli.cli.stage import say
from llmcli.core.threads import apply_threads
from llmcli.errors import UsageError

FORMATS = ("md", "json", "jsonl", "csv")


def parse_int_list(value: str, flag: str, minimum: int) -> list[int]:
    """'64,512' -> [64, 512] (duplicates dropped, order kept); a bad item is a usage error naming the flag."""
    items = [v.strip() for v in str(value).split(",")]
    if not any(items):
        raise UsageError(f"{flag} is empty", f"give one or more integers separated by commas, e.g. {flag} 64,512")
    out: list[int] = []
    for item in items:
        try:
            number = int(item)
        except ValueError:
            raise UsageError(f"bad {flag} value {item!r} in {value!r}", f"give integers separated by commas, e.g. {flag} 64,512") from None
        if number < minimum:
            raise UsageError(f"{flag} value {number} is below {minimum}", f"give integers of at least {minimum}, e.g. {flag} 64,512")
        if number not in out:
            out.append(number)
    return out


@dataclass
class BenchResult:
    """One row of the table: one test (pp or tg) at one batch size, over all repetitions."""

    model: str
    model_path: str
    model_type: str
    size_bytes: int
    n_params: int
    dtype: str
    device: str
    quantize: str
    threads: int
    test: str  # "pp512" / "tg128", as llama-bench names them
    n_prompt: int
    n_gen: int
    batch: int
    repetitions: int
    samples_ns: list[int] = field(default_factory=list)
    samples_ts: list[float] = field(default_factory=list)
    avg_ns: float = 0.0
    stddev_ns: float = 0.0
    avg_ts: float = 0.0
    stddev_ts: float = 0.0
    peak_rss_bytes: int = 0  # the process's peak resident set so far (it only grows)
    peak_device_bytes: int | None = None  # torch's peak allocation on a CUDA device
    torch_version: str = ""
    cpu: str = ""

    def add(self, seconds: float) -> None:
        tokens = self.batch * (self.n_prompt or self.n_gen)
        ns = max(1, round(seconds * 1e9))
        self.samples_ns.append(ns)
        self.samples_ts.append(tokens / (ns / 1e9))  # from the recorded ns, so the two fields agree exactly
        self.avg_ns = statistics.fmean(self.samples_ns)
        self.avg_ts = statistics.fmean(self.samples_ts)
        several = len(self.samples_ns) > 1
        self.stddev_ns = statistics.stdev(self.samples_ns) if several else 0.0
        self.stddev_ts = statistics.stdev(self.samples_ts) if several else 0.0


# ---------------------------------------------------------------- measurements


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_prompt(loaded, n_prompt: int, batch: int, generator) -> float:
    """Seconds for one prefill of `batch` rows of `n_prompt` random tokens into an empty cache."""
    import torch

    from llmcli.core.models.base import KVCache

    model = loaded.module
    cache = KVCache.for_model(loaded.config, batch, max_len=n_prompt, dtype=loaded.dtype, device=loaded.device)
    ids = torch.randint(0, loaded.config.vocab_size, (batch, n_prompt), generator=generator).to(loaded.device)  # (b, p)
    last = torch.full((batch,), n_prompt - 1, device=loaded.device)
    with torch.inference_mode():
        _sync(loaded.device)
        start = time.perf_counter()
        logits = model(ids, cache=cache, logits_index=last).logits  # (b, V): what generation would sample from
        logits.argmax(-1).tolist()
        _sync(loaded.device)
        return time.perf_counter() - start


def time_generation(loaded, n_gen: int, batch: int, generator) -> float:
    """Seconds for `n_gen` greedy decode steps of `batch` rows, starting from an empty cache."""
    import torch

    from llmcli.core.generate import decode_step
    from llmcli.core.models.base import KVCache

    model = loaded.module
    cache = KVCache.for_model(loaded.config, batch, max_len=n_gen, dtype=loaded.dtype, device=loaded.device)
    tokens = torch.randint(0, loaded.config.vocab_size, (batch,), generator=generator).to(loaded.device)  # (b,)
    active = torch.ones(batch, dtype=torch.bool, device=loaded.device)
    _sync(loaded.device)
    start = time.perf_counter()
    for _ in range(n_gen):
        tokens = decode_step(model, cache, tokens, active).argmax(-1)  # (b,)
    tokens.tolist()  # the last token is on the host, as a sampler would need it
    _sync(loaded.device)
    return time.perf_counter() - start


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: VmHWM, not ru_maxrss, because ru_maxrss survives exec and so reports the parent's peak
    when that was larger (a benchmark started from a big process would report the parent).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def model_size(module, tied_output: bool = False) -> tuple[int, int]:
    """(bytes of the weights as held in memory, the checkpoint's parameter count); shared tensors counted once.

    GGML blocks (a GGUF's quantized tensors, --quantize) count their bytes and the values they hold;
    a tied embedding and output projection share one copy, counted once.
    """
    import torch

    from llmcli.core.formats import BlockEmbedding, BlockLinear

    seen: set[int] = set()
    nbytes = count = 0
    for m in module.modules():  # blocks are non-persistent buffers: not in the state_dict
        if isinstance(m, (BlockLinear, BlockEmbedding)) and m.blocks.data_ptr() not in seen:
            seen.add(m.blocks.data_ptr())
            nbytes += m.blocks.numel()
            count += m.blocks.shape[0] * (m.in_features if isinstance(m, BlockLinear) else m.embedding_dim)
    for name, value in module.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor):
            continue
        try:
            key = value.data_ptr()
        except RuntimeError:  # a tensor without storage cannot be shared either
            key = id(value)
        if key in seen:
            continue
        seen.add(key)
        nbytes += value.numel() * value.element_size()
        if not (tied_output and name.startswith("lm_head.")):
            count += value.numel()
    return nbytes, count


def run_benchmarks(
    loaded,
    prompts: list[int],
    gens: list[int],
    batches: list[int],
    repetitions: int,
    *,
    seed: int = 0,
    warmup: bool = True,
    quantize: str = "none",
    on_result: Callable[[BenchResult, int], None] | None = None,
) -> list[BenchResult]:
    """Every (batch, test) combination, `repetitions` times each. on_result(row, reps_done) after each repetition."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    size, n_params = model_size(loaded.module, tied_output=bool(getattr(loaded.config, "tie_word_embeddings", False)))
    common = dict(
        model=loaded.name,
        model_path=str(loaded.path),
        model_type=loaded.config.model_type,
        size_bytes=size,
        n_params=n_params,
        dtype=str(loaded.dtype).removeprefix("torch."),
        device=str(loaded.device),
        quantize=quantize or "none",
        threads=torch.get_num_threads(),
        repetitions=repetitions,
        torch_version=torch.__version__,
        cpu=platform.processor() or platform.machine(),
    )
    rows: list[BenchResult] = []
    for batch in batches:
        tests = [("pp", p) for p in prompts if p > 0] + [("tg", n) for n in gens if n > 0]
        for kind, length in tests:
            row = BenchResult(
                test=f"{kind}{length}",
                n_prompt=length if kind == "pp" else 0,
                n_gen=length if kind == "tg" else 0,
                batch=batch,
                **common,
            )
            measure = time_prompt if kind == "pp" else time_generation
            if warmup:
                measure(loaded, length, batch, generator)
            for rep in range(repetitions):
                row.add(measure(loaded, length, batch, generator))
                row.peak_rss_bytes = peak_rss_bytes()
                if loaded.device.type == "cuda":
                    row.peak_device_bytes = int(torch.cuda.max_memory_allocated(loaded.device))
                if on_result is not None:
                    on_result(row, rep + 1)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- output


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_markdown(rows: list[BenchResult]) -> str:
    head = ["model", "size", "params", "dtype", "quantize", "device", "threads", "b", "test", "t/s", "peak RSS"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---:" if h in ("size", "params", "threads", "b", "t/s", "peak RSS") else "---" for h in head) + " |"]
    for r in rows:
        cells = [r.model, _mib(r.size_bytes), _params(r.n_params), r.dtype, r.quantize, r.device, str(r.threads), str(r.batch), r.test, f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}", _mib(r.peak_rss_bytes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = [
    "model", "model_path", "model_type", "size_bytes", "n_params", "dtype", "device", "quantize", "threads", "test",
    "n_prompt", "n_gen", "batch", "repetitions", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns", "samples_ts",
    "peak_rss_bytes", "peak_device_bytes", "torch_version", "cpu",
]  # fmt: skip


def format_rows(rows: list[BenchResult], fmt: str) -> str:
    if fmt == "md":
        return format_markdown(rows)
    if fmt == "json":
        return json.dumps([asdict(r) for r in rows], indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(asdict(r)) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        d = asdict(r)
        d["samples_ns"] = " ".join(map(str, r.samples_ns))
        d["samples_ts"] = " ".join(f"{t:.6g}" for t in r.samples_ts)
        writer.writerow({k: ("" if d[k] is None else d[k]) for k in CSV_FIELDS})
    return buf.getvalue()


class _Reporter:
    """Progress on stderr: a Rich bar on a terminal, one line per finished test otherwise."""

    def __init__(self, total: int, live: bool):
        self.total = total
        self.done = 0
        self.progress = None
        if live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self.task = self.progress.add_task("bench", total=total)
            self.progress.start()

    def __call__(self, row: BenchResult, reps_done: int) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done, description=f"{row.test} b{row.batch}: {row.avg_ts:.1f} t/s")
        elif reps_done == row.repetitions:
            say(f"bench: {row.test} b{row.batch}: {row.avg_ts:.2f} ± {row.stddev_ts:.2f} t/s, peak RSS {_mib(row.peak_rss_bytes)}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# ---------------------------------------------------------------- command


class BenchGroup(TyperGroup):
    """`llmcli bench` measures the model in this process; `llmcli bench serve URL` (cli/bench_serve.py) measures a server."""

    def __init__(self, **kwargs):
        super().__init__(invoke_without_command=True, **kwargs)
        from llmcli.cli.bench_serve import bench_serve

        serve = typer.Typer(rich_markup_mode=app.rich_markup_mode, pretty_exceptions_enable=False)
        serve.command("serve")(bench_serve)
        self.add_command(typer.main.get_command(serve), "serve")


@app.command(cls=BenchGroup)
def bench(
    ctx: typer.Context,
    model: ModelOpt = None,
    n_prompt: Annotated[str, typer.Option("--n-prompt", "-p", help="Prompt lengths to prefill, comma-separated (0 = no prompt test).")] = "512",
    n_gen: Annotated[str, typer.Option("--n-gen", "-n", help="Tokens to generate, comma-separated (0 = no generation test).")] = "128",
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="Sequences per forward, comma-separated.")] = "1",
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", help="Timed runs of each test.")] = 3,
    format: Annotated[str, typer.Option("--format", "-f", help="md, json, jsonl or csv (llama-bench calls this -o; here -o is --output elsewhere).")] = "md",
    threads: ThreadsOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the random token ids.")] = 0,
    warmup: Annotated[bool, typer.Option(help="One untimed run of each test first.")] = True,
    progress: ProgressOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = "none",
) -> None:
    """Measure prompt processing (pp) and generation (tg) speed in tokens/s, like llama-bench.

    Every combination of -p, -n and -b runs -r times; mean ± sd and peak RSS go to stdout as a table.

    Example: llmcli bench -p 64,512 -n 128 -b 1,8 -r 3 --format md

    `llmcli bench serve URL` load-tests a running server instead (see `llmcli bench serve --help`).
    """
    if ctx.invoked_subcommand is not None:
        return
    if format not in FORMATS:
        raise UsageError(f"unknown --format {format!r}", f"use one of {', '.join(FORMATS)}")
    prompts = parse_int_list(n_prompt, "-p", 0)
    gens = parse_int_list(n_gen, "-n", 0)
    batches = parse_int_list(batch_size, "-b", 1)
    if not any(prompts) and not any(gens):
        raise UsageError("nothing to measure: every -p and -n is 0", "give a prompt length (-p 512) or a generation length (-n 128)")
    if repetitions < 1:
        raise UsageError(f"-r {repetitions} is below 1", "use -r 1 or more")

    from llmcli.engine.engine import load_model_ref
    from llmcli.errors import ModelError

    apply_threads(threads)
    loaded = load_model_ref(model, dtype=dtype, device=device, quantize=quantize, notify=say, default_model=DEFAULT_MODEL)
    if not loaded.config.is_causal:
        raise ModelError(f"{loaded.name} is an encoder ({loaded.config.model_type}); bench measures prefill and generation", "use a decoder model such as smollm2-135m-instruct")
    limit = loaded.config.max_position_embeddings
    longest = max(prompts + gens)
    if longest > limit:
        raise UsageError(f"a test needs {longest} positions but {loaded.name} holds {limit}", f"use -p and -n of at most {limit}")
    tests = sum(p > 0 for p in prompts) + sum(n > 0 for n in gens)
    reporter = _Reporter(tests * len(batches) * repetitions, live=wants_progress(progress))
    try:
        rows = run_benchmarks(loaded, prompts, gens, batches, repetitions, seed=seed, warmup=warmup, quantize=quantize, on_result=reporter)
    finally:
        reporter.close()
    sys.stdout.write(format_rows(rows, format))
    sys.stdout.flush()
