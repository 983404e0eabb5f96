"""The release as users get it: a wheel built from this tree (not an editable install), installed
into a fresh venv, runs the main pipe from its own `llmcli` script and its own copy of llmcli."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.install


def run(*args: str | os.PathLike, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


def test_wheel_installs_into_a_fresh_venv_and_runs_the_main_pipe(tmp_path, smollm2_gguf):
    # Build from a copy, so that the build's own folders (build/, *.egg-info) never land in the tree.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "benchmarks"))
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", wheels, source)
    (wheel,) = wheels.glob("llmcli-*-py3-none-any.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    # The dependencies (torch, tokenizers, ...) come from this environment, through a .pth line
    # that the venv's site-packages reads after its own packages: llmcli itself only from the wheel.
    venv_site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    dependencies = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (venv_site / "llmcli_test_dependencies.pth").write_text("\n".join(dependencies) + "\n", encoding="utf-8")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)

    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    env["PATH"] = str(bin_dir) + os.pathsep + env.get("PATH", "")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = run(python, "-c", "import llmcli; print(llmcli.__file__)", env=env, cwd=cwd).stdout.strip()
    assert Path(where).is_relative_to(venv_site), where
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M).group(1)
    assert run(bin_dir / "llmcli", "--version", env=env, cwd=cwd).stdout == f"llmcli {version}\n"
    assert run(python, "-m", "llmcli", "--version", env=env, cwd=cwd).stdout == f"llmcli {version}\n"
    assert run("bash", "-c", "command -v llmcli", env=env, cwd=cwd).stdout.strip() == str(bin_dir / "llmcli")
    pipe = 'echo "What is the capital of France?" | llmcli tokenize --chat | llmcli generate -n 8 | llmcli decode --text-only'
    answer = run("bash", "-o", "pipefail", "-c", pipe, env=env, cwd=cwd).stdout
    # the installed wheel answers as this source tree does (the same kernels, the same bits)
    here = {**env, "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"}
    assert answer.strip() and answer == run("bash", "-o", "pipefail", "-c", pipe.replace("llmcli ", f"{sys.executable} -m llmcli "), env=here, cwd=ROOT).stdout, answer
    # package data: the serve chat page (llmcli/server/static/chat.html) is in the wheel
    page = run(python, "-c", "from llmcli.server.routes.page import chat_page; print(chat_page())", env=env, cwd=cwd).stdout
    assert "<title>llmcli chat</title>" in page and "/v1/chat/completions" in page
