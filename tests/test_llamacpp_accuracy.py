"""llmcli against llama.cpp (llama-cpp-python, `logits_all=True`) on the same GGUF file (issue 13, item 6).

Over 512 tokens of English (Hamlet, tests/conftest.py's `english_text`), as llama.cpp tokenizes
them with the file's vocabulary, both evaluate the whole sequence in one forward; then

- next-token top-1 agreement (argmax at each position) is at least 99%, and
- perplexity of the 511 next tokens is within 0.5% of llama.cpp's,

for a tiny random llama written with gguf.GGUFWriter in F32 and quantized by llama.cpp to every
supported type ("pure": every matrix in that one type), and for llama.cpp's F32 copy of the real
SmolLM2-135M-Instruct weights. The real quantized SmolLM2 files (Q4_1, and a Q8_0 and a Q4_K_M
that llama.cpp's quantizer makes from it) are held to llama.cpp's own reproducibility instead,
which is below 99% there (the section on them says why and how it is measured).

The random model also has its logits checked against llama.cpp's, with a bound derived from
the precision of what llama.cpp rounds. Both read the same weight blocks, so the weights are no
source of difference; llama.cpp's CPU matmul rounds the activations to its `vec_dot_type`
before every product with a weight matrix, and keeps K/V in F16:

- F32 weights: float32 activations, but K and V are rounded to F16, so F16's figure applies;
- F16: activations rounded to F16, relative error uniform in +-2^-11: rms 2^-11 / sqrt(3);
- BF16: activations rounded to BF16: rms 2^-8 / sqrt(3);
- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: activations in 8-bit blocks of 32 (Q8_0/Q8_1), step = max|x| / 127,
  error uniform in +-step/2: rms max|x| / (127 sqrt(12)) = crest(32) / (127 sqrt(12)) of the
  block's rms, where crest(n) = E[max|x| / rms(x)] over n Gaussian values (2.37 for 32);
- K-quants: activations in 8-bit blocks of 256 (Q8_K), the same with crest(256) (3.05).

That relative rms error `eps` goes through every layer's matmuls into the logits, so: the rms of
(llmcli - llama.cpp) over all logits is at most 3 eps times the rms of llama.cpp's logits (what
was measured is 0.2-1.3 eps for every type), and the largest single difference is at most
12 eps (measured: up to 7.6 eps). An llmcli that quantizes activations as ggml does comes closer,
and any real mistake (a wrong scale, a swapped block field) is orders of magnitude above.

A purely Gaussian random model would make the top-1 criterion a coin toss rather than a check:
the gap between its two largest logits falls below llama.cpp's own 8-bit rounding noise
(about 0.6% of the logits' spread) at 1-2% of positions. So the tiny model's output matrix holds,
besides Gaussian noise, token t's embedding in row perm[t]: the greedy next token after t is
perm[t] with a margin like a trained model's (well over 1 standard deviation of the logits),
while the distribution stays broad (perplexity of English about 600 with 512 tokens), so the
perplexity criterion still weighs every logit.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.make_random_gguf import Shape, quantize_gguf, tensor_plan, write_random_llama
from tests.llamacpp_ref import agreement_floor, assert_perplexity_agrees, llamacpp_logits, llamacpp_tokenize, perplexity, token_nll, top1_agreement

N_TOKENS = 512
MIN_TOP1 = 0.99
MAX_PPL_REL = 0.005

TINY = Shape(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=512, tied=False, context=1024, rope_theta=10000.0, n_special=4)


def crest(block: int, samples: int = 20000) -> float:
    """E[max|x| / rms(x)] over `block` standard Gaussian values (seeded Monte Carlo)."""
    x = np.random.default_rng(0).standard_normal((samples, block))
    return float(np.mean(np.abs(x).max(axis=1) / np.sqrt((x * x).mean(axis=1))))


F16_EPS = 2.0**-11 / math.sqrt(3)
BF16_EPS = 2.0**-8 / math.sqrt(3)
Q8_0_EPS = crest(32) / (127 * math.sqrt(12))
Q8_K_EPS = crest(256) / (127 * math.sqrt(12))

# llama.cpp preset -> (the GGML type every matrix has with `pure`, eps of llama.cpp's activation rounding for it)
TYPES = {
    "F32": ("F32", F16_EPS),
    "F16": ("F16", F16_EPS),
    "BF16": ("BF16", BF16_EPS),
    "Q8_0": ("Q8_0", Q8_0_EPS),
    "Q4_0": ("Q4_0", Q8_0_EPS),
    "Q4_1": ("Q4_1", Q8_0_EPS),
    "Q5_0": ("Q5_0", Q8_0_EPS),
    "Q5_1": ("Q5_1", Q8_0_EPS),
    "Q2_K": ("Q2_K", Q8_K_EPS),
    "Q3_K_M": ("Q3_K", Q8_K_EPS),
    "Q4_K_M": ("Q4_K", Q8_K_EPS),
    "Q5_K_M": ("Q5_K", Q8_K_EPS),
    "Q6_K": ("Q6_K", Q8_K_EPS),
}


def matrix_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> GGML type name, for the 2-D tensors (norms stay F32 in every preset)."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors if len(t.shape) == 2}


@torch.inference_mode()
def llmcli_logits(path: Path, ids: list[int], loaded=None) -> np.ndarray:
    """llmcli's logits at every position of one forward of ids (loaded: an already loaded model of path)."""
    from llmcli.core.loader import load_model

    loaded = loaded or load_model(path)
    return loaded.module(torch.tensor([ids])).logits[0].float().numpy()


