"""The Qwen3 family: llama's decoder with per-head RMSNorm on queries and keys before rope.

Its head_dim is its own (not hidden/heads), it has no q/k/v bias unless attention_bias says so,
and its GGUFs (convert_hf_to_gguf.py's Qwen3Model) keep HF's rope layout (NEOX): no Q/K permutation.
matvec.c's fused decode block knows llama's block exactly, without the q/k norms, so this family
never takes it; every step runs the shared torch decoder forward.
"""

from __future__ import annotations

from typing import Any

import torch

from llmcli.core.config import ModelConfig
from llmcli.core.models import llama
from llmcli.core.models.decoder import AttentionSpec
from llmcli.core.models.llama import build_buffers, gguf_config, known_rope, sanitize, uniform_window
from llmcli.core.models.registry import LLAMA_BLOCK_NAMES, LLAMA_GLOBAL_NAMES, GGUFNames

__all__ = ["ARGS", "CAUSAL", "GGUF_NAMES", "GGUF_PERMUTED_QK", "Model", "build_buffers", "gguf_config", "prepare_config", "sanitize"]

ARGS: dict[str, Any] = {}
CAUSAL = True
GGUF_NAMES = GGUFNames(LLAMA_GLOBAL_NAMES, {**LLAMA_BLOCK_NAMES, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"})
GGUF_PERMUTED_QK: tuple[str, ...] = ()


class Attention(llama.Attention):
    def __init__(self, config: ModelConfig, layer: int, spec: AttentionSpec):
        super().__init__(config, layer, spec)
        self.q_norm = llama.RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = llama.RMSNorm(self.head_dim, config.rms_norm_eps)

    def norm_qk(self, qk: torch.Tensor) -> torch.Tensor:
        nq = self.n_heads
        return torch.cat((self.q_norm(qk[:, :, :nq]), self.k_norm(qk[:, :, nq:])), dim=2)  # (B, T, nq + nkv, hd)


class Block(llama.Block):
    attention_cls = Attention


class Model(llama.Model):
    block = Block
    native_decode = False


def prepare_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """config.json fields (HF names) -> those ModelConfig takes."""
    return uniform_window(known_rope(data, source), source)
