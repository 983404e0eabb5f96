"""The README cannot drift: its runnable blocks are executed and their output checked, and every
command has --help text with an example and a place in the README."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def runnable_blocks() -> list[tuple[int, list[str], list[str]]]:
    """(line number, commands, expected output) for each ```console block after <!-- runnable -->."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "<!-- runnable -->":
            start = i + 1
            assert lines[start].startswith("```"), f"README line {start + 1}: a runnable marker must precede a code block"
            body = []
            j = start + 1
            while not lines[j].startswith("```"):
                body.append(lines[j])
                j += 1
            commands, expected = [], []
            k = 0
            while k < len(body):
                if body[k].startswith("$ "):
                    cmd = body[k][2:]
                    while cmd.endswith("\\"):
                        k += 1
                        cmd = cmd[:-1] + "\n" + body[k]
                    commands.append(cmd)
                else:
                    expected.append(body[k])
                k += 1
            blocks.append((start + 1, commands, expected))
            i = j
        i += 1
    return blocks


def matches(expected: list[str], actual: list[str]) -> bool:
    """Line-wise match where a line `...` stands for any lines and `...` inside a line for any text."""
    if not expected:
        return not actual
    head = expected[0]
    if head == "...":
        return any(matches(expected[1:], actual[k:]) for k in range(len(actual) + 1))
    if not actual:
        return False
    pattern = "^" + ".*".join(re.escape(part) for part in head.split("...")) + "$"
    return re.match(pattern, actual[0].rstrip()) is not None and matches(expected[1:], actual[1:])


BLOCKS = runnable_blocks()


def test_readme_has_runnable_blocks():
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_runnable_block(block, smollm2_gguf, minilm_dir, tmp_path):
    line, commands, expected = block
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["COLUMNS"] = "120"
    output = []
    for cmd in commands:
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README line {line}: `{cmd}` exited {proc.returncode}: {proc.stderr[-2000:]}"
        output += proc.stdout.rstrip("\n").splitlines() if proc.stdout.strip() else []
    assert matches(expected, output), f"README line {line}: output differs.\nexpected:\n" + "\n".join(expected) + "\n\nactual:\n" + "\n".join(output)


def test_every_command_has_help_with_example_and_is_in_readme():
    import typer
    from typer.testing import CliRunner

    from llmcli.cli import app

    readme = README.read_text(encoding="utf-8")
    group = typer.main.get_command(app)
    names = sorted(group.commands)
    assert {"tokenize", "encode", "attend", "generate", "decode", "chat", "serve", "bench", "perplexity", "pull", "models"} <= set(names)
    runner = CliRunner()
    for name in names:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example:" in result.output, f"`llmcli {name} --help` has no example"
        assert f"llmcli {name}" in readme, f"`llmcli {name}` is missing from the README"
