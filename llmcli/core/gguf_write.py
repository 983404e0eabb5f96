"""`llmcli quantize`: write a GGUF that llama.cpp loads, from an HF directory or another GGUF.

Tensor types follow llama.cpp's `llama-quantize` (src/llama-quant.cpp, llama_tensor_get_type) for
the presets below, without an importance matrix: 1-D tensors (norms, biases) stay F32; the output
projection (or a tied token embedding) gets Q6_K, or Q8_0 when its rows do not fill 256-value
super-blocks; the _M presets give attn_v and ffn_down Q6_K in the layers use_more_bits picks; the
_S presets give the first layers Q5_K; a row that does not fill its type's blocks takes llama.cpp's
replacement (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, else F16). The blocks themselves are
byte for byte llama.cpp's (formats.blocks.quantize_rows).

From an HF directory the metadata, tensor names and llama's Q/K row order are written as
convert_hf_to_gguf.py writes them for the llama-shaped families, with a byte-level BPE tokenizer
(tokenizer.ggml.model "gpt2"). From a GGUF every key/value is copied as it is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from llmcli.core.formats import TYPES, GGMLType, type_for_row
from llmcli.errors import ModelError, UsageError


@dataclass(frozen=True)
class Preset:
    name: str
    base: str  # the type of every other 2-D weight
    file_type: int  # llama.cpp's LLAMA_FTYPE_* (general.file_type)


PRESETS = {
    p.name: p
    for p in (
        Preset("F32", "F32", 0),
        Preset("F16", "F16", 1),
        Preset("BF16", "BF16", 32),
        Preset("Q8_0", "Q8_0", 7),
        Preset("Q4_0", "Q4_0", 2),
        Preset("Q4_1", "Q4_1", 3),
        Preset("Q5_0", "Q5_0", 8),
        Preset("Q5_1", "Q5_1", 9),
        Preset("Q6_K", "Q6_K", 18),
        Preset("Q4_K_S", "Q4_K", 14),
        Preset("Q4_K_M", "Q4_K", 15),
        Preset("Q5_K_S", "Q5_K", 16),
        Preset("Q5_K_M", "Q5_K", 17),
    )
}


def preset(name: str) -> Preset:
    found = PRESETS.get(name.upper())
    if found is None:
        raise UsageError(f"unknown --type {name!r}", f"use one of {', '.join(PRESETS)}")
    return found


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(p: Preset, name: str, shape: tuple[int, ...], n_layers: int, has_output: bool) -> GGMLType:
    """The type llama-quantize gives GGUF tensor `name` (torch-order `shape`) under preset p."""
    if len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight") or name == "rope_freqs.weight":
        return TYPES["F32"]
    kind = name.split(".")[-2]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    new = TYPES[p.base]
    quantized = p.base not in ("F32", "F16", "BF16")
    if quantized:
        if name == "output.weight" or (not has_output and name == "token_embd.weight"):
            if shape[-1] % 256:
                new = TYPES["Q8_0"]
            elif new.name != "Q8_0":
                new = TYPES["Q6_K"]
        elif kind == "attn_v":
            if p.name in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n_layers):
                new = TYPES["Q6_K"]
            elif p.name == "Q4_K_S" and layer < 4:
                new = TYPES["Q5_K"]
        elif kind == "ffn_down":
            if p.name in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n_layers):
                new = TYPES["Q6_K"]
            elif p.name == "Q4_K_S" and layer < n_layers // 8:
                new = TYPES["Q5_K"]
    fitted = type_for_row(new, shape[-1])
    return TYPES["F16"] if fitted.name == "F32" and new.name != "F32" else fitted


# ---------------------------------------------------------------- sources


@dataclass
class SourceTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order
    gtype: GGMLType  # as stored in the source
    raw: Callable[[], torch.Tensor]  # the stored blocks (rows, row bytes), for a copy without requantizing
    values: Callable[[], torch.Tensor]  # float32 values in `shape`


@dataclass
class Source:
    arch: str
    metadata: list[tuple[str, Any, Any, Any]]  # (key, value, GGUFValueType, array item type)
    tensors: list[SourceTensor]


def read_source(path: Path) -> Source:
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(path)
    if path.is_dir():
        return _hf_source(path)
    raise ModelError(f"{path} is neither an HF-format directory nor a .gguf file", "give an HF model directory or a GGUF file to quantize")


def _gguf_source(path: Path) -> Source:
    import gguf

    from llmcli.core.formats import ggml_type
    from llmcli.core.weights import map_gguf

    map_gguf(path)  # the same checks as loading: names, types, offsets, sizes
    reader = gguf.GGUFReader(path)
    metadata = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        metadata.append((key, field.contents(), vtype, sub))
    arch = str(reader.fields["general.architecture"].contents())
    tensors = []
    for t in reader.tensors:
        gtype = ggml_type(int(t.tensor_type), t.name, str(path))
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        data = np.asarray(t.data)

        def raw(data=data, shape=shape):
            flat = data.view(np.uint8)
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            return torch.from_numpy(flat.reshape(rows, -1).copy())  # one tensor at a time: the reader maps the file read-only

        def values(raw=raw, gtype=gtype, shape=shape):
            from llmcli.core.formats.blocks import dequantize_rows
            from llmcli.core.kernels import load_kernels

            return dequantize_rows(raw(), gtype, shape[-1], load_kernels()).reshape(shape)

        tensors.append(SourceTensor(t.name, shape, gtype, raw, values))
    return Source(arch, metadata, tensors)


def _gguf_names(family) -> dict[str, str]:
    """HF name -> GGUF name, the inverse of the family's GGUF_NAMES.hf_name."""
    names = family.GGUF_NAMES
    out = {f"{hf}.{kind}": f"{g}.{kind}" for g, hf in names.global_names.items() for kind in ("weight", "bias")}
    out.update({f"{names.block_prefix}.{{i}}.{hf}.{kind}": f"blk.{{i}}.{g}.{kind}" for g, hf in names.block_names.items() for kind in ("weight", "bias")})
    return out


