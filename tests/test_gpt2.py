"""The GPT-2 family against transformers on tiny random checkpoints: logits, greedy ids, cache, batch, attention."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from llmcli.core.config import ModelConfig  # noqa: E402
from llmcli.core.models import gpt2  # noqa: E402
from llmcli.core.models.base import KVCache  # noqa: E402
from llmcli.errors import ContextLengthError  # noqa: E402
from tests.tiny import load_reference, make_tiny  # noqa: E402


def load_ours(path: Path, weights: dict[str, torch.Tensor] | None = None) -> gpt2.Model:
    """Our model from an HF directory: config, safetensors, sanitize, a strict state-dict load."""
    config = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
    model = gpt2.Model(config)
    tensors = load_file(str(path / "model.safetensors")) if weights is None else weights
    model.load_state_dict(gpt2.sanitize(tensors, config), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny("gpt2", tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def pair(tiny_dir):
    return load_ours(tiny_dir), load_reference(tiny_dir)


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (1, n), generator=g)


@torch.inference_mode()
def test_logits_match_transformers(pair):
    ours, ref = pair
    ids = torch.cat([prompt(40), prompt(40, seed=9)])  # (2, 40)
    expected = ref(ids).logits
    got = ours(ids).logits
    assert got.shape == expected.shape == (2, 40, ours.config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_logits_index_gives_the_logits_at_those_positions(pair):
    ours, _ = pair
    ids = torch.cat([prompt(20, seed=5), prompt(20, seed=6)])
    full = ours(ids).logits
    index = torch.tensor([7, 19])
    picked = ours(ids, logits_index=index).logits
    assert picked.shape == (2, ours.config.vocab_size)
    torch.testing.assert_close(picked, full[torch.arange(2), index], atol=1e-5, rtol=0)
    assert ours(ids, compute_logits=False).logits is None


@torch.inference_mode()
def test_greedy_32_tokens_equal_transformers(pair):
    ours, ref = pair
    ids = prompt(12, seed=2)
    # no eos: HF would otherwise stop early or (with min_new_tokens) suppress the eos logit
    config = copy.deepcopy(ref.generation_config)
    config.update(eos_token_id=None, max_new_tokens=32, do_sample=False, pad_token_id=0)
    expected = ref.generate(ids, generation_config=config)[0, 12:].tolist()
    assert len(expected) == 32
    cache = KVCache.for_model(ours.config, 1, 64)
    logits = ours(ids, cache=cache).logits[0, -1]
    got = []
    for _ in range(32):
        token = int(torch.argmax(logits))
        got.append(token)
        logits = ours(torch.tensor([[token]]), cache=cache).logits[0, -1]
    assert got == expected
    assert int(cache.lengths[0]) == 12 + 32


@torch.inference_mode()
def test_cached_step_by_step_equals_full_forward(pair):
    ours, _ = pair
    ids = prompt(30, seed=3)
    full = ours(ids).logits[0]
    cache = KVCache.for_model(ours.config, 1, 64)
    head = ours(ids[:, :10], cache=cache).logits[0]
    chunk = ours(ids[:, 10:16], cache=cache).logits[0]  # a second multi-token chunk: positions 10..15
    steps = [ours(ids[:, i : i + 1], cache=cache).logits[0, 0] for i in range(16, 30)]
    torch.testing.assert_close(torch.cat([head, chunk, torch.stack(steps)]), full, atol=1e-4, rtol=0)


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
    out = ours(batch, attention_mask=mask).logits
    # through the slot cache too, then 5 decode steps with the rows at different lengths
    cache = KVCache.for_model(ours.config, 3, 64)
    last = ours(batch, cache=cache, attention_mask=mask, logits_index=mask.sum(1) - 1).logits  # (3, V)
    for i, p in enumerate(prompts):
        alone = ours(p[None]).logits[0]
        torch.testing.assert_close(out[i, : len(p)], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(last[i], alone[-1], atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [5, 17, 11]
    tokens = last.argmax(-1)
    seqs = [p.tolist() + [int(t)] for p, t in zip(prompts, tokens)]
    for _ in range(5):
        step = ours(tokens[:, None], cache=cache).logits[:, 0]
        tokens = step.argmax(-1)
        for i, s in enumerate(seqs):
            alone = ours(torch.tensor([s])).logits[0, -1]
            torch.testing.assert_close(step[i], alone, atol=1e-4, rtol=0)
            s.append(int(tokens[i]))


@torch.inference_mode()
def test_attention_probabilities_and_hidden_states_equal_eager(pair):
    ours, ref = pair
    ids = prompt(16, seed=4)
    expected = ref(ids, output_attentions=True, output_hidden_states=True)
    L = ours.config.num_hidden_layers
    got = ours(ids, output_attentions=range(L), output_hidden=range(L + 1))
    assert sorted(got.attentions) == list(range(L)) and sorted(got.hidden_states) == list(range(L + 1))
    for layer in range(L):
        torch.testing.assert_close(got.attentions[layer], expected.attentions[layer], atol=1e-5, rtol=0)
    for layer in range(L + 1):
        torch.testing.assert_close(got.hidden_states[layer], expected.hidden_states[layer], atol=1e-4, rtol=0)
    # the eager path (asked for probabilities) gives the same logits as the SDPA path
    torch.testing.assert_close(got.logits, ours(ids).logits, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_attention_probabilities_through_the_cache_equal_eager(pair):
    ours, ref = pair
    ids = prompt(12, seed=8)
    expected = ref(ids, output_attentions=True).attentions
    cache = KVCache.for_model(ours.config, 1, 32)
    ours(ids[:, :8], cache=cache)
    got = ours(ids[:, 8:], cache=cache, output_attentions=(0, 1)).attentions  # queries 8..11 over keys 0..11
    for layer in (0, 1):
        torch.testing.assert_close(got[layer], expected[layer][:, :, 8:], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_inputs_embeds_equal_ids(pair):
    ours, ref = pair
    ids = prompt(15, seed=7)
    embeds = ours.embed(ids)
    torch.testing.assert_close(embeds, ref.transformer.wte(ids), atol=0, rtol=0)  # token embeddings only
    torch.testing.assert_close(ours(inputs_embeds=embeds).logits, ours(ids).logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(inputs_embeds=embeds).logits, ref(inputs_embeds=embeds).logits, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_untied_lm_head_matches_transformers(tmp_path):
    import transformers

    torch.manual_seed(3)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=False)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    assert "lm_head.weight" in load_file(str(tmp_path / "model.safetensors"))
    ours = load_ours(tmp_path)
    assert ours.lm_head is not None
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_bare_gpt2model_checkpoint_with_old_mask_buffers(tmp_path):
    """openai-community/gpt2 style: GPT2Model keys without `transformer.`, plus the mask buffers old saves kept."""
    import transformers

    torch.manual_seed(4)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    ref = transformers.GPT2Model(cfg).eval()
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "wte.weight" in tensors and not any(k.startswith("transformer.") for k in tensors)
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    ours = load_ours(tmp_path, tensors)
    ids = torch.randint(0, 96, (1, 25), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(ids).last_hidden, ref(ids).last_hidden_state, atol=1e-4, rtol=0)
    # tied: the logits are the final states against wte
    torch.testing.assert_close(ours(ids).logits, ref(ids).last_hidden_state @ ref.wte.weight.T, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_meta_build_and_load_state_give_the_same_model(tiny_dir, pair):
    """The shared loader's path: build on the meta device, then weights.load_state assigns the tensors."""
    from llmcli.core import weights

    _, ref = pair
    config = ModelConfig.from_dict(json.loads((tiny_dir / "config.json").read_text()))
    with torch.device("meta"):
        module = gpt2.Model(config)
    weights.load_state(module, gpt2.sanitize(weights.read_safetensors(tiny_dir), config), str(tiny_dir), torch.float32)
    assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    ids = prompt(24, seed=11)
    torch.testing.assert_close(module.eval()(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


def test_too_long_input_is_a_context_length_error(pair):
    ours, _ = pair
    n = ours.config.max_position_embeddings
    with pytest.raises(ContextLengthError):
        ours(torch.zeros(1, n + 1, dtype=torch.long))
    cache = KVCache.for_model(ours.config, 1, n + 8)  # a cache longer than the position table
    with pytest.raises(ContextLengthError):
        ours(torch.zeros(1, n + 1, dtype=torch.long), cache=cache)


def test_sanitize_transposes_conv1d_once(tmp_path):
    """Conv1D (in, out) becomes (out, in) for every projection, including the square c_proj ones."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    ref = transformers.GPT2LMHeadModel(cfg)
    raw = {k: v.clone() for k, v in ref.state_dict().items()}
    config = ModelConfig.from_dict(cfg.to_dict())
    out = gpt2.sanitize(raw, config)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        key = f"transformer.h.0.{name}.weight"
        torch.testing.assert_close(out[key], raw[key].T, atol=0, rtol=0)
    assert "lm_head.weight" not in out  # tied
    save_file(out, str(tmp_path / "x.safetensors"))  # contiguous after the transpose


@torch.inference_mode()
def test_config_without_tie_flag_loads_as_tied(tiny_dir, pair, tmp_path):
    """Older GPT-2 config.json files do not say tie_word_embeddings (HF's default is tied)."""
    _, ref = pair
    raw = json.loads((tiny_dir / "config.json").read_text())
    raw.pop("tie_word_embeddings")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = load_ours(tmp_path, load_file(str(tiny_dir / "model.safetensors")))
    ids = prompt(10, seed=12)
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
