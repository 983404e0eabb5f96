"""Continuous batching over a slot KV cache, with chunked prefill (vLLM v1's scheduler).

Up to `batch_size` sequences hold a row of the KV cache. Each `step()` asks the scheduler
(engine/scheduler.py) for a plan under the token budget `max_batched_tokens`: one token for every
decoding sequence first, then prompt chunks in FIFO order (waiting requests are admitted into free
rows as the budget reaches them; a long prompt takes several steps). The whole plan runs as one
packed forward (`Decoder.forward_packed`): the linear layers read their weights once for every
token of the step, and attention runs per token over its own row. Every kernel there computes a
token's numbers from that token alone, so a request's tokens and logprobs are the same bits
whatever else is in the step and however its prompt was chunked; a pure decode step runs on the
native block step where the family has one, with the same bits.

A finished sequence frees its row at once, so the next request starts on the next step. Running
sequences are kept in rows 0..n-1 (a finished one's row takes the last running sequence), so a
step computes only the rows in use, and the KV cache holds memory only for those rows and their
lengths: it grows as sequences need it and shrinks when they finish, so one long prompt neither
takes memory for every row nor keeps it. Every sequence samples from its own generator (derived
from the run's seed and the record's id), so results do not depend on the batch.

With a prefix cache (engine/prefix_cache.py), a request is admitted with the cached full blocks
of its prompt loaded into its row, and the scheduler plans only the rest; each prompt chunk
stores the blocks it completed, and a finished sequence the blocks of its reply. A cached block
holds the bits the packed forward wrote, which are those it would write again, so a request's
tokens are the same with or without the cache.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcli.core import sampling
from llmcli.core.constrained import Constraint, mask_logits
from llmcli.core.generate import Request, TextStream
from llmcli.core.models.base import KVCache
from llmcli.core.threads import serial_torch_ops
from llmcli.engine.prefix_cache import PrefixCache
from llmcli.engine.scheduler import DEFAULT_MAX_BATCHED_TOKENS, Scheduler
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
    cached_tokens: int | None = None  # set on the first event: prompt tokens whose K/V came from the prefix cache


@dataclass
class _Sequence:
    request: Request
    row: int
    generator: torch.Generator | None
    text: TextStream
    admitted: int  # admission order: prompt chunks are scheduled first come, first served
    prefilled: int  # prompt tokens in the cache
    cached: int = 0  # prompt tokens that came from the prefix cache (or a saved attend cache), not computed
    reported: bool = False  # whether an event has carried `cached` yet
    generated: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    prompt_logits: list[torch.Tensor] | None = field(default_factory=list)  # echo: the chunks' logits until the prompt is in
    plain_greedy: bool = False  # the request's params at admission: the token is the raw argmax (asked once, not per step)

    @property
    def prompt_left(self) -> int:
        return len(self.request.prompt_ids) - self.prefilled

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt_ids)
    constraint: Constraint | None = None  # the response format's matcher; its next mask is computed ahead


class ContinuousBatcher:
    def __init__(self, loaded, batch_size: int = 8, max_len: int | None = None, max_batched_tokens: int | None = None, prefix_cache: PrefixCache | None = None):
        self.loaded = loaded
        self.scheduler = Scheduler(max_batched_tokens or DEFAULT_MAX_BATCHED_TOKENS)
        self.admissions = 0
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
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.enabled else None

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
        """One scheduled step: decode tokens, prompt chunks and admissions in one forward.

        The bookkeeping around the forward (admissions, sampling over (B, V) logits, moving rows)
        runs torch's ops on this thread alone: a parallel torch op leaves torch's OpenMP threads
        spinning for milliseconds (libgomp's default wait) on the cores that the native kernels'
        task pool needs next, which cost SmolLM2 Q4_1 a third of its decode speed."""
        with serial_torch_ops():
            planned = self._plan_step()
        if planned is None:
            return []
        ids, rows, logits_at, wanted, chunked = planned
        device = self.last_token.device
        logits = self.model.forward_packed(
            torch.tensor(ids, device=device), torch.tensor(rows, device=device), self.cache, torch.tensor(logits_at, dtype=torch.long, device=device)
        )  # (len(logits_at), V)
        with serial_torch_ops():
            return self._after_forward(logits, wanted, chunked)

    def _plan_step(self) -> tuple[list[int], list[int], list[int], list[tuple[_Sequence, int, int]], list[_Sequence]] | None:
        """Admit what the scheduler plans and lay out the step's tokens: (ids, rows, logits_at, wanted,
        chunked), or None when there is nothing to run."""
        running = [seq for seq in self.rows if seq is not None]
        free = self.batch_size - len(running)
        plan = self.scheduler.plan(running, self._waiting_prompts(free), free)
        work = {seq.row: (seq, 1) for seq in plan.decode}
        work.update((seq.row, (seq, n)) for seq, n in plan.prefill)
        if plan.admit and self.prefix_cache is not None:
            # admissions with cached blocks fill their rows before the forward: grow the cache once for
            # all of them, not by a doubling (a copy of every row) per admission
            need = max(self._cached_prefix(r) + n for r, n in zip(self.waiting, plan.admit))
            self.cache.reserve(need + 1, len(running) + len(plan.admit))
        for n in plan.admit:
            seq = self._admit(self.waiting.popleft(), self.rows.index(None))
            work[seq.row] = (seq, n)
        if not work:
            return None
        ids: list[int] = []
        rows: list[int] = []
        logits_at: list[int] = []  # indices into ids whose logits this step needs
        wanted: list[tuple[_Sequence, int, int]] = []  # (sequence, first logits row, rows) in logits_at
        chunked: list[_Sequence] = []  # sequences with a prompt chunk in this step
        for row in sorted(work):  # forward_packed takes rows ascending, each row's tokens together
            seq, n = work[row]
            first = len(ids)
            if seq.decoding:
                ids.append(int(self.last_token[row]))
            else:
                ids.extend(seq.request.prompt_ids[seq.prefilled : seq.prefilled + n])
                seq.prefilled += n
                chunked.append(seq)
            rows.extend([row] * n)
            # echo needs every prompt position's logits; otherwise only the last token's, once the prompt is in
            take = n if seq.request.echo and seq.prompt_logits is not None else (1 if seq.decoding else 0)
            if take:
                wanted.append((seq, len(logits_at), take))
                logits_at.extend(range(first + n - take, first + n))
        return ids, rows, logits_at, wanted, chunked

    def _after_forward(self, logits: torch.Tensor, wanted: list[tuple[_Sequence, int, int]], chunked: list[_Sequence]) -> list[Event]:
        """Store completed prompt blocks, sample each wanting sequence's next token, retire the finished."""
        for seq in chunked:  # the prompt's blocks completed by this chunk, for the requests after it
            self._store_prefix(seq, seq.request.prompt_ids)
        sampled: list[_Sequence] = []
        last_rows: list[int] = []
        echo_events: dict[int, list] = {}
        for seq, start, take in wanted:
            if seq.request.echo and seq.prompt_logits is not None:
                seq.prompt_logits.append(logits[start : start + take])
                if not seq.decoding:
                    continue
                prompt = torch.cat(seq.prompt_logits)
                echo_events[id(seq)] = sampling.prompt_logprobs(prompt, seq.request.prompt_ids, seq.request.params.logprobs or 0)
                seq.prompt_logits = None  # done: the next logits are a decode token's
            sampled.append(seq)
            last_rows.append(start + take - 1)
        events: list[Event] = []
        if sampled:
            tokens, entries = self._choose(sampled, logits if last_rows == list(range(logits.shape[0])) else logits[last_rows])
            for seq, token, entry in zip(sampled, tokens, entries):
                event = self._accept(seq, token, entry)
                event.prompt_logprobs = echo_events.get(id(seq))
                if not seq.reported:
                    event.cached_tokens, seq.reported = seq.cached, True
                events.append(event)
        self._compact()
        if any(event.finish_reason is not None for event in events):
            self._trim()
        return events

    def _waiting_prompts(self, free: int):
        """Prompt tokens left to compute of the first `free` waiting requests (the only ones a step can admit)."""
        for request, _ in zip(self.waiting, range(free)):
            yield len(request.prompt_ids) - self._cached_prefix(request)

    def _cached_prefix(self, request: Request) -> int:
        """Prompt tokens whose K/V need no computing: those a saved attend cache covers (all but the
        last: its logits are recomputed), or the prefix cache's full blocks of the prompt."""
        if request.prompt_cache is not None:
            return min(request.prompt_cache[0].shape[2], len(request.prompt_ids) - 1)
        if self.prefix_cache is None or request.echo:  # echo needs every prompt position's logits
            return 0
        return self.prefix_cache.cached_tokens(request.prompt_ids)

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

    def _admit(self, request: Request, row: int) -> _Sequence:
        """Put a request into a free row (its saved cache loaded, if any); its prompt runs in the next chunks."""
        self.cache.reset_row(row)
        ids = request.prompt_ids
        start = self._cached_prefix(request)
        if start and request.echo:
            raise ContextLengthError("prompt logprobs need the whole prompt recomputed", "drop --cache when using --echo")
        if request.prompt_cache is not None:
            k, v = request.prompt_cache
            self.cache.load_row(row, k[:, :, :start], v[:, :, :start])
        elif start:  # the prefix cache holds the prompt's first blocks: into the row, counted as a hit
            start = self._reuse_prefix(row, ids)
        elif self.prefix_cache is not None and not request.echo:
            self.prefix_cache.lookup(ids)  # a miss, counted as a query
        seq = _Sequence(
            request, row, sampling.make_generator(request.params.seed, request.id, request.sample_index), TextStream(self.tokenizer, request.stop),
            admitted=self.admissions, prefilled=start, cached=start, plain_greedy=request.params.plain_greedy,
        )  # fmt: skip
        self.admissions += 1
        if request.grammar is not None:  # its first mask is computed while the prompt runs
            seq.constraint = Constraint(request.grammar, self.tokenizer, self.vocab)
        self.rows[row] = seq
        self.generated_counts[row].zero_()
        self.prompt_seen[row].zero_()
        self.prompt_seen[row, torch.tensor(ids, device=self.prompt_seen.device)] = True
        return seq

    # ------------------------------------------------------------ prefix cache hooks

    def _reuse_prefix(self, row: int, ids: list[int]) -> int:
        """Fill the row with the prompt's longest cached chain of full blocks; how many tokens it covers."""
        if self.prefix_cache is None:
            return 0
        _keys, kv = self.prefix_cache.lookup(ids)  # (2, L, Hkv, n, D)
        if kv is None:
            return 0
        self.cache.load_row(row, kv[0], kv[1])
        return kv.shape[3]

    def _store_prefix(self, seq: _Sequence, ids: list[int]) -> int:
        """Keep the full blocks of ids, whose K/V the sequence's row holds from position 0 (prompt, or
        prompt and reply); returns how many leading blocks of ids the prefix cache now holds.

        Not for a row that began from a saved attend cache: another forward computed those K/V.
        """
        if self.prefix_cache is None or seq.request.prompt_cache is not None:
            return 0
        cache, row = self.cache, seq.row

        def kv_of(start: int, end: int) -> torch.Tensor:  # (2, L, Hkv, end - start, D)
            return torch.stack([torch.stack([k[row, :, start:end] for k in cache.k]), torch.stack([v[row, :, start:end] for v in cache.v])])

        return self.prefix_cache.insert(ids[: int(cache.lengths[row])], kv_of)

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
        if all(s.plain_greedy for s in seqs):
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
        # the reply's blocks too: the next turn of a chat starts with this prompt and reply
        if self._store_prefix(seq, request_ids(seq)):
            # the prefix cache holds its own copy: the row's pages would count the K/V twice (a
            # batch finishing together held twice its cache at its end: 116 MiB of the 1B's peak)
            self.cache.release_row(seq.row)
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
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def bound_allocator_growth() -> bool:
    """For a long-running process (serve): keep glibc's heaps from growing with the traffic.

    By default glibc raises its mmap threshold each time a large block is freed (up to 32 MiB) and
    its trim threshold with it, one heap per thread that allocates (uvicorn's, the engine's,
    OpenMP's: up to 8 per core), where freed space fragments and RSS creeps up. Here the mmap
    threshold is fixed at glibc's own maximum, 32 MiB (a step's activations and a prompt's prefix
    cache blocks are reused from the heaps, not mapped and faulted in anew each time), trimming
    above 64 MiB, 2 heaps; the KV cache does not come from malloc at all (cache_zeros maps it).
    Measured with benchmarks/soak.py (10 minutes, 12 clients, quiet machine): glibc's defaults
    +5.5% RSS after warm-up; these settings 3339 requests, 0 5xx, 925 -> 953 MiB (+3.0%). A 256
    KiB threshold held RSS flatter (+1.0%) but every activation was a fresh mapping: page faults
    cost 45% of the prompt rate (2174 requests in the same soak, TTFT p99 11.1 s against 7.1 s for
    32 simultaneous prompts in benchmarks/serve_ttft.py). Returns False where the C library is not
    glibc (nothing changed).
    """
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    done = [mallopt(M_MMAP_THRESHOLD, 32 * 2**20), mallopt(M_TRIM_THRESHOLD, 64 * 2**20), mallopt(M_ARENA_MAX, 2)]
    return all(done)


@functools.cache
def _glibc_function(name: str):
    """The C library's function `name` (malloc_trim, mallopt), or None where it has none (not glibc)."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError, TypeError):
        return None


def request_ids(seq: _Sequence) -> list[int]:
    """The prompt and every token accepted so far: the row's K/V covers the first lengths[row] of them."""
    return list(seq.request.prompt_ids) + seq.generated
