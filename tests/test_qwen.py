"""Qwen2 and Qwen3 from HF directories and from GGUF (convert_hf_to_gguf.py's layout) against transformers.

Tiny random checkpoints shaped like the real configs but scaled down (tests/tiny.py): Qwen2 with
q/k/v biases and untied embeddings, Qwen3 with per-head q/k RMSNorm, head_dim 20 != 48/3, GQA and
tied embeddings. Each is loaded as it is saved and as an F32 GGUF and runs test_families' shared
tests: over 64 positions the logits are within 1e-4 of transformers', 32 greedy tokens decoded
with the KV cache (also from an `attend --save-cache` file) are identical, and `attend
--attention` gives transformers' maps.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llmcli.core.loader import load_model
from llmcli.core.weights import read_gguf
from tests.test_families import (  # noqa: F401  (collected here too, on this module's `case`: Qwen2 and Qwen3)
    test_attend_attention_maps_equal_transformers,
    test_greedy_32_tokens_with_the_cache_equal_transformers,
    test_greedy_from_an_attend_cache_saved_and_loaded,
    test_logits_over_64_positions_match_transformers,
)
from tests.test_llama import prompt
from tests.test_weights import write_gguf
from tests.tiny import load_reference, make_tiny

CASES = [("qwen2", "gguf"), ("qwen3", "hf"), ("qwen3", "gguf")]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    made = {}
    for kind in ("qwen2", "qwen3"):
        path = make_tiny(kind, tmp_path_factory.mktemp(kind))
        made[kind] = (path, load_reference(path))
    return made


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def pair(request, references, tmp_path_factory):
    kind, fmt = request.param
    path, ref = references[kind]
    if fmt == "gguf":
        path = write_gguf(tmp_path_factory.mktemp(f"{kind}-gguf") / f"{kind}.gguf", ref, Q.F32, arch=kind)
    return load_model(path), ref


@pytest.fixture(scope="module")
def case(pair):
    """test_families' view of a case: (kind, path, loaded, reference), for the shared tests imported above."""
    ours, ref = pair
    return ours.config.model_type, ours.path, ours, ref


def test_gguf_config_and_names(references, tmp_path):
    """The GGUF reads back under HF names with HF's rows (no llama permutation) and the family's own fields."""
    for kind, (_, ref) in references.items():
        ckpt = read_gguf(write_gguf(tmp_path / f"{kind}.gguf", ref, Q.F32, arch=kind))
        cfg = ckpt.config
        assert cfg.model_type == kind
        assert cfg.head_dim == (getattr(ref.config, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        assert cfg.num_key_value_heads == ref.config.num_key_value_heads
        assert cfg.attention_bias == (kind == "qwen2")
        assert cfg.tie_word_embeddings == ref.config.tie_word_embeddings
        expected = {n: t for n, t in ref.state_dict().items() if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
        assert set(ckpt.tensors) == set(expected)
        for name, t in expected.items():
            assert torch.equal(ckpt.tensors[name], t), name


def test_qwen3_never_takes_the_llama_native_decode_block(pair):
    ours, _ = pair
    if ours.config.model_type == "qwen3":
        assert ours.module.native_decode is False and ours.module._native_blocks() is None


@torch.inference_mode()
def test_qwen3_gguf_loads_the_same_twice_with_a_cache_dir(references, tmp_path):
    """A GGUF keeps the family (q/k norms included) on every load; no weights are cached."""
    _, ref = references["qwen3"]
    path = write_gguf(tmp_path / "qwen3.gguf", ref, Q.F32, arch="qwen3")
    ids = prompt(20, seed=4)
    expected = ref(ids).logits
    first = load_model(path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "weights").exists()
    second = load_model(path, cache_dir=tmp_path / "cache")
    for loaded in (first, second):
        assert loaded.config.model_type == "qwen3"
        assert (loaded.module(ids).logits - expected).abs().max() <= 1e-4


def test_qwen2_q8_0_blocks_keep_hf_rows(references, tmp_path):
    """map_gguf leaves NEOX-rope (qwen2) Q/K rows as they are: the blocks stay views into the file."""
    from llmcli.core.weights import map_gguf

    _, ref = references["qwen2"]
    path = write_gguf(tmp_path / "qwen2-q8.gguf", ref, Q.Q8_0, arch="qwen2")
    plain, mapped = read_gguf(path), map_gguf(path)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert mapped.tensors[name].gtype.name == "Q8_0"
        assert torch.equal(mapped.tensors[name].dequantize(), plain.tensors[name])
        assert (plain.tensors[name] - ref.state_dict()[name]).abs().max() < 0.05  # Q8_0 error, not a row permutation