def _hf_source(path: Path) -> Source:
    import gguf

    from llmcli.core import weights
    from llmcli.core.config import GGUF_ARCHITECTURES, family_of
    from llmcli.core.loader import read_config
    from llmcli.core.models.llama import rope_inv_freq

    config = read_config(path)
    arch = next((a for a, t in GGUF_ARCHITECTURES.items() if t == config.model_type), None)
    if arch is None:
        raise ModelError(
            f"{path} is a {config.model_type} model, which llmcli cannot write as GGUF",
            f"llmcli quantize converts {', '.join(sorted(set(GGUF_ARCHITECTURES.values())))} models; use llama.cpp's convert_hf_to_gguf.py for others",
        )
    family = family_of(config.model_type)
    T = gguf.GGUFValueType
    c = config
    meta: list[tuple[str, Any, Any, Any]] = [
        ("general.name", path.name, T.STRING, None),
        (f"{arch}.context_length", c.max_position_embeddings, T.UINT32, None),
        (f"{arch}.embedding_length", c.hidden_size, T.UINT32, None),
        (f"{arch}.block_count", c.num_hidden_layers, T.UINT32, None),
        (f"{arch}.feed_forward_length", c.intermediate_size, T.UINT32, None),
        (f"{arch}.rope.dimension_count", c.head_dim, T.UINT32, None),
        (f"{arch}.attention.head_count", c.num_attention_heads, T.UINT32, None),
        (f"{arch}.attention.head_count_kv", c.num_key_value_heads, T.UINT32, None),
        (f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps, T.FLOAT32, None),
        (f"{arch}.rope.freq_base", c.rope_theta, T.FLOAT32, None),
        (f"{arch}.vocab_size", c.vocab_size, T.UINT32, None),
    ]
    if c.head_dim != c.hidden_size // c.num_attention_heads:
        meta += [(f"{arch}.attention.key_length", c.head_dim, T.UINT32, None), (f"{arch}.attention.value_length", c.head_dim, T.UINT32, None)]
    scaling = c.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        meta += [(f"{arch}.rope.scaling.type", "linear", T.STRING, None), (f"{arch}.rope.scaling.factor", float(scaling["factor"]), T.FLOAT32, None)]
    if c.sliding_window:
        raise ModelError(f"{path} uses a sliding window, which llmcli quantize does not write", "use llama.cpp's convert_hf_to_gguf.py for this model")
    meta += _tokenizer_metadata(path, c)

    hf = family.sanitize(weights.read_safetensors(path), c)
    names = _gguf_names(family)
    permuted = arch in family.GGUF_PERMUTED_QK
    tensors = []
    for name, t in hf.items():
        generic = re.sub(r"^model\.layers\.(\d+)\.", "model.layers.{i}.", name)
        layer = re.match(r"^model\.layers\.(\d+)\.", name)
        if generic not in names:
            raise ModelError(f"tensor {name} in {path} has no GGUF name", "llmcli quantize writes the llama-shaped families' tensors only")
        gname = names[generic].replace("{i}", layer.group(1)) if layer else names[generic]
        tensors.append(_float_tensor(gname, t, permuted, c))
    if scaling.get("rope_type", scaling.get("type")) == "llama3":  # convert_hf_to_gguf writes the divisors as a tensor
        plain = rope_inv_freq(type(c)(**{**c.__dict__, "rope_scaling": None}))
        tensors.append(_float_tensor("rope_freqs.weight", plain / rope_inv_freq(c), False, c))
    return Source(arch, meta, tensors)


