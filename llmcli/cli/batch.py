"""`llmcli batch`: an OpenAI Batch file in, its output file out, here or on a Ray cluster; resumable.

The shared part of `batch` and the stage commands' `--ray` (`generate --ray`): the job's options
(--workers, --chunk-size, --ray, --ordered, --resume), `run_job` (check the input, open or resume
the job, run what is left, merge) and the closing summary line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import typer
from typing_extensions import Annotated

from llmcli.cli import app
from llmcli.cli.options import (
    DEFAULT_ENCODER,
    DEFAULT_MODEL,
    DEFAULT_PREFIX_CACHE_MB,
    DeviceOpt,
    DtypeOpt,
    MaxBatchedTokensOpt,
    ModelOpt,
    PrefixCacheOpt,
    ProgressOpt,
    QuantizeOpt,
    ThreadsOpt,
    check_max_batched_tokens,
)
from llmcli.cli.stage import check_output, open_input, say
from llmcli.errors import LlmcliError, UsageError

RayOpt = Annotated[
    Optional[str],
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        help="Run on a Ray cluster (pip install 'llmcli[ray]'): `auto` for the cluster `ray start` made on this machine, or the head's address HOST:PORT.",
    ),
]
WorkersOpt = Annotated[int, typer.Option(help="Workers, each with its own copy of the model: processes here, or actors on Ray.")]
ChunkOpt = Annotated[int, typer.Option(help="Records per chunk: the unit of work of a worker and of the atomic writes that --resume picks up from.")]
OrderedOpt = Annotated[bool, typer.Option(help="Write the output in input order (otherwise: in the order chunks finish).")]
ResumeOpt = Annotated[bool, typer.Option(help="Finish a run that stopped (killed, crashed): run only the records its parts in OUTPUT.parts/ lack.")]


def check_job_options(output: Optional[str], workers: int, chunk_size: int, flag: str = "-o") -> Path:
    if output is None or output == "-":
        raise UsageError(f"a batch job needs an output file ({flag} OUTPUT.jsonl)", "its parts are written beside it, so a stopped run can --resume")
    if workers < 1:
        raise UsageError("--workers must be at least 1", "use --workers 1 or more")
    if chunk_size < 1:
        raise UsageError("--chunk-size must be at least 1", "use e.g. --chunk-size 64")
    path = Path(output)
    if path.is_dir():
        raise UsageError(f"output {output} is a directory", "give a file name, e.g. -o results.jsonl")
    return path


def run_job(
    input: str,
    output: Path,
    kind: str,
    check: Callable[[dict, int], None],
    options: dict,
    make_spec: Callable[[str], object],
    *,
    ray: Optional[str],
    workers: int,
    chunk_size: int,
    threads: Optional[int],
    ordered: bool,
    resume: bool,
    progress: Optional[bool],
    verb: str,
) -> None:
    """Check the whole input, open (or resume) the job, run the records left, merge the output, say the summary.

    options: what changes the results (the model, sampling flags...), kept in the manifest so that
    --resume refuses parts made with others. make_spec(fingerprint) builds the workers' spec.
    """
    from llmcli.batch.job import open_job, read_items
    from llmcli.batch.runner import run_local, run_ray, worker_error
    from llmcli.cli.progress import make_progress

    start = time.perf_counter()
    check_output(str(output), input)
    stream, source = open_input(input)
    try:
        items, sha = read_items(stream, source, check)
    finally:
        if input != "-":
            stream.close()
    job = open_job(source, output, kind, items, sha, options, resume)
    spec = make_spec(job.fingerprint)
    pending = job.pending()
    resumed = job.total - len(pending)
    if resume and resumed:
        say(f"llmcli: resuming: {resumed} of {job.total} records are done, running the other {len(pending)}")
    with make_progress(progress, verb, total=job.total, done=resumed) as bar:

        def on_chunk(results) -> None:
            job.write_part(results)
            bar.advance(records=len(results), tokens=sum(r.tokens for r in results))

        try:
            if ray is not None:
                run_ray(spec, pending, on_chunk, address=ray, staging=job.parts, workers=workers, chunk_size=chunk_size, threads=threads, ordered=ordered)
            else:
                run_local(spec, pending, on_chunk, workers=workers, chunk_size=chunk_size, threads=threads)
        except LlmcliError:
            raise
        except Exception as exc:  # a worker's failure as the process pool reports it
            cause = worker_error(exc)
            if cause is not None:
                raise cause from None
            raise
    job.merge(ordered=ordered or ray is None and workers == 1)
    records, errors, tokens = job.counts()
    elapsed = time.perf_counter() - start
    say(f"llmcli: {records} records ({len(pending)} run now, {errors} errors) in {elapsed:.1f} s, {bar.tokens} tokens at {bar.rate:.1f} tok/s -> {output}")


def run_stage_job(stage_options, verb: str, input: str, output: Optional[str], model: Optional[str], *, dtype: str, device: str, quantize: str, batch_size: int,
                  threads: Optional[int], skip_errors: bool, ray: Optional[str], workers: int, chunk_size: int, ordered: bool, resume: bool, progress: Optional[bool],
                  max_batched_tokens: Optional[int] = None, prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB) -> None:
    """A stage command's records (GenerateOptions or EncodeOptions) as a batch job: the runner of `llmcli batch`, the records of the command."""
    from llmcli.batch.stages import StageSpec

    path = check_job_options(output, workers, chunk_size)
    model = absolute(model)
    spec = StageSpec(stage_options, model, dtype, device, quantize, batch_size, skip_errors, DEFAULT_MODEL, max_batched_tokens, prefix_cache_mb)
    job_options = {"model": model, "dtype": dtype, "quantize": quantize, spec.kind: repr(stage_options)}
    run_job(
        input, path, spec.kind, lambda _record, _line: None, job_options, lambda _fingerprint: spec,
        ray=ray, workers=workers, chunk_size=chunk_size, threads=threads, ordered=ordered, resume=resume, progress=progress, verb=verb,
    )


