"""Saved prompt caches: the KV cache of one prompt as safetensors, with the ids it covers and the model it came from.

`attend --save-cache` writes one; `generate --cache` resumes from it instead of recomputing the prompt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmcli.errors import InputError, LlmcliError, UsageError

FORMAT = "llmcli-kv-cache/1"


def model_fingerprint(loaded) -> str:
    """Identifies the weights, not the path: the config plus a hash of a slice of the embeddings."""
    cfg = loaded.config
    emb = loaded.module.embed(torch.arange(min(8, cfg.vocab_size), device=loaded.device)).float().cpu()
    h = hashlib.sha256(json.dumps([cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim]).encode())
    h.update(emb.numpy().tobytes())
    return h.hexdigest()[:16]


def save_prompt_cache(path: Path | str, k: torch.Tensor, v: torch.Tensor, ids: list[int], loaded) -> None:
    """k, v: (layers, Hkv, T, D) for the T ids."""
    meta = {"format": FORMAT, "ids": json.dumps(ids), "model": loaded.name, "fingerprint": model_fingerprint(loaded)}
    save_file({"k": k.contiguous().cpu(), "v": v.contiguous().cpu()}, str(path), metadata=meta)


def load_prompt_cache(path: Path | str, loaded) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"cache file {path} does not exist", "write one with `llmcli attend --save-cache FILE`")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"cache file {path} is not a readable safetensors file ({exc})", "write it again with `llmcli attend --save-cache`") from None
    if meta.get("format") != FORMAT or "k" not in tensors:
        raise UsageError(f"{path} is not an llmcli KV cache", "write one with `llmcli attend --save-cache FILE`")
    if meta.get("fingerprint") != model_fingerprint(loaded):
        raise LlmcliError(
            f"cache file {path} was made by model {meta.get('model')!r}, not {loaded.name!r}",
            "use the same --model for attend and generate",
        )
    return tensors["k"], tensors["v"], json.loads(meta["ids"])


def check_prefix(cached_ids: list[int], ids: list[int], path, line: int | None = None) -> None:
    if ids[: len(cached_ids)] != cached_ids:
        raise InputError(
            f"the cache in {path} covers other ids than this record's prompt",
            "the record's ids must start with the ids the cache was saved for",
            line=line,
        )
