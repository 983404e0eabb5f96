"""The K-quant kernels (llmcli/core/kernels/kquants.c) against llama.cpp and gguf-py.

kquants.c is built here on its own into two small libraries, the AVX2 path
(-mavx2 -mfma -mf16c) and the portable path (no -m flags), and read through its
`block_type_q*_K` BlockType symbols with ctypes. Per type: dequantize equals gguf-py bit for
bit; quantize_row writes llama.cpp's bytes (quantize_row_<t>_ref from llama-cpp-python's
libggml-base, and llama_model_quantize on a GGUF file); quantize_act equals llama.cpp's
quantize_row_q8_K_ref; vec_dot is within a derived float32 bound of a float64 dot of the
dequantized operands; the AVX2 bits equal the portable bits; every tile element equals vec_dot;
an AVX-512 build compiles; the NEON build gives the portable bits under qemu.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

KERNELS = Path(__file__).resolve().parents[1] / "llmcli" / "core" / "kernels"
SOURCE = KERNELS / "kquants.c"
QK_K = 256
Q8K_BYTES = 292
TYPES = {  # name: (ggml type id, bytes per super-block, has mins)
    "q2_K": (10, 84, True),
    "q3_K": (11, 110, False),
    "q4_K": (12, 144, True),
    "q5_K": (13, 176, True),
    "q6_K": (14, 210, False),
}
# byte ranges of each block that hold quants (zeroed, a block dequantizes to its mins alone)
QUANT_BYTES = {"q2_K": (16, 80), "q4_K": (16, 144), "q5_K": (16, 176)}
U = 2.0**-24  # float32 unit roundoff

_VP, _FP, _I, _SZ = ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_size_t
QUANTIZE_ACT = ctypes.CFUNCTYPE(None, _FP, _VP, _I)
VEC_DOT = ctypes.CFUNCTYPE(None, _I, _FP, _VP, _VP)
DEQUANTIZE = ctypes.CFUNCTYPE(None, _VP, _FP, _I)
QUANTIZE = ctypes.CFUNCTYPE(None, _FP, _VP, _I)
TILE = ctypes.CFUNCTYPE(None, _I, _VP, _SZ, _I, _VP, _SZ, _I, _FP, _SZ)
TILE8 = ctypes.CFUNCTYPE(None, _I, _VP, _SZ, _I, _VP, _I, _FP, _SZ, _I)
GROUP_ACT = ctypes.CFUNCTYPE(None, _VP, _SZ, _I, _I, _VP)
GROUP_ROWS = 8  # blocks.h's BLOCK_GROUP_ROWS


class BlockType(ctypes.Structure):
    _fields_ = [
        ("type", _I),
        ("block", _I),
        ("block_bytes", _I),
        ("act_block_bytes", _I),
        ("quantize_act", QUANTIZE_ACT),
        ("vec_dot", VEC_DOT),
        ("dequantize_row", DEQUANTIZE),
        ("quantize_row", QUANTIZE),
        ("tile", TILE),
        ("tile8", TILE8),
        ("group_act", GROUP_ACT),
        ("group_block_bytes", _SZ),
    ]


def _fp(a: np.ndarray):
    return a.ctypes.data_as(_FP)


class Kernels:
    """One build of kquants.c, with numpy wrappers over the BlockType functions."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.types = {t: BlockType.in_dll(self.lib, f"block_type_{t}") for t in TYPES}

    def quantize(self, t: str, x: np.ndarray) -> np.ndarray:
        rows, k = x.shape
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((rows, k // QK_K * TYPES[t][1]), np.uint8)
        for r in range(rows):
            self.types[t].quantize_row(_fp(x[r]), out[r].ctypes.data, k)
        return out

    def dequantize(self, t: str, w: np.ndarray, k: int) -> np.ndarray:
        out = np.zeros((w.shape[0], k), np.float32)
        for r in range(w.shape[0]):
            self.types[t].dequantize_row(w[r].ctypes.data, _fp(out[r]), k)
        return out

    def quantize_act(self, x: np.ndarray) -> np.ndarray:
        rows, k = x.shape
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((rows, k // QK_K * Q8K_BYTES), np.uint8)
        for r in range(rows):
            self.types["q4_K"].quantize_act(_fp(x[r]), out[r].ctypes.data, k)
        return out

    def vec_dot(self, t: str, w: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
        """y[m, n] = vec_dot(weight row n, activation row m)"""
        y = np.zeros((xq.shape[0], w.shape[0]), np.float32)
        s = np.zeros(1, np.float32)
        for m in range(xq.shape[0]):
            for n in range(w.shape[0]):
                self.types[t].vec_dot(k, _fp(s), w[n].ctypes.data, xq[m].ctypes.data)
                y[m, n] = s[0]
        return y

    def has_tile8(self, t: str) -> bool:
        return bool(ctypes.cast(self.types[t].tile8, ctypes.c_void_p).value)

    def tile8(self, t: str, w: np.ndarray, xq: np.ndarray, k: int, ldy: int) -> np.ndarray:
        """xq's rows (at most 16) in groups of 8 interleaved by group_act, one after the other, against
        w's rows (at most 4)"""
        bt = self.types[t]
        size = k // QK_K * bt.group_block_bytes
        group = np.zeros(2 * size, np.uint8)
        for h in range(0, xq.shape[0], GROUP_ROWS):
            rows = xq[h : h + GROUP_ROWS]
            bt.group_act(rows.ctypes.data, xq.strides[0], rows.shape[0], k, group[h // GROUP_ROWS * size :].ctypes.data)
        y = np.full((xq.shape[0], ldy), np.nan, np.float32)
        bt.tile8(k, w.ctypes.data, w.strides[0], w.shape[0], group.ctypes.data, xq.shape[0], _fp(y), ldy, 1)
        return y

    def tile(self, t: str, w: np.ndarray, xq: np.ndarray, k: int, ldy: int) -> np.ndarray:
        y = np.full((xq.shape[0], ldy), np.nan, np.float32)
        self.types[t].tile(k, w.ctypes.data, w.strides[0], w.shape[0], xq.ctypes.data, xq.strides[0], xq.shape[0], _fp(y), ldy)
        return y


GCC = ["gcc", "-std=c11", "-O2", "-Wall", "-Werror", "-ffp-contract=off", "-fPIC", "-I", str(KERNELS)]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", *AVX2_FLAGS]


def _compile_all(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run the compilers side by side (this is most of the file's time); their results in order."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in commands]
    results = []
    for cmd, proc in zip(commands, procs):
        out, err = proc.communicate()
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results


def _cpu_has(*flags: str) -> bool:
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return set(flags) <= words


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """kquants.c built for the portable path and, where the CPU runs them, the AVX2 and AVX-512
    paths, each also with VNNI where the CPU has it; the AVX-512 path is compiled everywhere, and
    run everywhere with its intrinsics emulated ("avx512-emulated"): ({name: Kernels}, the AVX-512
    compiler's result)."""
    tmp = tmp_path_factory.mktemp("kquants")
    libs = {"portable": []} | ({"avx2": AVX2_FLAGS} if _cpu_has("avx2", "fma", "f16c") else {})
    run512 = _cpu_has("avx512f", "avx512bw", "avx512vl", "avx512dq")
    commands = [[*GCC, *flags, "-shared", str(SOURCE), "-o", str(tmp / f"libkq_{name}.so")] for name, flags in libs.items()]
    if "avx2" in libs:  # the AVX-512 path with its intrinsics emulated in C (tests/kquants_avx512_emul.h)
        emulated = ["-DKQ_AVX512_EMULATED", "-include", str(Path(__file__).with_name("kquants_avx512_emul.h"))]
        libs["avx512-emulated"] = [*AVX2_FLAGS, *emulated]
        commands.append([*GCC, *AVX2_FLAGS, *emulated, "-shared", str(SOURCE), "-o", str(tmp / "libkq_avx512-emulated.so")])
    # the 8-bit products' single-instruction form (dpbusd, blocks.h's BLOCK_VNNI), where the CPU has
    # it, as the kernels' loader builds it there: tile8's VNNI sums (and their offset start) differ
    # from the maddubs ones in every step
    vnni = {name: flags for name, flags, cpu in (("avx2-vnni", [*AVX2_FLAGS, "-mavxvnni"], "avx_vnni"),
                                                  ("avx512-vnni", [*AVX512_FLAGS, "-mavx512vnni"], "avx512_vnni"))
            if _cpu_has(cpu) and (name == "avx2-vnni" or run512)}  # fmt: skip
    libs |= vnni
    commands += [[*GCC, *flags, "-shared", str(SOURCE), "-o", str(tmp / f"libkq_{name}.so")] for name, flags in vnni.items()]
    commands.append([*GCC, *AVX512_FLAGS, "-shared" if run512 else "-c", str(SOURCE), "-o", str(tmp / "libkq_avx512.so")])
    results = _compile_all(commands)
    for result in results[:-1]:
        assert result.returncode == 0, result.stderr
    if run512 and results[-1].returncode == 0:
        libs["avx512"] = AVX512_FLAGS
    return {name: Kernels(tmp / f"libkq_{name}.so") for name in libs}, results[-1]


@pytest.fixture(scope="module")
def builds(compiled):
    return compiled[0]


@pytest.fixture(scope="module")
def ggml():
    """llama.cpp's reference quantizers and dequantizers (libggml-base of llama-cpp-python)."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    for t in TYPES:
        for name in (f"quantize_row_{t}_ref", f"dequantize_row_{t}"):
            getattr(lib, name).argtypes = [_VP, _VP, ctypes.c_int64]
    lib.quantize_row_q8_K_ref.argtypes = [_VP, _VP, ctypes.c_int64]
    return lib


def _weights(rows: int, k: int, seed: int) -> np.ndarray:
    """Rows that reach every branch of the quantizers: gaussian at several magnitudes, heavy
    tails, one-signed rows (min > 0 and max < 0), an all-zero and a constant super-block, a
    negative constant group, tiny values, and groups with a single outlier."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((max(rows, 8), k)).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-3, 2, size=(len(x), 1)).astype(np.float32)
    x[1] = rng.standard_t(2, size=k)
    x[2] = np.abs(x[2]) + 0.5
    x[3] = -np.abs(x[3]) - 0.1
    x[4, :QK_K] = 0.0
    x[4, QK_K : 2 * QK_K] = 0.37
    x[5] *= np.float32(1e-6)
    x[6, ::16] *= 40.0
    x[7, :QK_K:32] = 0.0
    x[7, QK_K : QK_K + 32] = -0.25  # a negative constant group: min == max, ggml's early return
    return x[:rows].astype(np.float32)


def _q8k_dequant(xq: np.ndarray) -> np.ndarray:
    """block_q8_K rows -> float64 values d * q"""
    blocks = xq.reshape(xq.shape[0], -1, Q8K_BYTES)
    d = blocks[..., :4].copy().view(np.float32).astype(np.float64)
    q = blocks[..., 4:260].copy().view(np.int8).astype(np.float64)
    return (d * q).reshape(xq.shape[0], -1)


def _gguf_dequant(t: str, w: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(w, gguf.GGMLQuantizationType[t.upper()])


@pytest.mark.parametrize("t", TYPES)
def test_dequantize_matches_gguf_py(builds, ggml, t):
    k = 4 * QK_K
    rng = np.random.default_rng(1)
    # random bytes cover every scale and quant pattern; the half-precision scales are made finite
    w = rng.integers(0, 256, size=(6, k // QK_K * TYPES[t][1]), dtype=np.uint8)
    blocks = w.reshape(6, -1, TYPES[t][1])
    off = {"q2_K": 80, "q3_K": 108, "q4_K": 0, "q5_K": 0, "q6_K": 208}[t]
    n_half = 1 if t in ("q3_K", "q6_K") else 2
    halves = rng.standard_normal((6, blocks.shape[1], n_half)).astype(np.float16)
    halves[0, 0] = np.float16(6e-8)  # subnormal half scale
    blocks[:, :, off : off + 2 * n_half] = halves.view(np.uint8).reshape(6, blocks.shape[1], 2 * n_half)
    expected = _gguf_dequant(t, w)
    for build in builds.values():
        got = build.dequantize(t, w, k)
        assert np.array_equal(got.view(np.uint32), expected.astype(np.float32).view(np.uint32))
    ref = np.zeros_like(expected, dtype=np.float32)
    for r in range(6):
        getattr(ggml, f"dequantize_row_{t}")(w[r].ctypes.data, ref[r].ctypes.data, k)
    assert np.array_equal(ref.view(np.uint32), expected.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("t", TYPES)
def test_quantize_row_matches_llama_cpp_ref(builds, ggml, t):
    k = 4 * QK_K
    x = _weights(12, k, seed=2)
    ref = np.zeros((12, k // QK_K * TYPES[t][1]), np.uint8)
    for r in range(12):
        getattr(ggml, f"quantize_row_{t}_ref")(x[r].ctypes.data, ref[r].ctypes.data, k)
    for name, build in builds.items():
        got = build.quantize(t, x)
        bad = np.argwhere(got != ref)
        assert bad.size == 0, f"{name}: {len(bad)} bytes differ from llama.cpp, first at (row, byte) {bad[0]}"


def test_quantize_act_matches_llama_cpp_ref(builds, ggml):
    k = 8 * QK_K
    x = _weights(8, k, seed=3)
    ref = np.zeros((8, k // QK_K * Q8K_BYTES), np.uint8)
    for r in range(8):
        ggml.quantize_row_q8_K_ref(x[r].ctypes.data, ref[r].ctypes.data, k)
    for build in builds.values():
        assert np.array_equal(build.quantize_act(x), ref)
    # bsums are the sums of each 16 quants
    blocks = ref.reshape(-1, Q8K_BYTES)
    q = blocks[:, 4:260].copy().view(np.int8).astype(np.int64).reshape(-1, 16, 16)
    bsums = blocks[:, 260:].copy().view(np.int16)
    assert np.array_equal(q.sum(axis=2), bsums)


def _dot_bound(t: str, w: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 dot of the dequantized operands, and the bound on |vec_dot - it|.

    vec_dot is the exact E = sum over super-blocks of d*dx*isum - dmin*dx*msum, each term with
    3 roundings and accumulated with 2 per super-block: |vec_dot - E| <= (3 + 2 nb) u S, where
    S = sum_v (|d sc q| + |dmin m|) |x_v|. The float32 dequantized weight has error <= 3u
    (|d sc q| + |dmin m|) and the float64 reference dot adds a relative 2^-52 k, so
    |vec_dot - ref| <= (2 nb + 7) u S; |d sc q| <= |w_v| + |M_v| with M_v = dmin m, read by
    dequantizing the block with its quants zeroed. (2 nb + 8) absorbs the second-order terms."""
    wf = _gguf_dequant(t, w).astype(np.float64)
    if t in QUANT_BYTES:
        lo, hi = QUANT_BYTES[t]
        w0 = w.reshape(w.shape[0], -1, TYPES[t][1]).copy()
        w0[:, :, lo:hi] = 0
        mins = np.abs(_gguf_dequant(t, w0.reshape(w.shape)).astype(np.float64))
    else:
        mins = np.zeros_like(wf)
    xf = _q8k_dequant(xq)
    ref = xf @ wf.T
    nb = k // QK_K
    bound = (2 * nb + 8) * U * (np.abs(xf) @ (np.abs(wf) + 2 * mins).T)
    return ref, bound


@pytest.mark.parametrize("t", TYPES)
def test_vec_dot_within_bound_of_float64(builds, t):
    k = 8 * QK_K
    build = builds["portable"]
    w = build.quantize(t, _weights(8, k, seed=4))
    xq = build.quantize_act(_weights(5, k, seed=5) * np.float32(3.0))
    y = build.vec_dot(t, w, xq, k)
    ref, bound = _dot_bound(t, w, xq, k)
    assert np.all(np.abs(y - ref) <= bound), np.max(np.abs(y - ref) / np.maximum(bound, 1e-300))
    assert np.any(y != 0)


def _simd_levels() -> list[str]:
    """The SIMD builds this CPU runs natively, and the AVX-512 code through its C emulation of the
    intrinsics (tests/kquants_avx512_emul.h) everywhere: a CPU without AVX-512 still checks its bits."""
    from llmcli.core.kernels import available_isas

    return [isa for isa in ("avx512", "avx2") if isa in available_isas()] + ["avx512-emulated"]


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("isa", _simd_levels())
def test_simd_bits_equal_portable_bits(builds, t, isa):
    assert isa in builds, f"the {isa} build is missing"
    k = 16 * QK_K
    rng = np.random.default_rng(6)
    # random bytes reach every quant and scale value, including the extremes the bounds allow
    w = rng.integers(0, 256, size=(6, k // QK_K * TYPES[t][1]), dtype=np.uint8)
    w = np.concatenate([w, builds["portable"].quantize(t, _weights(8, k, seed=7))])
    blocks = w.reshape(w.shape[0], -1, TYPES[t][1])
    off = {"q2_K": 80, "q3_K": 108, "q4_K": 0, "q5_K": 0, "q6_K": 208}[t]
    n_half = 1 if t in ("q3_K", "q6_K") else 2
    halves = (rng.standard_normal((6, blocks.shape[1], n_half)) * 0.01).astype(np.float16)
    blocks[:6, :, off : off + 2 * n_half] = halves.view(np.uint8).reshape(6, blocks.shape[1], 2 * n_half)
    x = _weights(6, k, seed=8)
    x[5] = np.where(np.arange(k) % 2, 1e3, -1e3)  # activations at +-127
    xq = builds["portable"].quantize_act(x)
    a = builds[isa].vec_dot(t, w, xq, k)
    p = builds["portable"].vec_dot(t, w, xq, k)
    assert np.array_equal(a.view(np.uint32), p.view(np.uint32))
    assert np.array_equal(builds[isa].tile(t, w[:4], xq[:4], k, 4).view(np.uint32), p[:4, :4].view(np.uint32))


@pytest.mark.parametrize("t", TYPES)
def test_tile_elements_equal_vec_dot(builds, t):
    k = 3 * QK_K
    for build in builds.values():
        w = build.quantize(t, _weights(8, k, seed=9))
        xq = build.quantize_act(_weights(8, k, seed=10))
        full = build.vec_dot(t, w, xq, k)
        for nw in range(1, 5):
            for nx in range(1, 5):
                # rows taken with a stride, output into a wider row (ldy = 7): the tile honours both
                wr, xr = w[1 : 1 + 2 * nw : 2], xq[nx - 1 : 2 * nx - 1]
                y = build.tile(t, wr, xr, k, 7)
                assert np.array_equal(y[:, :nw].view(np.uint32), full[nx - 1 : 2 * nx - 1, 1 : 1 + 2 * nw : 2].view(np.uint32))
                assert np.all(np.isnan(y[:, nw:]))


@pytest.mark.parametrize("t", TYPES)
def test_tile8_elements_equal_vec_dot(builds, t):
    """Prompts' kernel (8 activation rows interleaved, one or two groups a call): on every x86 SIMD
    build, every element is vec_dot's bits, for 1-4 weight rows and 1-16 activation rows; 9
    super-blocks, so the 8 float accumulators wrap around. The portable and NEON builds have none
    (the driver runs the tile)."""
    k = 9 * QK_K
    simd = [name for name in builds if name != "portable"]
    assert simd or not _cpu_has("avx2"), "an AVX2 CPU built no SIMD library"
    for name in simd:
        build = builds[name]
        assert build.has_tile8(t), name
        w = build.quantize(t, _weights(8, k, seed=21))
        xq = build.quantize_act(_weights(32, k, seed=22))
        full = build.vec_dot(t, w, xq, k)
        for nw in range(1, 5):
            for nx in (1, 3, 7, GROUP_ROWS, GROUP_ROWS + 1, 13, 2 * GROUP_ROWS):
                # weight rows taken with a stride, output into a wider row (ldy = 7)
                wr, xr = w[1 : 1 + 2 * nw : 2], xq[nx : 2 * nx]
                y = build.tile8(t, wr, xr, k, 7)
                assert np.array_equal(y[:, :nw].view(np.uint32), full[nx : 2 * nx, 1 : 1 + 2 * nw : 2].view(np.uint32)), (name, nw, nx)
                assert np.all(np.isnan(y[:, nw:]))
    assert not builds["portable"].has_tile8(t)


def test_avx512_build_compiles(compiled):
    result = compiled[1]
    assert result.returncode == 0, result.stderr


def test_llama_model_quantize_writes_our_bytes(builds, tmp_path):
    """A whole file through llama.cpp's quantizer: each K-quant tensor it writes is our quantize_row of the same floats."""
    rng = np.random.default_rng(11)
    hidden, ff, vocab = 256, 512, 256
    writer = gguf.GGUFWriter(str(tmp_path / "f32.gguf"), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // 4)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_token_merges([])
    floats = {}
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (hidden, hidden),
        "blk.0.attn_k.weight": (hidden, hidden),
        "blk.0.attn_v.weight": (hidden, hidden),
        "blk.0.attn_output.weight": (hidden, hidden),
        "blk.0.ffn_gate.weight": (ff, hidden),
        "blk.0.ffn_up.weight": (ff, hidden),
        "blk.0.ffn_down.weight": (hidden, ff),
    }
    for name, shape in shapes.items():
        floats[name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        writer.add_tensor(name, floats[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    seen = set()
    ftypes = {"Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}
    for preset, ftype in ftypes.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 1
        dst = tmp_path / f"{preset}.gguf"
        assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(dst).encode(), params) == 0
        for tensor in gguf.GGUFReader(dst).tensors:
            t = tensor.tensor_type.name.lower()[:-1] + "K"  # Q4_K -> q4_K
            if t not in TYPES:
                continue
            seen.add(t)
            x = floats[tensor.name].reshape(-1, floats[tensor.name].shape[-1])
            got = builds["portable"].quantize(t, x)
            assert np.array_equal(np.asarray(tensor.data).reshape(got.shape), got), (preset, tensor.name, t)
    assert seen == set(TYPES)


def test_neon_bits_equal_portable_bits(builds, tmp_path):
    """The NEON path (with and without the dot-product extension) under qemu: the same bits as portable."""
    assert shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64"), "apt-get install -y gcc-aarch64-linux-gnu qemu-user (.ci/run does)"
    k = 4 * QK_K
    rng = np.random.default_rng(12)
    x = _weights(2, k, seed=13)
    xq = builds["portable"].quantize_act(x)
    main = tmp_path / "neon_main.c"
    main.write_text(NEON_MAIN)
    inputs = {}
    for t, (_, nbytes, _) in TYPES.items():
        w = np.concatenate([builds["portable"].quantize(t, _weights(2, k, seed=14)), rng.integers(0, 256, size=(2, k // QK_K * nbytes), dtype=np.uint8)])
        blocks = w.reshape(4, -1, nbytes)
        off = {"q2_K": 80, "q3_K": 108, "q4_K": 0, "q5_K": 0, "q6_K": 208}[t]
        n_half = 1 if t in ("q3_K", "q6_K") else 2
        blocks[2:, :, off : off + 2 * n_half] = np.tile(np.full(n_half, 0.01, np.float16).view(np.uint8), (2, blocks.shape[1], 1))
        inputs[t] = w
        (tmp_path / f"{t}.bin").write_bytes(w.tobytes())
    (tmp_path / "x.bin").write_bytes(x.tobytes())
    marches = ("armv8-a", "armv8.2-a+dotprod")
    exes = [tmp_path / f"neon_{march.replace('+', '_')}" for march in marches]
    cross = ["aarch64-linux-gnu-gcc", "-std=c11", "-O2", "-ffp-contract=off", "-static", "-I", str(KERNELS)]
    for result in _compile_all([[*cross, f"-march={m}", str(main), str(SOURCE), "-o", str(exe), "-lm"] for m, exe in zip(marches, exes)]):
        assert result.returncode == 0, result.stderr
    for march, exe in zip(marches, exes):
        for t, w in inputs.items():
            out = subprocess.run(
                ["qemu-aarch64", str(exe), t, str(tmp_path / f"{t}.bin"), str(tmp_path / "x.bin"), str(k), "4", "2"], check=True, capture_output=True
            ).stdout
            got = np.frombuffer(out, np.uint32)
            n_xq, n_w = xq.size // 4, 4 * k
            neon_xq, neon_w, neon_y, neon_tile = np.split(got, [n_xq, n_xq + n_w, n_xq + n_w + 8])
            assert np.array_equal(np.frombuffer(xq.tobytes(), np.uint32), neon_xq), (march, t)
            deq = builds["portable"].dequantize(t, w, k)
            assert np.array_equal(deq.view(np.uint32).ravel(), neon_w), (march, t)
            expected = builds["portable"].vec_dot(t, w, xq, k)
            assert np.array_equal(expected.view(np.uint32).ravel(), neon_y), (march, t)
            assert np.array_equal(expected.view(np.uint32).ravel(), neon_tile), (march, t)


NEON_MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "blocks.h"
/* argv: type weights.bin x.bin K nw nx; writes (bits) the q8_K rows, the dequantized weights, then
 * y[nx][nw] by vec_dot and by tile */
static void *slurp(const char *p, size_t *n) {
    FILE *f = fopen(p, "rb"); fseek(f, 0, SEEK_END); *n = (size_t)ftell(f); fseek(f, 0, SEEK_SET);
    void *b = malloc(*n); if (fread(b, 1, *n, f) != *n) exit(2); fclose(f); return b;
}
int main(int argc, char **argv) {
    (void)argc;
    const BlockType *bt = !strcmp(argv[1], "q2_K") ? &block_type_q2_K : !strcmp(argv[1], "q3_K") ? &block_type_q3_K
        : !strcmp(argv[1], "q4_K") ? &block_type_q4_K : !strcmp(argv[1], "q5_K") ? &block_type_q5_K : &block_type_q6_K;
    size_t nwb, nxb;
    const char *w = slurp(argv[2], &nwb);
    const float *x = slurp(argv[3], &nxb);
    const int K = atoi(argv[4]), nw = atoi(argv[5]), nx = atoi(argv[6]);
    const size_t wrow = (size_t)K / 256 * bt->block_bytes, xrow = (size_t)K / 256 * bt->act_block_bytes;
    char *xq = malloc(xrow * nx);
    for (int m = 0; m < nx; m++) bt->quantize_act(x + (size_t)m * K, xq + m * xrow, K);
    fwrite(xq, 1, xrow * nx, stdout);
    float *deq = malloc(sizeof(float) * K);
    for (int n = 0; n < nw; n++) { bt->dequantize_row(w + n * wrow, deq, K); fwrite(deq, 4, K, stdout); }
    float y[16], yt[16];
    for (int m = 0; m < nx; m++) for (int n = 0; n < nw; n++) bt->vec_dot(K, &y[m * nw + n], w + n * wrow, xq + m * xrow);
    bt->tile(K, w, wrow, nw, xq, xrow, nx, yt, nw);
    fwrite(y, 4, nx * nw, stdout);
    fwrite(yt, 4, nx * nw, stdout);
    return 0;
}
"""


def test_driver_runs_kquants_with_the_same_bits(builds, ggml):
    """Through blocks.c's exported API (the library llmcli builds): the K-quants are supported, quantize
    to llama.cpp's bytes, dequantize to gguf-py's floats, and block_matmul gives vec_dot's bits for every
    row whatever the number of rows (1, or 19: two interleaved groups of 8 and 3 rows on the tile). On the ISA level this run selects (LLMCLI_ISA, else the
    best one), in the library the other kernel tests share."""
    from llmcli.core import kernels

    lib = kernels.load_kernels()
    assert lib is not None and lib.isa == kernels.select_isa()
    n, k, m = 9, 2 * QK_K, 19
    x = _weights(m, k, seed=15)
    for t, (type_id, nbytes, _) in TYPES.items():
        assert lib.block_type_supported(type_id) == 1
        wf = _weights(n, k, seed=16)
        w = np.zeros((n, k // QK_K * nbytes), np.uint8)
        assert lib.block_quantize_rows(type_id, wf.ctypes.data, w.ctypes.data, n, k) == 0
        ref = np.zeros_like(w)
        for r in range(n):
            getattr(ggml, f"quantize_row_{t}_ref")(wf[r].ctypes.data, ref[r].ctypes.data, k)
        assert np.array_equal(w, ref), t
        rows = np.array([3, 0, 8], np.int64)
        deq = np.zeros((3, k), np.float32)
        assert lib.block_dequantize_rows(type_id, w.ctypes.data, rows.ctypes.data, 3, k, deq.ctypes.data) == 0
        assert np.array_equal(deq, _gguf_dequant(t, w[rows]).astype(np.float32)), t
        y = np.zeros((m, n), np.float32)
        assert lib.block_matmul(type_id, x.ctypes.data, w.ctypes.data, None, y.ctypes.data, m, n, k) == 0
        expected = builds["portable"].vec_dot(t, w, builds["portable"].quantize_act(x), k)
        assert np.array_equal(y.view(np.uint32), expected.view(np.uint32)), t
        for r in (0, m - 1):
            y1 = np.zeros((1, n), np.float32)
            assert lib.block_matmul(type_id, x[r].ctypes.data, w.ctypes.data, None, y1.ctypes.data, 1, n, k) == 0
            assert np.array_equal(y1[0].view(np.uint32), y[r].view(np.uint32)), t
