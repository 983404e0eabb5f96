"""The CLI entry point: no patched Typer internals (a version-checked speed-up instead), one
skip-or-raise policy for bad lines, `python -m llmcli`, --version and shell completion."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import typer.core

from llmcli.cli.stage import BadLines
from llmcli.cli.typer_speedup import supported
from llmcli.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_typer_classes_are_not_patched():
    """The start-up speed-up gives llmcli's own parameters a coercer; Typer's classes stay Typer's."""
    from typer.testing import CliRunner

    from llmcli.cli import app

    assert CliRunner().invoke(app, ["--version"]).exit_code == 0
    get_runtime_param = typer.core._TyperParameter.get_runtime_param
    assert get_runtime_param.__module__ == "typer.core"
    assert not hasattr(get_runtime_param, "_llmcli_plain")


@pytest.mark.parametrize(
    "version, expected",
    [("0.29.2", True), ("0.29.0", True), ("0.28.1", False), ("0.19.2", False), ("0.30.0", False), ("1.0.0", False), ("0.30.0.dev1", False), ("", False), ("main", False)],
)
def test_speed_up_only_with_a_typer_it_was_checked_against(version, expected):
    assert supported(version) is expected


def test_skip_or_raise_is_written_once():
    """Only cli/stage.py's BadLines decides what a bad line does; no command (and not records.py) skips lines itself."""
    sources = {path: path.read_text(encoding="utf-8") for path in sorted((ROOT / "llmcli").rglob("*.py"))}
    assert [path.relative_to(ROOT).as_posix() for path, text in sources.items() if "bad line(s)" in text] == ["llmcli/cli/stage.py"]
    assert not [path.name for path, text in sources.items() if "ErrorCounter" in text]


def test_bad_lines_raise_with_the_source_and_line():
    bad = BadLines("in.jsonl", skip_errors=False)
    with pytest.raises(InputError) as exc:
        bad.fail(InputError("no `ids` in the record", "pipe through `llmcli tokenize` first"), 3)
    assert (exc.value.source, exc.value.line) == ("in.jsonl", 3)


def test_bad_lines_skipped_are_counted_and_reported(capsys):
    bad = BadLines("in.jsonl", skip_errors=True)
    lines = b'{"a": 1}\nnot json\n{"b": 2}\n{"c": 3}\n'

    def transform(line):
        if "b" in line.record:
            raise InputError("no b allowed", None)
        return line.number

    assert [result for _, result in bad.results(io.BytesIO(lines), transform)] == [1, 4]
    bad.report()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3, err
    assert err[0].startswith("skipped: line 2: malformed JSON") and "(in in.jsonl)" in err[0], err
    assert err[1] == "skipped: line 3: no b allowed (in in.jsonl)", err
    assert err[2] == "skipped 2 bad line(s) of in.jsonl"


def test_typer_has_no_upper_bound():
    """The speed-up that once needed `typer<0.30` now checks the version itself (typer_speedup.TESTED_TYPER)."""
    (requirement,) = re.findall(r'^\s*"(typer\b[^"]*)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    assert requirement.startswith("typer>=") and "<" not in requirement, requirement


def test_python_dash_m_llmcli(run_llmcli, smollm2_gguf):
    version = run_llmcli("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("llmcli ") and len(version.stdout.splitlines()) == 1
    proc = run_llmcli("tokenize", "-m", smollm2_gguf, input="hello\n")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == "hello"


def test_shell_completion(run_llmcli):
    """What README's shell-completion section promises: the script, and completions of commands and options."""
    script = run_llmcli(env={"_LLMCLI_COMPLETE": "source_bash"})
    assert script.returncode == 0, script.stderr
    assert "complete -o default -F _llmcli_completion llmcli" in script.stdout or "_llmcli_completion" in script.stdout
    commands = run_llmcli(env={"_LLMCLI_COMPLETE": "complete_bash", "COMP_WORDS": "llmcli to", "COMP_CWORD": "1"})
    assert commands.returncode == 0, commands.stderr
    assert commands.stdout.split() == ["tokenize"]
    options = run_llmcli(env={"_LLMCLI_COMPLETE": "complete_bash", "COMP_WORDS": "llmcli tokenize --ch", "COMP_CWORD": "2"})
    assert options.stdout.split() == ["--chat"]
    help_text = run_llmcli("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text


def test_plain_fallback_without_the_speed_up(tmp_path, monkeypatch):
    """With a Typer the speed-up was not checked against (_build None), the CLI runs Typer's own
    coercion and answers the same, flags of every kind included."""
    from typer.testing import CliRunner

    from llmcli.cli import app, typer_speedup
    from tests.tiny import make_bpe_tokenizer

    model = tmp_path / "tiny"
    model.mkdir()
    make_bpe_tokenizer(model)  # tokenize reads the tokenizer, never the weights
    (model / "config.json").write_text('{"model_type": "llama"}')
    args = ["tokenize", "-m", str(model), "--lines", "--no-add-special", "--json"]
    fast = CliRunner().invoke(app, args, input="hello world\nagain\n")
    monkeypatch.setattr(typer_speedup, "_build", None)
    plain = CliRunner().invoke(app, args, input="hello world\nagain\n")
    assert fast.exit_code == plain.exit_code == 0 and plain.output == fast.output and plain.output.count("\n") == 2
