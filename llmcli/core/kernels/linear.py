"""Linear layers on the native kernels.

float32 weights are repacked once, at load, into `matvec.c`'s panels (32 output columns each,
k-major): every float32 CPU call, one position or a whole prompt, then runs on
`matmul_panels_f32`, which streams the weights once for all rows and computes every output
element in one order whatever the number of rows, so a sequence's numbers are the same alone
or in a batch of any size.

Quantized weights (GGUF blocks, `--quantize q4_k`, ...) are llmcli.core.formats.BlockLinear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.core.kernels import Kernels

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

    def __init__(self, linear: nn.Linear, kernels: Kernels):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_panels", pack_panels(linear.weight.detach().float()))
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
    projection was tied to) reads its rows from the output projection's panels or blocks instead."""
    from llmcli.core.formats import BlockEmbedding, BlockLinear

    output = getattr(module, "lm_head", None)
    if isinstance(output, KernelLinear):
        make = lambda: PanelEmbedding(output)  # noqa: E731
    elif isinstance(output, BlockLinear):
        make = lambda: BlockEmbedding(output.gtype, output.blocks, output.in_features, output.kernels)  # noqa: E731
    else:
        return
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Embedding) and child.weight is tied:
                setattr(parent, name, make())


def accelerate_linears(module: nn.Module, kernels: Kernels | None, fmt=None) -> nn.Module:
    """Swap every float32 CPU nn.Linear of `module` for its kernel-backed twin, in place.

    fmt (a formats.GGMLType, from --quantize) makes them BlockLinear in that type (or llama.cpp's
    replacement where the rows do not fill its blocks: Q4_K -> Q5_0, ...); otherwise
    KernelLinear when kernels are available. Returns the module.
    """
    from llmcli.core.formats import BlockLinear, type_for_row
    from llmcli.core.weights import FileMappings

    mappings = FileMappings()
    # only the parents are listed: a list of every module would keep each replaced layer's weights
    # alive until the end, a second copy of the model at the peak
    parents = [m for m in module.modules() if any(type(c) is nn.Linear for c in m.children())]
    for parent in parents:
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.dtype != torch.float32 or child.weight.device.type != "cpu":
                continue
            gtype = None if fmt is None else type_for_row(fmt, child.in_features)
            if gtype is not None and gtype.name != "F32":
                setattr(parent, name, BlockLinear.from_float(child, gtype, kernels))
            elif kernels is not None:
                setattr(parent, name, KernelLinear(child, kernels))
            else:
                continue
            mappings.release(child.weight)  # its values now live in the new layout: one copy in memory, not two
    return module
