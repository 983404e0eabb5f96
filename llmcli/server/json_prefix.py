"""A JSON text read a piece at a time, as a model writes it: is it still the start of valid JSON,
where do the members of its top-level object lie, and how far can it be closed into valid JSON.

server/tools.py streams a tool call's arguments with it: the head of a call goes out once its
`name` member is read, argument text goes out only as far as `closing()` can turn it into valid
JSON, and a cut-off call is closed with `closing()`. Strict JSON (RFC 8259): no NaN or Infinity,
no control characters in strings, whitespace is space, tab, CR and LF.
"""

from __future__ import annotations

import json
import re

_WHITESPACE = " \t\n\r"
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_LITERALS = ("true", "false", "null")
_ESCAPES = frozenset('"\\/bfnrt')
_HEX = frozenset("0123456789abcdefABCDEF")
_CLOSER = {"{": "}", "[": "]"}


class JsonPrefix:
    """One JSON value read character by character; reading stops at its end or at the first
    character that no valid JSON could have there (`broken`)."""

    def __init__(self) -> None:
        self.text = ""
        self.broken = False
        self.done = False  # the top-level value is complete
        self.start: int | None = None  # where the top-level value begins (after leading whitespace)
        self.members: dict[str, tuple[int, int]] = {}  # the top-level object's finished members: key -> value's span in text
        self.duplicate = False  # a top-level key came twice (json.loads would keep the last, a stream has sent the first)
        self.key: str | None = None  # the top-level key whose value is being read
        self.value_start: int | None = None  # where that value begins, once it has
        self.safe = 0  # the longest prefix of text that closing() makes valid JSON
        self._safe_in_string = False
        self._stack: list[str] = []  # open containers, "{" or "["
        self._expect = "value"  # value | value_or_end | key | key_or_end | colon | comma_or_end | done
        self._string: str | None = None  # "key" or "value" while inside a string
        self._escape = 0  # -1 right after a backslash, 1..4: hex digits of a \u escape still to come
        self._token = ""  # the number or literal being read
        self._key_start = 0
        self._chunk = ""  # the piece being read (text holds the pieces before it)

    def feed(self, text: str) -> int:
        """Read `text`; returns how many of its characters were read (fewer when the value ended or broke)."""
        base, read = len(self.text), len(text)
        self._chunk = text
        for n, c in enumerate(text):
            if self.done or self.broken:
                read = n
                break
            self._step(base + n, c)
            if self.broken:
                read = n
                break
        self.text += text[:read]  # once per piece: a long argument read character by character stays linear
        return read

    def span(self, key: str) -> tuple[int, int | None] | None:
        """Where the top-level member `key`'s value lies: (start, end), end None while it is being read."""
        if key in self.members:
            return self.members[key]
        if key == self.key and self.value_start is not None:
            return self.value_start, None
        return None

    def closing(self, depth: int = 0) -> str:
        """What closes text[:safe] into valid JSON, for the containers opened below `depth` (0: all)."""
        quote = '"' if self._safe_in_string else ""
        return quote + "".join(_CLOSER[c] for c in reversed(self._stack[depth:]))

    def _step(self, i: int, c: str) -> None:
        if self._string is not None:
            self._string_char(i, c)
        else:
            if self._token:
                if c in _NUMBER_CHARS if self._token[0] not in "tfn" else c.isalpha():
                    self._token += c
                    if self._token[0] in "tfn" and not any(lit.startswith(self._token) for lit in _LITERALS):
                        self.broken = True
                    else:
                        self._mark(i)
                    return
                if not (self._token in _LITERALS or _NUMBER.fullmatch(self._token)):
                    self.broken = True
                    return
                self._token = ""
                self._value_done(i)
            if c not in _WHITESPACE:
                self._structure(i, c)
        if not self.broken:
            self._mark(i)

    def _string_char(self, i: int, c: str) -> None:
        if self._escape == -1:
            if c == "u":
                self._escape = 4
            elif c in _ESCAPES:
                self._escape = 0
            else:
                self.broken = True
        elif self._escape > 0:
            if c not in _HEX:
                self.broken = True
            self._escape -= 1
        elif c == "\\":
            self._escape = -1
        elif c == '"':
            kind, self._string = self._string, None
            if kind == "value":
                self._value_done(i + 1)
                return
            self._expect = "colon"
            if len(self._stack) == 1:
                self.key = json.loads((self.text + self._chunk)[self._key_start : i + 1])
                self.duplicate = self.duplicate or self.key in self.members
        elif c < " ":
            self.broken = True

    def _structure(self, i: int, c: str) -> None:
        expect = self._expect
        if expect in ("value", "value_or_end") and c != "]":
            if c in "{[":
                self._value_begins(i)
                self._stack.append(c)
                self._expect = "key_or_end" if c == "{" else "value_or_end"
            elif c == '"':
                self._value_begins(i)
                self._string = "value"
            elif c in "-0123456789tfn":
                self._value_begins(i)
                self._token = c
            else:
                self.broken = True
        elif expect in ("key", "key_or_end") and c == '"':
            self._string = "key"
            self._key_start = i
        elif expect == "colon" and c == ":":
            self._expect = "value"
        elif expect == "comma_or_end" and c == ",":
            self._expect = "key" if self._stack[-1] == "{" else "value"
        elif expect in ("key_or_end", "value_or_end", "comma_or_end") and self._stack and c == _CLOSER[self._stack[-1]]:
            self._stack.pop()
            self._value_done(i + 1)
        else:
            self.broken = True

    def _value_begins(self, i: int) -> None:
        if not self._stack:
            self.start = i
        elif len(self._stack) == 1 and self._stack[0] == "{":
            self.value_start = i

    def _value_done(self, end: int) -> None:
        if not self._stack:
            self._expect = "done"
            self.done = True
            return
        self._expect = "comma_or_end"
        if len(self._stack) == 1 and self._stack[0] == "{" and self.key is not None and self.value_start is not None:
            self.members.setdefault(self.key, (self.value_start, end))  # a duplicate's first value: what a stream sent
            self.key = self.value_start = None

    def _mark(self, i: int) -> None:
        """Note i + 1 as safe when closing() can end the text there: inside a string value (not in an
        escape), after a whole number or literal, after an opening bracket or a whole value."""
        if self._string is not None:
            ok = self._string == "value" and self._escape == 0
        elif self._token:
            ok = self._token in _LITERALS or _NUMBER.fullmatch(self._token) is not None
        else:
            ok = self._expect in ("key_or_end", "value_or_end", "comma_or_end", "done")
        if ok:
            self.safe = i + 1
            self._safe_in_string = self._string is not None
