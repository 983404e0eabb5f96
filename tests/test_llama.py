"""The Llama family (and Qwen3, which shares its decoder) against transformers on tiny random checkpoints: logits, greedy ids, cache, batch, attention."""

from __future__ import annotations

import pytest
import torch

from llmcli.core.loader import load_model
from llmcli.core.models.base import KVCache
from tests.tiny import load_reference, make_tiny

KINDS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    path = make_tiny(request.param, tmp_path_factory.mktemp(request.param))
    return load_model(path), load_reference(path)


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (1, n), generator=g)


@torch.inference_mode()
def test_logits_match_transformers(pair):
    ours, ref = pair
    ids = prompt(40)
    expected = ref(ids).logits
    got = ours.module(ids).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def greedy_with_cache(ours, ids: torch.Tensor, n: int = 32, cache: KVCache | None = None) -> list[int]:
    """n greedy tokens after ids, one forward per token with the KV cache reused across steps.

    cache: one that already holds all of ids but the last token (e.g. loaded from a saved file);
    the last prompt token is run through it, as the engine does with a cached prompt.
    """
    if cache is None:
        cache = KVCache.for_model(ours.config, 1, ids.shape[1] + n)
        logits = ours.module(ids, cache=cache).logits[0, -1]
    else:
        logits = ours.module(ids[:, -1:], cache=cache).logits[0, -1]
    got = []
    for _ in range(n):
        token = int(torch.argmax(logits))
        got.append(token)
        logits = ours.module(torch.tensor([[token]]), cache=cache).logits[0, -1]
    return got


@torch.inference_mode()
def test_greedy_32_tokens_equal_transformers(pair):
    ours, ref = pair
    ids = prompt(12, seed=2)
    expected = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)[0, 12:].tolist()
    assert greedy_with_cache(ours, ids) == expected


@torch.inference_mode()
def test_cached_step_by_step_equals_full_forward(pair):
    ours, _ = pair
    ids = prompt(30, seed=3)
    full = ours.module(ids).logits[0]
    cache = KVCache.for_model(ours.config, 1, 64)
    head = ours.module(ids[:, :10], cache=cache).logits[0]
    steps = [ours.module(ids[:, i : i + 1], cache=cache).logits[0, 0] for i in range(10, 30)]
    torch.testing.assert_close(torch.cat([head, torch.stack(steps)]), full, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_padded_batch_equals_each_alone(pair):
    ours, _ = pair
    prompts = [prompt(n, seed=10 + n)[0] for n in (5, 17, 11)]
    T = max(len(p) for p in prompts)
    batch = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = p
        mask[i, : len(p)] = 1
    # without a cache (right padding: the causal mask hides the pads from every real position)
    out = ours.module(batch, attention_mask=mask).logits
    # and through the slot cache, then 5 decode steps with rows at different lengths
    cache = KVCache.for_model(ours.config, 3, 64)
    last = ours.module(batch, cache=cache, attention_mask=mask, logits_index=mask.sum(1) - 1).logits  # (3, V)
    for i, p in enumerate(prompts):
        alone = ours.module(p[None]).logits[0]
        torch.testing.assert_close(out[i, : len(p)], alone, atol=1e-4, rtol=0)
        torch.testing.assert_close(last[i], alone[-1], atol=1e-4, rtol=0)
    assert cache.lengths.tolist() == [5, 17, 11]
    tokens = last.argmax(-1)
    seqs = [p.tolist() + [int(t)] for p, t in zip(prompts, tokens)]
    for _ in range(5):
        step = ours.module(tokens[:, None], cache=cache).logits[:, 0]
        tokens = step.argmax(-1)
        for i, s in enumerate(seqs):
            alone = ours.module(torch.tensor([s])).logits[0, -1]
            torch.testing.assert_close(step[i], alone, atol=1e-4, rtol=0)
            s.append(int(tokens[i]))


@torch.inference_mode()
def test_attention_probabilities_and_hidden_states_equal_eager(pair):
    ours, ref = pair
    ids = prompt(16, seed=4)
    expected = ref(ids, output_attentions=True, output_hidden_states=True)
    L = ours.config.num_hidden_layers
    got = ours.module(ids, output_attentions=range(L), output_hidden=range(L + 1))
    for layer in range(L):
        torch.testing.assert_close(got.attentions[layer], expected.attentions[layer], atol=1e-5, rtol=0)
    for layer in range(L + 1):
        torch.testing.assert_close(got.hidden_states[layer], expected.hidden_states[layer], atol=1e-4, rtol=0)
