"""Linear layers whose decode-shaped calls run on the native kernels.

A call is decode-shaped when every sequence brings one position: x is (B, 1, in) or (B, in).
Those calls read all the weights for a few rows of activations and go to `matvec.c`; longer
inputs (prefill, perplexity, encoders) are real matrix products and stay on torch's sgemm.
Choosing by shape, not by batch size, keeps a sequence's decode numerics the same alone or in
a batch of any size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.core.kernels import Kernels, LinearDesc
from llmcli.core.quantize import QBLOCK, dequantize_q8, quantize_q8


def _decode_shaped(x: torch.Tensor) -> bool:
    return x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1)


def _native_input(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad


class KernelLinear(nn.Module):
    """float32 weights, as nn.Linear (same `weight`/`bias`), with the native matvec for decode."""

    def __init__(self, linear: nn.Linear, kernels: Kernels):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().contiguous(), requires_grad=False)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_decode_shaped(x) and _native_input(x)):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features).contiguous()  # (M, in)
        y = torch.empty((flat.shape[0], self.out_features), dtype=torch.float32)
        bias = None if self.bias is None else self.bias.data_ptr()
        self.kernels.matvec_f32(flat.data_ptr(), self.weight.data_ptr(), bias, y.data_ptr(), flat.shape[0], self.out_features, self.in_features)
        return y.view(*x.shape[:-1], self.out_features)


class Q8Linear(nn.Module):
    """Q8_0 weights (int8 in blocks of 32 with a float32 scale each), float32 activations.

    Decode-shaped calls run on the native kernel straight from the int8 values; longer inputs
    dequantize the matrix for the call and use sgemm, which is far faster than an int8 loop
    there. Without kernels every call takes the dequantizing path (slow, same results).
    """

    def __init__(self, linear: nn.Linear, kernels: Kernels | None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = quantize_q8(linear.weight)
        self.register_buffer("qweight", q)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out, in / 32) float32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().contiguous(), requires_grad=False)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is None or not (_decode_shaped(x) and _native_input(x)):
            return F.linear(x, dequantize_q8(self.qweight, self.scales).to(x.dtype), self.bias)
        flat = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty((flat.shape[0], self.out_features), dtype=torch.float32)
        bias = None if self.bias is None else self.bias.data_ptr()
        self.kernels.matvec_q8(
            flat.data_ptr(), self.qweight.data_ptr(), self.scales.data_ptr(), bias, y.data_ptr(), flat.shape[0], self.out_features, self.in_features
        )
        return y.view(*x.shape[:-1], self.out_features)


def describe(linear: nn.Module) -> LinearDesc | None:
    """The C description of a kernel-backed linear layer (pointers into its tensors), or None."""
    bias = None if linear.bias is None else linear.bias.data_ptr()
    if isinstance(linear, KernelLinear):
        return LinearDesc(0, linear.weight.data_ptr(), None, bias, linear.out_features, linear.in_features)
    if isinstance(linear, Q8Linear) and linear.kernels is not None:
        return LinearDesc(1, linear.qweight.data_ptr(), linear.scales.data_ptr(), bias, linear.out_features, linear.in_features)
    return None


def accelerate_linears(module: nn.Module, kernels: Kernels | None, quantize: str | None) -> nn.Module:
    """Swap every float32 CPU nn.Linear of `module` for its kernel-backed twin, in place.

    quantize="int8" makes them Q8Linear (where in_features is a multiple of 32; others stay
    float32); otherwise KernelLinear when kernels are available. Returns the module.
    """
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.dtype != torch.float32 or child.weight.device.type != "cpu":
                continue
            if quantize == "int8" and child.in_features % QBLOCK == 0:
                setattr(parent, name, Q8Linear(child, kernels))
            elif kernels is not None:
                setattr(parent, name, KernelLinear(child, kernels))
    return module
