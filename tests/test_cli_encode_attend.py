"""`llmcli encode` and `llmcli attend` against transformers on tiny random checkpoints.

The reference for every number is transformers' own model (eager attention) loaded from the
same directory; the tests only check that the CLI's records carry the same values.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.errors import ContextLengthError, InputError, LlmcliError, UsageError
from llmcli.records import decode_tensor
from tests.tiny import load_reference, make_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")

runner = CliRunner()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny("bert", tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def llama_ref(llama_dir):
    return load_reference(llama_dir)


@pytest.fixture(scope="module")
def bert_ref(bert_dir):
    return load_reference(bert_dir)


def random_ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 300, (n,), generator=g).tolist()


def jsonl(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def invoke(args: list[str], records: str):
    """Run a command in-process; LlmcliErrors surface as result.exception (the exit codes are tested in test_pipes)."""
    result = runner.invoke(app, args, input=records)
    if result.exception is not None and not isinstance(result.exception, (LlmcliError, SystemExit)):
        raise result.exception
    return result


def run_ok(args: list[str], records: str) -> list[dict]:
    result = invoke(args, records)
    assert result.exit_code == 0, (result.exception, result.output)
    return [json.loads(line) for line in result.stdout.splitlines()]


def error_of(args: list[str], records: str) -> LlmcliError:
    result = invoke(args, records)
    assert isinstance(result.exception, LlmcliError), (result.exit_code, result.output)
    return result.exception


# ---------------------------------------------------------------- attend vs transformers


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_attend_hidden_and_attention_equal_transformers(kind, llama_dir, bert_dir, llama_ref, bert_ref):
    path, ref = (llama_dir, llama_ref) if kind == "llama" else (bert_dir, bert_ref)
    ids = random_ids(23, seed=1)
    with torch.inference_mode():
        expected = ref(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    (rec,) = run_ok(["attend", "-m", str(path), "--attention"], jsonl({"id": 7, "ids": ids}))
    assert rec["id"] == 7 and rec["ids"] == ids  # records are additive
    attention = decode_tensor(rec["attention"])
    assert attention.shape == (2, 4, 23, 23)
    want = torch.stack([a[0] for a in expected.attentions]).numpy()
    np.testing.assert_allclose(attention, want, atol=2e-5, rtol=0)
    hidden = decode_tensor(rec["hidden"])
    assert hidden.shape == (23, 64)
    np.testing.assert_allclose(hidden, expected.last_hidden_state[0].numpy() if kind == "bert" else expected.hidden_states[-1][0].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("layer", [0, 1])
def test_attend_layer_equals_transformers_hidden_states(kind, layer, llama_dir, bert_dir, llama_ref, bert_ref):
    path, ref = (llama_dir, llama_ref) if kind == "llama" else (bert_dir, bert_ref)
    ids = random_ids(11, seed=2)
    with torch.inference_mode():
        expected = ref(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0].numpy()
    (rec,) = run_ok(["attend", "-m", str(path), "--layer", str(layer)], jsonl({"ids": ids}))
    np.testing.assert_allclose(decode_tensor(rec["hidden"]), expected, atol=1e-4, rtol=0)


def test_attend_selects_layers_and_heads(llama_dir, llama_ref):
    ids = random_ids(9, seed=3)
    with torch.inference_mode():
        expected = llama_ref(torch.tensor([ids]), output_attentions=True).attentions
    (rec,) = run_ok(["attend", "-m", str(llama_dir), "--attention", "--layers", "1", "--heads", "3,0", "--floats"], jsonl({"ids": ids}))
    attention = np.asarray(rec["attention"], dtype=np.float32)  # --floats: nested lists
    want = expected[1][0][[3, 0]].numpy()[None]
    assert attention.shape == (1, 2, 9, 9)
    np.testing.assert_allclose(attention, want, atol=2e-5, rtol=0)


def test_attend_from_encode_embeddings_is_bit_identical(llama_dir):
    records = jsonl({"id": 1, "ids": random_ids(17, seed=4)}, {"id": 2, "ids": random_ids(5, seed=5)})
    from_ids = run_ok(["attend", "-m", str(llama_dir), "--attention"], records)
    encoded = run_ok(["encode", "-m", str(llama_dir)], records)
    from_embeddings = run_ok(["attend", "-m", str(llama_dir), "--attention"], jsonl(*encoded))
    for a, b in zip(from_ids, from_embeddings):
        assert a["hidden"] == b["hidden"]  # the same base64 bytes: bit for bit
        assert a["attention"] == b["attention"]


# ---------------------------------------------------------------- encode vs transformers


def test_encode_embeddings_equal_input_embeddings(llama_dir, llama_ref):
    ids = random_ids(12, seed=6)
    (rec,) = run_ok(["encode", "-m", str(llama_dir)], jsonl({"ids": ids}))
    with torch.inference_mode():
        expected = llama_ref.get_input_embeddings()(torch.tensor(ids)).numpy()
    embeddings = decode_tensor(rec["embeddings"])
    assert embeddings.dtype == np.float32
    np.testing.assert_array_equal(embeddings, expected)


def test_encode_pool_mean_normalize_equals_pooled_bert(bert_dir, bert_ref):
    sentences = [random_ids(n, seed=n) for n in (3, 14, 8)]
    records = run_ok(["encode", "-m", str(bert_dir), "--pool", "mean", "--normalize"], jsonl(*({"ids": s} for s in sentences)))
    for ids, rec in zip(sentences, records):
        with torch.inference_mode():
            hidden = bert_ref(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).last_hidden_state
        expected = F.normalize(hidden.mean(dim=1), dim=-1)[0].numpy()
        got = decode_tensor(rec["embedding"])
        assert got.shape == (64,) and "embeddings" not in rec
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5


def test_encode_pool_cls_equals_first_position(bert_dir, bert_ref):
    ids = random_ids(10, seed=8)
    (rec,) = run_ok(["encode", "-m", str(bert_dir), "--pool", "cls"], jsonl({"ids": ids}))
    with torch.inference_mode():
        expected = bert_ref(torch.tensor([ids])).last_hidden_state[0, 0].numpy()
    np.testing.assert_allclose(decode_tensor(rec["embedding"]), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- pictures


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_png_is_valid_and_grows_with_token_count(llama_dir, tmp_path):
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    run_ok(["attend", "-m", str(llama_dir), "--png", str(small)], jsonl({"ids": random_ids(3)}))
    run_ok(["attend", "-m", str(llama_dir), "--png", str(large)], jsonl({"ids": random_ids(40)}))
    (w1, h1), (w2, h2) = png_size(small), png_size(large)
    assert w2 > w1 and h2 > h1


def test_png_per_record_names(llama_dir, tmp_path):
    target = tmp_path / "attn.png"
    run_ok(["attend", "-m", str(llama_dir), "--png", str(target)], jsonl({"id": "a", "ids": random_ids(4)}, {"id": 2, "ids": random_ids(6)}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attn-2.png", "attn-a.png"]
    for p in tmp_path.iterdir():
        png_size(p)


def test_png_single_record_keeps_the_name(llama_dir, tmp_path):
    target = tmp_path / "attn.png"
    run_ok(["attend", "-m", str(llama_dir), "--png", str(target), "--per-head", "--layers", "0", "--heads", "0,1"], jsonl({"id": 9, "ids": random_ids(4)}))
    assert [p.name for p in tmp_path.iterdir()] == ["attn.png"]
    png_size(target)


@pytest.mark.parametrize("count", [1, 200])
def test_heatmap_renders_on_stderr_and_keeps_stdout_clean(llama_dir, count):
    from tokenizers import Tokenizer

    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
    ids = Tokenizer.from_file(str(llama_dir / "tokenizer.json")).encode(text).ids[:count]
    assert len(ids) == count
    result = invoke(["attend", "-m", str(llama_dir), "--heatmap"], jsonl({"id": 1, "ids": ids}))
    assert result.exit_code == 0, result.output
    (rec,) = [json.loads(line) for line in result.stdout.splitlines()]  # only the record, nothing drawn
    assert "attention" not in rec and decode_tensor(rec["hidden"]).shape == (count, 64)  # --heatmap alone adds no field
    lines = result.stderr.splitlines()
    assert lines[0] == "record 1: mean over layers 0,1 heads 0,1,2,3"
    assert lines[-1].split()[:2] == [str(count), "tokens," if count > 1 else "token"]
    rows = [line for line in lines[:-2] if "\u2588" in line or "\u2591" in line or "\u2592" in line or "\u2593" in line]  # minus the legend
    if count == 1:
        assert len(rows) == 1 and rows[0].split()[0] == "The"  # the one query, labelled, attends to itself fully
        assert rows[0].rstrip().endswith("\u2588\u2588")
    else:
        assert "per cell" in lines[-1]  # binned to fit the 80-column console
        binned = [line.split() for line in lines if re.match(r"^\s*\d+-\d+ ", line)]
        assert binned[0][0].startswith("0-") and binned[0][1] == "The"
        assert binned[-1][0].endswith("-199")  # every query is in some row
        assert max(len(line) for line in lines) <= 80


def test_heatmap_per_head(llama_dir):
    result = invoke(["attend", "-m", str(llama_dir), "--heatmap", "--per-head", "--layers", "1", "--heads", "0,2"], jsonl({"ids": random_ids(5)}))
    assert result.exit_code == 0
    titles = [line for line in result.stderr.splitlines() if line.startswith("record ")]
    assert titles == ["record 1: layer 1 head 0", "record 1: layer 1 head 2"]


def test_binned_heatmap_rows_still_sum_to_one():
    from llmcli.cli.render import bin_attention

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(50, 50, generator=g), dim=-1).numpy()
    binned, names = bin_attention(probs, [str(i) for i in range(50)], 8)
    assert binned.shape == (8, 8) and len(names) == 8
    np.testing.assert_allclose(binned.sum(axis=1), 1.0, atol=1e-6)
    # the first cell is the mean over queries 0..6 of their mass on keys 0..6
    np.testing.assert_allclose(binned[0, 0], probs[:7, :7].sum(axis=1).mean(), atol=1e-7)


# ---------------------------------------------------------------- errors


def test_missing_ids_names_tokenize(llama_dir):
    for command in ("attend", "encode"):
        exc = error_of([command, "-m", str(llama_dir)], jsonl({"text": "hello"}))
        assert isinstance(exc, InputError)
        assert "no `ids`" in str(exc) and "pipe through `llmcli tokenize` first" in str(exc)


def test_ids_outside_vocabulary(llama_dir):
    vocab = json.loads(open(os.path.join(llama_dir, "config.json")).read())["vocab_size"]
    for command in ("attend", "encode"):
        exc = error_of([command, "-m", str(llama_dir)], jsonl({"ids": [1, 2, vocab]}))
        assert f"token id {vocab} is outside the vocabulary (0..{vocab - 1})" in str(exc)


def test_too_long_input_and_truncate(llama_dir, llama_ref):
    ids = random_ids(300, seed=10)  # the tiny models hold 256 positions
    for command in ("attend", "encode"):
        exc = error_of([command, "-m", str(llama_dir)], jsonl({"ids": ids}))
        assert isinstance(exc, ContextLengthError)
        assert "300 tokens" in str(exc) and "--truncate" in str(exc)
    (rec,) = run_ok(["attend", "-m", str(llama_dir), "--truncate"], jsonl({"ids": ids}))
    with torch.inference_mode():
        expected = llama_ref(torch.tensor([ids[:256]]), output_hidden_states=True).hidden_states[-1][0].numpy()
    np.testing.assert_allclose(decode_tensor(rec["hidden"]), expected, atol=1e-4, rtol=0)
    (rec,) = run_ok(["encode", "-m", str(llama_dir), "--truncate"], jsonl({"ids": ids}))
    assert decode_tensor(rec["embeddings"]).shape == (256, 64)


def test_embeddings_of_the_wrong_width(llama_dir, bert_dir):
    (encoded,) = run_ok(["encode", "-m", str(llama_dir)], jsonl({"ids": random_ids(4)}))
    encoded["embeddings"] = [[0.0] * 32] * 4
    exc = error_of(["attend", "-m", str(llama_dir)], jsonl(encoded))
    assert "width 32" in str(exc) and "hidden size 64" in str(exc)
    encoded["embeddings"] = [0.0] * 64  # a pooled vector is not a [tokens, d] matrix
    exc = error_of(["attend", "-m", str(llama_dir)], jsonl(encoded))
    assert "[tokens, 64]" in str(exc)


def test_usage_errors(llama_dir):
    assert isinstance(error_of(["attend", "-m", str(llama_dir), "--layer", "3"], jsonl({"ids": [5]})), UsageError)
    assert "--layers 2" in str(error_of(["attend", "-m", str(llama_dir), "--attention", "--layers", "2"], jsonl({"ids": [5]})))
    assert "add --attention" in str(error_of(["attend", "-m", str(llama_dir), "--heads", "0"], jsonl({"ids": [5]})))
    assert "--normalize needs --pool" in str(error_of(["encode", "-m", str(llama_dir), "--normalize"], jsonl({"ids": [5]})))
    assert "unknown --pool" in str(error_of(["encode", "-m", str(llama_dir), "--pool", "max"], jsonl({"ids": [5]})))


def test_save_cache_refuses_encoders(bert_dir, tmp_path):
    exc = error_of(["attend", "-m", str(bert_dir), "--save-cache", str(tmp_path / "c.safetensors")], jsonl({"ids": [5, 6]}))
    assert "needs a decoder model" in str(exc)


def test_save_cache_holds_the_prompt_keys_and_values(llama_dir, llama_ref, tmp_path):
    from safetensors import safe_open

    ids = random_ids(8, seed=11)
    target = tmp_path / "c.safetensors"
    run_ok(["attend", "-m", str(llama_dir), "--save-cache", str(target)], jsonl({"ids": ids}))
    with torch.inference_mode():
        past = llama_ref(torch.tensor([ids]), use_cache=True).past_key_values
    with safe_open(str(target), framework="pt") as f:
        k, v, meta = f.get_tensor("k"), f.get_tensor("v"), f.metadata()
    assert json.loads(meta["ids"]) == ids
    assert k.shape == (2, 2, 8, 16)
    for layer in range(2):
        ref_k, ref_v = past.layers[layer].keys[0], past.layers[layer].values[0]  # (Hkv, T, D) after rope
        torch.testing.assert_close(k[layer], ref_k, atol=1e-5, rtol=0)
        torch.testing.assert_close(v[layer], ref_v, atol=1e-5, rtol=0)


def test_stage_modules_do_not_import_torch_at_import_time():
    code = "import sys, llmcli.cli.encode, llmcli.cli.attend, llmcli.cli.render; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
