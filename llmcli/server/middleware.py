"""The ASGI middleware in front of every route: draining (503), API key (401), body size (413) and
the HTTP counters that /metrics reports."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from llmcli.server.errors import FAILURE_COUNTED, ApiError, shutting_down
from llmcli.server.state import ServerState

# the routes that use a model: an error answer from any of them counts in llmcli_requests_failed_total
MODEL_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize"})
# the routes that answer without the API key
OPEN_ROUTES = frozenset({"/health", "/"})


class Guard:
    """Draining (503), API key (401; not for /health and the chat page), body size (413) and HTTP metrics, before any route runs."""

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
            if failed and path in MODEL_ROUTES and not scope.get(FAILURE_COUNTED):
                self.state.http.fail()

    async def _guarded(self, scope, receive, send, path):
        state = self.state
        if state.draining and path != "/metrics":
            if path == "/health":
                return await JSONResponse({"status": "draining"}, status_code=503)(scope, receive, send)
            return await shutting_down().response({"Connection": "close"})(scope, receive, send)
        # the chat page holds no data: it loads without the key, and sends the one typed into it
        if state.api_key is not None and path not in OPEN_ROUTES:
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
