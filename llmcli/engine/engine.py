"""Engine: a plain class built from a model reference and options, holding one loaded model.

No global state, so it can live inside a Ray actor or any worker process. Commands and the
server build one Engine and feed it Requests; results come back in input order.
"""

from __future__ import annotations

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

    def iter_events(self, requests: Iterable[Request], batch_size: int | None = None) -> Iterator[Event]:
        """Every event of every request, as produced, with continuous admission.

        Requests are pulled lazily, a few ahead of the free rows. If pulling the next request
        raises (a bad input line), the requests already admitted are finished first and their
        events delivered, then the error propagates: nothing read before it is lost.
        """
        batcher = self.make_batcher(batch_size)
        source = iter(requests)
        failure: BaseException | None = None
        exhausted = False
        while True:
            while not exhausted and failure is None and len(batcher.waiting) < batcher.batch_size - batcher.active + 1:
                try:
                    batcher.add(next(source))
                except StopIteration:
                    exhausted = True
                except Exception as exc:  # noqa: BLE001 - re-raised once the admitted requests are done
                    failure = exc
            if not batcher.has_work():
                break
            yield from batcher.step()
        if failure is not None:
            raise failure

    def iter_results(self, requests: Iterable[Request], batch_size: int | None = None, on_event: Callable[[Event], None] | None = None) -> Iterator[Result]:
        """Finished requests in input order (a later one that finishes first waits for the earlier)."""
        order: list[Any] = []
        pending: dict[int, _Pending] = {}
        done: dict[int, Result] = {}

        def tracked(reqs: Iterable[Request]) -> Iterator[Request]:
            for req in reqs:
                order.append(id(req))
                yield req

        next_index = 0
        for event in self.iter_events(tracked(requests), batch_size):
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
