"""GGUF header parsing: metadata key/values and tensor descriptions, without torch.

`tokenize`, `decode` and the chat template need only `tokenizer.ggml.*` and
`tokenizer.chat_template`, and those commands must start fast, so this module imports numpy and
the standard library only (gguf's own GGUFReader builds a numpy view per array item, about 3 s
for a 49k-token vocabulary; this parser does the same header in a fraction of that).

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 kv count,
the key/values, the tensor infos (name, n_dims, ne[n_dims] innermost first, u32 type, u64 offset),
then the tensor data at the next multiple of `general.alignment` (default 32).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmcli.errors import ModelError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types -> struct format of one scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _BOOL, _FLOAT32 = 8, 9, 7, 6
# GGUF writers put no array inside an array (llama.cpp's gguf.c refuses them); a few levels are read,
# not the thousands a hostile file can nest to exhaust the stack
MAX_ARRAY_NESTING = 8


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first): GGUF's ne reversed
    type_id: int  # a gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset of the data in the file


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    data_offset: int
    file_size: int
    alignment: int = DEFAULT_ALIGNMENT


class _Truncated(Exception):
    pass


class SkippedStrings:
    """A string array read with strings=False: its length, not its items."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"SkippedStrings({self.count})"


class _Cursor:
    def __init__(self, buf, size: int, strings: bool = True):
        self.buf = buf
        self.size = size
        self.pos = 0
        self.strings = strings

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Truncated(start + n)
        self.pos = start + n
        return start

    def scalar(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = bytes(self.buf[self.take(n) : self.pos])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # some vocabularies hold byte fragments; keep them readable rather than refuse the file
            return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> SkippedStrings:
        buf, pos, size, from_bytes = self.buf, self.pos, self.size, int.from_bytes
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated(pos + 8)
            pos += 8 + from_bytes(buf[pos : pos + 8], "little")
        if pos > size:
            raise _Truncated(pos)
        self.pos = pos
        return SkippedStrings(count)

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype = self.scalar("<I")
            count = self.scalar("<Q")
            if itype == _STRING:
                if count > self.size:  # each string needs at least 8 bytes: a corrupt count
                    raise _Truncated(self.pos + count * 8)
                if not self.strings:
                    return self.skip_strings(count)
                return [self.string() for _ in range(count)]
            if itype in _NUMPY:
                dt = np.dtype(_NUMPY[itype])
                start = self.take(count * dt.itemsize)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=start)
                return arr.astype(bool).tolist() if itype == _BOOL else arr.tolist()
            if itype == _ARRAY:
                if depth >= MAX_ARRAY_NESTING:
                    raise ValueError(f"arrays nested more than {MAX_ARRAY_NESTING} deep")
                return [self.value(_ARRAY, depth + 1) for _ in range(count)]
            raise ValueError(f"unknown GGUF array item type {itype}")
        if vtype == _FLOAT32:
            # float32's shortest decimal (1e-05, not 9.999999747378752e-06), as the HF config wrote it
            return float(str(np.float32(self.scalar("<f"))))
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        raise ValueError(f"unknown GGUF value type {vtype}")


def _corrupt(path: Path, why: str) -> ModelError:
    return ModelError(f"{path} is not a valid GGUF file: {why}", "download the file again; llama.cpp's convert_hf_to_gguf.py writes valid ones")


def read_gguf_header(path: Path | str, tensors: bool = True, strings: bool = True) -> GGUFHeader:
    """Parse the header of a GGUF file; with tensors=False stop after the metadata; with
    strings=False string arrays (the vocabulary, the merges) are skipped: SkippedStrings, their length."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"GGUF file {path} does not exist", "check the path, or give a catalogue name (see `llmcli models`)")
    if not path.is_file():
        raise ModelError(f"{path} is not a file", "give the path of a .gguf file")
    size = path.stat().st_size
    if size < 24:
        raise _corrupt(path, f"only {size} bytes, too short for a GGUF header")
    with open(path, "rb") as fh:
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if buf[:4] != GGUF_MAGIC:
            raise _corrupt(path, f"it starts with {bytes(buf[:4])!r}, not the GGUF magic b'GGUF'")
        cur = _Cursor(buf, size, strings)
        cur.take(4)
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ModelError(f"{path} is GGUF version {version}; llmcli reads versions 2 and 3", "convert the model again with a current llama.cpp")
        n_tensors = cur.scalar("<Q")
        n_kv = cur.scalar("<Q")
        if n_kv > size or n_tensors > size:
            raise _corrupt(path, f"header claims {n_kv} metadata entries and {n_tensors} tensors")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("<I"))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise _corrupt(path, f"general.alignment is {alignment!r}, not a power of two")  # gguf.c's own rule
        infos: list[GGUFTensorInfo] = []
        data_offset = cur.pos
        if tensors:
            raw = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.scalar("<I")
                if n_dims > 8:
                    raise _corrupt(path, f"tensor {name!r} claims {n_dims} dimensions")
                ne = [cur.scalar("<Q") for _ in range(n_dims)]
                type_id = cur.scalar("<I")
                offset = cur.scalar("<Q")
                raw.append((name, tuple(reversed(ne)), type_id, offset))
            data_offset = -(-cur.pos // alignment) * alignment
            infos = [GGUFTensorInfo(name, shape, type_id, data_offset + offset) for name, shape, type_id, offset in raw]
        return GGUFHeader(version=version, metadata=metadata, tensors=infos, data_offset=data_offset, file_size=size, alignment=alignment)
    except _Truncated as exc:
        raise _corrupt(path, f"truncated: the header needs at least {exc.args[0]} bytes but the file has {size}") from None
    except (ValueError, struct.error, OverflowError, MemoryError) as exc:
        raise _corrupt(path, str(exc)) from None
    finally:
        buf.close()


def gguf_metadata(path: Path | str) -> dict[str, Any]:
    """The metadata key/values of a GGUF file (strings, numbers, bools, lists), read without torch."""
    return read_gguf_header(path, tensors=False).metadata
