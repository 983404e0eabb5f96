"""Sampling: each filter and the chain against distributions worked out here from the definitions
(plain Python math), against transformers' own logits processors, per-row settings in one batch,
per-record generators, a chi-square fit of drawn tokens, logprobs and validation."""

from __future__ import annotations

import math
import os

import pytest
import torch
from scipy.stats import chisquare

from llmcli.core import sampling
from llmcli.core.sampling import SamplingParams
from llmcli.errors import UsageError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NEG = float("-inf")


# ---------------------------------------------------------------- plain-Python references


def softmax(xs: list[float]) -> list[float]:
    finite = [x for x in xs if x != NEG]
    m = max(finite)
    es = [math.exp(x - m) if x != NEG else 0.0 for x in xs]
    total = sum(es)
    return [e / total for e in es]


def keep_only(probs: list[float], keep: set[int]) -> list[float]:
    total = sum(p for i, p in enumerate(probs) if i in keep)
    return [p / total if i in keep else 0.0 for i, p in enumerate(probs)]


def row(values: list[float]) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64)


def close(got: torch.Tensor, expected: list[float], tol: float = 1e-9) -> None:
    assert got.shape[-1] == len(expected)
    for g, e in zip(got.reshape(-1).tolist(), expected):
        assert math.isclose(g, e, rel_tol=0, abs_tol=tol), (got.tolist(), expected)


# Six tokens with round probabilities; logits are their logs, so softmax gives them back.
P6 = [0.05, 0.40, 0.10, 0.25, 0.15, 0.05]
L6 = [math.log(p) for p in P6]


# ---------------------------------------------------------------- each filter alone


def test_temperature_alone():
    logits = [2.0, 1.0, 0.5, 0.0, -1.0, 3.0]
    t = 0.5
    expected = softmax([x / t for x in logits])
    close(sampling.logits_to_probs(row(logits), temperature=t), expected)


def test_temperature_one_and_no_filters_is_softmax():
    close(sampling.logits_to_probs(row(L6), temperature=1.0), P6)


def test_top_k_alone():
    # k=2 keeps the two most likely tokens: ids 1 (0.40) and 3 (0.25)
    expected = [0, 0.40 / 0.65, 0, 0.25 / 0.65, 0, 0]
    close(sampling.logits_to_probs(row(L6), temperature=1.0, top_k=2), expected)


def test_top_k_keeps_ties_at_the_boundary():
    # the 2nd largest logit (2.0) is shared by ids 2 and 3: both stay, as in HF and vLLM
    logits = [1.0, 3.0, 2.0, 2.0, 0.0, -1.0]
    e3, e2 = math.exp(3.0), math.exp(2.0)
    total = e3 + 2 * e2
    expected = [0, e3 / total, e2 / total, e2 / total, 0, 0]
    close(sampling.logits_to_probs(row(logits), temperature=1.0, top_k=2), expected)


def test_top_k_larger_than_vocab_is_no_filter():
    close(sampling.logits_to_probs(row(L6), temperature=1.0, top_k=100), P6)


def test_top_p_alone():
    # sorted: 0.40, 0.25, 0.15, 0.10, ... ; mass above each: 0, 0.40, 0.65, 0.80
    # p = 0.7 keeps ranks whose mass above is < 0.7: ids 1, 3, 4 (0.80 total)
    expected = [0, 0.40 / 0.80, 0, 0.25 / 0.80, 0.15 / 0.80, 0]
    close(sampling.logits_to_probs(row(L6), temperature=1.0, top_p=0.7), expected)


def test_top_p_keeps_at_least_the_top_token():
    close(sampling.logits_to_probs(row(L6), temperature=1.0, top_p=0.01), [0, 1, 0, 0, 0, 0])


def test_min_p_alone():
    # threshold 0.5 x 0.40 = 0.20: ids 1 (0.40) and 3 (0.25) stay
    expected = [0, 0.40 / 0.65, 0, 0.25 / 0.65, 0, 0]
    close(sampling.logits_to_probs(row(L6), temperature=1.0, min_p=0.5), expected)
    # threshold 0.3 x 0.40 = 0.12: 0.15 stays too, 0.10 goes
    expected = [0, 0.40 / 0.80, 0, 0.25 / 0.80, 0.15 / 0.80, 0]
    close(sampling.logits_to_probs(row(L6), temperature=1.0, min_p=0.3), expected)


