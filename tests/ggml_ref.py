"""llama.cpp's own quantizers and dequantizers (the libggml-base that llama-cpp-python ships), through ctypes.

Test-only reference: ggml_quantize_chunk without an importance matrix is quantize_row_<type>_ref,
what `llama-quantize` writes, and dequantize_row_<type> is how llama.cpp reads the blocks back.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import numpy as np

_DEQUANTIZE = {
    "F16": "ggml_fp16_to_fp32_row",
    "BF16": "ggml_bf16_to_fp32_row",
    **{name: f"dequantize_row_{name.lower().replace('_k', '_K')}" for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")},
}


@cache
def libggml() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    for fn in _DEQUANTIZE.values():
        getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        getattr(lib, fn).restype = None
    return lib


def quantize(x: np.ndarray, type_name: str, type_id: int, row_bytes: int) -> np.ndarray:
    """(N, K) float32 -> (N, row_bytes) uint8, as llama.cpp's quantizer writes them."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, k = x.shape
    out = np.zeros((n, row_bytes), dtype=np.uint8)
    lib = libggml()
    lib.ggml_quantize_init(type_id)
    written = lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, n, k, None)
    assert written == out.nbytes, (type_name, written, out.nbytes)
    return out


def dequantize(raw: np.ndarray, type_name: str, k: int) -> np.ndarray:
    """(N, row_bytes) uint8 -> (N, K) float32, as llama.cpp reads them."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.zeros((raw.shape[0], k), dtype=np.float32)
    getattr(libggml(), _DEQUANTIZE[type_name])(raw.ctypes.data, out.ctypes.data, raw.shape[0] * k)
    return out
