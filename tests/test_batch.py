"""`llmcli batch`: OpenAI Batch files answered as `serve` answers them, exactly once, resumable,
locally and on a real local Ray cluster (`ray start --head`, shared by this module's Ray tests).

References: serve's own app (make_app under Starlette's TestClient) for every response body;
the batch's local run for the Ray run (batch invariance); the input file for custom_ids.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from tests.tiny import make_tiny

# fields of a response body that differ on every call, in serve as in batch: the completion's id and its time
VOLATILE = ("id", "created")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-models")
    return {"llama": make_tiny("llama", root / "llama"), "bert": make_tiny("bert", root / "bert")}


def request(custom_id: str, url: str, body, method: str = "POST") -> dict:
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stable(body):
    return {k: v for k, v in body.items() if k not in VOLATILE} if isinstance(body, dict) else body


class Ran:
    def __init__(self, exit_code: int, output: str):
        self.exit_code = exit_code
        self.output = output  # stderr: the data goes to the -o file


def invoke(*args, capsys) -> Ran:
    """`llmcli ARGS` in this process through main() (errors become `error:` lines and exit codes as in a shell)."""
    from llmcli.cli import main

    capsys.readouterr()
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code or 0
    return Ran(code, capsys.readouterr().err)


def prompts(count: int, max_tokens: int) -> list[dict]:
    words = ["The quick brown fox", "To be, or not", "What is the capital", "Numbers like 12345", "def add(a, b):"]
    return [
        request(f"req-{i}", "/v1/completions", {"prompt": f"{words[i % len(words)]} {i}", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        for i in range(count)
    ]


# ---------------------------------------------------------------- the bodies mean what they mean to serve


MIXED = [
    request("chat", "/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": "The quick brown fox"}], "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2}),
    request("completion-n2", "/v1/completions", {"prompt": ["To be, or not", "What is"], "max_tokens": 5, "n": 2, "seed": 7, "temperature": 0.9, "logprobs": 1}),
    request("embedding", "/v1/embeddings", {"model": "bert", "input": ["hello world", "naïve café"]}),
    request("too-hot", "/v1/completions", {"prompt": "x", "temperature": 9}),
    request("wrong-model", "/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    request("no-messages", "/v1/chat/completions", {"max_tokens": 3}),
    request("unknown-url", "/v1/images/generations", {"prompt": "a cat"}),
    request("get", "/v1/completions", {"prompt": "x"}, method="GET"),
    request("streamed", "/v1/completions", {"prompt": "x", "stream": True}),
]


def test_batch_answers_each_line_as_serve_does(models, tmp_path, capsys):
    """Every body (chat, completions with n and logprobs, embeddings, bodies serve refuses) gets serve's
    exact status and body; lines serve never sees (url, method, stream) get `error`; order and ids as vLLM's."""
    from fastapi.testclient import TestClient

    from llmcli.core.loader import load_model
    from llmcli.engine import Engine
    from llmcli.engine.service import Embedder, EngineService
    from llmcli.server import make_app

    src = write_jsonl(tmp_path / "in.jsonl", MIXED)
    out = tmp_path / "out.jsonl"
    ray_before = {m for m in sys.modules if m == "ray" or m.startswith("ray.")}
    result = invoke("batch", src, "-o", out, "-m", models["llama"], "--embedding-model", models["bert"], "--chunk-size", "4", capsys=capsys)
    assert result.exit_code == 0, result.output
    assert {m for m in sys.modules if m == "ray" or m.startswith("ray.")} == ray_before  # Ray is imported only with --ray
    assert "9 records (9 run now, 6 errors)" in result.output
    assert not (tmp_path / "out.jsonl.parts").exists()
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in MIXED]
    assert all(line["id"].startswith("batch_req_") and set(line) == {"id", "custom_id", "response", "error"} for line in lines)
    assert len({line["id"] for line in lines}) == len(lines)

    app = make_app(EngineService(Engine(models["llama"], batch_size=8), max_queue=64), model_name="llama", embedder=Embedder(load_model(models["bert"])), embedding_name="bert")
    with TestClient(app, raise_server_exceptions=False) as client:
        for row, line in zip(MIXED, lines):
            if row["custom_id"] in ("unknown-url", "get", "streamed"):
                assert line["response"] is None
                assert line["error"]["code"] == {"unknown-url": "invalid_url", "get": "invalid_method", "streamed": "invalid_request"}[row["custom_id"]]
                continue
            served = client.post(row["url"], json=row["body"])
            assert line["error"] is None
            assert line["response"]["status_code"] == served.status_code, row["custom_id"]
            assert line["response"]["request_id"].startswith("req_")
            assert stable(line["response"]["body"]) == stable(served.json()), row["custom_id"]
    statuses = {line["custom_id"]: line["response"]["status_code"] for line in lines if line["response"]}
    assert statuses == {"chat": 200, "completion-n2": 200, "embedding": 200, "too-hot": 400, "wrong-model": 404, "no-messages": 400}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([request("a", "/v1/completions", {"prompt": "x"}), "{not json"], "line 2: "),
        ([request("a", "/v1/completions", {"prompt": "x"}), {"method": "POST", "url": "/v1/completions", "body": {}}], "line 2: the batch request has no `custom_id`"),
        ([request("a", "/v1/completions", {"prompt": "x"}), request("b", "/v1/completions", {}), request("a", "/v1/embeddings", {})], "line 3: custom_id 'a' repeats line 1's"),
    ],
    ids=["not-jsonl", "no-custom-id", "duplicate-custom-id"],
)
def test_batch_refuses_a_bad_file_before_it_starts(models, tmp_path, rows, message, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    out.write_text("kept\n")  # an earlier output is not touched
    result = invoke("batch", src, "-o", out, "-m", models["llama"], capsys=capsys)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and str(src) in errors[0], result.output
    assert "Traceback" not in result.output
    assert out.read_text() == "kept\n"
    assert not (tmp_path / "out.jsonl.parts").exists()


# ---------------------------------------------------------------- exactly once, resumable


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the job ended first ({proc.returncode}):\n{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def part_records(parts: Path) -> list[int]:
    return [json.loads(line)["index"] for p in sorted(parts.glob("part-*.jsonl")) for line in p.read_text().splitlines()]


def test_killed_driver_resumes_with_only_the_missing_records(models, tmp_path, monkeypatch, capsys):
    """kill -9 of a local run mid-job leaves whole parts and no output; --resume runs only what the parts lack,
    and its output equals an uninterrupted run's."""
    from llmcli.batch.openai_batch import OpenAIBatchWorker

    rows = prompts(12, 32)  # long enough that the kill lands mid-job on a fast machine too
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    parts = tmp_path / "out.jsonl.parts"
    args = ["batch", str(src), "-o", str(out), "-m", str(models["llama"]), "--chunk-size", "2", "--batch-size", "2", "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", *args], stderr=subprocess.PIPE, text=True, env=subprocess_env())
    wait_for(lambda: len(list(parts.glob("part-*.jsonl"))) >= 2, 120, "two parts", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done_before = part_records(parts)
    assert 4 <= len(done_before) < len(rows)

    ran: list[int] = []
    original = OpenAIBatchWorker.run
    monkeypatch.setattr(OpenAIBatchWorker, "run", lambda self, items: (ran.extend(i.index for i in items), original(self, items))[1])
    resumed = invoke(*args, "--resume", capsys=capsys)
    assert resumed.exit_code == 0, resumed.output
    assert sorted(ran) == sorted(set(range(len(rows))) - set(done_before))
    assert f"{len(rows) - len(done_before)} run now" in resumed.output
    assert not parts.exists()

    whole = tmp_path / "whole.jsonl"
    assert invoke("batch", src, "-o", whole, "-m", models["llama"], "--chunk-size", "12", capsys=capsys).exit_code == 0
    got, want = read_jsonl(out), read_jsonl(whole)
    assert [g["custom_id"] for g in got] == [r["custom_id"] for r in rows]
    assert [stable(g["response"]["body"]) for g in got] == [stable(w["response"]["body"]) for w in want]


def test_parts_of_another_run_are_refused(models, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", prompts(2, 2))
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.parts").mkdir()
    result = invoke("batch", src, "-o", out, "-m", models["llama"], capsys=capsys)
    assert result.exit_code == 2 and "--resume" in result.output
    # the parts of a run over another input (or with other options) are not resumed into this one
    (tmp_path / "out.jsonl.parts" / "job.json").write_text(json.dumps({"fingerprint": "another"}))
    result = invoke("batch", src, "-o", out, "-m", models["llama"], "--resume", capsys=capsys)
    assert result.exit_code == 2 and "another input or other options" in result.output


# ---------------------------------------------------------------- Ray: a real local cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with 2 CPUs (its own temp dir and ports), stopped after the module."""
    pytest.importorskip("ray")  # the .[ray] extra, which the README's test command installs
    ray_bin = Path(sys.executable).with_name("ray")
    port = free_port()
    # Ray's socket paths must stay short (AF_UNIX): a temp dir under /tmp, not pytest's deep one
    temp = Path(tempfile_dir())
    cmd = [
        str(ray_bin), "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--include-dashboard", "false", "--temp-dir", str(temp), "--disable-usage-stats",
    ]
    log = open(tmp_path_factory.mktemp("ray") / "ray.log", "wb")
    # no drain on SIGTERM (Ray waits up to 30 s for a node's work to move elsewhere): nothing runs when the module ends
    env = subprocess_env({"OMP_NUM_THREADS": "1", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        wait_for(lambda: _listening(port), 120, "the Ray head", head)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)  # --block: the head stops every process it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="llmcli-ray-", dir="/tmp")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def part_workers(parts: Path) -> set[str]:
    """host:pid of the processes that ran the parts' records (each part line names its worker)."""
    return {json.loads(line)["worker"] for p in parts.glob("part-*.jsonl") for line in p.read_text().splitlines()}


def test_ray_job_survives_a_killed_actor_and_equals_the_local_run(models, tmp_path, ray_cluster, capsys):
    """The job on the cluster (read_json -> map_batches on an actor pool): one actor killed (kill -9) mid-job,
    the output still has every custom_id exactly once, in input order (--ordered), equal to the local run."""
    rows = prompts(8, 48)  # long enough that the kill lands mid-job on a fast machine too
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    local = tmp_path / "local.jsonl"
    assert invoke("batch", src, "-o", local, "-m", models["llama"], "--chunk-size", "8", capsys=capsys).exit_code == 0

    out = tmp_path / "ray.jsonl"
    parts = tmp_path / "ray.jsonl.parts"
    args = ["batch", str(src), "-o", str(out), "-m", str(models["llama"]), "--chunk-size", "2", "--batch-size", "2", "--threads", "1", "--ordered", "--ray", ray_cluster]
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", *args], stderr=subprocess.PIPE, text=True, env=subprocess_env({"OMP_NUM_THREADS": "1"}))
    wait_for(lambda: len(list(parts.glob("part-*.jsonl"))) >= 1, 240, "the first part", proc)
    workers = part_workers(parts)
    assert len(workers) == 1, workers
    actor = int(workers.pop().rsplit(":", 1)[1])
    assert actor != proc.pid  # an actor of the cluster, not the driver
    os.kill(actor, signal.SIGKILL)
    assert len(part_records(parts)) < len(rows)  # killed mid-job
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr

    got = read_jsonl(out)
    assert [g["custom_id"] for g in got] == [r["custom_id"] for r in rows]  # each exactly once, in input order
    want = read_jsonl(local)
    assert [g["id"] for g in got] == [w["id"] for w in want]  # ids come from the input and the options, not from who ran it
    assert [stable(g["response"]["body"]) for g in got] == [stable(w["response"]["body"]) for w in want]


def test_generate_records_run_as_a_ray_job(models, tmp_path, ray_cluster, capsys):
    """`llmcli generate --ray` writes the records plain `llmcli generate` writes (samples, seeds, skipped lines)."""
    rows = [{"text": "The quick brown fox"}, {"ids": [5, 6, 7], "id": "x"}, {"nothing": 1}, {"text": "To be, or not"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    flags = ["-m", models["llama"], "-n", "5", "--samples", "2", "--temperature", "0.8", "--seed", "3", "--skip-errors"]
    plain, on_ray = tmp_path / "plain.jsonl", tmp_path / "ray.jsonl"
    first = invoke("generate", src, "-o", plain, *flags, capsys=capsys)
    assert first.exit_code == 0, first.output
    ran = invoke("generate", src, "-o", on_ray, *flags, "--ray", ray_cluster, "--chunk-size", "2", "--ordered", capsys=capsys)
    assert ran.exit_code == 0, ran.output
    assert "4 records (4 run now, 1 errors)" in ran.output
    assert on_ray.read_text() == plain.read_text()
    assert len(read_jsonl(on_ray)) == 6  # three good records, two samples each


def test_constrained_generate_runs_as_a_job(models, tmp_path, capsys):
    """The structured-output flags and a record's own response_format reach the workers: `generate
    --workers 2` writes plain generate's records (a bad response_format skipped in both)."""
    rows = [
        {"text": "The answer is"},
        {"text": "Pick one:", "response_format": {"type": "regex", "regex": "[0-9]{3}"}},
        {"text": "Bad", "response_format": {"type": "regex"}},
        {"text": "Again"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    flags = ["-m", models["llama"], "-n", "6", "--choice", "yes,no", "--skip-errors"]
    plain, job = tmp_path / "plain.jsonl", tmp_path / "job.jsonl"
    first = invoke("generate", src, "-o", plain, *flags, capsys=capsys)
    assert first.exit_code == 0, first.output
    ran = invoke("generate", src, "-o", job, *flags, "--workers", "2", "--chunk-size", "1", "--ordered", capsys=capsys)
    assert ran.exit_code == 0, ran.output
    assert "4 records (4 run now, 1 errors)" in ran.output
    assert job.read_text() == plain.read_text()
    got = read_jsonl(job)
    assert [r["text"] for r in got] == ["The answer is", "Pick one:", "Again"]
    assert all("cached_tokens" in r for r in got)


def test_encode_records_run_as_a_job(models, tmp_path, capsys):
    """`llmcli encode` as a batch job (here: --resume on a fresh output, the local runner) writes plain encode's records."""
    from llmcli.core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(models["bert"])
    rows = [{"ids": tokenizer.encode(text).ids} for text in ["The quick brown fox", "To be, or not", "x"]] + [{"nothing": 1}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    flags = ["-m", models["bert"], "--pool", "mean", "--normalize", "--skip-errors"]
    plain, job = tmp_path / "plain.jsonl", tmp_path / "job.jsonl"
    assert invoke("encode", src, "-o", plain, *flags, capsys=capsys).exit_code == 0
    ran = invoke("encode", src, "-o", job, *flags, "--resume", "--chunk-size", "2", capsys=capsys)
    assert ran.exit_code == 0, ran.output
    assert "4 records (4 run now, 1 errors)" in ran.output
    assert job.read_text() == plain.read_text()
    assert len(read_jsonl(job)) == 3
