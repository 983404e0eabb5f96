"""Errors as OpenAI shapes them: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

`ApiError` is what routes raise; `api_error_from` maps llmcli's own errors to a status and type;
`install_error_handlers` makes every other failure (a bad body, an unknown route, a bug) leave in
the same shape.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmcli.engine.service import QueueFull, ServiceClosed
from llmcli.errors import ContextLengthError, InputError, LlmcliError, UsageError

# set in the ASGI scope when the engine has already counted a request's failure
FAILURE_COUNTED = "llmcli.failure_counted"
# what a 429 tells a client to wait, in seconds: the queue moves as requests finish, and OpenAI's
# clients back off further on their own when the next try is refused again
RETRY_AFTER_S = 1


class ApiError(Exception):
    """An error with its HTTP status, in OpenAI's error fields."""

    counted = False  # True when the engine has counted the failure already (a generation that failed)

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers={**(self.headers or {}), **(headers or {})} or None)


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down and takes no new requests", "server_error", None, "shutting_down")


def timed_out(seconds: float) -> ApiError:
    return ApiError(504, f"the request ran longer than the server's --request-timeout of {seconds:g} s and was stopped", "timeout_error", None, "request_timeout")


def api_error_from(exc: LlmcliError, param: str | None = None) -> ApiError:
    """The HTTP status and OpenAI type for one of llmcli's own errors."""
    text = str(exc)
    if isinstance(exc, QueueFull):
        return ApiError(429, text, "requests", None, "rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, ServiceClosed):
        return ApiError(503, text, "server_error", None, "shutting_down")
    if isinstance(exc, ContextLengthError):
        return ApiError(400, text, "invalid_request_error", param, "context_length_exceeded")
    if isinstance(exc, (UsageError, InputError)):
        return ApiError(400, text, "invalid_request_error", param, None)
    return ApiError(500, text, "server_error", None, None)


def loc_param(loc: tuple) -> str | None:
    """pydantic's error location as OpenAI's `param`: ("body", "messages", 0, "content") -> "messages.0.content"."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) if parts else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.counted:
            request.scope[FAILURE_COUNTED] = True
        return exc.response()

    @app.exception_handler(LlmcliError)
    async def _llmcli_error(_request: Request, exc: LlmcliError):
        return api_error_from(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = loc_param(tuple(first.get("loc", ())))
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
