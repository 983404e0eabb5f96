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
from llmcli.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MB
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
PrefixCacheOpt = Annotated[
    float,
    typer.Option(
        "--prefix-cache-mb",
        min=0,
        help=f"MiB of keys and values of full 16-token prompt blocks kept for requests that share a prefix (a system prompt, "
        f"earlier chat turns); least recently used first out. 0 turns it off. Default {DEFAULT_PREFIX_CACHE_MB}.",
        show_default=False,
    ),
]
# the default lives in engine/scheduler.py (DEFAULT_MAX_BATCHED_TOKENS), which imports torch: not here
MaxBatchedTokensOpt = Annotated[
    Optional[int],
    typer.Option(
        help="Tokens per engine step: decode tokens of running sequences first, then prompt chunks (a long prompt is split "
        "across steps, short ones prefill together). Default: 256, sized for a CPU."
    ),
]


def check_max_batched_tokens(value: Optional[int]) -> None:
    if value is not None and value < 1:
        from llmcli.errors import UsageError

        raise UsageError("--max-batched-tokens must be at least 1", "use e.g. --max-batched-tokens 256")
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


JsonSchemaOpt = Annotated[
    Optional[str],
    typer.Option("--json-schema", help="Constrain the output to JSON valid under this JSON schema: a file, or the schema's JSON text."),
]


def _read_flag_file(path: str, flag: str, hint: str) -> str:
    """The text of a file a flag names, or a UsageError naming the flag, the file and why."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"cannot read {flag} file {path}: {reason}", hint) from None


def read_json_schema(value: str) -> Any:
    """--json-schema's value: JSON text when it starts with `{` (or is true), else a file holding the schema."""
    import json

    text, where = value, "--json-schema"
    if not value.lstrip().startswith("{") and value.strip() != "true":
        text = _read_flag_file(value, "--json-schema", "give a JSON schema file, or the schema itself as JSON text")
        where = f"--json-schema file {value}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", "give a JSON schema object such as {\"type\": \"object\"}") from None


def response_format_from_flags(
    json_schema: Optional[str] = None, regex: Optional[str] = None, choice: Optional[str] = None, grammar: Optional[str] = None, json_object: bool = False
):
    """The Grammar the structured-output flags ask for (at most one of them), checked before any model loads; None without them."""
    from llmcli.core import constrained

    given = [name for name, value in (("--json-schema", json_schema), ("--regex", regex), ("--choice", choice), ("--grammar", grammar), ("--json", json_object or None)) if value is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} each constrain the whole output; give one of them", "combine the constraints in one JSON schema or grammar")
    if json_schema is not None:
        return constrained.json_schema_grammar(read_json_schema(json_schema), "--json-schema")
    if regex is not None:
        return constrained.regex_grammar(regex, "--regex")
    if choice is not None:
        return constrained.choice_grammar([c for c in choice.split(",")], "--choice")
    if grammar is not None:
        text = _read_flag_file(grammar, "--grammar", "give a Lark grammar file (.lark)")
        return constrained.lark_grammar(text, f"--grammar file {grammar}")
    if json_object:
        return constrained.json_schema_grammar(True, "--json")
    return None


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
