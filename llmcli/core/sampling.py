"""Sampling as pure functions: logits -> probabilities -> token (gpt-fast's `logits_to_probs` / `sample`).

Everything works on a batch of rows (B, V) with per-row settings, because the continuous batcher
puts requests with different settings into one forward. The order, for every row
(docs/sampling.md says why; it is HF's and vLLM's order):

    logit bias -> repetition, frequency, presence penalties -> temperature
    -> top-k -> top-p -> min-p -> renormalise -> draw (or argmax when temperature is 0)

Reported logprobs come from log_softmax of the raw logits, before any of the above.
Each row draws from its own torch.Generator, derived from the run's seed and the record's id,
so a seeded record samples the same tokens whatever else shares its batch.

torch only: no Typer, no Rich, no model code.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

import torch

# the parameters live in a torch-free module (the CLI builds its flags from them); re-exported here
from llmcli.core.sampling_params import (  # noqa: F401
    LOGIT_BIAS_LIMIT,
    MAX_LOGPROBS,
    MIN_LOGPROB,
    PENALTY_LIMIT,
    SamplingParams,
    knob,
)
from llmcli.errors import UsageError

PerRow = float | int | Sequence[float] | Sequence[int] | torch.Tensor
IdsOrCounts = torch.Tensor | Sequence[Sequence[int]]


# ---------------------------------------------------------------- helpers


def _as_float(logits: torch.Tensor) -> torch.Tensor:
    # half precision loses the small differences that top-p and penalties look at
    return logits if logits.dtype == torch.float64 else logits.float()


def _finite_scores(logits: torch.Tensor) -> torch.Tensor:
    """Logits softmax can take: NaN -> -inf (never chosen), +inf -> the largest finite value (inf - inf
    would be NaN), and a row with no finite value at all -> zeros (uniform) rather than NaN."""
    if bool(torch.isfinite(logits).all()):
        return logits
    out = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    dead = torch.isneginf(out).all(dim=-1)
    return torch.where(dead[:, None], torch.zeros_like(out), out) if bool(dead.any()) else out


def _scale(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits (B, V) / temperature (B,). A row whose every finite logit overflows to -inf (-3e38 / 0.5)
    is scaled after subtracting its max instead (softmax and the filters do not see a shift), so its
    banned (-inf) tokens stay banned rather than the row falling back to uniform."""
    scaled = logits / temperature[:, None]
    overflowed = torch.isneginf(scaled).all(dim=-1) & ~torch.isneginf(logits).all(dim=-1)
    if bool(overflowed.any()):
        rows = logits[overflowed]
        scaled[overflowed] = (rows - rows.max(dim=-1, keepdim=True).values) / temperature[overflowed, None]
    return _finite_scores(scaled)  # a small temperature can overflow to +inf too


