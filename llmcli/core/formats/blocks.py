"""GGML block formats: weights kept in the blocks llama.cpp writes, read where they lie.

A `BlockLinear` holds one projection's weight rows as raw GGML blocks (a uint8 tensor of
(out_features, bytes per row)): for a GGUF these are views into the memory-mapped file, nothing is
copied; for an HF model `--quantize` writes them once at load. The native kernels
(core/kernels/blocks.c) multiply with the blocks directly (`block_matmul`), quantizing the
activations on the fly as ggml does. Without them (LLMCLI_KERNELS=0, no compiler, or a build
without that type) a call dequantizes this one matrix, uses torch and lets the float copy go:
slow, never a float copy of the model.

`TYPES` is the one table of GGML types: adding a type is one line there (and its kernels in C).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmcli.errors import ModelError, UsageError


@dataclass(frozen=True)
class GGMLType:
    name: str  # ggml's name (GGUF, gguf.GGMLQuantizationType)
    id: int  # ggml_type id, the number GGUF stores per tensor
    block: int  # values per block
    block_bytes: int  # bytes per block
    fallback: str | None = None  # llama.cpp's type for rows that are not a multiple of `block` (llama-quant.cpp)

    @property
    def flag(self) -> str:
        """The --quantize spelling: q4_k, q8_0, f16."""
        return self.name.lower()

    def row_bytes(self, k: int) -> int:
        return k // self.block * self.block_bytes


TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("F32", 0, 1, 4),
        GGMLType("F16", 1, 1, 2),
        GGMLType("BF16", 30, 1, 2),
        GGMLType("Q8_0", 8, 32, 34),
        GGMLType("Q4_0", 2, 32, 18),
        GGMLType("Q4_1", 3, 32, 20),
        GGMLType("Q5_0", 6, 32, 22),
        GGMLType("Q5_1", 7, 32, 24),
        GGMLType("Q2_K", 10, 256, 84, fallback="Q4_0"),
        GGMLType("Q3_K", 11, 256, 110, fallback="Q4_0"),
        GGMLType("Q4_K", 12, 256, 144, fallback="Q5_0"),
        GGMLType("Q5_K", 13, 256, 176, fallback="Q5_1"),
        GGMLType("Q6_K", 14, 256, 210, fallback="Q8_0"),
    )
}
BY_ID: dict[int, GGMLType] = {t.id: t for t in TYPES.values()}
SUPPORTED = ", ".join(TYPES)


def ggml_type(type_id: int, tensor: str, source: str) -> GGMLType:
    """The GGMLType of a GGUF tensor; unsupported types name the tensor, its type and the supported list."""
    found = BY_ID.get(type_id)
    if found is None:
        try:
            from gguf import GGMLQuantizationType

            name = GGMLQuantizationType(type_id).name
        except ValueError:
            name = f"unknown type {type_id}"
        raise ModelError(
            f"tensor {tensor} in {source} has GGML type {name}, which llmcli cannot run",
            f"supported types: {SUPPORTED}; requantize the model to one of them (e.g. `llmcli quantize SRC OUT.gguf --type Q4_K_M`)",
        )
    return found


def type_for_row(gtype: GGMLType, k: int) -> GGMLType:
    """gtype, or llama.cpp's replacement when rows of k values do not fill its blocks (Q4_K -> Q5_0, ...)."""
    while k % gtype.block:
        if gtype.fallback is None:
            return TYPES["F32"] if k % TYPES["Q8_0"].block else TYPES["Q8_0"]
        gtype = TYPES[gtype.fallback]
    return gtype


def _native(kernels, gtype: GGMLType) -> bool:
    return kernels is not None and kernels.supports_block(gtype.id)


def dequantize_rows(blocks: torch.Tensor, gtype: GGMLType, k: int, kernels=None) -> torch.Tensor:
    """(rows, row bytes) uint8 -> (rows, k) float32: a new tensor, whatever the type."""
    rows = blocks.shape[0]
    if _native(kernels, gtype) and blocks.device.type == "cpu":
        out = torch.empty((rows, k), dtype=torch.float32)
        if rows:
            index = torch.arange(rows, dtype=torch.int64)
            kernels.block_dequantize_rows(gtype.id, blocks.data_ptr(), index.data_ptr(), rows, k, out.data_ptr())
        return out
    raw = blocks.cpu().numpy()
    if gtype.name == "F32":
        return torch.from_numpy(raw.view(np.float32).copy())
    if gtype.name == "F16":
        return torch.from_numpy(raw.view(np.float16).astype(np.float32))
    if gtype.name == "BF16":
        return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float()
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(np.ascontiguousarray(dequantize(raw, GGMLQuantizationType(gtype.id)), dtype=np.float32)).reshape(rows, k)


QUANTIZE_ROWS = 1024  # rows per step without the kernels: the float temporaries stay a few MB


