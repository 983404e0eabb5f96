"""Linear layers on the native kernels.

float32 weights are repacked once, at load, into `matvec.c`'s panels (32 output columns each,
k-major): every float32 CPU call, one position or a whole prompt, then runs on
`matmul_panels_f32`, which streams the weights once for all rows and computes every output
element in one order whatever the number of rows, so a sequence's numbers are the same alone
or in a batch of any size.

Q8_0 weights (`--quantize int8`) use the same panels for their int8 values and scales, and the
same kernel, which dequantizes each value as it loads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.core.kernels import Kernels, LinearDesc
from llmcli.core.quantize import QBLOCK, dequantize_q8, quantize_q8

PANEL = 32  # matvec.c's panel width


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) -> the N * K values in matvec.c's panel order: panel p is rows 32p..32p+31 as [K][32],
    the last panel [K][N mod 32] when N is not a multiple of 32."""
    n, k = weight.shape
    full = n // PANEL * PANEL
    out = torch.empty(n * k, dtype=weight.dtype)  # one copy: this runs over every weight at load
    out[: full * k].view(-1, k, PANEL).copy_(weight[:full].reshape(-1, PANEL, k).transpose(1, 2))
    out[full * k :].view(k, n - full).copy_(weight[full:].t())
    return out


def unpack_panels(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """pack_panels' inverse: the (N, K) matrix."""
    full = n // PANEL * PANEL
    head = packed[: full * k].view(-1, k, PANEL).transpose(1, 2).reshape(full, k)
    tail = packed[full * k :].view(k, n - full).t()
    return torch.cat([head, tail])


def _native_input(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad


def _checked(status: int, y: torch.Tensor) -> torch.Tensor:
    if status != 0:  # as torch does when an allocation fails
        raise MemoryError(f"not enough memory for a transposed copy of {y.shape[0]} activation rows")
    return y


class KernelLinear(nn.Module):
    """nn.Linear with float32 weights held in panels (`weight_panels`), computed by the native kernel."""

    def __init__(self, linear: nn.Linear, kernels: Kernels, panels: torch.Tensor | None = None):
        """panels: this weight already in panel order (from the loader's cache), used as it is."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        ready = panels is not None and panels.dtype == torch.float32 and panels.shape == (linear.in_features * linear.out_features,)
        self.register_buffer("weight_panels", panels if ready else pack_panels(linear.weight.detach().float()))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().contiguous(), requires_grad=False)
        self.kernels = kernels

    def unpacked_weight(self) -> torch.Tensor:
        """The (out, in) weight matrix, as nn.Linear holds it (a copy)."""
        return unpack_panels(self.weight_panels, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _native_input(x):  # autograd or another dtype: torch on the unpacked matrix
            return F.linear(x, self.unpacked_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        flat = x.reshape(-1, self.in_features).contiguous()  # (M, in)
        y = torch.empty((flat.shape[0], self.out_features), dtype=torch.float32)
        bias = None if self.bias is None else self.bias.data_ptr()
        done = self.kernels.matmul_panels_f32(flat.data_ptr(), self.weight_panels.data_ptr(), bias, y.data_ptr(), flat.shape[0], self.out_features, self.in_features)
        return _checked(done, y).view(*x.shape[:-1], self.out_features)


class PanelEmbedding(nn.Module):
    """An embedding table read from a KernelLinear's panels: a model with tied embeddings keeps one
    float32 copy of the matrix for both the input embedding and the output projection."""

    def __init__(self, output: KernelLinear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = output.out_features, output.in_features
        self.register_buffer("weight_panels", output.weight_panels)  # the same tensor: state_dict lists it here first

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, k = self.num_embeddings, self.embedding_dim
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n):
            raise IndexError(f"token id out of range for an embedding of {n} rows")
        full = n // PANEL * PANEL
        out = torch.empty((flat.numel(), k), dtype=self.weight_panels.dtype)
        head = flat < full
        rows = flat[head]
        out[head] = self.weight_panels[: full * k].view(-1, k, PANEL)[rows // PANEL, :, rows % PANEL]
        if full < n:
            out[~head] = self.weight_panels[full * k :].view(k, n - full)[:, flat[~head] - full].t()
        return out.view(*ids.shape, k)


def share_tied_embedding(module: nn.Module, tied: torch.Tensor) -> None:
    """After accelerate_linears: the nn.Embedding whose weight is `tied` (the tensor the output
    projection was tied to) reads its rows from the output projection's panels instead."""
    output = getattr(module, "lm_head", None)
    if not isinstance(output, KernelLinear):
        return
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Embedding) and child.weight is tied:
                setattr(parent, name, PanelEmbedding(output))


class Q8Linear(nn.Module):
    """Q8_0 weights (int8 in blocks of 32 with a float32 scale each), float32 activations.

    The int8 values and the scales are held in panels like KernelLinear's, and every call, one
    position or a whole prompt, runs on the native kernel, which gives exactly KernelLinear's
    result on the dequantized matrix. Without kernels, calls dequantize the matrix and use
    torch (slow, the same numbers up to summation order).
    """

    def __init__(self, linear: nn.Linear, kernels: Kernels | None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = quantize_q8(linear.weight)
        self.register_buffer("qweight_panels", pack_panels(q))  # out * in int8
        self.register_buffer("scale_panels", pack_panels(scales))  # out * in / 32 float32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().contiguous(), requires_grad=False)
        self.kernels = kernels

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 values (out, in) and scales (out, in / 32) in quantize_q8's row layout."""
        n, k = self.out_features, self.in_features
        return unpack_panels(self.qweight_panels, n, k), unpack_panels(self.scale_panels, n, k // QBLOCK)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is None or not _native_input(x):
            return F.linear(x, dequantize_q8(*self.unpacked()).to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        flat = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty((flat.shape[0], self.out_features), dtype=torch.float32)
        bias = None if self.bias is None else self.bias.data_ptr()
        done = self.kernels.matmul_panels_q8(
            flat.data_ptr(), self.qweight_panels.data_ptr(), self.scale_panels.data_ptr(), bias, y.data_ptr(), flat.shape[0], self.out_features, self.in_features
        )
        return _checked(done, y).view(*x.shape[:-1], self.out_features)


def describe(linear: nn.Module) -> LinearDesc | None:
    """The C description of a kernel-backed linear layer (pointers into its tensors), or None."""
    bias = None if linear.bias is None else linear.bias.data_ptr()
    if isinstance(linear, KernelLinear):
        return LinearDesc(0, linear.weight_panels.data_ptr(), None, bias, linear.out_features, linear.in_features)
    if isinstance(linear, Q8Linear) and linear.kernels is not None:
        return LinearDesc(1, linear.qweight_panels.data_ptr(), linear.scale_panels.data_ptr(), bias, linear.out_features, linear.in_features)
    return None


def accelerate_linears(module: nn.Module, kernels: Kernels | None, quantize: str | None, panels: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Swap every float32 CPU nn.Linear of `module` for its kernel-backed twin, in place.

    quantize="int8" makes them Q8Linear (where in_features is a multiple of 32; others stay
    float32); otherwise KernelLinear when kernels are available. `panels` maps a layer's
    `<name>.weight_panels` (as in the module's state_dict) to its weight already packed, as
    panel_state returned it. Returns the module.
    """
    from llmcli.core.weights import FileMappings

    mappings = FileMappings()
    # only the parents are listed: a list of every module would keep each replaced layer's weights
    # alive until the end, a second copy of the model at the peak
    parents = [(prefix, m) for prefix, m in module.named_modules() if any(type(c) is nn.Linear for c in m.children())]
    for prefix, parent in parents:
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.dtype != torch.float32 or child.weight.device.type != "cpu":
                continue
            if quantize == "int8" and child.in_features % QBLOCK == 0:
                setattr(parent, name, Q8Linear(child, kernels))
            elif kernels is not None:
                ready = (panels or {}).get(f"{prefix}.{name}.weight_panels" if prefix else f"{name}.weight_panels")
                setattr(parent, name, KernelLinear(child, kernels, ready))
            else:
                continue
            mappings.release(child.weight)  # its values now live in the new layout: one copy in memory, not two
    return module


def panel_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every KernelLinear's packed weight by its state_dict name: what accelerate_linears can reuse."""
    return {f"{name}.weight_panels": m.weight_panels for name, m in module.named_modules() if isinstance(m, KernelLinear)}
