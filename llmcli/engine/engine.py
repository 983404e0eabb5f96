"""Engine: a plain class built from a model reference and options, holding one loaded model.

No global state, so it can live inside a Ray actor or any worker process. Commands and the
server build one Engine and feed it Requests; results come back in input order.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from llmcli.core.generate import Request
from llmcli.engine.batcher import ContinuousBatcher, Event
from llmcli.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MB, PrefixCache, model_identity


@dataclass
class Result:
    """A finished request."""

    request: Request
    generated_ids: list[int]
    finish_reason: str
    text: str  # the streamed text joined (stop strings removed)
    logprobs: list[dict] | None = None
    prompt_logprobs: list | None = None
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (or a saved --cache)


@dataclass
class _Pending:
    pieces: list[str] = field(default_factory=list)
    prompt_logprobs: list | None = None
    cached_tokens: int = 0


class ReadAhead:
    """Requests made from an iterable by a background thread, handed out as they become ready.

    A command that reads a pipe would otherwise sit in a blocking read of its input while the
    engine holds admitted requests: the first answer of an interactive pipe came only once the
    next line arrived. Here a daemon thread runs the iterable (reading, parsing, tokenizing) at
    most `depth` requests ahead, and `poll(block=False)` returns None when no request is ready.
    An exception the iterable raises comes out of poll in its place, after every request made
    before it; then poll raises StopIteration. Only the thread touches the iterable.
    """

    _END = object()

    def __init__(self, requests: Iterable[Request], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(iter(requests),), name="llmcli-read-ahead", daemon=True)
        self._thread.start()

    def _run(self, source: Iterator[Request]) -> None:
        try:
            for request in source:
                self._queue.put((request, None))
            self._queue.put((self._END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the engine's thread, which raises it in order
            self._queue.put((self._END, exc))

    def poll(self, block: bool) -> Request | None:
        """The next request; None when block is False and none is ready yet."""
        if self._done:
            raise StopIteration
        try:
            request, error = self._queue.get(block=block)
        except queue.Empty:
            return None
        if request is self._END:
            self._done = True
            if error is not None:
                raise error
            raise StopIteration
        return request


def load_model_ref(
    model: str | Path | None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    quantize: str | None = None,
    notify: Callable[[str], None] | None = None,
    default_model: str = "smollm2-135m-instruct",
):
    """A catalogue name (pulled on first use), HF directory or .gguf file, loaded through the llmcli cache."""
    from llmcli.catalog import cache_root, resolve_model_path
    from llmcli.core.loader import load_model

    path = resolve_model_path(str(model) if model is not None else None, notify or (lambda _msg: None), default=default_model)
    return load_model(path, dtype=dtype, device=device, quantize=quantize, cache_dir=cache_root())


class Engine:
    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        quantize: str | None = None,
        batch_size: int = 8,
        max_context: int | None = None,
        max_batched_tokens: int | None = None,
        notify: Callable[[str], None] | None = None,
        default_model: str = "smollm2-135m-instruct",
        prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
    ):
        self.loaded = load_model_ref(model, dtype=dtype, device=device, quantize=quantize, notify=notify, default_model=default_model)
        self.batch_size = batch_size
        self.max_context = max_context
        self.max_batched_tokens = max_batched_tokens  # each step's token budget (None: the scheduler's default)
        # shared by every batcher this engine makes: requests of later calls reuse earlier prefixes
        self.prefix_cache = PrefixCache(model_identity(self.loaded), int(prefix_cache_mb * 2**20))

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def config(self):
        return self.loaded.config

    @property
    def context_length(self) -> int:
        n = self.loaded.config.max_position_embeddings
        return min(n, self.max_context) if self.max_context else n

    def make_batcher(self, batch_size: int | None = None) -> ContinuousBatcher:
        return ContinuousBatcher(self.loaded, batch_size or self.batch_size, self.context_length, self.max_batched_tokens, self.prefix_cache)

    def iter_events(
        self,
        requests: Iterable[Request],
        batch_size: int | None = None,
        on_admit: Callable[[Request], None] | None = None,
        read_ahead: bool = False,
    ) -> Iterator[Event]:
        """Every event of every request, as produced, with continuous admission.

        Requests are pulled lazily, a few ahead of the free rows. If pulling the next request
        raises (a bad input line), the requests already admitted are finished first and their
        events delivered, then the error propagates: nothing read before it is lost. on_admit is
        called with each request as it is pulled, in order, on this thread.

        read_ahead: the requests are made on a background thread (ReadAhead), and while the
        engine has work it admits only those already made: a request still waiting for its input
        line never holds up the answers of those before it (an interactive pipe). Results do not
        depend on it: a sequence's numbers do not depend on what else shares its steps.
        """
        batcher = self.make_batcher(batch_size)
        if read_ahead:
            ahead = ReadAhead(requests, 2 * batcher.batch_size)
            poll = ahead.poll
        else:
            source = iter(requests)
            poll = lambda block: next(source)  # noqa: E731 - always blocks: the caller's iterable decides
        failure: BaseException | None = None
        exhausted = False
        while True:
            while not exhausted and failure is None and len(batcher.waiting) < batcher.batch_size - batcher.active + 1:
                try:
                    request = poll(not batcher.has_work())
                except StopIteration:
                    exhausted = True
                    break
                except Exception as exc:  # noqa: BLE001 - re-raised once the admitted requests are done
                    failure = exc
                    break
                if request is None:  # none ready: step what is admitted, look again after the step
                    break
                if on_admit is not None:
                    on_admit(request)
                batcher.add(request)
            if not batcher.has_work():
                if exhausted or failure is not None:
                    break
                continue  # nothing admitted and the input not done: the next poll blocks
            yield from batcher.step()
        if failure is not None:
            raise failure

    def iter_results(
        self,
        requests: Iterable[Request],
        batch_size: int | None = None,
        on_event: Callable[[Event], None] | None = None,
        on_admit: Callable[[Request], None] | None = None,
        read_ahead: bool = False,
    ) -> Iterator[Result]:
        """Finished requests in input order (a later one that finishes first waits for the earlier).
        on_admit and read_ahead: as iter_events."""
        order: list[Any] = []
        pending: dict[int, _Pending] = {}
        done: dict[int, Result] = {}

        def admitted(request: Request) -> None:
            order.append(id(request))
            if on_admit is not None:
                on_admit(request)

        next_index = 0
        for event in self.iter_events(requests, batch_size, on_admit=admitted, read_ahead=read_ahead):
            if on_event is not None:
                on_event(event)
            key = id(event.request)
            state = pending.setdefault(key, _Pending())
            state.pieces.append(event.text)
            if event.prompt_logprobs is not None:
                state.prompt_logprobs = event.prompt_logprobs
            if event.cached_tokens is not None:
                state.cached_tokens = event.cached_tokens
            if event.finish_reason is not None:
                done[key] = Result(
                    event.request, event.generated_ids, event.finish_reason, "".join(state.pieces), event.logprobs, state.prompt_logprobs, state.cached_tokens
                )
                del pending[key]
            while next_index < len(order) and order[next_index] in done:
                yield done.pop(order[next_index])
                next_index += 1

    def generate(self, request: Request) -> Result:
        """One request, whole."""
        return next(iter(self.iter_results([request], batch_size=1)))
