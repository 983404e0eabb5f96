"""The Typer app, the options every command shares, and the one place where errors become exit codes.

Exit codes: 0 ok, 1 an LlmcliError (bad input, bad model), 2 bad usage, 130 Ctrl-C (after the line `interrupted`),
141 the reader of stdout went away (`| head -n1`), quietly.
Command modules import heavy things (torch, the model core) inside their functions, so that
`--help`, `tokenize` and `decode` start without torch; and main() imports only the module of the
command that runs (all of them for `llmcli --help`), see LazyGroup.
"""

from __future__ import annotations

import importlib
import os
import signal
import stat
import sys
from pathlib import Path
from typing import IO, Annotated, Any, Callable, Iterable, NamedTuple, NoReturn, Optional

import typer
from typer.core import TyperGroup

from llmcli.errors import InputError, LlmcliError, OutputClosed, UsageError

# Every command and the module of llmcli.cli that defines it, in the order `--help` lists them.
COMMANDS = {
    "pull": "pull",
    "models": "pull",
    "tokenize": "tokenize",
    "decode": "decode",
    "encode": "encode",
    "attend": "attend",
    "generate": "generate",
    "chat": "chat",
    "serve": "serve",
    "bench": "bench",
    "perplexity": "perplexity",
}
COMMAND_MODULES = list(dict.fromkeys(COMMANDS.values()))


class LazyGroup(TyperGroup):
    """The `llmcli` group. Built by main() (the console script), it imports a command's module
    only when that command is asked for (click's LazyGroup pattern), so `llmcli tokenize` does not
    build the options of every other command first; built anywhere else (CliRunner, a script
    calling typer.main.get_command), it holds every command from the start. Commands registered
    when the group is built are built with it; the others are built here, from what their module
    registered on `app`."""

    lazy = False  # set by main() while it builds the group

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._built = len(app.registered_commands)
        if not LazyGroup.lazy:
            self._load(COMMAND_MODULES)

    def _load(self, modules: Iterable[str]) -> None:
        for name in modules:
            try:
                importlib.import_module(f"llmcli.cli.{name}")
            except ModuleNotFoundError as exc:  # a command module not written yet must not break the others
                if exc.name != f"llmcli.cli.{name}":
                    raise
        for info in app.registered_commands[self._built :]:
            command = typer.main.get_command_from_info(info, pretty_exceptions_short=app.pretty_exceptions_short, rich_markup_mode=app.rich_markup_mode)
            if command.name and command.name not in self.commands:
                self.add_command(command)
        self._built = len(app.registered_commands)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands:
            # an unknown name loads everything, so that "No such command" can suggest the right one
            self._load([COMMANDS[cmd_name]] if cmd_name in COMMANDS else COMMAND_MODULES)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: Any) -> list[str]:
        self._load(COMMAND_MODULES)
        order = list(COMMANDS)
        return sorted(super().list_commands(ctx), key=lambda name: order.index(name) if name in order else len(order))