def test_logit_bias_alone():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    out = sampling.apply_logit_bias(logits, [{0: 5.0, 3: -100.0}])
    assert out.tolist() == [[5.0, 1.0, 2.0, float("-inf")]]  # -100 bans (OpenAI), whatever the logit
    assert logits.tolist() == [[0.0, 1.0, 2.0, 3.0]]  # inputs are not modified


@pytest.mark.parametrize("value", [2147483904.0, -3.4e38])
def test_a_100_ban_holds_at_any_logit_size(value):
    """Found by tests/test_properties.py: at 2^31 a float32 -100 is below the spacing of the logits,
    and at -3.4e38 a temperature of 0.5 overflows every logit to -inf (a uniform fallback): the
    banned token kept 1/V of the mass in both."""
    logits = torch.full((1, 8), value)
    params = [sampling.SamplingParams(temperature=0.5, logit_bias={0: -100.0})]
    probs = sampling.process_logits(logits, params, [[]], [[]])
    assert float(probs[0, 0]) == 0.0
    torch.testing.assert_close(probs[0, 1:], torch.full((7,), 1 / 7))


def test_logit_bias_outside_vocab_is_a_usage_error():
    with pytest.raises(UsageError) as info:
        sampling.apply_logit_bias(torch.zeros(1, 4), [{4: 1.0}])
    assert info.value.hint


def test_repetition_penalty_hf_semantics():
    logits = [2.0, -1.0, 0.5, -2.0, 1.0, 0.0]
    prompt_ids, generated_ids = [0, 1], [2, 2]
    pen = 2.0
    seen = set(prompt_ids) | set(generated_ids)
    expected = [(x / pen if x > 0 else x * pen) if i in seen else x for i, x in enumerate(logits)]
    got = sampling.apply_penalties(row(logits), [generated_ids], [prompt_ids], repetition_penalty=pen)
    close(got, expected)


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=g)
    history = torch.randint(0, 40, (3, 12), generator=g)  # prompt + generated, as HF sees them
    prompt, generated = history[:, :7], history[:, 7:]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    got = sampling.apply_penalties(logits, generated.tolist(), prompt.tolist(), repetition_penalty=1.3)
    torch.testing.assert_close(got, expected)


def test_presence_and_frequency_penalties_openai_semantics():
    logits = [1.0, 2.0, 3.0, 0.5, -1.0, 0.0]
    prompt_ids, generated_ids = [0, 5], [2, 2, 4]
    presence, frequency = 0.5, 0.3
    expected = list(logits)
    for tok in set(generated_ids):  # prompt tokens are not penalised
        expected[tok] -= frequency * generated_ids.count(tok) + presence
    got = sampling.apply_penalties(row(logits), [generated_ids], [prompt_ids], presence_penalty=presence, frequency_penalty=frequency)
    close(got, expected)


def test_penalties_accept_counts_and_masks_like_id_lists():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 10, generator=g)
    generated = [[1, 1, 4], [7]]
    prompt = [[0, 4], [2, 3]]
    counts = sampling.count_tokens(generated, 10)
    mask = sampling.count_tokens(prompt, 10) > 0
    assert counts[0, 1] == 2 and counts[0, 4] == 1 and counts[1, 7] == 1 and int(counts.sum()) == 4
    kwargs = dict(repetition_penalty=[1.5, 0.8], presence_penalty=[0.2, -0.4], frequency_penalty=[0.1, 1.0])
    a = sampling.apply_penalties(logits, generated, prompt, **kwargs)
    b = sampling.apply_penalties(logits, counts, mask, **kwargs)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- the chain


