"""What one app instance holds (`ServerState`, hung on app.state.llmcli) and how routes reach it.

Routes take the state as a FastAPI dependency, `State` (`Depends(get_state)`), so one process can
hold several apps and a test can build one over any service. The model loads in a background
thread started by the app's lifespan; an embedding model named on the command line loads there
too, and the default one on first use, in the threadpool, never on the event loop.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from llmcli.engine.service import Embedder, EngineService
from llmcli.errors import LlmcliError
from llmcli.server import metrics as prom
from llmcli.server.errors import ApiError, shutting_down

DEFAULT_MAX_BODY = 1 << 20
# a generation request that has not finished after this many seconds is stopped (504); serve --request-timeout
DEFAULT_REQUEST_TIMEOUT = 600.0


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
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT  # seconds from submission; None: no limit
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
            raise shutting_down()
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
        """The embedding model, loaded on first use: blocking, so async code calls `get_embedder()`."""
        if self.draining:
            raise shutting_down()
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

    async def get_embedder(self) -> Embedder:
        """require_embedder off the event loop: the first call may load a model."""
        if self.embedder is not None and self.loaded and not self.draining:
            return self.embedder
        return await run_in_threadpool(self.require_embedder)

    async def tokenizer_for(self, model: str | None) -> tuple[Any, int]:
        """The tokenizer and context length of the model a /tokenize or /detokenize request names."""
        if model is not None and model == self.embedding_name and model != self.model_name:
            embedder = await self.get_embedder()
            return embedder.tokenizer, embedder.context_length
        if self.service is not None:
            return self.service.engine.tokenizer, self.service.engine.context_length
        if self.main_is_encoder and self.embedder is not None:
            return self.embedder.tokenizer, self.embedder.context_length
        self._raise_not_ready()
        raise AssertionError("unreachable")  # _raise_not_ready always raises

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


def get_state(request: Request) -> ServerState:
    return request.app.state.llmcli


State = Annotated[ServerState, Depends(get_state)]
