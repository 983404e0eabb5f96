"""POST /v1/embeddings: sentence vectors from the encoder (mean pooling, L2 norm), floats or base64."""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from llmcli.errors import LlmcliError
from llmcli.server.errors import ApiError, api_error_from
from llmcli.server.schemas import EmbeddingRequest, as_items
from llmcli.server.state import State

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, state: State):
    state.check_model(body.model, "embed")
    embedder = await state.get_embedder()
    items = as_items(body.input)
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
