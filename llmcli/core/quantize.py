"""`--quantize int8`: weight-only 8-bit, llama.cpp's Q8_0 format.

Each row of a weight matrix is cut into blocks of 32 values; a block keeps one float32 scale
(its largest magnitude / 127) and 32 int8 values. Activations stay float32: SmolLM2 has
activation outliers that per-tensor 8-bit activations (torch's dynamic quantization) do not
survive (perplexity 507 instead of 11.8 on our sample), while 8-bit weights in small blocks lose
almost nothing. Batch-1 decode reads a quarter of the float32 bytes, and that is its speed limit.
"""

from __future__ import annotations

import torch

from llmcli.errors import UsageError

QUANTIZE_CHOICES = ("none", "int8")
QBLOCK = 32


def check_scheme(scheme: str | None, dtype: torch.dtype, device: torch.device) -> str | None:
    """The scheme to apply (None for none); a UsageError for what cannot be done."""
    if scheme in (None, "none"):
        return None
    if scheme != "int8":
        raise UsageError(f"unknown --quantize {scheme!r}", f"use one of {', '.join(QUANTIZE_CHOICES)}")
    if device.type != "cpu" or dtype != torch.float32:
        raise UsageError("--quantize int8 runs on the CPU in float32", "use --device cpu --dtype float32 with --quantize int8")
    return scheme


QUANTIZE_ROWS = 4096  # rows per step: the float temporaries stay a few MB, not several copies of the largest matrix


def quantize_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 values (out, in) and float32 scales (out, in // 32). in % 32 == 0."""
    out, inp = weight.shape
    q = torch.empty((out, inp), dtype=torch.int8)
    scales = torch.empty((out, inp // QBLOCK), dtype=torch.float32)
    for start in range(0, out, QUANTIZE_ROWS):
        rows = slice(start, start + QUANTIZE_ROWS)
        blocks = weight[rows].detach().float().reshape(-1, inp // QBLOCK, QBLOCK)
        step = blocks.abs().amax(dim=-1) / 127.0  # (rows, in/32)
        safe = torch.where(step == 0, torch.ones_like(step), step)
        q[rows] = torch.round(blocks / safe[..., None]).clamp_(-127, 127).to(torch.int8).reshape(-1, inp)
        scales[rows] = step
    return q, scales


def dequantize_q8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    out, inp = q.shape
    return (q.view(out, inp // QBLOCK, QBLOCK).float() * scales[:, :, None]).reshape(out, inp)
