"""The generation engine: batch invariance, continuous admission, stops, logprobs, streaming text."""

from __future__ import annotations

import pytest
import torch

from llmcli.core.generate import Request
from llmcli.core.sampling import SamplingParams
from llmcli.engine import Engine
from tests.tiny import load_reference, make_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("engine-llama"))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(tiny_dir)


def prompts(n: int = 16) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 300, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def run(engine, reqs, batch_size):
    return [(r.generated_ids, r.finish_reason) for r in engine.iter_results(reqs, batch_size=batch_size)]


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.95, seed=123)], ids=["greedy", "seeded"])
def test_results_do_not_depend_on_batch_size(engine, params):
    ps = prompts()
    def make():
        return [Request(id=i, prompt_ids=p, params=params, max_tokens=4 + (i % 5) * 3, ignore_eos=True) for i, p in enumerate(ps)]
    one = run(engine, make(), 1)
    assert run(engine, make(), 4) == one
    assert run(engine, make(), 16) == one
    assert all(len(ids) == 4 + (i % 5) * 3 for i, (ids, _) in enumerate(one))


@pytest.mark.parametrize("source", ["hf q8_0", "hf q4_1", "gguf Q4_K", "gguf Q6_K"])
def test_quantized_results_do_not_depend_on_batch_size(source, tiny_dir, tmp_path):
    """The same for weights in GGML blocks (issue 13, item 3): --quantize at load, and K-quant GGUFs."""
    kind, name = source.split()
    if kind == "hf":
        engine = Engine(tiny_dir, quantize=name)
    else:
        from tests.test_formats import _tiny_gguf

        engine = Engine(_tiny_gguf(tmp_path, name)[0])
    ps = prompts(12)

    def make():
        return [Request(id=i, prompt_ids=p, max_tokens=3 + (i % 4) * 3, ignore_eos=True) for i, p in enumerate(ps)]

    one = run(engine, make(), 1)
    assert run(engine, make(), 5) == one
    assert run(engine, make(), 12) == one


def test_greedy_equals_transformers_generate(engine, tiny_dir):
    ref = load_reference(tiny_dir)
    for i, p in enumerate(prompts(4)):
        expected = ref.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(p) :].tolist()
        got = engine.generate(Request(id=i, prompt_ids=p, max_tokens=12, ignore_eos=True))
        assert got.generated_ids == expected


def test_results_come_back_in_input_order_with_continuous_admission(engine):
    ps = prompts(6)
    # long first request, short later ones: the short ones finish first but are yielded after it
    reqs = [Request(id=i, prompt_ids=p, max_tokens=30 if i == 0 else 3, ignore_eos=True) for i, p in enumerate(ps)]
    finished_order = []
    results = list(engine.iter_results(reqs, batch_size=2, on_event=lambda e: e.finish_reason and finished_order.append(e.request.id)))
    assert [r.request.id for r in results] == list(range(6))
    assert finished_order[-1] == 0  # request 0 was still running while rows were refilled around it


def test_logprobs_equal_log_softmax_of_transformers(engine, tiny_dir):
    ref = load_reference(tiny_dir)
    p = prompts(1)[0]
    result = engine.generate(Request(id=0, prompt_ids=p, max_tokens=8, ignore_eos=True, params=SamplingParams(logprobs=3), echo=True))
    full = torch.tensor([p + result.generated_ids])
    with torch.no_grad():
        logp = torch.log_softmax(ref(full).logits[0].float(), dim=-1)
    for k, entry in enumerate(result.logprobs):
        pos = len(p) - 1 + k
        assert entry["id"] == result.generated_ids[k]
        assert abs(entry["logprob"] - float(logp[pos, entry["id"]])) < 1e-4
        top = torch.topk(logp[pos], 3)
        assert [t["id"] for t in entry["top_logprobs"]] == top.indices.tolist()
        for t, v in zip(entry["top_logprobs"], top.values.tolist()):
            assert abs(t["logprob"] - v) < 1e-4
    # prompt logprobs: nothing for the first token, then the logprob of each next prompt token
    assert result.prompt_logprobs[0] is None
    for t in range(1, len(p)):
        assert abs(result.prompt_logprobs[t]["logprob"] - float(logp[t - 1, p[t]])) < 1e-4


