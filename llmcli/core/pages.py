"""Whole pages of memory handed back to the system (madvise MADV_DONTNEED).

Three owners drop memory they no longer need: the KV cache the rows of finished sequences
(anonymous private mappings: the pages read as zeros again), and the loaders the file pages of
tensors whose values were copied into another layout (file mappings: a later touch reads the
file again). Only the whole pages inside a range go; a page shared with bytes outside it stays.
"""

from __future__ import annotations

import ctypes
import functools
import mmap

PAGE = mmap.PAGESIZE
# madvise exists where Python's mmap module names MADV_DONTNEED (Linux, the BSDs, macOS), not on Windows
AVAILABLE = hasattr(mmap, "MADV_DONTNEED")


def whole_pages(start: int, end: int) -> tuple[int, int]:
    """The addresses of the first and past the last whole page within start..end (equal when none)."""
    lo = -(-start // PAGE) * PAGE
    hi = end // PAGE * PAGE
    return lo, max(lo, hi)


def release(start: int, end: int) -> None:
    """Hand back the whole pages within addresses start..end; nothing where madvise is missing.
    Advice only: a failure leaves the pages resident."""
    lo, hi = whole_pages(start, end)
    if hi > lo and AVAILABLE:
        _madvise()(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


@functools.cache
def _madvise():
    """The C library's madvise, looked up once (a CDLL costs about a millisecond)."""
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise
