"""The OpenAI-compatible HTTP server: `make_app` builds the FastAPI app, `run_server` runs it under uvicorn."""

from llmcli.server.app import make_app
from llmcli.server.errors import ApiError
from llmcli.server.runner import run_server

__all__ = ["ApiError", "make_app", "run_server"]
