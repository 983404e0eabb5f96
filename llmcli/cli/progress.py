"""Progress on stderr for the commands that run a model over a file: records done, tokens, tokens/s."""

from __future__ import annotations

import time
from typing import Any, Optional


class Progress:
    """Records done, tokens/s and elapsed time on stderr (Rich), never on stdout, which is data;
    or nothing at all when not shown. A context manager: the line stops updating at the end.

    total: the records the run will do, when known (batch): then a bar, done/total and the ETA.
    done: records already done before this run (a resumed batch); they count in done/total, not in tokens/s.
    """

    def __init__(self, verb: str, show: bool = True, total: int | None = None, done: int = 0):
        self.start = time.perf_counter()
        self.tokens = 0
        self.done = done
        self.total = total
        self.bar = None
        if show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            columns: list = [SpinnerColumn(), TextColumn("{task.description}")]
            if total is not None:
                columns += [BarColumn(), MofNCompleteColumn(), TextColumn("ETA"), TimeRemainingColumn()]
            self.bar = RichProgress(*columns, TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task(verb, total=total, completed=done)
            self.bar.start()

    @property
    def rate(self) -> float:
        """Tokens per second since the start."""
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def advance(self, records: int = 0, tokens: int = 0) -> None:
        self.done += records
        self.tokens += tokens
        if self.bar is not None:
            if self.total is not None:
                self.bar.update(self.task, completed=self.done, description=f"{self.tokens} tokens, {self.rate:.1f} tok/s")
            else:
                self.bar.update(self.task, description=f"{self.done} records, {self.tokens} tokens, {self.rate:.1f} tok/s")

    def on_event(self, event: Any) -> None:
        """An engine Event: one more token when it carries one."""
        self.advance(tokens=int(event.token is not None))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def make_progress(flag: Optional[bool], verb: str, total: int | None = None, done: int = 0) -> Progress:
    """Progress shown when --progress asks for it, or by default when stderr is a terminal."""
    from llmcli.cli.options import wants_progress

    return Progress(verb, show=wants_progress(flag), total=total, done=done)
