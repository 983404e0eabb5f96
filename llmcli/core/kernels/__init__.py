"""Native kernels for the CPU path, built on first use with the system C compiler.

Why native code: decoding one token per sequence is bound by reading the weights, and torch's
sgemm for one or a few rows reaches well under half of the memory bandwidth on the CPUs we
measured (benchmarks/README.md). `matvec.c` streams each weight once for all rows of the batch,
and its float32 product on panel-packed weights also runs ahead of sgemm for prompts. `blocks.c`
(and `kquants.c`) compute products on GGML's block formats as the GGUF file stores them;
`attention.c` computes attention one query row at a time in one fixed order (batch invariance).

The library is compiled on first use (a few seconds) into one shared object, keyed by the sources,
the compiler, the CPU, the ISA level and the flags, and loaded with ctypes: no build step at
install time and no torch headers. matvec.c gets `-O3 -march=native`; the block sources get the
flags of one ISA level, "avx512", "avx2", "neon" or "portable" (no SIMD intrinsics), and
`-ffp-contract=off`, so that every level gives the same bits (blocks.h). The level is the best one
/proc/cpuinfo shows, or the one LLMCLI_ISA names. Without a compiler, or with LLMCLI_KERNELS=0,
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

from llmcli.errors import UsageError
from llmcli.tempfiles import owned_tmp

HERE = Path(__file__).parent
SOURCE = HERE / "matvec.c"
BLOCK_SOURCES = ("blocks.c", "kquants.c", "attention.c", "activations.c")  # the sources built per ISA level without contraction
HEADERS = ("blocks.h", "attention.h", "vexp.h")

# the compiler flags of each ISA level for the block sources (x86-64 levels build on the baseline)
ISA_FLAGS = {
    "avx512": ("-march=x86-64", "-mtune=native", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"),
    "avx2": ("-march=x86-64", "-mtune=native", "-mavx2", "-mfma", "-mf16c"),
    "neon": ("-march=native",),
    "portable": ("-DLLMCLI_PORTABLE",),
}
_X86_PORTABLE = ("-march=x86-64", "-mtune=native")
# the 8-bit dot products' single-instruction form (vpdpbusd), where the CPU has it: the same exact
# integer sums as the two-instruction AVX2 form, so the same bits
_VNNI_FLAGS = {"avx512": ("avx512_vnni", "-mavx512vnni"), "avx2": ("avx_vnni", "-mavxvnni")}


def _isa_flags(level: str) -> tuple[str, ...]:
    """The block sources' flags for `level` on this CPU."""
    cpu_flag, flag = _VNNI_FLAGS.get(level, ("", ""))
    return ISA_FLAGS[level] + ((flag,) if cpu_flag and cpu_flag in _cpu_flags() else ())

_lock = threading.Lock()
_loaded: dict[str, "Kernels | None"] = {}
_threads = 0  # set_threads: 0 = OpenMP's own count for the calling thread


class LinearDesc(ctypes.Structure):
    """matvec.c's `Linear`: one projection's weights.

    kind 0: float32 panels (`weight`); 2: GGML blocks (`type`
    = the ggml type id, `weight` = the first block of row 0, rows as the GGUF file stores them);
    3: a concatenation (`parts` = a LinearDesc array of `nparts`, outputs side by side, `n` = the
    sum of theirs, each part with its own bias). `n` outputs, `k` inputs.
    """


