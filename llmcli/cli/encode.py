"""`llmcli encode`: ids -> the model's input vectors (`embeddings`), or a pooled sentence `embedding`.

Also holds what encode and attend share: loading the model for a stage and reading a record's
ids (or embeddings) with the checks that turn bad input into one clear line.
"""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from llmcli.cli import (
    DEFAULT_MODEL,
    DeviceOpt,
    DtypeOpt,
    FloatsOpt,
    InputArg,
    ModelOpt,
    OutputOpt,
    SkipErrorsOpt,
    app,
    check_output,
    run_stage,
    say,
)
from llmcli.errors import ContextLengthError, InputError, UsageError

POOLS = ("mean", "cls", "last")

TruncateOpt = Annotated[bool, typer.Option("--truncate", help="Keep the first tokens of inputs longer than the model's context instead of failing.")]


def load_stage_model(model: Optional[str], dtype: str, device: str):
    """The LoadedModel for a stage: a catalogue name, HF directory or .gguf file (default: the decoder)."""
    from llmcli.engine.engine import load_model_ref

    return load_model_ref(model, dtype=dtype, device=device, notify=say, default_model=DEFAULT_MODEL)


def fit_context(length: int, limit: int, truncate: bool, line: int | None, what: str = "input") -> int:
    """How many leading positions to keep, or a ContextLengthError when the input is too long."""
    if length == 0:
        raise InputError(f"the {what} is empty", "tokenize a non-empty text", line=line)
    if length > limit:
        if not truncate:
            raise ContextLengthError(
                f"the {what} has {length} tokens but the model's context holds {limit}",
                f"shorten it, or pass --truncate to keep the first {limit} tokens",
                line=line,
            )
        return limit
    return length


def read_ids(record: dict, number: int, loaded, truncate: bool) -> list[int]:
    """The record's `ids`, checked against the vocabulary and the context (truncated with --truncate)."""
    from llmcli.records import require_ids

    ids = require_ids(record, number, vocab_size=loaded.config.vocab_size)
    keep = fit_context(len(ids), loaded.config.max_position_embeddings, truncate, number)
    return ids[:keep]


def read_embeddings(record: dict, number: int, loaded, truncate: bool):
    """The record's `embeddings` as a (T, d) float numpy array, checked against the model's width."""
    from llmcli.records import EMBEDDINGS, decode_tensor

    array = decode_tensor(record[EMBEDDINGS], EMBEDDINGS, number)
    width = loaded.config.hidden_size
    if array.ndim != 2:
        raise InputError(
            f"`embeddings` must have shape [tokens, {width}], got {list(array.shape)}",
            "use the `embeddings` written by `llmcli encode` (not the pooled `embedding`)",
            line=number,
        )
    if array.shape[1] != width:
        raise InputError(
            f"`embeddings` have width {array.shape[1]} but model {loaded.name} has hidden size {width}",
            "encode and attend with the same --model",
            line=number,
        )
    keep = fit_context(array.shape[0], loaded.config.max_position_embeddings, truncate, number, what="`embeddings` input")
    return array[:keep]


@app.command()
def encode(
    input: InputArg = "-",
    output: OutputOpt = None,
    model: ModelOpt = None,
    pool: Annotated[
        Optional[str],
        typer.Option(
            "--pool",
            help="Run the model and write one pooled `embedding` [d]: mean, cls or last. "
            "Meant for encoder models such as --model all-minilm-l6-v2 (sentence embeddings).",
        ),
    ] = None,
    normalize: Annotated[bool, typer.Option("--normalize", help="L2-normalize the pooled embedding (needs --pool).")] = False,
    floats: FloatsOpt = False,
    truncate: TruncateOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    skip_errors: SkipErrorsOpt = False,
) -> None:
    """Turn each record's `ids` into the model's input vectors, `embeddings` [tokens, d].

    These are the vectors the first layer reads (token embeddings); `llmcli attend` accepts them
    in place of `ids`. With --pool the whole model runs and one pooled vector `embedding` [d] is
    written instead: with an encoder such as all-minilm-l6-v2, `--pool mean --normalize` gives
    sentence embeddings. Tensors are base64 float32 objects (see records.md), or nested lists
    with --floats.

    Example: echo "The cat sat." | llmcli tokenize -m all-minilm-l6-v2 | llmcli encode -m all-minilm-l6-v2 --pool mean --normalize
    """
    if pool is not None and pool not in POOLS:
        raise UsageError(f"unknown --pool {pool!r}", f"use one of {', '.join(POOLS)}")
    if normalize and pool is None:
        raise UsageError("--normalize needs --pool", "add --pool mean (or cls, last)")
    check_output(output, input)

    import torch

    from llmcli.records import EMBEDDING, EMBEDDINGS, encode_tensor

    loaded = load_stage_model(model, dtype, device)
    module = loaded.module
    if pool is not None:
        from llmcli.core.pooling import normalize as l2_normalize
        from llmcli.core.pooling import pool as pool_hidden

    @torch.inference_mode()
    def transform(record: dict, number: int) -> dict:
        ids = read_ids(record, number, loaded, truncate)
        x = torch.tensor([ids], dtype=torch.long, device=loaded.device)  # (1, T)
        out = dict(record)
        if pool is None:
            out[EMBEDDINGS] = encode_tensor(module.embed(x)[0].float().cpu().numpy(), floats)  # (T, d)
            return out
        mask = torch.ones_like(x)
        hidden = module(x, attention_mask=mask, compute_logits=False).last_hidden  # (1, T, d)
        vector = pool_hidden(hidden.float(), mask, pool)  # (1, d)
        if normalize:
            vector = l2_normalize(vector)
        out[EMBEDDING] = encode_tensor(vector[0].cpu().numpy(), floats)
        return out

    run_stage(input, output, transform, skip_errors=skip_errors)
