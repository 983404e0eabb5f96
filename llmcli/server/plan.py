"""A generation call from validation to the engine and back: the prompts and their Requests
(`make_plan`), submission (`Plan.submit`), and the events (`Plan.follow`), which stop the
requests at once when the client goes away or the request timeout passes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request

from llmcli.engine.batcher import Event
from llmcli.engine.service import EngineService, Handle, RequestKey
from llmcli.errors import LlmcliError
from llmcli.server.errors import ApiError, api_error_from, timed_out
from llmcli.server.openai_format import Choice, TokenText
from llmcli.server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from llmcli.server.state import ServerState


def message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"messages[{index}] has a `{part.type}` content part; only text parts are supported", "invalid_request_error", f"messages.{index}.content")
        texts.append(part.text)
    return "".join(texts)


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as plain dicts: role, content, and an assistant's tool_calls or a tool turn's tool_call_id."""
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for the system role
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}] has role `{m.role}`; use system, user, assistant or tool", "invalid_request_error", f"messages.{i}.role")
        message = {"role": role, "content": message_text(m, i)}
        if role == "assistant" and m.tool_calls:
            message["tool_calls"] = m.tool_calls
        if role == "tool":
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


@dataclass
class Plan:
    """A validated generation call: the prompts, the requests and how to present them."""

    service: EngineService
    tokenizer: Any
    prompts: list[list[int]]
    prompt_texts: list[str]
    requests: list[Any]
    choices: dict[int, Choice]
    token_text: TokenText
    include_usage: bool
    timeout: float | None = None
    deadline: float | None = None  # time.monotonic() after which the call is stopped (504)
    handle: Handle | None = None

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.generated_ids) for c in self.choices.values())
        # a prompt counts once however many samples it has (n): its first sample's cached tokens with it
        per_prompt = len(self.requests) // len(self.prompts)
        cached = sum(self.choices[id(r)].cached_tokens for r in self.requests[::per_prompt])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}}

    def submit(self) -> Handle:
        try:
            self.handle = self.service.submit(self.requests)
        except LlmcliError as exc:
            raise api_error_from(exc) from None
        return self.handle

    def release(self) -> None:
        """Cancel whatever of the call is still queued or running: its rows are free on the next engine step."""
        if self.handle is not None and not self.handle.done:
            self.service.cancel(self.handle)

    async def follow(self, request: Request) -> AsyncIterator[Event]:
        """The call's events until every request has finished.

        A task waits on the ASGI receive channel for the client's disconnect and cancels the
        requests the moment it comes, wherever they are (queued, prefilling, decoding), so the
        rows are free within one engine step, whether or not an event was due. Past the
        deadline the requests are cancelled and ApiError 504 is raised.
        """
        handle = self.handle
        assert handle is not None, "submit() first"
        gone = asyncio.Event()

        async def watch() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    self.release()
                    return

        watcher = asyncio.create_task(watch())
        try:
            while not handle.done:
                wait = None if self.deadline is None else self.deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    self.release()
                    raise timed_out(self.timeout or 0)
                try:
                    event = await handle.aget(timeout=wait)
                except LlmcliError as exc:  # the submission failed in the engine, which counted it
                    error = api_error_from(exc)
                    error.counted = True
                    raise error from None
                if gone.is_set():
                    return  # nobody is reading: the cancel is on its way to the engine
                if event is not None:
                    if event.cached_tokens is not None:
                        self.choices[id(event.request)].cached_tokens = event.cached_tokens
                    yield event
        finally:
            watcher.cancel()
            self.release()

    async def collect(self, request: Request) -> None:
        """Wait for every request of a non-streamed call, filling in the choices."""
        async for event in self.follow(request):
            choice = self.choices[id(event.request)]
            choice.pieces.append(event.text)
            if event.prompt_logprobs is not None:
                choice.prompt_logprobs = event.prompt_logprobs
            if event.finish_reason is not None:
                choice.finish_reason = event.finish_reason
                choice.generated_ids = list(event.generated_ids)
                choice.logprobs = event.logprobs


def make_plan(
    state: ServerState, body: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]], prompt_texts: list[str], echo: bool, cap_to_context: bool, grammar=None
) -> Plan:
    """Check the prompts and build one engine Request per prompt and sample (n), all under one key;
    grammar: the response format or forced tool call every output must follow."""
    from llmcli.core.generate import Request as GenRequest

    service = state.require_service()
    engine = service.engine
    tokenizer = engine.tokenizer
    vocab = engine.config.vocab_size
    context = engine.context_length
    params = body.to_sampling_params(vocab)
    stop = body.stop_strings()
    max_tokens = body.max_new_tokens()
    key = RequestKey()
    requests, choices = [], {}
    for p, ids in enumerate(prompts):
        if not ids:
            raise ApiError(400, "the prompt is empty", "invalid_request_error", "prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "invalid_request_error", "prompt")
        room = context - len(ids)
        if room < 1:
            raise ApiError(
                400,
                f"this model's maximum context length is {context} tokens, but the prompt has {len(ids)} tokens; shorten the prompt",
                "invalid_request_error",
                "messages" if cap_to_context else "prompt",
                "context_length_exceeded",
            )
        # max_tokens beyond what the context leaves is capped, not refused: the reply ends with "length"
        limit = room if max_tokens is None else min(max_tokens, room)
        for s in range(body.n):
            req = GenRequest(
                id=key,
                prompt_ids=ids,
                params=params,
                max_tokens=limit,
                min_tokens=min(body.min_tokens, limit),
                stop=stop,
                stop_token_ids=list(body.stop_token_ids or []),
                ignore_eos=body.ignore_eos,
                echo=echo,
                sample_index=p * body.n + s,
                grammar=grammar,
            )
            choices[id(req)] = Choice(len(requests), req)
            requests.append(req)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    deadline = None if state.request_timeout is None else time.monotonic() + state.request_timeout
    return Plan(service, tokenizer, prompts, prompt_texts, requests, choices, TokenText(tokenizer, body.return_tokens_as_token_ids), include_usage, state.request_timeout, deadline)


async def request_grammar(state: ServerState, value: dict | None, forced=None):
    """The grammar a request's outputs follow: a forced tool call's, else its response_format's
    (400 naming the problem before any token); llguidance's view of the tokenizer is built here,
    off the event loop and the engine thread, the first time one is needed."""
    import asyncio

    from llmcli.core.constrained import guidance_tokenizer, parse_response_format
    from llmcli.errors import UsageError

    grammar = forced
    if grammar is None:
        try:
            grammar = parse_response_format(value)
        except UsageError as exc:
            raise ApiError(400, str(exc), "invalid_request_error", "response_format") from None
    if grammar is not None:
        engine = state.require_service().engine
        await asyncio.to_thread(guidance_tokenizer, engine.tokenizer, engine.config.vocab_size)
    return grammar