LinearDesc._fields_ = [
    ("kind", ctypes.c_int),
    ("weight", ctypes.c_void_p),
    ("bias", ctypes.c_void_p),
    ("n", ctypes.c_int),
    ("k", ctypes.c_int),
    ("type", ctypes.c_int),
    ("parts", ctypes.POINTER(LinearDesc)),
    ("nparts", ctypes.c_int),
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
        self.rms_norm_f32 = lib.rms_norm_f32
        self.rms_norm_f32.argtypes = [vp, vp, vp, i, i, ctypes.c_float]
        self.rms_norm_f32.restype = None
        self.silu_mul_f32 = lib.silu_mul_f32
        self.silu_mul_f32.argtypes = [vp, vp, i, i]
        self.silu_mul_f32.restype = None
        self.gelu_tanh_mul_f32 = lib.gelu_tanh_mul_f32  # activations.c: one order on every ISA
        self.gelu_tanh_mul_f32.argtypes = [vp, vp, i, i]
        self.gelu_tanh_mul_f32.restype = None
        self.gelu_tanh_f32 = lib.gelu_tanh_f32
        self.gelu_tanh_f32.argtypes = [vp, vp, i, i]
        self.gelu_tanh_f32.restype = None
        self.layer_norm_f32 = lib.layer_norm_f32
        self.layer_norm_f32.argtypes = [vp, vp, vp, vp, i, i, ctypes.c_float]
        self.layer_norm_f32.restype = None
        i64 = ctypes.c_int64
        self.attn_decode_f32 = lib.attn_decode_f32
        self.attn_decode_f32.argtypes = [vp, vp, vp, vp, vp, vp, i64, i64, i64, i, i, i, i, i, vp]
        self.attn_tokens_f32 = lib.attn_tokens_f32  # attention.c: one fixed order per query row
        self.attn_tokens_f32.argtypes = [vp, vp, vp, vp, vp, i64, i64, i64, i, i, i, i, i, ctypes.c_float, vp]
        self.attn_tokens_f32.restype = i  # 0, or -1: no memory for a thread's scratch
        self.attn_rope_tokens_f32 = lib.attn_rope_tokens_f32  # rope, cache write and attn_tokens_f32 of a packed step's tokens
        self.attn_rope_tokens_f32.argtypes = [vp, i64, vp, i64, vp, vp, vp, vp, vp, vp, i64, i64, i64, i, i, i, i, i, ctypes.c_float, vp]
        self.attn_rope_tokens_f32.restype = i  # 0, or -1: no memory for a thread's scratch
        self.decode_blocks_f32 = lib.decode_blocks_f32
        self.decode_blocks_f32.argtypes = [
            ctypes.POINTER(BlockDesc), i, vp, i, i, ctypes.c_float, i, i, i, i, vp, vp, vp, vp, vp, i64, i64, i64
        ]
        self.decode_blocks_f32.restype = i  # 0, -1 no memory, -2 a kind or type this build lacks, -3 K not whole blocks
        self.attn_decode_f32.restype = i  # 0, or -1: no memory for a thread's scratch
        self.linear_forward = lib.linear_forward
        self.linear_forward.argtypes = [ctypes.POINTER(LinearDesc), vp, vp, i]
        self.linear_forward.restype = i
        # the block kernels (blocks.c): statuses 0, -1 no memory, -2 type unsupported, -3 K not a whole number of blocks
        self.block_type_supported = lib.block_type_supported
        self.block_type_supported.argtypes = [i]
        self.block_type_supported.restype = i
        self.block_matmul = lib.block_matmul
        self.block_matmul.argtypes = [i, vp, vp, vp, vp, i, i, i]
        self.block_matmul.restype = i
        self.block_dequantize_rows = lib.block_dequantize_rows
        self.block_dequantize_rows.argtypes = [i, vp, vp, i, i, vp]
        self.block_dequantize_rows.restype = i
        self.block_quantize_rows = lib.block_quantize_rows
        self.block_quantize_rows.argtypes = [i, vp, vp, i64, i]
        self.block_quantize_rows.restype = i
        lib.block_isa.restype = ctypes.c_char_p
        self.isa = lib.block_isa().decode()
        self.simd_width = int(lib.matvec_simd_width())
        self.set_threads = lib.matvec_set_threads
        self.set_threads.argtypes = [i]
        self.set_threads.restype = None
        self.threads = lib.matvec_threads
        self.threads.argtypes = []
        self.threads.restype = i
        self.set_threads(_threads)
        self._supported: dict[int, bool] = {}

    def supports_block(self, type_id: int) -> bool:
        """Whether block_matmul and friends (and LinearDesc kind 2) run this ggml type in this build."""
        if type_id not in self._supported:
            self._supported[type_id] = bool(self.block_type_supported(type_id))
        return self._supported[type_id]


def set_threads(n: int) -> None:
    """Run every parallel region of the kernels (loaded now or later) on n threads, from any thread."""
    global _threads
    with _lock:
        _threads = n
        for kernels in _loaded.values():
            if kernels is not None:
                kernels.set_threads(n)


def explicit_threads() -> int:
    """The count set_threads gave the kernels; 0 while they follow the calling thread's OpenMP count."""
    return _threads


def enabled() -> bool:
    return os.environ.get("LLMCLI_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def load_kernels(build_dir: Path | str | None = None, extra_flags: tuple[str, ...] = (), isa: str | None = None) -> Kernels | None:
    """The kernels, compiled into build_dir (default: a folder in the temp dir) if not there yet.

    isa: the block kernels' level ("avx512", "avx2", "neon", "portable"); default LLMCLI_ISA, else
    the best this CPU has. A level the CPU lacks is a UsageError. None when disabled
    (LLMCLI_KERNELS=0), off Linux, or when no C compiler can build them: callers fall back to torch.
    extra_flags go to the compiler for every source (tests build matvec.c's portable paths with
    -mno-avx512f). Safe to call from several processes at once (the library is written under a
    temporary name and renamed into place).
    """
    if not enabled():
        return None
    level = select_isa(isa)
    folder = Path(build_dir) if build_dir is not None else Path(tempfile.gettempdir()) / f"llmcli-kernels-{os.getuid()}"
    key = f"{folder.resolve()} {level} " + " ".join(extra_flags)
    with _lock:
        if key not in _loaded:
            _loaded[key] = _build_and_load(folder, extra_flags, level)
        return _loaded[key]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        line = ""
    return set(line.partition(":")[2].split())


def available_isas() -> list[str]:
    """The ISA levels this CPU runs, best first; "portable" always."""
    flags, machine = _cpu_flags(), platform.machine().lower()
    levels = []
    if machine in ("x86_64", "amd64"):
        if {"avx2", "fma", "f16c"} <= flags:
            if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
                levels.append("avx512")
            levels.append("avx2")
    elif machine in ("aarch64", "arm64"):
        levels.append("neon")  # Advanced SIMD is part of every AArch64 CPU
    return levels + ["portable"]


def select_isa(isa: str | None = None) -> str:
    """The block kernels' ISA level: `isa`, else LLMCLI_ISA, else the best one available."""
    wanted = (isa or os.environ.get("LLMCLI_ISA", "")).strip().lower()
    levels = available_isas()
    if not wanted:
        return levels[0]
    if wanted not in levels:
        known = "an ISA level llmcli knows" if wanted not in ISA_FLAGS else "available on this CPU"
        raise UsageError(f"LLMCLI_ISA={wanted} is not {known}", f"unset LLMCLI_ISA or set it to one of: {', '.join(levels)}")
    return wanted


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another."""
    return platform.machine() + " ".join(sorted(_cpu_flags()))


def _sources() -> list[Path]:
    return [SOURCE] + [HERE / name for name in BLOCK_SOURCES if (HERE / name).is_file()]


def _compile_flags(level: str, extra_flags: tuple[str, ...]) -> dict[Path, list[str]]:
    """Each source's compiler flags: matvec.c for this machine, the block sources for `level`, without contraction."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    # matvec.c's float32 decode step sums in the order its widest vectors give: built with AVX-512 it
    # answered differently from an AVX2 machine (SmolLM2's README answer flipped on a near tie), so
    # it is built for AVX2 on every x86 CPU and a model's answer does not depend on having AVX-512.
    matvec_flags = ["-O3", "-march=native"] + (["-mno-avx512f"] if x86 else [])
    block_flags = ["-O3", *(_X86_PORTABLE if x86 and level == "portable" else ()), *_isa_flags(level), "-ffp-contract=off"]
    return {src: [*(matvec_flags if src == SOURCE else block_flags), *extra_flags, "-fopenmp", "-fPIC"] for src in _sources()}


def _compile_commands(cc: str, level: str, extra_flags: tuple[str, ...], objdir: Path) -> list[list[str]]:
    """One command per source, each into its object file in objdir."""
    return [[cc, *flags, "-c", str(src), "-o", str(objdir / (src.stem + ".o"))] for src, flags in _compile_flags(level, extra_flags).items()]


def _build_and_load(folder: Path, extra_flags: tuple[str, ...] = (), level: str = "portable") -> Kernels | None:
    cc = _compiler()
    if cc is None or platform.system() != "Linux":
        return None
    try:
        # the compiler's identity without running it (every model load passes here): its file and version stamp
        compiler = os.path.realpath(shutil.which(cc) or cc)
        stamp = os.stat(compiler)
    except OSError:
        return None
    # the flags themselves too: a library built with other flags is another library
    flags = " ".join(" ".join(each) for each in _compile_flags(level, extra_flags).values())
    identity = f"{compiler} {stamp.st_size} {stamp.st_mtime_ns} {_cpu_signature()} {level} {flags}"
    code = b"".join(path.name.encode() + path.read_bytes() for path in [*_sources(), *(HERE / h for h in HEADERS)])
    digest = hashlib.sha256(code + identity.encode()).hexdigest()[:20]
    target = folder / f"matvec-{digest}.so"
    if not target.is_file():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = owned_tmp(target)  # a build killed half-way is removed by the next load (llmcli.tempfiles)
            # the object files too: a folder named like the library's temporary file, so that the
            # next load removes it when this process is killed before it could
            objdir = owned_tmp(folder / f".objs-{digest}")
            objdir.mkdir(exist_ok=True)
            try:
                cmds = _compile_commands(cc, level, extra_flags, objdir)
                jobs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for cmd in cmds]  # in parallel
                if any(job.wait(timeout=180) != 0 for job in jobs):
                    return None
                objs = [cmd[-1] for cmd in cmds]
                done = subprocess.run([cc, "-shared", "-fopenmp", *objs, "-o", str(tmp), "-lm"], capture_output=True, text=True, timeout=120)
            finally:
                shutil.rmtree(objdir, ignore_errors=True)
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
