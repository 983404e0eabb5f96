"""OpenAI Batch files: the input line's envelope, and each body answered by serve's own app.

A line is `{"custom_id", "method": "POST", "url", "body"}`; its output line is vLLM's run-batch
shape, `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.

The body goes to the same FastAPI app `llmcli serve` runs (server.make_app over the same
EngineService / Embedder, loaded by the same BackendSpec), called in-process through ASGI with no
socket: the request models, their SamplingParams, the plan, the engine and the response
formatting are serve's, so `response.body` is exactly what serve answers for that body, error
bodies included (a body that fails validation gets serve's 400 and its error JSON). What only a
batch can get wrong is answered here, with `response: null` and `error: {code, message}`: a url
other than the three batch endpoints, a method other than POST, a streamed body.

`id` and `request_id` derive from the job's fingerprint and the record's position, so a chunk that
runs twice (a retried Ray task, a resumed run) writes the same record both times.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from llmcli.batch.job import Done, Item
from llmcli.engine.backend import BackendSpec
from llmcli.errors import InputError

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
KIND = "openai-batch"


class Envelopes:
    """The check every line passes before anything runs: a JSON object with a unique string custom_id.

    A line without one cannot be answered (its output line is found by custom_id), and OpenAI and
    vLLM refuse a file that repeats one: both are one-line errors naming the line before the job
    starts. Everything else about a line (url, method, body) is answered by its own output line.
    """

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def __call__(self, record: dict, line: int) -> None:
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise InputError("the batch request has no `custom_id` string", 'give every line a unique "custom_id", as the OpenAI Batch API does', line=line)
        first = self.seen.setdefault(custom_id, line)
        if first != line:
            raise InputError(f"custom_id {custom_id!r} repeats line {first}'s", "give every request its own custom_id (OpenAI and vLLM refuse a batch that repeats one)", line=line)


def batch_error(code: str, message: str) -> dict:
    return {"code": code, "message": message}


def envelope_error(record: dict) -> dict | None:
    """The `error` of a line the app must not see: unknown url, a method other than POST, a stream."""
    url, method, body = record.get("url"), record.get("method"), record.get("body")
    if url not in ENDPOINTS:
        return batch_error("invalid_url", f"url {url!r} is not a batch endpoint; use {', '.join(ENDPOINTS)}")
    if method != "POST":
        return batch_error("invalid_method", f"method {method!r} is not supported; batch requests are POST")
    if isinstance(body, dict) and body.get("stream"):
        return batch_error("invalid_request", "a batch request cannot be streamed; leave out `stream`")
    return None


@dataclass(frozen=True)
class OpenAIBatchSpec:
    """What an OpenAI batch worker needs: the models (serve's flags) and the job's fingerprint (for the ids)."""

    backend: BackendSpec
    fingerprint: str

    kind = KIND

    def make_worker(self) -> "OpenAIBatchWorker":
        return OpenAIBatchWorker(self)


class OpenAIBatchWorker:
    """One loaded model behind serve's app; `run(items)` answers a chunk of batch lines concurrently,
    so the engine batches them as it batches a server's clients."""

    def __init__(self, spec: OpenAIBatchSpec):
        from llmcli.server import make_app

        self.spec = spec
        backend = spec.backend
        self.app = make_app(
            backend.load_backend(),
            model_name=backend.name,
            embedder=backend.load_embedder,
            embedding_name=backend.embedding_name,
            max_body=1 << 62,  # a batch line is as large as its file allows
            request_timeout=None,
        )
        self.loop = asyncio.new_event_loop()

    def run(self, items: list[Item]) -> list[Done]:
        async def answer_all() -> list[Done]:
            return list(await asyncio.gather(*(self._answer(item) for item in items)))

        return self.loop.run_until_complete(answer_all())

    def close(self) -> None:
        state = self.app.state.llmcli
        if state.service is not None:
            state.service.shutdown(drain=False, timeout=10.0)
        self.loop.close()

    def _ids(self, index: int) -> tuple[str, str]:
        digest = hashlib.sha256(f"{self.spec.fingerprint}:{index}".encode()).hexdigest()
        return f"batch_req_{digest[:32]}", f"req_{digest[32:64]}"

    async def _answer(self, item: Item) -> Done:
        record = item.record
        record_id, request_id = self._ids(item.index)
        out: dict[str, Any] = {"id": record_id, "custom_id": record["custom_id"], "response": None, "error": None}
        error = envelope_error(record)
        if error is not None:
            out["error"] = error
            return Done(item.index, out, 0, True)
        status, body = await call_app(self.app, record["url"], json.dumps(record.get("body"), ensure_ascii=False).encode("utf-8"))
        out["response"] = {"status_code": status, "request_id": request_id, "body": body}
        usage = body.get("usage") if isinstance(body, dict) else None
        tokens = 0
        if isinstance(usage, dict):
            tokens = usage.get("completion_tokens", usage.get("total_tokens", 0)) or 0
        return Done(item.index, out, tokens, status != 200)


async def call_app(app: Any, path: str, body: bytes) -> tuple[int, Any]:
    """POST body (JSON) to path on an ASGI app in this process: (status, the JSON it answered)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("batch", 0),
        "server": ("batch", 0),
    }
    finished = asyncio.Event()
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()  # the client of a batch never goes away before the answer
        return {"type": "http.disconnect"}

    status = 500
    chunks: list[bytes] = []

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    finally:
        finished.set()
    raw = b"".join(chunks)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"error": {"message": raw.decode("utf-8", "replace"), "type": "server_error", "param": None, "code": None}}
