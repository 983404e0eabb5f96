"""What every architecture family shares: the forward contract, the KV cache, masked attention.

Attention never holds (T, T) scores or masks for a long prompt: a fresh causal prompt takes SDPA's
causal flag (tiled on the CPU), anything that needs a mask (a cached prefix, ragged rows, a
sliding window) goes through `masked_attention` one block of query rows at a time, and only
`reference_attention`, which returns the probabilities `attend --attention` asks for, builds them.

Contract for a family module (core/models/<family>.py):
  - `Model(config)`: an nn.Module whose parameter names equal the HF checkpoint's keys, so weight
    loading is a loop with a shape check (nanoGPT). `sanitize(tensors, config)` is the only place
    that renames or transposes checkpoint tensors into those names (mlx-lm).
  - `Model.forward(input_ids, ...) -> ForwardOutput`, keyword arguments as below.
  - the rest of the family protocol (`ARGS`, `CAUSAL`, `prepare_config`, `gguf_config`,
    `GGUF_NAMES`, `GGUF_PERMUTED_QK`, `build_buffers`): see docs/architectures.md. Causal families
    share one forward (models/decoder.py).

Padding is on the right everywhere: a row's real tokens come first. For causal models that
makes the causal mask sufficient for the real positions (pads sit after every real query), and
the slot KV cache simply overwrites pad slots on the next step.

Layer numbering follows HF's `hidden_states` tuple: 0 = the embedding output, i = the output of
block i (1-based), and the last one (num_hidden_layers) is after the final norm for decoders.
Attention layers are 0-based block indices.
"""

from __future__ import annotations

import math
import mmap
import sys
from dataclasses import dataclass, field
from typing import Callable, Collection

import torch
import torch.nn.functional as F

from llmcli.core import pages
from llmcli.errors import ContextLengthError, ModelError

# hidden_act names of gelu's tanh approximation: the ones the native tanh gelu kernels compute
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def runs_natively(kernels, *tensors: torch.Tensor) -> bool:
    """Whether the native kernels (when loaded) can take these tensors: float32 on the CPU."""
    return kernels is not None and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """HF `hidden_act` / `activation_function` name -> the function (every family's MLP)."""
    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "gelu": F.gelu,  # exact erf form
        **{name: lambda x: F.gelu(x, approximate="tanh") for name in TANH_GELU},  # GPT-2's gelu_new, Gemma's
        "relu": F.relu,
        "silu": F.silu,
        "swish": F.silu,
    }
    try:
        return table[name]
    except KeyError:
        raise ModelError(f"unsupported activation {name!r}", f"supported: {', '.join(sorted(table))}") from None


@dataclass
class ForwardOutput:
    last_hidden: torch.Tensor  # (B, T, d): after the final norm (decoders) / last block (BERT)
    logits: torch.Tensor | None = None  # (B, T, V), or (B, V) when logits_index was given; None for encoders
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T, d)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> (B, H, T, S) probabilities


# Linux's MAP_NORESERVE (Python's mmap module names it from 3.12 on): no swap is set aside for the
# mapping, so the kernel's overcommit heuristic does not refuse a cache whose rows are mostly unwritten
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


def cache_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zeroed cache tensor. On the CPU a private anonymous mapping: fresh zero pages, resident
    only once a position is written, and no thread writes zeros (torch.zeros fills in an OpenMP
    region, which waited ~100 ms per tensor on a loaded 2-core machine). Not calloc: once glibc
    has freed a mapped block its threshold for mapping rises past the cache's layer size, calloc
    then takes heap memory and writes its zeros, and a batch of 16 made all 256 positions of its
    rows resident at admission (184 MiB for SmolLM2, twice what 129 positions a row hold)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if maps_lazily(device) and nbytes > 0:
        flags = mmap.MAP_PRIVATE | MAP_NORESERVE  # address space only: a mapped cache has every row at its capacity
        return torch.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=dtype).view(shape)  # the tensor keeps the mapping
    return torch.zeros(shape, dtype=dtype, device=device)


def maps_lazily(device: torch.device | str) -> bool:
    """Whether cache_zeros maps its memory on this device (the CPU, not on Windows): pages are
    resident only once written, and pages.release can give them back."""
    return torch.device(device).type == "cpu" and hasattr(mmap, "MAP_PRIVATE") and pages.AVAILABLE


