"""The OpenAI-compatible HTTP app: a factory, no global state, so one process can hold several.

`make_app(backend, ...)` builds a FastAPI app over an EngineService (or a callable that builds
one, run in a background thread once the app starts, so /health can answer 503 "loading"
while a large model loads). `run_server(app, host, port)` runs it under uvicorn with the drain
behaviour on SIGTERM: new requests get 503, requests in flight finish, then the process exits 0.

Every error leaves as OpenAI's error JSON, `{"error": {"message", "type", "param", "code"}}`.
Imports engine and core, never cli.
"""

from __future__ import annotations

import base64
import hmac
import json
import signal
import struct
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmcli.engine.service import Embedder, EngineService, Handle, QueueFull, RequestKey, ServiceClosed
from llmcli.errors import ContextLengthError, InputError, LlmcliError, UsageError
from llmcli.server import metrics as prom
from llmcli.server.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)

DEFAULT_MAX_BODY = 1 << 20
# the routes that use a model: an error answer from any of them counts in llmcli_requests_failed_total
MODEL_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize"})
# set in the ASGI scope when the engine has already counted a request's failure
_FAILURE_COUNTED = "llmcli.failure_counted"
# how often a non-streamed request checks that its client is still there
DISCONNECT_POLL_S = 0.5


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """An error with its HTTP status, in OpenAI's error fields."""

    counted = False  # True when the engine has counted the failure already (a generation that failed)

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def api_error_from(exc: LlmcliError, param: str | None = None) -> ApiError:
    """The HTTP status and OpenAI type for one of llmcli's own errors."""
    text = str(exc)
    if isinstance(exc, QueueFull):
        return ApiError(429, text, "requests", None, "rate_limit_exceeded")
    if isinstance(exc, ServiceClosed):
        return ApiError(503, text, "server_error", None, "shutting_down")
    if isinstance(exc, ContextLengthError):
        return ApiError(400, text, "invalid_request_error", param, "context_length_exceeded")
    if isinstance(exc, (UsageError, InputError)):
        return ApiError(400, text, "invalid_request_error", param, None)
    return ApiError(500, text, "server_error", None, None)


def _loc_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) if parts else None


# ---------------------------------------------------------------- state


