"""The options and arguments that several commands share, as Annotated types, and the default models.

Importing this module imports Typer and nothing heavy: every command module declares its
parameters with these, so that one flag reads the same on every command.
"""

from __future__ import annotations

import functools
import inspect
import sys
import typing
from typing import Annotated, Any, Callable, List, Optional

import typer

from llmcli.catalog import DEFAULT_ENCODER, DEFAULT_MODEL  # noqa: F401 - re-exported: the commands take them from here
from llmcli.core.sampling_params import SamplingParams
from llmcli.errors import UsageError

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
    typer.Option("--quantize", help="Quantize an HF model's float linear layers at load into a llama.cpp block format: none, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k or q6_k (int8 = q8_0); CPU, float32 activations. A GGUF's quantized tensors keep their own types."),
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


# ---------------------------------------------------------------- sampling flags, from SamplingParams' knobs


def parse_logit_bias(values: list[str]) -> dict[int, float]:
    """`--logit-bias 123:-5` (repeatable) or a JSON object `{"123": -5}`."""
    import json

    bias: dict[int, float] = {}
    for value in values:
        try:
            if value.lstrip().startswith("{"):
                bias.update({int(k): float(v) for k, v in json.loads(value).items()})
            else:
                token, _, amount = value.partition(":")
                bias[int(token)] = float(amount)
        except (ValueError, json.JSONDecodeError, AttributeError):
            raise UsageError(f"bad --logit-bias {value!r}", 'write TOKEN_ID:BIAS (e.g. 42:-100) or a JSON object {"42": -100}') from None
    return bias


def _knob_parameters() -> list[inspect.Parameter]:
    """One keyword parameter (a Typer option) per sampling knob, named and documented as SamplingParams declares it."""
    hints = typing.get_type_hints(SamplingParams)
    out = []
    for f in SamplingParams.knobs():
        kind, default = hints[f.name], SamplingParams.knob_default(f)
        if f.metadata["cli"] == "list":  # written TOKEN:BIAS, repeatable
            kind, default = Optional[List[str]], None
        elif default is None:
            kind = Optional[kind]
        option = typer.Option(f"--{f.name.replace('_', '-')}", help=f.metadata["help"])
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]))
    return out


def sampling_options(command: Callable) -> Callable:
    """Give a command one flag per sampling knob in place of its `sampling` parameter, which then
    receives the SamplingParams those flags make. A knob added to SamplingParams is a flag of every
    command decorated so, with no edit here or there."""
    signature = inspect.signature(command, eval_str=True)
    knobs = _knob_parameters()
    names = [p.name for p in knobs]
    params = []
    for p in signature.parameters.values():
        if p.name == "sampling":
            params.extend(knobs)
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD else p)
    if len(params) == len(signature.parameters):
        raise TypeError(f"{command.__name__} has no `sampling` parameter for sampling_options to fill")

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in names if name in kwargs}
        if "logit_bias" in values:
            values["logit_bias"] = parse_logit_bias(values["logit_bias"] or [])
        kwargs["sampling"] = SamplingParams(**values)
        return command(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper
