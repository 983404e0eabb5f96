"""Temporary files of the llmcli cache whose writer died (kill -9, a crash, a power cut).

Every cache entry is written under a temporary name that carries the writer's pid
(`<name>.<pid>.tmp`, see owned_tmp) and renamed into place, so readers only ever see whole files. A writer
killed before the rename leaves its temporary file behind; the next process that writes into
the same folder removes those whose pid is no longer running. A pid taken over by a new
process keeps its leftover until that one ends too: never a live writer's file, at worst a
late cleanup. No torch here: the catalogue uses this too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_OWNED = re.compile(r"\.(\d+)\.tmp$")


def owned_tmp(target: Path) -> Path:
    """The temporary name to write `target` under: `<name>.<pid>.tmp` beside it (the whole name, so
    two targets that differ only in their suffix never share one)."""
    return target.with_name(f"{target.name}.{os.getpid()}.tmp")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (one of another user counts as running)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, someone else's
        return True
    return True


def remove_dead_tmp(folder: Path, target: str | None = None) -> list[Path]:
    """Remove the `*.<pid>.tmp` files (and folders) in folder whose pid is not running (only `<target>.<pid>.tmp`
    when target names one file: a user's folder holds others' files); returns what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:  # no folder yet, or not readable: nothing to clean
        return removed
    for name in names:
        match = _OWNED.search(name)
        if match is None or (target is not None and name[: match.start()] != target) or pid_alive(int(match.group(1))):
            continue
        path = folder / name
        try:
            if path.is_dir() and not path.is_symlink():  # a killed build's folder of object files
                import shutil

                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:  # gone already (another cleaner), or a read-only cache
            pass
    return removed


def source_key(path: Path) -> str:
    """The cache key of an entry derived from one model file (a GGUF's tokenizer): its resolved
    path, size and mtime, so an entry follows the file it was made from."""
    import hashlib

    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:24]


# Cache folders of layouts llmcli no longer reads: the float32 weights and kernel-panel copies of
# GGUF files that loads wrote before the block formats (about 10x the GGUF's size each).
STALE_CACHE_FOLDERS = ("weights",)


def remove_stale_cache(root: Path) -> int:
    """Delete the cache folders of old layouts under root; returns the bytes freed."""
    import shutil

    freed = 0
    for name in STALE_CACHE_FOLDERS:
        folder = root / name
        if folder.is_dir():
            freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder, ignore_errors=True)
    return freed
