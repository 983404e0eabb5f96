"""`llmcli bench serve`: the load generator against a tiny in-process server, its percentile math
against numpy on the recorded timings, errors counted, the Poisson schedule seeded.

Also home of `LiveServer` (make_app under uvicorn in a thread, on a free loopback port), which
test_serve_reliability.py and test_chat_page.py use too.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from llmcli.cli import app, main
from llmcli.cli.bench_serve import RequestResult, arrival_offsets, percentile, run_load, summarize, synthetic_prompts, tpot
from tests.tiny import make_tiny


class LiveServer:
    """An app served by uvicorn in a background thread on 127.0.0.1 (signals stay with pytest)."""

    def __init__(self, application):
        import uvicorn

        from llmcli.server.runner import bind

        self.app = application
        self.sock = bind("127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(application, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.02)

    @property
    def state(self):
        return self.app.state.llmcli

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def wait_for(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("bench-serve") / "llama")


@pytest.fixture(scope="module")
def live(tiny_dir):
    from llmcli.engine import Engine
    from llmcli.engine.service import EngineService
    from llmcli.server import make_app

    server = LiveServer(make_app(EngineService(Engine(tiny_dir, batch_size=4), max_queue=64), model_name="tiny"))
    yield server
    server.stop()


def test_percentile_is_numpys_linear_percentile():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 101):
        values = rng.exponential(size=n).tolist()
        for q in (0, 1, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)
    assert math.isnan(percentile([], 50))


def test_poisson_arrivals_are_seeded_and_have_the_rate():
    a = arrival_offsets(2000, 4.0, seed=7)
    assert a == arrival_offsets(2000, 4.0, seed=7)
    assert a != arrival_offsets(2000, 4.0, seed=8)
    gaps = np.diff(a)
    assert a[0] == 0 and (gaps > 0).all()
    assert gaps.mean() == pytest.approx(1 / 4.0, rel=0.05)
    # exponential gaps: the median is ln 2 / rate
    assert np.median(gaps) == pytest.approx(math.log(2) / 4.0, rel=0.08)
    assert arrival_offsets(5, math.inf, seed=1) == [0.0] * 5


def test_summary_equals_numpy_on_recorded_timings(live):
    prompts = synthetic_prompts(6, 8, 5, seed=3)
    results, duration = asyncio.run(
        run_load(live.base, prompts, endpoint="/v1/completions", model="tiny", max_concurrency=3, extra={"temperature": 0, "ignore_eos": True})
    )
    assert [r.error for r in results] == [""] * 6 and all(r.ok for r in results)
    assert [r.output_tokens for r in results] == [5] * 6  # ignore_eos: every reply is max_tokens long
    tokenized = [len(live.state.service.engine.tokenizer.encode(p.body["prompt"]).ids) for p in prompts]
    assert [r.prompt_tokens for r in results] == tokenized  # from the stream's usage chunk
    for r in results:
        assert 0 < r.ttft <= r.latency and len(r.itl) <= r.output_tokens - 1
        assert r.ttft + sum(r.itl) == pytest.approx(r.latency, rel=1e-9)
    summary = summarize(results, duration)
    ms = lambda xs: np.array(xs) * 1000  # noqa: E731
    ttft, e2el = ms([r.ttft for r in results]), ms([r.latency for r in results])
    itl = ms([g for r in results for g in r.itl])
    tpots = ms([(r.latency - r.ttft) / (r.output_tokens - 1) for r in results])
    for name, values in (("ttft", ttft), ("e2el", e2el), ("itl", itl), ("tpot", tpots)):
        assert summary[f"mean_{name}_ms"] == pytest.approx(values.mean())
        assert summary[f"median_{name}_ms"] == pytest.approx(np.median(values))
        assert summary[f"std_{name}_ms"] == pytest.approx(values.std())
        for q in (50, 90, 99):
            assert summary[f"p{q}_{name}_ms"] == pytest.approx(np.percentile(values, q))
    assert summary["completed"] == 6 and summary["failed"] == 0 and summary["errors"] == {}
    assert summary["total_output_tokens"] == 30 and summary["total_input_tokens"] == sum(tokenized)
    assert summary["request_throughput"] == pytest.approx(6 / duration)
    assert summary["output_throughput"] == pytest.approx(30 / duration)
    assert summary["total_token_throughput"] == pytest.approx((30 + sum(tokenized)) / duration)


def test_tpot_leaves_out_one_token_replies():
    assert tpot(RequestResult(ok=True, output_tokens=1, ttft=0.1, latency=0.1)) is None
    assert tpot(RequestResult(ok=True, output_tokens=3, ttft=0.1, latency=0.5)) == pytest.approx(0.2)
    summary = summarize([RequestResult(ok=True, output_tokens=1, ttft=0.1, latency=0.1), RequestResult(error="HTTP 500: x")], 1.0)
    assert math.isnan(summary["mean_tpot_ms"]) and summary["failed"] == 1 and summary["errors"] == {"HTTP 500: x": 1}


def test_bench_serve_command_counts_requests_and_errors(live, tmp_path):
    before = live.state.service.metrics.requests
    data = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "Hello there"}, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}, {"prompt": "bad", "max_tokens": 0}]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "summary.json"
    result = CliRunner().invoke(
        app, ["bench", "serve", live.base + "/v1", "--dataset", str(data), "-N", "6", "--output-len", "4", "--request-rate", "50", "--seed", "1", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["model"] == "tiny"  # from GET /v1/models
    assert summary["completed"] == 4 and summary["failed"] == 2
    (message, count), = summary["errors"].items()
    assert count == 2 and message.startswith("HTTP 400: max_tokens")
    assert summary["total_output_tokens"] == 2 * 4 + 2 * 3  # records without max_tokens get --output-len
    assert live.state.service.metrics.requests - before == 4  # the refused ones never reached the engine
    assert "Time to first token" in result.stderr and "p99" in result.stderr
    assert result.stdout == ""  # -o: the JSON went to the file


def test_requests_start_on_the_poisson_schedule(live):
    prompts = synthetic_prompts(4, 4, 2, seed=0)
    results, _ = asyncio.run(run_load(live.base, prompts, endpoint="/v1/completions", request_rate=20.0, seed=5, extra={"ignore_eos": True}))
    offsets = arrival_offsets(4, 20.0, seed=5)
    assert all(r.ok for r in results)
    assert all(r.start >= offset - 1e-3 for r, offset in zip(results, offsets))  # asyncio may wake a clock tick early


def test_an_unreachable_server_is_all_errors_and_bad_flags_exit_2(capsys):
    from llmcli.server.runner import bind

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    result = CliRunner().invoke(app, ["bench", "serve", f"http://127.0.0.1:{port}", "-N", "3", "-m", "x"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["completed"] == 0 and summary["failed"] == 3
    assert list(summary["errors"]) == [next(iter(summary["errors"]))] and next(iter(summary["errors"])).startswith("ConnectError")
    assert summary["mean_ttft_ms"] is None  # no samples: null, not NaN
    for flags in (["--request-rate", "0"], ["-N", "0"], ["--endpoint", "/v1/embeddings"], ["--percentiles", "50,101"]):
        with pytest.raises(SystemExit) as info:
            main(["bench", "serve", "http://127.0.0.1:1", *flags])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (flags, err)
