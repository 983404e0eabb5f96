"""The scheduling policy of one engine step (vLLM v1's chunked prefill): which sequences run how
many tokens. The batcher (engine/batcher.py) executes the plan in one packed forward.

Each step has a token budget, `max_batched_tokens`:

1. every running sequence that is decoding gets its one token first, so running streams never
   stall behind prompts;
2. the rest of the budget goes to prompt tokens in FIFO order: first the sequences whose prompt
   is part-way through (admitted earlier), then waiting requests, each admitted into a free row
   (rows, the KV slots, are bounded by the batch size). A prompt longer than what is left is split
   across steps; many short prompts prefill together in one forward.

The policy is pure: it reads the sequences' progress and returns a plan, so it is tested without
a model. Sequences need `decoding` (their prompt is all in the cache), `prompt_left` (prompt tokens
not computed yet) and `admitted` (admission order); waiting requests are given as their prompt
tokens left to compute, in arrival order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

# The default token budget of a step on a CPU. The linear layers read their weights once per step,
# so a bigger step costs less per token, but every running stream waits for the whole step before
# its next token. Measured on SmolLM2 Q4_1 with 2 threads (benchmarks/README.md, "prefill rate by
# chunk size"; a loaded machine, so ratios only): one forward of 8, 32, 128, 256 and 512 tokens
# ran at 19%, 38%, 69%, 88% and 100% of the 512-token rate. 256 keeps ~90% of the prompt rate at
# half the step time of 512 (the inter-token latency of the streams decoding beside a prompt).
DEFAULT_MAX_BATCHED_TOKENS = 256


@dataclass
class Plan:
    """What one step runs: one token for each of `decode`, a prompt chunk for each of `prefill`
    (sequence, tokens), and the first `len(admit)` waiting requests admitted with chunks `admit`."""

    decode: list[Any] = field(default_factory=list)
    prefill: list[tuple[Any, int]] = field(default_factory=list)
    admit: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill) + sum(self.admit)


class Scheduler:
    def __init__(self, max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS):
        if max_batched_tokens < 1:
            raise ValueError("max_batched_tokens must be at least 1")
        self.max_batched_tokens = max_batched_tokens

    def plan(self, running: Iterable[Any], waiting: Iterable[int], free_rows: int) -> Plan:
        """The next step: decode tokens first, then prompt chunks FIFO within the budget.

        Decode tokens are never held back, even past the budget (a batch larger than the budget
        still decodes every row each step; prompts then wait for a row to finish).
        """
        plan = Plan()
        prefilling = []
        for seq in running:
            (plan.decode if seq.decoding else prefilling).append(seq)
        budget = self.max_batched_tokens - len(plan.decode)
        for seq in sorted(prefilling, key=lambda s: s.admitted):
            if budget <= 0:
                return plan
            n = min(seq.prompt_left, budget)
            plan.prefill.append((seq, n))
            budget -= n
        for left in waiting:
            if budget <= 0 or len(plan.admit) >= free_rows:
                break
            n = min(left, budget)
            plan.admit.append(n)
            budget -= n
        return plan
