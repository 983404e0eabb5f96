"""Perplexity of a causal model over a long token sequence, by sliding windows.

The method is HF's "perplexity of fixed-length models"
(https://huggingface.co/docs/transformers/perplexity): windows of up to `ctx` tokens start every
`stride` tokens, and each window scores only the tokens the previous window did not score, so
every token (but the first, which nothing predicts) is scored exactly once, with at least
`ctx - stride` tokens of context once the first window is behind. stride == ctx gives disjoint
windows (fast, less context); a smaller stride gives more context per token at more cost.

One difference from the loop printed on that page: it weights each window's mean loss by
`scored - 1` tokens (it subtracts one per window for the label shift even when the shift costs
no token), while here every scored token counts once, so the result is the exact mean NLL.

Several windows go through one forward as a right-padded batch; the causal mask already keeps
every real position from seeing the pads after it (see models/base.py). Per-token losses are
computed in float32 and summed in float64, so thousands of windows do not lose precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from llmcli.errors import InputError, ModelError, UsageError


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go in; targets [score_from, end) are scored (absolute indices)."""

    begin: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def scored(self) -> int:
        return self.end - self.score_from


@dataclass
class PerplexityResult:
    ppl: float  # exp(nll_sum / tokens_scored)
    nll_sum: float  # natural-log negative log-likelihood summed over the scored tokens
    tokens_scored: int
    bits_per_byte: float | None  # nll_sum in bits / UTF-8 bytes of the text; None when the byte count is unknown
    windows: int
    tokens: int = 0  # length of the whole sequence
    ctx: int = 0
    stride: int = 0

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens_scored

    def as_dict(self) -> dict:
        return {
            "perplexity": self.ppl,
            "nll_sum": self.nll_sum,
            "mean_nll": self.mean_nll,
            "bits_per_byte": self.bits_per_byte,
            "tokens": self.tokens,
            "tokens_scored": self.tokens_scored,
            "windows": self.windows,
            "ctx": self.ctx,
            "stride": self.stride,
        }


def plan_windows(n_tokens: int, ctx: int, stride: int) -> list[Window]:
    """The windows of the HF loop: begin every `stride`, stop at the first window that reaches the end."""
    if ctx < 2:
        raise UsageError(f"--ctx {ctx} is too small", "use --ctx 2 or more (a window needs context and a target)")
    if not 1 <= stride <= ctx:
        # a stride past the window would skip tokens that no window scores
        raise UsageError(f"--stride {stride} must be between 1 and --ctx ({ctx})", "use a stride of at most the context, e.g. half of it")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        # target t is predicted from the logits at t-1, which must lie inside the window
        score_from = max(prev_end, begin + 1)
        if end > score_from:
            windows.append(Window(begin, end, score_from))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.inference_mode()
def perplexity(
    loaded,
    ids: Sequence[int],
    ctx: int = 512,
    stride: int = 256,
    batch_size: int = 4,
    on_progress: Callable[[int, int], None] | None = None,
    *,
    n_bytes: int | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of `ids` under `loaded` (a LoadedModel).

    on_progress(windows_done, windows_total) is called after each batch of windows.
    n_bytes: the UTF-8 byte count of the text the ids came from, for bits per byte.
    """
    config = loaded.config
    if not config.is_causal:
        raise ModelError(f"{loaded.name} is an encoder ({config.model_type}); perplexity needs a causal language model", "use a decoder model such as smollm2-135m-instruct")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1", "use --batch-size 1 or more")
    limit = config.max_position_embeddings
    if ctx > limit:
        raise UsageError(f"--ctx {ctx} is longer than the model's context ({limit})", f"use --ctx {limit} or less")
    ids = [int(i) for i in ids]
    if len(ids) < 2:
        raise InputError(f"the text has {len(ids)} token(s)", "perplexity needs at least 2 tokens: one for context, one to score")
    vocab = config.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise InputError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", "tokenize with the same --model")
    windows = plan_windows(len(ids), ctx, stride)
    device = loaded.device
    tokens = torch.tensor(ids, dtype=torch.long)
    nll_sum = 0.0  # a Python float: float64
    scored = 0
    done = 0
    for first in range(0, len(windows), batch_size):
        group = windows[first : first + batch_size]
        T = max(w.length for w in group)
        x = torch.zeros(len(group), T, dtype=torch.long)  # (B, T), right-padded with id 0
        mask = torch.zeros(len(group), T, dtype=torch.long)
        for row, w in enumerate(group):
            x[row, : w.length] = tokens[w.begin : w.end]
            mask[row, : w.length] = 1
        logits = loaded.module(x.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
        for row, w in enumerate(group):
            lo = w.score_from - w.begin  # first scored position inside the window
            hi = w.length
            pred = logits[row, lo - 1 : hi - 1].float()  # (n, V): the logits that predict positions lo..hi-1
            target = x[row, lo:hi].to(pred.device)
            nll = F.cross_entropy(pred, target, reduction="none")  # (n,)
            nll_sum += float(nll.double().sum())
            scored += hi - lo
        del logits
        done += len(group)
        if on_progress is not None:
            on_progress(done, len(windows))
    mean = nll_sum / scored
    bpb = nll_sum / math.log(2) / n_bytes if n_bytes else None
    return PerplexityResult(
        ppl=math.exp(mean),
        nll_sum=nll_sum,
        tokens_scored=scored,
        bits_per_byte=bpb,
        windows=len(windows),
        tokens=len(ids),
        ctx=ctx,
        stride=stride,
    )