@dataclass
class ServerState:
    """Everything one app instance holds; hung on app.state.llmcli."""

    backend_factory: Callable[[], Any] | None
    model_name: str
    api_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    embedding_name: str | None = None
    embedder_factory: Callable[[], Embedder] | None = None
    on_load_error: Callable[[BaseException], None] | None = None
    preload_embedder: bool = False
    service: EngineService | None = None
    embedder: Embedder | None = None  # the embedding model (or the main model, when it is an encoder)
    main_is_encoder: bool = False
    loaded: bool = False
    load_error: BaseException | None = None
    draining: bool = False
    http: prom.HttpCounters = field(default_factory=prom.HttpCounters)
    created: int = field(default_factory=lambda: int(time.time()))
    _embedder_lock: threading.Lock = field(default_factory=threading.Lock)
    _loader: threading.Thread | None = None

    # ------------------------------------------------------------ loading

    def start_loading(self) -> None:
        if self.loaded or self._loader is not None or self.backend_factory is None:
            return
        self._loader = threading.Thread(target=self._load, name="llmcli-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            backend = self.backend_factory()
            if self.preload_embedder and isinstance(backend, EngineService) and self.embedder is None and self.embedder_factory is not None:
                self.embedder = self.embedder_factory()
            self._install(backend)
        except BaseException as exc:  # noqa: BLE001 - reported by /health and by the server's exit status
            self.load_error = exc
            if self.on_load_error is not None:
                self.on_load_error(exc)

    def _install(self, backend: Any) -> None:
        if isinstance(backend, EngineService):
            self.service = backend
        elif isinstance(backend, Embedder):
            self.embedder = backend
            self.main_is_encoder = True
            self.embedding_name = self.model_name
        else:
            raise TypeError(f"a backend must be an EngineService or an Embedder, got {type(backend).__name__}")
        self.loaded = True

    # ------------------------------------------------------------ access

    def require_service(self) -> EngineService:
        if self.draining:
            raise ApiError(503, "the server is shutting down and takes no new requests", "server_error", None, "shutting_down")
        if not self.loaded:
            self._raise_not_ready()
        if self.service is None:
            raise ApiError(400, f"model {self.model_name} is an encoder: it makes embeddings, not text", "invalid_request_error", "model", None)
        return self.service

    def _raise_not_ready(self) -> None:
        if self.load_error is not None:
            raise ApiError(500, f"the model failed to load: {self.load_error}", "server_error", None, "model_load_failed")
        raise ApiError(503, f"model {self.model_name} is still loading", "server_error", None, "model_loading")

    def require_embedder(self) -> Embedder:
        if self.draining:
            raise ApiError(503, "the server is shutting down and takes no new requests", "server_error", None, "shutting_down")
        if not self.loaded:
            self._raise_not_ready()
        if self.embedder is not None:
            return self.embedder
        if self.embedder_factory is None:
            raise ApiError(404, f"no embedding model is served alongside {self.model_name}", "invalid_request_error", "model", "model_not_found")
        with self._embedder_lock:
            if self.embedder is None:
                try:
                    self.embedder = self.embedder_factory()
                except LlmcliError as exc:
                    raise ApiError(500, f"the embedding model failed to load: {exc}", "server_error", None, "model_load_failed") from None
        return self.embedder

    def served_models(self, task: str | None = None) -> list[str]:
        """The names a client may send as `model`: for task "generate" (completions, chat), "embed", or any task (None)."""
        if not self.loaded:  # an encoder or a decoder? known once the main model has loaded; requests get 503 until then
            return list(dict.fromkeys(n for n in (self.model_name, self.embedding_name) if n))
        generate = [self.model_name] if self.service is not None else []
        has_embedder = self.embedder is not None or self.embedder_factory is not None
        embed = [self.embedding_name] if self.embedding_name and has_embedder else []
        if task == "generate":
            return generate
        if task == "embed":
            return embed
        return list(dict.fromkeys(generate + embed))

    def check_model(self, requested: str | None, task: str | None = None) -> None:
        """404 model_not_found unless `requested` (None: the default) names a model that serves the task."""
        if requested is None or requested in self.served_models(task):
            return
        message = f"The model `{requested}` does not exist."  # OpenAI's (and vLLM's) words
        if requested in self.served_models():  # served, but for the other task
            if task == "generate":
                message = f"The model `{requested}` makes embeddings, not text: send it to /v1/embeddings"
                others = self.served_models("generate")
            else:
                message = f"The model `{requested}` generates text and makes no embeddings: send it to /v1/chat/completions or /v1/completions"
                others = self.served_models("embed")
            message += f", or ask for the model `{others[0]}` here" if others else ""
        raise ApiError(404, message, "invalid_request_error", "model", "model_not_found")


# ---------------------------------------------------------------- the guard (ASGI middleware)


class Guard:
    """Draining (503), API key (401), body size (413) and HTTP metrics, before any route runs."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status_seen: list[int] = []
        raised = False

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, counting_send, path)
        except Exception:
            raised = True  # an unexpected error: the outermost middleware answers 500 (and logs it)
            raise
        finally:
            status = status_seen[0] if status_seen else (500 if raised else 0)
            route = scope.get("route")
            self.state.http.add(scope.get("method", ""), getattr(route, "path", None) or "(unmatched)", status)
            # 429 has its own counter (rejected); a failed generation was counted by the engine
            failed = raised or (status >= 400 and status != 429)
            if failed and path in MODEL_ROUTES and not scope.get(_FAILURE_COUNTED):
                self.state.http.fail()

    async def _guarded(self, scope, receive, send, path):
        state = self.state
        if state.draining and path != "/metrics":
            if path == "/health":
                return await JSONResponse({"status": "draining"}, status_code=503)(scope, receive, send)
            error = ApiError(503, "the server is shutting down and takes no new requests", "server_error", None, "shutting_down")
            return await error.response({"Connection": "close"})(scope, receive, send)
        if state.api_key is not None and path != "/health":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
                error = ApiError(401, "incorrect or missing API key: send `Authorization: Bearer <key>`", "invalid_request_error", None, "invalid_api_key")
                return await error.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)
        too_big = ApiError(413, f"the request body is larger than {state.max_body} bytes", "invalid_request_error", None, "request_too_large")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > state.max_body:
                    return await too_big.response({"Connection": "close"})(scope, receive, send)
            except ValueError:
                return await ApiError(400, "bad Content-Length header").response()(scope, receive, send)
        # read the body here (whatever its framing) so a chunked upload cannot exceed the limit either
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending the body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > state.max_body:
                return await too_big.response({"Connection": "close"})(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: http.disconnect, which streaming responses listen for

        await self.app(scope, replay, send)


# ---------------------------------------------------------------- helpers


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _message_text(message: ChatMessage, index: int) -> str:
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


def _messages(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for the system role
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] has role `{m.role}`; use system, user or assistant", "invalid_request_error", f"messages.{i}.role")
        out.append({"role": role, "content": _message_text(m, i)})
    return out


class _TokenText:
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


def _legacy_logprobs(entries: list[dict | None], ids: list[int], token_text: _TokenText, offset: int) -> dict:
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


def _chat_logprobs(entries: list[dict], token_text: _TokenText) -> dict:
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
class _Choice:
    """What one Request has produced so far."""

    index: int
    request: Any
    pieces: list[str] = field(default_factory=list)
    generated_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    streamed_tokens: int = 0  # logprob entries already sent in a stream

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _finish_reason(reason: str | None) -> str | None:
    return "abort" if reason == "cancelled" else reason


async def _collect(service: EngineService, handle: Handle, choices: dict[int, _Choice], request: Request) -> None:
    """Wait for every request of a non-streamed call; cancel them if the client goes away."""
    next_check = time.monotonic() + DISCONNECT_POLL_S
    try:
        while not handle.done:
            event = await handle.aget(timeout=DISCONNECT_POLL_S)
            if event is not None:
                choice = choices[id(event.request)]
                choice.pieces.append(event.text)
                if event.prompt_logprobs is not None:
                    choice.prompt_logprobs = event.prompt_logprobs
                if event.finish_reason is not None:
                    choice.finish_reason = event.finish_reason
                    choice.generated_ids = list(event.generated_ids)
                    choice.logprobs = event.logprobs
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    break
    except LlmcliError as exc:  # the submission failed in the engine, which counted it
        error = api_error_from(exc)
        error.counted = True
        raise error from None
    finally:
        if not handle.done:
            service.cancel(handle)


# ---------------------------------------------------------------- generation: shared parts


@dataclass
class _Plan:
    """A validated generation call: the prompts, the requests and how to present them."""

    service: EngineService
    tokenizer: Any
    prompts: list[list[int]]
    prompt_texts: list[str]
    requests: list[Any]
    choices: dict[int, _Choice]
    token_text: _TokenText
    include_usage: bool

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.generated_ids) for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sampling_params(body, logprobs: int | None, vocab: int):
    from llmcli.core.sampling import SamplingParams

    bias = body.logit_bias or {}
    for key in bias:
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"logit_bias key {key!r} is not a token id", "invalid_request_error", "logit_bias") from None
        if not 0 <= token < vocab:
            raise ApiError(400, f"logit_bias token id {token} is outside the vocabulary (0..{vocab - 1})", "invalid_request_error", "logit_bias")
    for token in body.stop_token_ids or []:
        if not 0 <= token < vocab:
            raise ApiError(400, f"stop token id {token} is outside the vocabulary (0..{vocab - 1})", "invalid_request_error", "stop_token_ids")
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=dict(bias),
            seed=body.seed,
            logprobs=logprobs,
        )
    except UsageError as exc:
        raise api_error_from(exc) from None


def _plan(state: ServerState, body, prompts: list[list[int]], prompt_texts: list[str], logprobs: int | None, max_tokens: int | None, echo: bool, cap_to_context: bool) -> _Plan:
    from llmcli.core.generate import Request as GenRequest

    service = state.require_service()
    engine = service.engine
    tokenizer = engine.tokenizer
    vocab = engine.config.vocab_size
    context = engine.context_length
    params = _sampling_params(body, logprobs, vocab)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
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
            )
            choices[id(req)] = _Choice(len(requests), req)
            requests.append(req)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return _Plan(service, tokenizer, prompts, prompt_texts, requests, choices, _TokenText(tokenizer, body.return_tokens_as_token_ids), include_usage)


def _submit(plan: _Plan) -> Handle:
    try:
        return plan.service.submit(plan.requests)
    except LlmcliError as exc:
        raise api_error_from(exc) from None


# ---------------------------------------------------------------- the app


def make_app(
    backend: EngineService | Embedder | Callable[[], EngineService | Embedder],
    *,
    model_name: str,
    api_key: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    embedder: Embedder | Callable[[], Embedder] | None = None,
    embedding_name: str | None = None,
    preload_embedder: bool = False,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over one model.

    backend: a ready EngineService (or Embedder, for an encoder model), or a callable that builds
    one; a callable runs in a background thread when the app starts, and /health answers 503
    until it returns. embedder: the model for /v1/embeddings when the main model is a decoder
    (an Embedder or a callable, called on first use, or while loading with preload_embedder). api_key: when set, every route but
    /health needs `Authorization: Bearer <api_key>`. max_body: the largest request body, in bytes.
    """
    factory = backend if callable(backend) and not isinstance(backend, (EngineService, Embedder)) else None
    state = ServerState(
        backend_factory=factory,
        model_name=model_name,
        api_key=api_key or None,
        max_body=max_body,
        embedding_name=embedding_name,
        embedder_factory=embedder if callable(embedder) and not isinstance(embedder, Embedder) else None,
        on_load_error=on_load_error,
        preload_embedder=preload_embedder,
    )
    if isinstance(embedder, Embedder):
        state.embedder = embedder
        state.embedding_name = embedding_name or embedder.name
    if factory is None:
        state._install(backend)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.start_loading()
        yield
        if state.service is not None:
            # uvicorn has waited for the open requests; anything left (a forced exit) is cancelled
            await run_in_threadpool(state.service.shutdown, False, 10.0)

    app = FastAPI(title="llmcli", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.llmcli = state
    app.add_middleware(Guard, state=state)

    # ------------------------------------------------------------ error shapes

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.counted:
            request.scope[_FAILURE_COUNTED] = True
        return exc.response()

    @app.exception_handler(LlmcliError)
    async def _llmcli_error(_request: Request, exc: LlmcliError):
        return api_error_from(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = _loc_param(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif param:
            message = f"{param}: {message}"
        return ApiError(400, message, "invalid_request_error", param, None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), "invalid_request_error", None, code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", None, None).response()

    # ------------------------------------------------------------ health, metrics, models

    @app.get("/health")
    async def health():
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": str(state.load_error)}, status_code=503)
        if not state.loaded:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        text = prom.render(state.service, state.http, state.model_name, state.loaded, state.draining)
        return Response(text, media_type=prom.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        data = [{"id": name, "object": "model", "created": state.created, "owned_by": "llmcli"} for name in state.served_models()]
        return {"object": "list", "data": data}

    # ------------------------------------------------------------ completions

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        state.check_model(body.model, "generate")
        if body.suffix:
            raise ApiError(400, "suffix (insertion) is not supported", "invalid_request_error", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise ApiError(400, "best_of is not supported (leave it unset or equal to n)", "invalid_request_error", "best_of")
        service = state.require_service()
        tokenizer = service.engine.tokenizer
        prompt = body.prompt
        if isinstance(prompt, str):
            raw: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            raw = [prompt]
        else:
            raw = list(prompt)
        if not raw:
            raise ApiError(400, "the prompt list is empty", "invalid_request_error", "prompt")
        prompts, texts = [], []
        for p in raw:
            if isinstance(p, str):
                prompts.append(list(tokenizer.encode(p).ids))
                texts.append(p)
            else:
                prompts.append(list(p))
                texts.append(None)
        plan = _plan(state, body, prompts, texts, body.logprobs, body.max_tokens, body.echo, cap_to_context=False)
        for i, t in enumerate(plan.prompt_texts):
            if t is None:
                try:
                    plan.prompt_texts[i] = tokenizer.decode(prompts[i], skip_special_tokens=False)
                except Exception:  # noqa: BLE001 - ids were range-checked; a decoder quirk must not fail the call
                    plan.prompt_texts[i] = ""
        handle = _submit(plan)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(_stream_completion(plan, handle, body, rid, created), media_type="text/event-stream", headers=SSE_HEADERS)
        await _collect(plan.service, handle, plan.choices, request)
        out = []
        for choice in plan.choices.values():
            p = choice.request.sample_index // body.n
            text = (plan.prompt_texts[p] if body.echo else "") + choice.text
            lp = None
            if body.logprobs is not None:
                gen = _legacy_logprobs(choice.logprobs or [], choice.generated_ids, plan.token_text, len(plan.prompt_texts[p]) if body.echo else 0)
                if body.echo:
                    head = _legacy_logprobs(choice.prompt_logprobs or [None] * len(prompts[p]), prompts[p], plan.token_text, 0)
                    lp = {k: head[k] + gen[k] for k in gen}
                else:
                    lp = gen
            out.append({"index": choice.index, "text": text, "logprobs": lp, "finish_reason": _finish_reason(choice.finish_reason)})
        return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name, "choices": out, "usage": plan.usage()}

    async def _stream_completion(plan: _Plan, handle: Handle, body: CompletionRequest, rid: str, created: int) -> AsyncIterator[str]:
        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            payload = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name, "choices": choices}
            if usage is not None or plan.include_usage:
                payload["usage"] = usage
            return _sse(payload)

        offsets: dict[int, int] = {}
        try:
            async for event in handle:
                choice = plan.choices[id(event.request)]
                p = choice.request.sample_index // body.n
                pieces = []
                lp = None
                if choice.index not in offsets:
                    offsets[choice.index] = 0
                    if body.echo:
                        pieces.append(plan.prompt_texts[p])
                        if body.logprobs is not None:
                            lp = _legacy_logprobs(event.prompt_logprobs or [None] * len(plan.prompts[p]), plan.prompts[p], plan.token_text, 0)
                        offsets[choice.index] = len(plan.prompt_texts[p])
                pieces.append(event.text)
                choice.pieces.append(event.text)
                if body.logprobs is not None:
                    new_ids, new_entries = _new_tokens(choice, event)
                    gen = _legacy_logprobs(new_entries, new_ids, plan.token_text, offsets[choice.index])
                    offsets[choice.index] += sum(len(t) for t in gen["tokens"])
                    lp = gen if lp is None else {k: lp[k] + gen[k] for k in gen}
                if event.finish_reason is not None:
                    choice.finish_reason = event.finish_reason
                    choice.generated_ids = list(event.generated_ids)
                text = "".join(pieces)
                if text or lp is not None or event.finish_reason is not None:
                    yield chunk([{"index": choice.index, "text": text, "logprobs": lp, "finish_reason": _finish_reason(event.finish_reason)}])
            if plan.include_usage:
                yield chunk([], plan.usage())
            yield SSE_DONE
        except LlmcliError as exc:
            yield _sse(api_error_from(exc).body())
            yield SSE_DONE
        finally:
            if not handle.done:
                plan.service.cancel(handle)

    # ------------------------------------------------------------ chat completions

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        state.check_model(body.model, "generate")
        if body.tools:
            raise ApiError(400, "tools (function calling) are not supported", "invalid_request_error", "tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", "invalid_request_error", "response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "invalid_request_error", "top_logprobs")
        service = state.require_service()
        tokenizer = service.engine.tokenizer
        if not tokenizer.chat_template:
            raise ApiError(400, f"model {state.model_name} has no chat template", "invalid_request_error", "messages", None)
        messages = _messages(body.messages)
        try:
            # the template already holds any BOS it wants (as transformers' apply_chat_template(tokenize=True))
            rendered, encoding = tokenizer.encode_chat(messages, add_generation_prompt=True, parse_special=body.parse_special)
        except LlmcliError as exc:
            raise api_error_from(exc, "messages") from None
        ids = encoding.ids
        max_tokens = body.max_completion_tokens or body.max_tokens
        plan = _plan(state, body, [ids], [rendered], (body.top_logprobs or 0) if body.logprobs else None, max_tokens, False, cap_to_context=True)
        handle = _submit(plan)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(_stream_chat(plan, handle, body, rid, created), media_type="text/event-stream", headers=SSE_HEADERS)
        await _collect(plan.service, handle, plan.choices, request)
        out = []
        for choice in plan.choices.values():
            out.append(
                {
                    "index": choice.index,
                    "message": {"role": "assistant", "content": choice.text},
                    "logprobs": _chat_logprobs(choice.logprobs or [], plan.token_text) if body.logprobs else None,
                    "finish_reason": _finish_reason(choice.finish_reason),
                }
            )
        return {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name, "choices": out, "usage": plan.usage()}

    async def _stream_chat(plan: _Plan, handle: Handle, body: ChatCompletionRequest, rid: str, created: int) -> AsyncIterator[str]:
        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            payload = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name, "choices": choices}
            if plan.include_usage:
                payload["usage"] = usage
            return _sse(payload)

        try:
            # the role first, as OpenAI does, so a client can open the message before any text
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for c in plan.choices.values()])
            async for event in handle:
                choice = plan.choices[id(event.request)]
                choice.pieces.append(event.text)
                lp = None
                if body.logprobs:
                    _ids, entries = _new_tokens(choice, event)
                    if entries:
                        lp = _chat_logprobs(entries, plan.token_text)
                if event.finish_reason is not None:
                    choice.finish_reason = event.finish_reason
                    choice.generated_ids = list(event.generated_ids)
                if event.text or lp is not None:
                    yield chunk([{"index": choice.index, "delta": {"content": event.text}, "logprobs": lp, "finish_reason": None}])
                if event.finish_reason is not None:
                    yield chunk([{"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(event.finish_reason)}])
            if plan.include_usage:
                yield chunk([], plan.usage())
            yield SSE_DONE
        except LlmcliError as exc:
            yield _sse(api_error_from(exc).body())
            yield SSE_DONE
        finally:
            if not handle.done:
                plan.service.cancel(handle)

    # ------------------------------------------------------------ embeddings

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        state.check_model(body.model, "embed")
        embedder = await run_in_threadpool(state.require_embedder)
        raw = body.input
        if isinstance(raw, str):
            items: list = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            items = [raw]
        else:
            items = list(raw)
        if not items:
            raise ApiError(400, "input is empty", "invalid_request_error", "input")
        inputs = [embedder.tokenize(x) if isinstance(x, str) else list(x) for x in items]
        try:
            vectors = await run_in_threadpool(embedder.embed, inputs)
        except LlmcliError as exc:
            raise api_error_from(exc, "input") from None
        if body.dimensions is not None and body.dimensions != len(vectors[0]):
            raise ApiError(400, f"this model's embeddings have {len(vectors[0])} dimensions; dimensions={body.dimensions} is not supported", "invalid_request_error", "dimensions")
        data = []
        for i, v in enumerate(vectors):
            value: Any = v
            if body.encoding_format == "base64":
                value = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(x) for x in inputs)
        return {"object": "list", "data": data, "model": state.embedding_name or embedder.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # ------------------------------------------------------------ tokenize / detokenize (vLLM's shapes)

    def _tokenizer_for(model: str | None):
        if model is not None and model == state.embedding_name and model != state.model_name:
            embedder = state.require_embedder()
            return embedder.tokenizer, embedder.context_length
        if state.service is not None:
            return state.service.engine.tokenizer, state.service.engine.context_length
        if state.main_is_encoder and state.embedder is not None:
            return state.embedder.tokenizer, state.embedder.context_length
        state._raise_not_ready()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        state.check_model(body.model)
        tokenizer, context = _tokenizer_for(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of `prompt` and `messages`", "invalid_request_error", "prompt")
        if body.messages is not None:
            if not tokenizer.chat_template:
                raise ApiError(400, f"model {state.model_name} has no chat template", "invalid_request_error", "messages")
            try:
                _, encoding = tokenizer.encode_chat(_messages(body.messages), add_generation_prompt=body.add_generation_prompt, parse_special=body.parse_special)
            except LlmcliError as exc:
                raise api_error_from(exc, "messages") from None
            ids = encoding.ids
        else:
            ids = list(tokenizer.encode(body.prompt, add_special=body.add_special_tokens).ids)
        return {"count": len(ids), "max_model_len": context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        state.check_model(body.model)
        tokenizer, _ = _tokenizer_for(body.model)
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})", "invalid_request_error", "tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    return app


def _new_tokens(choice: _Choice, event) -> tuple[list[int], list[dict]]:
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


# ---------------------------------------------------------------- running under uvicorn


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, notify: Callable[[str], None] | None = None, log_level: str = "warning") -> int:
    """Serve until SIGTERM/SIGINT (drain, then exit) and return the exit status (1 when the model failed to load)."""
    notify = notify or (lambda msg: print(msg, file=sys.stderr, flush=True))
    state: ServerState = app.state.llmcli
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=None)
    server = DrainingServer(config, state, notify)
    failed: list[BaseException] = []
    previous = state.on_load_error

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        notify(f"error: {exc}")
        server.should_exit = True
        if previous is not None:
            previous(exc)

    state.on_load_error = on_load_error
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind the address
        if exc.code:
            notify(f"error: cannot listen on {host}:{port}; is another server using the port? (choose another with --port)")
            return 1
        raise
    return 1 if failed else 0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains: new requests get 503, running ones finish, then exit.

    A second signal stops at once (requests in flight are cancelled). SIGTERM then exits 0;
    SIGINT is re-raised by uvicorn afterwards, so Ctrl-C still ends with the usual status 130.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState, notify: Callable[[str], None]):
        super().__init__(config)
        self.llmcli_state = state
        self.notify = notify
        self._drain_thread: threading.Thread | None = None

    async def startup(self, sockets=None):
        await super().startup(sockets)
        state = self.llmcli_state
        if state.load_error is not None or self.should_exit:
            return
        bound = [s.getsockname() for srv in self.servers for s in (srv.sockets or [])]
        where = f"http://{bound[0][0]}:{bound[0][1]}" if bound else f"http://{self.config.host}:{self.config.port}"
        extra = "" if state.loaded else " (loading the model; /health answers 503 until it is ready)"
        self.notify(f"llmcli: serving {state.model_name} on {where}{extra}")

    def handle_exit(self, sig, frame):
        state = self.llmcli_state
        if sig == signal.SIGINT:
            self._captured_signals.append(sig)  # uvicorn re-raises it after the shutdown: exit 130
        if self._drain_thread is not None:
            self.force_exit = True
            self.should_exit = True
            if state.service is not None:
                threading.Thread(target=state.service.shutdown, args=(False, 5.0), daemon=True).start()
            return
        # signal handlers must not block: the drain waits in a thread, then tells uvicorn to stop
        state.draining = True
        self._drain_thread = threading.Thread(target=self._drain, name="llmcli-drain", daemon=True)
        self._drain_thread.start()

    def _drain(self):
        service = self.llmcli_state.service
        if service is not None:
            self.notify(f"llmcli: draining: finishing {service.queue_depth + service.running} request(s) in flight, refusing new ones")
            service.shutdown(drain=True)
        self.should_exit = True
