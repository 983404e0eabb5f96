"""The native decode kernels (llmcli/core/kernels) against torch, and `--quantize int8` (= q8_0) on whole models.

Each kernel is checked against the torch expression it replaces, on shapes with ragged tails
(N not a multiple of 4, K not a multiple of 16), biases, GQA, ragged cache lengths and a sliding
window. The block formats themselves are tested in test_formats.py; here int8's quality on the
real SmolLM2 against float32 perplexity.
"""

from __future__ import annotations

import math
import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmcli.core.formats import TYPES, BlockLinear
from llmcli.core.kernels import load_kernels
from llmcli.core.kernels.linear import KernelLinear, accelerate_linears
from llmcli.core.loader import load_model
from llmcli.core.models.base import KVCache
from llmcli.errors import UsageError
from tests.tiny import load_reference, make_tiny

# The AVX-512 build, and on x86 also the portable C paths (what CPUs without AVX-512 run), built here with AVX-512 off.
VARIANTS = [()] + ([("-mno-avx512f",)] if platform.machine() in ("x86_64", "AMD64") else [])


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda flags: " ".join(flags) or "native")
def kernels(request, tmp_path_factory):
    built = load_kernels(tmp_path_factory.mktemp("kernels"), extra_flags=request.param)
    assert built is not None, f"the C compiler on this machine failed to build llmcli/core/kernels/matvec.c {request.param}"
    if request.param:
        assert built.simd_width == 1  # really the portable paths
    return built


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("N, K", [(37, 24), (64, 576), (130, 100), (1, 16), (9, 7), (96, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_panel_matmul_equals_linear(kernels, N, K, bias):
    """Decode shapes (one position per row) and prompt shapes (several positions, more than one
    block of 64 rows), with N a multiple of the 32-wide panels or not (a narrower last panel)."""
    linear = nn.Linear(K, N, bias=bias)
    fast = KernelLinear(linear, kernels)
    with torch.inference_mode():
        for shape in [(1, 1, K), (3, 1, K), (17, K), (2, 9, K), (1, 150, K)]:
            x = rand(*shape, seed=N * K + shape[0])
            torch.testing.assert_close(fast(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("N, K", [(96, 40), (70, 33), (5, 8), (64, 1)])
def test_panels_pack_and_unpack(N, K):
    from llmcli.core.kernels.linear import PANEL, pack_panels, unpack_panels

    w = rand(N, K)
    packed = pack_panels(w)
    assert packed.shape == (N * K,)  # no padding: the checkpoint's values, rearranged
    assert torch.equal(unpack_panels(packed, N, K), w)
    # panel p holds rows 32p.. as [K][32]: element (n, k) of a full panel sits at 32 K p + 32 k + n % 32
    n, k = min(N - 1, PANEL + 3), K - 1
    if n < N // PANEL * PANEL:
        assert packed[PANEL * K * (n // PANEL) + PANEL * k + n % PANEL] == w[n, k]


def test_panel_embedding_reads_the_output_panels(kernels):
    """A tied model keeps one float32 copy: its embedding rows come from the output projection's panels."""
    from llmcli.core.kernels.linear import PanelEmbedding

    table = nn.Embedding(70, 24)  # 70 rows: two full panels and a last one of 6
    tied = nn.Linear(24, 70, bias=False)
    tied.weight = table.weight
    output = KernelLinear(tied, kernels)
    shared = PanelEmbedding(output)
    ids = torch.tensor([[0, 31, 32, 63, 64, 69], [5, 5, 68, 40, 1, 2]])
    assert torch.equal(shared(ids), table(ids))
    assert shared.weight_panels.data_ptr() == output.weight_panels.data_ptr()
    with pytest.raises(IndexError):
        shared(torch.tensor([70]))


def test_matvec_rows_are_batch_invariant(kernels):
    """Each output element is computed the same way alone or among other rows: bit for bit,
    whatever the number of rows (tiles of 8, blocks of 64, ragged tails)."""
    fast = KernelLinear(nn.Linear(576, 200), kernels)
    x = rand(77, 1, 576)
    with torch.inference_mode():
        alone = torch.cat([fast(x[i : i + 1]) for i in range(77)])
        for rows in (16, 13, 77):
            assert torch.equal(fast(x[:rows]), alone[:rows])
        # prompts take the same kernel: positions of one sequence too
        assert torch.equal(fast(x.view(1, 77, 576)).view(77, 1, 200), alone)


def test_accelerate_swaps_only_what_it_can(kernels):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(33, 8), nn.Linear(16, 4).to(torch.bfloat16))
    accelerate_linears(model, kernels, TYPES["Q8_0"])
    assert isinstance(model[0], BlockLinear) and model[0].gtype.name == "Q8_0"  # in_features % 32 == 0
    assert isinstance(model[2], KernelLinear)  # 33 inputs: not blockable, stays float32 on the kernel
    assert type(model[3]) is nn.Linear  # bfloat16 is left to torch


def test_rms_norm_and_silu_mul(kernels):
    x = rand(5, 3, 576, seed=1) * 3
    w = rand(576, seed=2)
    out = torch.empty_like(x)
    kernels.rms_norm_f32(x.data_ptr(), w.data_ptr(), out.data_ptr(), 15, 576, 1e-5)
    torch.testing.assert_close(out, F.rms_norm(x, (576,), w, 1e-5), atol=1e-5, rtol=1e-5)
    gu = rand(4, 2 * 1536, seed=3) * 4
    h = torch.empty(4, 1536)
    kernels.silu_mul_f32(gu.data_ptr(), h.data_ptr(), 4, 1536)
    torch.testing.assert_close(h, F.silu(gu[:, :1536]) * gu[:, 1536:], atol=1e-5, rtol=1e-5)


def test_layer_norm_and_gelu_tanh(kernels):
    """activations.c's LayerNorm and plain tanh gelu (GPT-2's) against torch's in float64."""
    x = rand(6, 770, seed=5) * 3 + 1.5
    w, b = rand(770, seed=6), rand(770, seed=7)
    out = torch.empty_like(x)
    kernels.layer_norm_f32(x.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(), 6, 770, 1e-5)
    torch.testing.assert_close(out.double(), F.layer_norm(x.double(), (770,), w.double(), b.double(), 1e-5), atol=1e-5, rtol=1e-5)
    h = torch.empty_like(x)
    kernels.gelu_tanh_f32(x.data_ptr(), h.data_ptr(), 6, 770)
    torch.testing.assert_close(h.double(), F.gelu(x.double(), approximate="tanh"), atol=1e-5, rtol=2e-6)


def test_gelu_tanh_mul(kernels):
    """activations.c's GeGLU against torch's tanh gelu in float64, tails past exp's clamps included."""
    gu = rand(5, 2 * 1030, seed=4) * 4
    gu[0, :6] = torch.tensor([0.0, -30.0, 30.0, 1e-8, -1e-8, -200.0])
    h = torch.empty(5, 1030)
    kernels.gelu_tanh_mul_f32(gu.data_ptr(), h.data_ptr(), 5, 1030)
    want = F.gelu(gu[:, :1030].double(), approximate="tanh") * gu[:, 1030:].double()
    torch.testing.assert_close(h.double(), want, atol=1e-5, rtol=2e-6)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("window", [0, 5])
def test_attn_decode_equals_sdpa_with_ragged_rows(kernels, window):
    B, nq, nk, D, cap = 3, 6, 2, 16, 40
    pos = torch.tensor([0, 11, 29])  # each row's new position: rows of different lengths in one batch
    kc, vc = rand(B, nk, cap, D, seed=1), rand(B, nk, cap, D, seed=2)
    k_before, v_before = kc.clone(), vc.clone()
    qkv = rand(B, nq + 2 * nk, D, seed=3)
    angles = pos[:, None].float() * (1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (B, D)
    out = torch.empty(B, nq * D)
    sb, sh, ss, _ = kc.stride()
    kernels.attn_decode_f32(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), pos.data_ptr(), kc.data_ptr(), vc.data_ptr(), sb, sh, ss, B, nq, nk, D, window, out.data_ptr())
    q = _rope(qkv[:, :nq], cos[:, None], sin[:, None])  # (B, nq, D)
    k_new = _rope(qkv[:, nq : nq + nk], cos[:, None], sin[:, None])
    for b in range(B):
        p = int(pos[b])
        torch.testing.assert_close(kc[b, :, p], k_new[b], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(vc[b, :, p], qkv[b, nq + nk :])
        # nothing else of the cache moved
        keep = torch.ones(cap, dtype=torch.bool)
        keep[p] = False
        assert torch.equal(kc[b][:, keep], k_before[b][:, keep]) and torch.equal(vc[b][:, keep], v_before[b][:, keep])
        keys = torch.arange(cap)
        visible = (keys <= p) & ((keys > p - window) if window else True)
        expected = F.scaled_dot_product_attention(
            q[b][:, None], kc[b].repeat_interleave(nq // nk, 0), vc[b].repeat_interleave(nq // nk, 0), attn_mask=visible[None, None]
        )  # (nq, 1, D)
        torch.testing.assert_close(out[b].view(nq, D), expected[:, 0], atol=1e-5, rtol=1e-5)


def test_attn_rope_tokens_equals_torch_rope_then_attn_tokens(kernels):
    """A packed step's fused call (attention.c's attn_rope_tokens_f32: rope, cache write, attention)
    against torch's rope, the cache written by indexing and attn_tokens_f32: the same bits. Tokens
    of two rows, a 3-token prompt chunk beside a decode token, q/k heads read through a token
    stride (a view of the fused projection's output), a windowed layer."""
    nq, nk, D, cap, window = 4, 2, 8, 24, 6
    rows, pos = torch.tensor([0, 2, 2, 2]), torch.tensor([9, 4, 5, 6])
    qkv = rand(4, nq + 2 * nk, D, seed=11)  # (N, heads, D)
    qk, v = qkv[:, : nq + nk], qkv[:, nq + nk :]
    angles = pos[:, None].float() * (1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (N, D)
    fused_k, fused_v = rand(3, nk, cap, D, seed=12), rand(3, nk, cap, D, seed=13)
    torch_k, torch_v = fused_k.clone(), fused_v.clone()
    sb, sh, ss, _ = fused_k.stride()
    fused = torch.empty(4, nq, D)
    status = kernels.attn_rope_tokens_f32(
        qk.data_ptr(), qk.stride(0), v.data_ptr(), v.stride(0), cos.data_ptr(), sin.data_ptr(), rows.data_ptr(), pos.data_ptr(),
        fused_k.data_ptr(), fused_v.data_ptr(), sb, sh, ss, 4, nq, nk, D, window, 0.0, fused.data_ptr(),
    )  # fmt: skip
    assert status == 0
    roped = _rope(qk, cos[:, None], sin[:, None])
    torch_k[rows, :, pos], torch_v[rows, :, pos] = roped[:, nq:], v
    q = roped[:, :nq].contiguous()
    expected = torch.empty(4, nq, D)
    kernels.attn_tokens_f32(q.data_ptr(), rows.data_ptr(), pos.data_ptr(), torch_k.data_ptr(), torch_v.data_ptr(), sb, sh, ss, 4, nq, nk, D, window, 0.0, expected.data_ptr())
    assert torch.equal(fused_k, torch_k) and torch.equal(fused_v, torch_v)
    assert torch.equal(fused, expected)


# ---------------------------------------------------------------- whole models


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decode_with_kernels_equals_torch_path(kind, tmp_path, monkeypatch):
    """Token-by-token decode on the kernels vs the same model on torch only (LLMCLI_KERNELS=0)."""
    path = make_tiny(kind, tmp_path / kind)
    fast = load_model(path, cache_dir=tmp_path / "cache")
    monkeypatch.setenv("LLMCLI_KERNELS", "0")
    plain = load_model(path)
    assert isinstance(fast.module.model.layers[0].self_attn.qkv_proj, KernelLinear)
    assert type(plain.module.model.layers[0].self_attn.qkv_proj) is nn.Linear
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        logits = []
        for loaded in (fast, plain):
            cache = KVCache.for_model(loaded.config, 2, 64)
            loaded.module(ids[:, :5], cache=cache)
            steps = [loaded.module(ids[:, t : t + 1], cache=cache).logits for t in range(5, 9)]
            logits.append(torch.cat(steps, 1))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=0)


# One forward in a fresh process: a fresh prefill of two rows, a window-masked layer (gemma3), a
# second chunk on rows of different lengths, one decode step; every logit saved.
_FORWARDS = """
import sys, torch
from llmcli.core.loader import load_model
from llmcli.core.models.base import KVCache
loaded = load_model(sys.argv[1], quantize=sys.argv[2], cache_dir=sys.argv[3])
ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(3))
with torch.inference_mode():
    cache = KVCache.for_model(loaded.config, 2, 64)
    first = loaded.module(ids[:, :30], cache=cache, attention_mask=torch.tensor([[1] * 30, [1] * 24 + [0] * 6])).logits
    second = loaded.module(ids[:, 30:38], cache=cache).logits
    step = loaded.module(ids[:, 38:39], cache=cache).logits
torch.save([first, second, step, loaded.module(ids).logits], sys.argv[4])
"""


@pytest.mark.parametrize(
    "kind, quantize",
    [("llama", "q4_k"), ("qwen2", "none"), ("qwen3", "q4_k"), ("mistral-window", "none"), ("phi3", "q4_k"), ("gemma3", "none"), ("gemma3", "q4_k"), ("gpt2", "none")],
)
def test_kernels_forward_does_not_depend_on_torchs_vector_isa(kind, quantize, tmp_path):
    """The same bits whether torch dispatches to its AVX-512, AVX2 or unvectorized CPU kernels
    (ATEN_CPU_CAPABILITY=default): on the kernels' path nothing the logits depend on is summed by
    torch. With torch's SDPA, SmolLM2's perplexity moved 0.5% between AVX-512 and AVX2 machines."""
    import os
    import subprocess
    import sys

    path = make_tiny(kind, tmp_path / kind)
    results = []
    for isa in (None, "default"):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"} | ({"ATEN_CPU_CAPABILITY": isa} if isa else {})
        out = tmp_path / f"logits-{isa}.pt"
        done = subprocess.run([sys.executable, "-c", _FORWARDS, str(path), quantize, str(tmp_path / "cache"), str(out)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        results.append(torch.load(out))
    for ours, unvectorized in zip(*results):
        assert torch.equal(ours, unvectorized)


@pytest.mark.parametrize("quantize", ["none"])
def test_native_decode_with_ragged_rows_and_sliding_window(tmp_path, monkeypatch, quantize):
    """The one-call decode of all blocks, rows of different lengths, a window shorter than the text."""
    import json

    path = make_tiny("mistral", tmp_path / "mistral")
    config = json.loads((path / "config.json").read_text())
    config["sliding_window"] = 6
    (path / "config.json").write_text(json.dumps(config))
    fast = load_model(path, quantize=quantize, cache_dir=tmp_path / "cache")
    monkeypatch.setenv("LLMCLI_KERNELS", "0")
    plain = load_model(path, quantize=quantize)
    assert fast.module._native_blocks() is not None and plain.module._native_blocks() is None
    prompts = [[5, 9, 11], [7, 8, 9, 10, 11, 12, 13, 14, 15]]
    steps = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        logits = []
        for loaded in (fast, plain):
            cache = KVCache.for_model(loaded.config, 2, 64)
            for row, ids in enumerate(prompts):
                from llmcli.core.generate import prefill

                prefill(loaded.module, cache, row, ids)
            logits.append(torch.stack([loaded.module(steps[:, t : t + 1], cache=cache).logits[:, 0] for t in range(10)], 1))
            assert cache.lengths.tolist() == [13, 19]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=0)


def test_int8_refuses_other_dtypes(tmp_path):
    path = make_tiny("llama", tmp_path / "llama")
    with pytest.raises(UsageError, match="float32"):
        load_model(path, dtype="bfloat16", quantize="int8")
    with pytest.raises(UsageError, match="int4"):
        load_model(path, quantize="int4")


@pytest.mark.real
def test_int8_perplexity_within_2_percent_of_float32_on_smollm2(smollm2_gguf, llmcli_home):
    """The issue's quality bar, on the real model and the sample text (sonnet 18), HF sliding window."""
    from pathlib import Path

    from llmcli.core.perplexity import perplexity

    text = (Path(__file__).parent.parent / "sample_data" / "sonnet18.txt").read_text()
    results = {}
    for scheme in ("none", "int8"):
        loaded = load_model(smollm2_gguf, quantize=scheme, cache_dir=llmcli_home)
        ids = loaded.tokenizer.encode(text, add_special=False).ids
        results[scheme] = perplexity(loaded, ids, ctx=128, stride=64).ppl
    assert math.isfinite(results["int8"])
    assert abs(results["int8"] / results["none"] - 1) < 0.02, results


def test_without_a_working_compiler_models_run_on_torch(tmp_path, monkeypatch):
    """A machine whose C compiler fails gets no kernels, and loading falls back to plain torch layers."""
    monkeypatch.setenv("CC", "false")  # exists everywhere, fails every build
    assert load_kernels(tmp_path / "nocc") is None
    path = make_tiny("llama", tmp_path / "llama")
    loaded = load_model(path, cache_dir=tmp_path / "nocc-cache")
    assert type(loaded.module.model.layers[0].self_attn.qkv_proj) is nn.Linear
    ref = load_reference(path)
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(loaded.module(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


def test_bench_counts_the_checkpoint_parameters_in_int8_too(tmp_path):
    """`llmcli bench` reports the checkpoint's parameter count whatever the layout: Q8_0 blocks hold
    the same parameters in fewer bytes, and a tied embedding shares the output's blocks."""
    from llmcli.cli.bench import model_size

    path = make_tiny("llama", tmp_path / "llama")  # tied embeddings
    expected = load_reference(path).num_parameters()
    f32 = load_model(path)
    int8 = load_model(path, quantize="int8")
    size32, params32 = model_size(f32.module, tied_output=True)
    size8, params8 = model_size(int8.module, tied_output=True)
    assert params32 == params8 == expected
    assert size32 == 4 * expected and size8 < size32


def test_decode_blocks_on_each_build(kernels, tmp_path, monkeypatch):
    """The one-call decode step on the AVX-512 build and on the portable paths, against torch."""
    path = make_tiny("qwen2", tmp_path / "qwen2")  # q/k/v biases
    monkeypatch.setenv("LLMCLI_KERNELS", "0")
    plain, fast = load_model(path), load_model(path)
    accelerate_linears(fast.module, kernels, None)
    fast.module.use_kernels(kernels)
    assert fast.module._native_blocks() is not None
    ids = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        logits = []
        for loaded in (fast, plain):
            cache = KVCache.for_model(loaded.config, 3, 64)
            loaded.module(ids[:, :4], cache=cache)
            logits.append(torch.cat([loaded.module(ids[:, t : t + 1], cache=cache).logits for t in range(4, 12)], 1))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=0)
