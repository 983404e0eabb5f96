"""An optional start-up speed-up for Typer 0.2x: str options and bool flags skip pydantic.

Typer 0.2x checks every parameter value with a pydantic TypeAdapter, and importing pydantic and
building the adapters costs about 60 ms, a fifth of `llmcli tokenize`'s start; Typer has no
public way to opt out. This module is the only code in llmcli that touches Typer's private
internals, and only with a Typer whose version it was checked against (TESTED_TYPER) and whose
internals are where it expects them. With any other Typer it does nothing, and every value goes
through Typer's own coercion: the same behaviour, a slower start.

It patches no Typer code: it gives each plain str or bool parameter of llmcli's own commands a
coercer that passes a value that already has the right type (what the command line gives such a
parameter) through, and hands any other value to Typer's own coercion, with Typer's messages.
"""

from __future__ import annotations

from typing import Any, Iterable

import typer

# Typer versions [first, end) whose internals (typer._coercion.build_runtime_param, a parameter's
# type_descriptor and _runtime_param) this module was checked against: 0.29.2. Widen the range
# only after running tests/test_cli_entry.py and tests/test_cli_tokenize_decode.py with that Typer.
TESTED_TYPER = ((0, 29), (0, 30))


def supported(version: str) -> bool:
    """Whether a Typer of this version (`0.29.2`) is one this module was checked against."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return TESTED_TYPER[0] <= (major, minor) < TESTED_TYPER[1]


def _build_runtime_param() -> Any:
    if not supported(getattr(typer, "__version__", "")):
        return None
    try:
        from typer._coercion import build_runtime_param
    except ImportError:
        return None
    return build_runtime_param


# Typer's own builder of a parameter's coercer, or None where this speed-up does not apply.
_build = _build_runtime_param()


class PlainValue:
    """A parameter's coercer: a value of the annotated type (or a missing one) passes, anything
    else goes to the coercer Typer would have built, built on first use."""

    def __init__(self, descriptor: Any):
        self.descriptor = descriptor
        self.full: Any = None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        if type(value) is self.descriptor.annotation or (value is None and not (param.multiple or param.nargs == -1)):
            return value
        if self.full is None:
            self.full = _build(self.descriptor)
        return self.full.coerce(value, param=param, ctx=ctx)


def _plain(param: Any) -> bool:
    descriptor = getattr(param, "type_descriptor", None)
    return (
        descriptor is not None
        and getattr(param, "_runtime_param", False) is None  # Typer has not built its coercer yet
        and descriptor.annotation in (str, bool)
        and getattr(descriptor, "file_annotation", None) is None
        and getattr(getattr(descriptor, "parameter_info", None), "parser", None) is None
    )


def speed_up(command: Any, ctx: Any = None) -> None:
    """Give the plain str and bool parameters of a built click command (and of its subcommands)
    the pass-through coercer; with a context, its --help option too (click builds that one per
    context). Nothing at all with a Typer this module was not checked against."""
    if _build is None:
        return
    params = list(command.params)
    if ctx is not None:
        help_option = command.get_help_option(ctx)  # built once, then cached by the command
        if help_option is not None:
            params.append(help_option)
    speed_up_params(params)
    for sub in getattr(command, "commands", {}).values():
        speed_up(sub)


def speed_up_params(params: Iterable[Any]) -> None:
    """The pass-through coercer for each plain str or bool parameter among params."""
    if _build is None:
        return
    for param in params:
        if _plain(param):
            param._runtime_param = PlainValue(param.type_descriptor)
