"""Gemma 3, Phi-3, Mistral with its sliding window, Llama 3.x rope scaling, GPT-2 and BERT from HF
directories and from GGUF files, against transformers.

Tiny random checkpoints shaped like the real configs (tests/tiny.py): Gemma 3 with head_dim 20 !=
48/3, GQA 3:1, five local layers to one global with a window of 6, a final logit cap and tied
embeddings; Phi-3 with LongRoPE, partial rotary and a window of 20; Mistral with a window of 7.
The GGUFs are written as llama.cpp's convert_hf_to_gguf.py writes them, with gguf-py's own tensor
name map (an independent reference for llmcli's): Gemma's norm weights + 1, GPT-2's Conv1D weights
transposed, llama's Q/K rows permuted, Llama 3's rope factors as rope_freqs.weight, Phi-3's LongRoPE
factors as rope_factors_short/long. Over 64 positions the logits are within 1e-4 of transformers',
32 greedy tokens with the KV cache are identical, also when the prompt's cache was saved by
`attend --save-cache` and loaded again, and `attend --attention` gives transformers' maps.
"""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.core.kvfile import load_prompt_cache
from llmcli.core.loader import load_model
from llmcli.core.models.base import KVCache
from llmcli.core.weights import read_gguf
from llmcli.records import decode_tensor
from tests.test_llama import greedy_with_cache, prompt
from tests.test_weights import llama_cpp_permute
from tests.tiny import load_reference, make_tiny

# tiny kind -> llama.cpp architecture of its GGUF
ARCH = {"gemma3": "gemma3", "phi3": "phi3", "mistral-window": "llama", "llama3": "llama", "gpt2": "gpt2", "bert": "bert"}
CASES = [("gemma3", "hf"), ("gemma3", "gguf"), ("phi3", "hf"), ("phi3", "gguf"), ("mistral-window", "hf"), ("mistral-window", "gguf"), ("llama3", "gguf"), ("gpt2", "gguf")]
# prompt lengths for the greedy test: Phi-3's is past its original context of 32, so every step uses
# the long factors (transformers recomputes its cache where a sequence crosses it; llmcli does not)
GREEDY_PROMPT = {"phi3": 40}

runner = CliRunner()


def _llama3_rope_factors(cfg) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, as written there."""
    params = cfg.rope_parameters
    base, dim = params["rope_theta"], cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high, old = params["factor"], params["low_freq_factor"], params["high_freq_factor"], params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _metadata(w: gguf.GGUFWriter, cfg, arch: str) -> dict[str, np.ndarray]:
    """The converter's key/values for `arch`; returns its extra tensors (GGUF name -> values)."""
    extra: dict[str, np.ndarray] = {}
    w.add_block_count(cfg.num_hidden_layers)
    if arch == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return extra
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    if arch == "bert":
        w.add_layer_norm_eps(cfg.layer_norm_eps)
        w.add_causal_attention(False)
        w.add_token_type_count(cfg.type_vocab_size)
        return extra
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
        w.add_rope_freq_base_swa(cfg.rope_parameters["sliding_attention"]["rope_theta"])
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    elif arch == "phi3":
        params = cfg.rope_parameters
        rot = int(params["partial_rotary_factor"] * cfg.hidden_size) // cfg.num_attention_heads
        original = params["original_max_position_embeddings"]
        scale = cfg.max_position_embeddings / original
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_dimension_count(rot)
        w.add_rope_freq_base(params["rope_theta"])
        w.add_sliding_window(cfg.sliding_window or 0)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0)
        extra["rope_factors_long.weight"] = np.array(params["long_factor"], dtype=np.float32)
        extra["rope_factors_short.weight"] = np.array(params["short_factor"], dtype=np.float32)
    else:  # llama: a Mistral's window under llama.attention.sliding_window, Llama 3's factors as rope_freqs
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_rope_dimension_count(head_dim)
        if getattr(cfg, "sliding_window", None):
            w.add_sliding_window(cfg.sliding_window)
        if (cfg.rope_parameters or {}).get("rope_type") == "llama3":
            extra["rope_freqs.weight"] = _llama3_rope_factors(cfg)
    return extra


