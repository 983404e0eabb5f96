"""GET /: the chat page, one static HTML file with its script inline (no CDN, no build step), which
talks to /v1/chat/completions like any other client."""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@functools.cache
def chat_page() -> str:
    return resources.files("llmcli.server").joinpath("static/chat.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return HTMLResponse(chat_page())