def _per_row(value: PerRow, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scalar or one value per row as a (B,) tensor."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        return t.expand(rows)
    if t.shape != (rows,):
        raise ValueError(f"expected one value per row ({rows}), got shape {tuple(t.shape)}")
    return t


def count_tokens(ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-row occurrence counts (B, V) of the given ids, for the penalties."""
    counts = torch.zeros(len(ids), vocab_size, dtype=torch.int32, device=device)
    for row, row_ids in enumerate(ids):
        if len(row_ids):
            index = torch.as_tensor(list(row_ids), dtype=torch.long, device=device)
            counts[row].index_add_(0, index, torch.ones_like(index, dtype=torch.int32))
    return counts


def _as_counts(value: IdsOrCounts, shape: torch.Size, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.shape != shape:
            raise ValueError(f"token counts have shape {tuple(value.shape)}, logits {tuple(shape)}")
        return value.to(device)
    if len(value) != shape[0]:
        raise ValueError(f"{len(value)} id lists for {shape[0]} rows")
    return count_tokens(value, shape[1], device)


# ---------------------------------------------------------------- logit processors


def check_token_ids(ids: Sequence[int], vocab: int, what: str) -> None:
    """UsageError naming `what` (logit_bias, --stop-id) for the first id outside 0..vocab-1."""
    bad = [i for i in ids if not 0 <= int(i) < vocab]
    if bad:
        raise UsageError(f"{what} token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "use ids from this model's tokenizer (`llmcli tokenize`)")


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[Mapping[int, float]] | Mapping[int, float]) -> torch.Tensor:
    """logits (B, V) plus each row's {token id: bias} (one mapping for all rows, or one per row).

    A bias of -100 (the API's floor) bans the token outright (-inf): added to a logit of 2^31 a
    float32 -100 is below the spacing of representable values and would change nothing."""
    rows, vocab = logits.shape
    per_row = [biases] * rows if isinstance(biases, Mapping) else list(biases)
    if len(per_row) != rows:
        raise ValueError(f"{len(per_row)} logit_bias mappings for {rows} rows")
    if not any(per_row):
        return logits
    out = logits.clone()
    for row, bias in enumerate(per_row):
        if not bias:
            continue
        ids = [int(k) for k in bias]
        check_token_ids(ids, vocab, "logit_bias")
        index = torch.tensor(ids, dtype=torch.long, device=logits.device)
        values = torch.tensor([float(bias[k]) for k in bias], dtype=logits.dtype, device=logits.device)
        out[row].index_add_(0, index, values)
        banned = index[values <= -LOGIT_BIAS_LIMIT]
        out[row, banned] = float("-inf")
    return out


def apply_penalties(
    logits: torch.Tensor,
    generated: IdsOrCounts,
    prompt: IdsOrCounts | None = None,
    repetition_penalty: PerRow = 1.0,
    presence_penalty: PerRow = 0.0,
    frequency_penalty: PerRow = 0.0,
) -> torch.Tensor:
    """Penalise tokens already seen, per row.

    logits (B, V). generated: counts (B, V) of each row's generated tokens, or its generated ids.
    prompt: a (B, V) mask or counts of the prompt's tokens, or its ids; only the repetition penalty
    looks at it. Repetition (HF): over prompt + generated, a positive logit is divided by the
    penalty, a negative one multiplied. Then frequency and presence (OpenAI), over generated
    tokens only: logit -= frequency * count + presence * (count > 0). vLLM does the same, in this order.
    """
    rows = logits.shape[0]
    device = logits.device
    rep = _per_row(repetition_penalty, rows, logits.dtype, device)
    pres = _per_row(presence_penalty, rows, logits.dtype, device)
    freq = _per_row(frequency_penalty, rows, logits.dtype, device)
    use_rep = bool((rep != 1).any())
    use_add = bool((pres != 0).any() or (freq != 0).any())
    if not (use_rep or use_add):
        return logits
    counts = _as_counts(generated, logits.shape, device)
    out = logits
    if use_rep:
        seen = counts > 0
        if prompt is not None:
            seen = seen | (_as_counts(prompt, logits.shape, device) > 0)
        penalty = rep[:, None]
        penalised = torch.where(out > 0, out / penalty, out * penalty)
        out = torch.where(seen, penalised, out)
    if use_add:
        c = counts.to(logits.dtype)
        out = out - freq[:, None] * c - pres[:, None] * (c > 0).to(logits.dtype)
    return out


# ---------------------------------------------------------------- logits -> probabilities


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep tokens whose logit is >= the k-th largest (ties at the boundary kept, as HF and vLLM). k=0: off."""
    on = top_k > 0
    if not bool(on.any()):
        return logits
    vocab = logits.shape[-1]
    k = top_k.clamp(1, vocab).long()
    kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # (B, 1)
    return logits.masked_fill(on[:, None] & (logits < kth), float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the most likely tokens until their mass reaches p (the token that crosses p is kept). p=1: off.

    A token is kept when the mass of the tokens ranked above it is < p, which is HF's
    `cumsum(ascending) > 1 - p` without the subtraction. Equal probabilities rank by lower id.
    """
    on = top_p < 1
    if not bool(on.any()):
        return logits
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    cum = sorted_probs.cumsum(dim=-1)
    above = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # mass strictly above each rank
    drop_sorted = above >= top_p[:, None]
    drop_sorted[:, 0] = False  # the top token always stays
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(on[:, None] & drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p x the top token's probability. 0: off."""
    on = min_p > 0
    if not bool(on.any()):
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(on[:, None] & (probs < threshold), float("-inf"))


def logits_to_probs(
    logits: torch.Tensor,
    temperature: PerRow = 1.0,
    top_k: PerRow = 0,
    top_p: PerRow = 1.0,
    min_p: PerRow = 0.0,
) -> torch.Tensor:
    """Probabilities (B, V) from (already biased and penalised) logits (B, V), each row with its own settings.

    temperature -> top-k -> top-p -> min-p -> renormalise. A row with temperature 0 is greedy:
    all its mass on its argmax (lowest id on ties), and its filters are ignored.
    """
    logits = _finite_scores(_as_float(logits))
    rows, vocab = logits.shape
    device = logits.device
    temp = _per_row(temperature, rows, logits.dtype, device)
    greedy = temp == 0
    scaled = _scale(logits, torch.where(greedy, torch.ones_like(temp), temp))
    scaled = apply_top_k(scaled, _per_row(top_k, rows, torch.long, device).masked_fill(greedy, 0))
    scaled = apply_top_p(scaled, _per_row(top_p, rows, logits.dtype, device).masked_fill(greedy, 1.0))
    scaled = apply_min_p(scaled, _per_row(min_p, rows, logits.dtype, device).masked_fill(greedy, 0.0))
    probs = torch.softmax(scaled, dim=-1)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generated: IdsOrCounts,
    prompt: IdsOrCounts | None = None,
) -> torch.Tensor:
    """The whole chain for a batch: each row's bias, penalties and filters from its SamplingParams -> probs (B, V)."""
    if len(params) != logits.shape[0]:
        raise ValueError(f"{len(params)} SamplingParams for {logits.shape[0]} rows")
    logits = _as_float(logits)
    logits = apply_logit_bias(logits, [p.logit_bias for p in params])
    logits = apply_penalties(
        logits,
        generated,
        prompt,
        repetition_penalty=[p.repetition_penalty for p in params],
        presence_penalty=[p.presence_penalty for p in params],
        frequency_penalty=[p.frequency_penalty for p in params],
    )
    return logits_to_probs(
        logits,
        temperature=[p.temperature for p in params],
        top_k=[p.top_k for p in params],
        top_p=[p.top_p for p in params],
        min_p=[p.min_p for p in params],
    )


# ---------------------------------------------------------------- drawing


def make_generator(seed: int | None, record_id: Any, sample_index: int = 0, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator for one record's stream: sha256 of "seed:id" (":index" for the 2nd.. of n samples) -> 63 bits.

    None when there is no seed (the row then draws from torch's global generator). The id is
    written as JSON, so the id 1 and the id "1" get different streams. CPU generators by default,
    so that seeded results do not depend on the device the model runs on either.
    """
    if seed is None:
        return None
    key = f"{seed}:{json.dumps(record_id, sort_keys=True, default=str)}"
    if sample_index:
        key += f":{sample_index}"
    value = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") & ((1 << 63) - 1)
    g = torch.Generator(device=device)
    g.manual_seed(value)
    return g


def sample(probs: torch.Tensor, generators: Sequence[torch.Generator | None], params: Sequence[SamplingParams] | None = None) -> torch.Tensor:
    """One token id per row (B,), each row drawn from its own generator.

    A row is greedy (argmax, lowest id on ties, no random number used) when its params say
    temperature 0, or, without params, when all its mass is on one token. Rows are drawn one by
    one so that a row's draw depends only on its own probabilities and generator, never on the
    other rows of the batch.
    """
    rows = probs.shape[0]
    if len(generators) != rows:
        raise ValueError(f"{len(generators)} generators for {rows} rows")
    if params is not None:
        greedy = torch.tensor([p.greedy for p in params], device=probs.device)
    else:
        greedy = probs.amax(dim=-1) >= 1.0
    chosen = probs.argmax(dim=-1)
    if bool(greedy.all()):
        return chosen
    random_rows = [i for i in range(rows) if not bool(greedy[i])]
    # one transfer for all rows drawn with CPU generators (the default) when the model runs elsewhere
    on_cpu = probs if probs.device.type == "cpu" else None
    chosen = chosen.clone()
    for i in random_rows:
        g = generators[i]
        row = probs[i]
        if g is not None and g.device != row.device:
            if g.device.type == "cpu":
                if on_cpu is None:
                    on_cpu = probs.cpu()
                row = on_cpu[i]
            else:
                row = row.to(g.device)
        chosen[i] = torch.multinomial(row, 1, generator=g).item()
    return chosen


# ---------------------------------------------------------------- logprobs


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor | Sequence[int], k: int = 0) -> list[dict]:
    """OpenAI-shaped logprob entries, one per row: {"id", "logprob", "top_logprobs": [{"id", "logprob"}, ...]}.

    From log_softmax of the logits as given, which should be the RAW logits (before bias,
    penalties, temperature and filters): that is what OpenAI and vLLM report by default, and it
    makes a token's logprob independent of the sampling settings. Passing logprobs works too
    (log_softmax leaves them unchanged). top_logprobs holds the k most likely tokens, most likely
    first (lowest id first on ties). -inf is reported as -9999.0 so that the JSON stays valid.
    Ids only: the engine maps ids to text.
    """
    logp = torch.log_softmax(_as_float(logits), dim=-1).clamp(min=MIN_LOGPROB)
    chosen_ids = torch.as_tensor(chosen, dtype=torch.long, device=logp.device).reshape(-1)
    if chosen_ids.shape[0] != logp.shape[0]:
        raise ValueError(f"{chosen_ids.shape[0]} chosen ids for {logp.shape[0]} rows")
    k = max(0, min(int(k), logp.shape[-1]))
    chosen_lp = logp.gather(1, chosen_ids[:, None])[:, 0].tolist()
    if k:
        top_values, top_ids = logp.sort(dim=-1, descending=True, stable=True)
        top_values, top_ids = top_values[:, :k].tolist(), top_ids[:, :k].tolist()
    else:
        top_values = top_ids = [[] for _ in range(logp.shape[0])]
    return [
        {"id": int(c), "logprob": float(lp), "top_logprobs": [{"id": int(t), "logprob": float(v)} for t, v in zip(ids, values)]}
        for c, lp, ids, values in zip(chosen_ids.tolist(), chosen_lp, top_ids, top_values)
    ]


# the name in the design notes; the engine calls token_logprobs
logprobs = token_logprobs


def prompt_logprobs(logits: torch.Tensor, ids: Sequence[int], k: int = 0) -> list[dict | None]:
    """Logprob entries for a prompt from its logits (T, V): None for the first token (nothing predicts it),
    then for token t the entry of ids[t] under the logits at position t-1 (vLLM's prompt_logprobs)."""
    if logits.shape[0] != len(ids):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(ids)} prompt ids")
    if len(ids) < 2:
        return [None] * len(ids)
    return [None, *token_logprobs(logits[:-1], list(ids[1:]), k)]
