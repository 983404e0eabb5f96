"""The request bodies the server accepts, as pydantic models in OpenAI's field names.

Unknown fields are ignored (as vLLM does), so newer clients keep working; fields that change
the meaning of a request and that llmcli cannot honour (suffix, best_of) are refused by the
endpoints with a 400 naming the field. `response_format` (both endpoints) takes OpenAI's
json_object / json_schema and llmcli's regex / choice / grammar (core/constrained.py); `tools`,
`tool_choice` and `parallel_tool_calls` are server/tools.py's. Extensions beyond OpenAI's API are
vLLM's names: top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
return_tokens_as_token_ids, add_special_tokens; and llmcli's parse_special (chat messages only:
read special-token text inside a message as special tokens, off by default).

Every string in a body must be valid Unicode: JSON lets a client send half of a surrogate pair
(`"\\ud800"`), which no tokenizer can encode and no response can echo, so it is refused here,
for every field at once, with a 400 naming the field.

The sampling knobs (temperature, top_p, ..., seed) are not listed here: they are SamplingParams'
knob fields, with the ranges declared there, and `to_sampling_params()` turns a request into the
engine's settings.
"""

from __future__ import annotations

import typing
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic_core import PydanticCustomError

from llmcli.core.sampling_params import MAX_LOGPROBS, SamplingParams
from llmcli.errors import UsageError
from llmcli.records import find_lone_surrogate
from llmcli.server.errors import ApiError, api_error_from


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*")
    @classmethod
    def _no_lone_surrogates(cls, value: Any) -> Any:
        # content parts are models inside a union (see ContentPart): checked here as plain data
        plain = [part.model_dump() if isinstance(part, ContentPart) else part for part in value] if isinstance(value, list) else value
        found = find_lone_surrogate(plain)
        if found is not None:
            where, char = found
            raise PydanticCustomError(
                "lone_surrogate",
                "the string{where} holds a lone surrogate (U+{code}), which is not valid Unicode; "
                "send UTF-8 text, where a \\uD800-\\uDFFF escape is only valid as half of a surrogate pair",
                {"where": f" at {where}" if where else "", "code": f"{ord(char):04X}"},
            )
        return value


TextsOrIds = Union[str, list[str], list[int], list[list[int]]]


def as_items(value: TextsOrIds) -> list[Union[str, list[int]]]:
    """OpenAI's `prompt` / `input`: one text, one list of token ids, or a list of either, as a list of items."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(x, int) for x in value):
        return [value]  # type: ignore[list-item]
    return list(value)  # type: ignore[arg-type]


class StreamOptions(_Body):
    include_usage: bool = False


def _knob_fields() -> dict[str, Any]:
    """One optional field per sampling knob, with the API's range, as SamplingParams declares them."""
    hints = typing.get_type_hints(SamplingParams)
    fields: dict[str, Any] = {}
    for f in SamplingParams.knobs():
        kind = hints[f.name]
        if typing.get_origin(kind) is dict:
            kind = dict[str, float]  # JSON object keys are strings: {"42": -100}
        fields[f.name] = (Optional[kind], Field(None, **f.metadata["bounds"]))
    return fields


# temperature, top_p, top_k, min_p, penalties, logit_bias, seed: declared by SamplingParams (core/sampling_params.py)
_Knobs = create_model("_Knobs", __base__=_Body, **_knob_fields())


class _Sampling(_Knobs):
    """What completions and chat completions share: the sampling knobs and the other per-request settings."""

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    user: Optional[str] = None
    # vLLM's extensions
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    return_tokens_as_token_ids: bool = False

    def logprobs_k(self) -> int | None:
        """Alternatives to report per token: None for no logprobs."""
        raise NotImplementedError

    def max_new_tokens(self) -> int | None:
        raise NotImplementedError

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def to_sampling_params(self, vocab: int) -> SamplingParams:
        """The engine's SamplingParams: a field left out gets OpenAI's default (temperature 1), token ids are checked against the vocabulary."""
        values = {}
        for f in SamplingParams.knobs():
            value = getattr(self, f.name)
            if value is None:
                value = f.metadata["api_default"] if f.metadata["api_default"] is not None else SamplingParams.knob_default(f)
            values[f.name] = value
        for key in values["logit_bias"]:
            try:
                token = int(key)
            except ValueError:
                raise ApiError(400, f"logit_bias key {key!r} is not a token id", "invalid_request_error", "logit_bias") from None
            if not 0 <= token < vocab:
                raise ApiError(400, f"logit_bias token id {token} is outside the vocabulary (0..{vocab - 1})", "invalid_request_error", "logit_bias")
        for token in self.stop_token_ids or []:
            if not 0 <= token < vocab:
                raise ApiError(400, f"stop token id {token} is outside the vocabulary (0..{vocab - 1})", "invalid_request_error", "stop_token_ids")
        try:
            return SamplingParams(**values, logprobs=self.logprobs_k())
        except UsageError as exc:
            raise api_error_from(exc) from None


class CompletionRequest(_Sampling):
    prompt: TextsOrIds
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    response_format: Optional[dict[str, Any]] = None

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class ContentPart(BaseModel):
    # not a _Body: it sits inside a union, where pydantic would report its own check once per
    # union member; ChatMessage checks the parts' text instead, as part of `content`
    model_config = ConfigDict(extra="ignore")

    type: str
    text: Optional[str] = None


class ChatMessage(_Body):
    role: str
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # an assistant turn's calls, sent back by the client
    tool_call_id: Optional[str] = None  # a tool turn: the call it answers


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)  # default: what the context leaves
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None
    parse_special: bool = False  # llmcli's: special-token text inside messages read as special tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class EmbeddingRequest(_Body):
    model: Optional[str] = None
    input: TextsOrIds
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


class TokenizeRequest(_Body):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    parse_special: bool = False


class DetokenizeRequest(_Body):
    model: Optional[str] = None
    tokens: list[int]
