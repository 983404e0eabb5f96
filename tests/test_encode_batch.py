"""`llmcli encode --batch-size`, --quantize on encode and attend, --progress on encode, attend and chat.

Batched records are padded on the right to the longest and masked; each must get the vector it
gets alone. The numbers differ from one at a time only by float32 summation order (attention
over a longer, masked row), so the bound is 1e-5, as against transformers elsewhere; the measured
maximum is printed (pytest -s).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.errors import InputError, LlmcliError
from llmcli.records import decode_tensor
from tests.conftest import subprocess_env
from tests.tiny import make_tiny

runner = CliRunner()

LENGTHS = (3, 17, 8, 1, 30, 12, 5, 9, 21, 2)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {kind: make_tiny(kind, tmp_path_factory.mktemp(kind)) for kind in ("llama", "bert")}


def id_records(lengths=LENGTHS, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return "".join(json.dumps({"id": i, "ids": torch.randint(5, 300, (n,), generator=g).tolist()}) + "\n" for i, n in enumerate(lengths))


def run_ok(args: list[str], records: str) -> list[dict]:
    result = runner.invoke(app, args, input=records)
    if result.exception is not None and not isinstance(result.exception, (LlmcliError, SystemExit)):
        raise result.exception
    assert result.exit_code == 0, (result.exception, result.output)
    return [json.loads(line) for line in result.stdout.splitlines()]


def tensors(records: list[dict], field: str) -> list[np.ndarray]:
    return [decode_tensor(r[field]) for r in records]


def test_similar_lengths_bounds_the_padding():
    from llmcli.cli.encode import similar_lengths

    assert similar_lengths([5, 20, 5, 21, 5, 6, 22], slack=0.1) == [[0, 2, 4], [5], [1, 3, 6]]
    assert similar_lengths([3, 17, 8], slack=0.0) == [[0], [2], [1]]
    assert similar_lengths([3, 17, 8], slack=10.0) == [[0, 2, 1]]
    assert similar_lengths([]) == []


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("pool", ["mean", "last", "cls"])
@pytest.mark.parametrize("slack", [0.1, 100.0])  # the default, and every batch padded to its longest
def test_encode_batches_equal_one_at_a_time(kind, pool, slack, tiny_dirs, monkeypatch):
    monkeypatch.setattr("llmcli.engine.encode_records.PADDING_SLACK", slack)
    records = id_records()
    args = ["encode", "-m", str(tiny_dirs[kind]), "--pool", pool, "--normalize"]
    alone = run_ok([*args, "--batch-size", "1"], records)
    batched = run_ok([*args, "--batch-size", "4"], records)
    assert [r["id"] for r in batched] == list(range(len(LENGTHS)))  # input order
    assert [{k: v for k, v in r.items() if k != "embedding"} for r in batched] == [json.loads(line) for line in records.splitlines()]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(tensors(alone, "embedding"), tensors(batched, "embedding")))
    print(f"{kind} {pool} slack {slack}: max |batched - alone| = {diff:.3g}")
    assert diff < 1e-5


def test_encode_embeddings_batched_are_bit_identical(tiny_dirs):
    records = id_records()
    alone = run_ok(["encode", "-m", str(tiny_dirs["llama"]), "-b", "1"], records)
    batched = run_ok(["encode", "-m", str(tiny_dirs["llama"]), "-b", "8"], records)  # (with padding inside the batch, cut off)
    assert [r["embeddings"] for r in alone] == [r["embeddings"] for r in batched]  # a table lookup: the same bytes
    assert [decode_tensor(r["embeddings"]).shape[0] for r in batched] == list(LENGTHS)  # no padding rows


def test_encode_bad_line_in_a_batch_writes_the_earlier_records(tiny_dirs):
    records = id_records((4, 6, 5)).splitlines()
    records.insert(2, json.dumps({"id": "bad", "ids": [1, 99999]}))
    result = runner.invoke(app, ["encode", "-m", str(tiny_dirs["bert"]), "--pool", "mean", "-b", "8"], input="\n".join(records) + "\n")
    assert isinstance(result.exception, InputError) and result.exception.line == 3
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [0, 1]
    skipped = run_ok(["encode", "-m", str(tiny_dirs["bert"]), "--pool", "mean", "-b", "8", "--skip-errors"], "\n".join(records) + "\n")
    assert [r["id"] for r in skipped] == [0, 1, 2]


def test_encode_batch_size_must_be_positive(tiny_dirs):
    result = runner.invoke(app, ["encode", "-m", str(tiny_dirs["bert"]), "--pool", "mean", "-b", "0"], input=id_records())
    assert isinstance(result.exception, LlmcliError) and "--batch-size" in result.exception.message


def test_encode_writes_each_batch_before_the_input_ends(tiny_dirs):
    """A real pipe: the first record comes back while stdin is still open (no waiting for EOF)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmcli", "encode", "-m", str(tiny_dirs["bert"]), "--pool", "mean", "-b", "16"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        first, second = id_records((5, 7)).splitlines()
        proc.stdin.write(first + "\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["id"] == 0
        proc.stdin.write(second + "\n")
        proc.stdin.close()
        assert json.loads(proc.stdout.readline())["id"] == 1
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------- --quantize on encode and attend


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.ravel() @ b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_encode_and_attend_quantize_int8(kind, tiny_dirs):
    records = id_records((6, 11))
    model = ["-m", str(tiny_dirs[kind])]
    for command, field in ((["encode", "--pool", "mean"], "embedding"), (["attend"], "hidden")):
        plain = tensors(run_ok([*command, *model], records), field)
        int8 = tensors(run_ok([*command, *model, "--quantize", "int8"], records), field)
        for a, b in zip(plain, int8):
            assert not np.array_equal(a, b)  # the weights really are 8-bit
            assert cosine(a, b) > 0.999


def test_quantize_int8_refuses_bfloat16(tiny_dirs):
    result = runner.invoke(app, ["encode", "-m", str(tiny_dirs["bert"]), "--quantize", "int8", "--dtype", "bfloat16"], input=id_records())
    assert isinstance(result.exception, LlmcliError) and "--quantize int8 runs on the CPU in float32" in result.exception.message


# ---------------------------------------------------------------- progress on stderr


@pytest.mark.parametrize("command", [["encode", "--pool", "mean"], ["attend"]])
def test_progress_goes_to_stderr(command, tiny_dirs):
    records = id_records((4, 6, 5))
    result = runner.invoke(app, [*command, "-m", str(tiny_dirs["bert"]), "--progress"], input=records)
    assert result.exit_code == 0, result.output
    assert "3 records, 15 tokens" in result.stderr
    assert len(result.stdout.splitlines()) == 3 and all(line.startswith("{") for line in result.stdout.splitlines())
    quiet = runner.invoke(app, [*command, "-m", str(tiny_dirs["bert"]), "--no-progress"], input=records)
    assert quiet.exit_code == 0 and "records" not in quiet.stderr


def test_generate_progress_from_the_shared_helper(tiny_dirs):
    result = runner.invoke(app, ["generate", "-m", str(tiny_dirs["llama"]), "-n", "2", "--ignore-eos", "--progress"], input=id_records((4, 6)))
    assert result.exit_code == 0, result.output
    assert "2 records, 4 tokens" in result.stderr and len(result.stdout.splitlines()) == 2


def test_chat_progress_over_a_file(tiny_dirs, tmp_path):
    conversations = tmp_path / "chats.jsonl"
    conversations.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"}]}) + "\n" for i in range(2)))
    result = runner.invoke(app, ["chat", str(conversations), "-m", str(tiny_dirs["llama"]), "-n", "3", "--ignore-eos", "--progress"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2
    assert "2 records, 6 tokens" in result.stderr


# ---------------------------------------------------------------- the real MiniLM


@pytest.mark.real
@pytest.mark.parametrize("slack", [0.1, 100.0])
def test_minilm_encode_batches_equal_one_at_a_time(minilm_dir, slack, monkeypatch):
    monkeypatch.setattr("llmcli.engine.encode_records.PADDING_SLACK", slack)
    texts = [
        "The cat sat on the mat.",
        "A man is playing a guitar on the stage while the crowd sings along.",
        "Paris",
        "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
        "What is the capital of France?",
        "Rough winds do shake the darling buds of May.",
        "The dog sat on the mat.",
    ] * 2
    tokenized = runner.invoke(app, ["tokenize", "-m", str(minilm_dir)], input="".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert tokenized.exit_code == 0, tokenized.output
    outputs = {}
    for batch in ("1", "32"):
        records = run_ok(["encode", "-m", str(minilm_dir), "--pool", "mean", "--normalize", "-b", batch], tokenized.stdout)
        outputs[batch] = np.stack(tensors(records, "embedding"))
    diff = float(np.abs(outputs["1"] - outputs["32"]).max())
    print(f"MiniLM slack {slack}: max |batched - alone| = {diff:.3g}")
    assert outputs["1"].shape == (len(texts), 384)
    assert diff < 1e-5
