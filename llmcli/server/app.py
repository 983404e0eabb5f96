"""The OpenAI-compatible HTTP app: a factory, no global state, so one process can hold several.

`make_app(backend, ...)` builds a FastAPI app over an EngineService (or a callable that builds
one, run in a background thread once the app starts, so /health can answer 503 "loading"
while a large model loads) from the routers in server/routes/. Every error leaves as OpenAI's
error JSON, `{"error": {"message", "type", "param", "code"}}` (server/errors.py).
Imports engine and core, never cli.

The layout follows vLLM's entrypoints/openai: routes/ (one router per endpoint group, the state
through Depends), schemas.py (request bodies that make their SamplingParams), plan.py (a
generation call's requests and events), openai_format.py (SSE, logprobs, choices), errors.py,
state.py, middleware.py (auth, body size, draining, HTTP counters), runner.py (uvicorn, drain).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from llmcli.engine.service import Embedder, EngineService
from llmcli.server.errors import install_error_handlers
from llmcli.server.middleware import Guard
from llmcli.server.responses import document
from llmcli.server.routes import ROUTERS
from llmcli.server.state import DEFAULT_MAX_BODY, DEFAULT_REQUEST_TIMEOUT, ServerState


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
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
) -> FastAPI:
    """The OpenAI-compatible app over one model.

    backend: a ready EngineService (or Embedder, for an encoder model), or a callable that builds
    one; a callable runs in a background thread when the app starts, and /health answers 503
    until it returns. embedder: the model for /v1/embeddings when the main model is a decoder
    (an Embedder or a callable, called on first use in the threadpool, or while loading with
    preload_embedder). api_key: when set, every route but /health needs `Authorization: Bearer
    <api_key>`. max_body: the largest request body, in bytes. request_timeout: seconds a
    generation call may take before it is stopped (504); None for no limit.
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
        request_timeout=request_timeout,
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
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    document(app)
    return app
