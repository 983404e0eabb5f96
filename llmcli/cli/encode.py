"""`llmcli encode`: ids -> the model's input vectors (`embeddings`), or a pooled sentence `embedding`.

Also holds what encode and attend share: loading the model for a stage and reading a record's
ids (or embeddings) with the checks that turn bad input into one clear line.
"""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from llmcli.cli import app
from llmcli.cli.options import DEFAULT_MODEL, DeviceOpt, DtypeOpt, FloatsOpt, InputArg, ModelOpt, OutputOpt, ProgressOpt, QuantizeOpt, SkipErrorsOpt, ThreadsOpt
from llmcli.cli.stage import check_output, run_batched_stage, say
from llmcli.core.threads import apply_threads
from llmcli.errors import ContextLengthError, InputError, UsageError

POOLS = ("mean", "cls", "last")

TruncateOpt = Annotated[bool, typer.Option("--truncate", help="Keep the first tokens of inputs longer than the model's context instead of failing.")]


def load_stage_model(model: Optional[str], dtype: str, device: str, quantize: str = "none", threads: Optional[int] = None):
    """The LoadedModel for a stage: a catalogue name, HF directory or .gguf file (default: the decoder), with --threads applied."""
    from llmcli.engine.engine import load_model_ref

    apply_threads(threads)
    return load_model_ref(model, dtype=dtype, device=device, quantize=quantize, notify=say, default_model=DEFAULT_MODEL)


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
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Records read at once; those of similar lengths share a forward pass (padded, at most 10%, and masked: the same vectors as one at a time).")] = 32,
    progress: ProgressOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = "none",
    threads: ThreadsOpt = None,
    skip_errors: SkipErrorsOpt = False,
) -> None:
    """Turn each record's `ids` into the model's input vectors, `embeddings` [tokens, d].

    These are the vectors the first layer reads (token embeddings); `llmcli attend` accepts them
    in place of `ids`. With --pool the whole model runs and one pooled vector `embedding` [d] is
    written instead: with an encoder such as all-minilm-l6-v2, `--pool mean --normalize` gives
    sentence embeddings. Tensors are base64 float32 objects (see records.md), or nested lists
    with --floats. Records are written in input order, each batch as soon as it is done.

    Example: echo "The cat sat." | llmcli tokenize -m all-minilm-l6-v2 | llmcli encode -m all-minilm-l6-v2 --pool mean --normalize
    """
    if pool is not None and pool not in POOLS:
        raise UsageError(f"unknown --pool {pool!r}", f"use one of {', '.join(POOLS)}")
    if normalize and pool is None:
        raise UsageError("--normalize needs --pool", "add --pool mean (or cls, last)")
    check_output(output, input)
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1", "use --batch-size 1 or more")

    import torch

    from llmcli.cli.progress import make_progress
    from llmcli.core.pooling import pad_batch
    from llmcli.records import EMBEDDING, EMBEDDINGS, encode_tensor

    loaded = load_stage_model(model, dtype, device, quantize, threads)
    module = loaded.module
    if pool is not None:
        from llmcli.core.pooling import normalize as l2_normalize
        from llmcli.core.pooling import pool as pool_hidden
    pad = loaded.tokenizer.pad_token_id or 0

    @torch.inference_mode()
    def vectors(batch: list[list[int]]) -> list:
        """The output tensor of each id list: padded on the right to the longest, masked."""
        x, mask = pad_batch(batch, pad, loaded.device)  # (B, T)
        if pool is None:
            embeddings = module.embed(x).float().cpu().numpy()  # (B, T, d)
            return [embeddings[b, : len(ids)] for b, ids in enumerate(batch)]
        hidden = module(x, attention_mask=mask, compute_logits=False).last_hidden  # (B, T, d)
        pooled = pool_hidden(hidden.float(), mask, pool)  # (B, d)
        if normalize:
            pooled = l2_normalize(pooled)
        return list(pooled.cpu().numpy())

    def transform(items: list[tuple[dict, int]]) -> list:
        results: list = []
        batch: list[list[int]] = []
        where: list[int] = []  # the index in results of each id list in batch
        for record, number in items:
            try:
                batch.append(read_ids(record, number, loaded, truncate))
                where.append(len(results))
                results.append(record)
            except InputError as exc:
                results.append(exc)
        field = EMBEDDINGS if pool is None else EMBEDDING
        for group in similar_lengths([len(ids) for ids in batch]):
            for i, array in zip(group, vectors([batch[i] for i in group])):
                results[where[i]] = {**results[where[i]], field: encode_tensor(array, floats)}
        bar.advance(records=len(batch), tokens=sum(map(len, batch)))
        return results

    with make_progress(progress, "encoding") as bar:
        run_batched_stage(input, output, transform, skip_errors=skip_errors, max_batch=batch_size)


# Padding a forward may add, as a share of its real tokens: the native kernels cost the same per
# row, padded or real, so a batch of mixed lengths would be slower than one record at a time.
PADDING_SLACK = 0.1


def similar_lengths(lengths: list[int], slack: float | None = None) -> list[list[int]]:
    """Indices of lengths in groups to pad together: sorted by length, a group grows while its
    padding stays within slack (default PADDING_SLACK) x its real tokens. Equal lengths need no padding."""
    slack = PADDING_SLACK if slack is None else slack
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]  # the longest of its group so far: the order is ascending
        if groups and n * (len(groups[-1]) + 1) <= (1 + slack) * (real + n):
            groups[-1].append(i)
            real += n
        else:
            groups.append([i])
            real = n
    return groups
