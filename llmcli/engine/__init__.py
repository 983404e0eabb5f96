"""Batching and scheduling shared by `generate`, `chat` and `serve`: one engine, many requests.

The names below load on first use (PEP 562), so that a torch-free submodule (backend.py,
encode_records.py's checks) can be imported by a command that must start without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"ContinuousBatcher": "llmcli.engine.batcher", "Event": "llmcli.engine.batcher", "Engine": "llmcli.engine.engine"}

__all__ = ["ContinuousBatcher", "Engine", "Event"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
