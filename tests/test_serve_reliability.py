"""The server under clients that misbehave: a disconnect frees the row within one engine step (even
while the request still waits in the queue), a full queue answers 429 with Retry-After, requests
time out (504, or an error event in a stream), the embedder never loads on the event loop, and
SIGINT / a busy port end `serve` as the CLI promises. Also: the sampling knobs that SamplingParams
declares reach the CLI's flags and the server's request fields."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from tests.test_serve import Server, stretch_context
from tests.test_serve_load import LiveServer, wait_for
from tests.tiny import make_tiny

STEP_S = 0.1  # each engine step sleeps this long first, so that steps can be counted against events


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return {"llama": stretch_context(make_tiny("llama", root / "llama"), 4096), "bert": make_tiny("bert", root / "bert")}


class Counted:
    """A one-row service whose batcher counts its steps and takes STEP_S each."""

    def __init__(self, path, max_queue: int = 1, **app_kw):
        from llmcli.engine import Engine
        from llmcli.engine.service import EngineService
        from llmcli.server import make_app

        self.service = EngineService(Engine(path, batch_size=1), max_queue=max_queue)
        self.steps = 0
        step = self.service._batcher.step

        def counted_step():
            self.steps += 1
            time.sleep(STEP_S)
            return step()

        self.service._batcher.step = counted_step
        self.live = LiveServer(make_app(self.service, model_name="tiny", **app_kw))
        self.base = self.live.base

    @contextlib.contextmanager
    def holding_the_row(self, client: httpx.Client):
        """A long stream that holds the only row (for thousands of steps) while the block runs; yields its response."""
        with client.stream("POST", self.base + "/v1/completions", json=LONG) as holder:
            reader = Reader(holder)
            assert reader.first_text()
            yield holder

    def cancelled(self) -> int:
        return self.service.metrics.finished.get("cancelled", 0)

    def close(self) -> None:
        self.live.stop()


LONG = {"model": "tiny", "prompt": "The quick", "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}


class Reader:
    """A stream's lines, read as far as needed. The iterator is kept: httpx closes the connection
    when an unfinished one is dropped, which would look like a client going away."""

    def __init__(self, response: httpx.Response):
        assert response.status_code == 200
        self.lines = response.iter_lines()

    def first_text(self) -> str:
        for line in self.lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                text = json.loads(line[6:])["choices"][0]["text"]
                if text:
                    return text
        raise AssertionError("the stream ended without text")


def test_a_disconnected_stream_frees_its_row_within_one_step(dirs):
    s = Counted(dirs["llama"])
    try:
        before = s.cancelled()
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", s.base + "/v1/completions", json=LONG) as r:
                reader = Reader(r)
                assert reader.first_text()
                time.sleep(3 * STEP_S)  # still connected: still running
                assert s.service.running == 1 and s.cancelled() == before
                at_close = s.steps
        # leaving the block closed the connection mid-stream
        wait_for(lambda: s.service.running == 0)
        # at most the step already under way when the disconnect arrived, and the one that frees the row
        assert s.steps - at_close <= 2
        assert s.cancelled() == before + 1
        assert s.service.metrics.generation_tokens < 3000
    finally:
        s.close()


def test_a_client_that_gives_up_on_a_whole_reply_frees_its_row(dirs):
    s = Counted(dirs["llama"])
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000, "ignore_eos": True}).encode()
        host, port = s.base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as raw:  # a non-streamed request: nothing comes back until the end
            raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: s.service.running == 1 and s.steps >= 3)
            at_close = s.steps
        wait_for(lambda: s.service.running == 0)
        assert s.steps - at_close <= 2 and s.cancelled() == 1
    finally:
        s.close()


def test_a_queued_stream_that_disconnects_leaves_the_queue_at_once(dirs):
    s = Counted(dirs["llama"], max_queue=2)
    try:
        with httpx.Client(timeout=60) as client, s.holding_the_row(client):
            waiting = client.stream("POST", s.base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5})
            response = waiting.__enter__()
            assert response.status_code == 200
            wait_for(lambda: s.service.queue_depth == 1)
            waiting.__exit__(None, None, None)  # the client gives up before its request got a row
            wait_for(lambda: s.service.queue_depth == 0, timeout=10)
            assert s.service.running == 1  # the holder still runs: the queue emptied without waiting for it
            assert s.cancelled() == 1
    finally:
        s.close()


def test_a_full_queue_gets_429_with_retry_after(dirs):
    s = Counted(dirs["llama"], max_queue=1)
    try:
        with httpx.Client(timeout=60) as client, s.holding_the_row(client) as holder:
            result: dict = {}
            t = threading.Thread(target=lambda: result.setdefault("r", client.post(s.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "ignore_eos": True})))
            t.start()
            wait_for(lambda: s.service.queue_depth == 1)
            r = httpx.post(s.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
            assert r.status_code == 429
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "requests"
            holder.close()
            t.join(60)
            assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 2
    finally:
        s.close()


def test_a_request_that_runs_past_the_timeout_is_stopped(dirs):
    s = Counted(dirs["llama"], max_queue=4, request_timeout=1.0)
    try:
        r = httpx.post(s.base + "/v1/completions", json={**LONG, "stream": False}, timeout=60)
        assert r.status_code == 504
        assert r.json()["error"] == {
            "message": "the request ran longer than the server's --request-timeout of 1 s and was stopped",
            "type": "timeout_error",
            "param": None,
            "code": "request_timeout",
        }
        wait_for(lambda: s.cancelled() == 1)  # the engine stopped it (a running or a queued request alike)
        with httpx.Client(timeout=60) as client, client.stream("POST", s.base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3000, "ignore_eos": True}) as stream:
            events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "request_timeout"
        assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"  # the stream had started: 200, then the error event
        wait_for(lambda: s.cancelled() == 2)
        assert s.service.running == 0 and s.service.queue_depth == 0
    finally:
        s.close()


def test_the_embedder_loads_off_the_event_loop(dirs):
    from llmcli.core.loader import load_model
    from llmcli.engine import Engine
    from llmcli.engine.service import Embedder, EngineService
    from llmcli.server import make_app

    release, entered = threading.Event(), threading.Event()

    def slow_embedder():
        entered.set()
        release.wait(60)
        return Embedder(load_model(dirs["bert"]))

    live = LiveServer(make_app(EngineService(Engine(dirs["llama"], batch_size=1)), model_name="tiny", embedder=slow_embedder, embedding_name="bert"))
    try:
        result: dict = {}
        t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(live.base + "/tokenize", json={"model": "bert", "prompt": "hi there"}, timeout=60)))
        t.start()
        assert entered.wait(30)  # the tokenize request is now waiting for the embedder's load
        assert "r" not in result
        assert httpx.get(live.base + "/health", timeout=5).status_code == 200  # the event loop still answers
        release.set()
        t.join(60)
        assert result["r"].status_code == 200 and result["r"].json()["count"] > 0
    finally:
        live.stop()


def test_the_chat_page_loads_without_the_api_key_but_the_api_needs_it():
    from fastapi.testclient import TestClient

    from llmcli.server import make_app

    release = threading.Event()
    with TestClient(make_app(lambda: release.wait(30), model_name="x", api_key="k")) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<title>llmcli chat</title>" in page.text and "https://" not in page.text  # nothing from a CDN
        assert client.get("/v1/models").status_code == 401
        assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 401
        release.set()


def test_sigint_drains_then_exits_130_and_a_busy_port_is_one_line(dirs, tmp_path):
    s = Server(tmp_path, "--model", str(dirs["llama"]), "--batch-size", "1")
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(60) == 130
    assert "interrupted" in s.stderr() and "Traceback" not in s.stderr()
    s.log.close()

    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "llmcli", "serve", "--model", str(dirs["llama"]), "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_every_sampling_knob_is_a_cli_flag_and_a_request_field():
    from llmcli.cli import app
    from llmcli.core.sampling_params import SamplingParams
    from llmcli.server.schemas import ChatCompletionRequest, CompletionRequest

    knobs = SamplingParams.knobs()
    assert [f.name for f in knobs] == ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "seed"]
    for command in ("generate", "chat"):
        shown = CliRunner().invoke(app, [command, "--help"], terminal_width=200).stdout
        for f in knobs:
            assert f"--{f.name.replace('_', '-')} " in shown, (command, f.name)
    for schema in (CompletionRequest, ChatCompletionRequest):
        assert {f.name for f in knobs} <= set(schema.model_fields)
    base = {"messages": [{"role": "user", "content": "x"}]}
    # left out: OpenAI's defaults (temperature 1), the rest switched off
    assert ChatCompletionRequest(**base).to_sampling_params(50) == SamplingParams(temperature=1.0)
    given = dict(temperature=0.3, top_k=5, top_p=0.5, min_p=0.1, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=-0.5, seed=7)
    made = CompletionRequest(prompt="x", logit_bias={"3": -100}, logprobs=2, **given).to_sampling_params(50)
    assert made == SamplingParams(logit_bias={3: -100.0}, logprobs=2, **given)
    for bad in ({"temperature": 2.5}, {"top_p": 0}, {"min_p": 1.5}, {"presence_penalty": 3}, {"repetition_penalty": 0}):
        with pytest.raises(ValueError):
            CompletionRequest(prompt="x", **bad)
