"""The Phi-3 family: Phi-3/3.5-mini, Phi-4-mini (HF Phi3ForCausalLM, GGUF arch phi3).

Llama's block with the projections stored fused, as the checkpoint has them: `qkv_proj` (queries,
keys, values side by side) and `gate_up_proj` (gate, then up). Rope may cover only the first
partial_rotary_factor of each head (Phi-4-mini: 0.75), and LongRoPE ("longrope", formerly "su")
divides each frequency by a per-frequency factor: the short factors while the sequence fits
original_max_position_embeddings, the long ones beyond, with cos and sin scaled by the attention
factor sqrt(1 + ln(factor) / ln(original)). Like transformers, the choice is made per forward from
the positions it covers: a cached sequence that grows past the original context keeps the keys
it rotated with the short factors (transformers recomputes its cache once at that point).
A sliding_window in the config applies to every layer, as in transformers (llama.cpp ignores it).

GGUF (convert_hf_to_gguf.py's Phi3MiniModel): the fused tensors keep their layout (attn_qkv,
ffn_up holds gate and up), NEOX rope (no Q/K permutation), and the factors are tensors
rope_factors_short / rope_factors_long, loaded here into buffers of the same names.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llmcli.core.config import ModelConfig
from llmcli.core.models import llama
from llmcli.core.models.decoder import AttentionSpec
from llmcli.core.models.llama import uniform_window
from llmcli.core.models.registry import LLAMA_GLOBAL_NAMES, GGUFNames, MetadataGetter, gguf_rope_scaling
from llmcli.errors import ModelError

__all__ = ["ARGS", "CAUSAL", "GGUF_NAMES", "GGUF_PERMUTED_QK", "Model", "build_buffers", "gguf_config", "prepare_config", "sanitize"]

ARGS: dict[str, Any] = {"partial_rotary_factor": 1.0}
CAUSAL = True

GGUF_NAMES = GGUFNames(
    {**LLAMA_GLOBAL_NAMES, "rope_factors_short": "rope_factors_short", "rope_factors_long": "rope_factors_long"},
    {
        "attn_norm": "input_layernorm",
        "attn_qkv": "self_attn.qkv_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_up": "mlp.gate_up_proj",
        "ffn_down": "mlp.down_proj",
    },
)
GGUF_PERMUTED_QK: tuple[str, ...] = ()


class Attention(llama.Attention):
    def __init__(self, config: ModelConfig, layer: int, spec: AttentionSpec):
        super().__init__(config, layer, spec)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split_sizes), bias=config.attention_bias)

    def fuse(self) -> None:
        """Already fused in the checkpoint."""


class MLP(llama.MLP):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        del self.gate_proj, self.up_proj
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)

    def fuse(self) -> None:
        """Already fused in the checkpoint."""


class Block(llama.Block):
    attention_cls = Attention
    mlp_cls = MLP


class Factors(nn.Module):
    """A holder whose `weight` buffer carries LongRoPE factors under the GGUF tensor's name.

    Persistent, so they load like weights: from the GGUF's tensors, or from config.json through
    `sanitize`, and travel with the state dict (the weights cache).
    """

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))


def rotary_dim(config: ModelConfig) -> int:
    return int(config.head_dim * float(config.args["partial_rotary_factor"]))


def is_longrope(config: ModelConfig) -> bool:
    return (config.rope_scaling or {}).get("rope_type") == "longrope"


class Model(llama.Model):
    block = Block

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        # matvec.c's fused block rotates whole heads
        self.native_decode = rotary_dim(config) == config.head_dim
        if is_longrope(config):
            self.rope_factors_short = Factors(rotary_dim(config) // 2)
            self.rope_factors_long = Factors(rotary_dim(config) // 2)
        self._longrope: dict[str, torch.Tensor] = {}

    @classmethod
    def rope_buffers(cls, config: ModelConfig) -> dict[str, torch.Tensor]:
        return {"inv_freq": llama.rope_inv_freq(config, dim=rotary_dim(config), scaling={} if is_longrope(config) else None)}

    def rope_frequencies(self, name: str, span: int) -> tuple[torch.Tensor, float]:
        """LongRoPE: the base frequencies divided by the short factors, or the long ones past the original context."""
        if not is_longrope(self.config):
            return super().rope_frequencies(name, span)
        scaling = self.config.rope_scaling
        kind = "long" if span > int(scaling["original_max_position_embeddings"]) else "short"
        if kind not in self._longrope:
            dim = rotary_dim(self.config)
            ext = getattr(self, f"rope_factors_{kind}").weight.float().cpu()
            shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            self._longrope[kind] = (1.0 / (ext * self.config.rope_theta**shape)).to(self.inv_freq.device)  # HF's expression
        return self._longrope[kind], attention_factor(self.config)


def attention_factor(config: ModelConfig) -> float:
    """LongRoPE's factor on cos and sin: the config's, or sqrt(1 + ln(factor) / ln(original))."""
    scaling = config.rope_scaling
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = int(scaling["original_max_position_embeddings"])
    factor = float(scaling.get("factor") or config.max_position_embeddings / original)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def build_buffers(config: ModelConfig) -> dict[str, torch.Tensor]:
    return Model.rope_buffers(config)


def prepare_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Phi3Config fields: partial rotary and LongRoPE (under rope_parameters or rope_scaling), refusing other scalings."""
    # an older config's rope_scaling wins over rope_parameters, as in transformers
    params = {**(data.get("rope_parameters") or {}), **(data.get("rope_scaling") or {})}
    if "partial_rotary_factor" in params:
        data.setdefault("partial_rotary_factor", params["partial_rotary_factor"])
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "su":
        kind = "longrope"  # the older name
    if kind in (None, "default"):
        data["rope_scaling"] = None
    elif kind == "longrope":
        params["rope_type"] = "longrope"
        params.setdefault("original_max_position_embeddings", data.get("original_max_position_embeddings"))
        half = int(int(data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"]) * float(data.get("partial_rotary_factor", 1.0))) // 2
        for key in ("short_factor", "long_factor"):
            if len(params.get(key) or ()) != half:
                raise ModelError(f"{source}: rope_scaling.{key} has {len(params.get(key) or ())} values, not {half}", "one factor per rotated frequency (head_dim * partial_rotary_factor / 2)")
        if params["original_max_position_embeddings"] is None:
            raise ModelError(f"{source}: rope_scaling type 'longrope' without original_max_position_embeddings", "use the model's config.json as published")
        data["rope_scaling"] = params
    else:
        raise ModelError(f"{source}: rope_scaling type {kind!r} is not supported", "supported for phi3: default, longrope (su)")
    return uniform_window(data, source)


def gguf_config(data: dict[str, Any], get: MetadataGetter, shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, Any]:
    """phi3.* keys: rotated dimensions, LongRoPE's original context and attention factor, the window."""
    rot = int(get("rope.dimension_count", data["head_dim"]))
    window = get("attention.sliding_window")
    scaling = gguf_rope_scaling(get)
    if "rope_factors_long.weight" in shapes:
        original = get("rope.scaling.original_context_length", required=True)
        scaling = {"rope_type": "longrope", "original_max_position_embeddings": int(original), "attention_factor": get("rope.scaling.attn_factor")}
    elif scaling is not None:
        raise ModelError(f"{source}: phi3.rope.scaling.type={scaling['rope_type']!r} is not supported", "supported for phi3: default, longrope (rope_factors_* tensors)")
    data.update(
        intermediate_size=int(get("feed_forward_length", required=True)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        partial_rotary_factor=rot / data["head_dim"],
        sliding_window=int(window) if window else None,
        hidden_act="silu",
    )
    return data


def sanitize(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Phi-3 keys are ours; LongRoPE's factors come from config.json as the tensors a GGUF has."""
    out = llama.sanitize(tensors, config)
    if is_longrope(config):
        for kind in ("short", "long"):
            out[f"rope_factors_{kind}.weight"] = torch.tensor(config.rope_scaling[f"{kind}_factor"], dtype=torch.float32)
    return out
