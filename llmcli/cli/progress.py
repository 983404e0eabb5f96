"""Progress on stderr for the commands that run a model over a file: records done, tokens, tokens/s."""

from __future__ import annotations

import time
from typing import Any, Optional


class Progress:
    """Records done, tokens/s and elapsed time on stderr (Rich), never on stdout, which is data;
    or nothing at all when not shown. A context manager: the line stops updating at the end."""

    def __init__(self, verb: str, show: bool = True):
        self.start = time.perf_counter()
        self.tokens = 0
        self.done = 0
        self.bar = None
        if show:
            from rich.console import Console
            from rich.progress import Progress as RichProgress
            from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task(verb, total=None)
            self.bar.start()

    def advance(self, records: int = 0, tokens: int = 0) -> None:
        self.done += records
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.update(self.task, description=f"{self.done} records, {self.tokens} tokens, {rate:.1f} tok/s")

    def on_event(self, event: Any) -> None:
        """An engine Event: one more token when it carries one."""
        self.advance(tokens=int(event.token is not None))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def make_progress(flag: Optional[bool], verb: str) -> Progress:
    """Progress shown when --progress asks for it, or by default when stderr is a terminal."""
    from llmcli.cli.options import wants_progress

    return Progress(verb, show=wants_progress(flag))
