"""`llmcli bench serve URL`: a load generator for any OpenAI-compatible server (llmcli serve,
llama-server, vLLM), reporting what `vllm bench serve` reports, with its definitions:

- TTFT: from sending a request to its first chunk with text;
- ITL: the gap between two consecutive chunks with text (one sample per gap, all requests pooled);
- TPOT: per request, (latency - TTFT) / (output tokens - 1), the first token excluded; requests
  with one output token have none;
- E2EL: from sending a request to its last chunk with text;
- throughput: completed requests, output tokens and all tokens (prompt + output) per second of
  the whole run; failed requests count as errors, in no latency.

Requests stream (`"stream": true`, with `stream_options.include_usage` for the token counts) and
arrive all at once (--request-rate inf) or as a Poisson process (seeded), with at most
--max-concurrency in flight. Prompts come from a JSONL file or are synthetic (--input-len words).
Percentiles are linear between the closest ranks (numpy's default).
The table goes to stderr, the JSON summary to stdout (or -o FILE).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer
from typing_extensions import Annotated

from llmcli.errors import InputError, UsageError

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)", "itl": "Inter-token latency", "e2el": "End-to-end latency"}
# short, common words: about one token each for the usual tokenizers
WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an they which one you were all we her she there would "
    "their will when who him been has more if no out do so can what up said about other into than its time only could new them man some these "
    "then two first may any like now my such make over our even most me state after also made many did must before back see through way where"
).split()


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds."""

    ok: bool = False
    start: float = 0.0  # when it was sent, from the start of the run
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Prompt:
    body: dict  # the request body without the streaming fields
    prompt_tokens: int = 0  # as the file or the generator knows it (the server's usage wins)


# ---------------------------------------------------------------- the math


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between the closest ranks (numpy.percentile's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def tpot(result: RequestResult) -> float | None:
    """Time per output token after the first, or None for a request with fewer than two."""
    if result.output_tokens < 2:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def summarize(results: list[RequestResult], duration: float, percentiles: tuple[int, ...] = PERCENTILES) -> dict[str, Any]:
    """vLLM's summary keys: counts, throughputs, and mean/median/std/pNN of each metric in ms."""
    done = [r for r in results if r.ok]
    samples = {
        "ttft": [r.ttft for r in done],
        "tpot": [t for t in (tpot(r) for r in done) if t is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.latency for r in done],
    }
    inputs = sum(r.prompt_tokens for r in done)
    outputs = sum(r.output_tokens for r in done)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    out: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": inputs,
        "total_output_tokens": outputs,
        "request_throughput": len(done) / duration if duration > 0 else math.nan,
        "output_throughput": outputs / duration if duration > 0 else math.nan,
        "total_token_throughput": (inputs + outputs) / duration if duration > 0 else math.nan,
        "errors": errors,
    }
    for name in METRICS:
        values = [v * 1000 for v in samples[name]]
        out[f"mean_{name}_ms"] = statistics.fmean(values) if values else math.nan
        out[f"median_{name}_ms"] = statistics.median(values) if values else math.nan
        out[f"std_{name}_ms"] = statistics.pstdev(values) if values else math.nan
        for q in percentiles:
            out[f"p{q}_{name}_ms"] = percentile(values, q)
    return out


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """When each request is sent, in seconds from the start: all at 0 for an infinite rate, else a
    Poisson process (exponential gaps of mean 1/rate) drawn from `seed`."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ---------------------------------------------------------------- prompts


def synthetic_prompts(n: int, input_len: int, output_len: int, seed: int) -> list[Prompt]:
    """n prompts of input_len random common words (about as many tokens), each asking for output_len tokens."""
    rng = random.Random(seed)
    return [Prompt({"prompt": " ".join(rng.choice(WORDS) for _ in range(input_len)), "max_tokens": output_len}, input_len) for _ in range(n)]


def load_prompts(path: str, n: int, output_len: int) -> list[Prompt]:
    """Records with `prompt` or `text` (a string) or `messages` (chat), optional `max_tokens`; cycled to n."""
    source = Path(path)
    if not source.is_file():
        raise UsageError(f"no prompt file {path}", "give a JSONL file with one {\"prompt\": ...} or {\"messages\": [...]} per line")
    prompts = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not JSON ({exc.msg})", "write one JSON object per line", line=number) from None
        if not isinstance(record, dict):
            raise InputError(f"{path}: a record must be a JSON object", "write one JSON object per line", line=number)
        text = record.get("prompt", record.get("text"))
        if isinstance(text, str):
            body: dict = {"prompt": text}
        elif isinstance(record.get("messages"), list):
            body = {"messages": record["messages"]}
        else:
            raise InputError(f"{path}: the record has no `prompt`, `text` or `messages`", 'give {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]}', line=number)
        body["max_tokens"] = int(record.get("max_tokens", output_len))
        prompts.append(Prompt(body))
    if not prompts:
        raise InputError(f"{path} holds no records", "give one JSON object per line")
    return [prompts[i % len(prompts)] for i in range(n)]


def request_body(prompt: Prompt, endpoint: str, model: str | None, extra: dict) -> dict:
    """The JSON sent: a completions body, or a chat body (a plain prompt becomes one user message)."""
    body = dict(prompt.body)
    if endpoint.endswith("/chat/completions") and "prompt" in body:
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    elif not endpoint.endswith("/chat/completions") and "messages" in body:
        raise UsageError(f"a prompt file record has `messages`, which {endpoint} does not take", "use --endpoint /v1/chat/completions")
    if model is not None:
        body["model"] = model
    body.update(extra)
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    return body


# ---------------------------------------------------------------- the client


def _chunk_text(payload: dict) -> str:
    text = ""
    for choice in payload.get("choices") or []:
        delta = choice.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        text += piece or ""
    return text


async def send(client, url: str, body: dict, headers: dict, prompt_tokens: int = 0, epoch: float = 0.0) -> RequestResult:
    """One streamed request; never raises (a failure is a result with `error`). epoch: the run's start (perf_counter)."""
    start = time.perf_counter()
    result = RequestResult(prompt_tokens=prompt_tokens, start=start - epoch if epoch else 0.0)
    last = start
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                raw = (await response.aread()).decode("utf-8", "replace")
                try:
                    message = json.loads(raw)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = raw.strip()[:200]
                result.error = f"HTTP {response.status_code}: {message}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                payload = json.loads(data)
                if "error" in payload:
                    result.error = f"stream error: {payload['error'].get('message', payload['error'])}"
                    return result
                if payload.get("usage"):
                    result.prompt_tokens = payload["usage"].get("prompt_tokens", result.prompt_tokens)
                    result.output_tokens = payload["usage"].get("completion_tokens", 0)
                if _chunk_text(payload):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
    except Exception as exc:  # noqa: BLE001 - a load test counts every failure and goes on
        result.error = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        return result
    if chunks == 0:
        result.error = "no text in the response"
        return result
    result.output_tokens = result.output_tokens or chunks  # a server without usage: one token per chunk
    result.latency = last - start
    result.ok = True
    return result