def check_agreement(ours: np.ndarray, ref: np.ndarray, ids: list[int]) -> tuple[float, float, float]:
    top1 = top1_agreement(ours, ref)
    ppl_ours, ppl_ref = perplexity(ours, ids), perplexity(ref, ids)
    assert top1 >= MIN_TOP1, f"top-1 agreement {top1:.4f} < {MIN_TOP1}"
    assert abs(ppl_ours / ppl_ref - 1) <= MAX_PPL_REL, f"perplexity {ppl_ours:.4f} vs llama.cpp {ppl_ref:.4f}"
    return top1, ppl_ours, ppl_ref


# ---------------------------------------------------------------- the tiny random llama, every type


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """(the F32 GGUF, perm): random weights, and output row perm[t] = Gaussian noise + 0.15 x token t's embedding."""
    rng = np.random.default_rng(1)
    embedding = rng.standard_normal((TINY.vocab, TINY.hidden), dtype=np.float32) * np.float32(0.1)
    perm = rng.permutation(TINY.vocab)
    output = rng.standard_normal((TINY.vocab, TINY.hidden), dtype=np.float32) * np.float32(0.02)
    output[perm] += np.float32(0.15) * embedding
    path = tmp_path_factory.mktemp("llamacpp-tiny") / "tiny-F32.gguf"
    write_random_llama(path, TINY, "F32", seed=2, given={"token_embd.weight": embedding, "output.weight": output})
    return path, perm


@pytest.fixture(scope="module")
def tiny_ids(tiny_f32, english_text) -> list[int]:
    ids = llamacpp_tokenize(tiny_f32[0], english_text)[:N_TOKENS]
    assert len(ids) == N_TOKENS
    return ids


