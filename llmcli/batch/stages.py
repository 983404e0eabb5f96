"""The stage commands' records as batch jobs: `generate` and `encode` with `--ray` / `--workers` /
`--resume` run these workers through the same runner as `llmcli batch`, and write the records the
command writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmcli.batch.job import Done, Item
from llmcli.engine.encode_records import EncodeOptions
from llmcli.engine.generate_records import GenerateOptions
from llmcli.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MB
from llmcli.errors import InputError


@dataclass(frozen=True)
class StageSpec:
    """A batch worker's description of a stage command: its record options (GenerateOptions or
    EncodeOptions), the model and its load options."""

    options: GenerateOptions | EncodeOptions
    model: str | None
    dtype: str = "float32"
    device: str = "cpu"
    quantize: str = "none"
    batch_size: int = 8
    skip_errors: bool = False
    default_model: str = "smollm2-135m-instruct"
    max_batched_tokens: int | None = None  # None: the scheduler's default
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB

    @property
    def kind(self) -> str:
        return "generate" if isinstance(self.options, GenerateOptions) else "encode"

    def make_worker(self) -> "GenerateWorker | EncodeWorker":
        return GenerateWorker(self) if isinstance(self.options, GenerateOptions) else EncodeWorker(self)


class GenerateWorker:
    """One Engine; `run(items)` generates for a chunk of records with continuous batching."""

    def __init__(self, spec: StageSpec):
        from llmcli.engine.engine import Engine

        self.spec = spec
        self.engine = Engine(
            spec.model, dtype=spec.dtype, device=spec.device, quantize=spec.quantize, batch_size=spec.batch_size, default_model=spec.default_model,
            max_batched_tokens=spec.max_batched_tokens, prefix_cache_mb=spec.prefix_cache_mb,
        )  # fmt: skip

    def run(self, items: list[Item]) -> list[Done]:
        engine, options = self.engine, self.spec.options
        assert isinstance(options, GenerateOptions)
        tokenizer, vocab, context = engine.tokenizer, engine.config.vocab_size, engine.context_length
        owner: dict[int, Any] = {}
        requests = []
        done: dict[int, Done] = {}
        for item in items:
            try:
                ids = options.prompt_ids(item.record, item.line, tokenizer, vocab, context)
                item_requests = options.requests(item.record, item.line, ids)
            except InputError as exc:
                if exc.line is None:
                    exc.line = item.line
                if not self.spec.skip_errors:
                    raise
                done[item.index] = Done(item.index, [], 0, True)  # skipped: no output record, counted as an error
                continue
            done[item.index] = Done(item.index, [], 0, False)
            for req in item_requests:
                owner[id(req)] = item
                requests.append(req)
        for result in engine.iter_results(requests):
            item = owner.pop(id(result.request))
            entry = done[item.index]
            entry.record.append(options.output(item.record, result, tokenizer))
            entry.tokens += len(result.generated_ids)
        return [done[item.index] for item in items]


class EncodeWorker:
    """One loaded model; `run(items)` encodes a chunk of records, --batch-size records per call as encode reads them."""

    def __init__(self, spec: StageSpec):
        from llmcli.engine.engine import load_model_ref

        self.spec = spec
        self.loaded = load_model_ref(spec.model, dtype=spec.dtype, device=spec.device, quantize=spec.quantize, default_model=spec.default_model)

    def run(self, items: list[Item]) -> list[Done]:
        options, size = self.spec.options, self.spec.batch_size
        assert isinstance(options, EncodeOptions)
        done: list[Done] = []
        for start in range(0, len(items), size):
            group = items[start : start + size]
            for item, result in zip(group, options.encode(self.loaded, [(item.record, item.line) for item in group])):
                if isinstance(result, InputError):
                    if result.line is None:
                        result.line = item.line
                    if not self.spec.skip_errors:
                        raise result
                    done.append(Done(item.index, [], 0, True))  # skipped: no output record, counted as an error
                else:
                    done.append(Done(item.index, [result], options.tokens(result), False))
        return done
