"""Linear weight formats (llmcli/core/formats) against llama.cpp's own code (tests/ggml_ref.py).

Every supported GGML type: the blocks `--quantize` writes are byte for byte llama.cpp's, rows read
back are llama.cpp's dequantization, a BlockLinear's product is the float arithmetic on ggml's
8-bit activation blocks within float32 rounding, and a record's numbers do not depend on the
batch. Then whole models: a GGUF in each type loads as blocks mapped from the file and runs whole
decode steps natively; HF models quantize at load; without the kernels, blocks still run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from llmcli.core.formats import TYPES, BlockEmbedding, BlockLinear, ConcatLinear, fuse_linears
from llmcli.core.formats.blocks import quantize_rows
from llmcli.core.kernels import load_kernels
from llmcli.core.loader import load_model
from llmcli.core.models.base import KVCache
from tests import ggml_ref
from tests.test_block_kernels import act_blocks
from tests.test_weights import _make_llama, write_gguf
from tests.tiny import make_tiny

BLOCK_TYPES = [name for name in TYPES if name != "F32"]
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    built = load_kernels(tmp_path_factory.mktemp("kernels"))
    assert built is not None, "the C compiler on this machine failed to build llmcli's kernels"
    return built


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _k(name: str) -> int:
    return 512 if name in K_QUANTS else 96  # two super-blocks, or three blocks of 32


def _activation_reference(x: np.ndarray, name: str) -> np.ndarray:
    """The activations as the block kernels see them: ggml's 8-bit blocks (q8_0-like per 32 for the
    32-value types, q8_K per 256 for the K-quants), float32 as they are for F16/BF16."""
    x = x.astype(np.float32)
    if name in ("F16", "BF16"):
        return x
    if name in K_QUANTS:  # ggml's quantize_row_q8_K_ref
        blocks = x.reshape(x.shape[0], -1, 256)
        first = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)  # signed value of largest magnitude
        iscale = np.where(first == 0, 0, np.float32(-127) / np.where(first == 0, 1, first)).astype(np.float32)
        q = np.minimum(np.rint(iscale * blocks), 127)
        d = np.where(iscale == 0, 0, np.float32(1) / np.where(iscale == 0, 1, iscale)).astype(np.float32)
        return (q * d).reshape(x.shape)
    q, d, _ = act_blocks(x)
    return (q * d[..., None]).reshape(x.shape)


def _min_term_correction(x: np.ndarray, raw: np.ndarray, name: str, k: int) -> np.ndarray:
    """Q4_1/Q5_1: the kernels multiply a block's min by the activation's binary16 s (as ggml's
    q8_1 does) instead of delta * sum(values); what that adds to xa @ w.T. Zero for other types."""
    if name not in ("Q4_1", "Q5_1"):
        return np.zeros((x.shape[0], raw.shape[0]))
    q, d, s = act_blocks(x)
    size = raw.shape[1] // (k // 32)
    m = raw.reshape(raw.shape[0], k // 32, size)[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    return (s - d * q.sum(-1)) @ m.T


# ---------------------------------------------------------------- one layer, each type


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_quantized_blocks_are_llama_cpps_bytes(kernels, name):
    gtype = TYPES[name]
    w = rand(40, _k(name), seed=1)
    ours = quantize_rows(w, gtype, kernels)
    ref = ggml_ref.quantize(w.numpy(), name, gtype.id, gtype.row_bytes(_k(name)))
    assert ours.dtype == torch.uint8 and np.array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_embedding_rows_are_llama_cpps_dequantization(kernels, name):
    gtype = TYPES[name]
    k = _k(name)
    raw = ggml_ref.quantize(rand(50, k, seed=2).numpy(), name, gtype.id, gtype.row_bytes(k))
    table = BlockEmbedding(gtype, torch.from_numpy(raw), k, kernels)
    ids = torch.tensor([[3, 0, 49], [7, 7, 12]])
    expected = ggml_ref.dequantize(raw, name, k)[ids.numpy()]
    assert np.array_equal(table(ids).numpy(), expected)
    no_kernels = BlockEmbedding(gtype, torch.from_numpy(raw), k, None)  # the fallback: gguf's numpy dequantization
    assert np.array_equal(no_kernels(ids).numpy(), expected)
    with pytest.raises(IndexError):
        table(torch.tensor([50]))


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_block_linear_is_the_float_product_on_ggmls_activation_blocks(kernels, name):
    """y = act(x) @ W^T + b, where W is llama.cpp's dequantization and act(x) ggml's 8-bit blocks:
    exact integer dots, so the only difference is float32 rounding in the scale sums."""
    gtype = TYPES[name]
    k = _k(name)
    raw = ggml_ref.quantize(rand(37, k, seed=3).numpy(), name, gtype.id, gtype.row_bytes(k))
    bias = rand(37, seed=4)
    layer = BlockLinear(gtype, torch.from_numpy(raw), k, bias, kernels)
    x = rand(5, 3, k, seed=5)
    with torch.inference_mode():
        y = layer(x).numpy().reshape(15, 37)
    w = ggml_ref.dequantize(raw, name, k).astype(np.float64)
    xa = _activation_reference(x.reshape(15, k).numpy(), name).astype(np.float64)
    expected = xa @ w.T + bias.numpy() + _min_term_correction(x.reshape(15, k).numpy(), raw, name, k)
    bound = 1e-5 * (np.abs(xa) @ np.abs(w).T) + 1e-6
    assert np.all(np.abs(y - expected) <= bound), np.abs(y - expected).max()


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_block_rows_are_batch_invariant(kernels, name):
    """A row's result is the same bits alone, in any batch, and as positions of one prompt; for the
    fused ConcatLinear (one native call over several parts) as well."""
    gtype = TYPES[name]
    k = _k(name)
    parts = [BlockLinear(gtype, quantize_rows(rand(n, k, seed=n), gtype, kernels), k, rand(n, seed=n + 1), kernels) for n in (64, 16, 16)]
    for layer in (parts[0], fuse_linears(parts)):
        x = rand(21, 1, k, seed=6)
        with torch.inference_mode():
            alone = torch.cat([layer(x[i : i + 1]) for i in range(21)])
            for rows in (2, 4, 5, 16, 21):
                assert torch.equal(layer(x[:rows]), alone[:rows]), rows
            assert torch.equal(layer(x.view(1, 21, k)).view(21, 1, -1), alone)
    assert isinstance(fuse_linears(parts), ConcatLinear)
    with torch.inference_mode():
        assert torch.equal(fuse_linears(parts)(x), torch.cat([p(x) for p in parts], -1))


def test_without_kernels_a_block_layer_dequantizes_one_matrix_per_call():
    gtype = TYPES["Q4_K"]
    raw = ggml_ref.quantize(rand(30, 256, seed=7).numpy(), "Q4_K", gtype.id, gtype.row_bytes(256))
    layer = BlockLinear(gtype, torch.from_numpy(raw), 256, None, None)
    x = rand(2, 256, seed=8)
    with torch.inference_mode():
        expected = x @ torch.from_numpy(ggml_ref.dequantize(raw, "Q4_K", 256)).T
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert [b.dtype for b in layer.buffers()] == [torch.uint8]  # no float copy kept


# ---------------------------------------------------------------- whole models


def _tiny_gguf(tmp_path, name: str, tied: bool = False):
    """A tiny llama GGUF whose 2-D tensors are `name` blocks from llama.cpp's quantizer (1-D stay F32)."""
    gtype = TYPES[name]
    wide = name in K_QUANTS
    model = _make_llama(tied=tied, hidden=256 if wide else 64, intermediate=256 if wide else 128, seed=11)
    override = {}
    from tests.test_weights import gguf_name, llama_cpp_permute

    for hf, t in model.state_dict().items():
        if t.ndim != 2 or (tied and hf == "lm_head.weight"):
            continue
        w = t.float().numpy()
        if hf.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, model.config.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, model.config.num_key_value_heads)
        override[gguf_name(hf)] = (ggml_ref.quantize(w, name, gtype.id, gtype.row_bytes(w.shape[1])), Q[name])
    return write_gguf(tmp_path / f"tiny-{name}.gguf", model, Q.F32, raw_override=override), model


