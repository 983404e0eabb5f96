"""The error types every layer raises; the CLI boundary turns them into one stderr line and an exit code.

Each error carries a message (what went wrong, naming the input) and a hint (how to fix it),
so that `error: <message> (<hint>)` is all a user needs to read.
"""

from __future__ import annotations

# Every character str.splitlines() breaks at: a tensor name or key read from a hostile file must
# not turn a one-line error into several lines (or fake a second one).
_LINE_BREAKS = {c: repr(chr(c))[1:-1] for c in (0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}


def one_line(text: str) -> str:
    """text with its line breaks escaped (\\n, \\r, ...), so that it prints as one line."""
    return text.translate(_LINE_BREAKS)


class LlmcliError(Exception):
    """Base error: one line for people, exit status 1."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        message = one_line(message)
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is None else one_line(hint)

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(LlmcliError):
    """Bad flags or flag combinations: exit status 2, like click's own usage errors."""

    exit_code = 2


class InputError(LlmcliError):
    """A bad input record: names the input and the 1-based line it came from."""

    def __init__(self, message: str, hint: str | None = None, *, line: int | None = None, source: str | None = None):
        self.line = line
        self.source = source
        super().__init__(message, hint)

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        text = ": ".join(where + [self.message])
        if self.source and self.source != "-":
            text += f" (in {self.source})"
        return f"{text}; {self.hint}" if self.hint else text


class ModelError(LlmcliError):
    """A model that cannot be found, read or run: missing files, corrupt weights, unknown architecture."""


class ContextLengthError(InputError):
    """An input longer than the model's context window."""


class OutputClosed(LlmcliError):
    """The reader of stdout went away (`| head -n1`): stop quietly, like any Unix filter (128 + SIGPIPE)."""

    exit_code = 141

    def __init__(self):
        super().__init__("output closed")
