"""The request bodies the server accepts, as pydantic models in OpenAI's field names.

Unknown fields are ignored (as vLLM does), so newer clients keep working; fields that change
the meaning of a request and that llmcli cannot honour (tools, suffix, structured output) are
refused by the endpoints with a 400 naming the field. Extensions beyond OpenAI's API are
vLLM's names: top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
return_tokens_as_token_ids, add_special_tokens; and llmcli's parse_special (chat messages only:
read special-token text inside a message as special tokens, off by default).

Every string in a body must be valid Unicode: JSON lets a client send half of a surrogate pair
(`"\\ud800"`), which no tokenizer can encode and no response can echo, so it is refused here,
for every field at once, with a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from llmcli.core.sampling import MAX_LOGPROBS
from llmcli.records import find_lone_surrogate


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


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """What completions and chat completions share."""

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # vLLM's extensions
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    return_tokens_as_token_ids: bool = False


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


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


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)  # default: what the context leaves
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None
    parse_special: bool = False  # llmcli's: special-token text inside messages read as special tokens


class EmbeddingRequest(_Body):
    model: Optional[str] = None
    input: Union[str, list[str], list[int], list[list[int]]]
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
