"""The Typer app (the lazy command group), `main`, and the one place where errors become exit codes.

The options every command shares are in cli/options.py; the loop that reads records, runs a
stage and writes records (with the --skip-errors policy) is in cli/stage.py.

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
import sys
from typing import Annotated, Any, Iterable, NamedTuple, NoReturn

import typer
from typer.core import TyperGroup

# The options and the stage helpers lived here before cli/options.py and cli/stage.py; they are
# still importable from llmcli.cli for code written against that layout (noqa F401: re-exported).
# New code imports them from their own modules.
from llmcli.cli.options import (  # noqa: F401
    DEFAULT_ENCODER,
    DEFAULT_MODEL,
    DeviceOpt,
    DtypeOpt,
    FloatsOpt,
    InputArg,
    MaxBatchedTokensOpt,
    ModelOpt,
    OutputOpt,
    ProgressOpt,
    QuantizeOpt,
    SkipErrorsOpt,
    ThreadsOpt,
    wants_progress,
)
from llmcli.cli.stage import BATCH_LINES, BadLines, check_output, open_input, open_output, run_batched_stage, run_stage, say  # noqa: F401
from llmcli.cli.typer_speedup import speed_up, speed_up_params
from llmcli.errors import LlmcliError, OutputClosed

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
    "batch": "batch",
    "bench": "bench",
    "perplexity": "perplexity",
    "quantize": "quantize",
}
COMMAND_MODULES = list(dict.fromkeys(COMMANDS.values()))


class LazyGroup(TyperGroup):
    """The `llmcli` group. Built by main() (the console script), it imports a command's module
    only when that command is asked for (click's LazyGroup pattern), so `llmcli tokenize` does not
    build the options of every other command first; built anywhere else (CliRunner, a script
    calling typer.main.get_command), it holds every command from the start. Commands registered
    when the group is built are built with it; the others are built here, from what their module
    registered on `app`. Every command it holds, and its --help option, goes through
    typer_speedup.speed_up (a no-op with a Typer that module was not checked against)."""

    lazy = False  # set by main() while it builds the group

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._built = len(app.registered_commands)
        if not LazyGroup.lazy:
            self._load(COMMAND_MODULES)
        speed_up(self)

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
                speed_up(command)
                self.add_command(command)
        self._built = len(app.registered_commands)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands:
            # an unknown name loads everything, so that "No such command" can suggest the right one
            self._load([COMMANDS[cmd_name]] if cmd_name in COMMANDS else COMMAND_MODULES)
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            speed_up(command, ctx)  # its --help option: a subcommand's context has the same option names
        return command

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            speed_up_params([option])
        return option

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
    add_completion=True,
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
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", "-V", help="Print the version (`llmcli X.Y.Z`) and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    # A callback keeps `app` a group even while only one command's module is loaded
    # (Typer turns an app of one command into that command); its one option is --version.
    # It also gives open_output the context that closes when the command ends.
    from llmcli.cli.stage import enter_command

    enter_command(ctx)


def debug_enabled() -> bool:
    return os.environ.get("LLMCLI_DEBUG", "") not in ("", "0")


# ---------------------------------------------------------------- entry point


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
        speed_up_params(command.params)  # --install-completion and --show-completion, added after the group was built
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
