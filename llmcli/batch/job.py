"""A batch job on disk: the checked input, its parts (output chunks written atomically), the
manifest that ties them to the input, and the merge into the output file.

Layout, for `-o OUT.jsonl`:

    OUT.jsonl.parts/job.json                  the manifest: the input's sha256, the kind of job,
                                              the options that change results, the record count
    OUT.jsonl.parts/part-<first>-<last>.jsonl one line per finished record:
                                              {"index", "tokens", "error", "worker", "record"}

A part is written under a temporary name, fsynced and renamed, so it is whole or absent: a
crash (kill -9, a power cut) never leaves half a record in a part, and nothing in OUT.jsonl
until the merge, which writes OUT.jsonl the same way. The part's name is its index range, so a
retried chunk (Ray retries the task of a killed actor) replaces its part with the same records;
the merge keeps one record per index whatever the parts hold, so every record is in the output
exactly once. `--resume` reads the parts of a run that stopped and runs only the records no part
holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from llmcli.errors import InputError, UsageError
from llmcli.tempfiles import owned_tmp, remove_dead_tmp

MANIFEST = "job.json"
PART_PREFIX = "part-"


@dataclass
class Item:
    """One input record: its position among the records (0-based), its line in the file (1-based), the record."""

    index: int
    line: int
    record: dict


@dataclass
class Done:
    """One finished record, as a part holds it."""

    index: int
    record: dict | list[dict]  # the output record; a stage's records of one input (none for a skipped line)
    tokens: int = 0
    error: bool = False
    worker: str = ""  # host:pid of the process that ran it, for the people (and tests) tracing a part back

    def to_json(self) -> str:
        value = {"index": self.index, "tokens": self.tokens, "error": self.error, "worker": self.worker, "record": self.record}
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass
class Job:
    """A checked input and where its output goes: what is done already and what is left."""

    source: str
    output: Path
    kind: str
    fingerprint: str
    items: list[Item]
    done: dict[int, Done] = field(default_factory=dict)

    @property
    def parts(self) -> Path:
        return parts_dir(self.output)

    @property
    def total(self) -> int:
        return len(self.items)

    def pending(self) -> list[Item]:
        return [item for item in self.items if item.index not in self.done]

    def write_part(self, results: list[Done]) -> None:
        """The records of one finished chunk, atomically, as one part; then they count as done."""
        if not results:
            return
        first, last = min(r.index for r in results), max(r.index for r in results)
        write_atomic(self.parts / f"{PART_PREFIX}{first:09d}-{last:09d}.jsonl", "".join(r.to_json() + "\n" for r in results))
        for r in results:
            self.done.setdefault(r.index, r)

    def merge(self, ordered: bool = True) -> None:
        """Write the output file from the parts (atomically), one record per input record, then remove the parts.

        ordered: the records in input order; otherwise in the order their parts were written.
        """
        parts = read_parts(self.parts)
        seen: dict[int, Done] = {}
        for _path, results in parts:
            for r in results:
                seen.setdefault(r.index, r)
        missing = [item.index for item in self.items if item.index not in seen]
        if missing:
            raise UsageError(
                f"{len(missing)} record(s) of {self.source} have no result in {self.parts} (the first: record {missing[0] + 1})",
                "rerun the same command with --resume to run them",
            )
        if ordered:
            records = [seen[item.index] for item in self.items]
        else:
            records, emitted = [], set()
            for _path, results in parts:
                for r in results:
                    if r.index not in emitted:
                        emitted.add(r.index)
                        records.append(seen[r.index])
        lines = []
        for r in records:
            for record in r.record if isinstance(r.record, list) else [r.record]:  # a stage may write several records per input (samples), or none (a skipped line)
                lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        write_atomic(self.output, "".join(lines))
        shutil.rmtree(self.parts, ignore_errors=True)

    def counts(self) -> tuple[int, int, int]:
        """(records done, errors among them, tokens they produced)."""
        return len(self.done), sum(d.error for d in self.done.values()), sum(d.tokens for d in self.done.values())


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def write_atomic(path: Path, text: str) -> None:
    """path holds text, whole, or is untouched: written under a temporary name, fsynced, renamed, the folder fsynced."""
    tmp = owned_tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_parts(folder: Path) -> list[tuple[Path, list[Done]]]:
    """Every part in folder, oldest first (their write order), with its records."""
    if not folder.is_dir():
        return []
    paths = sorted(folder.glob(f"{PART_PREFIX}*.jsonl"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    out = []
    for path in paths:
        results = []
        with open(path, encoding="utf-8") as f:
            for text in f:
                value = json.loads(text)
                results.append(Done(value["index"], value["record"], value.get("tokens", 0), value.get("error", False), value.get("worker", "")))
        out.append((path, results))
    return out


def read_items(stream: IO[bytes], source: str, check: Callable[[dict, int], None]) -> tuple[list[Item], str]:
    """Every record of a JSONL input and the input's sha256, checked before any record runs.

    A line that is not a JSON object means the input is not JSONL: an InputError naming the line
    (nothing runs). check(record, line) raises InputError for a record the job cannot take at all
    (a batch request without a custom_id, a repeated custom_id); records it lets through get a result
    each, an error record when their request is bad.
    """
    from llmcli.records import iter_line_results

    digest = hashlib.sha256()
    items: list[Item] = []
    for line in iter_line_results(_Hashing(stream, digest), source):
        if isinstance(line, InputError):
            line.hint = "the input must be JSONL: one JSON object per line"
            raise line
        try:
            check(line.record, line.number)
        except InputError as exc:
            exc.line, exc.source = exc.line or line.number, exc.source or source
            raise
        items.append(Item(len(items), line.number, line.record))
    return items, digest.hexdigest()


class _Hashing:
    """A binary stream that feeds what is read through it to a hash."""

    def __init__(self, stream: IO[bytes], digest: Any):
        self.stream = stream
        self.digest = digest

    def read1(self, size: int = -1) -> bytes:
        read1 = getattr(self.stream, "read1", self.stream.read)
        data = read1(size)
        self.digest.update(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data = self.stream.readline(size)
        self.digest.update(data)
        return data

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


def open_job(source: str, output: Path, kind: str, items: list[Item], input_sha: str, options: dict, resume: bool) -> Job:
    """The job for output: a fresh one (its manifest written), or with --resume the one a stopped run left.

    Without --resume, parts left by an earlier run are refused (they would be overwritten);
    with it, the manifest must match this input and these options.
    """
    fingerprint = hashlib.sha256(json.dumps({"input": input_sha, "kind": kind, "options": options}, sort_keys=True).encode()).hexdigest()
    job = Job(source, output, kind, fingerprint, items)
    folder = job.parts
    manifest = folder / MANIFEST
    if folder.exists() and not resume:
        raise UsageError(
            f"{folder} holds the parts of an earlier run of this output",
            "rerun with --resume to finish that run, or delete the folder to start over",
        )
    if resume and manifest.exists():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {manifest}: {exc}", "delete the folder to start over") from None
        if old.get("fingerprint") != fingerprint:
            raise UsageError(
                f"{folder} belongs to a run with another input or other options than this one",
                "rerun with the same input and options, or delete the folder to start over",
            )
        remove_dead_tmp(folder)
        for _path, results in read_parts(folder):
            for r in results:
                job.done.setdefault(r.index, r)
        return job
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(manifest, json.dumps({"fingerprint": fingerprint, "kind": kind, "input": source, "input_sha256": input_sha, "options": options, "records": len(items)}, indent=1) + "\n")
    return job
