"""The prefix cache (issue 15, item 2): full blocks of K/V reused across requests that share a prefix.

A request served from cached blocks must give the tokens it gives without them (greedy and
seeded), on every family shape that stores its keys differently: a plain llama, Gemma 3's
sliding-window layers (window 6 < the 16-token block, so cached blocks sit outside the window),
GGML block weights, and the real SmolLM2 Q4_1. The uncached run is the reference (and the
tiny llama's is also transformers' greedy continuation); the counts reach the API's
usage.prompt_tokens_details.cached_tokens (read by the openai client), /metrics and `generate`.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from llmcli.core.generate import Request
from llmcli.core.sampling import SamplingParams
from llmcli.engine import Engine
from llmcli.engine.prefix_cache import BLOCK_SIZE, PrefixCache
from tests.tiny import load_reference, make_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GREEDY = SamplingParams()
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=5)


# ---------------------------------------------------------------- the cache alone


def _kv_of(ids: list[int]):
    """A fake row's K/V for `ids`: position p holds the value ids[p] (2 layers, 1 head, head dim 3)."""

    def kv_of(start: int, end: int) -> torch.Tensor:
        values = torch.tensor(ids[start:end], dtype=torch.float32)
        return values[None, None, None, :, None].expand(2, 2, 1, end - start, 3).clone()

    return kv_of


BLOCK_BYTES = 2 * 2 * 1 * BLOCK_SIZE * 3 * 4  # (2, layers, heads, 16, head dim) float32


def test_lookup_finds_the_longest_chain_and_leaves_a_token_to_compute():
    cache = PrefixCache(b"model-a", 10 * BLOCK_BYTES)
    ids = list(range(100, 148))  # three full blocks
    assert cache.insert(ids, _kv_of(ids)) == 3
    keys, kv = cache.lookup(ids)  # 48 tokens: the third block would leave nothing to compute
    assert len(keys) == 2 and kv.shape == (2, 2, 1, 32, 3)
    assert torch.equal(kv[0, 1, 0, :, 0], torch.tensor(ids[:32], dtype=torch.float32))
    keys, kv = cache.lookup(ids + [7])
    assert kv.shape[3] == 48
    # a change inside block 1 keeps block 0 only: a block's key covers every token before it
    changed = ids[:20] + [5] + ids[21:] + [7]
    assert cache.lookup(changed)[1].shape[3] == 16
    assert cache.lookup([1] + ids)[1] is None  # the same tokens at other positions are no hit
    assert PrefixCache(b"model-b", 10 * BLOCK_BYTES).lookup(ids)[1] is None
    assert cache.stats.queries == 48 + 49 + 49 + 49 and cache.stats.hits == 32 + 48 + 16
    assert cache.bytes_used == 3 * BLOCK_BYTES and cache.stats.inserted == 3


def test_least_recently_used_blocks_go_first_chain_ends_before_their_parents():
    cache = PrefixCache(b"m", 3 * BLOCK_BYTES)
    a, b = list(range(32)), list(range(1000, 1032))
    cache.insert(a, _kv_of(a))
    cache.insert(b, _kv_of(b))  # needs a fourth block: a's end goes, not a's first block
    assert cache.stats.evictions == 1 and cache.bytes_used == 3 * BLOCK_BYTES
    assert cache.lookup(a + [1])[1].shape[3] == 16
    assert cache.lookup(b + [1])[1].shape[3] == 32
    # a chain longer than the whole bound keeps its first blocks
    long = list(range(2000, 2000 + 5 * BLOCK_SIZE))
    assert cache.insert(long, _kv_of(long)) == 3
    assert cache.lookup(long)[1].shape[3] == 48 and cache.bytes_used == 3 * BLOCK_BYTES
    assert PrefixCache(b"m", 0).insert(a, _kv_of(a)) == 0  # 0 MB: off


# ---------------------------------------------------------------- cached == uncached


def _prompts(vocab: int, shared: int, tails: int = 2, seed: int = 3) -> tuple[list[int], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (shared,), generator=g).tolist()
    return prefix, [torch.randint(3, vocab, (9,), generator=g).tolist() for _ in range(tails)]


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams, max_tokens: int) -> tuple[list[list[int]], list[int]]:
    reqs = [Request(id=i, prompt_ids=p, params=params, max_tokens=max_tokens, ignore_eos=True) for i, p in enumerate(prompts)]
    results = list(engine.iter_results(reqs, batch_size=1))
    return [r.generated_ids for r in results], [r.cached_tokens for r in results]


def assert_cached_equals_uncached(engine: Engine, vocab: int, shared: int = 40, max_tokens: int = 6, kinds=(GREEDY, SEEDED)) -> list[list[int]]:
    """Two prompts sharing `shared` tokens, then a second turn (prompt + reply + more), with and without the cache."""
    on = engine.prefix_cache
    off = PrefixCache(on.root, 0)
    prefix, ends = _prompts(vocab, shared)
    first = [prefix + t for t in ends]
    greedy = None
    for params in kinds:
        on.clear()
        engine.prefix_cache = off
        expected, none = _run(engine, first, params, max_tokens)
        turn = [first[0] + expected[0] + ends[1]]  # the next turn: the first prompt, its reply and more
        expected2, _ = _run(engine, turn, params, max_tokens)
        engine.prefix_cache = on
        got, cached = _run(engine, first, params, max_tokens)
        got2, cached2 = _run(engine, turn, params, max_tokens)
        assert none == [0, 0] and cached == [0, shared // BLOCK_SIZE * BLOCK_SIZE]
        # the reply's blocks were decoded one token at a time, not prefilled: reused all the same
        assert cached2 == [(len(first[0]) + max_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE] and cached2[0] > shared
        assert got == expected and got2 == expected2, params
        greedy = greedy or got
    return greedy


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("prefix-llama"))


def test_cached_equals_uncached_tiny_llama_and_transformers(tiny_llama):
    engine = Engine(tiny_llama)
    got = assert_cached_equals_uncached(engine, 300)
    prefix, ends = _prompts(300, 40)
    ref = load_reference(tiny_llama)
    for prompt, ids in zip([prefix + t for t in ends], got):
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(prompt) :].tolist()
        assert ids == expected


