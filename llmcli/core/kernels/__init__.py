"""Native kernels for the CPU path, built on first use with the system C compiler.

Why native code: decoding one token per sequence is bound by reading the weights, and torch's
sgemm for one or a few rows reaches well under half of the memory bandwidth on the CPUs we
measured (benchmarks/README.md). `matvec.c` streams each weight once for all rows of the batch,
and its float32 product on panel-packed weights also runs ahead of sgemm for prompts. It is compiled with `cc -O3 -march=native -fopenmp` into the llmcli cache the first time
(about a second), keyed by the source, the compiler and the CPU, and loaded with ctypes: no
build step at install time and no torch headers. Without a compiler, or with LLMCLI_KERNELS=0,
everything still runs, on torch's own matmuls.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch  # noqa: F401 - loaded first: the kernels then share torch's OpenMP runtime and thread pool

from llmcli.tempfiles import owned_tmp

SOURCE = Path(__file__).with_name("matvec.c")

_lock = threading.Lock()
_loaded: dict[str, "Kernels | None"] = {}
_threads = 0  # set_threads: 0 = OpenMP's own count for the calling thread


class LinearDesc(ctypes.Structure):
    """matvec.c's `Linear`: one projection's weights: float32 panels (kind 0), GGML blocks (kind 2:
    `type` is the ggml type, `weight` the first block) or parts side by side (kind 3: `parts`,
    `nparts`), built by llmcli.core.formats.describe."""

    _fields_ = [
        ("kind", ctypes.c_int),
        ("weight", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("n", ctypes.c_int),
        ("k", ctypes.c_int),
        # kinds 2 and 3 (type, parts, nparts) arrive with blocks.c's decode (branch q-legacy)
    ]


class BlockDesc(ctypes.Structure):
    """matvec.c's `Block`: one Llama-family block (two norms, four fused projections)."""

    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("qkv", LinearDesc),
        ("o", LinearDesc),
        ("gate_up", LinearDesc),
        ("down", LinearDesc),
    ]


class Kernels:
    """The compiled library's entry points, with argument types declared once."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        vp, i = ctypes.c_void_p, ctypes.c_int
        self.matmul_panels_f32 = lib.matmul_panels_f32
        self.matmul_panels_f32.argtypes = [vp, vp, vp, vp, i, i, i]
        self.matmul_panels_f32.restype = i  # 0, or -1: no memory for the transposed activations
        self.matmul_panels_q8 = lib.matmul_panels_q8
        self.matmul_panels_q8.argtypes = [vp, vp, vp, vp, vp, i, i, i]
        self.matmul_panels_q8.restype = i
        self.rms_norm_f32 = lib.rms_norm_f32
        self.rms_norm_f32.argtypes = [vp, vp, vp, i, i, ctypes.c_float]
        self.rms_norm_f32.restype = None
        self.silu_mul_f32 = lib.silu_mul_f32
        self.silu_mul_f32.argtypes = [vp, vp, i, i]
        self.silu_mul_f32.restype = None
        i64 = ctypes.c_int64
        self.attn_decode_f32 = lib.attn_decode_f32
        self.attn_decode_f32.argtypes = [vp, vp, vp, vp, vp, vp, i64, i64, i64, i, i, i, i, i, vp]
        self.attn_decode_f32.restype = None
        self.decode_blocks_f32 = lib.decode_blocks_f32
        self.decode_blocks_f32.argtypes = [
            ctypes.POINTER(BlockDesc), i, vp, i, i, ctypes.c_float, i, i, i, i, vp, vp, vp, vp, vp, i64, i64, i64
        ]
        self.decode_blocks_f32.restype = None
        self.simd_width = int(lib.matvec_simd_width())
        self.set_threads = lib.matvec_set_threads
        self.set_threads.argtypes = [i]
        self.set_threads.restype = None
        self.threads = lib.matvec_threads
        self.threads.argtypes = []
        self.threads.restype = i
        self.set_threads(_threads)
        self._bind_blocks(lib)

    def _bind_blocks(self, lib: ctypes.CDLL) -> None:
        """blocks.c's API (GGML block formats), when this build has it."""
        vp, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        self.has_blocks = hasattr(lib, "block_matmul")
        self.block_decode = False  # decode_blocks_f32 runs LinearDesc kinds 2 and 3
        self._supported: dict[int, bool] = {}
        if not self.has_blocks:
            return
        self._block_type_supported = lib.block_type_supported
        self._block_type_supported.argtypes = [i]
        self._block_type_supported.restype = i
        self.block_matmul = lib.block_matmul
        self.block_matmul.argtypes = [i, vp, vp, vp, vp, i, i, i]
        self.block_matmul.restype = i  # 0, -1 (no memory), -2 (type unsupported)
        self.block_dequantize_rows = lib.block_dequantize_rows
        self.block_dequantize_rows.argtypes = [i, vp, vp, i, i, vp]
        self.block_dequantize_rows.restype = i
        self.block_quantize_rows = lib.block_quantize_rows
        self.block_quantize_rows.argtypes = [i, vp, vp, i64, i]
        self.block_quantize_rows.restype = i
        self.block_isa = lib.block_isa
        self.block_isa.argtypes = []
        self.block_isa.restype = ctypes.c_char_p

    def supports_block(self, type_id: int) -> bool:
        """Whether block_matmul and friends run this ggml type in this build."""
        if not self.has_blocks:
            return False
        if type_id not in self._supported:
            self._supported[type_id] = bool(self._block_type_supported(type_id))
        return self._supported[type_id]


