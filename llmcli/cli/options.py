"""The options and arguments that several commands share, as Annotated types, and the default models.

Importing this module imports Typer and nothing heavy: every command module declares its
parameters with these, so that one flag reads the same on every command.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"

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