class KVCache:
    """A slot cache: row b holds `lengths[b]` tokens of one sequence.

    Rows are independent, so a continuous-batching engine can put a new sequence into a free row
    while the others keep decoding. Each forward writes its new keys/values at positions
    lengths[b] .. lengths[b]+T-1 and then advances lengths by the number of real tokens.

    Memory is held for `rows` x `capacity` positions and grows on demand (`reserve`); `trim`
    gives it back once the sequences that needed it are gone. Rows 0..rows-1 hold memory, so a
    user of fewer rows than batch_size keeps its sequences in the lowest rows.
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
        initial_rows: int | None = None,
    ):
        # max_len is the hard limit (the context); memory is allocated for initial_len positions
        # and grows by doubling, since a full 8k context for 16 rows of a 30-layer model is GBs:
        # a long prompt in one row must not make every row that long (initial_rows).
        self.max_len = max_len
        self.initial_len = min(max_len, initial_len or max_len)
        self.held_rows = min(batch_size, initial_rows or batch_size)
        # Mapped memory is resident only where written, so a mapped cache has every row from the
        # start: rows then come and go without a copy of the cache (growing 1, 2, 4 .. 32 rows and
        # shrinking as sequences finished cost SmolLM2 8% of a 32-request burst's time), and trim
        # gives a finished row's pages back (pages.release). Elsewhere rows are allocated as needed.
        self.lazy = maps_lazily(device)
        shape = (batch_size if self.lazy else self.held_rows, num_kv_heads, self.initial_len, head_dim)
        self.k = [cache_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.v = [cache_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @classmethod
    def for_model(
        cls, config, batch_size: int, max_len: int | None = None, dtype=torch.float32, device="cpu", initial_len: int | None = None, initial_rows: int | None = None
    ) -> "KVCache":
        max_len = max_len or config.max_position_embeddings
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, config.head_dim, max_len, dtype, device, initial_len, initial_rows)

    @property
    def capacity(self) -> int:
        """Positions allocated now (up to max_len)."""
        return self.k[0].shape[2]

    @property
    def rows(self) -> int:
        """Rows that may hold memory now (up to batch_size): reserve grows them, trim gives them back."""
        return self.held_rows

    def reserve(self, n: int, rows: int = 0) -> None:
        """Make room for n positions in rows 0..rows-1, keeping what is stored. Positions grow by
        doubling (a copy); rows of a mapped cache are there already, elsewhere they double too.
        Not on views: reserve the root."""
        if n <= self.capacity and rows <= self.rows:
            return
        if n > self.max_len:
            raise ContextLengthError(f"the sequence needs {n} positions but the cache holds {self.max_len}", "shorten the prompt or lower --max-tokens")
        length = self.capacity if n <= self.capacity else min(self.max_len, max(n, 2 * self.capacity))
        if rows > self.rows:
            rows = rows if self.lazy else min(self.batch_size, max(rows, 2 * self.rows))
        else:
            rows = self.rows
        if length != self.capacity or rows > self.k[0].shape[0]:
            self._resize(rows, length)
        self.held_rows = rows

    def trim(self, n: int, rows: int) -> bool:
        """Give memory back once only rows 0..rows-1 hold sequences, none needing more than n positions.

        Memory shrinks once it is over twice what the rows need with room to grow (2n positions),
        so a finished long prompt does not keep its memory, and the next steps do not regrow at
        once: a mapped cache releases the pages of the rows above (rows admitted later fault them
        in anew), and positions shrink by a copy. Returns whether it copied.
        """
        length = min(self.max_len, max(self.initial_len, 2 * n))
        rows = max(rows, 1)
        if self.lazy:
            if 2 * rows <= self.held_rows:
                self._release_rows(rows, self.held_rows)
                self.held_rows = rows
            if self.capacity <= 2 * length:
                return False
        elif self.rows * self.capacity <= 2 * rows * length:
            return False
        self._resize(rows, length)
        return True

    def release_row(self, row: int) -> None:
        """Hand back the pages of one row of a mapped cache (elsewhere nothing): for a finished
        sequence whose K/V another owner now holds (the prefix cache), so they are not held twice.
        The row reads as zeros again; a sequence admitted to it faults its pages in anew."""
        if self.lazy:
            self._release_rows(row, row + 1)

    def _release_rows(self, first: int, end: int) -> None:
        """The pages of rows first..end-1 of every layer back to the system (a mapped cache)."""
        for t in (*self.k, *self.v):
            row_bytes = t.stride(0) * t.element_size()
            pages.release(t.data_ptr() + first * row_bytes, t.data_ptr() + end * row_bytes)

    def _resize(self, rows: int, length: int) -> None:
        """Reallocate for `rows` rows (every row when mapped) of `length` positions, keeping what the held rows store."""
        keep_rows, keep = min(rows, self.held_rows), min(length, self.capacity)
        for cache in (self.k, self.v):
            for i, t in enumerate(cache):
                resized = cache_zeros((self.batch_size if self.lazy else rows, t.shape[1], length, t.shape[3]), t.dtype, t.device)
                resized[:keep_rows, :, :keep] = t[:keep_rows, :, :keep]
                cache[i] = resized
        self.held_rows = rows

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
        self.reserve(n, row + 1)
        for layer in range(len(self.k)):
            self.k[layer][row, :, :n] = k[layer].to(self.k[layer].dtype)
            self.v[layer][row, :, :n] = v[layer].to(self.v[layer].dtype)
        self.lengths[row] = n


# Query rows per block where attention needs an explicit mask: a (B, 1, 512, S) mask at a time
# instead of (B, 1, T, S), so a long prompt costs memory linear in its length. Read at call time.
ATTENTION_BLOCK = 512


def causal_mask(positions: torch.Tensor, S: int, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, S) boolean: query at absolute position p sees keys 0..p (p-window+1..p with a sliding window)."""
    keys = torch.arange(S, device=positions.device)[None, None, None, :]
    query = positions[:, None, :, None]
    mask = keys <= query
    if window:
        mask &= keys > query - window
    return mask


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, window: int | None = None, enable_gqa: bool = False, scale: float | None = None
) -> torch.Tensor:
    """Causal (and sliding-window) SDPA for queries at any absolute positions, e.g. after a cached prefix.

    q (B, H, T, hd) at `positions` (B, T); k, v (B, Hkv, S, hd) for positions 0..S-1. The mask is
    built per block of ATTENTION_BLOCK query rows, against the keys that block may see, so no
    (T, S) mask (nor the float copy SDPA makes of it) exists at once. Every query row is computed
    on its own, with keys from position 0, so a row's result does not depend on the blocking.
    scale: the query scale (SDPA's default 1/sqrt(hd) when None).
    """
    T = q.shape[2]
    block = ATTENTION_BLOCK
    if T <= block:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(positions, k.shape[2], window), enable_gqa=enable_gqa, scale=scale)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))  # (B, H, T, hd)
    for start in range(0, T, block):
        pos = positions[:, start : start + block]  # (B, t)
        S = min(int(pos.max()) + 1, k.shape[2])  # later keys are masked for every row of the block
        mask = causal_mask(pos, S, window)  # (B, 1, t, S)
        out[:, :, start : start + block] = F.scaled_dot_product_attention(q[:, :, start : start + block], k[:, :, :S], v[:, :, :S], attn_mask=mask, enable_gqa=enable_gqa, scale=scale)
    return out


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The slow path that also returns the probabilities (B, H, T, S), float32: explicit scores and softmax.

    It builds (B, H, T, S) scores, so only `attend --attention`, which asks for the maps, runs it.
    k, v may have fewer (GQA) heads than q; mask is boolean, broadcastable to (B, H, T, S);
    scale: the query scale (1/sqrt(hd) when None).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)  # (B, H, T, S)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return probs.to(v.dtype) @ v, probs


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, S) boolean from a (B, S) 1/0 mask: every query sees the real keys only."""
    return attention_mask.bool()[:, None, None, :]


def wanted(layers: Collection[int] | None, index: int) -> bool:
    return bool(layers) and index in layers


def rows_view(cache: KVCache, start: int, end: int) -> KVCache:
    """A KVCache of rows start..end-1 whose tensors are views into `cache`: writes land in place."""
    if end > cache.rows:
        raise RuntimeError(f"rows {start}..{end - 1} of a cache with {cache.rows} allocated: reserve them first")
    view = KVCache.__new__(KVCache)
    view.max_len = cache.max_len
    view.initial_len = cache.initial_len
    view.held_rows = end - start
    view.lazy = False  # a view's rows are the root's: only the root reserves and trims
    view.k = [k[start:end] for k in cache.k]
    view.v = [v[start:end] for v in cache.v]
    view.lengths = cache.lengths[start:end]
    return view


def row_view(cache: KVCache, row: int) -> KVCache:
    """One row of `cache` as a KVCache of its own: a prefill through it fills that row in place."""
    return rows_view(cache, row, row + 1)
