"""`llmcli serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over one model."""

from __future__ import annotations

import re
from typing import Optional

import typer
from typing_extensions import Annotated

from llmcli.cli import app
from llmcli.cli.options import (
    DEFAULT_ENCODER,
    DEFAULT_PREFIX_CACHE_MB,
    DeviceOpt,
    DtypeOpt,
    MaxBatchedTokensOpt,
    ModelOpt,
    PrefixCacheOpt,
    QuantizeOpt,
    ThreadsOpt,
    check_max_batched_tokens,
)
from llmcli.cli.stage import say
from llmcli.core.threads import apply_threads
from llmcli.errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def parse_size(text: str) -> int:
    """'1MB' -> 1000000, '512KiB' -> 524288, '2048' -> 2048 bytes."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"bad size {text!r}", "write a number of bytes with an optional unit, e.g. 1MB, 512KiB or 65536")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


@app.command()
def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind. The default answers only this machine; 0.0.0.0 opens it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        Optional[str], typer.Option("--api-key", envvar="LLMCLI_API_KEY", help="Require `Authorization: Bearer KEY` on every route but /health and the chat page at /.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Requests decoded together (continuous batching).")] = 8,
    max_batched_tokens: MaxBatchedTokensOpt = None,
    max_queue: Annotated[int, typer.Option(help="Requests allowed to wait for a batch row; more get HTTP 429.")] = 64,
    max_body: Annotated[str, typer.Option(help="Largest request body (1MB = 10^6 bytes, 1MiB = 2^20); larger gets HTTP 413.")] = "1MB",
    request_timeout: Annotated[
        float, typer.Option(help="Seconds a generation request may run (queue wait included) before it is stopped: HTTP 504, or an error event in a stream. 0 = no limit.")
    ] = 600.0,
    max_context: Annotated[Optional[int], typer.Option(help="Cap the context (tokens per sequence) below the model's; saves KV-cache memory.")] = None,
    prefix_cache_mb: PrefixCacheOpt = DEFAULT_PREFIX_CACHE_MB,
    embedding_model: Annotated[
        Optional[str], typer.Option(help=f"Encoder for /v1/embeddings when --model is a decoder. Default: {DEFAULT_ENCODER} (loaded on first use).")
    ] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="The model name clients send (default: the catalogue or file name).")] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = "none",
    threads: ThreadsOpt = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level on stderr: critical, error, warning, info, debug.")] = "warning",
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API.

    Routes: GET / (a chat page for the browser), POST /v1/completions, /v1/chat/completions (both with "stream": true as server-sent
    events), /v1/embeddings, /tokenize, /detokenize; GET /v1/models, /health (503 while the model
    loads), /metrics (Prometheus). SIGTERM stops taking requests, finishes those in flight, exits 0.
    Any OpenAI client works: base_url http://127.0.0.1:8000/v1, model smollm2-135m-instruct.
    `model` must name the route's model (the text model, or the embedding model on
    /v1/embeddings) or be left out; other names get 404 model_not_found.

    Example: llmcli serve --model smollm2-135m-instruct --port 8000
    """
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1", "use --batch-size 1 or more")
    check_max_batched_tokens(max_batched_tokens)
    if max_queue < 0:
        raise UsageError("--max-queue must be 0 or more", "use e.g. --max-queue 64")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a TCP port", "use a number in 1..65535 (0 picks a free one)")
    if max_context is not None and max_context < 2:
        raise UsageError("--max-context must be at least 2", "leave it out to use the model's context")
    if request_timeout < 0:
        raise UsageError(f"--request-timeout {request_timeout:g} is negative", "give seconds, e.g. --request-timeout 600, or 0 for no limit")
    body_limit = parse_size(max_body)
    if log_level not in ("critical", "error", "warning", "info", "debug"):
        raise UsageError(f"unknown --log-level {log_level!r}", "use critical, error, warning, info or debug")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UsageError(f"`llmcli serve` needs {exc.name}", "reinstall llmcli (pip install llmcli): fastapi and uvicorn are among its dependencies") from None
    apply_threads(threads)  # before any thread starts: the engine and loader threads inherit the count

    from llmcli.engine.backend import BackendSpec
    from llmcli.engine.batcher import bound_allocator_growth
    from llmcli.server import make_app, run_server

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        say(f"warning: serving on {host} without --api-key: anyone who can reach this address can use the model")
    bound_allocator_growth()  # before the model and the server threads allocate
    spec = BackendSpec(
        model, dtype, device, quantize, batch_size, max_queue, max_context, embedding_model, served_model_name,
        max_batched_tokens=max_batched_tokens, prefix_cache_mb=prefix_cache_mb,
    )  # fmt: skip
    application = make_app(
        lambda: spec.load_backend(say),
        model_name=spec.name,
        api_key=api_key,
        max_body=body_limit,
        embedder=lambda: spec.load_embedder(say),
        embedding_name=spec.embedding_name,
        # a model named on the command line loads at startup, so a bad one fails there; the default waits for first use
        preload_embedder=embedding_model is not None,
        request_timeout=request_timeout or None,
    )
    rc = run_server(application, host, port, notify=say, log_level=log_level)
    if rc:
        raise typer.Exit(rc)