def test_cached_equals_uncached_gemma3_sliding_window(tmp_path):
    """Window 6: the cached blocks lie wholly outside the local layers' window, but inside the global one's."""
    engine = Engine(make_tiny("gemma3", tmp_path / "gemma3"))
    assert engine.loaded.module.specs[0].window == 6 < BLOCK_SIZE
    assert_cached_equals_uncached(engine, 300)


def test_cached_equals_uncached_quantized_gguf(tmp_path):
    from tests.test_formats import _tiny_gguf

    engine = Engine(_tiny_gguf(tmp_path, "Q4_K")[0])
    assert_cached_equals_uncached(engine, 300)


def test_cached_equals_uncached_smollm2_q4_1(smollm2_gguf):
    engine = Engine(smollm2_gguf)
    assert_cached_equals_uncached(engine, 49152, max_tokens=4, kinds=(GREEDY,))  # greedy only: a real model's steps cost CI seconds


def test_echo_and_a_disabled_cache_compute_the_whole_prompt(tiny_llama):
    engine = Engine(tiny_llama, prefix_cache_mb=0)
    assert not engine.prefix_cache.enabled
    prefix, ends = _prompts(300, 40)
    assert _run(engine, [prefix + ends[0], prefix + ends[1]], GREEDY, 2)[1] == [0, 0]
    engine = Engine(tiny_llama)
    _run(engine, [prefix + ends[0]], GREEDY, 2)
    req = Request(id=0, prompt_ids=prefix + ends[1], max_tokens=2, echo=True, params=SamplingParams(logprobs=0))
    result = engine.generate(req)
    assert result.cached_tokens == 0 and len(result.prompt_logprobs) == len(prefix) + 9


# ---------------------------------------------------------------- the API, /metrics and generate


def test_cached_tokens_in_usage_streamed_usage_and_metrics(tiny_llama):
    openai = pytest.importorskip("openai")
    from llmcli.engine.service import EngineService
    from llmcli.server import make_app
    from tests.test_serve_load import LiveServer

    live = LiveServer(make_app(EngineService(Engine(tiny_llama), batch_size=2), model_name="tiny"))
    try:
        client = openai.OpenAI(base_url=live.base + "/v1", api_key="unused", max_retries=0)
        system = "You are a careful assistant. " * 8
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "hello there"}]
        first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
        again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        prompt = first.usage.prompt_tokens
        assert again.usage.prompt_tokens_details.cached_tokens == (prompt - 1) // BLOCK_SIZE * BLOCK_SIZE > 0
        assert again.choices[0].message.content == first.choices[0].message.content
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens
        text = system + "and then"
        plain = client.completions.create(model="tiny", prompt=text, max_tokens=3, temperature=0)
        both = client.completions.create(model="tiny", prompt=[text, text + " more"], max_tokens=3, temperature=0)
        assert plain.usage.prompt_tokens_details.cached_tokens == 0
        n = plain.usage.prompt_tokens
        assert both.usage.prompt_tokens_details.cached_tokens == 2 * ((n - 1) // BLOCK_SIZE * BLOCK_SIZE)
        assert both.choices[0].text == plain.choices[0].text
        import httpx

        metrics = {}
        for line in httpx.get(live.base + "/metrics").text.splitlines():
            if line.startswith("llmcli_prefix_cache"):
                name, _, value = line.rpartition(" ")
                metrics[name] = float(value)
        hits = 2 * again.usage.prompt_tokens_details.cached_tokens + both.usage.prompt_tokens_details.cached_tokens
        queries = 3 * prompt + plain.usage.prompt_tokens + both.usage.prompt_tokens
        assert metrics["llmcli_prefix_cache_hits_total"] == hits and metrics["llmcli_prefix_cache_queries_total"] == queries
        assert metrics["llmcli_prefix_cache_hit_rate"] == pytest.approx(hits / queries, rel=1e-5)
        assert metrics["llmcli_prefix_cache_bytes"] == live.state.service.engine.prefix_cache.bytes_used > 0
        assert metrics["llmcli_prefix_cache_capacity_bytes"] == 256 * 2**20  # bytes printed whole, not as 2.68435e+08
    finally:
        live.stop()


def test_generate_records_carry_cached_tokens(tiny_llama, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llmcli.cli import app

    prefix, ends = _prompts(300, 40, tails=3)
    lines = "".join(json.dumps({"id": i, "ids": prefix + t}) + "\n" for i, t in enumerate(ends))
    runner = CliRunner()
    outs = {}
    for mb in ("256", "0"):
        result = runner.invoke(app, ["generate", "-m", str(tiny_llama), "-n", "3", "--batch-size", "1", "--prefix-cache-mb", mb], input=lines)
        assert result.exit_code == 0, result.output
        outs[mb] = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["cached_tokens"] for r in outs["256"]] == [0, 32, 32]
    assert [r["cached_tokens"] for r in outs["0"]] == [0, 0, 0]
    assert [r["generated_ids"] for r in outs["256"]] == [r["generated_ids"] for r in outs["0"]]
    bad = runner.invoke(app, ["generate", "-m", str(tiny_llama), "--prefix-cache-mb", "-1"], input=lines)
    assert bad.exit_code == 2 and "--prefix-cache-mb" in bad.output
