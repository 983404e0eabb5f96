"""The shared stage runner: records in, records out, and what a command does with a bad line.

open_input / check_output / open_output turn the input argument and --output into streams;
BadLines is the one place where --skip-errors decides whether a bad line stops the run or is
counted and skipped; run_stage and run_batched_stage are the loop of every record-to-record
command (tokenize, decode, encode, attend); generate and chat, which feed an engine, use
BadLines.results directly. `say` writes a line for people on stderr.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterable, Iterator, Optional, TypeVar

from llmcli.errors import InputError, UsageError

if TYPE_CHECKING:
    from llmcli.records import Line

T = TypeVar("T")


def say(message: str) -> None:
    """One line for people on stderr (never stdout: stdout is data)."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


class BadLines:
    """What --skip-errors does with the bad lines of one input.

    Without it, the first bad line stops the run: fail() raises its InputError (named by
    source and line). With it, fail() reports the line on stderr, counts it and returns, and
    report() says at the end how many lines were skipped.
    """

    def __init__(self, source: str, skip_errors: bool):
        self.source = source
        self.skip_errors = skip_errors
        self.count = 0

    def fail(self, exc: InputError, number: int | None = None) -> None:
        """Raise exc (a bad line), or report and count it and return when bad lines are skipped."""
        if exc.line is None:
            exc.line = number
        if exc.source is None:
            exc.source = self.source
        if not self.skip_errors:
            raise exc
        self.count += 1
        say(f"skipped: {exc}")

    def results(self, stream: IO[bytes], transform: Callable[[Line], T], mode: str = "jsonl") -> Iterator[tuple[Line, T]]:
        """(line, transform(line)) for every good line of stream; a line that is not a record, or
        whose transform raises an InputError, goes to fail()."""
        from llmcli.records import iter_line_results

        for line in iter_line_results(stream, self.source, mode):
            if isinstance(line, InputError):
                self.fail(line, line.line)
                continue
            try:
                result = transform(line)
            except InputError as exc:
                self.fail(exc, line.number)
                continue
            yield line, result

    def report(self) -> None:
        """The closing line on stderr: how many lines were skipped, if any."""
        if self.count:
            say(f"skipped {self.count} bad line(s) of {self.source}")


def open_input(path: str, kind: str = "JSONL file") -> tuple[IO[bytes], str]:
    """A binary stream and the name to use for it in messages; `kind` is what the command reads, for the hints."""
    if path == "-":
        return sys.stdin.buffer, "-"
    p = Path(path)
    if not p.exists():
        raise UsageError(f"input file {path} does not exist", f"give a path to a {kind}, or '-' for stdin")
    if p.is_dir():
        raise UsageError(f"input {path} is a directory", f"give a {kind}, or '-' for stdin")
    return open(p, "rb"), path


