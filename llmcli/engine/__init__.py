"""Batching and scheduling shared by `generate`, `chat` and `serve`: one engine, many requests."""

from llmcli.engine.batcher import ContinuousBatcher, Event
from llmcli.engine.engine import Engine

__all__ = ["ContinuousBatcher", "Engine", "Event"]
