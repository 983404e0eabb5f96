"""`llmcli generate`: ids (or text) -> generated_ids and finish_reason, with continuous batching."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import typer
from typing_extensions import Annotated

from llmcli.cli import app
from llmcli.cli.batch import ChunkOpt, RayOpt, ResumeOpt, run_stage_job
from llmcli.cli.options import (
    DEFAULT_MODEL,
    DEFAULT_PREFIX_CACHE_MB,
    DeviceOpt,
    DtypeOpt,
    InputArg,
    JsonSchemaOpt,
    MaxBatchedTokensOpt,
    ModelOpt,
    OutputOpt,
    PrefixCacheOpt,
    ProgressOpt,
    QuantizeOpt,
    SkipErrorsOpt,
    ThreadsOpt,
    check_max_batched_tokens,
    response_format_from_flags,
    sampling_options,
)
from llmcli.cli.stage import BadLines, check_output, open_input, open_output, say
from llmcli.core.sampling_params import SamplingParams
from llmcli.core.threads import apply_threads
from llmcli.errors import UsageError


@app.command()
@sampling_options
def generate(
    input: InputArg = "-",
    output: OutputOpt = None,
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most new tokens per record.")] = 128,
    sampling: SamplingParams = None,  # one flag per knob (--temperature, --top-p, ..., --seed): see sampling_options
    stop: Annotated[Optional[List[str]], typer.Option(help="Stop string (repeatable); not included in the output.")] = None,
    stop_id: Annotated[Optional[List[int]], typer.Option(help="Stop token id (repeatable).")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep going past the end-of-sequence token.")] = False,
    min_tokens: Annotated[int, typer.Option(help="Generate at least this many tokens before stopping.")] = 0,
    samples: Annotated[int, typer.Option("--samples", help="Samples per record (one output record each, with `sample`; the API's `n`).")] = 1,
    # the flag's old name, one letter from -n (--max-tokens): still read, no longer shown
    n_alias: Annotated[Optional[int], typer.Option("--n", hidden=True)] = None,
    logprobs: Annotated[
        Optional[int], typer.Option(help="Add `logprobs`: the chosen token's logprob and this many alternatives (at most 20, as the server).")
    ] = None,
    echo: Annotated[bool, typer.Option(help="Add `prompt_logprobs` for the prompt tokens.")] = False,
    stream: Annotated[bool, typer.Option(help="Write {id, delta} records as text is produced, each record's together just before its final record.")] = False,
    batch_size: Annotated[int, typer.Option(help="Sequences in flight at once (continuous batching).")] = 8,
    prefix_cache_mb: PrefixCacheOpt = DEFAULT_PREFIX_CACHE_MB,
    max_batched_tokens: MaxBatchedTokensOpt = None,
    progress: ProgressOpt = None,
    cache: Annotated[Optional[str], typer.Option(help="Resume from a KV cache written by `llmcli attend --save-cache`.")] = None,
    truncate: Annotated[bool, typer.Option(help="Keep the last tokens of prompts longer than the context instead of failing.")] = False,
    json_schema: JsonSchemaOpt = None,
    regex: Annotated[Optional[str], typer.Option("--regex", help="Constrain the output to match this regular expression (whole output).")] = None,
    choice: Annotated[Optional[str], typer.Option("--choice", help="Constrain the output to one of these comma-separated texts: --choice yes,no,maybe.")] = None,
    grammar: Annotated[Optional[str], typer.Option("--grammar", help="Constrain the output to this Lark grammar file (llguidance's dialect).")] = None,
    json_object: Annotated[bool, typer.Option("--json", help="Constrain the output to one JSON object (any keys).")] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = "none",
    threads: ThreadsOpt = None,
    skip_errors: SkipErrorsOpt = False,
    ray: RayOpt = None,
    workers: Annotated[Optional[int], typer.Option(help="Run as a batch job with this many workers (processes, or Ray actors with --ray); needs -o.")] = None,
    chunk_size: ChunkOpt = 64,
    ordered: Annotated[bool, typer.Option(help="With --ray or --workers: write the output in input order (otherwise: as chunks finish).")] = False,
    resume: ResumeOpt = False,
) -> None:
    """Generate tokens for each record's `ids` (or `text`), writing `generated_ids` and `finish_reason`.

    Records are written in input order; up to --batch-size prompts are in flight at once.
    --json-schema, --regex, --choice, --grammar and --json constrain every output (a record's own
    `response_format` field, in the server's shapes, wins for that record); an output cut by
    --max-tokens says finish_reason "length".
    With --ray, --workers or --resume the records run as a batch job (as `llmcli batch` runs):
    chunks written atomically beside -o, on a Ray cluster or in worker processes, resumable.

    Example: echo "The capital of France is" | llmcli tokenize | llmcli generate -n 8 | llmcli decode --text-only
    """
    from llmcli.cli.progress import make_progress
    from llmcli.core.sampling import check_token_ids
    from llmcli.engine import Engine
    from llmcli.engine.generate_records import GenerateOptions
    from llmcli.records import DELTA, ID, SAMPLE, RecordWriter

    if n_alias is not None:
        if samples != 1:
            raise UsageError("--n is the old name of --samples; give one of them", "use --samples")
        samples = n_alias
    if samples < 1:
        raise UsageError("--samples must be at least 1", "use --samples 1 or more")
    if max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1", "use -n 1 or more")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1", "use --batch-size 1 or more")
    check_max_batched_tokens(max_batched_tokens)
    params = dataclasses.replace(sampling, logprobs=logprobs)  # checked there: at most MAX_LOGPROBS
    flag_grammar = response_format_from_flags(json_schema, regex, choice, grammar, json_object)  # a bad one fails before the model loads
    options = GenerateOptions(params, max_tokens, min_tokens, tuple(stop or ()), tuple(stop_id or ()), ignore_eos, samples, echo, truncate, flag_grammar)
    if ray is not None or workers is not None or resume:
        if stream or cache is not None:
            raise UsageError("--stream and --cache do not run as a batch job (--ray, --workers, --resume)", "leave them out, or run without the batch flags")
        return run_stage_job(
            options, "generating", input, output, model, dtype=dtype, device=device, quantize=quantize, batch_size=batch_size, threads=threads,
            skip_errors=skip_errors, ray=ray, workers=workers or 1, chunk_size=chunk_size, ordered=ordered, resume=resume, progress=progress,
            max_batched_tokens=max_batched_tokens, prefix_cache_mb=prefix_cache_mb,
        )
    check_output(output, input, cache)
    stream_in, source = open_input(input)
    apply_threads(threads)
    engine = Engine(
        model, dtype=dtype, device=device, quantize=quantize, batch_size=batch_size, max_batched_tokens=max_batched_tokens, notify=say, default_model=DEFAULT_MODEL,
        prefix_cache_mb=prefix_cache_mb,
    )
    tokenizer = engine.tokenizer
    vocab = engine.config.vocab_size
    check_token_ids(stop_id or [], vocab, "--stop-id")
    context = engine.context_length
    prompt_cache = None
    if cache is not None:
        from llmcli.core.kvfile import load_prompt_cache

        prompt_cache = load_prompt_cache(cache, engine.loaded)
    bad = BadLines(source, skip_errors)
    # requests are made on the engine's read-ahead thread (reading, parsing, tokenizing) and put
    # in `made`; `records` (in admission order, the order results are written) is kept on this
    # thread only, by on_admit, so nothing iterates a dict that the other thread changes
    made: dict[int, tuple[int, dict]] = {}
    records: dict[int, tuple[int, dict]] = {}

    def requests():
        # all the requests of a line are made before the first is yielded, so a bad line yields none
        for _, line_requests in bad.results(stream_in, lambda line: list(make_requests(line.record, line.number))):
            yield from line_requests

    def on_admit(request) -> None:
        records[id(request)] = made.pop(id(request))

    def make_requests(record: dict, number: int):
        ids = options.prompt_ids(record, number, tokenizer, vocab, context)
        kv = None
        if prompt_cache is not None:
            from llmcli.core.kvfile import check_prefix

            k, v, cached_ids = prompt_cache
            check_prefix(cached_ids, ids, cache, number)
            kv = (k, v)
        for req in options.requests(record, number, ids, kv):
            made[id(req)] = (number, record)
            yield req

    writer = RecordWriter(open_output(output))

    # Stream records of a request behind the one whose final record comes next, held until it is
    # next: each record's deltas come together, just before it, so a reader never sees two interleaved.
    held: dict[int, list[dict]] = {}

    def on_event(event) -> None:
        if stream and event.text:
            delta = {ID: event.request.id, **({SAMPLE: event.request.sample_index} if samples > 1 else {}), DELTA: event.text}
            key = id(event.request)
            if key == next(iter(records), None):
                writer.write(delta)
            else:
                held.setdefault(key, []).append(delta)
        bar.on_event(event)

    with make_progress(progress, "generating") as bar:
        # read ahead: a line still on its way never holds up the answers to the lines before it
        for result in engine.iter_results(requests(), on_event=on_event, on_admit=on_admit, read_ahead=True):
            _, record = records.pop(id(result.request))
            writer.write(options.output(record, result, tokenizer))
            if held:
                writer.write_many(held.pop(next(iter(records), None), []))
            bar.advance(records=1)
    bad.report()
