"""Checkpoint readers against independent references: transformers' own save/load, gguf's writer,
reader and dequantization, and transformers' GGUF loading of the real SmolLM2 file
(the `smollm2_gguf` fixture of tests/conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf
import numpy as np
import psutil
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from llmcli.core.gguf_meta import gguf_metadata
from llmcli.core.weights import GGUFCheckpoint, load_state, read_gguf, read_safetensors
from llmcli.errors import ModelError

N_HEADS, N_KV = 4, 2


# ------------------------------------------------------------------ fixtures


def _make_llama(tied: bool, hidden: int = 64, intermediate: int = 128, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms, so a mixed-up norm tensor cannot hide behind all-ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


@pytest.fixture(scope="module")
def hf_llama():
    return _make_llama(tied=False)


@pytest.fixture(scope="module")
def hf_llama_dir(hf_llama, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf_llama")
    hf_llama.save_pretrained(path)
    return path


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.permute, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def row_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse as a row gather found by permuting row indices (independent of weights.unpermute_rope)."""
    order = llama_cpp_permute(np.arange(w.shape[0]), n_head)  # permuted row r came from row order[r]
    return w[np.argsort(order)]


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, i, *rest = hf.split(".")
    return f"blk.{i}.{BLOCK_NAMES['.'.join(rest[:-1])]}.{rest[-1]}"


def write_gguf(path: Path, model, qtype: Q, arch: str = "llama", raw_override: dict | None = None) -> Path:
    """A llama.cpp-style GGUF of an HF model (convert_hf_to_gguf.py's layout): its names, 1-D tensors
    in F32, and for arch llama (NORM rope) the Q/K permutation; qwen2/qwen3 (NEOX rope) keep HF's rows."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") and cfg.rope_parameters else cfg.rope_theta)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    for key in ("bos", "eos", "pad"):
        if getattr(cfg, f"{key}_token_id", None) is not None:
            getattr(writer, f"add_{key}_token_id")(getattr(cfg, f"{key}_token_id"))
    writer.add_chat_template("{{ messages }}")
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        w = t.detach().float().numpy()
        if arch != "llama":
            pass
        elif name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        gname = gguf_name(name)
        if raw_override and gname in raw_override:
            data, raw_type = raw_override[gname]
            writer.add_tensor(gname, data, raw_dtype=raw_type)
        elif w.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(gname, np.ascontiguousarray(w, dtype=np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(gname, w.astype(np.float16))
        else:
            writer.add_tensor(gname, quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference_from_gguf_reader(path: Path, n_heads: int, n_kv: int) -> dict[str, np.ndarray]:
    """gguf's own reader + dequantization, un-permuted with the test's row gather; keys are GGUF names."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = dequantize(t.data, t.tensor_type).reshape(shape)
        if ".attn_q." in t.name:
            w = row_unpermute(w, n_heads)
        elif ".attn_k." in t.name:
            w = row_unpermute(w, n_kv)
        out[t.name] = w
    return out


# ------------------------------------------------------------------ safetensors


def test_read_safetensors_equals_state_dict(hf_llama, hf_llama_dir):
    tensors = read_safetensors(hf_llama_dir)
    expected = hf_llama.state_dict()
    assert set(tensors) == set(expected)
    for name, t in expected.items():
        assert tensors[name].dtype == t.dtype
        assert torch.equal(tensors[name], t), name
    # the single file path gives the same
    single = read_safetensors(hf_llama_dir / "model.safetensors")
    assert set(single) == set(expected)


def test_read_sharded_safetensors(hf_llama, tmp_path):
    hf_llama.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    tensors = read_safetensors(tmp_path)
    expected = hf_llama.state_dict()
    assert set(tensors) == set(expected)
    for name, t in expected.items():
        assert torch.equal(tensors[name], t), name


def test_safetensors_dtypes_kept(tmp_path):
    from safetensors.torch import save_file

    src = {
        "bf": torch.randn(3, 5).to(torch.bfloat16),
        "h": torch.randn(7).half(),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "b": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }
    save_file(src, tmp_path / "x.safetensors")
    got = read_safetensors(tmp_path / "x.safetensors")
    for name, t in src.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t), name


