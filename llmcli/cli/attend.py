"""`llmcli attend`: ids (or embeddings) -> hidden states, attention probabilities, pictures, a saved KV cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from llmcli.cli import app
from llmcli.cli.encode import TruncateOpt, load_stage_model, read_embeddings, read_ids
from llmcli.cli.options import DeviceOpt, DtypeOpt, FloatsOpt, InputArg, ModelOpt, OutputOpt, ProgressOpt, QuantizeOpt, SkipErrorsOpt, ThreadsOpt
from llmcli.cli.stage import check_output, run_stage
from llmcli.errors import InputError, UsageError


def parse_indices(text: Optional[str], count: int, flag: str, what: str) -> list[int]:
    """`0,3,-1` -> [0, 3, count-1]; None -> every index. Negative indices count from the end."""
    if text is None:
        return list(range(count))
    chosen: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            index = int(part)
        except ValueError:
            raise UsageError(f"bad {flag} {text!r}", f"write comma-separated {what} numbers, e.g. {flag} 0,1") from None
        if not -count <= index < count:
            raise UsageError(f"{flag} {index} is out of range", f"the model has {count} {what}s: 0..{count - 1}")
        index %= count
        if index not in chosen:
            chosen.append(index)
    return chosen


@app.command()
def attend(
    input: InputArg = "-",
    output: OutputOpt = None,
    model: ModelOpt = None,
    layer: Annotated[
        Optional[int],
        typer.Option("--layer", help="Write this layer's hidden states instead of the last: 0 = embeddings, i = after block i (HF hidden_states numbering)."),
    ] = None,
    attention: Annotated[bool, typer.Option("--attention", help="Add `attention` [layers, heads, tokens, tokens]: softmax probabilities.")] = False,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Attention blocks to keep, 0-based and comma-separated (default: all).")] = None,
    heads: Annotated[Optional[str], typer.Option("--heads", help="Attention heads to keep, comma-separated (default: all).")] = None,
    heatmap: Annotated[bool, typer.Option("--heatmap", help="Draw the attention map on stderr, tokens on the axes.")] = False,
    per_head: Annotated[bool, typer.Option("--per-head", help="One map per selected layer and head instead of their average.")] = False,
    png: Annotated[Optional[Path], typer.Option("--png", help="Write the attention map as a PNG; several records: FILE-<id>.png each.")] = None,
    save_cache: Annotated[
        Optional[Path],
        typer.Option("--save-cache", help="Save the prompt's KV cache for `llmcli generate --cache`; several records: FILE-<id>.ext each."),
    ] = None,
    floats: FloatsOpt = False,
    truncate: TruncateOpt = False,
    progress: ProgressOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = "none",
    threads: ThreadsOpt = None,
    skip_errors: SkipErrorsOpt = False,
) -> None:
    """Run the model over each record's `ids` and write its hidden states, `hidden` [tokens, d].

    `hidden` is the last layer after the final norm, or --layer N. A record with `embeddings`
    (from `llmcli encode`) is run from those vectors instead of its ids, with the same result.
    --attention adds the attention probabilities, narrowed with --layers and --heads.

    --heatmap draws the attention (averaged over the selected layers and heads, or --per-head)
    on stderr, never stdout, so the records stay clean whether stdout is a pipe, a file or the
    terminal; long inputs are binned to fit the terminal. --png FILE writes the same map with
    token labels; with several records the record id goes into the name (attn.png ->
    attn-1.png, attn-2.png). --save-cache FILE keeps the prompt's keys and values so that
    `llmcli generate --cache FILE` starts after the prompt; several records name files likewise.

    Example: echo "The cat sat on the mat." | llmcli tokenize | llmcli attend --heatmap --layers 0 > hidden.jsonl
    """
    check_output(output, input)
    check_output(png, input, flag="--png")
    check_output(save_cache, input, flag="--save-cache")
    import torch

    from llmcli.cli.progress import make_progress
    from llmcli.cli.render import PerRecordPath, render_heatmap, token_labels, write_png
    from llmcli.records import ATTENTION, EMBEDDINGS, HIDDEN, IDS, SpooledTensor, encode_tensor, require

    loaded = load_stage_model(model, dtype, device, quantize, threads)
    config = loaded.config
    module = loaded.module
    n_layers = config.num_hidden_layers
    if layer is not None and not -(n_layers + 1) <= layer <= n_layers:
        raise UsageError(f"--layer {layer} is out of range", f"the model has hidden states 0..{n_layers} (0 = embeddings)")
    hidden_layer = None if layer is None else layer % (n_layers + 1)
    want_attention = attention or heatmap or png is not None
    if (layers is not None or heads is not None or per_head) and not want_attention:
        raise UsageError("--layers, --heads and --per-head select attention", "add --attention, --heatmap or --png")
    blocks = parse_indices(layers, n_layers, "--layers", "layer") if want_attention else []
    head_list = parse_indices(heads, config.num_attention_heads, "--heads", "head") if want_attention else []
    if save_cache is not None and config.is_encoder:
        raise UsageError(f"--save-cache needs a decoder model; {loaded.name} is an encoder", "use a causal model such as the default")
    if png is not None:
        try:
            import matplotlib  # noqa: F401  (an optional extra: fail before any work is done)
        except ImportError:
            raise UsageError("--png needs matplotlib, which is not installed", "pip install 'llmcli[plot]'") from None
    png_paths = PerRecordPath(png) if png is not None else None
    cache_paths = PerRecordPath(save_cache) if save_cache is not None else None
    console = None
    if heatmap:
        from rich.console import Console

        console = Console(stderr=True, highlight=False)

    # --attention alone streams: each layer's map goes to the record's text as the model produces
    # it, so memory holds one layer's [heads, T, T], not all of them (the maps for --heatmap and
    # --png are drawn from the whole array)
    stream_attention = attention and console is None and png_paths is None and not floats

    @torch.inference_mode()
    def transform(record: dict, number: int) -> dict:
        ids = None
        embeds = None
        if EMBEDDINGS in record:
            array = read_embeddings(record, number, loaded, truncate)
            embeds = torch.tensor(array, dtype=torch.float32).to(loaded.device, loaded.dtype)[None]  # (1, T, d); a copy: the decoded buffer is read-only
            if IDS in record:
                ids = read_ids(record, number, loaded, truncate)
                if len(ids) != array.shape[0]:
                    raise InputError(
                        f"the record has {len(ids)} `ids` but {array.shape[0]} `embeddings` rows",
                        "keep ids and embeddings from the same `llmcli encode` run",
                        line=number,
                    )
        else:
            require(record, IDS, number, stage="attend")
            ids = read_ids(record, number, loaded, truncate)
        if cache_paths is not None and ids is None:
            raise InputError("--save-cache needs the record's `ids`", "pipe through `llmcli tokenize` first", line=number)
        x = torch.tensor([ids], dtype=torch.long, device=loaded.device) if embeds is None else None  # (1, T)
        T = embeds.shape[1] if embeds is not None else len(ids)

        cache = None
        if cache_paths is not None:
            from llmcli.core.models.base import KVCache

            cache = KVCache.for_model(config, 1, T, dtype=loaded.dtype, device=loaded.device)
        spool = SpooledTensor([]) if stream_attention else None
        result = module(
            x,
            inputs_embeds=embeds,
            cache=cache,
            output_hidden=() if hidden_layer is None else (hidden_layer,),
            output_attentions=set(blocks),
            on_attention=None if spool is None else spool_layers(spool, blocks, head_list),
            compute_logits=False,
        )
        hidden = result.last_hidden if hidden_layer is None else result.hidden_states[hidden_layer]  # (1, T, d)
        out = dict(record)
        out[HIDDEN] = encode_tensor(hidden[0].float().cpu().numpy(), floats)
        probs = None
        if spool is not None:
            out[ATTENTION] = spool
        elif want_attention:
            # (layers, heads, T, T): the kept blocks in the order asked for, then the kept heads
            probs = torch.stack([result.attentions[b][0] for b in blocks])[:, head_list].float().cpu().numpy()
            if attention:
                out[ATTENTION] = encode_tensor(probs, floats)
        if probs is not None and (console is not None or png_paths is not None):
            labels = token_labels(loaded.tokenizer, ids, T)
            maps = attention_maps(probs, blocks, head_list, per_head)
            record_id = record.get("id", number)
            if console is not None:
                for title, matrix in maps:
                    render_heatmap(console, matrix, labels, f"record {record_id}: {title}")
            if png_paths is not None:
                write_png(png_paths.next(record_id), maps, labels)
        if cache_paths is not None:
            from llmcli.core.kvfile import save_prompt_cache

            state = cache.row_state(0)
            save_prompt_cache(cache_paths.next(record.get("id", number)), state["k"], state["v"], ids, loaded)
        bar.advance(records=1, tokens=T)
        return out

    with make_progress(progress, "attending") as bar:
        run_stage(input, output, transform, skip_errors=skip_errors)


def spool_layers(spool, blocks: list[int], heads: list[int]):
    """on_attention for the model's forward: each kept block's (1, H, T, S) probabilities, narrowed
    to the kept heads, appended to spool in the order the blocks were asked for (a block that comes
    before its turn waits); sets spool.shape to [blocks, heads, T, S]."""
    turn = {block: k for k, block in enumerate(blocks)}
    waiting: dict[int, object] = {}
    done = 0

    def on_attention(block: int, probs) -> None:
        nonlocal done
        waiting[turn[block]] = probs[0][heads].float().cpu().numpy()  # (heads, T, S)
        spool.shape = [len(blocks), *waiting[turn[block]].shape]
        while done in waiting:
            spool.append(waiting.pop(done))
            done += 1

    return on_attention


def attention_maps(probs, blocks: list[int], heads: list[int], per_head: bool) -> list[tuple[str, object]]:
    """(title, (T, T) map) pairs: one average over all selected layers and heads, or one per pair."""
    if per_head:
        return [(f"layer {b} head {h}", probs[i, j]) for i, b in enumerate(blocks) for j, h in enumerate(heads)]
    return [(f"mean over layers {_span(blocks)} heads {_span(heads)}", probs.mean(axis=(0, 1)))]


def _span(indices: list[int]) -> str:
    return ",".join(str(i) for i in indices) if len(indices) <= 6 else f"{indices[0]}..{indices[-1]} ({len(indices)})"