app = typer.Typer(
    name="llmcli",
    cls=LazyGroup,
    help="The transformer inference pipeline as Unix filters: tokenize | encode | attend | generate | decode, over JSONL.\n\n"
    'Example: echo "What is the capital of France?" | llmcli tokenize | llmcli generate | llmcli decode --text-only',
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version_text() -> str:
    """`llmcli <version>`: the installed distribution's version, or the package's own when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"llmcli {version('llmcli')}"
    except PackageNotFoundError:
        from llmcli import __version__

        return f"llmcli {__version__}"


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(version_text() + "\n")
        raise typer.Exit(0)


@app.callback()
def _group(
    version: Annotated[
        bool, typer.Option("--version", "-V", help="Print the version (`llmcli X.Y.Z`) and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    # A callback keeps `app` a group even while only one command's module is loaded
    # (Typer turns an app of one command into that command); its one option is --version.
    pass


DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"

# ---------------------------------------------------------------- shared options

InputArg = Annotated[str, typer.Argument(help="Input file of records (JSONL); '-' reads stdin.", show_default=True)]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Write records to FILE instead of stdout (never onto an input file: refused).")]
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help=f"Catalogue name, HF-format directory or .gguf file. Default: {DEFAULT_MODEL}.", envvar="LLMCLI_MODEL"),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute dtype: float32, bfloat16 or float16.")]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", "-t", help="CPU threads for the model math (torch and the native kernels). Default: the physical cores this process may use."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or mps (when present).")]
QuantizeOpt = Annotated[
    str,
    typer.Option("--quantize", help="none, or int8: 8-bit weights in blocks of 32 (llama.cpp's Q8_0), float32 activations, on the CPU: 2-3x faster decoding at batch 1, perplexity within 1% on SmolLM2."),
]
SkipErrorsOpt = Annotated[bool, typer.Option("--skip-errors", help="Skip bad lines (counted on stderr) instead of stopping.")]
FloatsOpt = Annotated[bool, typer.Option("--floats", help="Write tensors as nested lists of numbers instead of base64.")]
# None (neither flag): a bar when stderr is a terminal; see wants_progress
ProgressOpt = Annotated[
    Optional[bool], typer.Option("--progress/--no-progress", help="Progress bar on stderr (default: when stderr is a terminal).", show_default=False)
]


def wants_progress(progress: Optional[bool]) -> bool:
    """--progress / --no-progress as given, else a bar when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else progress


# ---------------------------------------------------------------- stderr


def say(message: str) -> None:
    """One line for people on stderr (never stdout: stdout is data)."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


def debug_enabled() -> bool:
    return os.environ.get("LLMCLI_DEBUG", "") not in ("", "0")


# ---------------------------------------------------------------- input and output


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
    """The stream for --output (stdout for None or '-'); call check_output(path, <inputs>) before."""
    if path is None or path == "-":
        return sys.stdout
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}", "choose a writable --output path") from None


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
    from llmcli.records import ErrorCounter, RecordWriter, iter_lines

    check_output(output, input)
    stream, source = open_input(input)
    writer = RecordWriter(open_output(output))
    counter = ErrorCounter(report=say) if skip_errors else None
    for line in iter_lines(stream, source, mode=mode, skip_errors=counter):
        try:
            result = transform(line.record, line.number)
        except InputError as exc:
            if exc.line is None:
                exc.line = line.number
            if exc.source is None:
                exc.source = source
            if counter is None:
                raise
            counter.add(exc)
            continue
        for rec in [result] if isinstance(result, dict) else result:
            writer.write(rec)
    if counter is not None and counter.count:
        say(f"skipped {counter.count} bad line(s) of {source}")
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
    from llmcli.records import ErrorCounter, Line, LineReader, RecordWriter, iter_line_results

    check_output(output, input)
    stream, source = open_input(input, kind)
    writer = RecordWriter(open_output(output))
    counter = ErrorCounter(report=say) if skip_errors else None
    pending: list[Line] = []

    def fail(exc: InputError, number: int | None) -> None:
        if exc.line is None:
            exc.line = number
        if exc.source is None:
            exc.source = source
        if counter is None:
            raise exc
        counter.add(exc)

    def write_results(lines: list[Line], results: list) -> None:
        done: list[dict] = []
        for line, result in zip(lines, results):
            if isinstance(result, InputError):
                writer.write_many(done)  # everything before the bad line, before it is reported
                done = []
                fail(result, line.number)
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
                    fail(exc, line.number)
                    continue
                write_results([line], results)
            return
        write_results(lines, results)

    # The reader finishes the pending lines before each read that could wait for input.
    for item in iter_line_results(LineReader(stream, before_read=finish_pending), source, mode):
        if isinstance(item, InputError):
            finish_pending()
            fail(item, item.line)
            continue
        pending.append(item)
        if len(pending) >= max_batch:
            finish_pending()
    finish_pending()
    if counter is not None and counter.count:
        say(f"skipped {counter.count} bad line(s) of {source}")
    return writer.count


# ---------------------------------------------------------------- entry point


def _skip_pydantic_for_plain_values() -> None:
    """Let str options and bool flags through without Typer's pydantic check.

    Typer 0.2x coerces every parameter value with a pydantic TypeAdapter, and importing pydantic
    and building the adapters costs about 60 ms, a fifth of `llmcli tokenize`'s start. A str
    option's value from the command line is already a str and a flag's is a bool; only those
    skip the adapter, every other value (and type) still goes through Typer's own coercion, with
    its own messages. With a Typer that works otherwise (click types), this does nothing.
    """
    try:
        from typer import _coercion
        from typer.core import _TyperParameter
    except ImportError:
        return
    build = getattr(_coercion, "build_runtime_param", None)
    original = getattr(_TyperParameter, "get_runtime_param", None)
    if build is None or original is None or getattr(original, "_llmcli_plain", False):
        return

    class PlainValue:
        def __init__(self, descriptor: Any):
            self.descriptor = descriptor
            self.full: Any = None

        def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
            if type(value) is self.descriptor.annotation or (value is None and not (param.multiple or param.nargs == -1)):
                return value
            if self.full is None:
                self.full = build(self.descriptor)
            return self.full.coerce(value, param=param, ctx=ctx)

    def get_runtime_param(self: Any) -> Any:
        if getattr(self, "_runtime_param", None) is None:
            descriptor = getattr(self, "type_descriptor", None)
            info = getattr(descriptor, "parameter_info", None)
            if (
                descriptor is not None
                and descriptor.annotation in (str, bool)
                and getattr(descriptor, "file_annotation", None) is None
                and getattr(info, "parser", None) is None
            ):
                self._runtime_param = PlainValue(descriptor)
        return original(self)

    get_runtime_param._llmcli_plain = True  # type: ignore[attr-defined]
    _TyperParameter.get_runtime_param = get_runtime_param


_skip_pydantic_for_plain_values()


def _quiet_broken_pipe() -> None:
    # Python would print "Exception ignored ... BrokenPipeError" when flushing at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


class _ClickExceptions(NamedTuple):
    errors: tuple[type, ...]
    aborts: tuple[type, ...]
    exits: tuple[type, ...]


def _click_exceptions() -> _ClickExceptions:
    """The usage-error, abort and exit classes of click and of the copy of click that Typer vendors.

    Called when something was raised: click itself counts only once something has imported it
    (an older Typer does; a newer one vendors its own copy), as nothing can raise its exceptions
    before that, and importing it just to catch them would cost every start.
    """
    errors: list[type] = []
    aborts: list[type] = [typer.Abort]
    exits: list[type] = [typer.Exit]
    click = sys.modules.get("click")
    if click is not None:
        errors.append(click.ClickException)
        aborts.append(click.exceptions.Abort)
        exits.append(click.exceptions.Exit)
    try:
        from typer._click import exceptions as vendored

        errors.append(vendored.ClickException)
    except ImportError:  # older Typer uses click itself
        pass
    return _ClickExceptions(tuple(errors), tuple(set(aborts)), tuple(set(exits)))


# Set by _on_interrupt: a Ctrl-C reached this process during main().
_interrupted = False


def _on_interrupt(signum: int, frame: Any) -> None:
    # Typer turns a KeyboardInterrupt inside a command into a silent exit status 130
    # (typer.Exit(130)) before main() can see it; this flag lets main() still say why.
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def _exit_interrupted() -> NoReturn:
    say("interrupted")
    try:
        sys.stdout.flush()
    except (OSError, KeyboardInterrupt):  # the reader went away too (same Ctrl-C), or a second Ctrl-C
        _quiet_broken_pipe()
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the app and turn every failure into one stderr line and an exit code."""
    global _interrupted
    _interrupted = False
    # Only where Python handles Ctrl-C: an ignored SIGINT (nohup, `cmd &`) stays ignored.
    previous = signal.getsignal(signal.SIGINT)
    if callable(previous):
        signal.signal(signal.SIGINT, _on_interrupt)
    try:
        _main(argv)
    finally:
        if callable(previous):
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str] | None) -> None:
    try:
        LazyGroup.lazy = True
        try:
            command = typer.main.get_command(app)
        finally:
            LazyGroup.lazy = False
    except KeyboardInterrupt:
        _exit_interrupted()
    debug = debug_enabled()
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args.remove("--debug")
        debug = True
        os.environ["LLMCLI_DEBUG"] = "1"
    try:
        rc = command.main(args=args, prog_name="llmcli", standalone_mode=False)
        if rc == 130 and _interrupted:
            _exit_interrupted()
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except OutputClosed as exc:
        _quiet_broken_pipe()
        sys.exit(exc.exit_code)
    except LlmcliError as exc:
        if debug:
            raise
        say(f"error: {exc}")
        sys.exit(exc.exit_code)
    except _click_exceptions().aborts:
        _exit_interrupted()
    except _click_exceptions().exits as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except _click_exceptions().errors as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        say(f"error: {exc.format_message()}{where}")
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        _exit_interrupted()
    except BrokenPipeError:
        _quiet_broken_pipe()
        sys.exit(141)
    except (MemoryError, OSError) as exc:
        if debug:
            raise
        say(f"error: {exc}; rerun with --debug for details")
        sys.exit(1)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_broken_pipe()
        sys.exit(141)