def test_chain_in_documented_order_by_hand():
    # logit bias -> repetition -> frequency/presence -> temperature -> top-k -> top-p -> min-p
    logits = [1.0, 2.0, 0.5, 1.5, -0.5, 0.8, 0.0, 1.2]
    bias = {6: 1.9}
    prompt_ids, generated_ids = [1, 3], [3, 5, 5]
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.3, repetition_penalty=1.25, presence_penalty=0.1, frequency_penalty=0.2, logit_bias=bias)

    x = list(logits)
    for tok, b in bias.items():
        x[tok] += b
    for tok in set(prompt_ids) | set(generated_ids):
        x[tok] = x[tok] / 1.25 if x[tok] > 0 else x[tok] * 1.25
    for tok in set(generated_ids):
        x[tok] -= 0.2 * generated_ids.count(tok) + 0.1
    x = [v / 0.7 for v in x]
    kth = sorted(x, reverse=True)[4]
    keep = {i for i, v in enumerate(x) if v >= kth}
    probs = keep_only(softmax(x), keep)
    ranked = sorted(keep, key=lambda i: -probs[i])
    above, top_p_keep = 0.0, set()
    for i in ranked:
        if above < 0.8:
            top_p_keep.add(i)
        above += probs[i]
    probs = keep_only(probs, top_p_keep)
    top = max(probs)
    probs = keep_only(probs, {i for i, p in enumerate(probs) if p >= 0.3 * top})
    assert 1 < sum(p > 0 for p in probs) < 5  # the example exercises every filter

    got = sampling.process_logits(row(logits), [params], [generated_ids], [prompt_ids])
    close(got, probs)


def test_top_k_comes_before_top_p():
    # top-k=3 keeps ids 1, 3, 4 (0.80 of the mass); top-p then sees 0.5, 0.3125, 0.1875 and at
    # p = 0.7 stops after two. (top-p first would keep all three.)
    expected = [0, 0.40 / 0.65, 0, 0.25 / 0.65, 0, 0]
    close(sampling.logits_to_probs(row(L6), temperature=1.0, top_k=3, top_p=0.7), expected)


def test_logit_bias_comes_before_the_repetition_penalty():
    # bias first: 1.0 - 2.0 = -1.0, a negative logit, multiplied by the penalty: -2.0
    # (penalty first would give 1.0 / 2 - 2.0 = -1.5)
    params = SamplingParams(temperature=1.0, repetition_penalty=2.0, logit_bias={0: -2.0})
    logits = [1.0, 0.0, 0.5]
    got = sampling.process_logits(row(logits), [params], [[0]])
    close(got, softmax([-2.0, 0.0, 0.5]))


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 64, generator=g, dtype=torch.float64) * 3
    for temp, k, p, mp in [(0.8, 20, 0.9, 0.05), (1.3, 0, 0.7, 0.0), (0.5, 7, 1.0, 0.2), (1.0, 30, 0.95, 0.1), (2.0, 4, 0.6, 0.0), (3.0, 10, 0.5, 0.3)]:
        ids = torch.zeros(6, 1, dtype=torch.long)
        ref = TemperatureLogitsWarper(temp)(ids, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(ids, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(ids, ref)
        if mp:
            ref = MinPLogitsWarper(mp)(ids, ref)
        expected = torch.softmax(ref, dim=-1)
        got = sampling.logits_to_probs(logits, temperature=temp, top_k=k, top_p=p, min_p=mp)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
        assert torch.equal(got > 0, expected > 0)


def test_per_row_settings_in_one_batch_equal_each_row_alone():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 32, generator=g)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.9, top_k=10),
        SamplingParams(temperature=1.2, top_p=0.8, repetition_penalty=1.3),
        SamplingParams(temperature=0.6, min_p=0.1, presence_penalty=0.5, frequency_penalty=0.4, logit_bias={4: 3.0}),
        SamplingParams(temperature=1.0, top_k=8, top_p=0.9, min_p=0.05, logit_bias={0: -100.0}),
    ]
    generated = [[1, 2, 2], [], [5, 6, 5, 5], [4, 4], [0]]
    prompt = [[3], [7, 8], [9], [], [10, 11]]
    batched = sampling.process_logits(logits, params, generated, prompt)
    for i in range(5):
        alone = sampling.process_logits(logits[i : i + 1], [params[i]], [generated[i]], [prompt[i]])
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-7, rtol=0)
    # and drawing: each row's token equals the token it draws alone with the same stream
    chosen = sampling.sample(batched, [sampling.make_generator(7, i) for i in range(5)], params)
    for i in range(5):
        alone = sampling.sample(batched[i : i + 1], [sampling.make_generator(7, i)], [params[i]])
        assert int(chosen[i]) == int(alone[0])