def check_output(output: "str | os.PathLike | None", *inputs: "str | os.PathLike | None", flag: str = "--output") -> None:
    """Refuse an output file that is one of the files the command reads, before anything opens it.

    Opening the output truncates it, so `tokenize s.jsonl -o s.jsonl` would read an empty input
    and destroy it. Files are compared by device and inode after following links, so a symlink
    or a hard link to the input is caught, and '-' is compared when stdin is that file
    (`< s.jsonl`). An output that does not exist yet, or is not a regular file (/dev/stdout, a
    terminal), is never an input. Every command with -o calls this first, before loading a model.
    """
    if output is None or str(output) == "-":
        return
    try:
        out = os.stat(output)
    except OSError:
        return
    if not stat.S_ISREG(out.st_mode):
        return
    for path in inputs:
        if path is None:
            continue
        try:
            st = os.fstat(sys.stdin.fileno()) if str(path) == "-" else os.stat(path)
        except (OSError, ValueError):  # no such file (open_input says so), or a stdin without a file descriptor
            continue
        if (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
            what = "the file on stdin" if str(path) == "-" else f"the input file {path}"
            raise UsageError(f"{flag} {output} is {what}; writing it would destroy the input", "write to another file and rename it afterwards")


def open_output(path: Optional[str]) -> IO[str]:
    """The stream for --output (stdout for None or '-'); call check_output(path, <inputs>) before.

    A regular file is written under a temporary name beside it (tempfiles.owned_tmp) and renamed
    into place when the command ends, whether it succeeds or stops at a bad line (every record
    in it is whole either way): a run killed outright (kill -9, a power cut) leaves the old file,
    or none, never a cut one. The leftovers of such runs are removed by the next run that writes
    the same file. A terminal, a FIFO or /dev/stdout is written directly, and so is any file when
    no command runs (run_stage called from Python: the caller owns the file).
    """
    if path is None or path == "-":
        return sys.stdout
    target = Path(os.path.realpath(path))  # through a symlink: the link stays, its file is replaced
    try:
        if _command_context is None or (target.exists() and not target.is_file()):  # called from Python, or not a file
            return open(path, "w", encoding="utf-8")
        from llmcli.tempfiles import owned_tmp, remove_dead_tmp

        remove_dead_tmp(target.parent, target.name)
        tmp = owned_tmp(target)
        stream = open(tmp, "w", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}", "choose a writable --output path") from None
    _on_command_end(lambda: _rename_into_place(stream, tmp, target))
    return stream


def _rename_into_place(stream: IO[str], tmp: Path, target: Path) -> None:
    if stream.closed:
        return
    try:
        stream.close()
    except OSError:  # a full disk at the last flush: the records would be cut, so keep the old file
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


# The running command's context (the group's callback sets it): what must happen when the command
# ends is registered there. None when no command runs (run_stage called from Python).
_command_context = None


def enter_command(ctx) -> None:
    """Called as a command starts with its group's typer.Context, which closes when it ends."""
    global _command_context
    _command_context = ctx
    if ctx is not None:
        ctx.call_on_close(lambda: enter_command(None))  # runs last: callbacks run in reverse order


def _on_command_end(callback: Callable[[], None]) -> None:
    """Run callback when the running command ends (its context closes after success and error alike)."""
    _command_context.call_on_close(callback)


def run_stage(
    input: str,
    output: Optional[str],
    transform: Callable[[dict, int], dict | Iterable[dict]],
    *,
    mode: str = "jsonl",
    skip_errors: bool = False,
) -> int:
    """Read records, transform each one, write each result as soon as it is ready.

    transform(record, line_number) returns a record (or several). An InputError from a line
    stops the run (every earlier record is already written) unless skip_errors is set.
    Returns the number of records written.
    """
    from llmcli.records import RecordWriter

    check_output(output, input)
    stream, source = open_input(input)
    writer = RecordWriter(open_output(output))
    bad = BadLines(source, skip_errors)
    for _, result in bad.results(stream, lambda line: transform(line.record, line.number), mode):
        for rec in [result] if isinstance(result, dict) else result:
            writer.write(rec)
    bad.report()
    return writer.count


# The most lines run_batched_stage hands to one call of its transform.
BATCH_LINES = 1024


def run_batched_stage(
    input: str,
    output: Optional[str],
    transform: Callable[[list[tuple[dict, int]]], list["dict | list[dict] | InputError"]],
    *,
    mode: str = "jsonl",
    skip_errors: bool = False,
    max_batch: int = BATCH_LINES,
    kind: str = "JSONL file",
) -> int:
    """run_stage for a transform that is faster over many records at once (a batched tokenizer).

    transform(items) takes a list of (record, line_number) and returns one result per item, in
    order: a record, a list of records, or the InputError of that line. It gets the lines that
    have already arrived (up to max_batch), and never waits for more: a line that comes alone
    (an interactive pipe) is transformed and written at once, alone. The results of a batch are
    written in one write. Errors behave as in run_stage: a bad line stops the run after every
    earlier record is written, or is counted and skipped with skip_errors. If transform raises
    instead (a failure no check foresaw), the batch is redone one line at a time, so that every
    record before the failing line is written before the exception propagates. `kind` is what
    the input should be, for open_input's hints. Returns the number of records written.
    """
    from llmcli.records import LineReader, RecordWriter, iter_line_results

    check_output(output, input)
    stream, source = open_input(input, kind)
    writer = RecordWriter(open_output(output))
    bad = BadLines(source, skip_errors)
    pending: list[Line] = []

    def write_results(lines: list[Line], results: list) -> None:
        done: list[dict] = []
        for line, result in zip(lines, results):
            if isinstance(result, InputError):
                writer.write_many(done)  # everything before the bad line, before it is reported
                done = []
                bad.fail(result, line.number)
            elif isinstance(result, dict):
                done.append(result)
            else:
                done.extend(result)
        writer.write_many(done)

    def finish_pending() -> None:
        if not pending:
            return
        lines = pending[:]
        pending.clear()
        try:
            results = transform([(line.record, line.number) for line in lines])
        except Exception:
            if len(lines) == 1:
                raise
            # Something no check foresaw failed somewhere in the batch: redo it one line at a
            # time, so that every record before the failing line is written before it propagates.
            for line in lines:
                try:
                    results = transform([(line.record, line.number)])
                except InputError as exc:  # bad input of this line: skipped with --skip-errors like any other
                    bad.fail(exc, line.number)
                    continue
                write_results([line], results)
            return
        write_results(lines, results)

    # The reader finishes the pending lines before each read that could wait for input.
    for item in iter_line_results(LineReader(stream, before_read=finish_pending), source, mode):
        if isinstance(item, InputError):
            finish_pending()
            bad.fail(item, item.line)
            continue
        pending.append(item)
        if len(pending) >= max_batch:
            finish_pending()
    finish_pending()
    bad.report()
    return writer.count