def write_family_gguf(path, model, arch: str):
    """An F32 GGUF of a transformers model laid out as convert_hf_to_gguf.py writes `arch`."""
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    extra = _metadata(writer, cfg, arch)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    for key in ("bos", "eos", "pad"):
        if getattr(cfg, f"{key}_token_id", None) is not None:
            getattr(writer, f"add_{key}_token_id")(getattr(cfg, f"{key}_token_id"))
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = t.detach().float().numpy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1.0  # Gemma3Model.norm_shift
        elif arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            w = w.T  # GPT2Model.modify_tensors
        elif arch == "llama" and name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        writer.add_tensor(gname, np.ascontiguousarray(w, dtype=np.float32))
    for gname, values in extra.items():
        writer.add_tensor(gname, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    made = {}
    for kind in ARCH:
        path = make_tiny(kind, tmp_path_factory.mktemp(kind))
        made[kind] = (path, load_reference(path))
    return made


@pytest.fixture(scope="module")
def gguf_files(references, tmp_path_factory):
    return {kind: write_family_gguf(tmp_path_factory.mktemp(f"{kind}-gguf") / f"{kind}.gguf", ref, ARCH[kind]) for kind, (_, ref) in references.items()}


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def case(request, references, gguf_files):
    kind, fmt = request.param
    path, ref = references[kind]
    path = gguf_files[kind] if fmt == "gguf" else path
    return kind, path, load_model(path), ref


def expected_greedy(ref, ids: torch.Tensor) -> list[int]:
    out = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


@torch.inference_mode()
def test_logits_over_64_positions_match_transformers(case):
    _, _, ours, ref = case
    ids = prompt(64)
    expected = ref(ids).logits
    got = ours.module(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4


@torch.inference_mode()
def test_greedy_32_tokens_with_the_cache_equal_transformers(case):
    kind, _, ours, ref = case
    ids = prompt(GREEDY_PROMPT.get(kind, 12), seed=2)
    assert greedy_with_cache(ours, ids) == expected_greedy(ref, ids)


@torch.inference_mode()
def test_greedy_from_an_attend_cache_saved_and_loaded(case, tmp_path):
    """`attend --save-cache` writes the prompt's keys and values; decoding on from them loaded equals transformers."""
    kind, path, ours, ref = case
    ids = prompt(GREEDY_PROMPT.get(kind, 12), seed=3)
    target = tmp_path / "prompt.safetensors"
    result = runner.invoke(app, ["attend", "-m", str(path), "--save-cache", str(target)], input=json.dumps({"ids": ids[0].tolist()}) + "\n")
    assert result.exit_code == 0, (result.exception, result.output)
    k, v, cached_ids = load_prompt_cache(target, ours)
    assert cached_ids == ids[0].tolist()
    cache = KVCache.for_model(ours.config, 1, 96)
    cache.load_row(0, k, v)
    cache.lengths[0] -= 1  # the last prompt token runs again for its logits, as the engine does with a whole cached prompt
    assert greedy_with_cache(ours, ids, cache=cache) == expected_greedy(ref, ids)


def test_attend_attention_maps_equal_transformers(case):
    """Every layer's probabilities, the sliding-window layers' included (window < sequence)."""
    kind, path, _, ref = case
    ids = prompt(23, seed=5)[0].tolist()
    with torch.inference_mode():
        expected = ref(torch.tensor([ids]), output_attentions=True)
    result = runner.invoke(app, ["attend", "-m", str(path), "--attention"], input=json.dumps({"ids": ids}) + "\n")
    assert result.exit_code == 0, (result.exception, result.output)
    attention = decode_tensor(json.loads(result.stdout.splitlines()[0])["attention"])
    want = torch.stack([a[0] for a in expected.attentions]).numpy()
    assert attention.shape == want.shape
    np.testing.assert_allclose(attention, want, atol=2e-5, rtol=0)
    window = getattr(ref.config, "sliding_window", None)
    if window:  # a windowed layer really cut the keys older than its window
        assert np.all(attention[0, :, -1, : 23 - window] == 0)


def test_gguf_config_matches_the_hf_config(references, gguf_files):
    """What config_from_gguf reads back equals what ModelConfig makes of config.json, family fields included."""
    from llmcli.core.loader import read_config

    for kind in ("gemma3", "phi3", "mistral-window"):
        path, _ = references[kind]
        hf, gg = read_config(path), read_gguf(gguf_files[kind]).config
        for field in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "intermediate_size", "sliding_window", "tie_word_embeddings", "rope_theta"):
            assert getattr(gg, field) == getattr(hf, field), (kind, field)
        assert (gg.layer_types or ["full_attention"] * hf.num_hidden_layers) == (hf.layer_types or ["full_attention"] * hf.num_hidden_layers)
        assert gg.args == hf.args, kind


def test_gemma3_layers_are_five_local_to_one_global(references):
    path, _ = references["gemma3"]
    model = load_model(path).module
    assert [s.window for s in model.specs] == [6, 6, 6, 6, 6, None, 6]
    assert [s.rope for s in model.specs] == ["inv_freq_local"] * 5 + ["inv_freq", "inv_freq_local"]
    assert model.native_decode is False


@torch.inference_mode()
def test_bert_from_gguf_equals_transformers(references, gguf_files):
    _, ref = references["bert"]
    ours = load_model(gguf_files["bert"])
    ids = prompt(40)
    mask = torch.ones_like(ids)
    mask[0, 30:] = 0
    expected = ref(ids, attention_mask=mask).last_hidden_state
    got = ours.module(ids, attention_mask=mask).last_hidden
    assert (got[0, :30] - expected[0, :30]).abs().max() <= 1e-4
    assert ours.config.is_encoder and ours.config.type_vocab_size == ref.config.type_vocab_size


def test_unsupported_gguf_values_are_one_line_errors(references, tmp_path):
    """A GGUF value a family does not run names the key and its value."""
    from llmcli.core.models.registry import config_from_gguf
    from llmcli.errors import ModelError

    base = {"general.architecture": "phi3", "phi3.embedding_length": 64, "phi3.attention.head_count": 4, "phi3.block_count": 2, "phi3.feed_forward_length": 128}
    with pytest.raises(ModelError, match=r"phi3.rope.scaling.type='yarn'"):
        config_from_gguf({**base, "phi3.rope.scaling.type": "yarn", "phi3.rope.scaling.factor": 4.0}, {"token_embd.weight": (10, 64)})
    llama = {k.replace("phi3", "llama"): v.replace("phi3", "llama") if isinstance(v, str) else v for k, v in base.items()}
    with pytest.raises(ModelError, match=r"llama.rope.dimension_count=8"):
        config_from_gguf({**llama, "llama.rope.dimension_count": 8}, {"token_embd.weight": (10, 64)})
    with pytest.raises(ModelError, match=r"architecture 'mamba'"):
        config_from_gguf({"general.architecture": "mamba"})


@torch.inference_mode()
def test_phi3_with_whole_head_rotary_decodes_natively_like_transformers(tmp_path):
    """Phi-3 rotating whole heads is llama's block: matvec.c's fused step runs it (LongRoPE's scaled cos/sin, the window)."""
    path = make_tiny("phi3", tmp_path / "phi3-full")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"].update(partial_rotary_factor=1.0, short_factor=[1.0 + 0.1 * i for i in range(8)], long_factor=[1.5 + 0.5 * i for i in range(8)])
    (path / "config.json").write_text(json.dumps(cfg))
    ref, ours = load_reference(path), load_model(path)
    assert ours.module.native_decode and ours.module._native_blocks() is not None
    ids = prompt(40, seed=2)
    assert greedy_with_cache(ours, ids) == expected_greedy(ref, ids)