def quantize_rows(weight: torch.Tensor, gtype: GGMLType, kernels=None) -> torch.Tensor:
    """(N, K) float -> (N, row bytes) uint8 blocks, byte for byte llama.cpp's quantize_row_<type>_ref."""
    n, k = weight.shape
    out = torch.empty((n, gtype.row_bytes(k)), dtype=torch.uint8)
    if _native(kernels, gtype):
        for start in range(0, n, QUANTIZE_ROWS):  # float32 a chunk at a time: a bf16 model never gets a float copy
            chunk = weight[start : start + QUANTIZE_ROWS].detach().float().contiguous()
            if kernels.block_quantize_rows(gtype.id, chunk.data_ptr(), out[start:].data_ptr(), chunk.shape[0], k) != 0:
                raise MemoryError(f"not enough memory to quantize a {n} x {k} matrix to {gtype.name}")
        return out
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    for start in range(0, n, QUANTIZE_ROWS):
        chunk = weight[start : start + QUANTIZE_ROWS].detach().float().numpy()
        try:
            raw = quantize(chunk, GGMLQuantizationType(gtype.id))
        except NotImplementedError:
            raise UsageError(
                f"quantizing to {gtype.name} needs llmcli's native kernels, which are not available here",
                "install a C compiler (gcc) and unset LLMCLI_KERNELS=0, or choose q8_0, q4_0, q4_1, q5_0 or q5_1",
            ) from None
        out[start : start + chunk.shape[0]] = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(chunk.shape[0], -1))
    return out


class BlockLinear(nn.Module):
    """nn.Linear whose weight rows are GGML blocks (`blocks`: (out_features, row bytes) uint8).

    `blocks` is a non-persistent buffer: it never enters a state_dict, so the loader's shape
    checks see the bias alone, and it is never written to a float cache.
    """

    def __init__(self, gtype: GGMLType, blocks: torch.Tensor, in_features: int, bias: torch.Tensor | None, kernels=None):
        super().__init__()
        if in_features % gtype.block or tuple(blocks.shape) != (blocks.shape[0], gtype.row_bytes(in_features)):
            raise ValueError(f"{gtype.name} blocks of shape {tuple(blocks.shape)} do not hold rows of {in_features} values")
        self.gtype = gtype
        self.in_features, self.out_features = in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernels = kernels

    @classmethod
    def from_float(cls, linear: nn.Linear, gtype: GGMLType, kernels=None) -> BlockLinear:
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        return cls(gtype, quantize_rows(linear.weight, gtype, kernels), linear.in_features, bias, kernels)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.gtype.name}, bias={self.bias is not None}"

    def dequantize(self) -> torch.Tensor:
        """The (out, in) float32 matrix (a transient copy)."""
        return dequantize_rows(self.blocks, self.gtype, self.in_features, self.kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from llmcli.core.kernels.linear import _native_input

        if not (_native(self.kernels, self.gtype) and _native_input(x)):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantize().to(device=x.device, dtype=x.dtype), bias)
        flat = x.reshape(-1, self.in_features).contiguous()  # (M, in)
        y = torch.empty((flat.shape[0], self.out_features), dtype=torch.float32)
        bias = None if self.bias is None else self.bias.data_ptr()
        status = self.kernels.block_matmul(self.gtype.id, flat.data_ptr(), self.blocks.data_ptr(), bias, y.data_ptr(), flat.shape[0], self.out_features, self.in_features)
        if status != 0:
            raise MemoryError(f"block_matmul({self.gtype.name}) failed with status {status} for {flat.shape[0]} rows")
        return y.view(*x.shape[:-1], self.out_features)


class BlockEmbedding(nn.Module):
    """An embedding table in GGML blocks: the rows a batch looks up are dequantized, nothing else.

    A tied output projection (`as_linear`) multiplies with the same blocks: one copy of the matrix.
    """

    def __init__(self, gtype: GGMLType, blocks: torch.Tensor, embedding_dim: int, kernels=None):
        super().__init__()
        self.gtype = gtype
        self.num_embeddings, self.embedding_dim = blocks.shape[0], embedding_dim
        self.register_buffer("blocks", blocks, persistent=False)
        self.kernels = kernels

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.gtype.name}"

    def as_linear(self) -> BlockLinear:
        return BlockLinear(self.gtype, self.blocks, self.embedding_dim, None, self.kernels)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, k = self.num_embeddings, self.embedding_dim
        flat = ids.reshape(-1).to(torch.int64).cpu().contiguous()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n):
            raise IndexError(f"token id out of range for an embedding of {n} rows")
        if _native(self.kernels, self.gtype) and self.blocks.device.type == "cpu":
            out = torch.empty((flat.numel(), k), dtype=torch.float32)
            if flat.numel():
                self.kernels.block_dequantize_rows(self.gtype.id, self.blocks.data_ptr(), flat.data_ptr(), flat.numel(), k, out.data_ptr())
        else:
            unique, inverse = torch.unique(flat, return_inverse=True)
            out = dequantize_rows(self.blocks[unique.to(self.blocks.device)], self.gtype, k)[inverse]
        return out.view(*ids.shape, k).to(ids.device)