@pytest.mark.parametrize("name", ["F16", "Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"])
def test_gguf_runs_from_its_blocks_and_decodes_natively(name, tmp_path, monkeypatch):
    """Every projection and the embedding are the file's blocks (no float copy), a tied output
    uses the embedding's blocks, and a whole decode step runs in one native call (fused parts
    included) with the numbers of the layer-by-layer path; LLMCLI_KERNELS=0 runs the same file."""
    path, _ = _tiny_gguf(tmp_path, name, tied=True)
    loaded = load_model(path, cache_dir=tmp_path / "cache")
    m = loaded.module
    qkv = m.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, ConcatLinear) and all(isinstance(p, BlockLinear) and p.gtype.name == name for p in qkv.parts)
    assert isinstance(m.model.embed_tokens, BlockEmbedding) and m.lm_head.blocks.data_ptr() == m.model.embed_tokens.blocks.data_ptr()
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in m.parameters())
    assert m._native_blocks() is not None
    ids = torch.randint(3, 300, (3, 9), generator=torch.Generator().manual_seed(5))

    def step(t: int, native: bool) -> torch.Tensor:
        """Position t after the same prefill: the native step, or the per-layer one (output_hidden forces it)."""
        cache = KVCache.for_model(loaded.config, 3, 32)
        m(ids[:, :t], cache=cache)
        return m(ids[:, t : t + 1], cache=cache, output_hidden=() if native else (0,)).logits

    with torch.inference_mode():
        native = torch.cat([step(t, True) for t in range(4, 9)], 1)
        layered = torch.cat([step(t, False) for t in range(4, 9)], 1)
    if name == "F16":  # float32 activations: the two paths differ in float summation order only
        torch.testing.assert_close(native, layered, atol=1e-4, rtol=0)
    else:
        # 8-bit activations: the attention's float-order differences (SDPA vs attn_decode_f32, ~1e-7)
        # move an activation across a rounding boundary now and then, a jump of one quantization step
        assert (native.argmax(-1) == layered.argmax(-1)).float().mean() >= 0.9
        assert float((native - layered).norm() / layered.norm()) < 0.01
    monkeypatch.setenv("LLMCLI_KERNELS", "0")
    plain = load_model(path)
    assert isinstance(plain.module.model.layers[0].mlp.down_proj, BlockLinear) and plain.module._native_blocks() is None
    with torch.inference_mode():
        expected = m(ids).logits
        got = plain.module(ids).logits
    # torch on the dequantized matrices, float32 activations: close to the 8-bit-activation kernels
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("scheme, expected", [("q8_0", "Q8_0"), ("int8", "Q8_0"), ("q4_0", "Q4_0"), ("q5_1", "Q5_1"), ("q4_k", "Q4_K"), ("q6_k", "Q6_K")])
def test_hf_quantize_at_load_writes_llama_cpps_blocks(scheme, expected, tmp_path):
    """--quantize on an HF model: each projection holds exactly llama.cpp's blocks of its float
    weights (rows that do not fill a K-quant super-block take llama.cpp's replacement type)."""
    path = make_tiny("llama", tmp_path / "llama")
    from llmcli.core.weights import read_safetensors

    hf = read_safetensors(path)
    loaded = load_model(path, quantize=scheme)
    down = loaded.module.model.layers[1].mlp.down_proj
    k = down.in_features
    want = TYPES[expected] if k % TYPES[expected].block == 0 else TYPES[{"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[expected]]
    assert isinstance(down, BlockLinear) and down.gtype == want
    ref = ggml_ref.quantize(hf["model.layers.1.mlp.down_proj.weight"].float().numpy(), want.name, want.id, want.row_bytes(k))
    assert np.array_equal(down.blocks.numpy(), ref)
    assert loaded.quantize == scheme
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.isfinite(loaded.module(ids).logits).all()


def test_quantize_flag_errors(tmp_path):
    from llmcli.errors import UsageError

    path = make_tiny("llama", tmp_path / "llama")
    with pytest.raises(UsageError, match="q4_k"):
        load_model(path, quantize="q3_xs")
    with pytest.raises(UsageError, match="float32"):
        load_model(path, quantize="q4_k", dtype="bfloat16")


def test_concat_of_mixed_formats_runs_each_part():
    """A fused projection whose parts differ (F32 q/k beside a Q8_0 v, as some files mix) still
    gives each part's own output side by side."""
    a, b = nn.Linear(64, 8), nn.Linear(64, 4)
    q8 = BlockLinear.from_float(b, TYPES["Q8_0"], None)
    fused = fuse_linears([a, q8])
    x = rand(3, 64)
    with torch.inference_mode():
        assert torch.equal(fused(x), torch.cat([a(x), q8(x)], -1))


# ---------------------------------------------------------------- memory (issue 13, item 5)

MEMORY_SCRIPT = r"""
import json, re, sys, time, torch
from llmcli.core.loader import load_model
from llmcli.core.models.base import KVCache
from llmcli.core.kernels import load_kernels

def kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))

path, cache_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
load_kernels(cache_dir + "/kernels")  # compiled and mapped before the baseline: code, not weights
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS now
before = kib("VmRSS")
start = time.perf_counter()
loaded = load_model(path, cache_dir=cache_dir)
load_s = time.perf_counter() - start
cache = KVCache.for_model(loaded.config, 1, steps + 8)
kv = sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v))
ids = torch.tensor([[1, 504, 3458, 314, 253, 1782, 28, 2156]])
with torch.inference_mode():
    logits = loaded.module(ids, cache=cache).logits[:, -1]
    for _ in range(steps):
        logits = loaded.module(logits.argmax(-1, keepdim=True), cache=cache).logits[:, -1]
print(json.dumps({"peak_bytes": (kib("VmHWM") - before) * 1024, "kv_bytes": kv, "load_s": load_s,
                  "native": loaded.module._native_blocks() is not None}))
"""


@pytest.mark.real
def test_peak_memory_while_generating_a_q4_1_gguf_stays_near_the_file_size(smollm2_gguf, tmp_path):
    """Peak RSS of loading SmolLM2 Q4_1 and generating (over the process before the load): at most
    1.25 x the file + the KV cache + 200 MiB, where the old float32 copy took about 1 GB."""
    import json
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(smollm2_gguf), str(tmp_path / "cache"), "64"],
        capture_output=True, text=True, env=subprocess_env(), timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    size = smollm2_gguf.stat().st_size
    assert got["native"]
    assert got["peak_bytes"] <= 1.25 * size + got["kv_bytes"] + 200 * 2**20, (got, size)