async def run_load(
    base_url: str,
    prompts: list[Prompt],
    *,
    endpoint: str = "/v1/chat/completions",
    model: str | None = None,
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    seed: int = 0,
    extra: dict | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> tuple[list[RequestResult], float]:
    """Send every prompt on its schedule; the results (in prompt order) and the run's duration in seconds."""
    import httpx

    url = base_url.rstrip("/") + endpoint
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    bodies = [request_body(p, endpoint, model, extra or {}) for p in prompts]
    offsets = arrival_offsets(len(prompts), request_rate, seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    connections = httpx.Limits(max_connections=max_concurrency or len(prompts) or 1, max_keepalive_connections=max_concurrency or len(prompts) or 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=connections) as client:
        start = time.perf_counter()

        async def one(i: int) -> RequestResult:
            delay = start + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if limit is None:
                return await send(client, url, bodies[i], headers, prompts[i].prompt_tokens, start)
            async with limit:
                return await send(client, url, bodies[i], headers, prompts[i].prompt_tokens, start)

        results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        duration = time.perf_counter() - start
    return list(results), duration


async def served_model(base_url: str, api_key: str | None) -> str | None:
    """The first model GET /v1/models lists (None when the server lists none or has no such route)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
        data = r.json().get("data") or []
        return data[0]["id"] if r.status_code == 200 and data else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return None


# ---------------------------------------------------------------- the report


def render_table(summary: dict, config: dict) -> Any:
    from rich.table import Table

    table = Table(title=f"Serving benchmark: {config['url']}{config['endpoint']}", show_header=True, header_style="bold")
    table.add_column("metric")
    for column in ("mean", "median", *(f"p{q}" for q in config["percentiles"])):
        table.add_column(column, justify="right")
    for name in METRICS:
        cells = [summary[f"{k}_{name}_ms"] for k in ("mean", "median", *(f"p{q}" for q in config["percentiles"]))]
        table.add_row(f"{METRIC_NAMES[name]} (ms)", *("-" if math.isnan(v) else f"{v:.1f}" for v in cells))
    table.caption = (
        f"{summary['completed']} completed, {summary['failed']} failed in {summary['duration']:.2f} s; "
        f"{summary['request_throughput']:.2f} req/s, {summary['output_throughput']:.1f} output tok/s, "
        f"{summary['total_token_throughput']:.1f} total tok/s ({summary['total_input_tokens']} prompt + {summary['total_output_tokens']} output tokens)"
    )
    return table


def _json_safe(value: Any) -> Any:
    # JSON has no NaN: a metric with no samples is null
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def bench_serve(
    url: Annotated[str, typer.Argument(help="The server's base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine).")],
    endpoint: Annotated[str, typer.Option(help="/v1/chat/completions or /v1/completions.")] = "/v1/chat/completions",
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="The `model` sent. Default: the first one GET /v1/models lists.")] = None,
    num_prompts: Annotated[int, typer.Option("--num-prompts", "-N", help="Requests to send.")] = 32,
    request_rate: Annotated[float, typer.Option(help="Requests per second, as a Poisson process; inf sends them all at once.")] = math.inf,
    max_concurrency: Annotated[Optional[int], typer.Option(help="Most requests in flight at once (default: no limit).")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="JSONL prompts: {\"prompt\"|\"text\": ...} or {\"messages\": [...]}, optional max_tokens; cycled.")] = None,
    input_len: Annotated[int, typer.Option(help="Synthetic prompts: words per prompt (about as many tokens).")] = 128,
    output_len: Annotated[int, typer.Option(help="max_tokens per request (unless the record gives its own).")] = 64,
    ignore_eos: Annotated[bool, typer.Option(help="Send ignore_eos (vLLM's and llmcli's extension) so every reply is output-len tokens long.")] = True,
    temperature: Annotated[float, typer.Option(help="Sampling temperature sent.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic prompts and of the Poisson arrivals.")] = 0,
    percentiles: Annotated[str, typer.Option(help="Percentiles to report, comma-separated.")] = "50,90,99",
    timeout: Annotated[float, typer.Option(help="Seconds one request may take before it counts as an error.")] = 600.0,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="OPENAI_API_KEY", help="Sent as `Authorization: Bearer KEY`.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the JSON summary to FILE instead of stdout.")] = None,
) -> None:
    """Load-test an OpenAI-compatible server: TTFT, TPOT, ITL and end-to-end latency percentiles, and throughput, as `vllm bench serve` reports them.

    Works against llmcli serve, llama-server or vLLM. The table goes to stderr, the JSON summary to stdout (or -o).

    Example: llmcli bench serve http://127.0.0.1:8000 -N 64 --max-concurrency 16 --input-len 120 --output-len 64
    """
    from rich.console import Console

    from llmcli.cli.bench import parse_int_list

    if num_prompts < 1:
        raise UsageError(f"--num-prompts {num_prompts} is below 1", "send at least one request")
    if not request_rate > 0:
        raise UsageError(f"--request-rate {request_rate:g} is not positive", "give requests per second, or inf to send them all at once")
    if max_concurrency is not None and max_concurrency < 1:
        raise UsageError(f"--max-concurrency {max_concurrency} is below 1", "give 1 or more, or leave it out for no limit")
    if input_len < 1 or output_len < 1:
        raise UsageError("--input-len and --output-len must be at least 1", "e.g. --input-len 128 --output-len 64")
    if endpoint not in ("/v1/chat/completions", "/v1/completions"):
        raise UsageError(f"unknown --endpoint {endpoint}", "use /v1/chat/completions or /v1/completions")
    qs = tuple(parse_int_list(percentiles, "--percentiles", 0))
    if any(q > 100 for q in qs):
        raise UsageError(f"--percentiles {percentiles}: a percentile is at most 100", "e.g. --percentiles 50,90,99")
    base = url.rstrip("/")
    base = base[: -len("/v1")] if base.endswith("/v1") else base
    if not base.startswith(("http://", "https://")):
        raise UsageError(f"{url} is not an http(s) URL", "e.g. http://127.0.0.1:8000")
    prompts = load_prompts(dataset, num_prompts, output_len) if dataset else synthetic_prompts(num_prompts, input_len, output_len, seed)
    extra: dict[str, Any] = {"temperature": temperature}
    if ignore_eos:
        extra["ignore_eos"] = True

    async def main() -> tuple[str | None, list[RequestResult], float]:
        name = model or await served_model(base, api_key)
        results, duration = await run_load(
            base, prompts, endpoint=endpoint, model=name, request_rate=request_rate, max_concurrency=max_concurrency, seed=seed, extra=extra, api_key=api_key, timeout=timeout
        )
        return name, results, duration

    name, results, duration = asyncio.run(main())
    summary = summarize(results, duration, qs)
    config = {
        "url": base,
        "endpoint": endpoint,
        "model": name,
        "num_prompts": num_prompts,
        "request_rate": None if math.isinf(request_rate) else request_rate,
        "max_concurrency": max_concurrency,
        "input": dataset or f"synthetic: {input_len} words",
        "output_len": output_len,
        "seed": seed,
        "percentiles": list(qs),
    }
    Console(stderr=True).print(render_table(summary, config))
    text = json.dumps(_json_safe({**config, **summary}), indent=2) + "\n"
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