# ---------------------------------------------------------------- greedy


def test_greedy_takes_argmax_lowest_id_on_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [0.0, -1.0, 2.0, 2.0]])
    params = [SamplingParams(temperature=0.0, top_k=1, top_p=0.1)] * 3  # filters are ignored when greedy
    probs = sampling.process_logits(logits, params, [[], [], []])
    assert probs.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]]
    gens = [sampling.make_generator(1, i) for i in range(3)]
    states = [g.get_state() for g in gens]
    assert sampling.sample(probs, gens, params).tolist() == [1, 0, 2]
    assert sampling.sample(probs, [None] * 3).tolist() == [1, 0, 2]  # no params: one-hot rows are greedy
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))  # greedy draws no random numbers


def test_greedy_sees_bias_and_penalties():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    probs = sampling.process_logits(logits, [SamplingParams(repetition_penalty=1.5)], [[0]])
    assert probs.tolist() == [[0, 1, 0]]  # 2.0 / 1.5 < 1.9
    probs = sampling.process_logits(logits, [SamplingParams(logit_bias={2: 3.0})], [[]])
    assert probs.tolist() == [[0, 0, 1]]


# ---------------------------------------------------------------- generators


def draws(seed, record_id, steps=30, sample_index=0):
    probs = torch.full((1, 50), 1 / 50)
    g = sampling.make_generator(seed, record_id, sample_index)
    return [int(sampling.sample(probs, [g])[0]) for _ in range(steps)]


def test_make_generator_reproducible_and_distinct():
    assert sampling.make_generator(None, 1) is None
    assert draws(42, "a") == draws(42, "a")
    assert draws(42, "a") != draws(42, "b")
    assert draws(42, "a") != draws(43, "a")
    assert draws(42, 1) != draws(42, "1")
    assert draws(42, "a", sample_index=1) != draws(42, "a")


def test_make_generator_seed_is_sha256_of_seed_and_id():
    import hashlib

    digest = hashlib.sha256(b'42:"rec-7"').digest()
    expected = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))
    assert torch.equal(sampling.make_generator(42, "rec-7").get_state(), expected.get_state())


def test_seeded_tokens_do_not_depend_on_batch_order_or_company():
    g = torch.Generator().manual_seed(4)
    logits = {rid: torch.randn(20, 40, generator=g) for rid in ["a", "b", "c", "d"]}  # 20 steps each
    params = SamplingParams(temperature=1.0, top_k=20)

    def run(order):
        gens = {rid: sampling.make_generator(123, rid) for rid in order}
        out = {rid: [] for rid in order}
        for step in range(20):
            batch = torch.stack([logits[rid][step] for rid in order])
            probs = sampling.process_logits(batch, [params] * len(order), [[]] * len(order))
            tokens = sampling.sample(probs, [gens[rid] for rid in order], [params] * len(order))
            for rid, tok in zip(order, tokens.tolist()):
                out[rid].append(tok)
        return out

    full = run(["a", "b", "c", "d"])
    assert run(["d", "c", "b", "a"]) == full
    assert run(["c", "a"]) == {"c": full["c"], "a": full["a"]}
    assert run(["b"]) == {"b": full["b"]}
    assert len({tuple(v) for v in full.values()}) == 4


# ---------------------------------------------------------------- statistics


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = [2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.5, 1.8]
    temp, k, p, mp = 0.8, 6, 0.9, 0.12
    # expected, from the definitions
    x = [v / temp for v in logits]
    kth = sorted(x, reverse=True)[k - 1]
    probs = keep_only(softmax(x), {i for i, v in enumerate(x) if v >= kth})
    above, kept = 0.0, set()
    for i in sorted(range(len(x)), key=lambda i: -probs[i]):
        if probs[i] > 0 and above < p:
            kept.add(i)
        above += probs[i]
    probs = keep_only(probs, kept)
    probs = keep_only(probs, {i for i, q in enumerate(probs) if q >= mp * max(probs)})
    support = [i for i, q in enumerate(probs) if q > 0]
    assert 2 < len(support) < k  # every filter cut something

    n = 20000
    params = SamplingParams(temperature=temp, top_k=k, top_p=p, min_p=mp, seed=2024)
    got = sampling.process_logits(torch.tensor([logits] * n), [params] * n, [[]] * n)
    g = sampling.make_generator(params.seed, "chi-square")
    tokens = sampling.sample(got, [g] * n, [params] * n)
    counts = torch.bincount(tokens, minlength=len(logits)).tolist()
    assert all(counts[i] == 0 for i in range(len(logits)) if i not in support)
    observed = [counts[i] for i in support]
    expected = [probs[i] * n for i in support]
    result = chisquare(observed, expected)
    assert result.pvalue > 1e-3, (observed, expected, result)