def test_tiny_model_has_margins_like_a_trained_one(tiny_f32, tiny_ids):
    """The premise of the top-1 check: llama.cpp's greedy token after t is perm[t] everywhere, by a
    margin of more than 1 standard deviation of the logits, i.e. over 100x the bound below."""
    path, perm = tiny_f32
    ref = llamacpp_logits(path, tiny_ids)
    assert np.array_equal(ref.argmax(-1), perm[np.asarray(tiny_ids)])
    top2 = np.sort(ref, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > ref.std()
    assert 100 < perplexity(ref, tiny_ids) < TINY.vocab * 4  # broad: every logit counts in the perplexity


@pytest.mark.parametrize("preset", list(TYPES))
def test_tiny_random_llama_agrees_with_llamacpp(tiny_f32, tiny_ids, preset, tmp_path):
    source, _ = tiny_f32
    ggml_type, eps = TYPES[preset]
    path = source if preset == "F32" else quantize_gguf(source, tmp_path / f"tiny-{preset}.gguf", preset, pure=True)
    types = matrix_types(path)
    assert set(types) == {name for name, dims in tensor_plan(TINY) if len(dims) == 2}
    assert set(types.values()) == {ggml_type}, types

    ref = llamacpp_logits(path, tiny_ids)
    ours = llmcli_logits(path, tiny_ids)
    check_agreement(ours, ref, tiny_ids)
    scale = float(np.sqrt(np.mean(np.square(ref - ref.mean()))))
    rms = float(np.sqrt(np.mean(np.square(ours - ref)))) / scale
    worst = float(np.abs(ours - ref).max()) / scale
    assert rms <= 3 * eps, f"rms difference {rms:.3g} of the logits' spread > 3 eps = {3 * eps:.3g}"
    assert worst <= 12 * eps, f"largest difference {worst:.3g} of the logits' spread > 12 eps = {12 * eps:.3g}"


# ---------------------------------------------------------------- the real SmolLM2 file and two requantized copies
#
# On a real model the 99% top-1 is below llama.cpp's own reproducibility. SmolLM2 has large
# activation outliers, so a block's 8-bit rounding of its activations is coarse, and any difference
# upstream, however small, moves some roundings and is amplified to the 8-bit noise level. llama.cpp
# run twice on the same file, once with its default F16 K/V cache and once with an F32 cache and no
# flash attention, agrees with itself on only 94.9-97.3% of the 512 positions (measured 2026-12-02:
# Q4_1 97.3%, Q8_0 96.5%, Q4_K_M 94.9%), and its perplexities differ by up to 1.3%. So the real files
# are held to what llama.cpp holds itself to: llmcli agrees with llama.cpp (F32 cache: the same
# attention arithmetic as llmcli) at least as often as llama.cpp's two runs agree with each other,
# less two binomial standard errors of that rate over 512 positions; and llmcli's log perplexity
# is as far from llama.cpp's (F32 cache) as llama.cpp's default run is, plus three standard errors
# of the mean per-token difference (llamacpp_ref.log_perplexity_allowance). A fixed 0.5% was a
# coin flip: the same llmcli with attention summed by torch's AVX2 or AVX-512 SDPA, or with
# torch's gelu instead of its own, moved these perplexities by 0.5-0.8%. Where the model has no
# 8-bit activation rounding (F32 weights: the control test below) the issue's own criteria hold.
# The mechanism is measured in benchmarks/README.md ("Agreement with llama.cpp"): with matmul,
# rms_norm and rope made bit-identical to ggml's (benchmarks/ggml_exact_ops.py), block 0's Q, K and
# V equal llama.cpp's bit for bit, and one last-bit difference in attention still spreads to every
# row within two blocks; top-1 ends at 96.9%.


@pytest.fixture(scope="module")
def smollm2_files(smollm2_gguf, tmp_path_factory) -> dict[str, Path]:
    """The catalogue's Q4_1 file, a Q8_0 and a Q4_K_M that llama.cpp's quantizer makes of it
    (allow_requantize), and llama.cpp's F32 copy of the Q4_1 weights (the control)."""
    folder = tmp_path_factory.mktemp("llamacpp-smollm2")
    files = {"Q4_1": smollm2_gguf}
    for preset in ("Q8_0", "Q4_K_M", "F32"):
        files[preset] = quantize_gguf(smollm2_gguf, folder / f"smollm2-{preset}.gguf", preset)
    return files


@pytest.fixture(scope="module")
def smollm2_ids(smollm2_gguf, english_text) -> list[int]:
    ids = llamacpp_tokenize(smollm2_gguf, english_text)[:N_TOKENS]
    assert len(ids) == N_TOKENS
    return ids


@pytest.fixture(scope="module")
def smollm2_logits(smollm2_files, smollm2_ids, smollm2_loaded):
    """preset -> llmcli's logits; each file loaded once, then dropped."""
    from llmcli.core.loader import load_model

    done: dict[str, np.ndarray] = {}

    def get(preset: str) -> np.ndarray:
        if preset not in done:
            path = smollm2_files[preset]
            loaded = smollm2_loaded if path == smollm2_files["Q4_1"] else load_model(path)
            done[preset] = llmcli_logits(path, smollm2_ids, loaded=loaded)
        return done[preset]

    return get


def holds_blocks(loaded, path: Path) -> bool:
    """Whether the loaded model keeps the GGUF's quantized matrices as blocks (no float32 copy)."""
    from gguf import GGUFReader

    quantized = sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors if t.tensor_type.name not in ("F32", "F16", "BF16"))
    tensors = [*loaded.module.parameters(), *loaded.module.buffers()]
    float32_bytes = sum(t.numel() * 4 for t in tensors if t.dtype == torch.float32)
    return float32_bytes < 0.1 * 4 * quantized


SMOLLM2_PRESETS = [("Q4_1", {"Q4_1"}), ("Q8_0", {"Q8_0"}), ("Q4_K_M", {"Q4_K", "Q6_K"})]


@pytest.mark.real
def test_smollm2_runs_on_its_blocks(smollm2_files, smollm2_loaded):
    assert holds_blocks(smollm2_loaded, smollm2_files["Q4_1"])


@pytest.mark.real
@pytest.mark.parametrize("preset, expected", SMOLLM2_PRESETS)
def test_smollm2_agrees_with_llamacpp_as_llamacpp_agrees_with_itself(smollm2_files, smollm2_ids, smollm2_logits, preset, expected):
    path = smollm2_files[preset]
    assert expected <= set(matrix_types(path).values())
    ours = smollm2_logits(preset)
    default, f32_kv = llamacpp_logits(path, smollm2_ids), llamacpp_logits(path, smollm2_ids, f32_kv=True)
    itself = top1_agreement(default, f32_kv)
    floor = agreement_floor(itself, len(smollm2_ids), MIN_TOP1)
    top1 = top1_agreement(ours, f32_kv)
    assert top1 >= floor, f"top-1 agreement {top1:.4f} < {floor:.4f} (llama.cpp with itself: {itself:.4f})"
    nll = {name: token_nll(logits, smollm2_ids) for name, logits in (("ours", ours), ("default", default), ("f32_kv", f32_kv))}
    assert 1 < math.exp(nll["f32_kv"].mean()) < 100  # a real model on English text
    assert_perplexity_agrees(nll["ours"], nll["f32_kv"], nll["default"])


@pytest.mark.real
def test_smollm2_float32_weights_agree_with_llamacpp(smollm2_files, smollm2_ids):
    """The control, at the issue's own criteria: llama.cpp's F32 copy of the Q4_1 weights, where
    neither side rounds an activation to 8 bits (llama.cpp with its F32 K/V cache)."""
    path = smollm2_files["F32"]
    assert set(matrix_types(path).values()) == {"F32"}
    check_agreement(llmcli_logits(path, smollm2_ids), llamacpp_logits(path, smollm2_ids, f32_kv=True), smollm2_ids)