def test_safetensors_memory_mapped_not_copied(tmp_path):
    """Reading a 128 MB file costs far less than 128 MB of RSS until tensors are touched."""
    from safetensors.torch import save_file

    save_file({f"w{i}": torch.full((1024, 1024), float(i)) for i in range(32)}, tmp_path / "big.safetensors")
    proc = psutil.Process()
    before = proc.memory_info().rss
    tensors = read_safetensors(tmp_path / "big.safetensors")
    grown = proc.memory_info().rss - before
    assert grown < 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MB"
    assert float(tensors["w7"][3, 4]) == 7.0  # and the data is really there
    # same dtype => load_state keeps the very same storage
    module = torch.nn.Linear(1024, 1024, bias=False, device="meta")
    load_state(module, {"weight": tensors["w5"]}, "big.safetensors", torch.float32)
    assert module.weight.data_ptr() == tensors["w5"].data_ptr()
    assert grown < 16 * 2**20


def test_write_safetensors_is_read_by_safetensors_itself(tmp_path):
    """The streaming writer behind the weights cache: the safetensors library reads its files back
    (every dtype we write, scalars, empty tensors, non-contiguous inputs) with the metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from llmcli.core.weights import write_safetensors

    tensors = {
        "w": torch.randn(5, 7).t(),
        "h": torch.randn(3, 3).to(torch.bfloat16),
        "i": torch.arange(6, dtype=torch.int64).view(2, 3),
        "q": torch.tensor([-3, 4, 127], dtype=torch.int8),
        "s": torch.tensor(2.5),
        "e": torch.zeros(0, 4),
    }
    write_safetensors(tmp_path / "t.safetensors", tensors, {"layout": "x/1"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert f.metadata() == {"layout": "x/1"}
    assert all(torch.equal(read_safetensors(tmp_path / "t.safetensors")[n], t) for n, t in tensors.items())


def test_released_file_pages_leave_memory_and_keep_values(tmp_path):
    """Once a mapped tensor's values were copied into another layout, FileMappings.release gives its
    pages back; touching the tensor again reads the file, not zeros. Anonymous memory is left alone."""
    from safetensors.torch import save_file

    from llmcli.core.weights import FileMappings

    save_file({"w": torch.arange(32 * 2**20 // 4, dtype=torch.float32)}, tmp_path / "w.safetensors")
    w = read_safetensors(tmp_path / "w.safetensors")["w"]
    proc = psutil.Process()
    total = float(w.sum(dtype=torch.float64))  # every page resident now
    resident = proc.memory_info().rss
    FileMappings().release(w)
    dropped = resident - proc.memory_info().rss
    assert dropped > 24 * 2**20, f"only {dropped / 2**20:.1f} MB given back"
    assert float(w.sum(dtype=torch.float64)) == total and float(w[12345]) == 12345.0
    anonymous = torch.ones(2**20)
    FileMappings().release(anonymous)
    assert float(anonymous.sum()) == 2**20


# ------------------------------------------------------------------ GGUF from tiny HF llamas


def _assert_config_matches(config, hf_config):
    assert config.model_type == "llama"
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                  "bos_token_id", "pad_token_id"):
        assert getattr(config, field) == getattr(hf_config, field), field
    hf_theta = hf_config.rope_parameters["rope_theta"] if getattr(hf_config, "rope_parameters", None) else hf_config.rope_theta
    assert config.rope_theta == hf_theta
    assert config.head_dim == hf_config.hidden_size // hf_config.num_attention_heads
    assert config.eos_token_id == [hf_config.eos_token_id]


def test_gguf_f32_equals_hf_state_dict(hf_llama, tmp_path):
    path = write_gguf(tmp_path / "tiny-f32.gguf", hf_llama, Q.F32)
    ckpt = read_gguf(path)
    assert isinstance(ckpt, GGUFCheckpoint)
    _assert_config_matches(ckpt.config, hf_llama.config)
    expected = hf_llama.state_dict()
    assert set(ckpt.tensors) == set(expected)
    for name, t in expected.items():
        assert ckpt.tensors[name].dtype == torch.float32
        assert torch.equal(ckpt.tensors[name], t), name
    assert ckpt.metadata["tokenizer.ggml.tokens"][:3] == ["t0", "t1", "t2"]
    assert ckpt.metadata["tokenizer.chat_template"] == "{{ messages }}"


def test_gguf_load_writes_no_weights_cache_and_removes_the_old_one(tmp_path):
    """A GGUF's weights are never cached (they are mapped from the file); the float32 weights and
    panel files older versions left in <cache>/weights are deleted by the next load."""
    from llmcli.core.loader import load_model

    path = write_gguf(tmp_path / "tied.gguf", _make_llama(tied=True, seed=2), Q.Q8_0)
    cache = tmp_path / "cache"
    stale = cache / "weights"
    stale.mkdir(parents=True)
    (stale / "667e397bd6354a14629236d6.safetensors").write_bytes(bytes(1000))
    (stale / "667e397bd6354a14629236d6.panels.safetensors").write_bytes(bytes(1000))
    load_model(path, cache_dir=cache)
    assert not stale.exists()
    assert sorted(p.name for p in cache.iterdir()) <= ["kernels", "tokenizers"]


def test_gguf_tied_has_no_lm_head(tmp_path):
    model = _make_llama(tied=True, seed=1)
    ckpt = read_gguf(write_gguf(tmp_path / "tied.gguf", model, Q.F32))
    _assert_config_matches(ckpt.config, model.config)
    assert ckpt.config.tie_word_embeddings is True
    assert "lm_head.weight" not in ckpt.tensors
    assert torch.equal(ckpt.tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_1])
def test_gguf_quantized_equals_gguf_dequantization(hf_llama, tmp_path, qtype):
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", hf_llama, qtype)
    ckpt = read_gguf(path)
    _assert_config_matches(ckpt.config, hf_llama.config)
    reference = reference_from_gguf_reader(path, N_HEADS, N_KV)
    hf = hf_llama.state_dict()
    assert set(ckpt.tensors) == set(hf)
    for name, t in hf.items():
        got = ckpt.tensors[name]
        assert got.dtype == torch.float32 and got.shape == t.shape
        np.testing.assert_array_equal(got.numpy(), reference[gguf_name(name)], err_msg=name)
        # quantization is per row, so it commutes with the row permutation: quantizing the HF
        # tensor directly is a second reference that never permutes at all
        if t.ndim == 2:
            direct = dequantize(quantize(t.float().numpy(), qtype), qtype)
            np.testing.assert_array_equal(got.numpy(), direct, err_msg=name)
        # and it stays close to the float weights
        assert torch.allclose(got, t, atol=0.2 * float(t.abs().max()) + 1e-6), name


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.F16])
def test_map_gguf_blocks_are_the_files_bytes_without_a_copy(hf_llama, tmp_path, qtype):
    """map_gguf keeps every tensor as its raw blocks: views into the file's mapping, byte for byte
    gguf's reader's data; only llama's permuted Q/K rows are a copy (whole rows moved back)."""
    from llmcli.core.weights import FileMappings, map_gguf

    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", hf_llama, qtype)
    mapped = map_gguf(path)
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    ranges = FileMappings().ranges
    hf = hf_llama.state_dict()
    assert set(mapped.tensors) == set(hf)
    for name, t in mapped.tensors.items():
        raw = np.asarray(reader[t.name].data).view(np.uint8).reshape(t.raw.shape)
        in_file = any(lo <= t.raw.data_ptr() < hi for lo, hi in ranges)
        if ".attn_q." in t.name or ".attn_k." in t.name:
            n = N_HEADS if ".attn_q." in t.name else N_KV
            np.testing.assert_array_equal(t.raw.numpy(), row_unpermute(raw, n), err_msg=name)
            assert not in_file
        else:
            np.testing.assert_array_equal(t.raw.numpy(), raw, err_msg=name)
            assert in_file, name
        expected_type = Q.F32 if hf[name].ndim == 1 else qtype
        assert t.gtype.name == expected_type.name and t.gtype.id == int(expected_type)


