"""Generation in layers (mlx-lm, gpt-fast): step functions -> text streams -> whole results.

- `prefill` / `decode_step`: one forward each, on rows of a slot KV cache.
- `TextStream`: turns one sequence's tokens into text pieces, holding text back while it could
  still be the start of a stop string, so the stop text is never emitted.
- The continuous batcher in llmcli.engine drives these for many sequences at once; a single
  sequence is the batch of one, so every command shares one code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from llmcli.core.constrained import Grammar
from llmcli.core.models.base import KVCache, row_view
from llmcli.core.sampling import SamplingParams
from llmcli.core.tokenizer import StreamingDetokenizer, Tokenizer


@dataclass
class Request:
    """One sequence to generate: the prompt and every per-request setting."""

    id: Any
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 128
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    echo: bool = False  # also report the prompt's logprobs
    sample_index: int = 0  # which of n samples of the same record
    prompt_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # saved (k, v) covering a prefix of prompt_ids
    grammar: Grammar | None = None  # the response format the output must follow (core/constrained.py)


@torch.inference_mode()
def prefill(model: torch.nn.Module, cache: KVCache, row: int, ids: list[int], all_logits: bool = False) -> torch.Tensor:
    """Run the prompt (or the part not already cached) into one cache row.

    Returns the next-token logits (V,), or (T, V) for every prompt position when all_logits.
    """
    view = row_view(cache, row)
    device = cache.lengths.device
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    if all_logits:
        return model(x, cache=view).logits[0]  # (T, V)
    out = model(x, cache=view, logits_index=torch.tensor([len(ids) - 1], device=device))
    return out.logits[0]  # (V,)


@torch.inference_mode()
def decode_step(model: torch.nn.Module, cache: KVCache, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
    """One token for every row: tokens (B,). With active (B,) bool, inactive rows neither read nor advance."""
    mask = None if active is None else active[:, None].long()
    out = model(tokens[:, None], cache=cache, attention_mask=mask, logits_index=torch.zeros_like(tokens))
    return out.logits  # (B, V)


class TextStream:
    """Text for one sequence, piece by piece, with stop strings matched across token boundaries."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.detok = StreamingDetokenizer(tokenizer)
        self.stop = [s for s in (stop or []) if s]
        self.pending = ""  # decoded text not yet emitted: it may be the start of a stop string
        self.emitted = 0  # characters emitted so far
        self.token_ends: list[int] = []  # characters decoded after each token (for trimming at a stop)
        self.decoded = 0
        self.stopped_at: int | None = None  # character index where a stop string began

    def add(self, token: int) -> tuple[str, bool]:
        """Feed one token; return (text safe to emit now, whether a stop string was hit)."""
        new = self.detok.add(token)
        self.decoded += len(new)
        self.token_ends.append(self.decoded)
        self.pending += new
        if not self.stop:
            piece, self.pending = self.pending, ""
            self.emitted += len(piece)
            return piece, False
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            piece = self.pending[:cut]
            self.stopped_at = self.emitted + cut
            self.emitted += len(piece)
            self.pending = ""
            return piece, True
        hold = self._held_suffix()
        piece = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        self.emitted += len(piece)
        return piece, False

    def _held_suffix(self) -> int:
        """Length of the longest end of `pending` that is the start of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best

    def finish(self) -> str:
        """The rest of the text once the sequence ends without a stop string."""
        rest = self.detok.finalize()
        piece = self.pending + rest
        self.pending = ""
        if self.stop:
            hits = [i for i in (piece.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.stopped_at = self.emitted + min(hits)
                piece = piece[: min(hits)]
        self.emitted += len(piece)
        return piece

    def tokens_before_stop(self) -> int:
        """How many tokens lie wholly before the stop string (all of them when none was hit)."""
        if self.stopped_at is None:
            return len(self.token_ends)
        n = 0
        for end in self.token_ends:
            if end > self.stopped_at:
                break
            n += 1
        return n
