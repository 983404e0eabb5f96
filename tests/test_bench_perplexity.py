"""`llmcli perplexity` and `llmcli bench`.

Perplexity is checked against transformers running the sliding-window loop of HF's
"perplexity of fixed-length models" guide in the test itself (labels with -100 for the tokens a
window must not score, the model's own shifted loss), on a tiny random llama and on the real
SmolLM2 GGUF. Bench is checked for its output shape and its usage errors, never for speed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from llmcli.cli import main
from llmcli.core.loader import load_model
from llmcli.core.perplexity import perplexity, plan_windows
from llmcli.errors import UsageError
from tests.tiny import load_reference, make_tiny

# ---------------------------------------------------------------- references and data


def hf_sliding_window(model, ids: list[int], ctx: int, stride: int) -> tuple[float, int, int]:
    """(nll_sum, tokens scored, windows) by the loop of https://huggingface.co/docs/transformers/perplexity.

    The guide's loop weights each window's mean loss by `valid labels - 1`; here the weight is the
    number of labels the shifted loss really averaged, which is what an exact mean needs (for the
    first window both agree; later windows lose no token to the shift).
    """
    input_ids = torch.tensor([ids])
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, windows, prev_end_loc = 0.0, 0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + ctx, seq_len)
        trg_len = end_loc - prev_end_loc
        window = input_ids[:, begin_loc:end_loc]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=target_ids).loss
        counted = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * counted
        n_tokens += counted
        windows += 1
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens, windows


def hf_scored_positions(n_tokens: int, ctx: int, stride: int) -> list[int]:
    """Absolute indices of the targets the HF loop scores (labels != -100 after the shift)."""
    out: list[int] = []
    prev_end_loc = 0
    for begin_loc in range(0, n_tokens, stride):
        end_loc = min(begin_loc + ctx, n_tokens)
        trg_len = end_loc - prev_end_loc
        labels = list(range(begin_loc, end_loc))
        keep = labels[len(labels) - trg_len :] if trg_len < len(labels) else labels
        out.extend(t for t in keep if t != begin_loc)  # the first label of a window has no logits before it
        prev_end_loc = end_loc
        if end_loc == n_tokens:
            break
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny("llama", tmp_path_factory.mktemp("ppl-llama"))


def _rel(a: float, b: float) -> float:
    return abs(a / b - 1.0)


# ---------------------------------------------------------------- windows


@pytest.mark.parametrize("n, ctx, stride", [(1000, 256, 128), (1000, 256, 256), (257, 256, 100), (10, 256, 128), (600, 64, 1), (513, 64, 48)])
def test_windows_score_the_same_tokens_as_the_hf_loop(n, ctx, stride):
    windows = plan_windows(n, ctx, stride)
    ours = [t for w in windows for t in range(w.score_from, w.end)]
    assert ours == hf_scored_positions(n, ctx, stride)
    assert all(w.length <= ctx and w.begin < w.score_from for w in windows)


@pytest.mark.parametrize("ctx, stride", [(64, 0), (64, 65), (1, 1)])
def test_windows_refuse_bad_strides(ctx, stride):
    with pytest.raises(UsageError):
        plan_windows(100, ctx, stride)


# ---------------------------------------------------------------- tiny llama vs transformers


@pytest.mark.parametrize("ctx, stride, batch", [(64, 32, 3), (64, 64, 4), (100, 37, 1)])
def test_tiny_llama_matches_transformers_sliding_window(tiny_llama, hamlet, ctx, stride, batch):
    loaded = load_model(tiny_llama)
    ids = loaded.tokenizer.encode(hamlet[:1500]).ids
    assert len(ids) > 3 * ctx  # several windows, the last one shorter (padded in the batch)
    reference = load_reference(tiny_llama)
    ref_nll, ref_tokens, ref_windows = hf_sliding_window(reference, ids, ctx, stride)
    result = perplexity(loaded, ids, ctx=ctx, stride=stride, batch_size=batch, n_bytes=1500)
    assert result.tokens_scored == ref_tokens
    assert result.windows == ref_windows
    assert _rel(result.ppl, math.exp(ref_nll / ref_tokens)) < 1e-3
    assert _rel(result.nll_sum, ref_nll) < 1e-4
    assert result.bits_per_byte == pytest.approx(ref_nll / math.log(2) / 1500, rel=1e-4)


def test_batched_windows_equal_one_at_a_time(tiny_llama, hamlet):
    loaded = load_model(tiny_llama)
    ids = loaded.tokenizer.encode(hamlet[:1200]).ids
    calls = []
    one = perplexity(loaded, ids, ctx=80, stride=30, batch_size=1)
    many = perplexity(loaded, ids, ctx=80, stride=30, batch_size=5, on_progress=lambda done, total: calls.append((done, total)))
    assert many.tokens_scored == one.tokens_scored
    assert many.nll_sum == pytest.approx(one.nll_sum, rel=1e-5)
    total = one.windows
    assert calls[-1] == (total, total) and [d for d, _ in calls] == sorted(d for d, _ in calls)


# ---------------------------------------------------------------- the CLI


def _run(capsys, args: list[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_perplexity_cli_json_matches_transformers(tiny_llama, hamlet, tmp_path, capsys):
    text = hamlet[:1000]
    path = tmp_path / "excerpt.txt"
    path.write_text(text, encoding="utf-8")
    code, out, err = _run(capsys, ["perplexity", str(path), "--model", str(tiny_llama), "--ctx", "64", "--stride", "32", "--format", "json"])
    assert code == 0, err
    got = json.loads(out)
    loaded = load_model(tiny_llama)
    ids = loaded.tokenizer.encode(text).ids
    ref_nll, ref_tokens, _ = hf_sliding_window(load_reference(tiny_llama), ids, 64, 32)
    assert got["tokens"] == len(ids) and got["tokens_scored"] == ref_tokens
    assert _rel(got["perplexity"], math.exp(ref_nll / ref_tokens)) < 1e-3
    assert got["bits_per_byte"] == pytest.approx(ref_nll / math.log(2) / len(text.encode("utf-8")), rel=1e-4)

    code, out, err = _run(capsys, ["perplexity", str(path), "--model", str(tiny_llama), "--ctx", "64", "--stride", "32"])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("perplexity ") and float(lines[0].split()[1]) == pytest.approx(got["perplexity"], rel=1e-4)
    assert lines[1].startswith("bits per byte ") and lines[2].startswith(f"tokens {len(ids)} ")


def test_perplexity_cli_reads_stdin(tiny_llama, hamlet, capsys, monkeypatch):
    text = hamlet[2000:2600]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8"))))
    code, out, err = _run(capsys, ["perplexity", "-", "--model", str(tiny_llama), "--ctx", "48", "--stride", "16", "-f", "json"])
    assert code == 0, err
    got = json.loads(out)
    ids = load_model(tiny_llama).tokenizer.encode(text).ids
    ref_nll, ref_tokens, ref_windows = hf_sliding_window(load_reference(tiny_llama), ids, 48, 16)
    assert (got["file"], got["bytes"], got["tokens_scored"], got["windows"]) == ("-", len(text.encode("utf-8")), ref_tokens, ref_windows)
    assert _rel(got["perplexity"], math.exp(ref_nll / ref_tokens)) < 1e-3


@pytest.mark.parametrize(
    "extra, code",
    [
        (["--stride", "0"], 2),
        (["--ctx", "64", "--stride", "65"], 2),
        (["--ctx", "512"], 2),  # longer than the tiny model's 256 positions
        (["--format", "yaml"], 2),
        (["--batch-size", "0"], 2),
    ],
)
def test_perplexity_cli_usage_errors(tiny_llama, tmp_path, capsys, extra, code):
    path = tmp_path / "t.txt"
    path.write_text("To be, or not to be, that is the question.", encoding="utf-8")
    got, out, err = _run(capsys, ["perplexity", str(path), "--model", str(tiny_llama), *extra])
    assert got == code and out == "" and err.startswith("error: ")


def test_perplexity_cli_refuses_non_utf8_and_tiny_texts(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    code, out, err = _run(capsys, ["perplexity", str(bad), "--model", str(tiny_llama), "--ctx", "64", "--stride", "32"])
    assert code == 1 and "UTF-8" in err and out == ""
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    code, out, err = _run(capsys, ["perplexity", str(empty), "--model", str(tiny_llama), "--ctx", "64", "--stride", "32"])
    assert code == 1 and "at least 2 tokens" in err


# ---------------------------------------------------------------- bench


def test_bench_json_fields(tiny_llama, capsys):
    code, out, err = _run(capsys, ["bench", "--model", str(tiny_llama), "-p", "16,32", "-n", "8", "-b", "1,3", "-r", "2", "--format", "json"])
    assert code == 0, err
    rows = json.loads(out)
    # every combination of batch and test, in order: pp16, pp32, tg8 for b=1 then b=3
    assert [(r["batch"], r["test"]) for r in rows] == [(b, t) for b in (1, 3) for t in ("pp16", "pp32", "tg8")]
    for r in rows:
        assert r["repetitions"] == 2 and len(r["samples_ts"]) == 2 and len(r["samples_ns"]) == 2
        assert r["avg_ts"] > 0 and r["avg_ns"] > 0 and all(t > 0 for t in r["samples_ts"]) and r["stddev_ts"] >= 0
        assert r["avg_ts"] == pytest.approx(sum(r["samples_ts"]) / 2)
        tokens = r["batch"] * (r["n_prompt"] or r["n_gen"])
        assert r["samples_ts"][0] == pytest.approx(tokens / (r["samples_ns"][0] / 1e9), rel=1e-6)
        assert r["peak_rss_bytes"] > 0 and r["size_bytes"] > 0 and r["threads"] >= 1
        assert r["model_type"] == "llama" and r["dtype"] == "float32"
    reference = load_reference(tiny_llama)
    assert rows[0]["n_params"] == sum(p.numel() for p in reference.parameters())  # tied lm_head counted once


def test_bench_formats(tiny_llama, capsys):
    args = ["bench", "--model", str(tiny_llama), "-p", "8", "-n", "4", "-r", "1", "--no-warmup"]
    code, out, err = _run(capsys, [*args, "--format", "jsonl"])
    assert code == 0, err
    assert [json.loads(line)["test"] for line in out.splitlines()] == ["pp8", "tg4"]
    code, out, _ = _run(capsys, [*args, "--format", "csv"])
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["test"] for r in table] == ["pp8", "tg4"] and all(float(r["avg_ts"]) > 0 for r in table)
    code, out, _ = _run(capsys, [*args, "--format", "md"])
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("| model |") and len(lines) == 4 and "pp8" in lines[2] and "tg4" in lines[3]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-p", "64,abc"], "bad -p value 'abc'"),
        (["-n", "-5"], "-n value -5 is below 0"),
        (["-b", "0"], "-b value 0 is below 1"),
        (["-b", "1,,2"], "bad -b value ''"),
        (["-p", ""], "-p is empty"),
        (["-p", "0", "-n", "0"], "nothing to measure"),
        (["-r", "0"], "-r 0 is below 1"),
        (["--format", "xml"], "unknown --format"),
        (["-p", "300"], "needs 300 positions"),  # past the tiny model's 256
    ],
)
def test_bench_bad_lists_exit_2(tiny_llama, capsys, flags, message):
    code, out, err = _run(capsys, ["bench", "--model", str(tiny_llama), "-r", "1", *flags])
    assert code == 2 and out == "" and message in err, err


# ---------------------------------------------------------------- the real SmolLM2


HAMLET_DIALOGUE = slice(4000, 6600)  # past the cast list: 737 SmolLM2 tokens, five windows of 256 by 128


@pytest.mark.real
def test_smollm2_perplexity_matches_transformers(smollm2_gguf, smollm2_reference, hamlet, monkeypatch):
    """The real model's windows and sums against transformers, both computing in float32.

    Without the native kernels a quantized matrix is dequantized and multiplied by torch, as
    transformers does after its own GGUF dequantization, so the two differ only in float32
    rounding. The kernels' path quantizes activations to 8 bits as llama.cpp does, another
    computation: on this text it came 0.23% from transformers, and 0.02% or 0.48% when attention
    still ran on torch's AVX2 or AVX-512 SDPA (the rounding moves with the last bits upstream).
    tests/test_llamacpp_accuracy.py holds that path to llama.cpp."""
    monkeypatch.setenv("LLMCLI_KERNELS", "0")
    text = hamlet[HAMLET_DIALOGUE]
    loaded = load_model(smollm2_gguf)
    ids = loaded.tokenizer.encode(text).ids
    assert 500 <= len(ids) <= 1000, len(ids)
    result = perplexity(loaded, ids, ctx=256, stride=128, batch_size=4, n_bytes=len(text.encode("utf-8")))
    reference, _ = smollm2_reference
    ref_nll, ref_tokens, ref_windows = hf_sliding_window(reference, ids, 256, 128)
    assert (result.tokens_scored, result.windows) == (ref_tokens, ref_windows)
    assert _rel(result.nll_sum, ref_nll) < 1e-4
    assert _rel(result.ppl, math.exp(ref_nll / ref_tokens)) < 1e-4
    assert 1.0 < result.ppl < 200.0  # a trained model on English text, not a broken one (random would be ~49152)


@pytest.mark.real
def test_smollm2_native_perplexity_does_not_depend_on_the_batch(smollm2_loaded, hamlet):
    """On the kernels' path every window's numbers come from that window alone: the same bits
    one window at a time as four at once, the last one padded (attention.c, row-wise blocks)."""
    ids = smollm2_loaded.tokenizer.encode(hamlet[HAMLET_DIALOGUE]).ids
    one = perplexity(smollm2_loaded, ids, ctx=256, stride=128, batch_size=1)
    four = perplexity(smollm2_loaded, ids, ctx=256, stride=128, batch_size=4)
    assert (one.tokens_scored, one.windows) == (four.tokens_scored, four.windows) == (736, 5)
    assert one.nll_sum == four.nll_sum
    assert 1.0 < one.ppl < 200.0
