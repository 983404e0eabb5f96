"""EngineService: one background thread that owns a ContinuousBatcher, for callers on other threads.

The batcher is not thread-safe and a forward pass must never run on an asyncio event loop, so
`chat` (interactive) and `serve` hand their requests to this service instead of stepping the
batcher themselves. The engine thread is the only one that touches the batcher: `submit` and
`cancel` only append to lists under a lock and wake the thread, which sleeps on a condition
variable while there is no work.

Each submission gets a `Handle` that delivers the request's events through a thread-safe queue,
both to blocking readers (`get`, iteration) and to asyncio readers (`aget`, `async for`).
Also here: `Embedder`, the thread-safe sentence-embedding path (mean pooling + L2 norm, as
`llmcli encode --pool mean --normalize`), and the counters that /metrics reports.
"""

from __future__ import annotations

import asyncio
import bisect
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Iterator

from llmcli.core.generate import Request
from llmcli.engine.batcher import Event
from llmcli.errors import ContextLengthError, InputError, LlmcliError


class QueueFull(LlmcliError):
    """More requests are waiting for a batch row than the service was told to queue (HTTP 429)."""


class ServiceClosed(LlmcliError):
    """The service is shutting down and takes no new requests (HTTP 503)."""


class RequestKey(str):
    """A request's `id` as the batcher sees it: a constant string, but equal only to itself.

    The batcher derives a seeded request's random stream from (seed, id, sample_index), so the id
    must not change between two calls for `seed` to reproduce a result; and it cancels by id, so
    two clients' requests must never compare equal. A str subclass gives both: json.dumps (which
    the seed derivation uses) sees the constant, `==` sees identity.
    """

    def __new__(cls, value: str = "request") -> "RequestKey":
        return super().__new__(cls, value)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    __hash__ = object.__hash__


# ---------------------------------------------------------------- counters


# seconds; from a few ms (a tiny model's step) to minutes (a long queue on a CPU)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class Histogram:
    """A Prometheus-style histogram: counts per upper bound (cumulated when rendered), sum and count."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs, ending with +Inf."""
        out, total = [], 0
        for bound, n in zip([*(f"{b:g}" for b in self.buckets), "+Inf"], self.counts):
            total += n
            out.append((bound, total))
        return out


@dataclass
class ServiceMetrics:
    """Counters since the service started. Written only by the engine thread (and submit, under its lock)."""

    requests: int = 0  # one per Request (an n=2 call counts twice)
    rejected: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> count
    failed: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    time_to_first_token: Histogram = field(default_factory=Histogram)
    time_per_output_token: Histogram = field(default_factory=Histogram)


# ---------------------------------------------------------------- handles


@dataclass
class _Failure:
    error: BaseException


