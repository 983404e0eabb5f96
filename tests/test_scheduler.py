"""The scheduler (engine/scheduler.py) and the packed forward it runs (Decoder.forward_packed).

Batch invariance is the promise under test: a request's tokens, and the logits each token was
chosen from, are the same bits whatever else shares its steps and however its prompt was chunked
(token budget 8 vs 512, alone vs with five other requests of other lengths, arriving at other
steps). The logits are taken where the batcher samples from them (`_choose`), so every path is
covered: chunked prefill, mixed steps and pure decode steps (the native block step on llama
shapes). Independent reference: transformers' logits for the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from llmcli.core.generate import Request
from llmcli.core.loader import load_model
from llmcli.core.sampling import SamplingParams
from llmcli.engine.batcher import ContinuousBatcher
from llmcli.engine.scheduler import Scheduler
from tests.tiny import load_reference, make_tiny

# ---------------------------------------------------------------- the policy, without a model


@dataclass
class _Seq:
    name: str
    prompt_left: int
    admitted: int

    @property
    def decoding(self) -> bool:
        return self.prompt_left == 0


def test_plan_puts_decode_tokens_first_then_prompt_chunks_in_arrival_order():
    running = [_Seq("late", 50, admitted=2), _Seq("d1", 0, 0), _Seq("early", 30, admitted=1), _Seq("d2", 0, 3)]
    plan = Scheduler(40).plan(running, [100, 5], free_rows=2)
    assert [s.name for s in plan.decode] == ["d1", "d2"]
    # 38 tokens left after the decodes: the earlier admission's whole 30, then 8 of the later one
    assert [(s.name, n) for s, n in plan.prefill] == [("early", 30), ("late", 8)]
    assert plan.admit == [] and plan.tokens == 40


def test_plan_admits_waiting_requests_into_free_rows_within_the_budget():
    plan = Scheduler(64).plan([_Seq("d", 0, 0)], [20, 30, 40, 1], free_rows=3)
    assert plan.admit == [20, 30, 13]  # the third is split; the fourth has no budget (nor row) left
    assert Scheduler(64).plan([], [5, 5, 5], free_rows=2).admit == [5, 5]  # rows bound admissions


def test_plan_never_holds_back_decode_tokens():
    running = [_Seq(f"d{i}", 0, i) for i in range(6)] + [_Seq("p", 9, 6)]
    plan = Scheduler(4).plan(running, [3], free_rows=1)
    assert len(plan.decode) == 6 and plan.prefill == [] and plan.admit == []


# ---------------------------------------------------------------- batch invariance on real forwards

PROMPT_LENGTHS = (23, 5, 40, 12, 1, 31)


def _requests(vocab: int, max_tokens: int = 6) -> list[Request]:
    g = torch.Generator().manual_seed(7)
    requests = []
    for i, n in enumerate(PROMPT_LENGTHS):
        # greedy and seeded sampling alternate; ignore_eos so every request runs its tokens
        params = SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(temperature=0.9, top_p=0.95, seed=11)
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        requests.append(Request(id=i, prompt_ids=ids, params=params, max_tokens=max_tokens, ignore_eos=True))
    return requests


def _run(loaded, requests: list[Request], batch_size: int, budget: int, arrivals: dict[int, int] | None = None):
    """Every request's generated ids and the logits rows it sampled them from. arrivals: request
    index -> the step before which it is added (default: all before the first)."""
    batcher = ContinuousBatcher(loaded, batch_size=batch_size, max_len=128, max_batched_tokens=budget)
    seen: dict[int, list[torch.Tensor]] = {r.id: [] for r in requests}
    choose = batcher._choose

    def recording(seqs, logits):
        for seq, row in zip(seqs, logits):
            seen[seq.request.id].append(row.clone())
        return choose(seqs, logits)

    batcher._choose = recording
    arrivals = arrivals or {}
    pending = sorted(range(len(requests)), key=lambda i: arrivals.get(i, 0))
    done: dict[int, list[int]] = {}
    step = 0
    while pending or batcher.has_work():
        while pending and arrivals.get(pending[0], 0) <= step:
            batcher.add(requests[pending.pop(0)])
        for event in batcher.step():
            if event.finish_reason is not None:
                done[event.request.id] = event.generated_ids
        step += 1
    return {i: (done[i], torch.stack(seen[i])) for i in done}


def _assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert a[i][0] == b[i][0], f"request {i}: tokens differ"
        assert torch.equal(a[i][1], b[i][1]), f"request {i}: logits differ"


def _alone(loaded, requests):
    out = {}
    for r in requests:
        out.update(_run(loaded, [r], batch_size=1, budget=512))
    return out


def _check_invariance(loaded, vocab: int, max_tokens: int = 6):
    requests = _requests(vocab, max_tokens)
    alone = _alone(loaded, requests)
    _assert_same_bits(alone, _run(loaded, requests, batch_size=6, budget=8))  # all at once, prompts in chunks of <= 8
    _assert_same_bits(alone, _run(loaded, requests, batch_size=3, budget=512, arrivals={1: 2, 3: 3, 4: 5, 5: 7}))
    return requests, alone


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sched")
    return {kind: make_tiny(kind, root / kind) for kind in ("llama", "gemma3")}


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_tokens_and_logits_do_not_depend_on_the_schedule_and_match_transformers(tiny_dirs, kind):
    """llama: the native block step decodes when a step is pure decode, the torch blocks otherwise;
    gemma3: sliding local layers (window 6) and global ones, another query scale, no native step."""
    loaded = load_model(tiny_dirs[kind])
    requests, alone = _check_invariance(loaded, loaded.config.vocab_size)
    ref = load_reference(tiny_dirs[kind])
    worst = 0.0
    for r in requests:
        ids, logits = alone[r.id]
        with torch.no_grad():
            theirs = ref(torch.tensor([r.prompt_ids + ids])).logits[0]  # (T, V)
        at = torch.arange(len(r.prompt_ids) - 1, len(r.prompt_ids) - 1 + logits.shape[0])
        worst = max(worst, float((theirs[at] - logits).abs().max()))
    assert worst <= 1e-4


def test_quantized_gguf_blocks_are_batch_invariant(tiny_dirs, tmp_path):
    from llmcli.core.gguf_write import preset, read_source, write_gguf

    for kind in ("Q4_0", "Q8_0"):
        path = tmp_path / f"tiny-{kind}.gguf"
        write_gguf(read_source(tiny_dirs["llama"]), path, preset(kind))
        loaded = load_model(path)
        assert {type(m).__name__ for m in loaded.module.modules()} >= {"BlockLinear"}
        _check_invariance(loaded, loaded.config.vocab_size)


def test_smollm2_q4_1_is_batch_invariant(smollm2_loaded):
    """The real default model (Q4_1 blocks, 8-bit activations, 30 layers): budgets 8 and 512, alone
    and with five others arriving at other steps; the pure decode steps run the native block step."""
    _check_invariance(smollm2_loaded, 20000, max_tokens=4)


def test_a_long_prompt_is_split_and_running_streams_keep_decoding(tiny_dirs):
    loaded = load_model(tiny_dirs["llama"])
    batcher = ContinuousBatcher(loaded, batch_size=2, max_len=128, max_batched_tokens=16)
    short = Request(id="short", prompt_ids=[5, 6, 7], max_tokens=20, ignore_eos=True)
    batcher.add(short)
    assert [e.request.id for e in batcher.step()] == ["short"]  # its whole prompt and first token
    batcher.add(Request(id="long", prompt_ids=list(range(3, 63)), max_tokens=2, ignore_eos=True))
    firsts = []
    for _ in range(4):  # 60 prompt tokens at 15 per step (the budget less short's decode token)
        events = batcher.step()
        assert [e.request.id for e in events if e.request.id == "short"] == ["short"]  # never stalls
        firsts += [e for e in events if e.request.id == "long"]
        assert int(batcher.cache.lengths[1]) == min(60, 15 * (_ + 1))
    assert len(firsts) == 1  # the long prompt's first token comes with its last chunk


def test_max_batched_tokens_flag_chunks_echo_prompts_with_the_same_records(tiny_dirs, capsys, monkeypatch):
    """`generate --max-batched-tokens 2` splits every prompt into 2-token chunks: the records,
    prompt logprobs (--echo, gathered over the chunks) included, equal the default budget's."""
    from typer.testing import CliRunner

    from llmcli.cli import app
    from tests.test_generate_flags import fails

    model = str(tiny_dirs["llama"])
    for command in ("generate", "chat", "serve"):
        code, err = fails(capsys, monkeypatch, [command, "-m", model, "--max-batched-tokens", "0"])
        assert code == 2 and err.startswith("error: --max-batched-tokens must be at least 1"), err
    lines = "".join(json.dumps({"id": i, "ids": list(range(5, 5 + n))}) + "\n" for i, n in enumerate((7, 2, 11)))

    def records(*flags):
        args = ["generate", "-m", model, "-n", "4", "--echo", "--logprobs", "2", "--seed", "3", "--temperature", "0.8", *flags]
        result = CliRunner().invoke(app, args, input=lines, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines()]

    chunked = records("--max-batched-tokens", "2")
    assert chunked == records()
    assert [len(r["prompt_logprobs"]) for r in chunked] == [7, 2, 11]
