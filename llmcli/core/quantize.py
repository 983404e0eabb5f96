"""`--quantize int8`: int8 weights with dynamically quantized activations on torch's fbgemm kernels.

The same scheme as llama.cpp's Q8_0 x Q8 dot products: per-output-channel int8 weights, 8-bit
activations quantized per call. On x86 with AVX512-VNNI these matmuls read a quarter of the
float32 bytes, and batch-1 decode is bound by exactly those bytes.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from llmcli.errors import UsageError

QUANTIZE_CHOICES = ("none", "int8")


def quantize_linears(module: nn.Module, scheme: str) -> nn.Module:
    """Replace every nn.Linear of a float32 CPU module by its int8 dynamic-quantized twin, in place."""
    if scheme in (None, "none"):
        return module
    if scheme != "int8":
        raise UsageError(f"unknown --quantize {scheme!r}", f"use one of {', '.join(QUANTIZE_CHOICES)}")
    if "fbgemm" not in torch.backends.quantized.supported_engines and "x86" not in torch.backends.quantized.supported_engines:
        raise UsageError("--quantize int8 needs torch's fbgemm/x86 int8 kernels, which this torch build lacks", "run without --quantize")
    first = next(module.parameters())
    if first.device.type != "cpu" or first.dtype != torch.float32:
        raise UsageError("--quantize int8 runs on the CPU in float32", "use --device cpu --dtype float32 with --quantize int8")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization is marked for migration to torchao; its CPU kernels are what we want here
        warnings.simplefilter("ignore")
        quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return module
