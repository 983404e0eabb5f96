"""`llmcli generate` flags: --logprobs capped as the server caps it, --stop-id checked against the
vocabulary, --samples (with the old --n as a hidden alias); --progress/--no-progress (generate,
perplexity, bench) defaulting to "when stderr is a terminal"."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llmcli.cli import app, main
from llmcli.core.sampling import MAX_LOGPROBS
from tests.tiny import make_tiny

PROMPT = json.dumps({"id": "p", "ids": [5, 6, 7]}) + "\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny("llama", tmp_path_factory.mktemp("generate-flags")))


def fails(capsys, monkeypatch, args: list[str]) -> tuple[int, str]:
    """Run through main() (the real exit codes and stderr), stdin a prompt record."""
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(PROMPT.encode())))
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code, capsys.readouterr().err


def generate(*args: str) -> list[dict]:
    result = CliRunner().invoke(app, ["generate", *args], input=PROMPT, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("value", ["100000", str(MAX_LOGPROBS + 1), "-1"])
def test_logprobs_above_the_cap_is_a_usage_error(tiny, capsys, monkeypatch, value):
    code, err = fails(capsys, monkeypatch, ["generate", "-m", tiny, "-n", "1", "--logprobs", value])
    assert code == 2
    assert err.startswith("error: logprobs must be a whole number from 0 to 20") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_logprobs_at_the_cap_works_and_the_server_shares_the_cap(tiny):
    from pydantic import ValidationError

    from llmcli.server.schemas import ChatCompletionRequest, CompletionRequest

    (record,) = generate("-m", tiny, "-n", "1", "--logprobs", str(MAX_LOGPROBS))
    assert len(record["logprobs"][0]["top_logprobs"]) == MAX_LOGPROBS
    CompletionRequest(prompt="x", logprobs=MAX_LOGPROBS)
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", logprobs=MAX_LOGPROBS + 1)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=MAX_LOGPROBS + 1)


@pytest.mark.parametrize("value", ["99999", "-1"])
def test_stop_id_outside_the_vocabulary_is_a_usage_error(tiny, capsys, monkeypatch, value):
    code, err = fails(capsys, monkeypatch, ["generate", "-m", tiny, "-n", "1", "--stop-id", "3", "--stop-id", value])
    assert code == 2
    assert f"error: --stop-id token id {value} is outside the vocabulary (0.." in err and len(err.strip().splitlines()) == 1, err


def test_samples_and_the_hidden_n_alias(tiny, capsys, monkeypatch):
    two = generate("-m", tiny, "-n", "3", "--samples", "2", "--temperature", "1", "--seed", "1")
    assert [r["sample"] for r in two] == [0, 1] and all(r["id"] == "p" for r in two)
    assert generate("-m", tiny, "-n", "3", "--n", "2", "--temperature", "1", "--seed", "1") == two
    code, err = fails(capsys, monkeypatch, ["generate", "-m", tiny, "--samples", "2", "--n", "3"])
    assert code == 2 and "--samples" in err

    shown = CliRunner().invoke(app, ["generate", "--help"]).stdout
    assert "--samples" in shown and "--n " not in shown


@pytest.mark.parametrize("command", ["generate", "perplexity", "bench"])
def test_progress_help_names_its_real_default(command):
    shown = CliRunner().invoke(app, [command, "--help"]).stdout
    start = shown.index("--progress / --no-progress")
    progress = " ".join(shown[start : shown.index("\n  --", start)].split())  # its help text, wrapped lines joined
    assert "(default: when stderr is a terminal)" in progress and "[default:" not in progress


def test_no_progress_wins_on_a_terminal(monkeypatch):
    from llmcli.cli.options import wants_progress

    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert wants_progress(None) is True and wants_progress(False) is False
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert wants_progress(None) is False and wants_progress(True) is True
