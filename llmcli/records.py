"""The pipe format: JSONL records in and out, the field names, and the tensor codec.

One UTF-8 JSON object per line. A stage copies every field it does not own and adds its own;
`id` is kept (the 1-based line number when absent). Tensors travel as
`{"dtype": "float32", "shape": [...], "data": "<base64 little-endian row-major bytes>"}` so they
pass through any number of stages bit for bit; `--floats` writes nested lists instead.

This module imports numpy only inside the tensor codec, and never torch, so tokenize and decode start fast.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator

from llmcli.errors import InputError, OutputClosed

if TYPE_CHECKING:
    import numpy as np

# Field names: the one place they are spelled.
ID = "id"
TEXT = "text"
IDS = "ids"
TOKENS = "tokens"
OFFSETS = "offsets"
COUNT = "count"
EMBEDDINGS = "embeddings"
EMBEDDING = "embedding"
HIDDEN = "hidden"
ATTENTION = "attention"
GENERATED_IDS = "generated_ids"
FINISH_REASON = "finish_reason"
COMPLETION = "completion"
LOGPROBS = "logprobs"
PROMPT_LOGPROBS = "prompt_logprobs"
CACHED_TOKENS = "cached_tokens"
MESSAGES = "messages"
PROMPT = "prompt"
REPLY = "reply"
SAMPLES = "samples"
SAMPLE = "sample"
DELTA = "delta"
USAGE = "usage"
ERROR = "error"
RESPONSE_FORMAT = "response_format"

# Which stage makes each field: used in "missing field" errors so the fix is concrete.
MADE_BY = {
    TEXT: "your input (one JSON object per line with a `text` field, or plain text lines to `llmcli tokenize`)",
    IDS: "llmcli tokenize",
    EMBEDDINGS: "llmcli encode",
    HIDDEN: "llmcli attend",
    GENERATED_IDS: "llmcli generate",
    MESSAGES: "your input (a list of {role, content} objects)",
}

TENSOR_DTYPES = {"float32", "float16", "bfloat16", "float64", "int32", "int64"}


# ---------------------------------------------------------------- tensor codec


def encode_tensor(array: Any, floats: bool = False) -> Any:
    """A numpy array (or anything np.asarray takes) as a JSON-ready tensor object, or nested lists."""
    import numpy as np

    arr = np.asarray(array)
    if floats:
        return arr.tolist()
    dtype = str(arr.dtype)
    if dtype not in TENSOR_DTYPES:
        arr = arr.astype(np.float32)
        dtype = "float32"
    data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return {"dtype": dtype, "shape": list(arr.shape), "data": base64.b64encode(data).decode("ascii")}


class SpooledTensor:
    """A float32 tensor field too large to hold whole (attend's [layers, heads, T, T] attention),
    encoded piece by piece as it is produced: the base64 text goes to a temporary file, and
    RecordWriter copies it into the record's line. The line is byte for byte what encode_tensor
    of the whole array writes; only one piece is ever in memory.
    """

    CHUNK = 3 << 18  # bytes encoded at once: a multiple of 3, so the pieces of text join seamlessly

    def __init__(self, shape: list[int]):
        import tempfile

        self.shape = list(shape)
        self.file = tempfile.TemporaryFile()
        self._rest = b""  # the bytes after the last whole 3-byte group: base64 pieces join only at such boundaries

    def append(self, array: Any) -> None:
        """The next values in C order (any shape; its size is what counts)."""
        import numpy as np

        data = memoryview(np.ascontiguousarray(array, dtype="<f4")).cast("B")
        if self._rest:  # complete the group the last piece left open
            take = 3 - len(self._rest)
            head, data = self._rest + bytes(data[:take]), data[take:]
            if len(head) < 3:
                self._rest = head
                return
            self.file.write(base64.b64encode(head))
        whole = len(data) - len(data) % 3
        for start in range(0, whole, self.CHUNK):  # in slices, so the text never costs a whole layer more
            self.file.write(base64.b64encode(data[start : min(start + self.CHUNK, whole)]))
        self._rest = bytes(data[whole:])

    def iter_text(self, size: int = 1 << 20) -> Iterator[str]:
        """The base64 text of everything appended (closing the last group first)."""
        if self._rest:
            self.file.write(base64.b64encode(self._rest))
            self._rest = b""
        self.file.seek(0)
        for piece in iter(lambda: self.file.read(size), b""):
            yield piece.decode("ascii")

    def close(self) -> None:
        self.file.close()


def decode_tensor(value: Any, field: str = "tensor", line: int | None = None) -> "np.ndarray":
    """The inverse of encode_tensor; also accepts nested lists (from --floats)."""
    import numpy as np

    if isinstance(value, dict):
        try:
            dtype = value["dtype"]
            shape = [int(s) for s in value["shape"]]
            raw = base64.b64decode(value["data"], validate=True)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"`{field}` is not a tensor object ({exc})",
                'a tensor is {"dtype": ..., "shape": [...], "data": "<base64>"} as written by llmcli',
                line=line,
            ) from None
        if dtype not in TENSOR_DTYPES or dtype == "bfloat16":
            raise InputError(f"`{field}` has unsupported dtype {dtype!r}", f"use one of {sorted(TENSOR_DTYPES - {'bfloat16'})}", line=line)
        np_dtype = np.dtype(dtype).newbyteorder("<")
        expected = int(np.prod(shape)) * np_dtype.itemsize
        if len(raw) != expected:
            raise InputError(
                f"`{field}` data has {len(raw)} bytes but shape {shape} of {dtype} needs {expected}",
                "the record was truncated or edited; regenerate it",
                line=line,
            )
        return np.frombuffer(raw, dtype=np_dtype).reshape(shape).astype(np.dtype(dtype), copy=False)
    if isinstance(value, list):
        try:
            return np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(f"`{field}` is a ragged or non-numeric list", "write a rectangular list of numbers", line=line) from None
    raise InputError(f"`{field}` must be a tensor object or a list of numbers", None, line=line)


# ---------------------------------------------------------------- reading


@dataclass
class Line:
    """One input line: its 1-based number and the parsed record."""

    number: int
    record: dict


def _invalid_utf8(exc: UnicodeDecodeError, number: int, source: str) -> InputError:
    return InputError(
        f"invalid UTF-8 at byte offset {exc.start} of the line",
        "convert the input to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
        line=number,
        source=source,
    )


# A JSON string escape that decodes to half of a UTF-16 surrogate pair (\ud800-\udfff). Raw UTF-8
# cannot hold a surrogate (the strict decoder refuses one), so only a line with such an escape
# can carry one: the others skip the walk over their values.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def find_lone_surrogate(value: Any, path: str = "") -> tuple[str, str] | None:
    """(where, character) for the first string in a JSON value, key or value, that holds a lone
    UTF-16 surrogate (a character no UTF-8 text, tokenizer or writer can take), or None.
    `where` is a path like `text` or `messages[0].content` ("" for the value itself)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # UTF-8 has no encoding for U+D800..U+DFFF
            return path, value[exc.start]
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            found = find_lone_surrogate(key, f"a key in {path}" if path else "a key") or find_lone_surrogate(item, where)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = find_lone_surrogate(item, f"{path}[{i}]")
            if found:
                return found
    return None


def parse_json_line(text: str, number: int, source: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"malformed JSON ({exc.msg} at column {exc.colno})",
            "each line must be one JSON object; pass plain text to `llmcli tokenize --lines`",
            line=number,
            source=source,
        ) from None
    if not isinstance(record, dict):
        raise InputError(
            f"expected a JSON object, got {type(record).__name__}",
            'wrap the value in an object, e.g. {"text": ...}',
            line=number,
            source=source,
        )
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        found = find_lone_surrogate(record)
        if found is not None:
            where, char = found
            raise InputError(
                f"`{where or 'the record'}` holds a lone UTF-16 surrogate (\\u{ord(char):04x}), which is no character",
                "write the character itself, or both halves of its surrogate pair (\\ud83d\\ude42 is U+1F642)",
                line=number,
                source=source,
            )
    return record


UTF8_BOM = b"\xef\xbb\xbf"


def strip_bom(data: bytes) -> bytes:
    """The bytes without a leading UTF-8 byte order mark (what Python's `utf-8-sig` drops)."""
    return data[len(UTF8_BOM) :] if data.startswith(UTF8_BOM) else data


class LineReader:
    """The lines of a binary stream, (number, bytes without the newline), each as soon as it is complete.

    It reads whatever the stream already holds in one call (`read1`, up to CHUNK bytes) and hands
    out those lines before reading again. `before_read`, when given, is called each time every
    line read so far has been taken and the next read may wait for input: the moment for a stage
    that gathers lines to finish the ones it holds, so that it never waits with a line unanswered.
    A UTF-8 byte order mark at the very start of the stream (Windows editors write one) is dropped.
    """

    CHUNK = 1 << 16

    def __init__(self, stream: IO[bytes], before_read: Callable[[], None] | None = None):
        self.stream = stream
        self.before_read = before_read
        self._read1 = getattr(stream, "read1", None)
        self._lines: list[bytes] = []  # complete lines read and not yet taken, from _next on
        self._next = 0
        self._tail: list[bytes] = []  # the pieces of a line whose newline has not arrived
        self._eof = False
        self.number = 0

    def __iter__(self) -> "LineReader":
        return self

    def __next__(self) -> tuple[int, bytes]:
        while self._next >= len(self._lines):
            if self._eof:
                raise StopIteration
            if self.before_read is not None:
                self.before_read()
            self._fill()
        raw = self._lines[self._next]
        self._next += 1
        self.number += 1
        if self.number == 1:
            raw = strip_bom(raw)
        return self.number, raw

    def _fill(self) -> None:
        chunk = self._read1(self.CHUNK) if self._read1 is not None else self.stream.readline()
        self._next = 0
        if not chunk:
            self._eof = True
            # a last line without a newline is kept as it is, \r and all
            self._lines = [b"".join(self._tail)] if self._tail else []
            self._tail = []
            return
        if b"\n" not in chunk:
            self._lines = []
            self._tail.append(chunk)
            return
        if self._tail:
            chunk = b"".join(self._tail) + chunk
        lines = chunk.split(b"\n")
        last = lines.pop()
        self._tail = [last] if last else []
        self._lines = [line.rstrip(b"\r") for line in lines]


def iter_raw_lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(number, bytes without the newline) for every line, as soon as it arrives."""
    return iter(LineReader(stream))


def iter_line_results(stream: "IO[bytes] | LineReader", source: str = "-", mode: str = "jsonl") -> Iterator["Line | InputError"]:
    """What iter_lines reads, with each bad line's InputError yielded in its place instead of raised,
    so that a caller still holding earlier lines can finish them first."""
    lines = stream if isinstance(stream, LineReader) else LineReader(stream)
    for number, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _invalid_utf8(exc, number, source)
            continue
        if mode == "auto":
            if not text.strip():
                continue
            mode = "jsonl" if text.lstrip().startswith("{") else "lines"
        if mode == "lines":
            record: dict = {TEXT: text, ID: number}
        else:
            if not text.strip():
                continue
            try:
                record = parse_json_line(text, number, source)
            except InputError as exc:
                yield exc
                continue
            record.setdefault(ID, number)
        yield Line(number, record)


def iter_lines(stream: "IO[bytes] | LineReader", source: str = "-", mode: str = "jsonl") -> Iterator[Line]:
    """Records from a binary stream.

    mode "jsonl": every non-blank line is a JSON object. mode "lines": every line is `{"text": line}`.
    mode "auto": JSONL when the first non-blank line starts with "{", plain lines otherwise.
    Records without `id` get their line number. A bad line raises its InputError (the commands'
    --skip-errors, which skips it instead, is cli/stage.py's BadLines, over iter_line_results).
    """
    for item in iter_line_results(stream, source, mode):
        if isinstance(item, InputError):
            raise item
        yield item


def require(record: dict, field: str, number: int | None = None, stage: str | None = None) -> Any:
    """The value of a field, or an error that names the stage that makes it."""
    if field not in record:
        maker = MADE_BY.get(field)
        hint = f"pipe through `{maker}` first" if maker and maker.startswith("llmcli") else (f"expected from {maker}" if maker else None)
        raise InputError(f"no `{field}` in the record" + (f" for {stage}" if stage else ""), hint, line=number)
    return record[field]


def require_ids(record: dict, number: int | None, field: str = IDS, vocab_size: int | None = None) -> list[int]:
    """A list of token ids, checked to be integers inside the vocabulary."""
    ids = require(record, field, number)
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InputError(f"`{field}` must be a list of integers", "use the output of `llmcli tokenize`", line=number)
    if vocab_size is not None:
        bad = [i for i in ids if i < 0 or i >= vocab_size]
        if bad:
            raise InputError(
                f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})",
                "the ids come from another model's tokenizer; tokenize with the same --model",
                line=number,
            )
    return ids


ROLES = ("system", "user", "assistant")


def check_messages(messages: Any, number: int | None = None) -> list[dict]:
    """A chat as a non-empty list of {"role", "content"} objects with string fields and known roles."""
    if not isinstance(messages, list) or not messages:
        raise InputError("`messages` must be a non-empty list of {role, content} objects", 'e.g. [{"role": "user", "content": "Hi"}]', line=number)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"messages[{i}] must be an object with string `role` and `content`", 'e.g. {"role": "user", "content": "Hi"}', line=number)
        if m["role"] not in ROLES:
            raise InputError(f"messages[{i}] has role {m['role']!r}", f"use one of {', '.join(ROLES)}", line=number)
        out.append({"role": m["role"], "content": m["content"]})
    return out


# ---------------------------------------------------------------- writing


# json.dumps(record, ensure_ascii=False, separators=(",", ":")), without building an encoder per record
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class _HeldInterrupt:
    """A Ctrl-C that arrives while the main thread writes a record is raised once the line is out.

    CPython runs signal handlers between the pieces of a write that the OS took only in part (a
    full pipe), so a KeyboardInterrupt raised there would leave the reader half a line. During a
    write this SIGINT handler only notes the signal; RecordWriter hands it on to the handler it
    replaced when the write is done. A second Ctrl-C during the same write is handed on at once:
    a reader that never reads must not make the writer unstoppable.
    """

    def __init__(self) -> None:
        self.previous: Callable[[int, Any], Any] | None = None
        self.writing = False
        self.pending: tuple[int, Any] | None = None

    def install(self) -> None:
        """Take over SIGINT: from the main thread only, and only where Python handles it (not SIG_IGN or SIG_DFL)."""
        if threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGINT)
        if current == self.handle or not callable(current):
            return
        self.previous = current
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        if self.writing and self.pending is None:
            self.pending = (signum, frame)
            return
        self.pending = None
        if self.previous is not None:
            self.previous(signum, frame)  # Python's default handler, or the CLI's: raises KeyboardInterrupt

    def release(self) -> None:
        self.writing = False
        if self.pending is not None:
            self.handle(*self.pending)


_HELD_INTERRUPT = _HeldInterrupt()
_MAIN_THREAD_ID = threading.main_thread().ident


class RecordWriter:
    """Writes one record per line, each in a single write and flushed, so a reader never sees half a record.

    Not even on Ctrl-C: one that arrives during a write is raised after it (see _HeldInterrupt).
    """

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.count = 0
        # The bytes under a text stream, written directly: when a signal handler returns during a
        # large write, BufferedWriter.write can return a short count, which TextIOWrapper.write drops.
        buffer = getattr(stream, "buffer", None)
        encoding = getattr(stream, "encoding", None)
        self._bytes: IO[bytes] | None = buffer if os.name == "posix" and buffer is not None and isinstance(encoding, str) else None
        self._encoding = encoding or "utf-8"
        self._errors = getattr(stream, "errors", None) or "strict"
        _HELD_INTERRUPT.install()

    def write(self, record: dict) -> None:
        if any(isinstance(v, SpooledTensor) for v in record.values()):
            self._write_spooled(record)
        else:
            self.write_text(_dumps(record) + "\n")
        self.count += 1

    def _write_spooled(self, record: dict) -> None:
        """A record with SpooledTensor values, in pieces (each tensor's text straight from its file)
        but still one whole line: Ctrl-C is held from the first piece to the newline."""
        spooled = {key: value for key, value in record.items() if isinstance(value, SpooledTensor)}
        marks = {key: f"\x00spooled {i}\x00" for i, key in enumerate(spooled)}  # no record string holds a NUL marker like it
        text = _dumps({key: {"dtype": "float32", "shape": spooled[key].shape, "data": marks[key]} if key in spooled else value for key, value in record.items()})
        with self._holding():
            for key, tensor in spooled.items():
                before, _, text = text.partition(_dumps(marks[key]))
                self._write_raw(before + '"')
                for piece in tensor.iter_text():
                    self._write_raw(piece)
                self._write_raw('"')
                tensor.close()
            self._write_raw(text + "\n")

    def write_many(self, records: list[dict]) -> None:
        """Several records in one write and one flush (each still one whole line)."""
        if records:
            self.write_text("\n".join(map(_dumps, records)) + "\n")
            self.count += len(records)

    def write_text(self, text: str) -> None:
        with self._holding():
            self._write_raw(text)

    @contextlib.contextmanager
    def _holding(self) -> Iterator[None]:
        """Ctrl-C held until the block ends; a closed reader becomes OutputClosed."""
        hold = threading.get_ident() == _MAIN_THREAD_ID and not _HELD_INTERRUPT.writing  # signal handlers run in the main thread only
        if hold:
            _HELD_INTERRUPT.writing = True
        try:
            yield
        except BrokenPipeError:
            raise OutputClosed() from None
        finally:
            if hold:
                _HELD_INTERRUPT.release()

    def _write_raw(self, text: str) -> None:
        if self._bytes is None:
            self.stream.write(text)
        else:
            self.stream.flush()  # anything written to the text stream before, first
            data = memoryview(text.encode(self._encoding, self._errors))
            while data:
                data = data[self._bytes.write(data) :]
        self.stream.flush()


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
