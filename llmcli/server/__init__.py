"""The OpenAI-compatible HTTP server: `make_app` builds the FastAPI app, `run_server` runs it under uvicorn."""

from llmcli.server.app import ApiError, make_app, run_server

__all__ = ["ApiError", "make_app", "run_server"]