class Handle:
    """The events of one submission (one or more Requests), in the order the engine made them.

    Reading stops after every request has finished. An error raised for the submission (a
    prompt the batcher refuses, a failed forward) is raised by the reader.
    """

    def __init__(self, requests: list[Request]):
        self.requests = requests
        self.key = requests[0].id
        self.submitted_at = time.perf_counter()
        self._items: queue.SimpleQueue[Event | _Failure] = queue.SimpleQueue()
        self._remaining = len(requests)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self._remaining == 0

    # engine thread side

    def _put(self, item: Event | _Failure) -> None:
        self._items.put(item)
        with self._lock:
            loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the reader's loop has closed: nobody is listening any more
                pass

    # reader side

    def _take(self, item: Event | _Failure) -> Event:
        if isinstance(item, _Failure):
            self._remaining = 0
            raise item.error
        if item.finish_reason is not None:
            self._remaining -= 1
        return item

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event (blocking), or None after `timeout` seconds or once every request is done."""
        if self.done:
            return None
        try:
            item = self._items.get(timeout=timeout)
        except queue.Empty:
            return None
        return self._take(item)

    def __iter__(self) -> Iterator[Event]:
        while not self.done:
            # a timeout keeps the wait interruptible by Ctrl-C on every platform
            event = self.get(timeout=0.1)
            if event is not None:
                yield event

    async def aget(self, timeout: float | None = None) -> Event | None:
        """The next event without blocking the event loop, or None after `timeout` / when done."""
        if self.done:
            return None
        if self._wake is None:
            with self._lock:
                self._loop = asyncio.get_running_loop()
                self._wake = asyncio.Event()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._take(self._items.get_nowait())
            except queue.Empty:
                pass
            self._wake.clear()
            # the engine thread may have put an item between the first look and clear()
            try:
                return self._take(self._items.get_nowait())
            except queue.Empty:
                pass
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return None
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                return None

    async def __aiter__(self) -> AsyncIterator[Event]:
        while not self.done:
            event = await self.aget()
            if event is not None:
                yield event


# ---------------------------------------------------------------- the service


class EngineService:
    """A ContinuousBatcher driven by one background thread; thread-safe submit / cancel / shutdown.

    batch_size: rows decoded together. max_queue: requests allowed to wait for a row; one more
    raises QueueFull (a single submission larger than max_queue is still taken when nothing waits).
    """

    def __init__(self, engine, batch_size: int | None = None, max_queue: int = 64):
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.engine = engine
        self.batch_size = batch_size or engine.batch_size
        self.max_queue = max_queue
        self.metrics = ServiceMetrics()
        self._batcher = engine.make_batcher(self.batch_size)
        self._cond = threading.Condition()
        self._incoming: list[tuple[Handle, Request]] = []
        self._cancels: list[Any] = []
        self._accepting = True
        self._stopping = False
        self._waiting = 0  # submitted, not yet in a batch row
        self._inflight = 0  # submitted, not yet finished
        # engine-thread-only state
        self._owner: dict[int, Handle] = {}  # id(Request) -> its handle
        self._started: set[int] = set()  # id(Request) of admitted requests
        self._last_event: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, name="llmcli-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public, any thread

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._inflight - self._waiting

    def submit(self, requests: Request | Iterable[Request]) -> Handle:
        reqs = [requests] if isinstance(requests, Request) else list(requests)
        if not reqs:
            raise ValueError("submit needs at least one request")
        handle = Handle(reqs)
        with self._cond:
            if not self._accepting:
                raise ServiceClosed("the server is shutting down and takes no new requests", "retry against another instance")
            if self._waiting and self._waiting + len(reqs) > self.max_queue:
                self.metrics.rejected += len(reqs)
                raise QueueFull(
                    f"{self._waiting} requests are already waiting for a batch row (the queue holds {self.max_queue})",
                    "retry later, or start the server with a larger --max-queue / --batch-size",
                )
            self._waiting += len(reqs)
            self._inflight += len(reqs)
            self.metrics.requests += len(reqs)
            self.metrics.prompt_tokens += sum(len(r.prompt_ids) for r in reqs)
            self._incoming.extend((handle, r) for r in reqs)
            self._cond.notify_all()
        return handle

    def cancel(self, target: Handle | Any) -> None:
        """Stop a submission (a Handle, or a request id) wherever it is; its rows are free on the next step."""
        key = target.key if isinstance(target, Handle) else target
        if isinstance(target, Handle) and target.done:
            return
        with self._cond:
            self._cancels.append(key)
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._inflight:
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    return False
                self._cond.wait(wait if wait is not None else 0.5)
        return True

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; finish what is in flight (drain) or cancel it; then stop the thread."""
        with self._cond:
            self._accepting = False
            if not drain:
                # list() copies the engine thread's dict in one step (atomic under the GIL)
                handles = [h for h, _ in self._incoming] + list(self._owner.values())
                self._cancels.extend({id(h.key): h.key for h in handles}.values())
            self._cond.notify_all()
        self.wait_idle(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._incoming or self._cancels or self._batcher.has_work() or self._stopping):
                    self._cond.notify_all()  # idle: wake wait_idle()
                    self._cond.wait()
                if self._stopping and not (self._incoming or self._batcher.has_work()):
                    self._cond.notify_all()
                    return
                incoming, self._incoming = self._incoming, []
                cancels, self._cancels = self._cancels, []
            for handle, req in incoming:
                self._add(handle, req)
            for key in cancels:
                self._cancel(key)
            if not self._batcher.has_work():
                continue
            try:
                events = self._batcher.step()
            except Exception as exc:  # noqa: BLE001 - one bad step must not kill the server: fail its requests, start over
                self._fail_all(exc)
                continue
            self._deliver(events)

    def _add(self, handle: Handle, req: Request) -> None:
        try:
            self._batcher.add(req)
        except LlmcliError as exc:
            self._fail_request(handle, req, exc)
            return
        self._owner[id(req)] = handle

    def _cancel(self, key: Any) -> None:
        # waiting requests leave the batcher silently: tell their readers here
        queued = [r for r in self._batcher.waiting if r.id == key]
        events = self._batcher.cancel(key)
        events += [Event(r, None, "", finish_reason="cancelled") for r in queued]
        self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        now = time.perf_counter()
        finished = 0
        admitted = 0
        out: list[tuple[Handle, Event]] = []
        for event in events:
            rid = id(event.request)
            handle = self._owner.get(rid)
            if handle is None:
                continue
            if rid not in self._started:
                self._started.add(rid)
                admitted += 1
                if event.finish_reason != "cancelled":
                    self.metrics.time_to_first_token.observe(now - handle.submitted_at)
            elif event.finish_reason != "cancelled":
                self.metrics.time_per_output_token.observe(now - self._last_event.get(rid, now))
            self._last_event[rid] = now
            if event.finish_reason is not None:
                reason = event.finish_reason
                self.metrics.finished[reason] = self.metrics.finished.get(reason, 0) + 1
                self.metrics.generation_tokens += len(event.generated_ids)
                del self._owner[rid]
                self._started.discard(rid)
                self._last_event.pop(rid, None)
                finished += 1
            out.append((handle, event))
        if finished or admitted:
            # counts first, events after: a reader that has seen its first event must find the queue shorter
            with self._cond:
                self._waiting -= admitted
                self._inflight -= finished
                self._cond.notify_all()
        for handle, event in out:
            handle._put(event)

    def _fail_request(self, handle: Handle, req: Request, exc: BaseException) -> None:
        self.metrics.failed += 1
        with self._cond:
            self._waiting -= 1
            self._inflight -= 1
            self._cond.notify_all()
        handle._put(_Failure(exc))
        if len(handle.requests) > 1:
            self._cancel(handle.key)  # the submission has failed as a whole: free its other rows

    def _fail_all(self, exc: Exception) -> None:
        error = exc if isinstance(exc, LlmcliError) else LlmcliError(f"generation failed: {type(exc).__name__}: {exc}", "this is a bug in llmcli; please report it")
        owners = list(self._owner.items())
        self._owner.clear()
        with self._cond:
            self._waiting -= sum(1 for rid, _ in owners if rid not in self._started)
            self._inflight -= len(owners)
            self.metrics.failed += len(owners)
            self._cond.notify_all()
        self._started.clear()
        self._last_event.clear()
        # the failed step may have left rows half-written: a fresh batcher (and cache) is the safe state
        self._batcher = self.engine.make_batcher(self.batch_size)
        for handle in {id(h): h for _, h in owners}.values():
            handle._put(_Failure(error))


