"""Pooling token states into one vector per sequence, and L2 normalization; pure torch.

The same math as sentence-transformers' Pooling and Normalize modules, so `mean` + `normalize`
over all-MiniLM-L6-v2's last hidden state gives its published sentence embeddings.
Padding is on the right (see models/base.py): row b's real tokens are 0 .. mask[b].sum()-1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcli.errors import UsageError

POOLS = ("mean", "cls", "last")


def pad_batch(batch: list[list[int]], pad: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Id lists -> (B, T) ids padded on the right to the longest with `pad`, and the (B, T) 1/0 mask."""
    width = max(len(ids) for ids in batch)
    x = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], dtype=torch.long, device=device)
    return x, mask


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, d) token states and a (B, T) 1/0 mask -> (B, d).

    mean: the average over the real tokens; cls: the first token; last: the last real token.
    A mask of None means every token is real.
    """
    B, T, _ = hidden.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=hidden.device)
    if how == "mean":
        weights = attention_mask.to(hidden.dtype)[:, :, None]  # (B, T, 1)
        total = (hidden * weights).sum(1)  # (B, d)
        # the clamp is sentence-transformers' own: an all-pad row gives zeros, not NaN
        return total / weights.sum(1).clamp(min=1e-9)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = (attention_mask.long().sum(1) - 1).clamp(min=0)  # (B,)
        return hidden[torch.arange(B, device=hidden.device), last]
    raise UsageError(f"unknown pooling {how!r}", f"use one of {', '.join(POOLS)}")


def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each vector (the last dimension) scaled to unit L2 norm; a zero vector stays zero."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)
