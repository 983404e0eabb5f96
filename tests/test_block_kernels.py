"""The block kernels (llmcli/core/kernels/blocks.c) against gguf-py, a float64 reference and each other.

For every weight type of blocks.c: dequantization equals gguf-py's bit for bit, quantization
writes gguf-py's bytes (its quantizers mirror llama.cpp's quantize_row_*_ref), block_matmul is
within a derived float32 bound of a float64 product of the dequantized operands, and its bits do
not depend on the number of rows, the tile or the thread count, nor on the ISA path (portable C,
AVX2 here; NEON under qemu through tests/kernels/check_blocks.c; AVX-512 compiled only).

CI runs this file a second time with LLMCLI_ISA=portable, so the default build below is then
the portable one.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from llmcli.core import kernels as kmod
from llmcli.core.kernels import BlockDesc, LinearDesc, available_isas, load_kernels
from llmcli.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
KDIR = ROOT / "llmcli" / "core" / "kernels"
OURS = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
KQUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
WITH_MIN = (T.Q4_1, T.Q5_1)  # x = d * q + m
U = 2.0**-24  # float32 unit roundoff
APT = "apt-get install -y gcc-aarch64-linux-gnu qemu-user"


@pytest.fixture(scope="module")
def kernels():
    built = load_kernels()  # LLMCLI_ISA decides, else the best level of this CPU
    assert built is not None, "the C compiler on this machine failed to build llmcli/core/kernels"
    return built


@pytest.fixture(scope="module", params=[isa for isa in available_isas() if isa != "portable"] or ["portable"])
def pair(request):
    """The portable build and each SIMD level this CPU runs (an AVX-512 CPU checks its AVX2 level
    too: without VNNI the prompt kernels take another integer path)."""
    builds = {isa: load_kernels(isa=isa) for isa in ("portable", request.param)}
    assert all(b is not None for b in builds.values())
    assert builds["portable"].isa == "portable" and builds[request.param].isa == request.param
    return builds["portable"], builds[request.param]


def ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data


def make_weights(t: T, N: int, K: int, seed: int = 0) -> np.ndarray:
    """(N, row bytes) of weight blocks: random normal rows as gguf-py stores them, plus extremes
    a quantizer never writes (Q8_0's -128) so the kernels see the whole value range."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * rng.uniform(0.01, 2.0, (N, 1))).astype(np.float32)
    if t == T.F32:
        return w.view(np.uint8).reshape(N, -1).copy()
    if t == T.F16:
        return w.astype(np.float16).view(np.uint8).reshape(N, -1).copy()
    blocks = np.ascontiguousarray(quants.quantize(w, t))
    if t == T.Q8_0:
        b = blocks.reshape(N, -1, 34)
        b[:, :, 2 + rng.integers(0, 32, 3)] = 0x80
    return blocks


def act_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's 8-bit activation blocks of 32 (block_q8_0 / block_q8_1): values round(x / delta) half
    to even with delta = amax / 127 in float32, then the delta and s = delta * sum(q) kept as
    binary16. Returns q (M, K/32, 32), the binary16 delta and s (M, K/32), as float64."""
    M, K = x.shape
    xb = x.reshape(M, K // 32, 32)
    d = (np.abs(xb).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv)
    isum = q.sum(-1).astype(np.float32)
    s = (d[..., 0] * isum).astype(np.float16).astype(np.float64)
    return q.astype(np.float64), d[..., 0].astype(np.float16).astype(np.float64), s


def act_reference(t: T, x: np.ndarray) -> np.ndarray:
    """The activation values the kernels multiply, in float64: float32 as they are for the float
    types, else act_blocks' values times their binary16 delta."""
    if t in FLOAT_TYPES:
        return x.astype(np.float64)
    q, d, _ = act_blocks(x)
    return (q * d[..., None]).reshape(x.shape)


def min_term_correction(t: T, x: np.ndarray, blocks: np.ndarray, K: int) -> np.ndarray:
    """(M, N): what the min term adds beyond act_reference for Q4_1/Q5_1, whose kernels multiply a
    block's min by the activation's binary16 s instead of delta * sum(q) (as ggml does)."""
    M, N = x.shape[0], blocks.shape[0]
    if t not in WITH_MIN:
        return np.zeros((M, N))
    q, d, s = act_blocks(x)
    size = quants.GGML_QUANT_SIZES[t][1]
    m = blocks.reshape(N, K // 32, size)[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    return (s - d * q.sum(-1)) @ m.T


def block_mins(t: T, blocks: np.ndarray, K: int) -> np.ndarray:
    """|m| of each block, repeated over its 32 values (zero for types without a min)."""
    N = blocks.shape[0]
    if t not in WITH_MIN:
        return np.zeros((N, K))
    size = quants.GGML_QUANT_SIZES[t][1]
    m = blocks.reshape(N, K // 32, size)[:, :, 2:4].copy().view(np.float16).astype(np.float64)
    return np.repeat(np.abs(m).reshape(N, K // 32), 32, axis=1)


def matmul(k, t: T, x: np.ndarray, blocks: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    M, K = x.shape
    N = blocks.shape[0]
    y = np.full((M, N), np.nan, dtype=np.float32)
    assert k.block_matmul(int(t), ptr(x), ptr(blocks), ptr(bias), ptr(y), M, N, K) == 0
    return y


def dequantize(k, t: T, blocks: np.ndarray, rows: np.ndarray, K: int) -> np.ndarray:
    out = np.full((len(rows), K), np.nan, dtype=np.float32)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    assert k.block_dequantize_rows(int(t), ptr(blocks), ptr(rows), len(rows), K, ptr(out)) == 0
    return out


def quantize(k, t: T, w: np.ndarray, row_bytes: int) -> np.ndarray:
    out = np.zeros((w.shape[0], row_bytes), dtype=np.uint8)
    assert k.block_quantize_rows(int(t), ptr(w), ptr(out), w.shape[0], w.shape[1]) == 0
    return out


def k_for(t: T) -> int:
    """K not a multiple of the 4-wide tile's natural 128 (3 blocks), ragged for the float types"""
    return 77 if t in FLOAT_TYPES else 96


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("t", OURS, ids=lambda t: t.name)
def test_dequantize_rows_equals_gguf(kernels, t):
    N, K = 37, k_for(t)
    blocks = make_weights(t, N, K, seed=1)
    want = quants.dequantize(blocks, t).reshape(N, K).astype(np.float32)
    rows = np.array([5, 0, 36, 5, 17])  # an embedding lookup: any order, repeats
    assert np.array_equal(bits(dequantize(kernels, t, blocks, np.arange(N), K)), bits(want))
    assert np.array_equal(bits(dequantize(kernels, t, blocks, rows, K)), bits(want[rows]))


@pytest.mark.parametrize("t", OURS, ids=lambda t: t.name)
def test_quantize_rows_equals_gguf(kernels, t):
    N, K = 37, k_for(t)
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((N, K)) * rng.uniform(0.01, 2.0, (N, 1))).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block: delta 0
    w[4, :32] = 0.25  # a constant block: Q4_1 / Q5_1 with max == min
    if t == T.F32:
        want = w.view(np.uint8)
    elif t == T.F16:
        want = w.astype(np.float16).view(np.uint8)
    else:
        want = quants.quantize(w, t)
    assert np.array_equal(quantize(kernels, t, w, want.shape[1]), want.reshape(N, -1))


def error_bound(t: T, a: np.ndarray, w: np.ndarray, mins: np.ndarray, bias: np.ndarray, K: int) -> np.ndarray:
    """|computed - exact| for y = a w^T + bias, a worst case from the operations the kernels do.

    Per term: the dequantized weight's two roundings (d*q, + m), the scale product d_w * d_a, the
    product with the integer sum; then one addition per 32-value block (lane accumulation), three in
    the horizontal sum, one for the min term and one for the bias. With n such roundings on every
    path, |error| <= gamma_n * (sum |terms| + |bias|), gamma_n = n u / (1 - n u). The terms of the
    integer part are d_w q a = (w - m) a, the min part's m a, so |w| + 2 |m| bounds them."""
    n = -(-K // 32) + 9
    gamma = n * U / (1 - n * U)
    terms = np.abs(a) @ (np.abs(w) + 2 * mins).T
    return gamma * (terms + np.abs(bias))


@pytest.mark.parametrize("t", OURS, ids=lambda t: t.name)
def test_matmul_within_float32_bound_of_float64_reference(kernels, t):
    N, K, M = 37, k_for(t), 17
    blocks = make_weights(t, N, K, seed=3)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[2] *= 100.0  # rows of very different scales
    x[5, : K // 2] = 0.0  # all-zero activation blocks: delta 0
    bias = rng.standard_normal(N).astype(np.float32)
    w = quants.dequantize(blocks, t).reshape(N, K).astype(np.float64)
    a = act_reference(t, x)
    want = a @ w.T + bias + min_term_correction(t, x, blocks, K)
    got = matmul(kernels, t, x, blocks, bias).astype(np.float64)
    bound = error_bound(t, a, w, block_mins(t, blocks, K), bias, K)
    assert np.all(np.abs(got - want) <= bound), f"worst excess {np.max(np.abs(got - want) - bound)}"
    assert not np.array_equal(got, want.astype(np.float32))  # the bound is not vacuous: float32 rounding shows


@pytest.mark.parametrize("t", OURS, ids=lambda t: t.name)
def test_rows_do_not_depend_on_batch_tile_or_threads(kernels, t):
    N, K = 37, k_for(t) * 3
    blocks = make_weights(t, N, K, seed=5)
    x = np.random.default_rng(6).standard_normal((64, K)).astype(np.float32)
    bias = np.random.default_rng(7).standard_normal(N).astype(np.float32)
    full = matmul(kernels, t, x, blocks, bias)
    for M in (1, 3, 17):
        assert np.array_equal(bits(matmul(kernels, t, x[:M], blocks, bias)), bits(full[:M])), M
    assert np.array_equal(bits(matmul(kernels, t, x[9:10], blocks, bias)), bits(full[9:10]))  # a row alone, off the tile grid
    try:
        for threads in (1, 3):
            kmod.set_threads(threads)
            assert np.array_equal(bits(matmul(kernels, t, x, blocks, bias)), bits(full)), threads
    finally:
        kmod.set_threads(0)


def test_concurrent_callers_and_a_forked_child_get_the_same_bits(kernels):
    """blocks.c's task pool takes one caller at a time: products started at once from several
    Python threads (the GIL is released in ctypes calls) each run whole, the others on their own
    thread, and a child forked after the pool started (its helpers are not copied) computes
    decode-sized products alone."""
    import os
    import threading

    t, N, K = T.Q4_1, 96, 512
    blocks = make_weights(t, N, K, seed=11)
    xs = [np.random.default_rng(12 + i).standard_normal((M, K)).astype(np.float32) for i, M in enumerate((1, 7, 33, 64))]
    want = [matmul(kernels, t, x, blocks, None) for x in xs]
    got: dict[int, list] = {}

    def work(i: int) -> None:
        got[i] = [bits(matmul(kernels, t, xs[i % 4], blocks, None)) for _ in range(20)]

    kmod.set_threads(2)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the parent's pool has helpers, this process has none
            os.close(read)
            # decode-sized products only: prompts run on OpenMP, and GNU OpenMP hangs in a forked
            # child of a process that used it (its threads are not copied)
            ok = all(np.array_equal(bits(matmul(kernels, t, x, blocks, None)), bits(w)) for x, w in zip(xs, want) if len(x) <= 16)
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
        os.close(write)
        child = os.read(read, 1)
        os.close(read)
        os.waitpid(pid, 0)
    finally:
        kmod.set_threads(0)
    for i, runs in got.items():
        assert all(np.array_equal(r, bits(want[i % 4])) for r in runs), i
    assert child == b"1"


@pytest.mark.parametrize("t", OURS, ids=lambda t: t.name)
def test_portable_and_simd_builds_give_the_same_bits(pair, t):
    """On x86 the portable build against AVX2 (AVX-512 where the CPU has it), on ARM against NEON."""
    portable, simd = pair
    N, K = 37, k_for(t) * 2
    blocks = make_weights(t, N, K, seed=8)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    w = rng.standard_normal((5, K)).astype(np.float32)
    rb = blocks.shape[1]
    for run in (
        lambda k: matmul(k, t, x, blocks, bias),
        lambda k: matmul(k, t, x[:1], blocks, None),
        lambda k: dequantize(k, t, blocks, np.arange(N), K),
        lambda k: quantize(k, t, w, rb),
    ):
        assert np.array_equal(bits(run(portable)), bits(run(simd)))


def test_float32_attention_and_gelu_give_the_same_bits_on_every_build(pair):
    """attention.c and activations.c (what a prefill runs besides the matmuls): portable against
    AVX2 paths, GQA, a window, rows at different positions, GeGLU, LayerNorm and plain gelu."""
    rng = np.random.default_rng(11)
    N, nq, nk, D, S = 9, 6, 2, 40, 30
    q = rng.standard_normal((N, nq, D)).astype(np.float32)
    kc, vc = (rng.standard_normal((3, nk, S, D)).astype(np.float32) for _ in range(2))
    rows = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2], dtype=np.int64)
    pos = np.array([0, 1, 2, 17, 18, 25, 26, 27, 29], dtype=np.int64)
    gate_up = (rng.standard_normal((7, 2 * 333)) * 4).astype(np.float32)

    def attention(k, window):
        out = np.zeros_like(q)
        st = [s // 4 for s in kc.strides[:3]]
        assert k.attn_tokens_f32(ptr(q), ptr(rows), ptr(pos), ptr(kc), ptr(vc), *st, N, nq, nk, D, window, 0.0, ptr(out)) == 0
        return out

    def gelu(k):
        out = np.zeros((7, 333), dtype=np.float32)
        k.gelu_tanh_mul_f32(ptr(gate_up), ptr(out), 7, 333)
        return out

    def layer_norm(k):
        out = np.zeros((7, 333), dtype=np.float32)
        x, w, b = gate_up[:, :333].copy(), gate_up[0, :333].copy(), gate_up[1, :333].copy()  # held: ptr() keeps no reference
        k.layer_norm_f32(ptr(x), ptr(w), ptr(b), ptr(out), 7, 333, 1e-5)
        return out

    def plain_gelu(k):
        x = gate_up[:, :333].copy()
        out = np.zeros_like(x)
        k.gelu_tanh_f32(ptr(x), ptr(out), 7, 333)
        return out

    portable, simd = pair
    for run in (lambda k: attention(k, 0), lambda k: attention(k, 7), gelu, layer_norm, plain_gelu):
        assert np.array_equal(bits(run(portable)), bits(run(simd)))


def test_k_that_is_not_whole_blocks_and_unknown_types_are_refused(kernels):
    x = np.zeros((1, 40), dtype=np.float32)
    w = np.zeros(100, dtype=np.uint8)
    y = np.zeros(2, dtype=np.float32)
    assert kernels.block_matmul(int(T.Q4_0), ptr(x), ptr(w), None, ptr(y), 1, 2, 40) == -3
    assert kernels.block_matmul(int(T.IQ2_XXS), ptr(x), ptr(w), None, ptr(y), 1, 2, 32) == -2
    assert kernels.block_type_supported(int(T.IQ2_XXS)) == 0
    assert all(kernels.block_type_supported(int(t)) == 1 for t in OURS)
    kquants_built = (KDIR / "kquants.c").is_file()
    assert all(kernels.block_type_supported(int(t)) == int(kquants_built) for t in KQUANTS)


def blocks_desc(t: T, blocks: np.ndarray, N: int, K: int, bias: np.ndarray | None = None) -> LinearDesc:
    return LinearDesc(kind=2, weight=ptr(blocks), bias=ptr(bias), n=N, k=K, type=int(t))


def test_linear_kinds_2_and_3_equal_block_matmul(kernels):
    """kind 3 (fused qkv / gate_up: parts of different types side by side, one call) gives each
    part's block_matmul bits; kind 2 is one part."""
    K, M = 64, 5
    rng = np.random.default_rng(10)
    x = rng.standard_normal((M, K)).astype(np.float32)
    specs = [(T.Q4_0, 24), (T.Q8_0, 7), (T.F16, 9), (T.Q5_1, 5)]
    parts, want, keep = [], [], []
    for i, (t, n) in enumerate(specs):
        blocks = make_weights(t, n, K, seed=20 + i)
        bias = rng.standard_normal(n).astype(np.float32) if i % 2 else None
        keep.append((blocks, bias))
        parts.append(blocks_desc(t, blocks, n, K, bias))
        want.append(matmul(kernels, t, x, blocks, bias))
        y = np.zeros((M, n), dtype=np.float32)
        assert kernels.linear_forward(ctypes.byref(parts[-1]), ptr(x), ptr(y), M) == 0
        assert np.array_equal(bits(y), bits(want[-1]))
    array = (LinearDesc * len(parts))(*parts)
    total = sum(n for _, n in specs)
    fused = LinearDesc(kind=3, n=total, k=K, parts=array, nparts=len(parts))
    y = np.zeros((M, total), dtype=np.float32)
    assert kernels.linear_forward(ctypes.byref(fused), ptr(x), ptr(y), M) == 0
    assert np.array_equal(bits(y), bits(np.concatenate(want, axis=1)))
    wrong = LinearDesc(kind=3, n=total + 1, k=K, parts=array, nparts=len(parts))  # n is not the parts' sum
    assert kernels.linear_forward(ctypes.byref(wrong), ptr(x), ptr(y), M) == -2


def test_isa_levels(monkeypatch):
    assert available_isas()[-1] == "portable"
    monkeypatch.setenv("LLMCLI_ISA", "portable")
    assert kmod.select_isa() == "portable"
    for bad in ("sse9", "neon" if available_isas()[0] != "neon" else "avx2"):
        monkeypatch.setenv("LLMCLI_ISA", bad)
        with pytest.raises(UsageError, match=f"LLMCLI_ISA={bad}"):
            kmod.select_isa()


def test_avx512_build_compiles(tmp_path):
    """This machine (AVX2 only) cannot run the AVX-512 path, so it is only compiled here, with the
    flags the library uses, and checked to be the AVX-512 path; its bits are checked where the CPU
    has AVX-512 (test_portable_and_simd_builds_give_the_same_bits then pairs portable with it)."""
    cc = kmod._compiler()
    assert cc is not None
    # with and without the VNNI dot products (CPUs that have it get them: kmod._isa_flags)
    for extra in ((), ("-mavx512vnni",)):
        cmds = [cmd for cmd in kmod._compile_commands(cc, "avx512", extra, tmp_path) if "matvec.c" not in cmd[-3]]
        assert cmds and any(cmd[-3].endswith("blocks.c") for cmd in cmds)
        for cmd in cmds:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
        assert b"avx512\0" in (tmp_path / "blocks.o").read_bytes()  # block_isa's answer in that object


def harness(compiler: list[str], out: Path, run: list[str]) -> list[str]:
    sources = [str(ROOT / "tests" / "kernels" / "check_blocks.c")] + [str(KDIR / s) for s in kmod.BLOCK_SOURCES if (KDIR / s).is_file()]
    done = subprocess.run([*compiler, "-ffp-contract=off", *sources, "-o", str(out), "-lm"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*run, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    return done.stdout.splitlines()


def test_neon_under_qemu_equals_portable(tmp_path):
    """The C harness built natively with the portable path and cross-built for AArch64 (NEON with
    the dot-product extension, and plain NEON) under qemu-user: the same bits for every type."""
    missing = [tool for tool in ("aarch64-linux-gnu-gcc", "qemu-aarch64") if shutil.which(tool) is None]
    assert not missing, f"{', '.join(missing)} not found; install them with: {APT}"
    native = harness(["gcc", "-O2", "-DLLMCLI_PORTABLE"], tmp_path / "portable", [])
    assert native[0] == "isa portable"
    expected = OURS + (KQUANTS if (KDIR / "kquants.c").is_file() else [])
    assert [int(line.split()[0]) for line in native if line.endswith(" covered")] == [int(t) for t in expected]
    assert not any(line.endswith(" failed") for line in native)
    for march in ("armv8.2-a+dotprod", "armv8-a"):
        arm = harness(["aarch64-linux-gnu-gcc", "-O2", f"-march={march}", "-static"], tmp_path / f"arm-{march}", ["qemu-aarch64"])
        assert arm[0] == "isa neon"
        assert len(arm) == len(native)
        for mine, theirs in zip(arm[1:], native[1:]):
            assert mine == theirs, f"{march}: {mine[:60]} differs from the portable build"


def test_decode_step_runs_kinds_2_and_3(kernels):
    """decode_blocks_f32 on a layer of GGML-block projections (fused qkv and gate_up as kind 3 of
    parts of different types, o and down as kind 2) is the composition of its separately tested
    parts: rms_norm_f32, block_matmul per part, attn_decode_f32, silu_mul_f32, residual adds."""
    B, d, nq, nk, D, inter, cap, eps = 2, 64, 4, 2, 16, 96, 10, 1e-5
    rng = np.random.default_rng(30)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    specs = {"q": (T.Q8_0, nq * D, d), "k": (T.Q4_0, nk * D, d), "v": (T.Q5_1, nk * D, d), "o": (T.Q4_1, d, nq * D),
             "gate": (T.Q5_0, inter, d), "up": (T.F16, inter, d), "down": (T.Q8_0, d, inter)}  # fmt: skip
    w = {name: make_weights(t, n, k, seed=40 + i) for i, (name, (t, n, k)) in enumerate(specs.items())}
    desc = {name: blocks_desc(t, w[name], n, k) for name, (t, n, k) in specs.items()}
    qkv_parts = (LinearDesc * 3)(desc["q"], desc["k"], desc["v"])
    gu_parts = (LinearDesc * 2)(desc["gate"], desc["up"])
    norms = f32(d), f32(d)
    layer = BlockDesc(
        ptr(norms[0]), ptr(norms[1]),
        LinearDesc(kind=3, n=(nq + 2 * nk) * D, k=d, parts=qkv_parts, nparts=3), desc["o"],
        LinearDesc(kind=3, n=2 * inter, k=d, parts=gu_parts, nparts=2), desc["down"],
    )  # fmt: skip
    x0 = f32(B, d)
    pos = np.array([3, 7], dtype=np.int64)
    cos, sin = f32(B, D), f32(B, D)
    caches = [f32(B, nk, cap, D) for _ in range(4)]  # k, v for the step; k, v for the reference
    caches[2][:], caches[3][:] = caches[0], caches[1]
    sb, sh, ss = (s // 4 for s in caches[0].strides[:3])
    x = x0.copy()
    status = kernels.decode_blocks_f32(
        (BlockDesc * 1)(layer), 1, ptr(x), B, d, eps, nq, nk, D, 0, ptr(cos), ptr(sin), ptr(pos),
        (ctypes.c_void_p * 1)(ptr(caches[0])), (ctypes.c_void_p * 1)(ptr(caches[1])), sb, sh, ss,
    )  # fmt: skip
    assert status == 0

    def norm(v, weight):
        out = np.empty_like(v)
        kernels.rms_norm_f32(ptr(v), ptr(weight), ptr(out), B, d, eps)
        return out

    def proj(v, *names):
        return np.concatenate([matmul(kernels, specs[n][0], v, w[n], None) for n in names], axis=1)

    ref = x0.copy()
    qkv = proj(norm(ref, norms[0]), "q", "k", "v")
    att = np.empty((B, nq * D), dtype=np.float32)
    assert kernels.attn_decode_f32(ptr(qkv), ptr(cos), ptr(sin), ptr(pos), ptr(caches[2]), ptr(caches[3]), sb, sh, ss, B, nq, nk, D, 0, ptr(att)) == 0
    ref = ref + proj(att, "o")
    gu = proj(norm(ref, norms[1]), "gate", "up")
    h = np.empty((B, inter), dtype=np.float32)
    kernels.silu_mul_f32(ptr(gu), ptr(h), B, inter)
    ref = ref + proj(h, "down")
    assert np.array_equal(bits(x), bits(ref))
    assert np.array_equal(caches[0], caches[2]) and np.array_equal(caches[1], caches[3])


def test_failed_allocations_are_reported(kernels):
    """Scratch larger than any machine (terabytes): the kernels return -1 before touching their
    inputs, which the Python side raises as MemoryError."""
    x = np.zeros(2048, dtype=np.float32)
    w = np.zeros(64 * 18, dtype=np.uint8)
    y = np.zeros(1, dtype=np.float32)
    assert kernels.block_matmul(int(T.Q4_0), ptr(x), ptr(w), None, ptr(y), 1 << 30, 1, 2048) == -1  # 2.7 TB of activation blocks
    big = 1 << 28  # rows of a decode step: 64 GiB per scratch buffer
    layer = (BlockDesc * 1)(BlockDesc(None, None, LinearDesc(n=64, k=64), LinearDesc(), LinearDesc(n=1 << 12), LinearDesc()))
    status = kernels.decode_blocks_f32(layer, 1, None, big, 64, 1e-5, 1, 1, 64, 0, None, None, None, None, None, 0, 0, 0)
    assert status == -1


def test_concatenation_with_a_float32_panel_part(kernels):
    """A kind-3 part may also be matvec.c's float32 panels (kind 0): its columns equal
    matmul_panels_f32's, the block part's equal block_matmul's."""
    import torch

    from llmcli.core.kernels.linear import pack_panels

    K, M, n0, n1 = 64, 3, 40, 12
    rng = np.random.default_rng(50)
    x = rng.standard_normal((M, K)).astype(np.float32)
    dense = rng.standard_normal((n0, K)).astype(np.float32)
    panels = pack_panels(torch.from_numpy(dense)).numpy()
    blocks = make_weights(T.Q4_0, n1, K)
    parts = (LinearDesc * 2)(LinearDesc(kind=0, weight=ptr(panels), n=n0, k=K), blocks_desc(T.Q4_0, blocks, n1, K))
    y = np.zeros((M, n0 + n1), dtype=np.float32)
    assert kernels.linear_forward(ctypes.byref(LinearDesc(kind=3, n=n0 + n1, k=K, parts=parts, nparts=2)), ptr(x), ptr(y), M) == 0
    want0 = np.zeros((M, n0), dtype=np.float32)
    assert kernels.matmul_panels_f32(ptr(x), ptr(panels), None, ptr(want0), M, n0, K) == 0
    assert np.array_equal(bits(y[:, :n0]), bits(want0))
    assert np.array_equal(bits(y[:, n0:]), bits(matmul(kernels, T.Q4_0, x, blocks, None)))
