"""Continuous batching over a slot KV cache.

Up to `batch_size` sequences are in flight; each `step()` first admits waiting requests into
free rows (one prefill each), then decodes one token for every active row in a single forward.
A finished sequence frees its row at once, so the next request starts on the next step and
prompts of different lengths share a batch. Running sequences are kept in rows 0..n-1 (a
finished one's row takes the last running sequence), so a step computes only the rows in use,
and the KV cache holds memory only for those rows and their lengths: it grows as sequences need it
and shrinks when they finish, so one long prompt neither takes memory for every row nor keeps it.
Every sequence samples from its own generator (derived from the run's seed and the record's id),
so results do not depend on the batch.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcli.core import sampling
from llmcli.core.constrained import Constraint, mask_logits
from llmcli.core.generate import Request, TextStream, decode_step, prefill
from llmcli.core.models.base import KVCache, rows_view
from llmcli.errors import ContextLengthError


@dataclass
class Event:
    """What one step did for one request: a new token and its text, and whether it finished."""

    request: Request
    token: int | None
    text: str
    logprob: dict | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | None while running
    generated_ids: list[int] = field(default_factory=list)  # set when finished: the final ids
    prompt_logprobs: list | None = None  # set on the first event of an echo request
    logprobs: list[dict] | None = None  # set when finished, if asked for: one entry per generated id


@dataclass
class _Sequence:
    request: Request
    row: int
    generator: torch.Generator | None
    text: TextStream
    generated: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    constraint: Constraint | None = None  # the response format's matcher; its next mask is computed ahead


class ContinuousBatcher:
    def __init__(self, loaded, batch_size: int = 8, max_len: int | None = None):
        self.loaded = loaded
        self.model = loaded.module
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.batch_size = batch_size
        self.max_len = min(max_len or self.config.max_position_embeddings, self.config.max_position_embeddings)
        self.cache = KVCache.for_model(self.config, batch_size, self.max_len, dtype=loaded.dtype, device=loaded.device, initial_len=256, initial_rows=1)
        self.vocab = self.config.vocab_size
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[_Sequence | None] = [None] * batch_size
        self.last_token = torch.zeros(batch_size, dtype=torch.long, device=loaded.device)
        # token counts per row for repetition / presence / frequency penalties
        self.generated_counts = torch.zeros(batch_size, self.vocab, dtype=torch.int32, device=loaded.device)
        self.prompt_seen = torch.zeros(batch_size, self.vocab, dtype=torch.bool, device=loaded.device)
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(self.config.eos_token_id)
        # checkpoints often pad the embedding matrix past the tokenizer's vocabulary: those rows are no tokens
        self.real_vocab = min(self.vocab, self.tokenizer.vocab_size)

    # ------------------------------------------------------------ queue

    def add(self, request: Request) -> None:
        if len(request.prompt_ids) == 0:
            raise ContextLengthError("the prompt is empty", "give at least one token (tokenize some text)")
        if len(request.prompt_ids) >= self.max_len:
            raise ContextLengthError(
                f"the prompt has {len(request.prompt_ids)} tokens but the context holds {self.max_len}",
                "shorten the prompt or use --truncate",
            )
        self.waiting.append(request)

    @torch.inference_mode()
    def cancel(self, request_id: Any) -> list[Event]:
        """Drop a request wherever it is; its row is free for the next step."""
        self.waiting = collections.deque(r for r in self.waiting if r.id != request_id)
        events = []
        for seq in self.rows:
            if seq is not None and seq.request.id == request_id:
                events.append(self._finish(seq, "cancelled"))
        self._compact()
        self._trim()
        return events

    @property
    def active(self) -> int:
        return sum(seq is not None for seq in self.rows)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.active > 0

    # ------------------------------------------------------------ stepping

    @torch.inference_mode()
    def step(self) -> list[Event]:
        events: list[Event] = []
        for row in range(self.batch_size):
            if self.rows[row] is None and self.waiting:
                events.extend(self._admit(self.waiting.popleft(), row))
        self._compact()  # admissions that finished at once leave holes
        running = [seq for seq in self.rows if seq is not None]
        if not running:
            return events
        n = len(running)  # rows 0..n-1, in row order
        self.cache.reserve(int(self.cache.lengths[:n].max()) + 1)
        logits = decode_step(self.model, rows_view(self.cache, 0, n), self.last_token[:n])  # (n, V)
        tokens, entries = self._choose(running, logits)
        for seq, token, entry in zip(running, tokens, entries):
            events.append(self._accept(seq, token, entry))
        self._compact()
        if any(event.finish_reason is not None for event in events):
            self._trim()
        return events

    def _compact(self) -> None:
        """Move the last running sequences into free rows below them, so rows 0..n-1 are the running ones."""
        low, high = 0, self.batch_size - 1
        while True:
            while low < self.batch_size and self.rows[low] is not None:
                low += 1
            while high >= 0 and self.rows[high] is None:
                high -= 1
            if low >= high:
                return
            seq = self.rows[high]
            self.cache.copy_row(self.cache, high, low)
            self.last_token[low] = self.last_token[high]
            self.generated_counts[low] = self.generated_counts[high]
            self.prompt_seen[low] = self.prompt_seen[high]
            seq.row = low
            self.rows[low], self.rows[high] = seq, None

    def _trim(self) -> None:
        """Give back the cache memory that finished sequences needed and the running ones do not."""
        n = self.active
        if self.cache.trim(int(self.cache.lengths[:n].max()) + 1 if n else 0, n):
            release_free_memory()

    def _admit(self, request: Request, row: int) -> list[Event]:
        self.cache.reset_row(row)
        ids = request.prompt_ids
        self.cache.reserve(len(ids) + 1, row + 1)  # on the root cache: the row view below cannot grow
        start = 0
        if request.prompt_cache is not None:
            k, v = request.prompt_cache
            self.cache.load_row(row, k, v)
            start = k.shape[2]
        if start >= len(ids):
            # the saved cache covers the whole prompt: recompute only the last position's logits
            self.cache.lengths[row] = len(ids) - 1
            start = len(ids) - 1
        seq = _Sequence(request, row, sampling.make_generator(request.params.seed, request.id, request.sample_index), TextStream(self.tokenizer, request.stop))
        if request.grammar is not None:  # its first mask is computed while the prompt runs
            seq.constraint = Constraint(request.grammar, self.tokenizer, self.vocab)
        self.rows[row] = seq
        self.generated_counts[row].zero_()
        self.prompt_seen[row].zero_()
        self.prompt_seen[row, torch.tensor(ids, device=self.prompt_seen.device)] = True
        prompt_logprobs = None
        if request.echo:
            if start > 0:
                raise ContextLengthError("prompt logprobs need the whole prompt recomputed", "drop --cache when using --echo")
            all_logits = prefill(self.model, self.cache, row, ids[start:], all_logits=True)  # (T, V)
            prompt_logprobs = sampling.prompt_logprobs(all_logits, ids, request.params.logprobs or 0)
            last = all_logits[-1:]
        else:
            last = prefill(self.model, self.cache, row, ids[start:])[None]  # (1, V)
        tokens, entries = self._choose([seq], last)
        event = self._accept(seq, tokens[0], entries[0])
        event.prompt_logprobs = prompt_logprobs
        return [event]

    def _choose(self, seqs: list[_Sequence], logits: torch.Tensor) -> tuple[list[int], list[dict | None]]:
        """Sample one token per sequence from its (n, V) logits with each request's own settings."""
        rows = [s.row for s in seqs]
        params = [s.request.params for s in seqs]
        logits = logits.float()
        if self.real_vocab < self.vocab:
            logits[:, self.real_vocab :] = float("-inf")
        allowed = logits
        for i, seq in enumerate(seqs):
            # min_tokens: the end is not allowed yet (vLLM's MinTokensLogitsProcessor)
            if len(seq.generated) < seq.request.min_tokens:
                blocked = list(self._stop_ids(seq.request))
                if blocked:
                    allowed = allowed.clone() if allowed is logits else allowed
                    allowed[i, blocked] = float("-inf")
        allowed = mask_logits([s.constraint for s in seqs], allowed)  # a response format's grammar
        if all(_plain_greedy(p) for p in params):
            # nothing reshapes the distribution: the argmax (lowest id on ties, as sample() does) is the answer
            chosen = allowed.argmax(-1)
        else:
            probs = sampling.process_logits(allowed, params, self.generated_counts[rows], self.prompt_seen[rows])
            chosen = sampling.sample(probs, [s.generator for s in seqs], params)
        want = [p.logprobs for p in params]
        entries: list[dict | None] = [None] * len(seqs)
        if any(w is not None for w in want):
            k = max(w or 0 for w in want)
            all_entries = sampling.token_logprobs(logits, chosen, k)
            entries = [e if w is not None else None for e, w in zip(all_entries, want)]
            for e, w in zip(entries, want):
                if e is not None:
                    e["top_logprobs"] = e["top_logprobs"][: w or 0]
        return chosen.tolist(), entries

    def _stop_ids(self, request: Request) -> set[int]:
        ids = set(request.stop_token_ids)
        if not request.ignore_eos:
            ids |= self.eos_ids
        return ids

    def _accept(self, seq: _Sequence, token: int, entry: dict | None) -> Event:
        request = seq.request
        if token in self._stop_ids(request):
            return self._finish(seq, "stop")
        seq.generated.append(token)
        if entry is not None:
            seq.logprobs.append(entry)
        self.generated_counts[seq.row, token] += 1
        self.last_token[seq.row] = token
        piece, stopped = seq.text.add(token)
        if stopped or (seq.constraint is not None and seq.constraint.advance(token)):  # a stop string, or the grammar is complete
            return self._finish(seq, "stop", piece)
        full = int(self.cache.lengths[seq.row]) + 1 >= self.max_len
        if len(seq.generated) >= request.max_tokens or full:
            return self._finish(seq, "length", piece)
        return Event(request, token, piece, entry)

    def _finish(self, seq: _Sequence, reason: str, piece: str = "") -> Event:
        if reason != "stop" or seq.text.stopped_at is None:
            piece += seq.text.finish()
        keep = seq.text.tokens_before_stop()
        self.rows[seq.row] = None
        if seq.constraint is not None:
            seq.constraint.close()
        last = seq.generated[-1] if seq.generated else None
        return Event(
            seq.request,
            last,
            piece,
            seq.logprobs[-1] if seq.logprobs else None,
            finish_reason=reason,
            generated_ids=seq.generated[:keep],
            logprobs=seq.logprobs[:keep] if seq.request.params.logprobs is not None else None,
        )


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    A long prompt's activations and cache are freed after it, but glibc keeps freed blocks of a
    few MB inside its heaps, where the process's RSS would carry them until it exits.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc
        return None


def _plain_greedy(params: sampling.SamplingParams) -> bool:
    """Greedy with no bias or penalty: the chosen token is the argmax of the raw logits."""
    return params.plain_greedy
