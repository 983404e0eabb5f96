"""Linear weight formats, chosen before the weights load (gpt-fast's module swap).

A format is an nn.Module class that can be built from GGUF blocks or from float weights, runs
forward, and describes itself to the C kernels (`describe` -> kernels.LinearDesc) so a whole
decode step can run natively. The registry maps a GGML type name to the class that runs it:

- F32: float32 weights, repacked into matvec.c's panels (kernels.linear.KernelLinear) when the
  kernels are there, plain nn.Linear on the mapped file otherwise;
- every other type of blocks.TYPES (F16, BF16, Q8_0, Q4_0, ..., Q6_K): BlockLinear, the raw blocks.

Fusing (qkv, gate_up) never copies blocks: `fuse_linears` concatenates float weights as before,
and puts block layers side by side in a ConcatLinear whose parts write adjacent output columns.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from llmcli.core.formats.blocks import BY_ID, SUPPORTED, TYPES, BlockEmbedding, BlockLinear, GGMLType, ggml_type, type_for_row

__all__ = [
    "BY_ID", "SUPPORTED", "TYPES", "BlockEmbedding", "BlockLinear", "ConcatLinear", "GGMLType", "QUANTIZE_CHOICES",
    "describe", "fuse_linears", "ggml_type", "quantize_format", "type_for_row",
]

# --quantize choices for HF models (int8: the old name of q8_0, kept as an alias)
QUANTIZE_CHOICES = ("none", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "int8")
_ALIASES = {"int8": "q8_0"}


def quantize_format(scheme: str | None) -> GGMLType | None:
    """The GGMLType a --quantize value names (None for none); a UsageError for an unknown one."""
    from llmcli.errors import UsageError

    if scheme in (None, "none"):
        return None
    name = _ALIASES.get(scheme.lower(), scheme.lower())
    if name not in QUANTIZE_CHOICES:
        raise UsageError(f"unknown --quantize {scheme!r}", f"use one of {', '.join(QUANTIZE_CHOICES)}")
    return TYPES[name.upper()]


class ConcatLinear(nn.Module):
    """Several linear layers on the same input, their outputs side by side (fused qkv / gate_up
    of block weights): each part keeps its own blocks, nothing is copied."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.bias = None  # each part carries its own
        self._desc = None  # the native description (kind 3), built on first use; False when some part is not native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from llmcli.core.kernels.linear import _native_input

        if self._desc is None:
            self._desc = describe(self) or False
        if not self._desc or not _native_input(x):
            return torch.cat([p(x) for p in self.parts], dim=-1)
        kernels = next(p.kernels for p in self.parts if getattr(p, "kernels", None) is not None)
        flat = x.reshape(-1, self.in_features).contiguous()  # (M, in)
        y = torch.empty((flat.shape[0], self.out_features), dtype=torch.float32)
        status = kernels.linear_forward(ctypes.byref(self._desc), flat.data_ptr(), y.data_ptr(), flat.shape[0])
        if status != 0:
            raise MemoryError(f"the native product of {len(self.parts)} fused parts failed with status {status} for {flat.shape[0]} rows")
        return y.view(*x.shape[:-1], self.out_features)


def fuse_linears(parts: list[nn.Module]) -> nn.Module:
    """One module computing the parts' outputs side by side: a concatenated nn.Linear for float
    weights (fewer, larger matmuls), a ConcatLinear when some part holds blocks."""
    if all(type(p) is nn.Linear for p in parts):
        weight = _cat([p.weight.detach() for p in parts])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None, device="meta")  # no random init
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if parts[0].bias is not None:
            fused.bias = nn.Parameter(_cat([p.bias.detach() for p in parts]), requires_grad=False)
        return fused
    return ConcatLinear(parts)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0; on the meta device just the shape (torch.cat there imports the compiler stack)."""
    if tensors[0].is_meta:
        rows = sum(t.shape[0] for t in tensors)
        return torch.empty((rows, *tensors[0].shape[1:]), dtype=tensors[0].dtype, device="meta")
    return torch.cat(tensors, dim=0)


def describe(linear: nn.Module):
    """The C description of a kernel-backed linear layer (kernels.LinearDesc, pointers into its
    tensors), or None when some part of it cannot run natively."""
    from llmcli.core.kernels import LinearDesc
    from llmcli.core.kernels.linear import KernelLinear

    bias = None if getattr(linear, "bias", None) is None else linear.bias.data_ptr()
    if isinstance(linear, KernelLinear):
        return LinearDesc(kind=0, weight=linear.weight_panels.data_ptr(), bias=bias, n=linear.out_features, k=linear.in_features)
    kernels = getattr(linear, "kernels", None)
    if isinstance(linear, BlockLinear) and kernels is not None and kernels.supports_block(linear.gtype.id):
        return LinearDesc(kind=2, weight=linear.blocks.data_ptr(), bias=bias, n=linear.out_features, k=linear.in_features, type=linear.gtype.id)
    if isinstance(linear, ConcatLinear):
        parts = [describe(p) for p in linear.parts]
        first = next((p for p in linear.parts if getattr(p, "kernels", None) is not None), None)
        if first is None or any(p is None for p in parts):
            return None
        array = (LinearDesc * len(parts))(*parts)
        desc = LinearDesc(kind=3, n=linear.out_features, k=linear.in_features, nparts=len(parts))
        desc.parts = ctypes.cast(array, ctypes.POINTER(LinearDesc))
        linear.described_parts = array  # the C array lives as long as the module, not the (copied) description
        return desc
    return None