def test_ggml_type_table_matches_gguf():
    from llmcli.core.formats import TYPES

    for t in TYPES.values():
        q = Q[t.name]
        assert t.id == int(q) and (t.block, t.block_bytes) == gguf.GGML_QUANT_SIZES[q], t.name


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_gguf_k_quants_equal_gguf_dequantization(tmp_path, qtype):
    # gguf has no numpy K-quantizer: K-quant blocks are random bytes, read back through gguf's reader
    model = _make_llama(tied=False, hidden=256, intermediate=256, seed=2)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    override = {}
    for name, t in model.state_dict().items():
        if t.ndim == 2:
            rows, cols = t.shape
            blocks = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
            # the float16 super-block scales (Q4_K: d, dmin first; Q6_K: d last) get finite values
            scales = rng.uniform(0.001, 0.01, size=(rows, cols // block, 2)).astype(np.float16).view(np.uint8)
            if qtype == Q.Q4_K:
                blocks[:, :, :4] = scales
            else:
                blocks[:, :, -2:] = scales[:, :, :2]
            override[gguf_name(name)] = (blocks.reshape(rows, -1), qtype)
    path = write_gguf(tmp_path / f"k-{qtype.name}.gguf", model, Q.F32, raw_override=override)
    ckpt = read_gguf(path)
    reference = reference_from_gguf_reader(path, N_HEADS, N_KV)
    for name in model.state_dict():
        np.testing.assert_array_equal(ckpt.tensors[name].numpy(), reference[gguf_name(name)], err_msg=name)


def test_gguf_metadata_matches_gguf_reader(hf_llama, tmp_path):
    path = write_gguf(tmp_path / "meta.gguf", hf_llama, Q.F32)
    ours = gguf_metadata(path)
    reader = gguf.GGUFReader(path)
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        theirs = fld.contents()
        if isinstance(theirs, float):
            assert ours[key] == pytest.approx(theirs, rel=1e-6), key
        else:
            assert ours[key] == theirs, key


# ------------------------------------------------------------------ load_state


def test_load_state_into_meta_llama_matches_transformers(hf_llama, hf_llama_dir):
    from llmcli.core.config import ModelConfig
    from llmcli.core.models import llama

    config = ModelConfig.from_dict(json.loads((hf_llama_dir / "config.json").read_text()))
    tensors = llama.sanitize(read_safetensors(hf_llama_dir), config)
    with torch.device("meta"):
        module = llama.Model(config)
    load_state(module, tensors, str(hf_llama_dir), torch.float32)
    module.inv_freq = llama.build_buffers(config)["inv_freq"]
    assert not any(p.is_meta for p in module.parameters())
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    with torch.no_grad():
        ours = module(ids).logits
        theirs = hf_llama(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: one slot, two names
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("table", torch.zeros(2), persistent=False)


def _tiny_tensors():
    return {"emb.weight": torch.randn(10, 4), "proj.weight": torch.randn(3, 4), "proj.bias": torch.randn(3), "scale": torch.rand(3)}


def test_load_state_assigns_ties_casts_and_ignores_harmless():
    with torch.device("meta"):
        module = _Tiny()
    tensors = _tiny_tensors()
    tensors["model.rotary_emb.inv_freq"] = torch.ones(2)  # harmless extra
    load_state(module, tensors, "tiny.safetensors", torch.bfloat16)
    assert module.head.weight is module.emb.weight
    assert module.emb.weight.dtype == torch.bfloat16 and not module.emb.weight.requires_grad
    assert torch.equal(module.proj.bias, tensors["proj.bias"].to(torch.bfloat16))
    assert torch.equal(module.scale, tensors["scale"].to(torch.bfloat16))
    assert module.table.is_meta  # non-persistent and absent: left for the family to rebuild


def test_load_state_missing_tensor():
    with torch.device("meta"):
        module = _Tiny()
    tensors = _tiny_tensors()
    del tensors["proj.bias"]
    with pytest.raises(ModelError) as err:
        load_state(module, tensors, "/m/model.safetensors", torch.float32)
    assert "proj.bias" in err.value.message and "/m/model.safetensors" in err.value.message
    assert err.value.hint


def test_load_state_shape_mismatch():
    with torch.device("meta"):
        module = _Tiny()
    tensors = _tiny_tensors()
    tensors["proj.weight"] = torch.randn(5, 4)
    with pytest.raises(ModelError) as err:
        load_state(module, tensors, "/m/model.safetensors", torch.float32)
    assert "proj.weight" in err.value.message and "(5, 4)" in err.value.message and "(3, 4)" in err.value.message


def test_load_state_unexpected_tensor():
    with torch.device("meta"):
        module = _Tiny()
    tensors = _tiny_tensors()
    tensors["layers.9.mystery.weight"] = torch.randn(2)
    with pytest.raises(ModelError) as err:
        load_state(module, tensors, "/m/model.safetensors", torch.float32)
    assert "layers.9.mystery.weight" in err.value.message and "/m/model.safetensors" in err.value.message
    load_state(module, tensors, "/m/model.safetensors", torch.float32, ignore=("mystery.weight",))
    assert not module.proj.weight.is_meta


# ------------------------------------------------------------------ the real SmolLM2 GGUF


def test_smollm2_gguf_matches_transformers(smollm2_gguf):
    ckpt = read_gguf(smollm2_gguf)
    c = ckpt.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and "lm_head.weight" not in ckpt.tensors
    assert c.intermediate_size == 1536 and c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, [2], 2)
    assert len(ckpt.metadata["tokenizer.ggml.tokens"]) == 49152
    assert "<|im_start|>" in ckpt.metadata["tokenizer.chat_template"]

    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    ref = reference.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.29.self_attn.k_proj.weight", "model.layers.3.mlp.down_proj.weight",
                 "model.embed_tokens.weight", "model.norm.weight"):
        torch.testing.assert_close(ckpt.tensors[name], ref[name].float(), rtol=0, atol=1e-6, msg=name)
    assert reference.config.num_key_value_heads == c.num_key_value_heads


# ------------------------------------------------------------------ errors


def _err(fn, *args, **kwargs) -> ModelError:
    with pytest.raises(ModelError) as err:
        fn(*args, **kwargs)
    assert err.value.hint, "every error carries a hint"
    return err.value


def test_error_missing_paths(tmp_path):
    e = _err(read_safetensors, tmp_path / "nope")
    assert str(tmp_path / "nope") in e.message and "does not exist" in e.message
    e = _err(read_gguf, tmp_path / "nope.gguf")
    assert str(tmp_path / "nope.gguf") in e.message and "does not exist" in e.message


def test_error_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    e = _err(read_safetensors, tmp_path)
    assert str(tmp_path) in e.message and "config.json" in e.message and "tokenizer.json" in e.message
    assert "safetensors" in e.hint and "GGUF" in e.hint


def test_error_pickles_refused_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    # a pickle that would create `marker` if anything unpickled it
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for suffix in (".bin", ".pt", ".pth", ".ckpt"):
        f = tmp_path / f"weights{suffix}"
        f.write_bytes(pickle.dumps(Evil()))
        e = _err(read_safetensors, f)
        assert str(f) in e.message and "pickle" in e.message and "safetensors" in e.hint and "GGUF" in e.hint
    d = tmp_path / "hfdir"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    e = _err(read_safetensors, d)
    assert "pytorch_model.bin" in e.message and "safetensors" in e.hint
    assert not marker.exists()


def test_error_truncated_and_corrupt_safetensors(hf_llama_dir, tmp_path):
    data = (hf_llama_dir / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    e = _err(read_safetensors, cut)
    assert str(cut) in e.message and "truncated" in e.message
    header_cut = tmp_path / "header.safetensors"
    header_cut.write_bytes(data[:100])
    e = _err(read_safetensors, header_cut)
    assert str(header_cut) in e.message and "header" in e.message
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    e = _err(read_safetensors, junk)
    assert str(junk) in e.message and "header" in e.message
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    assert "3 bytes" in _err(read_safetensors, tiny).message
    # a header whose offsets do not match the shape
    bad = {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}
    raw = json.dumps(bad).encode()
    corrupt = tmp_path / "offsets.safetensors"
    corrupt.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(64))
    e = _err(read_safetensors, corrupt)
    assert "tensor w" in e.message and "64" in e.message
    # an unreadable dtype
    odd = {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}
    raw = json.dumps(odd).encode()
    weird = tmp_path / "dtype.safetensors"
    weird.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    e = _err(read_safetensors, weird)
    assert "C64" in e.message and "F32" in e.hint


def test_error_sharded_index_missing_shard(hf_llama, tmp_path):
    hf_llama.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    e = _err(read_safetensors, tmp_path)
    assert shard in e.message and "model.safetensors.index.json" in e.message


def test_error_truncated_and_corrupt_gguf(hf_llama, tmp_path):
    data = write_gguf(tmp_path / "good.gguf", hf_llama, Q.Q8_0).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    e = _err(read_gguf, cut)
    assert str(cut) in e.message and "truncated" in e.message and "tensor" in e.message
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(data[:300])
    e = _err(read_gguf, header_cut)
    assert str(header_cut) in e.message and "truncated" in e.message
    assert "truncated" in _err(gguf_metadata, header_cut).message
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    e = _err(read_gguf, not_gguf)
    assert str(not_gguf) in e.message and "magic" in e.message
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(data[:24] + bytes([0xFF]) * 64)  # a key length of 2**64 - 1
    e = _err(read_gguf, garbage)
    assert str(garbage) in e.message and "not a valid GGUF" in e.message


def test_error_unknown_gguf_architecture(hf_llama, tmp_path):
    path = write_gguf(tmp_path / "gpt2ish.gguf", hf_llama, Q.F32, arch="falcon")
    e = _err(read_gguf, path)
    assert "falcon" in e.message and str(path) in e.message and "llama" in e.hint


def test_error_unsupported_gguf_tensor_type(hf_llama, tmp_path):
    rows, cols = hf_llama.model.layers[0].mlp.up_proj.weight.shape
    override = {"blk.0.ffn_up.weight": (np.zeros((rows, cols), dtype=np.int32), Q.I32)}
    path = write_gguf(tmp_path / "int.gguf", hf_llama, Q.F32, raw_override=override)
    e = _err(read_gguf, path)
    assert "blk.0.ffn_up.weight" in e.message and "I32" in e.message and str(path) in e.message
    # a type gguf can name but not dequantize
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    override = {"blk.0.ffn_up.weight": (np.zeros((rows, cols // block * size), dtype=np.uint8), Q.Q8_1)}
    path = write_gguf(tmp_path / "q81.gguf", hf_llama, Q.F32, raw_override=override)
    e = _err(read_gguf, path)
    assert "Q8_1" in e.message and "Q8_0" in e.hint


@pytest.mark.parametrize("qtype", [Q.IQ4_NL, Q.TQ1_0, Q.MXFP4])
def test_error_types_llmcli_cannot_run_name_tensor_type_and_supported_list(hf_llama, tmp_path, qtype):
    from llmcli.core.formats import TYPES

    rows, cols = 64, 256
    model = _make_llama(tied=False, hidden=256, intermediate=64, seed=3)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    override = {"blk.1.ffn_up.weight": (np.zeros((model.config.intermediate_size, cols // block * size), dtype=np.uint8), qtype)}
    assert rows == model.config.intermediate_size
    path = write_gguf(tmp_path / f"{qtype.name}.gguf", model, Q.F32, raw_override=override)
    e = _err(read_gguf, path)
    assert "blk.1.ffn_up.weight" in e.message and qtype.name in e.message and str(path) in e.message
    assert all(name in e.hint for name in TYPES)


def _patch_tensor_info(path: Path, name: str, *, ne: list[int] | None = None, type_id: int | None = None, offset: int | None = None) -> None:
    """Rewrite one tensor's description in a GGUF header in place (n_dims stays)."""
    data = bytearray(path.read_bytes())
    at = data.index(name.encode()) + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    dims_at, type_at = at + 4, at + 4 + 8 * n_dims
    if ne is not None:
        for i, d in enumerate(ne):
            data[dims_at + 8 * i : dims_at + 8 * i + 8] = d.to_bytes(8, "little")
    if type_id is not None:
        data[type_at : type_at + 4] = type_id.to_bytes(4, "little")
    if offset is not None:
        data[type_at + 4 : type_at + 12] = offset.to_bytes(8, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["dims", "offset", "type"])
def test_error_gguf_header_lies_about_a_tensor(hf_llama, tmp_path, damage):
    """Dimensions or offsets that overflow, and a type that does not fit the bytes the tensor
    occupies: one error naming the file and the tensor, raised before anything is allocated."""
    path = write_gguf(tmp_path / "lie.gguf", hf_llama, Q.F32)
    size = path.stat().st_size
    if damage == "dims":
        _patch_tensor_info(path, "blk.0.ffn_up.weight", ne=[64, 2**62])
    elif damage == "offset":
        _patch_tensor_info(path, "blk.0.ffn_up.weight", offset=2**63 + 7)
    else:
        _patch_tensor_info(path, "blk.0.ffn_up.weight", type_id=int(Q.Q8_0))  # 34 bytes a block of 32, not 128
    assert path.stat().st_size == size
    before = psutil.Process().memory_info().rss
    e = _err(map_gguf_of, path)
    assert str(path) in e.message and "blk.0.ffn_up.weight" in e.message and "corrupt" in e.message
    assert {"dims": "overflow", "offset": "starts at byte", "type": "Q8_0"}[damage] in e.message
    assert "\n" not in str(e)
    assert psutil.Process().memory_info().rss - before < 50 * 2**20


def map_gguf_of(path: Path):
    from llmcli.core.weights import map_gguf

    return map_gguf(path)


def test_gguf_metadata_never_imports_torch(smollm2_gguf):
    import subprocess
    import sys

    code = (
        "import sys; from llmcli.core.gguf_meta import gguf_metadata; "
        f"m = gguf_metadata({str(smollm2_gguf)!r}); "
        "assert len(m['tokenizer.ggml.tokens']) == 49152, 'tokens'; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
