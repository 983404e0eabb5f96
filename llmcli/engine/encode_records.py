"""What `llmcli encode` does with records, in one place (`EncodeOptions.encode`), used by the command's
own loop and by the batch runner's workers (`encode --ray`, `--workers`), so both write the same
records; and the checks of a record's ids that encode and attend share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmcli.errors import ContextLengthError, InputError


def fit_context(length: int, limit: int, truncate: bool, line: int | None, what: str = "input") -> int:
    """How many leading positions to keep, or a ContextLengthError when the input is too long."""
    if length == 0:
        raise InputError(f"the {what} is empty", "tokenize a non-empty text", line=line)
    if length > limit:
        if not truncate:
            raise ContextLengthError(
                f"the {what} has {length} tokens but the model's context holds {limit}",
                f"shorten it, or pass --truncate to keep the first {limit} tokens",
                line=line,
            )
        return limit
    return length


def read_ids(record: dict, number: int, loaded, truncate: bool) -> list[int]:
    """The record's `ids`, checked against the vocabulary and the context (truncated with --truncate)."""
    from llmcli.records import require_ids

    ids = require_ids(record, number, vocab_size=loaded.config.vocab_size)
    keep = fit_context(len(ids), loaded.config.max_position_embeddings, truncate, number)
    return ids[:keep]


@dataclass(frozen=True)
class EncodeOptions:
    """encode's flags that shape its records (picklable: a Ray actor gets a copy)."""

    pool: str | None = None
    normalize: bool = False
    floats: bool = False
    truncate: bool = False

    def encode(self, loaded: Any, items: list[tuple[dict, int]]) -> list:
        """One result per (record, line): the record with `embeddings` (or the pooled `embedding`), or its InputError.

        Records of similar lengths share a forward pass, padded on the right and masked.
        """
        import torch

        from llmcli.core.pooling import normalize as l2_normalize
        from llmcli.core.pooling import pad_batch
        from llmcli.core.pooling import pool as pool_hidden
        from llmcli.records import EMBEDDING, EMBEDDINGS, encode_tensor

        pad = loaded.tokenizer.pad_token_id or 0

        @torch.inference_mode()
        def vectors(batch: list[list[int]]) -> list:
            x, mask = pad_batch(batch, pad, loaded.device)  # (B, T)
            if self.pool is None:
                embeddings = loaded.module.embed(x).float().cpu().numpy()  # (B, T, d)
                return [embeddings[b, : len(ids)] for b, ids in enumerate(batch)]
            hidden = loaded.module(x, attention_mask=mask, compute_logits=False).last_hidden  # (B, T, d)
            pooled = pool_hidden(hidden.float(), mask, self.pool)  # (B, d)
            if self.normalize:
                pooled = l2_normalize(pooled)
            return list(pooled.cpu().numpy())

        results: list = []
        batch: list[list[int]] = []
        where: list[int] = []  # the index in results of each id list in batch
        for record, number in items:
            try:
                batch.append(read_ids(record, number, loaded, self.truncate))
                where.append(len(results))
                results.append(record)
            except InputError as exc:
                results.append(exc)
        field = EMBEDDINGS if self.pool is None else EMBEDDING
        for group in similar_lengths([len(ids) for ids in batch]):
            for i, array in zip(group, vectors([batch[i] for i in group])):
                results[where[i]] = {**results[where[i]], field: encode_tensor(array, self.floats)}
        return results

    def tokens(self, record: dict) -> int:
        """The tokens an encoded record held (for the progress line)."""
        from llmcli.records import IDS

        ids = record.get(IDS)
        return len(ids) if isinstance(ids, list) else 0


# Padding a forward may add, as a share of its real tokens: the native kernels cost the same per
# row, padded or real, so a batch of mixed lengths would be slower than one record at a time.
PADDING_SLACK = 0.1


def similar_lengths(lengths: list[int], slack: float | None = None) -> list[list[int]]:
    """Indices of lengths in groups to pad together: sorted by length, a group grows while its
    padding stays within slack (default PADDING_SLACK) x its real tokens. Equal lengths need no padding."""
    slack = PADDING_SLACK if slack is None else slack
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]  # the longest of its group so far: the order is ascending
        if groups and n * (len(groups[-1]) + 1) <= (1 + slack) * (real + n):
            groups[-1].append(i)
            real += n
        else:
            groups.append([i])
            real = n
    return groups
