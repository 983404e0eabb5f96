"""What `llmcli generate` does with a record, in one place: its Requests (`GenerateOptions.requests`)
and its output record (`GenerateOptions.output`), used by the command's own loop and by the batch
runner's workers (`generate --ray`, `--workers`), so both write the same records."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llmcli.core.sampling_params import SamplingParams
from llmcli.errors import InputError


@dataclass(frozen=True)
class GenerateOptions:
    """generate's flags that shape requests and records (picklable: a Ray actor gets a copy)."""

    params: SamplingParams
    max_tokens: int = 128
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    samples: int = 1
    echo: bool = False
    truncate: bool = False
    grammar: Any = None  # the structured-output flags' Grammar (core/constrained.py), for records without their own
    _record_grammars: dict = field(default_factory=dict, compare=False, repr=False)  # response_format -> Grammar, compiled once

    def record_grammar(self, record: dict, number: int):
        """The record's own `response_format` (the server's shapes) compiled, or the flags' grammar."""
        from llmcli.records import RESPONSE_FORMAT

        if RESPONSE_FORMAT not in record:
            return self.grammar
        from llmcli.core.constrained import parse_response_format
        from llmcli.errors import UsageError

        key = json.dumps(record[RESPONSE_FORMAT], sort_keys=True)
        if key not in self._record_grammars:
            try:
                self._record_grammars[key] = parse_response_format(record[RESPONSE_FORMAT])
            except UsageError as exc:
                raise InputError(exc.message, exc.hint, line=number) from None
        return self._record_grammars[key]

    def prompt_ids(self, record: dict, number: int, tokenizer: Any, vocab: int, context: int) -> list[int]:
        """The record's prompt (`ids`, or `text` tokenized), checked and fitted to the context."""
        from llmcli.records import IDS, TEXT, require_ids

        if IDS in record:
            ids = require_ids(record, number, vocab_size=vocab)
        elif TEXT in record:
            if not isinstance(record[TEXT], str):
                raise InputError("`text` must be a string", None, line=number)
            ids = tokenizer.encode(record[TEXT]).ids
        else:
            raise InputError("no `ids` or `text` in the record for generate", "pipe through `llmcli tokenize` first")
        if not ids:  # the batcher refuses one too, but by then the line it came from is unknown
            raise InputError("the prompt is empty (no tokens to continue)", "give the record a non-empty `text` or `ids`", line=number)
        limit = context - 1
        if len(ids) > limit:
            if not self.truncate:
                raise InputError(
                    f"the prompt has {len(ids)} tokens but the model's context holds {context}",
                    "shorten it, or pass --truncate to keep its last tokens",
                    line=number,
                )
            ids = ids[-limit:]
        return ids

    def requests(self, record: dict, number: int, ids: list[int], prompt_cache: Any = None) -> list:
        """One Request per sample of the record (InputError for a bad `response_format`)."""
        from llmcli.core.generate import Request

        grammar = self.record_grammar(record, number)
        return [
            Request(
                id=record.get("id", number),
                prompt_ids=ids,
                params=self.params,
                max_tokens=self.max_tokens,
                min_tokens=self.min_tokens,
                stop=list(self.stop),
                stop_token_ids=list(self.stop_ids),
                ignore_eos=self.ignore_eos,
                echo=self.echo,
                sample_index=sample,
                prompt_cache=prompt_cache,
                grammar=grammar,
            )
            for sample in range(self.samples)
        ]

    def output(self, record: dict, result: Any, tokenizer: Any) -> dict:
        """The record generate writes for one finished request: the input's fields and generate's own."""
        from llmcli.records import CACHED_TOKENS, FINISH_REASON, GENERATED_IDS, LOGPROBS, PROMPT_LOGPROBS, SAMPLE

        out = dict(record)
        if self.samples > 1:
            out[SAMPLE] = result.request.sample_index
        out[GENERATED_IDS] = result.generated_ids
        out[FINISH_REASON] = result.finish_reason
        out[CACHED_TOKENS] = result.cached_tokens
        if result.logprobs is not None:
            out[LOGPROBS] = [named_logprob(tokenizer, e) for e in result.logprobs]
        if result.prompt_logprobs is not None:
            out[PROMPT_LOGPROBS] = result.prompt_logprobs
        return out


def named_logprob(tokenizer: Any, entry: dict) -> dict:
    """OpenAI-shaped logprob entry with token text beside each id."""
    out = {"token": tokenizer.id_to_token(entry["id"]), "id": entry["id"], "logprob": entry["logprob"]}
    out["top_logprobs"] = [{"token": tokenizer.id_to_token(t["id"]), "id": t["id"], "logprob": t["logprob"]} for t in entry.get("top_logprobs", [])]
    return out
