"""Input and output at the CLI boundary: -o never destroys an input, lone surrogates and empty
prompts are bad input of their line, a UTF-8 BOM is accepted, `generate --stream | decode`,
`--version`, a bad LLMCLI_HOME, and records written before any failure.

Most tests run a tiny random llama (tests/tiny.py): its tokenizer and model load in milliseconds.
Real subprocesses where the behaviour needs one (exit codes, stderr lines, stdin, streaming).
"""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmcli.cli import app  # noqa: E402
from tests.tiny import make_tiny  # noqa: E402


def invoke(*args, input: str | bytes | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=True)


def records(output: str | bytes) -> list[dict]:
    if isinstance(output, bytes):
        output = output.decode()
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def jsonl(*recs: dict) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)


def run(*args, input: str | bytes | None = None, env: dict | None = None, stdin=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m llmcli ARGS` in a real process (this worktree's llmcli, this cache, offline)."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "llmcli", *map(str, args)],
        input=input,
        stdin=stdin,
        capture_output=True,
        text=not isinstance(input, bytes),
        env=full_env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny("llama", tmp_path_factory.mktemp("io-llama"))


# ---------------------------------------------------------------- item 1: -o onto an input


@pytest.fixture
def input_file(tmp_path) -> Path:
    path = tmp_path / "s.jsonl"
    path.write_text(jsonl({"text": "Hello"}, {"text": "world"}))
    return path


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "relative path"])
def test_output_onto_the_input_is_refused_and_the_input_kept(tiny, input_file, how, monkeypatch):
    before = input_file.read_bytes()
    if how == "symlink":
        output = input_file.with_name("link.jsonl")
        output.symlink_to(input_file)
    elif how == "hard link":
        output = input_file.with_name("hard.jsonl")
        os.link(input_file, output)
    elif how == "relative path":
        monkeypatch.chdir(input_file.parent)
        output = Path(".") / "sub" / ".." / input_file.name
        (input_file.parent / "sub").mkdir()
    else:
        output = input_file
    result = invoke("tokenize", "-m", tiny, input_file, "-o", output)
    assert result.exit_code != 0
    assert str(result.exception) == (
        f"--output {output} is the input file {input_file}; writing it would destroy the input; write to another file and rename it afterwards"
    )
    assert input_file.read_bytes() == before


def test_output_onto_the_input_exits_2_with_one_line_and_a_new_output_is_fine(tiny, input_file):
    proc = run("tokenize", "-m", tiny, input_file, "-o", input_file)
    assert proc.returncode == 2
    assert proc.stderr == f"error: --output {input_file} is the input file {input_file}; writing it would destroy the input; write to another file and rename it afterwards\n"
    assert proc.stdout == ""
    assert input_file.read_text() == jsonl({"text": "Hello"}, {"text": "world"})
    fresh = input_file.with_name("out.jsonl")
    ok = run("tokenize", "-m", tiny, input_file, "-o", fresh)
    assert ok.returncode == 0, ok.stderr
    assert [r["text"] for r in records(fresh.read_text())] == ["Hello", "world"]


def test_output_onto_the_file_on_stdin_is_refused(tiny, input_file):
    before = input_file.read_bytes()
    link = input_file.with_name("link.jsonl")
    link.symlink_to(input_file)
    with open(input_file, "rb") as stdin:
        proc = run("tokenize", "-m", tiny, "-o", link, stdin=stdin)
    assert proc.returncode == 2
    assert f"error: --output {link} is the file on stdin; writing it would destroy the input" in proc.stderr
    assert input_file.read_bytes() == before


@pytest.mark.parametrize(
    "command",
    [
        ["tokenize"],
        ["tokenize", "--chat"],
        ["decode"],
        ["decode", "--text-only"],
        ["encode"],
        ["attend"],
        ["generate"],
        ["chat"],
    ],
)
def test_every_command_with_output_refuses_its_input_before_loading_a_model(input_file, command, tmp_path):
    """The model does not exist: the output check must come first (no model is loaded for nothing)."""
    before = input_file.read_bytes()
    result = invoke(*command, "-m", tmp_path / "no-such-model", input_file, "-o", input_file)
    assert result.exit_code != 0
    assert str(result.exception).startswith(f"--output {input_file} is the input file {input_file}; writing it would destroy the input")
    assert input_file.read_bytes() == before


def test_generate_refuses_an_output_onto_its_cache_and_attend_its_png_onto_the_input(input_file, tmp_path):
    cache = tmp_path / "prompt.kv"
    cache.write_bytes(b"kv")
    result = invoke("generate", "-m", tmp_path / "no-such-model", input_file, "--cache", cache, "-o", cache)
    assert str(result.exception).startswith(f"--output {cache} is the input file {cache}")
    assert cache.read_bytes() == b"kv"
    result = invoke("attend", "-m", tmp_path / "no-such-model", input_file, "--png", input_file)
    assert str(result.exception).startswith(f"--png {input_file} is the input file {input_file}")
    result = invoke("attend", "-m", tmp_path / "no-such-model", input_file, "--save-cache", input_file)
    assert str(result.exception).startswith(f"--save-cache {input_file} is the input file {input_file}")


def test_generate_onto_its_own_input_through_a_symlink_is_refused(tiny, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(jsonl({"text": "The quick"}))
    link = tmp_path / "out.jsonl"
    link.symlink_to(prompts)
    proc = run("generate", "-m", tiny, prompts, "-n", "2", "-o", link)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: --output {link} is the input file {prompts};"), proc.stderr
    assert prompts.read_text() == jsonl({"text": "The quick"})


# ---------------------------------------------------------------- item 2: lone surrogates, records before a failure


GOOD = 2000


def lines_with_a_bad_one(bad: str, after: int = 3) -> str:
    good = [json.dumps({"text": f"text {i}"}) for i in range(GOOD + after)]
    return "\n".join(good[:GOOD] + [bad] + good[GOOD:]) + "\n"


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("bad", ['{"text": "x\\ud800y"}', '{"text": "\\udc00"}'])
def test_lone_surrogate_after_2000_lines_stops_at_its_line_with_every_record_before_it(tiny, chat, bad):
    args = ["tokenize", "-m", tiny, *(["--chat"] if chat else [])]
    proc = run(*args, input=lines_with_a_bad_one(bad))
    assert proc.returncode == 1
    escape = "\\ud800" if "ud800" in bad else "\\udc00"
    assert proc.stderr == f"error: line {GOOD + 1}: `text` holds a lone UTF-16 surrogate ({escape}), which is no character; " "write the character itself, or both halves of its surrogate pair (\\ud83d\\ude42 is U+1F642)\n"
    out = records(proc.stdout)
    assert [r["id"] for r in out] == list(range(1, GOOD + 1))
    assert all(r["ids"] for r in out)

    skipped = run(*args, "--skip-errors", input=lines_with_a_bad_one(bad))
    assert skipped.returncode == 0, skipped.stderr
    assert [r["id"] for r in records(skipped.stdout)] == [n for n in range(1, GOOD + 5) if n != GOOD + 1]
    assert skipped.stderr.splitlines()[-1] == "skipped 1 bad line(s) of -"


def test_lone_surrogates_anywhere_in_a_record_and_valid_pairs(tiny):
    lines = "\n".join(
        [
            '{"text": "pair \\ud83d\\ude42"}',
            '{"text": "a literal backslash: \\\\ud800"}',
            '{"messages": [{"role": "user", "content": "hi \\uDFFF"}]}',
            '{"text": "ok", "meta": {"\\ud801": 1}}',
            '{"text": "fine"}',
        ]
    )
    result = invoke("tokenize", "-m", tiny, "--chat", "--skip-errors", input=lines + "\n")
    assert result.exit_code == 0, result.output
    out = records(result.stdout)
    assert [r["id"] for r in out] == [1, 2, 5]
    assert out[0]["text"] == "pair \U0001f642" and out[1]["text"] == "a literal backslash: \\ud800"
    assert "line 3: `messages[0].content` holds a lone UTF-16 surrogate (\\udfff)" in result.stderr
    assert "line 4: `a key in meta` holds a lone UTF-16 surrogate (\\ud801)" in result.stderr


def test_bytes_that_are_not_utf8_in_an_argument_are_one_line_not_a_traceback(tiny):
    # Python hands an argument's non-UTF-8 bytes on as lone surrogates; the tokenizer refuses them
    result = subprocess.run(
        [sys.executable, "-m", "llmcli", "tokenize", "-m", str(tiny), "--chat", "--system", os.fsdecode(b"be \xff")],
        input="hi\n", capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: line 1: the text holds U+DCFF") and "check the terminal's encoding" in result.stderr


def test_the_tokenizer_refuses_lone_surrogates_with_an_input_error(tiny):
    from llmcli.core.tokenizer import load_tokenizer
    from llmcli.errors import InputError

    tokenizer = load_tokenizer(tiny)
    for encode in (lambda: tokenizer.encode("a\ud800"), lambda: tokenizer.encode_batch(["ok", "b\udc00"])):
        with pytest.raises(InputError, match="U\\+D[8C]00 at character 1"):
            encode()
    assert tokenizer.encode_batch(["ok"])[0].ids == tokenizer.encode("ok").ids


def test_generate_lone_surrogate_stops_at_its_line_after_every_record_before_it(tiny):
    """generate writes every record before the bad line (the ones in flight too), or skips it with
    --skip-errors. 40 lines, not 2000: generate reads no batches of lines, and 40 is five times
    the records in flight (--batch-size 8)."""
    good = [json.dumps({"text": f"text {i}"}) for i in range(43)]
    data = "\n".join(good[:40] + ['{"text": "\\ud800"}'] + good[40:]) + "\n"
    args = ["generate", "-m", tiny, "-n", "1", "--batch-size", "8"]
    proc = run(*args, input=data)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: line 41: `text` holds a lone UTF-16 surrogate (\\ud800)") and len(proc.stderr.splitlines()) == 1, proc.stderr
    out = records(proc.stdout)
    assert [r["id"] for r in out] == list(range(1, 41))
    assert all(len(r["generated_ids"]) <= 1 and r["finish_reason"] for r in out)
    skipped = invoke(*args, "--skip-errors", input=data)
    assert skipped.exit_code == 0, skipped.output
    assert [r["id"] for r in records(skipped.stdout)] == [n for n in range(1, 45) if n != 41]


def test_batched_stage_writes_every_record_before_an_unexpected_failure(tmp_path):
    """A transform that raises (a failure no check foresaw) in the middle of a batch: the records
    of every line before the failing one are written, then the exception propagates."""
    from llmcli.cli.stage import run_batched_stage

    source = tmp_path / "in.jsonl"
    source.write_text(jsonl(*({"n": i} for i in range(3000))))
    target = tmp_path / "out.jsonl"

    def transform(items):
        if any(record["n"] == 2500 for record, _ in items):
            raise TypeError("boom")
        return [dict(record, seen=True) for record, _ in items]

    with pytest.raises(TypeError, match="boom"):
        run_batched_stage(str(source), str(target), transform, max_batch=1024)
    assert [r["n"] for r in records(target.read_text())] == list(range(2500))


def test_batched_stage_skips_a_line_whose_transform_raises_an_input_error(tmp_path):
    """A transform that raises the InputError of one line (instead of returning it) fails the whole
    batch; redone one line at a time, --skip-errors skips just that line and the rest is written."""
    from llmcli.cli import run_batched_stage
    from llmcli.errors import InputError

    source = tmp_path / "in.jsonl"
    source.write_text(jsonl(*({"n": i} for i in range(50))))
    target = tmp_path / "out.jsonl"

    def transform(items):
        if any(record["n"] == 7 for record, _ in items):
            raise InputError("seven is bad")
        return [dict(record, seen=True) for record, _ in items]

    assert run_batched_stage(str(source), str(target), transform, skip_errors=True, max_batch=16) == 49
    assert [r["n"] for r in records(target.read_text())] == [i for i in range(50) if i != 7]
    with pytest.raises(InputError, match="seven") as raised:
        run_batched_stage(str(source), str(target), transform, max_batch=16)
    assert raised.value.line == 8
    assert [r["n"] for r in records(target.read_text())] == list(range(7))


# ---------------------------------------------------------------- item 3: empty prompts in generate


@pytest.mark.parametrize("empty", [{"text": ""}, {"ids": []}])
def test_generate_empty_prompt_is_bad_input_of_its_line(tiny, tmp_path, empty):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(jsonl({"text": "The quick"}, empty, {"text": "brown fox"}))
    stopped = invoke("generate", "-m", tiny, "-n", "2", prompts)
    assert stopped.exit_code == 1
    assert str(stopped.exception) == f"line 2: the prompt is empty (no tokens to continue) (in {prompts}); give the record a non-empty `text` or `ids`"
    assert [r["id"] for r in records(stopped.stdout)] == [1]
    skipped = invoke("generate", "-m", tiny, "-n", "2", "--skip-errors", prompts)
    assert skipped.exit_code == 0, skipped.output
    assert [r["id"] for r in records(skipped.stdout)] == [1, 3]
    assert skipped.stderr.splitlines()[-2:] == [
        f"skipped: line 2: the prompt is empty (no tokens to continue) (in {prompts}); give the record a non-empty `text` or `ids`",
        f"skipped 1 bad line(s) of {prompts}",
    ]


# ---------------------------------------------------------------- item 4: a UTF-8 byte order mark


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("data", [b'{"text": "Hello"}\n{"text": "world"}\n', b"Hello\nworld\n"])
def test_bom_at_the_start_is_dropped(tiny, data):
    plain = invoke("tokenize", "-m", tiny, input=data)
    with_bom = invoke("tokenize", "-m", tiny, input=BOM + data)
    assert with_bom.exit_code == 0, with_bom.output
    assert records(with_bom.stdout) == records(plain.stdout)
    assert [r["text"] for r in records(with_bom.stdout)] == ["Hello", "world"]


def test_bom_only_at_the_start_of_the_stream():
    from llmcli.records import LineReader, iter_lines

    assert list(LineReader(io.BytesIO(BOM + b"a\n" + BOM + b"b\n"))) == [(1, b"a"), (2, BOM + b"b")]
    assert [line.record for line in iter_lines(io.BytesIO(BOM + b'{"id": 7}\n'))] == [{"id": 7}]

    class OneByte(io.BytesIO):  # the BOM split over three reads
        def read1(self, n=-1):
            return super().read1(1)

    assert list(LineReader(OneByte(BOM + b"x\ny"))) == [(1, b"x"), (2, b"y")]


def test_perplexity_ignores_a_bom_and_says_it_reads_text(tiny, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 4
    plain = tmp_path / "plain.txt"
    plain.write_text(text)
    bommed = tmp_path / "bom.txt"
    bommed.write_bytes(BOM + text.encode())
    a = invoke("perplexity", plain, "-m", tiny, "--ctx", "16", "--stride", "8", "-f", "json")
    b = invoke("perplexity", bommed, "-m", tiny, "--ctx", "16", "--stride", "8", "-f", "json")
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    ra, rb = json.loads(a.stdout), json.loads(b.stdout)
    assert rb["bytes"] == ra["bytes"] == len(text.encode())
    assert {k: v for k, v in rb.items() if k != "file"} == {k: v for k, v in ra.items() if k != "file"}

    missing = run("perplexity", tmp_path / "missing.txt")
    assert missing.returncode == 2
    assert missing.stderr == f"error: input file {tmp_path / 'missing.txt'} does not exist; give a path to a plain text file (UTF-8), or '-' for stdin\n"


# ---------------------------------------------------------------- item 6: generate --stream | decode


def grouped(stream_records: list[dict]) -> bool:
    """Every record's deltas come together, right before its final record."""
    open_key = None
    for rec in stream_records:
        key = (rec["id"], rec.get("sample"))
        if "generated_ids" in rec:
            if open_key not in (None, key):
                return False
            open_key = None
        else:
            if open_key not in (None, key):
                return False
            open_key = key
    return True


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "prompts.jsonl"
    texts = ["The quick", "What is the capital", "Numbers like", "To be, or", "def add"]
    path.write_text(jsonl(*({"text": t} for t in texts)))
    return path


@pytest.mark.parametrize("n", [1, 2])
def test_generate_stream_writes_each_records_deltas_together_and_decode_follows_it(tiny, prompts_file, n):
    common = ["-m", tiny, "-n", "12", "--ignore-eos", "--batch-size", "8", "--samples", str(n), "--temperature", "1", "--seed", "3"]
    streamed = invoke("generate", *common, "--stream", prompts_file)
    assert streamed.exit_code == 0, streamed.output
    out = records(streamed.stdout)
    finals = [r for r in out if "generated_ids" in r]
    assert [(r["id"], r.get("sample")) for r in finals] == [(i, s if n > 1 else None) for i in range(1, 6) for s in range(n)]
    assert len(out) > len(finals) and grouped(out)

    whole = invoke("generate", *common, prompts_file)
    assert records(whole.stdout) == finals

    # JSONL: the stream records pass through, the final ones get `completion`
    decoded = invoke("decode", "-m", tiny, input=streamed.stdout)
    assert decoded.exit_code == 0, decoded.output
    decoded_records = records(decoded.stdout)
    assert [r for r in decoded_records if "delta" in r] == [r for r in out if "delta" in r]
    assert [r for r in decoded_records if "completion" in r] == records(invoke("decode", "-m", tiny, input=whole.stdout).stdout)

    # text only: the deltas as they come, each record ended by its newline: the same text as decoding the whole records
    text = invoke("decode", "-m", tiny, "--text-only", input=streamed.stdout)
    assert text.exit_code == 0, text.output
    joined = ["".join(r["delta"] for r in out if "delta" in r and (r["id"], r.get("sample")) == (f["id"], f.get("sample"))) for f in finals]
    assert text.stdout == "".join(t + "\n" for t in joined)
    assert text.stdout == invoke("decode", "-m", tiny, "--text-only", input=whole.stdout).stdout


def test_decode_text_only_holds_the_deltas_of_other_records_until_their_turn(tiny):
    interleaved = jsonl(
        {"id": "a", "delta": "Hel"},
        {"id": "b", "delta": "Wor"},
        {"id": "a", "delta": "lo"},
        {"id": "a", "generated_ids": [5]},
        {"id": "b", "delta": "ld"},
        {"id": "b", "generated_ids": [6]},
        {"id": "c", "delta": "sam"},
        {"id": "c", "sample": 1, "delta": "ple 1"},
        {"id": "c", "delta": "ple 0"},
        {"id": "c", "generated_ids": [7]},
        {"id": "c", "sample": 1, "generated_ids": [8]},
    )
    result = invoke("decode", "-m", tiny, "--text-only", input=interleaved)
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello\nWorld\nsample 0\nple 1\n"

    mixed = jsonl({"id": 1, "delta": "one"}, {"id": 2, "delta": "two"}, {"id": 2, "generated_ids": [5]})
    bad = invoke("decode", "-m", tiny, "--text-only", input=mixed)
    assert bad.exit_code != 0 and "line 3: the stream mixes the deltas of two records" in str(bad.exception)
    assert bad.stdout == "one"  # never a second text on the same line


def test_decode_text_only_prints_each_delta_at_once(tiny):
    """A real pipe: the text of a delta record is on decode's stdout before the next line is sent."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmcli", "decode", "-m", str(tiny), "--text-only"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )

    def read_now(expected: bytes) -> bytes:
        got = b""
        deadline = time.monotonic() + 60
        while len(got) < len(expected) and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
            if ready:
                got += os.read(proc.stdout.fileno(), 4096)
        return got

    try:
        for piece in ["Hello", ", wor", "ld"]:
            proc.stdin.write((json.dumps({"id": 1, "delta": piece}) + "\n").encode())
            proc.stdin.flush()
            assert read_now(piece.encode()) == piece.encode()
        proc.stdin.write(b'{"id": 1, "generated_ids": [5, 6]}\n')
        proc.stdin.flush()
        assert read_now(b"\n") == b"\n"
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()


# ---------------------------------------------------------------- item 12: --version, LLMCLI_HOME, perplexity's hint


def test_version():
    from importlib.metadata import version

    script = "import sys\nfrom llmcli.cli import main\ntry:\n    main()\nfinally:\n    print(sorted(m for m in sys.modules if m == 'torch'), file=sys.stderr)\n"
    for flag in ["--version", "-V"]:
        proc = subprocess.run([sys.executable, "-c", script, flag], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == f"llmcli {version('llmcli')}\n"
        assert proc.stderr.strip() == "[]"  # no torch for --version


@pytest.mark.parametrize("below", [False, True])
def test_llmcli_home_that_is_a_file_is_one_line(tiny, tmp_path, below):
    home_file = tmp_path / "home"
    home_file.write_text("not a folder")
    home = home_file / "sub" if below else home_file
    blocked = f"cannot be created: {home_file} is not a directory" if below else "is not a directory"
    expected = f"error: LLMCLI_HOME={home} {blocked}; point LLMCLI_HOME at a directory (created when missing), or unset it to use ~/.cache/llmcli\n"
    for args in (["tokenize", "-m", tiny], ["models"]):
        proc = run(*args, input="hi\n", env={"LLMCLI_HOME": str(home)})
        assert proc.returncode == 1
        assert proc.stderr == expected
