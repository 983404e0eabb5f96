"""`llmcli encode`: ids -> the model's input vectors (`embeddings`), or a pooled sentence `embedding`.

Also holds what encode and attend share: loading the model for a stage and reading a record's
ids (or embeddings) with the checks that turn bad input into one clear line.
"""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from llmcli.cli import app
from llmcli.cli.batch import ChunkOpt, RayOpt, ResumeOpt, run_stage_job
from llmcli.cli.options import DEFAULT_MODEL, DeviceOpt, DtypeOpt, FloatsOpt, InputArg, ModelOpt, OutputOpt, ProgressOpt, QuantizeOpt, SkipErrorsOpt, ThreadsOpt
from llmcli.cli.stage import check_output, run_batched_stage, say
from llmcli.core.threads import apply_threads
from llmcli.engine.encode_records import fit_context, read_ids, similar_lengths  # noqa: F401 - attend and the tests import them from here
from llmcli.errors import InputError, UsageError

POOLS = ("mean", "cls", "last")

TruncateOpt = Annotated[bool, typer.Option("--truncate", help="Keep the first tokens of inputs longer than the model's context instead of failing.")]


def load_stage_model(model: Optional[str], dtype: str, device: str, quantize: str = "none", threads: Optional[int] = None):
    """The LoadedModel for a stage: a catalogue name, HF directory or .gguf file (default: the decoder), with --threads applied."""
    from llmcli.engine.engine import load_model_ref

    apply_threads(threads)
    return load_model_ref(model, dtype=dtype, device=device, quantize=quantize, notify=say, default_model=DEFAULT_MODEL)


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
    ray: RayOpt = None,
    workers: Annotated[Optional[int], typer.Option(help="Run as a batch job with this many workers (processes, or Ray actors with --ray); needs -o.")] = None,
    chunk_size: ChunkOpt = 256,
    ordered: Annotated[bool, typer.Option(help="With --ray or --workers: write the output in input order (otherwise: as chunks finish).")] = False,
    resume: ResumeOpt = False,
) -> None:
    """Turn each record's `ids` into the model's input vectors, `embeddings` [tokens, d].

    These are the vectors the first layer reads (token embeddings); `llmcli attend` accepts them
    in place of `ids`. With --pool the whole model runs and one pooled vector `embedding` [d] is
    written instead: with an encoder such as all-minilm-l6-v2, `--pool mean --normalize` gives
    sentence embeddings. Tensors are base64 float32 objects (see records.md), or nested lists
    with --floats. Records are written in input order, each batch as soon as it is done.
    With --ray, --workers or --resume the records run as a batch job (as `llmcli batch` runs).

    Example: echo "The cat sat." | llmcli tokenize -m all-minilm-l6-v2 | llmcli encode -m all-minilm-l6-v2 --pool mean --normalize
    """
    if pool is not None and pool not in POOLS:
        raise UsageError(f"unknown --pool {pool!r}", f"use one of {', '.join(POOLS)}")
    if normalize and pool is None:
        raise UsageError("--normalize needs --pool", "add --pool mean (or cls, last)")
    check_output(output, input)
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1", "use --batch-size 1 or more")

    from llmcli.cli.progress import make_progress
    from llmcli.engine.encode_records import EncodeOptions

    options = EncodeOptions(pool, normalize, floats, truncate)
    if ray is not None or workers is not None or resume:
        return run_stage_job(
            options, "encoding", input, output, model, dtype=dtype, device=device, quantize=quantize, batch_size=batch_size, threads=threads,
            skip_errors=skip_errors, ray=ray, workers=workers or 1, chunk_size=chunk_size, ordered=ordered, resume=resume, progress=progress,
        )
    loaded = load_stage_model(model, dtype, device, quantize, threads)

    def transform(items: list[tuple[dict, int]]) -> list:
        results = options.encode(loaded, items)
        done = [r for r in results if not isinstance(r, InputError)]
        bar.advance(records=len(done), tokens=sum(options.tokens(r) for r in done))
        return results

    with make_progress(progress, "encoding") as bar:
        run_batched_stage(input, output, transform, skip_errors=skip_errors, max_batch=batch_size)
