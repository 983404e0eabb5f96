"""GET /metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

The engine service keeps the generation counters; the app keeps HTTP counters. Written by hand
rather than with prometheus_client because that library keeps a process-global registry, and
tests build several apps in one process.
"""

from __future__ import annotations

import threading
from collections import Counter

from llmcli.engine.service import EngineService, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HttpCounters:
    """Responses by method, route and status, and failed model requests; updated from the event loop and the threadpool."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str, int]] = Counter()
        self.failed = 0  # model requests answered with an error that the engine did not count

    def fail(self) -> None:
        with self._lock:
            self.failed += 1

    def add(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self._counts[(method, path, status)] += 1

    def items(self) -> list[tuple[tuple[str, str, int], int]]:
        with self._lock:
            return sorted(self._counts.items())


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Writer:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str) -> None:
        self.lines.append(f"# HELP {name} {help}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: object) -> None:
        text = ",".join(f'{k}="{_label(str(v))}"' for k, v in labels.items())
        # integers whole (a byte count in %g would lose its last digits), floats in %g
        shown = str(value) if isinstance(value, int) else f"{value:g}"
        self.lines.append(f"{name}{{{text}}} {shown}" if text else f"{name} {shown}")

    def histogram(self, name: str, help: str, hist: Histogram) -> None:
        self.family(name, "histogram", help)
        for le, count in hist.cumulative():
            self.sample(f"{name}_bucket", count, le=le)
        self.sample(f"{name}_sum", hist.sum)
        self.sample(f"{name}_count", hist.count)


def _prefix_cache(w: _Writer, cache) -> None:
    """vLLM's prefix_cache_queries / prefix_cache_hits (in tokens), and what the cache holds."""
    stats = cache.stats
    w.family("llmcli_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.")
    w.sample("llmcli_prefix_cache_queries_total", stats.queries)
    w.family("llmcli_prefix_cache_hits_total", "counter", "Prompt tokens whose keys and values came from the prefix cache.")
    w.sample("llmcli_prefix_cache_hits_total", stats.hits)
    w.family("llmcli_prefix_cache_hit_rate", "gauge", "Hits over queries since the start (0 before any query).")
    w.sample("llmcli_prefix_cache_hit_rate", stats.hit_rate)
    w.family("llmcli_prefix_cache_evictions_total", "counter", "Blocks evicted (least recently used) to stay under --prefix-cache-mb.")
    w.sample("llmcli_prefix_cache_evictions_total", stats.evictions)
    w.family("llmcli_prefix_cache_blocks", "gauge", "Blocks of tokens held now.")
    w.sample("llmcli_prefix_cache_blocks", len(cache.blocks))
    w.family("llmcli_prefix_cache_bytes", "gauge", "Bytes of keys and values held now.")
    w.sample("llmcli_prefix_cache_bytes", cache.bytes_used)
    w.family("llmcli_prefix_cache_capacity_bytes", "gauge", "The bound, --prefix-cache-mb in bytes (0: the cache is off).")
    w.sample("llmcli_prefix_cache_capacity_bytes", cache.capacity_bytes)


def render(service: EngineService | None, http: HttpCounters, model: str, loaded: bool, draining: bool) -> str:
    w = _Writer()
    w.family("llmcli_model_loaded", "gauge", "1 once the model is loaded and the server answers generation requests.")
    w.sample("llmcli_model_loaded", 1 if loaded else 0, model=model)
    w.family("llmcli_draining", "gauge", "1 after SIGTERM: new requests get 503 while those in flight finish.")
    w.sample("llmcli_draining", 1 if draining else 0)
    if service is not None:
        m = service.metrics
        w.family("llmcli_requests_total", "counter", "Generation requests accepted (one per choice: n=2 counts twice).")
        w.sample("llmcli_requests_total", m.requests)
        w.family("llmcli_requests_rejected_total", "counter", "Generation requests refused because the queue was full (HTTP 429).")
        w.sample("llmcli_requests_rejected_total", m.rejected)
        w.family("llmcli_requests_finished_total", "counter", "Generation requests finished, by finish reason (cancelled: the client went away).")
        for reason in ("stop", "length", "cancelled", *sorted(set(m.finished) - {"stop", "length", "cancelled"})):
            w.sample("llmcli_requests_finished_total", m.finished.get(reason, 0), reason=reason)
        w.family("llmcli_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.")
        w.sample("llmcli_prompt_tokens_total", m.prompt_tokens)
        w.family("llmcli_generation_tokens_total", "counter", "Tokens generated by finished requests.")
        w.sample("llmcli_generation_tokens_total", m.generation_tokens)
        w.family("llmcli_queue_depth", "gauge", "Requests waiting for a batch row.")
        w.sample("llmcli_queue_depth", service.queue_depth)
        w.family("llmcli_requests_running", "gauge", "Requests in a batch row now.")
        w.sample("llmcli_requests_running", service.running)
        w.family("llmcli_batch_size", "gauge", "Rows decoded together.")
        w.sample("llmcli_batch_size", service.batch_size)
        w.histogram("llmcli_time_to_first_token_seconds", "From submission to the first generated token.", m.time_to_first_token)
        w.histogram("llmcli_time_per_output_token_seconds", "Between consecutive tokens of one request.", m.time_per_output_token)
        prefix_cache = getattr(service.engine, "prefix_cache", None)
        if prefix_cache is not None:
            _prefix_cache(w, prefix_cache)
    w.family(
        "llmcli_requests_failed_total",
        "counter",
        "Requests that ended in an error: model requests answered with a 4xx/5xx status (but 429, counted as rejected), "
        "and generation requests that failed after they were accepted (one per choice).",
    )
    w.sample("llmcli_requests_failed_total", http.failed + (service.metrics.failed if service is not None else 0))
    w.family("llmcli_http_requests_total", "counter", "HTTP responses by method, route and status.")
    for (method, path, status), count in http.items():
        w.sample("llmcli_http_requests_total", count, method=method, path=path, status=status)
    return "\n".join(w.lines) + "\n"
