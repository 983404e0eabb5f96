"""What every architecture family shares: the forward contract, the KV cache, attention masks.

Contract for a family module (core/models/<family>.py):
  - `Model(config)`: an nn.Module whose parameter names equal the HF checkpoint's keys, so weight
    loading is a loop with a shape check (nanoGPT). `sanitize(tensors, config)` is the only place
    that renames or transposes checkpoint tensors into those names (mlx-lm).
  - `Model.forward(input_ids, ...) -> ForwardOutput`, keyword arguments as below.

Padding is on the right everywhere: a row's real tokens come first. For causal models that
makes the causal mask sufficient for the real positions (pads sit after every real query), and
the slot KV cache simply overwrites pad slots on the next step.

Layer numbering follows HF's `hidden_states` tuple: 0 = the embedding output, i = the output of
block i (1-based), and the last one (num_hidden_layers) is after the final norm for decoders.
Attention layers are 0-based block indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection

import torch

from llmcli.errors import ContextLengthError


@dataclass
class ForwardOutput:
    last_hidden: torch.Tensor  # (B, T, d): after the final norm (decoders) / last block (BERT)
    logits: torch.Tensor | None = None  # (B, T, V), or (B, V) when logits_index was given; None for encoders
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T, d)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> (B, H, T, S) probabilities


class KVCache:
    """A preallocated slot cache: row b holds `lengths[b]` tokens of one sequence.

    Rows are independent, so a continuous-batching engine can put a new sequence into a free row
    while the others keep decoding. Each forward writes its new keys/values at positions
    lengths[b] .. lengths[b]+T-1 and then advances lengths by the number of real tokens.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        initial_len: int | None = None,
    ):
        # max_len is the hard limit (the context); memory is allocated for initial_len positions
        # and grows by doubling, since a full 8k context for 16 rows of a 30-layer model is GBs.
        self.max_len = max_len
        alloc = min(max_len, initial_len or max_len)
        shape = (batch_size, num_kv_heads, alloc, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @classmethod
    def for_model(cls, config, batch_size: int, max_len: int | None = None, dtype=torch.float32, device="cpu", initial_len: int | None = None) -> "KVCache":
        max_len = max_len or config.max_position_embeddings
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, config.head_dim, max_len, dtype, device, initial_len)

    @property
    def capacity(self) -> int:
        """Positions allocated now (up to max_len)."""
        return self.k[0].shape[2]

    def reserve(self, n: int) -> None:
        """Make room for n positions per row (doubling), keeping what is stored. Not on views: reserve the root."""
        if n <= self.capacity:
            return
        if n > self.max_len:
            raise ContextLengthError(f"the sequence needs {n} positions but the cache holds {self.max_len}", "shorten the prompt or lower --max-tokens")
        new = min(self.max_len, max(n, 2 * self.capacity))
        old = self.capacity
        for cache in (self.k, self.v):
            for i, t in enumerate(cache):
                grown = torch.zeros((t.shape[0], t.shape[1], new, t.shape[3]), dtype=t.dtype, device=t.device)
                grown[:, :, :old] = t
                cache[i] = grown

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) absolute positions of the next T tokens of every row."""
        need = int(self.lengths.max()) + T
        if need > self.max_len:
            raise ContextLengthError(
                f"the sequence needs {need} positions but the cache holds {self.max_len}",
                "shorten the prompt or lower --max-tokens",
            )
        self.reserve(need)
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)[None, :]

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, Hkv, T, D) keys/values at `positions` (B, T); return the used part (B, Hkv, S, D)."""
        B, _, T, _ = k_new.shape
        S = int(positions.max()) + 1
        if T == 1:
            rows = torch.arange(B, device=k_new.device)
            pos = positions[:, 0]
            self.k[layer][rows, :, pos] = k_new[:, :, 0]
            self.v[layer][rows, :, pos] = v_new[:, :, 0]
        else:
            rows = torch.arange(B, device=k_new.device)[:, None].expand(B, T)
            self.k[layer].transpose(1, 2)[rows, positions] = k_new.transpose(1, 2)
            self.v[layer].transpose(1, 2)[rows, positions] = v_new.transpose(1, 2)
        return self.k[layer][:, :, :S], self.v[layer][:, :, :S]

    def advance(self, counts: torch.Tensor | int) -> None:
        self.lengths += counts

    # --- row management for continuous batching and saved prompt caches

    def reset_row(self, row: int) -> None:
        self.lengths[row] = 0

    def copy_row(self, src: "KVCache", src_row: int, dst_row: int) -> None:
        n = int(src.lengths[src_row])
        for layer in range(len(self.k)):
            self.k[layer][dst_row, :, :n] = src.k[layer][src_row, :, :n]
            self.v[layer][dst_row, :, :n] = src.v[layer][src_row, :, :n]
        self.lengths[dst_row] = n

    def row_state(self, row: int = 0) -> dict[str, torch.Tensor]:
        """The keys/values of one row as (layers, Hkv, n, D) tensors, for saving."""
        n = int(self.lengths[row])
        return {
            "k": torch.stack([k[row, :, :n] for k in self.k]).contiguous(),
            "v": torch.stack([v[row, :, :n] for v in self.v]).contiguous(),
        }

    def load_row(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        if n > self.max_len:
            raise ContextLengthError(f"the saved cache holds {n} positions, more than {self.max_len}", "use a longer context")
        self.reserve(n)
        for layer in range(len(self.k)):
            self.k[layer][row, :, :n] = k[layer].to(self.k[layer].dtype)
            self.v[layer][row, :, :n] = v[layer].to(self.v[layer].dtype)
        self.lengths[row] = n


def causal_mask(positions: torch.Tensor, S: int) -> torch.Tensor:
    """(B, 1, T, S) boolean: query at absolute position p sees keys 0..p."""
    keys = torch.arange(S, device=positions.device)
    return (keys[None, None, None, :] <= positions[:, None, :, None])


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, S) boolean from a (B, S) 1/0 mask: every query sees the real keys only."""
    return attention_mask.bool()[:, None, None, :]


def wanted(layers: Collection[int] | None, index: int) -> bool:
    return bool(layers) and index in layers


def rows_view(cache: KVCache, start: int, end: int) -> KVCache:
    """A KVCache of rows start..end-1 whose tensors are views into `cache`: writes land in place."""
    view = KVCache.__new__(KVCache)
    view.max_len = cache.max_len
    view.k = [k[start:end] for k in cache.k]
    view.v = [v[start:end] for v in cache.v]
    view.lengths = cache.lengths[start:end]
    return view


def row_view(cache: KVCache, row: int) -> KVCache:
    """One row of `cache` as a KVCache of its own: a prefill through it fills that row in place."""
    return rows_view(cache, row, row + 1)