def absolute(ref: Optional[str]) -> Optional[str]:
    """A model path as an absolute path (workers run in other folders); a catalogue name as it is."""
    if ref is not None and Path(ref).exists():
        return str(Path(ref).resolve())
    return ref


@app.command()
def batch(
    input: Annotated[str, typer.Argument(help="OpenAI Batch input file (JSONL): {custom_id, method, url, body} per line; '-' reads stdin.")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="The output file (OpenAI Batch output lines); its parts go to OUTPUT.parts/ until the end.")] = None,
    model: ModelOpt = None,
    embedding_model: Annotated[
        Optional[str], typer.Option(help=f"Encoder for /v1/embeddings lines when --model is a decoder. Default: {DEFAULT_ENCODER} (loaded on first use).")
    ] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="The model name bodies may send as `model` (default: the catalogue or file name).")] = None,
    batch_size: Annotated[int, typer.Option(help="Requests decoded together per worker (continuous batching).")] = 8,
    max_context: Annotated[Optional[int], typer.Option(help="Cap the context (tokens per sequence) below the model's.")] = None,
    max_batched_tokens: MaxBatchedTokensOpt = None,
    prefix_cache_mb: PrefixCacheOpt = DEFAULT_PREFIX_CACHE_MB,
    workers: WorkersOpt = 1,
    chunk_size: ChunkOpt = 64,
    ray: RayOpt = None,
    ordered: OrderedOpt = False,
    resume: ResumeOpt = False,
    progress: ProgressOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = "none",
    threads: ThreadsOpt = None,
) -> None:
    """Run an OpenAI Batch file: each line's body answered as `llmcli serve` answers it, one output line per request.

    Lines go to /v1/chat/completions, /v1/completions or /v1/embeddings. A line whose request is
    bad gets an error line (status_code and serve's error body, or `error`); the others go on. A
    line without custom_id, a repeated custom_id, or a line that is not JSON stops the job before
    it starts. The output is written when every line is done; a killed run continues with --resume.

    Example: llmcli batch requests.jsonl -o results.jsonl --model smollm2-135m-instruct
    """
    from llmcli.batch.openai_batch import KIND, Envelopes, OpenAIBatchSpec
    from llmcli.engine.backend import BackendSpec

    path = check_job_options(output, workers, chunk_size)
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1", "use --batch-size 1 or more")
    if max_context is not None and max_context < 2:
        raise UsageError("--max-context must be at least 2", "leave it out to use the model's context")
    check_max_batched_tokens(max_batched_tokens)
    model, embedding_model = absolute(model), absolute(embedding_model)
    # the whole chunk is submitted at once: the queue must hold it (n > 1 bodies make several requests each)
    backend = BackendSpec(
        model, dtype, device, quantize, batch_size, 1 << 30, max_context, embedding_model, served_model_name,
        max_batched_tokens=max_batched_tokens, prefix_cache_mb=prefix_cache_mb,
    )  # fmt: skip
    options = {"model": model, "embedding_model": embedding_model, "served_model_name": served_model_name, "dtype": dtype, "quantize": quantize, "max_context": max_context}
    run_job(
        input, path, KIND, Envelopes(), options, lambda fingerprint: OpenAIBatchSpec(backend, fingerprint),
        ray=ray, workers=workers, chunk_size=chunk_size, threads=threads, ordered=ordered, resume=resume, progress=progress, verb="batch",
    )
