"""GET /health (503 while the model loads), /metrics (Prometheus text) and /v1/models."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from llmcli.server import metrics as prom
from llmcli.server.state import State

router = APIRouter()


@router.get("/health")
async def health(state: State):
    if state.load_error is not None:
        return JSONResponse({"status": "error", "error": str(state.load_error)}, status_code=503)
    if not state.loaded:
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(state: State):
    text = prom.render(state.service, state.http, state.model_name, state.loaded, state.draining)
    return Response(text, media_type=prom.CONTENT_TYPE)


@router.get("/v1/models")
async def models(state: State):
    data = [{"id": name, "object": "model", "created": state.created, "owned_by": "llmcli"} for name in state.served_models()]
    return {"object": "list", "data": data}
