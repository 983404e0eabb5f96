"""`llmcli quantize`: write a GGUF in llama.cpp's block formats from an HF directory or a GGUF."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from typing_extensions import Annotated

from llmcli.cli import app
from llmcli.cli.options import ThreadsOpt
from llmcli.cli.stage import check_output, say
from llmcli.core.threads import apply_threads

TYPE_HELP = "Q4_K_M, Q5_K_M, Q4_K_S, Q5_K_S, Q6_K, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16 or F32 (llama-quantize's presets and mixing rules)."


@app.command()
def quantize(
    src: Annotated[str, typer.Argument(help="Catalogue name, HF-format directory or .gguf file.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="The GGUF file to write.", show_default=False)],
    type: Annotated[str, typer.Option("--type", help=TYPE_HELP)] = "Q4_K_M",
    threads: ThreadsOpt = None,
) -> None:
    """Write a GGUF that llama.cpp (and llmcli) loads, its weights in llama.cpp's block formats.

    The tensor types follow llama-quantize's rules for the preset (Q4_K_M: Q4_K, with Q6_K for the
    output projection and for attn_v/ffn_down in the layers llama.cpp picks), the blocks are byte
    for byte what llama-quantize writes, and the file appears whole or not at all. From an HF
    directory (llama, mistral, qwen2, qwen3 with a byte-level BPE tokenizer) the metadata and
    tokenizer are written as convert_hf_to_gguf.py does; from a GGUF they are copied.

    Example: llmcli quantize smollm2-135m-instruct smollm2-q4_k_m.gguf --type Q4_K_M
    """
    from llmcli.catalog import resolve_model_path
    from llmcli.core.gguf_write import preset, read_source, write_gguf
    from llmcli.tempfiles import owned_tmp

    apply_threads(threads)
    chosen = preset(type)
    path = resolve_model_path(src, say)
    check_output(out, path, flag="OUT")
    source = read_source(Path(path))
    tmp = owned_tmp(out)
    try:
        counts = write_gguf(source, tmp, chosen)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    mix = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    say(f"llmcli: wrote {out} ({chosen.name}: {mix}; {out.stat().st_size / 2**20:.1f} MiB)")
    sys.stdout.write(f"{out}\n")
