"""`llmcli perplexity`: a text file -> perplexity, bits per byte and token count (sliding windows)."""

from __future__ import annotations

import json
import sys

import typer
from typing_extensions import Annotated

from llmcli.cli import app
from llmcli.cli.options import DEFAULT_MODEL, DeviceOpt, DtypeOpt, ModelOpt, ProgressOpt, QuantizeOpt, ThreadsOpt, wants_progress
from llmcli.cli.stage import open_input, say
from llmcli.core.threads import apply_threads
from llmcli.errors import InputError, UsageError

FORMATS = ("text", "json")


@app.command()
def perplexity(
    file: Annotated[str, typer.Argument(help="Plain text file (UTF-8); '-' reads stdin.")],
    model: ModelOpt = None,
    ctx: Annotated[int, typer.Option("--ctx", "-c", help="Tokens per window.")] = 512,
    stride: Annotated[int, typer.Option("--stride", help="Tokens between window starts; each window scores only tokens not scored before.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Windows per forward pass.")] = 4,
    format: Annotated[str, typer.Option("--format", "-f", help="text (for people) or json (one object).")] = "text",
    progress: ProgressOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = "none",
    threads: ThreadsOpt = None,
) -> None:
    """Perplexity of a model on a text, with HF's sliding-window method (stride < ctx: overlapping context).

    Prints perplexity, bits per UTF-8 byte and the token count on stdout.

    Example: llmcli perplexity sample_data/sonnet18.txt --ctx 256 --stride 128
    """
    if format not in FORMATS:
        raise UsageError(f"unknown --format {format!r}", f"use one of {', '.join(FORMATS)}")
    if ctx < 2:
        raise UsageError(f"--ctx {ctx} is too small", "use --ctx 2 or more")
    if not 1 <= stride <= ctx:
        raise UsageError(f"--stride {stride} must be between 1 and --ctx ({ctx})", "use a stride of at most the context, e.g. half of it")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1", "use --batch-size 1 or more")
    from llmcli.records import strip_bom

    stream, source = open_input(file, kind="plain text file (UTF-8)")
    try:
        data = strip_bom(stream.read())
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{source} is not UTF-8 text (byte {exc.start})", "convert it, e.g. `iconv -f latin1 -t utf-8`", source=source) from None

    from llmcli.core.perplexity import perplexity as compute
    from llmcli.engine.engine import load_model_ref

    apply_threads(threads)
    loaded = load_model_ref(model, dtype=dtype, device=device, quantize=quantize, notify=say, default_model=DEFAULT_MODEL)
    ids = loaded.tokenizer.encode(text).ids
    show = wants_progress(progress)
    bar = _Bar() if show else None
    try:
        result = compute(loaded, ids, ctx=ctx, stride=stride, batch_size=batch_size, on_progress=bar.update if bar else None, n_bytes=len(data))
    finally:
        if bar is not None:
            bar.close()
    if format == "json":
        out = {"model": loaded.name, "file": source, "bytes": len(data), **result.as_dict()}
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        sys.stdout.write(
            f"perplexity {result.ppl:.4f}\n"
            f"bits per byte {result.bits_per_byte:.4f}\n"
            f"tokens {result.tokens} ({result.tokens_scored} scored in {result.windows} windows of {ctx}, stride {stride})\n"
        )
    sys.stdout.flush()


class _Bar:
    """Windows done of windows total, on stderr (Rich)."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("perplexity"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True)
        )
        self.task = self.progress.add_task("windows", total=None)
        self.progress.start()

    def update(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def close(self) -> None:
        self.progress.stop()
