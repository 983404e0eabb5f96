"""OpenAI's response shapes, in one place: server-sent events, logprobs objects, choices and
finish reasons, and the one stream ending that completions and chat completions share."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from llmcli.errors import LlmcliError
from llmcli.server.errors import ApiError, api_error_from

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class TokenText:
    """Token id -> the text shown in logprobs (cached; the vocabulary is fixed)."""

    def __init__(self, tokenizer, as_ids: bool):
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if self.as_ids:
            return f"token_id:{token}"  # vLLM's return_tokens_as_token_ids
        text = self.cache.get(token)
        if text is None:
            text = self.cache[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text


def legacy_logprobs(entries: list[dict | None], ids: list[int], token_text: TokenText, offset: int) -> dict:
    """The completions API's logprobs object for consecutive tokens; offset: text offset of the first."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(ids, entries):
        text = token_text(token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:  # the first prompt token: nothing predicts it
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            out["token_logprobs"].append(entry["logprob"])
            out["top_logprobs"].append({token_text(t["id"]): t["logprob"] for t in entry.get("top_logprobs", [])})
    return out


def chat_logprobs(entries: list[dict], token_text: TokenText) -> dict:
    def one(token: int, logprob: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for e in entries:
        item = one(e["id"], e["logprob"])
        item["top_logprobs"] = [one(t["id"], t["logprob"]) for t in e.get("top_logprobs", [])]
        content.append(item)
    return {"content": content}


@dataclass
class Choice:
    """What one Request has produced so far."""

    index: int
    request: Any
    pieces: list[str] = field(default_factory=list)
    generated_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    streamed_tokens: int = 0  # logprob entries already sent in a stream
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def finish_reason(reason: str | None) -> str | None:
    return "abort" if reason == "cancelled" else reason


def new_tokens(choice: Choice, event) -> tuple[list[int], list[dict]]:
    """The generated tokens (and logprob entries) an event adds to a stream.

    A running event carries exactly one new token. A finishing event carries one only when the
    sequence ended by length (or a stop string, whose tokens are trimmed away): the final
    lists say how many tokens there are in all.
    """
    if event.finish_reason is None:
        if event.logprob is None or event.token is None:
            return [], []
        choice.streamed_tokens += 1
        return [event.token], [event.logprob]
    final_ids = list(event.generated_ids)
    final_lp = list(event.logprobs or [])
    start = choice.streamed_tokens
    choice.streamed_tokens = max(start, len(final_ids))
    return final_ids[start:], final_lp[start:]


@dataclass
class Frame:
    """The fields every chunk (or response) of one call carries: id, object, created, model."""

    object: str  # "text_completion", "chat.completion.chunk", ...
    model: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "chatcmpl" if self.object.startswith("chat.") else "cmpl"
            self.id = f"{prefix}-{uuid.uuid4().hex}"

    def payload(self, choices: list[dict], usage: dict | None = None) -> dict:
        out: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage or usage is not None:
            out["usage"] = usage
        return out


async def sse_stream(frame: Frame, chunks: AsyncIterator[list[dict]], usage: Callable[[], dict], release: Callable[[], None]) -> AsyncIterator[str]:
    """The events of a streamed call: one chunk per list of choices, the usage chunk when asked for,
    then [DONE]; an error after the headers went out is an error event, then [DONE].

    usage: a callable giving the usage object at the end; release: called however the stream ends
    (the client went away, an error), to free the engine's rows.
    """
    try:
        async for choices in chunks:
            yield sse(frame.payload(choices))
        if frame.include_usage:
            yield sse(frame.payload([], usage()))
        yield SSE_DONE
    except (ApiError, LlmcliError) as exc:
        error = exc if isinstance(exc, ApiError) else api_error_from(exc)
        yield sse(error.body())
        yield SSE_DONE
    finally:
        release()