def _float_tensor(gname: str, t: torch.Tensor, permuted: bool, config) -> SourceTensor:
    def values(t=t):
        w = t.detach().float()
        kind = gname.split(".")[-2] if gname.count(".") >= 2 else ""
        if permuted and kind in ("attn_q", "attn_k"):  # llama.cpp's row order (convert_hf_to_gguf's LlamaModel.permute)
            n_head = config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads
            w = _permute(w, n_head)
        return w

    shape = tuple(t.shape)
    return SourceTensor(gname, shape, TYPES["F32"], lambda: values().reshape(-1, shape[-1]).contiguous().view(torch.uint8), values)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.LlamaModel.permute: each head's rows from (half, i) to (i, half)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tokenizer_metadata(path: Path, config) -> list[tuple[str, Any, Any, Any]]:
    import gguf

    T = gguf.GGUFValueType
    file = path / "tokenizer.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{file} cannot be read ({exc})", "an HF model directory needs its tokenizer.json to be written as GGUF") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ModelError(f"{file} is not a byte-level BPE tokenizer", "llmcli quantize writes byte-level BPE tokenizers (gpt2-style); use llama.cpp's convert_hf_to_gguf.py for this model")
    vocab = dict(model["vocab"])
    special = set()
    for added in data.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    meta = [
        ("tokenizer.ggml.model", "gpt2", T.STRING, None),
        ("tokenizer.ggml.pre", "default", T.STRING, None),
        ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        ("tokenizer.ggml.token_type", [int(t) for t in types], T.ARRAY, T.INT32),
        ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
    ]
    for key, value in (("bos", config.bos_token_id), ("eos", (config.eos_token_id or [None])[0]), ("padding", config.pad_token_id)):
        if value is not None:
            meta.append((f"tokenizer.ggml.{key}_token_id", int(value), T.UINT32, None))
    try:
        template = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError):
        template = None
    if isinstance(template, str):
        meta.append(("tokenizer.chat_template", template, T.STRING, None))
    return meta


# ---------------------------------------------------------------- writing


def iter_plan(source: Source, p: Preset) -> Iterator[tuple[SourceTensor, GGMLType]]:
    names = {t.name for t in source.tensors}
    n_layers = len({t.name.split(".")[1] for t in source.tensors if t.name.startswith("blk.")})
    for t in source.tensors:
        yield t, tensor_type(p, t.name, t.shape, n_layers, "output.weight" in names)


def write_gguf(source: Source, out: Path, p: Preset, notify: Callable[[str], None] = lambda _m: None) -> dict[str, int]:
    """Write `source` quantized under preset p to `out`; returns how many tensors got each type."""
    import gguf

    from llmcli.core.formats.blocks import quantize_rows
    from llmcli.core.kernels import load_kernels

    kernels = load_kernels()
    writer = gguf.GGUFWriter(out, source.arch)
    for key, value, vtype, sub in source.metadata:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_file_type(p.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts: dict[str, int] = {}
    for t, gtype in iter_plan(source, p):
        if gtype == t.gtype:
            blocks = t.raw()  # already in that type: the source's bytes as they are
        elif gtype.name == "F32":
            blocks = t.values().reshape(-1, t.shape[-1] if t.shape else 1).contiguous().view(torch.uint8)
        else:
            blocks = quantize_rows(t.values().reshape(-1, t.shape[-1]), gtype, kernels)
        writer.add_tensor(t.name, blocks.numpy(), raw_shape=_byte_shape(t.shape, gtype), raw_dtype=gguf.GGMLQuantizationType(gtype.id))
        counts[gtype.name] = counts.get(gtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def _byte_shape(shape: tuple[int, ...], gtype: GGMLType) -> list[int]:
    """GGUFWriter's raw_shape: the torch-order shape with the last dimension in bytes."""
    return [*shape[:-1], shape[-1] // gtype.block * gtype.block_bytes]