# ---------------------------------------------------------------- logprobs


def test_logprobs_from_raw_logits():
    logits = [1.0, 3.0, 3.0, 0.0, -1.0, 2.0]
    logz = math.log(sum(math.exp(v) for v in logits))
    entries = sampling.token_logprobs(row(logits), torch.tensor([4]), k=3)
    assert len(entries) == 1
    e = entries[0]
    assert e["id"] == 4
    assert math.isclose(e["logprob"], -1.0 - logz, abs_tol=1e-9)
    assert [t["id"] for t in e["top_logprobs"]] == [1, 2, 5]  # ties: lowest id first
    for t in e["top_logprobs"]:
        assert math.isclose(t["logprob"], logits[t["id"]] - logz, abs_tol=1e-9)
    assert sampling.logprobs is sampling.token_logprobs


def test_logprobs_k_zero_and_k_beyond_vocab_and_inf():
    logits = torch.tensor([[0.0, NEG, 1.0]])
    (e,) = sampling.token_logprobs(logits, [2], k=0)
    assert e["top_logprobs"] == []
    (e,) = sampling.token_logprobs(logits, [1], k=10)
    assert [t["id"] for t in e["top_logprobs"]] == [2, 0, 1]
    assert e["logprob"] == sampling.MIN_LOGPROB and e["top_logprobs"][-1]["logprob"] == sampling.MIN_LOGPROB


def test_logprobs_accept_logprobs_as_input():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 20, generator=g, dtype=torch.float64)
    chosen = torch.tensor([0, 5, 19])
    a = sampling.token_logprobs(logits, chosen, 4)
    b = sampling.token_logprobs(torch.log_softmax(logits, -1), chosen, 4)
    for x, y in zip(a, b):
        assert x["id"] == y["id"] and math.isclose(x["logprob"], y["logprob"], abs_tol=1e-12)
        assert [t["id"] for t in x["top_logprobs"]] == [t["id"] for t in y["top_logprobs"]]


def test_prompt_logprobs_shift_by_one():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 10, generator=g, dtype=torch.float64)
    ids = [3, 1, 4, 1]
    out = sampling.prompt_logprobs(logits, ids, 2)
    assert out[0] is None and len(out) == 4
    for t in range(1, 4):
        lse = math.log(sum(math.exp(v) for v in logits[t - 1].tolist()))
        assert out[t]["id"] == ids[t]
        assert math.isclose(out[t]["logprob"], float(logits[t - 1, ids[t]]) - lse, abs_tol=1e-9)
        assert len(out[t]["top_logprobs"]) == 2


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"temperature": "hot"},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": -0.1},
        {"min_p": 1.1},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"logit_bias": {"x": 1.0}},
        {"logit_bias": {-1: 1.0}},
        {"logit_bias": {5: 150.0}},
        {"logit_bias": [1, 2]},
        {"seed": 1.5},
        {"logprobs": -1},
        {"logprobs": True},
        {"logprobs": 21},
    ],
)
def test_out_of_range_values_are_usage_errors(kwargs):
    with pytest.raises(UsageError) as info:
        SamplingParams(**kwargs)
    assert info.value.exit_code == 2
    assert info.value.hint


def test_valid_values_pass_and_json_keys_become_ids():
    p = SamplingParams(temperature=0.7, top_k=40, top_p=1.0, min_p=1.0, repetition_penalty=0.9, presence_penalty=-2.0, frequency_penalty=2.0, logit_bias={"42": -100, 7: 100.0}, seed=-5, logprobs=0)
    assert p.logit_bias == {42: -100.0, 7: 100.0}
    assert not p.greedy and SamplingParams().greedy