# ---------------------------------------------------------------- embeddings


class Embedder:
    """Sentence embeddings from an encoder: mean pooling over the real tokens, then L2 norm.

    The same math as `llmcli encode --pool mean --normalize`; inputs of one call are padded to
    the longest and masked, which gives each the same vector as alone. A lock serialises calls
    so that concurrent HTTP requests do not fight over the CPU cores mid-forward.
    """

    def __init__(self, loaded):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One normalized vector per input id list."""
        import torch

        from llmcli.core.pooling import normalize, pad_batch, pool

        vocab = self.config.vocab_size
        for i, ids in enumerate(inputs):
            if not ids:
                raise InputError(f"input {i} is empty", "give a non-empty string or list of token ids")
            if len(ids) > self.context_length:
                raise ContextLengthError(
                    f"input {i} has {len(ids)} tokens but the embedding model's context holds {self.context_length}",
                    "split the text into shorter pieces",
                )
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InputError(f"token id {bad[0]} in input {i} is outside the vocabulary (0..{vocab - 1})", "use ids from the embedding model's tokenizer")
        x, mask = pad_batch(inputs, self.tokenizer.pad_token_id or 0, self.loaded.device)  # (B, T)
        with self._lock, torch.inference_mode():
            hidden = self.loaded.module(x, attention_mask=mask, compute_logits=False).last_hidden  # (B, T, d)
            vectors = normalize(pool(hidden.float(), mask, "mean"))  # (B, d)
        return vectors.cpu().tolist()