def set_threads(n: int) -> None:
    """Run every parallel region of the kernels (loaded now or later) on n threads, from any thread."""
    global _threads
    with _lock:
        _threads = n
        for kernels in _loaded.values():
            if kernels is not None:
                kernels.set_threads(n)


def enabled() -> bool:
    return os.environ.get("LLMCLI_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def load_kernels(build_dir: Path | str | None = None, extra_flags: tuple[str, ...] = ()) -> Kernels | None:
    """The kernels, compiled into build_dir (default: a folder in the temp dir) if not there yet.

    None when disabled (LLMCLI_KERNELS=0), off Linux, or when no C compiler can build them:
    callers fall back to torch. extra_flags go to the compiler (tests build the portable paths
    with -mno-avx512f). Safe to call from several processes at once (the
    library is written under a temporary name and renamed into place).
    """
    if not enabled():
        return None
    folder = Path(build_dir) if build_dir is not None else Path(tempfile.gettempdir()) / f"llmcli-kernels-{os.getuid()}"
    key = str(folder.resolve()) + " ".join(extra_flags)
    with _lock:
        if key not in _loaded:
            _loaded[key] = _build_and_load(folder, extra_flags)
        return _loaded[key]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build_and_load(folder: Path, extra_flags: tuple[str, ...] = ()) -> Kernels | None:
    cc = _compiler()
    if cc is None or platform.system() != "Linux":
        return None
    try:
        # the compiler's identity without running it (every model load passes here): its file and version stamp
        compiler = os.path.realpath(shutil.which(cc) or cc)
        stamp = os.stat(compiler)
    except OSError:
        return None
    identity = f"{compiler} {stamp.st_size} {stamp.st_mtime_ns} {_cpu_signature()} {' '.join(extra_flags)}"
    digest = hashlib.sha256(SOURCE.read_bytes() + identity.encode()).hexdigest()[:20]
    target = folder / f"matvec-{digest}.so"
    if not target.is_file():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = owned_tmp(target)  # a build killed half-way is removed by the next load (llmcli.tempfiles)
            cmd = [cc, "-O3", "-march=native", *extra_flags, "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", str(tmp), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                tmp.unlink(missing_ok=True)
                return None
            os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        return Kernels(ctypes.CDLL(str(target)), target)
    except OSError:
        return None
