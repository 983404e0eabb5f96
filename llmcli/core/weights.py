"""Checkpoint readers: safetensors and GGUF -> {HF tensor name: torch.Tensor}, and loading them into a module.

The only two formats are safetensors and GGUF: pickled checkpoints (.bin/.pt/.pth/.ckpt) are refused,
never unpickled. safetensors tensors are views into a private memory map, so nothing is read
until a tensor is touched and a tensor that already has the wanted dtype is never copied.
GGUF tensors are renamed to the model's parameter names (the family's GGUF_NAMES) and kept as
their raw GGML blocks mapped from the file (map_gguf; core/formats runs them), and for the
architectures whose Q and K rows llama.cpp permuted (the family's GGUF_PERMUTED_QK) the row
permutation is undone, so they equal the HF checkpoint's rows. The config comes from
models/registry.config_from_gguf.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmcli.core import pages
from llmcli.core.config import ModelConfig
from llmcli.core.gguf_meta import GGUFTensorInfo, read_gguf_header
from llmcli.core.models.registry import config_from_gguf, family_of
from llmcli.errors import ModelError

SUPPORTED_FORMATS = "safetensors (an HF-format directory or a .safetensors file) and GGUF"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# Buffers some checkpoints carry that every model recomputes itself: dropping them is harmless.
HARMLESS_EXTRAS = ("rotary_emb.inv_freq", "position_ids", ".attn.bias", ".attn.masked_bias", "num_batches_tracked")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit


# ------------------------------------------------------------------ safetensors


def _refuse_pickle(path: Path) -> ModelError:
    return ModelError(
        f"{path} is a pickled checkpoint, which llmcli never loads (unpickling can run arbitrary code)",
        f"supported formats: {SUPPORTED_FORMATS}; convert it with transformers' save_pretrained(safe_serialization=True)",
    )


def read_safetensors(path: Path | str) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a directory with model.safetensors or an index of shards -> {name: tensor}."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"weights path {path} does not exist", "give an HF-format directory or a .safetensors file")
    if path.is_dir():
        return _read_directory(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise _refuse_pickle(path)
    if path.suffix == ".gguf":
        raise ModelError(f"{path} is a GGUF file, not safetensors", "load it with read_gguf (llmcli picks the reader by suffix)")
    return _read_file(path)


def _read_directory(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return _read_sharded(index)
    single = path / "model.safetensors"
    if single.is_file():
        return _read_file(single)
    files = sorted(path.glob("*.safetensors"))
    if files:
        # shards without their index (or a differently named single file): read them all
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            for name, t in _read_file(f).items():
                if name in tensors:
                    raise ModelError(f"tensor {name} appears in more than one file of {path} (again in {f.name})", "keep only one copy of the checkpoint in the directory")
                tensors[name] = t
        return tensors
    present = sorted(p.name for p in path.iterdir())
    pickles = [n for n in present if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ModelError(
            f"{path} holds only pickled weights ({', '.join(pickles)}), which llmcli never loads",
            f"supported formats: {SUPPORTED_FORMATS}; convert with transformers' save_pretrained(safe_serialization=True)",
        )
    listing = ", ".join(present[:20]) + (f" and {len(present) - 20} more" if len(present) > 20 else "") if present else "nothing"
    raise ModelError(
        f"{path} has no weights: no model.safetensors, model.safetensors.index.json or *.safetensors (it holds {listing})",
        f"supported formats: {SUPPORTED_FORMATS}; download the model's *.safetensors files into the directory",
    )


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"{index} is not a valid safetensors index ({exc})", "restore the file from the model's source") from None
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise ModelError(f"{index} lists shard(s) that are missing: {', '.join(missing)}", "download every shard listed in the index")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(_read_file(index.parent / shard))
    absent = [name for name in weight_map if name not in tensors]
    if absent:
        raise ModelError(
            f"tensor {absent[0]} is listed in {index} under {weight_map[absent[0]]} but that file does not hold it"
            + (f" ({len(absent) - 1} more missing)" if len(absent) > 1 else ""),
            "download the shards again; they do not match the index",
        )
    return tensors


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """One .safetensors file as views into a copy-on-write memory map (no data is read here)."""
    if path.suffix in PICKLE_SUFFIXES:
        raise _refuse_pickle(path)
    size = path.stat().st_size
    hint = "the download was probably cut short or the file is not safetensors; download it again"
    if size < 8:
        raise ModelError(f"{path} is not a valid safetensors file: only {size} bytes", hint)
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise ModelError(f"{path} is not a valid safetensors file: its header claims {header_len} bytes but the file has {size}", hint)
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
        raise ModelError(f"{path} is not a valid safetensors file: unreadable header ({exc})", hint) from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data_len = size - data_start
    entries = [(name, *_header_entry(path, name, entry, data_len, hint)) for name, entry in header.items()]
    _check_spans(path, entries, data_len, hint)
    mm = np.memmap(path, dtype=np.uint8, mode="c") if data_len > 0 else np.zeros(0, np.uint8)
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape, begin, end in entries:
        raw_bytes = torch.from_numpy(mm[data_start + begin : data_start + end])
        if (data_start + begin) % torch.empty(0, dtype=dtype).element_size():
            raw_bytes = raw_bytes.clone()  # a misaligned tensor (rare) gets its own aligned copy
        tensors[name] = raw_bytes.view(dtype).reshape(shape)
    return tensors


def _header_entry(path: Path, name: str, entry: Any, data_len: int, hint: str) -> tuple[torch.dtype, list[int], int, int]:
    """One header entry checked as the safetensors spec (and its Rust reader) checks it: a known
    dtype, a shape of non-negative integers, offsets [begin, end] within the data whose span is
    exactly the shape's size (Python integers, so no product overflows)."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(entry, dict):
        raise ModelError(f"{path} is not a valid safetensors file: the header entry for tensor {name} is not an object", hint)
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
        raise ModelError(f"{path} is not a valid safetensors file: tensor {name} has shape {shape!r}, not a list of non-negative integers", hint)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
        raise ModelError(f"{path} is not a valid safetensors file: tensor {name} has data_offsets {offsets!r}, not [begin, end]", hint)
    dtype = _SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise ModelError(
            f"tensor {name} in {path} has dtype {dtype_name!r}, which llmcli cannot read",
            f"supported safetensors dtypes: {', '.join(_SAFETENSORS_DTYPES)}",
        )
    numel = 1
    for d in shape:
        numel *= d
    bound = 1
    for d in shape:  # torch keeps sizes (and a zero-sized tensor's other dimensions) in int64
        bound *= max(d, 1)
    begin, end = offsets
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if bound >= 2**63 or not 0 <= begin <= end or end - begin != nbytes:
        raise ModelError(f"{path} is corrupt: tensor {name} of shape {tuple(shape)} {dtype_name} needs {nbytes} bytes, its offsets give {end - begin}", hint)
    if end > data_len:
        raise ModelError(f"{path} is truncated: tensor {name} ends at byte {end} of the data but the file holds {data_len} bytes of data", hint)
    return dtype, shape, begin, end


