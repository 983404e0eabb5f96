"""What `serve` and `batch` serve: the text model (an EngineService, or an Embedder when the model
is an encoder) and the embedding model beside it, described by a picklable `BackendSpec` so a
worker process or a Ray actor can load the same models the same way, and the names clients use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from llmcli.catalog import DEFAULT_ENCODER, DEFAULT_MODEL
from llmcli.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MB
from llmcli.errors import UsageError


def model_name(ref: Optional[str], default: str) -> str:
    """The name clients use in `model`: the catalogue name, or the file/directory name of a path."""
    if ref is None:
        return default
    path = Path(ref)
    if path.suffix == ".gguf":
        return path.stem
    if path.exists() or "/" in ref:
        return path.resolve().name if path.exists() else path.name
    return ref


def _quiet(_message: str) -> None:
    pass


@dataclass(frozen=True)
class BackendSpec:
    """The models behind the OpenAI routes and how to load them (the serve flags of the same names)."""

    model: Optional[str] = None
    dtype: str = "float32"
    device: str = "cpu"
    quantize: str = "none"
    batch_size: int = 8
    max_queue: int = 64
    max_context: Optional[int] = None
    embedding_model: Optional[str] = None  # None: DEFAULT_ENCODER, loaded on first use
    served_model_name: Optional[str] = None
    max_batched_tokens: Optional[int] = None  # None: the scheduler's DEFAULT_MAX_BATCHED_TOKENS
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB

    @property
    def name(self) -> str:
        return self.served_model_name or model_name(self.model, DEFAULT_MODEL)

    @property
    def embedding_name(self) -> str:
        return model_name(self.embedding_model, DEFAULT_ENCODER)

    def load_backend(self, notify: Callable[[str], None] = _quiet):
        """An EngineService over the model, or an Embedder when the model is an encoder."""
        from llmcli.engine import Engine
        from llmcli.engine.service import Embedder, EngineService

        engine = Engine(
            self.model, dtype=self.dtype, device=self.device, quantize=self.quantize, batch_size=self.batch_size, max_context=self.max_context,
            max_batched_tokens=self.max_batched_tokens, notify=notify, default_model=DEFAULT_MODEL, prefix_cache_mb=self.prefix_cache_mb,
        )  # fmt: skip
        if engine.config.is_encoder:
            return Embedder(engine.loaded)
        notify(
            f"llmcli: loaded {self.name} ({engine.config.model_type}, context {engine.context_length}, batch size {self.batch_size}, "
            f"prefix cache {self.prefix_cache_mb:g} MiB)"
        )
        return EngineService(engine, batch_size=self.batch_size, max_queue=self.max_queue)

    def load_embedder(self, notify: Callable[[str], None] = _quiet):
        """The Embedder for /v1/embeddings beside a decoder: --embedding-model, or DEFAULT_ENCODER."""
        from llmcli.catalog import resolve_model_path
        from llmcli.core.loader import load_model
        from llmcli.engine.service import Embedder

        ref = self.embedding_model or DEFAULT_ENCODER
        loaded = load_model(resolve_model_path(ref, notify, default=DEFAULT_ENCODER), dtype=self.dtype, device=self.device)
        if not loaded.config.is_encoder:
            raise UsageError(f"--embedding-model {ref} is a {loaded.config.model_type} decoder", f"use an encoder such as {DEFAULT_ENCODER}")
        return Embedder(loaded)
