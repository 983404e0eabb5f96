"""What each endpoint answers, declared in the OpenAPI document (/openapi.json) so that clients and
conformance tests (tests/test_conformance.py, schemathesis) check the answers, not just the requests.

The routes return plain dicts (no response_model: nothing is filtered or re-validated on the way
out); `document(app)` puts these schemas into the app's OpenAPI document instead: each route's
200 body (and its text/event-stream form where it streams), and the OpenAI error body for every
status llmcli answers with. Validation errors are 400s in OpenAI's shape (server/errors.py), so
FastAPI's default 422 entry is replaced. Models allow extra fields: a new field is not a break.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Open):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorBody(_Open):
    error: ErrorDetail


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: Optional[str]
    logprobs: Optional[dict[str, Any]] = None


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatMessage(_Open):
    role: Literal["assistant"]
    content: Optional[str]


class ChatChoice(_Open):
    index: int
    message: ChatMessage
    finish_reason: Optional[str]


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Embedding(_Open):
    object: Literal["embedding"]
    index: int
    embedding: Union[list[float], str]  # encoding_format "base64": a string


class EmbeddingUsage(_Open):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Open):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class Tokens(_Open):
    count: int
    max_model_len: int
    tokens: list[int]


class Detokenized(_Open):
    prompt: str


class Health(_Open):
    status: Literal["ok", "loading", "error"]


ERROR_STATUSES = {
    400: "a request llmcli cannot run: invalid fields, a prompt too long, a token id outside the vocabulary",
    401: "a missing or wrong API key (serve --api-key)",
    404: "an unknown model or path",
    413: "a body larger than the server takes",
    429: "the queue is full; retry after Retry-After seconds",
    500: "an unexpected failure (reported, counted in /metrics)",
    503: "the model is loading or the server is shutting down",
    504: "the request ran past --request-timeout",
}
SSE = {"text/event-stream": {"schema": {"type": "string", "description": "data: <chunk JSON> events, then data: [DONE]"}}}
# path -> (method, 200 body model, extra 200 content types, the error statuses the route answers)
ROUTES: dict[str, tuple[str, Optional[type[BaseModel]], dict, tuple[int, ...]]] = {
    "/health": ("get", Health, {}, (503,)),
    "/metrics": ("get", None, {"text/plain": {"schema": {"type": "string", "description": "Prometheus text format"}}}, (401, 503)),
    "/v1/models": ("get", ModelList, {}, (401, 503)),
    "/v1/completions": ("post", Completion, SSE, (400, 401, 404, 413, 429, 500, 503, 504)),
    "/v1/chat/completions": ("post", ChatCompletion, SSE, (400, 401, 404, 413, 429, 500, 503, 504)),
    "/v1/embeddings": ("post", EmbeddingList, {}, (400, 401, 404, 413, 500, 503)),
    "/tokenize": ("post", Tokens, {}, (400, 401, 404, 413, 500, 503)),
    "/detokenize": ("post", Detokenized, {}, (400, 401, 404, 413, 500, 503)),
}


def document(app: FastAPI) -> None:
    """Give app an OpenAPI document with ROUTES' answers declared (built once, on first request)."""

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)

        def ref(model: type[BaseModel]) -> dict:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
            return {"$ref": f"#/components/schemas/{model.__name__}"}

        error = ref(ErrorBody)
        for path, (method, body, extra, statuses) in ROUTES.items():
            operation = spec.get("paths", {}).get(path, {}).get(method)
            if operation is None:
                continue
            ok = {"application/json": {"schema": ref(body)}} if body is not None else {}
            responses = {"200": {"description": "Successful Response", "content": {**ok, **extra}}}
            for status in statuses:
                responses[str(status)] = {"description": ERROR_STATUSES[status], "content": {"application/json": {"schema": error}}}
            operation["responses"] = responses
        app.openapi_schema = spec
        return spec

    app.openapi = openapi