def _check_spans(path: Path, entries: list[tuple[str, torch.dtype, list[int], int, int]], data_len: int, hint: str) -> None:
    """The tensors tile the data exactly, as the spec asks: no two overlap (a lying offset), no gap."""
    at = 0
    previous = None
    for name, _dtype, _shape, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != at:
            what = "overlaps" if begin < at else "leaves a gap after"
            raise ModelError(
                f"{path} is corrupt: tensor {name} (bytes {begin}..{end} of the data) {what} "
                + (f"tensor {previous}" if previous is not None else "the start of the data"),
                hint,
            )
        at, previous = end, name
    if at != data_len:
        raise ModelError(f"{path} is corrupt: its tensors cover {at} bytes of data but the file holds {data_len}", hint)


def write_safetensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file straight from the tensors' memory.

    safetensors' own save_file first turns every tensor into a bytes copy, which doubles the
    memory of a cache write (about 500 MB more for SmolLM2's weights); this streams each tensor.
    """
    names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    flat: list[torch.Tensor] = []
    offset = 0
    for name, tensor in tensors.items():
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + data.numel()]}
        offset += data.numel()
        flat.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for data in flat:
            f.write(memoryview(data.numpy()))


class FileMappings:
    """This process's private file mappings (from /proc/self/maps, read once), to hand back the
    pages under checkpoint tensors whose values were copied into another layout.

    A tensor read by _read_file is a view into a memory-mapped file: packing or quantizing it
    touches every page, and those pages stay resident (and count in the process's memory) for
    as long as any other tensor keeps the map alive. Released pages cost nothing to keep
    correct: they are private, never written, so a later touch reads them from the file again.
    """

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[1].endswith("p") and parts[4] != "0" and parts[5].startswith("/"):
                        lo, hi = parts[0].split("-")
                        self.ranges.append((int(lo, 16), int(hi, 16)))
        except OSError:
            pass  # not Linux: nothing to release

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the whole pages under `tensor` when they belong to a file mapping; otherwise nothing."""
        start = tensor.data_ptr()
        lo, hi = pages.whole_pages(start, start + tensor.numel() * tensor.element_size())
        if hi > lo and any(a <= lo and hi <= b for a, b in self.ranges):
            pages.release(lo, hi)


# ------------------------------------------------------------------ GGUF


@dataclass
class GGUFCheckpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # HF names, float32 (F16/BF16/quantized types dequantized)
    metadata: dict[str, Any]  # every GGUF key/value, e.g. tokenizer.ggml.tokens, tokenizer.chat_template
    # tensors with no HF equivalent, under their GGUF names (llama3's rope_freqs.weight)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class MappedTensor:
    """One GGUF tensor as its raw blocks: `raw` is (rows, bytes per row) uint8, a view into the
    file's memory map (a copy only for llama.cpp-permuted Q/K rows, put back in HF's order)."""

    name: str  # the GGUF name
    gtype: Any  # llmcli.core.formats.GGMLType
    shape: tuple[int, ...]  # torch order
    raw: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The float32 values in `shape` (a new tensor; F32 stays a view into the file)."""
        from llmcli.core.formats.blocks import dequantize_rows

        if self.gtype.name == "F32":
            return self.raw.view(torch.float32).reshape(self.shape)
        k = self.shape[-1] if self.shape else 1
        return dequantize_rows(self.raw, self.gtype, k).reshape(self.shape)


@dataclass
class GGUFBlocks:
    """A GGUF file mapped, not read: config, metadata and every tensor as raw blocks."""

    config: ModelConfig
    metadata: dict[str, Any]  # string arrays (the vocabulary) as gguf_meta.SkippedStrings: their length only
    tensors: dict[str, MappedTensor]  # HF names
    extra: dict[str, MappedTensor] = field(default_factory=dict)  # GGUF names (rope_freqs.weight)


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.LlamaModel.permute).

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3)...; HF rotates halves (x_i, x_{i+hd/2}).
    The converter reorders each head's rows from (half, i) to (i, half); this is the inverse.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: Path | str) -> GGUFCheckpoint:
    """A GGUF file -> config, float32 tensors under HF names, metadata (every tensor dequantized:
    for tools and tests; models load through map_gguf and keep the blocks)."""
    mapped = map_gguf(path)
    tensors = {name: t.dequantize() for name, t in mapped.tensors.items()}
    extra = {name: t.dequantize() for name, t in mapped.extra.items()}
    metadata = read_gguf_header(path, tensors=False).metadata  # with the vocabulary's strings, which map_gguf skips
    return GGUFCheckpoint(config=mapped.config, tensors=tensors, metadata=metadata, extra=extra)


def map_gguf(path: Path | str) -> GGUFBlocks:
    """A GGUF file -> config, metadata and its tensors as raw blocks mapped from the file.

    Nothing is read here beyond the header, and nothing larger than the file is allocated: the
    header's offsets, dimensions and types are checked against each other and the file size first
    (llama.cpp's gguf.c rule: tensors lie one after the other, each at the previous one's end
    rounded up to the alignment, so a type that misdeclares its size shows as a wrong offset).
    """
    from llmcli.core.formats import BY_ID, ggml_type

    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise _refuse_pickle(path)
    header = read_gguf_header(path, strings=False)  # the vocabulary's strings are the tokenizer's business
    source = str(path)
    shapes = {t.name: t.shape for t in header.tensors}
    config = config_from_gguf(header.metadata, shapes, source)
    family = family_of(config.model_type)
    names = family.GGUF_NAMES
    permuted = header.metadata["general.architecture"] in family.GGUF_PERMUTED_QK
    alignment = header.alignment
    redownload = "the file is damaged or was cut short; download it again"

    spans: list[tuple[GGUFTensorInfo, Any, int, int]] = []
    expected = header.data_offset
    previous = None
    for info in header.tensors:
        gtype = ggml_type(info.type_id, info.name, source)
        if any(d < 0 or d >= 2**40 for d in info.shape):
            raise ModelError(f"{source} is corrupt: tensor {info.name} has dimensions {info.shape} that overflow", redownload)
        row_len = info.shape[-1] if info.shape else 1
        if row_len % gtype.block:
            raise ModelError(f"{source} is corrupt: tensor {info.name} has rows of {row_len}, not a multiple of its {gtype.name} block of {gtype.block}", redownload)
        n_rows = 1
        for d in info.shape[:-1]:
            n_rows *= d
        nbytes = n_rows * gtype.row_bytes(row_len)  # Python integers: no overflow
        if info.offset != expected:
            after = "" if previous is None else f"{previous.name} ({BY_ID[previous.type_id].name}, shape {previous.shape}) before it ends at byte {expected}"
            raise ModelError(
                f"{source} is corrupt: tensor {info.name} ({gtype.name}, shape {info.shape}) starts at byte {info.offset}, "
                + (f"but the data starts at byte {expected}" if previous is None else f"but tensor {after}")
                + " (a type or shape that misdeclares a tensor's size, or a damaged offset)",
                redownload,
            )
        end = info.offset + nbytes
        if end > header.file_size:
            raise ModelError(
                f"{source} is truncated: tensor {info.name} ends at byte {end} but the file has {header.file_size}",
                "the download was probably cut short; download the file again",
            )
        spans.append((info, gtype, n_rows, nbytes))
        expected = -(-end // alignment) * alignment
        previous = info

    mm = np.memmap(path, dtype=np.uint8, mode="c") if header.file_size > header.data_offset else np.zeros(0, np.uint8)
    tensors: dict[str, MappedTensor] = {}
    extra: dict[str, MappedTensor] = {}
    for info, gtype, n_rows, nbytes in spans:
        name = names.hf_name(info.name)
        if name is None and info.name not in names.extra:
            raise ModelError(
                f"{source} holds tensor {info.name!r}, which has no place in llmcli's {config.model_type} model",
                f"this GGUF variant (e.g. mixture-of-experts or a vision tower) is not supported; use a plain {config.model_type} GGUF",
            )
        raw = torch.from_numpy(mm[info.offset : info.offset + nbytes]).view(n_rows, nbytes // n_rows if n_rows else 0)
        mapped = MappedTensor(info.name, gtype, info.shape, raw)
        if name is None:
            extra[info.name] = mapped
        else:
            tensors[name] = _unpermute_if_qk(mapped, config) if permuted else mapped
            if tensors[name] is not mapped:  # the rows were copied: the file's pages of them are not needed again
                _release_pages(mm, info.offset, nbytes)
    return GGUFBlocks(config=config, metadata=header.metadata, tensors=tensors, extra=extra)


def _release_pages(mm: np.memmap, offset: int, nbytes: int) -> None:
    """Drop the whole pages of mm[offset : offset + nbytes] from this process's RSS (they stay in
    the page cache, and a later read maps them again). The copied Q/K rows' source pages would
    otherwise count twice: 36 MiB for a 1B Llama, about 380 MiB for an 8B in Q4_K_M."""
    start = mm.ctypes.data + offset
    pages.release(start, start + nbytes)


def _unpermute_if_qk(t: MappedTensor, config: ModelConfig) -> MappedTensor:
    """llama.cpp's Q/K rows back in HF's order: whole rows of blocks move (blocks never cross rows)."""
    kind = t.name.split(".")[-2] if t.name.count(".") >= 2 else ""
    if kind not in ("attn_q", "attn_k"):
        return t
    n_head = config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads
    rows = t.raw.view(t.shape[0], -1) if len(t.shape) == 1 else t.raw  # a bias: its values are the rows
    order = unpermute_rope(torch.arange(rows.shape[0]), n_head)
    # a row gather, whole rows copied at once: numpy's take copies each row with one memcpy, where
    # torch's index_select on uint8 goes byte by byte (1 s of the 1B's load, against 20 ms)
    gathered = np.take(rows.numpy(), order.numpy(), axis=0)
    return MappedTensor(t.name, t.gtype, t.shape, torch.from_numpy(gathered).reshape(t.raw.shape))


# ------------------------------------------------------------------ loading into a module


def load_state(
    module: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    source: str,
    dtype: torch.dtype,
    ignore: Collection[str] = (),
) -> None:
    """Assign every parameter and persistent buffer of `module` from `tensors`, checking names and shapes.

    Works on modules built on the meta device: tensors replace the parameters (assign-style), so a
    tensor that already has `dtype` is used as it is, without a copy. Non-persistent buffers are
    taken when present and otherwise left alone (the family rebuilds them). Extra tensors are an
    error unless harmless (HARMLESS_EXTRAS) or ending with one of `ignore`.
    """
    persistent = set(module.state_dict(keep_vars=True).keys())
    # parameters shared under several names (tied weights) are one slot with several names
    slots: dict[int, list[tuple[str, bool]]] = {}
    objects: dict[int, torch.Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        slots.setdefault(id(p), []).append((name, True))
        objects[id(p)] = p
    for name, b in module.named_buffers(remove_duplicate=False):
        if b is None:
            continue
        slots.setdefault(id(b), []).append((name, False))
        objects[id(b)] = b

    known: set[str] = set()
    missing: list[str] = []
    plan: list[tuple[list[tuple[str, bool]], torch.Tensor]] = []
    for key, names in slots.items():
        known.update(n for n, _ in names)
        found = next((n for n, _ in names if n in tensors), None)
        if found is None:
            if any(n in persistent for n, _ in names):
                missing.append(names[0][0])
            continue
        current = objects[key]
        t = tensors[found]
        if tuple(t.shape) != tuple(current.shape):
            raise ModelError(
                f"tensor {found} in {source} has shape {tuple(t.shape)} but the model expects {tuple(current.shape)}",
                "the weights do not belong to this config; check that config.json and the weights come from the same model",
            )
        want = dtype if current.is_floating_point() else current.dtype
        if t.dtype != want:
            t = t.to(want)
        plan.append((names, t))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(
            f"{source} lacks tensor {missing[0]}{more}",
            "the file is incomplete or belongs to a different architecture; download the whole checkpoint",
        )
    extras = [
        n for n in tensors
        if n not in known and not n.endswith(HARMLESS_EXTRAS) and not (ignore and n.endswith(tuple(ignore)))
    ]
    if extras:
        more = f" and {len(extras) - 1} more" if len(extras) > 1 else ""
        raise ModelError(
            f"{source} has tensor {extras[0]}{more} that the model does not use",
            "the weights belong to a different architecture or config; check model_type and the layer counts",
        )
    for names, t in plan:
        value = torch.nn.Parameter(t, requires_grad=False) if names[0][1] else t
        for name, is_param in names:
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if is_param:
                owner._parameters[leaf] = value
            else:
                owner._buffers[leaf] = value
