"""Real pipes between real processes: `[sys.executable, "-m", "llmcli", ...]` chained through OS pipes.

What only a subprocess can show: stages compose bit for bit through JSONL, records stream one by
one, a saved KV cache is really used, `| head -n1` ends quietly, and errors become exit codes.
References: the stage run directly on the same records, `tokenizers` for decoded text.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.tiny import make_tiny

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "def add(a, b):",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: offline, a private llmcli home (nothing is pulled), no debug tracebacks."""
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", LLMCLI_HOME=str(tmp_path_factory.mktemp("home")), PYTHONUNBUFFERED="1")
    e.pop("LLMCLI_DEBUG", None)
    e.pop("LLMCLI_MODEL", None)
    root = str(Path(__file__).resolve().parents[1])
    e["PYTHONPATH"] = os.pathsep.join([p for p in (e.get("PYTHONPATH"), root) if p])
    return e


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny("llama", tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> str:
    return str(make_tiny("llama", tmp_path_factory.mktemp("other"), seed=1))


def llmcli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmcli", *args]


def text_records() -> str:
    return "".join(json.dumps({"id": i + 1, "text": t}) + "\n" for i, t in enumerate(TEXTS))


def run(args: list[str], stdin: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, env=env, timeout=300)


def pipeline(commands: list[list[str]], stdin: str, env: dict, tmp_path: Path) -> tuple[str, list[int], list[str]]:
    """cmd1 | cmd2 | ... through OS pipes; returns the last stdout, every exit code and every stderr."""
    procs, errs = [], []
    prev = None
    for i, cmd in enumerate(commands):
        err = open(tmp_path / f"stderr{i}.txt", "w+")
        errs.append(err)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if prev is None else prev.stdout, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        if prev is not None:
            prev.stdout.close()  # only the next stage holds the read end, so SIGPIPE can reach the writer
        procs.append(proc)
        prev = proc
    procs[0].stdin.write(stdin)
    procs[0].stdin.close()
    out = procs[-1].stdout.read()
    codes = [p.wait(timeout=300) for p in procs]
    texts = []
    for err in errs:
        err.seek(0)
        texts.append(err.read())
        err.close()
    return out, codes, texts


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------- stages compose


def test_tokenize_encode_attend_equals_attend_on_ids_bit_for_bit(tiny, env, tmp_path):
    three, codes3, errs3 = pipeline([llmcli("tokenize", "-m", tiny), llmcli("encode", "-m", tiny), llmcli("attend", "-m", tiny, "--attention")], text_records(), env, tmp_path)
    assert codes3 == [0, 0, 0], errs3
    two, codes2, errs2 = pipeline([llmcli("tokenize", "-m", tiny), llmcli("attend", "-m", tiny, "--attention")], text_records(), env, tmp_path)
    assert codes2 == [0, 0], errs2
    via_embeddings, via_ids = records(three), records(two)
    assert [r["id"] for r in via_embeddings] == [1, 2, 3]
    for a, b in zip(via_embeddings, via_ids):
        assert "embeddings" in a and "embeddings" not in b
        assert a["hidden"] == b["hidden"]  # identical base64: the same bits
        assert a["attention"] == b["attention"]


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.8", "--seed", "1"]], ids=["greedy", "seeded"])
def test_tokenize_generate_decode_equals_generate_on_text(tiny, env, tmp_path, sampling):
    from tokenizers import Tokenizer

    out, codes, errs = pipeline(
        [llmcli("tokenize", "-m", tiny), llmcli("generate", "-m", tiny, "-n", "12", *sampling), llmcli("decode", "-m", tiny)],
        text_records(),
        env,
        tmp_path,
    )
    assert codes == [0, 0, 0], errs
    direct = run(llmcli("generate", "-m", tiny, "-n", "12", *sampling), text_records(), env)
    assert direct.returncode == 0, direct.stderr
    piped, reference = records(out), records(direct.stdout)
    assert [r["generated_ids"] for r in piped] == [r["generated_ids"] for r in reference]
    assert [r["finish_reason"] for r in piped] == [r["finish_reason"] for r in reference]
    tok = Tokenizer.from_file(str(Path(tiny) / "tokenizer.json"))
    for r in piped:
        assert r["text"] in TEXTS
        assert r["completion"] == tok.decode(r["generated_ids"])


# ---------------------------------------------------------------- saved KV caches


def _zeroed_copy(src: Path, dst: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    save_file({name: t.zero_() for name, t in tensors.items()}, str(dst), metadata=meta)


def _save_cache_in_process(model_dir: str, ids: list[int], path: Path) -> None:
    """What `attend --save-cache` does, through the same core calls."""
    import torch

    from llmcli.core.kvfile import save_prompt_cache
    from llmcli.core.loader import load_model
    from llmcli.core.models.base import KVCache

    loaded = load_model(model_dir)
    cache = KVCache.for_model(loaded.config, 1, len(ids))
    with torch.inference_mode():
        loaded.module(torch.tensor([ids]), cache=cache, compute_logits=False)
    state = cache.row_state(0)
    save_prompt_cache(path, state["k"], state["v"], ids, loaded)


def test_attend_save_cache_then_generate_cache(tiny, other, env, tmp_path):
    tokenized = run(llmcli("tokenize", "-m", tiny), json.dumps({"text": TEXTS[0]}) + "\n", env)
    assert tokenized.returncode == 0, tokenized.stderr
    prompt = records(tokenized.stdout)[0]["ids"]
    cache = tmp_path / "prompt.safetensors"
    saved = run(llmcli("attend", "-m", tiny, "--save-cache", str(cache)), json.dumps({"ids": prompt}) + "\n", env)
    assert saved.returncode == 0, saved.stderr
    assert cache.is_file()

    # the whole prompt cached, and the prompt as the prefix of a longer one
    requests = json.dumps({"id": 1, "ids": prompt}) + "\n" + json.dumps({"id": 2, "ids": prompt + [40, 41, 42]}) + "\n"
    generate = llmcli("generate", "-m", tiny, "-n", "16", "--ignore-eos")
    plain = run(generate, requests, env)
    cached = run(generate + ["--cache", str(cache)], requests, env)
    assert plain.returncode == 0 and cached.returncode == 0, (plain.stderr, cached.stderr)
    expected = [r["generated_ids"] for r in records(plain.stdout)]
    assert [r["generated_ids"] for r in records(cached.stdout)] == expected

    # the cache is really read instead of recomputed: zeroed keys and values change the result
    zeroed = tmp_path / "zeroed.safetensors"
    _zeroed_copy(cache, zeroed)
    broken = run(generate + ["--cache", str(zeroed)], requests, env)
    assert broken.returncode == 0, broken.stderr
    got = [r["generated_ids"] for r in records(broken.stdout)]
    assert got[0] != expected[0] and got[1] != expected[1]

    # a cache of other ids, or of another model's weights: one clear line, exit status 1
    other_ids = run(generate + ["--cache", str(cache)], json.dumps({"ids": [7] + prompt}) + "\n", env)
    assert other_ids.returncode == 1
    assert other_ids.stderr.startswith("error: line 1: ") and "other ids" in other_ids.stderr
    foreign = tmp_path / "foreign.safetensors"
    _save_cache_in_process(other, prompt, foreign)  # one subprocess fewer; `attend --save-cache` itself made `cache` above
    wrong_model = run(generate + ["--cache", str(foreign)], requests, env)
    assert wrong_model.stderr.startswith("error: cache file ") and "was made by model" in wrong_model.stderr
    assert "Traceback" not in wrong_model.stderr and wrong_model.stdout == ""
    assert wrong_model.returncode == 1, wrong_model.stderr


def test_save_cache_names_one_file_per_record(tiny, env, tmp_path):
    from safetensors import safe_open

    target = tmp_path / "kv.safetensors"
    lines = json.dumps({"id": "a", "ids": [5, 6, 7]}) + "\n" + json.dumps({"id": "b", "ids": [8, 9]}) + "\n"
    done = run(llmcli("attend", "-m", tiny, "--save-cache", str(target)), lines, env)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kv-a.safetensors", "kv-b.safetensors"]
    for name, ids in (("kv-a.safetensors", [5, 6, 7]), ("kv-b.safetensors", [8, 9])):
        with safe_open(str(tmp_path / name), framework="pt") as f:
            assert json.loads(f.metadata()["ids"]) == ids


# ---------------------------------------------------------------- streaming and pipes closing early


def test_tokenize_streams_record_by_record(tiny, env):
    proc = subprocess.Popen(llmcli("tokenize", "-m", tiny), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        proc.stdin.write(json.dumps({"id": 1, "text": "The quick brown fox"}) + "\n")
        proc.stdin.flush()
        first = json.loads(lines.get(timeout=120))  # stdin is still open: the record came back on its own
        assert first["id"] == 1 and first["text"] == "The quick brown fox" and first["ids"]
        assert proc.poll() is None
        proc.stdin.write(json.dumps({"id": 2, "text": "lazy dog"}) + "\n")
    finally:
        proc.stdin.close()
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert json.loads(lines.get(timeout=10))["id"] == 2


@pytest.mark.parametrize("flags", [[], ["--stream"], ["--skip-errors", "--samples", "2"]])
def test_generate_answers_each_line_before_the_next_arrives(tiny, env, flags):
    """A line's answer comes back while stdin stays open with nothing more on it: generate reads
    its input on a read-ahead thread and never waits for the next line with an answer due (it used
    to wait for the next line, or the end of the input). With --skip-errors a bad line between two
    good ones is skipped without holding up the first one either."""
    proc = subprocess.Popen(llmcli("generate", "-m", tiny, "-n", "3", "--temperature", "0", *flags), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    samples = 2 if "--samples" in flags else 1

    def answers_of(record_id: int) -> list[dict]:
        got = []
        while len(got) < samples:
            record = json.loads(lines.get(timeout=120))  # stdin is still open: the answer came back on its own
            if "delta" not in record:
                got.append(record)
        assert all(r["id"] == record_id and len(r["generated_ids"]) == 3 for r in got), got
        return got

    try:
        proc.stdin.write(json.dumps({"id": 1, "ids": [5, 6, 7]}) + "\n" + ("not json\n" if "--skip-errors" in flags else ""))
        proc.stdin.flush()
        first = answers_of(1)
        assert proc.poll() is None
        proc.stdin.write(json.dumps({"id": 2, "ids": [5, 6, 7]}) + "\n")
        proc.stdin.flush()
        second = answers_of(2)
    finally:
        proc.stdin.close()
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert [r["generated_ids"] for r in first] == [r["generated_ids"] for r in second]  # greedy, the same prompt
    assert lines.empty()


def test_generate_into_head_exits_quietly(tiny, env, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": TEXTS[i % 3]}) + "\n" for i in range(200)))
    err = tmp_path / "err.txt"
    # --logprobs makes each record large, so the writer outgrows the pipe buffer and must meet the closed pipe
    status = tmp_path / "status.txt"
    command = " ".join(llmcli("generate", "-m", tiny, "-n", "4", "--logprobs", "5")) + f" < {prompts} 2> {err} | head -n1; echo ${{PIPESTATUS[0]}} > {status}"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0
    assert len(done.stdout.splitlines()) == 1 and "generated_ids" in json.loads(done.stdout)
    stderr = err.read_text()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr
    # it did meet the closed pipe (a writer that got everything out would exit 0), and said so only in its status
    assert status.read_text().strip() != "0"


# ---------------------------------------------------------------- errors become exit codes


@pytest.mark.parametrize("stage", ["attend", "generate"])
def test_malformed_line_stops_with_its_number(tiny, env, stage):
    lines = json.dumps({"id": 1, "ids": [5, 6, 7]}) + "\n" + json.dumps({"id": 2, "ids": [8, 9]}) + "\n" + '{"id": 3, "ids": [1, 2\n' + json.dumps({"id": 4, "ids": [5]}) + "\n"
    extra = ["-n", "2"] if stage == "generate" else []
    done = run(llmcli(stage, "-m", tiny, *extra), lines, env)
    assert done.returncode == 1
    assert done.stderr.startswith("error: line 3: malformed JSON")
    assert "Traceback" not in done.stderr
    assert [r["id"] for r in records(done.stdout)] == [1, 2]  # everything before the bad line was written

    skipped = run(llmcli(stage, "-m", tiny, *extra, "--skip-errors"), lines, env)
    assert skipped.returncode == 0, skipped.stderr
    assert [r["id"] for r in records(skipped.stdout)] == [1, 2, 4]
    assert "skipped 1 bad line(s)" in skipped.stderr


def test_attend_without_ids_points_to_tokenize(tiny, env):
    done = run(llmcli("attend", "-m", tiny), json.dumps({"text": "hello"}) + "\n", env)
    assert done.returncode == 1
    assert done.stderr == "error: line 1: no `ids` in the record for attend; pipe through `llmcli tokenize` first\n"
    assert done.stdout == ""
