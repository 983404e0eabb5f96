"""llama.cpp (llama-cpp-python) as the independent reference for a GGUF file.

- `llamacpp_logits(path, ids)`: llama.cpp's logits at every position (`logits_all=True`) of one
  sequence evaluated in one batch into an empty context, cached per (file, tokens, threads) for
  the whole session, so several tests comparing against the same evaluation pay for it once.
- `llamacpp_tokenize(path, text)`: llama.cpp's own tokenization of the file's vocabulary.
- `perplexity` and `top1_agreement`: the two accuracy figures of issue 13, computed the same way
  for llama.cpp's logits and llmcli's.

Quantized copies are made with llama.cpp's quantizer through benchmarks/make_random_gguf.py's
`quantize_gguf`, the one place that calls `llama_model_quantize`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

_LOGITS: dict[tuple, np.ndarray] = {}


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def llamacpp_logits(path: Path | str, ids: list[int], threads: int | None = None, f32_kv: bool = False) -> np.ndarray:
    """(len(ids), vocab) float32 logits of llama.cpp on the file, one forward of the whole sequence.

    threads: llama.cpp's n_threads (default: torch's thread count, the one llmcli runs with).
    The context is the sequence's length (rounded up to 256), K/V in llama.cpp's default F16, or
    with f32_kv in float32 with flash attention off (llmcli's own attention arithmetic).
    """
    import llama_cpp

    if threads is None:
        import torch

        threads = torch.get_num_threads()
    path = Path(path)
    key = (*_file_key(path), tuple(ids), threads, f32_kv)
    if key not in _LOGITS:
        n_ctx = max(256, -(-len(ids) // 256) * 256)
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
            n_threads=threads, n_threads_batch=threads, verbose=False,
            **({"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32, "flash_attn": False} if f32_kv else {}),
        )  # fmt: skip
        try:
            llm.eval(list(ids))
            _LOGITS[key] = np.array(llm.scores[: len(ids)], dtype=np.float32)
        finally:
            llm.close()
    return _LOGITS[key]


def llamacpp_tokenize(path: Path | str, text: str, add_bos: bool = False) -> list[int]:
    """llama.cpp's token ids of text with the file's vocabulary (control tokens not parsed)."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return vocab.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    finally:
        vocab.close()


def token_nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """The negative log-likelihood of each of ids[1:] under logits[:-1] (float64 log-softmax)."""
    x = np.asarray(logits[:-1], dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(x - top).sum(axis=-1))
    return log_z - x[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:] under logits[:-1]."""
    return math.exp(float(np.mean(token_nll(logits, ids))))


def agreement_floor(itself: float, n: int, most: float = 0.99) -> float:
    """The top-1 agreement llmcli is held to on a real quantized file: llama.cpp's with itself (F16
    against F32 K/V cache) over n positions, less two binomial standard errors, never above `most`
    (the issue's 99%)."""
    return min(most, itself - 2 * math.sqrt(itself * (1 - itself) / n))


def assert_perplexity_agrees(ours: np.ndarray, f32_kv: np.ndarray, default: np.ndarray) -> None:
    """log_perplexity_allowance's check on per-token NLLs, with all three perplexities in the message."""
    off, allowed = log_perplexity_allowance(ours, f32_kv, default)
    ppls = {name: f"{math.exp(v.mean()):.4f}" for name, v in (("ours", ours), ("f32_kv", f32_kv), ("default", default))}
    assert off <= allowed, f"log perplexity {off:.5f} from llama.cpp's, more than {allowed:.5f} ({ppls})"


def log_perplexity_allowance(ours: np.ndarray, reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(|log ppl ours - log ppl reference|, what that may be) from per-token NLLs on the same ids.

    With 8-bit activation rounding, any change in the last bits upstream (an F16 K/V cache, another
    summation order) moves a quantized model's perplexity by a few tenths of a percent, so a fixed
    bound is a coin flip. llmcli may differ from llama.cpp's reference run (F32 K/V) as much as
    llama.cpp's other run (its default, F16 K/V) does, plus three standard errors of the mean of
    the paired per-token differences (the sampling error of N tokens)."""
    diff = ours - reference
    allowed = abs(float(np.mean(other - reference))) + 3 * float(np.std(diff, ddof=1)) / math.sqrt(len(diff))
    return abs(float(np.mean(diff))), allowed


def top1_agreement(ours: np.ndarray, reference: np.ndarray) -> float:
    """The fraction of positions whose argmax (the greedy next token) is the same."""
    return float(np.mean(np.argmax(ours, axis=-1) == np.argmax(reference, axis=-1)))