@pytest.mark.parametrize("stop", ["s a te", "stop", ".", "never there"])
def test_text_stream_holds_back_stop_strings_across_tokens(smollm2_gguf, stop):
    from llmcli.core.generate import TextStream
    from llmcli.core.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    text = "This is a test of stop strings. 你好 🙂 and more text after it."
    ids = tok.encode(text, add_special=False).ids
    stream = TextStream(tok, [stop])
    emitted, hit = "", False
    for i in ids:
        piece, hit = stream.add(i)
        emitted += piece
        if hit:
            break
        assert stop not in emitted
    if not hit:
        emitted += stream.finish()
    expected = text[: text.index(stop)] if stop in text else text
    assert emitted == expected
    assert hit == (stop in text)
    kept = ids[: stream.tokens_before_stop()]
    assert expected.startswith(tok.decode(kept))


def test_stop_string_in_engine_on_smollm2(smollm2_loaded):
    from llmcli.engine.batcher import ContinuousBatcher

    tok = smollm2_loaded.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]), add_special=False).ids

    def answer(stop):
        b = ContinuousBatcher(smollm2_loaded, batch_size=1, max_len=128)
        b.add(Request(id=0, prompt_ids=prompt, max_tokens=12, stop=stop))
        events = []
        while b.has_work():
            events += b.step()
        return "".join(e.text for e in events), events[-1]

    free, _ = answer([])
    assert len(free) > 12
    stop = free[8:12]  # a piece of the free answer: generation stops at its first occurrence
    text, last = answer([stop])
    assert last.finish_reason == "stop"
    assert text == free[: free.index(stop)]


def test_stop_ids_min_tokens_and_eos(engine):
    p = prompts(1)[0]
    free = engine.generate(Request(id=0, prompt_ids=p, max_tokens=12, ignore_eos=True))
    stop_at = free.generated_ids[5]
    first = free.generated_ids.index(stop_at)
    r = engine.generate(Request(id=0, prompt_ids=p, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_at]))
    assert r.finish_reason == "stop" and r.generated_ids == free.generated_ids[:first]
    r = engine.generate(Request(id=0, prompt_ids=p, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_at], min_tokens=first + 1))
    assert len(r.generated_ids) > first


def test_n_samples_are_distinct_streams_and_reproducible(engine):
    p = prompts(1)[0]
    params = SamplingParams(temperature=1.0, seed=5)
    def reqs():
        return [Request(id="a", prompt_ids=p, params=params, max_tokens=16, ignore_eos=True, sample_index=k) for k in range(3)]
    first = run(engine, reqs(), 3)
    assert first == run(engine, reqs(), 1)
    assert len({tuple(ids) for ids, _ in first}) > 1


def test_streamed_pieces_join_to_decoded_text(engine):
    pieces: dict[int, list[str]] = {}
    reqs = [Request(id=i, prompt_ids=p, max_tokens=24, ignore_eos=True, params=SamplingParams(temperature=1.0, seed=1)) for i, p in enumerate(prompts(5))]
    results = list(engine.iter_results(reqs, batch_size=3, on_event=lambda e: pieces.setdefault(e.request.id, []).append(e.text)))
    for r in results:
        joined = "".join(pieces[r.request.id])
        assert joined == r.text == engine.tokenizer.decode(r.generated_ids)
        assert "\ufffd" not in joined or "\ufffd" in engine.tokenizer.decode(r.generated_ids)


def test_context_overflow_finishes_with_length(tiny_dir):
    small = Engine(tiny_dir, max_context=40)
    r = small.generate(Request(id=0, prompt_ids=list(range(3, 33)), max_tokens=100, ignore_eos=True))
    assert r.finish_reason == "length"
    assert 30 + len(r.generated_ids) <= 40
