"""Prefix cache: the keys and values of full token blocks, kept across requests and reused.

Requests that share a prefix (a system prompt, the earlier turns of a chat, few-shot examples)
need the same keys and values for it, since a causal model's K/V at position p depends only on
tokens 0..p. The cache keeps them per block of `BLOCK_SIZE` tokens, as vLLM does:

- A block's key is a hash chain: blake2b(parent block's key, the block's token ids), rooted at a
  hash of everything that makes K/V differ for the same tokens (the model file, dtype, format,
  each layer's attention spec). So a hit means the same tokens from position 0, on the same
  model with the same settings; a block is never reused at another position.
- A block holds K and V of every layer for its 16 positions, one (2, layers, kv heads, 16, head
  dim) tensor, in the KV cache's own dtype: a row filled from cached blocks holds the very bits a
  prefill would have written, and a sliding-window layer finds its keys where it expects them.
- `lookup` returns the longest cached chain of full blocks of a prompt, leaving at least one
  prompt token to compute (the next-token logits come from the last prompt position).
- Memory is bounded (`capacity_bytes`, `--prefix-cache-mb`); the least recently used block goes
  first. A chain is touched leaf first, so a parent is always more recent than its children and
  eviction takes chain ends before the blocks others hang on (vLLM's reverse-order free queue).

Only the engine thread touches a PrefixCache (the batcher calls it); the counters are plain
ints that /metrics reads.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

BLOCK_SIZE = 16  # tokens per block: vLLM's default; a 500-token system prompt is 31 full blocks
DEFAULT_PREFIX_CACHE_MB = 256  # SmolLM2-135M (46 KiB of K/V per token in float32): about 5,600 tokens


@dataclass
class PrefixCacheStats:
    """Counters since the cache was made (vLLM's prefix_cache_queries / _hits count tokens too)."""

    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens found in the cache
    evictions: int = 0  # blocks dropped to stay under the bound
    inserted: int = 0  # blocks stored

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass
class _Block:
    kv: torch.Tensor  # (2, layers, kv heads, BLOCK_SIZE, head dim): K then V

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def model_identity(loaded, specs=None) -> bytes:
    """What a block's keys and values depend on besides its tokens: the root of every hash chain."""
    path = loaded.path
    try:
        stat = path.stat()
        file_id = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError:
        file_id = (str(path), 0, 0)
    specs = specs if specs is not None else getattr(loaded.module, "specs", None)
    parts = (file_id, str(loaded.dtype), str(loaded.device), loaded.quantize, repr(specs), repr(loaded.config))
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


class PrefixCache:
    """Full blocks of K/V by hash chain, LRU under a byte bound. capacity_bytes 0 turns it off."""

    def __init__(self, identity: bytes, capacity_bytes: int, block_size: int = BLOCK_SIZE):
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.root = identity
        self.capacity_bytes = capacity_bytes
        self.block_size = block_size
        self.blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self.bytes_used = 0
        self.stats = PrefixCacheStats()

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def chain(self, ids: list[int], blocks: int) -> list[bytes]:
        """The keys of the first `blocks` full blocks of ids."""
        keys, parent, bs = [], self.root, self.block_size
        for b in range(blocks):
            parent = hashlib.blake2b(parent + array("q", ids[b * bs : (b + 1) * bs]).tobytes(), digest_size=16).digest()
            keys.append(parent)
        return keys

    def cached_tokens(self, ids: list[int]) -> int:
        """What `lookup` would find now, in tokens, without counting or touching anything (for planning)."""
        return len(self._cached_chain(ids)) * self.block_size if self.enabled else 0

    def lookup(self, ids: list[int]) -> tuple[list[bytes], torch.Tensor | None]:
        """The longest cached chain of full blocks of `ids` that leaves at least one token to compute.

        Returns (their keys, their K/V joined: (2, layers, kv heads, n, head dim)), or ([], None).
        """
        if not self.enabled:
            return [], None
        self.stats.queries += len(ids)
        found = self._cached_chain(ids)
        if not found:
            return [], None
        import torch  # here, not at the top: the CLI reads DEFAULT_PREFIX_CACHE_MB without torch

        self._touch(found)
        self.stats.hits += len(found) * self.block_size
        return found, torch.cat([self.blocks[k].kv for k in found], dim=3)

    def insert(self, ids: list[int], kv_of: Callable[[int, int], torch.Tensor]) -> int:
        """Store the full blocks of ids (a sequence whose K/V exist for every position of ids).

        kv_of(start, end) gives the (2, layers, kv heads, end - start, head dim) K/V of positions
        start..end-1; it is called once, for the blocks from the first one not cached on. A chain
        longer than the whole bound keeps its first blocks (a later one is useless without them).
        Returns the number of leading full blocks of ids now cached.
        """
        if not self.enabled:
            return 0
        bs = self.block_size
        keys = self.chain(ids, len(ids) // bs)
        missing = [b for b in range(len(keys)) if keys[b] not in self.blocks]
        if missing:
            first = missing[0]
            kv = kv_of(first * bs, len(keys) * bs)  # (2, L, H, n, D): one copy out of the row
            per_block = kv[:, :, :, :bs].numel() * kv.element_size()
            fit = min(len(keys), self.capacity_bytes // per_block)
            self._touch(keys)  # the chain's cached blocks are not the ones to evict for its new ones
            for b in missing:
                if b >= fit:
                    break
                self._make_room(per_block)
                self.blocks[keys[b]] = _Block(kv[:, :, :, (b - first) * bs : (b - first + 1) * bs].clone())
                self.bytes_used += per_block
                self.stats.inserted += 1
            keys = keys[:fit]
        self._touch(keys)
        return len(keys)

    def _cached_chain(self, ids: list[int]) -> list[bytes]:
        """Keys of the leading full blocks of ids that are cached, leaving at least one token of ids out."""
        found = []
        for key in self.chain(ids, (len(ids) - 1) // self.block_size):
            if key not in self.blocks:
                break
            found.append(key)
        return found

    def _touch(self, keys: list[bytes]) -> None:
        # leaf first, root last: the root ends most recent and is evicted after its children
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def _make_room(self, nbytes: int) -> None:
        while self.blocks and self.bytes_used + nbytes > self.capacity_bytes:
            _, old = self.blocks.popitem(last=False)
            self.bytes_used -= old.nbytes
            self.stats.evictions += 1

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes_used = 0
