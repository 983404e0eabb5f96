"""Hostile model files: hypothesis mutations of a valid tiny GGUF and safetensors model (tests/model_fuzz.py)
through the real loaders (gguf_meta's header reader, map_gguf, the GGUF tokenizer, read_safetensors,
load_model and a forward pass), and the corpus of files that once broke them (tests/corpus/).

Every case must end in success or one one-line ModelError: no other exception, crash or hang, and
no peak RSS growth beyond the file's size plus a fixed allowance (model_fuzz.problem). A longer
campaign: `python benchmarks/fuzz_models.py --examples 2000 --save`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.model_fuzz import CORPUS, Worker, gguf_case, make_seed_dir, make_seed_gguf, place_case, problem, safetensors_case

# derandomized: CI sees the same examples every run; the campaign script explores further
FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    seed_dir = make_seed_dir(work / "seed")
    gguf = make_seed_gguf(seed_dir, work / "seed.gguf")
    worker = Worker()
    yield work, seed_dir, {"gguf": gguf.read_bytes(), "safetensors": (seed_dir / "model.safetensors").read_bytes()}, worker
    worker.close()


def check(worker: Worker, kind: str, raw: bytes, work: Path, seed_dir: Path, what) -> None:
    result = worker.run(kind, place_case(kind, raw, work, seed_dir))
    found = problem(result, len(raw))
    assert found is None, f"{kind} case {what}: {found}"


def test_the_seeds_load(fuzz):
    work, seed_dir, seeds, worker = fuzz
    for kind, raw in seeds.items():
        assert worker.run(kind, place_case(kind, raw, work, seed_dir, "seed-copy"))["outcome"] == "ok"


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*/*")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus(fuzz, path):
    work, seed_dir, _, worker = fuzz
    result = worker.run(path.parent.name, place_case(path.parent.name, path.read_bytes(), work, seed_dir))
    assert result["outcome"] == "model_error" and problem(result, path.stat().st_size) is None, result


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_mutated_model_files(fuzz, kind):
    work, seed_dir, seeds, worker = fuzz
    strategy = {"gguf": gguf_case, "safetensors": safetensors_case}[kind]

    @FUZZ
    @given(strategy(seeds[kind]))
    def case(mutation):
        raw, what = mutation
        check(worker, kind, raw, work, seed_dir, what)

    case()
