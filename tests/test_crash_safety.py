"""kill -9 in the middle of writing: `generate -o FILE`, the compiled-kernel cache; and two processes
filling an empty LLMCLI_HOME (kernels, GGUF tokenizer) at once. Pulls: tests/test_leftovers.py
(kill -9 during a pull) and tests/test_pull.py (two pulls at once).

The kernel builds here use a stand-in compiler (CC) that links by copying the library this test
process already compiled, after a gate the test opens: the cache's protocol (temporary names,
rename, leftovers of dead writers, concurrent writers) runs for real without a 20 s compile.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model_fuzz import make_seed_dir, make_seed_gguf
from tests.test_leftovers import wait_until

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("crash")
    hf = make_seed_dir(folder / "tiny")
    return hf, make_seed_gguf(hf, folder / "tiny.gguf")


def llmcli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmcli", *args], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, **kwargs)


def test_kill_9_during_generate_output_leaves_no_cut_file(seeds, tmp_path):
    hf, _ = seeds
    out = tmp_path / "out.jsonl"
    out.write_text('{"old": "kept until a run finishes"}\n')
    many = tmp_path / "many.jsonl"
    many.write_text('{"text": "hello"}\n' * 5000)  # far more than the run gets through before the kill
    proc = llmcli("generate", str(many), "-m", str(hf), "-n", "32", "--temperature", "0", "-o", str(out), stderr=subprocess.PIPE, text=True)
    tmp = out.with_name(f"out.jsonl.{proc.pid}.tmp")
    try:
        assert wait_until(lambda: tmp.exists() and tmp.stat().st_size > 0, 120), proc.stderr.read() if proc.poll() is not None else "no record"
        assert out.read_text() == '{"old": "kept until a run finishes"}\n'  # not touched while the run writes
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out.read_text() == '{"old": "kept until a run finishes"}\n' and tmp.exists()
    # the rerun writes the whole file and removes the dead run's leftover
    again = llmcli("generate", "-m", str(hf), "-n", "3", "--temperature", "0", "-o", str(out), stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = again.communicate('{"text": "hello"}\n{"text": "again"}\n', timeout=120)
    assert again.returncode == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in records] == ["hello", "again"] and all(len(r["generated_ids"]) == 3 for r in records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.jsonl", "out.jsonl"]


FAKE_CC = """#!/bin/sh
# a compiler stand-in: objects are empty files; the link waits for $GATE, then copies $REAL_SO
while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done
case "$out" in
  *.tmp)
    echo $$ >> "$MARKS/link"
    while [ ! -e "$GATE" ]; do sleep 0.05; done
    cp "$REAL_SO" "$out" ;;
  *) : > "$out" ;;
esac
"""

LOAD = """
import sys
from pathlib import Path
from llmcli.core.kernels import load_kernels
from llmcli.core.loader import load_model
loaded = load_model(sys.argv[1], cache_dir=sys.argv[2])
import torch
kernels = load_kernels(Path(sys.argv[2]) / "kernels")  # the library the load used (loaded once per process)
print(kernels is not None, loaded.module(torch.tensor([[1, 2, 3]])).logits.shape[-1], loaded.tokenizer.encode("hello world").ids[:3], flush=True)
"""


@pytest.fixture()
def fake_cc(tmp_path) -> dict:
    from llmcli.core.kernels import load_kernels

    real = load_kernels()  # compiled once per machine (in the temp dir), like any model test's
    if real is None:
        pytest.fail("the kernels do not build here; this test checks their cache")
    cc = tmp_path / "fake-cc"
    cc.write_text(FAKE_CC)
    cc.chmod(0o755)
    (tmp_path / "marks").mkdir()
    return {"CC": str(cc), "REAL_SO": str(real.path), "GATE": str(tmp_path / "gate"), "MARKS": str(tmp_path / "marks"), "PYTHONPATH": str(REPO)}


def load_process(gguf: Path, home: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOAD, str(gguf), str(home)], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def links(env: dict) -> list[str]:
    marks = Path(env["MARKS"]) / "link"
    return marks.read_text().split() if marks.exists() else []


def test_kill_9_during_kernel_build_then_two_loads_at_once(seeds, tmp_path, fake_cc):
    _, gguf = seeds
    home = tmp_path / "home"
    killed = load_process(gguf, home, fake_cc)
    try:
        assert wait_until(lambda: links(fake_cc), 120), killed.stderr.read() if killed.poll() is not None else "no link started"
        kernels = home / "kernels"
        assert any(p.name.startswith(".objs-") for p in kernels.iterdir())  # mid-build: the object files' folder
        os.killpg(killed.pid, signal.SIGKILL)  # the loader and its compiler, as a terminal's kill would
        killed.wait(timeout=30)
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
    assert not any(p.suffix == ".so" for p in kernels.iterdir())

    # two loads into the half-built home at once, both stopped at the link until both are there
    first, second = load_process(gguf, home, fake_cc), load_process(gguf, home, fake_cc)
    try:
        assert wait_until(lambda: len(links(fake_cc)) == 3, 120), [p.stderr.read() for p in (first, second) if p.poll() is not None]
        Path(fake_cc["GATE"]).touch()
        results = [p.communicate(timeout=120) for p in (first, second)]
    finally:
        for p in (first, second):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, (out, err) in zip((first, second), results):
        assert p.returncode == 0 and out.startswith("True "), err  # both ran with the kernels, not torch's fallback
    assert results[0][0] == results[1][0]
    names = sorted(p.name for p in kernels.iterdir())
    assert len(names) == 1 and names[0].endswith(".so"), names  # one library; the dead build's leftovers are gone
    assert not [p for p in home.rglob("*.tmp")]
