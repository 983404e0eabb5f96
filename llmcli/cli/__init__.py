"""The Typer app, the options every command shares, and the one place where errors become exit codes.

Exit codes: 0 ok, 1 an LlmcliError (bad input, bad model), 2 bad usage, 130 Ctrl-C,
141 the reader of stdout went away (`| head -n1`), quietly.
Command modules import heavy things (torch, the model core) inside their functions, so that
`--help`, `tokenize` and `decode` start without torch.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import IO, Callable, Iterable, Optional

import click
import typer
from typing_extensions import Annotated

from llmcli.errors import InputError, LlmcliError, OutputClosed, UsageError

app = typer.Typer(
    name="llmcli",
    help="The transformer inference pipeline as Unix filters: tokenize | encode | attend | generate | decode, over JSONL.\n\n"
    'Example: echo "What is the capital of France?" | llmcli tokenize | llmcli generate | llmcli decode --text-only',
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"

# ---------------------------------------------------------------- shared options

InputArg = Annotated[str, typer.Argument(help="Input file of records (JSONL); '-' reads stdin.", show_default=True)]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Write records to FILE instead of stdout.")]
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help=f"Catalogue name, HF-format directory or .gguf file. Default: {DEFAULT_MODEL}.", envvar="LLMCLI_MODEL"),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute dtype: float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or mps (when present).")]
QuantizeOpt = Annotated[
    str,
    typer.Option("--quantize", help="none, or int8: 8-bit weights in blocks of 32 (llama.cpp's Q8_0), float32 activations, on the CPU: about 3x faster decoding, perplexity within 1% on SmolLM2."),
]
SkipErrorsOpt = Annotated[bool, typer.Option("--skip-errors", help="Skip bad lines (counted on stderr) instead of stopping.")]
FloatsOpt = Annotated[bool, typer.Option("--floats", help="Write tensors as nested lists of numbers instead of base64.")]


# ---------------------------------------------------------------- stderr


def say(message: str) -> None:
    """One line for people on stderr (never stdout: stdout is data)."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


def debug_enabled() -> bool:
    return os.environ.get("LLMCLI_DEBUG", "") not in ("", "0")


# ---------------------------------------------------------------- input and output


def open_input(path: str) -> tuple[IO[bytes], str]:
    """A binary stream and the name to use for it in messages."""
    if path == "-":
        return sys.stdin.buffer, "-"
    p = Path(path)
    if not p.exists():
        raise UsageError(f"input file {path} does not exist", "give a path to a JSONL file, or '-' for stdin")
    if p.is_dir():
        raise UsageError(f"input {path} is a directory", "give a JSONL file, or '-' for stdin")
    return open(p, "rb"), path


def open_output(path: Optional[str]) -> IO[str]:
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


# ---------------------------------------------------------------- entry point

COMMAND_MODULES = [
    "pull",
    "tokenize",
    "decode",
    "encode",
    "attend",
    "generate",
    "chat",
    "serve",
    "bench",
    "perplexity",
]

for _name in COMMAND_MODULES:
    try:
        importlib.import_module(f"llmcli.cli.{_name}")
    except ModuleNotFoundError as _exc:  # a command module not written yet must not break the others
        if _exc.name != f"llmcli.cli.{_name}":
            raise


def _quiet_broken_pipe() -> None:
    # Python would print "Exception ignored ... BrokenPipeError" when flushing at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage-error, abort, exit) classes of click and of the copy of click that Typer vendors."""
    errors: list[type] = [click.ClickException]
    aborts: list[type] = [click.exceptions.Abort, typer.Abort]
    exits: list[type] = [click.exceptions.Exit, typer.Exit]
    try:
        from typer._click import exceptions as vendored

        errors.append(vendored.ClickException)
    except ImportError:  # older Typer uses click itself
        pass
    return tuple(errors), tuple(set(aborts)), tuple(set(exits))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the app and turn every failure into one stderr line and an exit code."""
    command = typer.main.get_command(app)
    debug = debug_enabled()
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args.remove("--debug")
        debug = True
        os.environ["LLMCLI_DEBUG"] = "1"
    click_errors, aborts, exits = _click_exceptions()
    try:
        rc = command.main(args=args, prog_name="llmcli", standalone_mode=False)
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
    except aborts:
        say("interrupted")
        sys.exit(130)
    except exits as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except click_errors as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        say(f"error: {exc.format_message()}{where}")
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        say("interrupted")
        sys.exit(130)
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
