"""The Gemma 3 family (text): Gemma3ForCausalLM (model_type gemma3_text) and GGUF arch gemma3.

What differs from llama, as transformers' modeling_gemma3.py and llama.cpp's gemma3.cpp compute it:
  - the token embeddings are scaled by sqrt(hidden_size), in the model dtype;
  - four RMSNorms per block: before and after attention, before and after the MLP, each computing
    x * (1 + w) in float32. GGUF files store 1 + w already (convert_hf_to_gguf.py's Gemma3Model),
    so the parameter here holds 1 + w and `sanitize` adds the 1 to an HF checkpoint's weights;
  - per-head RMSNorm on queries and keys before rope (as Qwen3), queries scaled by
    query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5;
  - GeGLU: gelu (tanh approximation) of the gate times up;
  - five local (sliding-window) layers to one global, from `layer_types` (or the older
    sliding_window_pattern); local layers rotate with rope_local_base_freq and no scaling, global
    ones with rope_theta and rope_scaling;
  - optional final logit soft-capping: cap * tanh(logits / cap); tied embeddings.
matvec.c's fused decode block knows llama's block only, so every step runs the torch forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llmcli.core.config import ModelConfig
from llmcli.core.models import llama, qwen3
from llmcli.core.models.decoder import AttentionSpec, Step
from llmcli.core.models.llama import known_rope, rope_inv_freq
from llmcli.core.models.registry import LLAMA_BLOCK_NAMES, LLAMA_GLOBAL_NAMES, GGUFNames, MetadataGetter, gguf_rope_scaling
from llmcli.errors import ModelError

# Gemma 3's turn format, Google's chat template for text messages (tokenizer_config.json of the
# instruction-tuned models): the chat template of a Gemma 3 GGUF that carries none, such as the
# base gemma3-270m, as llama.cpp formats a gemma conversation (llama-chat.cpp's "gemma").
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

ARGS: dict[str, Any] = {
    "query_pre_attn_scalar": 256,
    "final_logit_softcapping": None,
    "rope_local_base_freq": 10000.0,
}
CAUSAL = True
SLIDING_WINDOW_PATTERN = 6  # HF's and llama.cpp's default: every 6th layer is global

GGUF_NAMES = GGUFNames(
    LLAMA_GLOBAL_NAMES,
    {
        **LLAMA_BLOCK_NAMES,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
)
GGUF_PERMUTED_QK: tuple[str, ...] = ()  # NEOX rope in llama.cpp: HF's rows


class RMSNorm(llama.RMSNorm):
    """Gemma's RMSNorm with its weight held as 1 + w; in float32 it is llama's (and runs its kernel).

    Other dtypes normalise and multiply in float32, then round once, as HF's Gemma3RMSNorm does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class Attention(qwen3.Attention):
    def __init__(self, config: ModelConfig, layer: int, spec: AttentionSpec):
        super().__init__(config, layer, spec)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.scale = float(config.args["query_pre_attn_scalar"]) ** -0.5


class Block(llama.Block):
    """Sandwich norms: x + post_attn(attn(input_norm(x))), then x + post_ffn(mlp(pre_ffn(x)))."""

    attention_cls = Attention

    def __init__(self, config: ModelConfig, layer: int, spec: AttentionSpec):
        super().__init__(config, layer, spec)
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def forward(self, x: torch.Tensor, step: Step, want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, probs = self.self_attn(self.input_layernorm(x), step, want_probs)
        x = x + self.post_attention_layernorm(a)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, probs


class Model(llama.Model):
    block = Block
    native_decode = False

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @classmethod
    def attention_specs(cls, config: ModelConfig) -> list[AttentionSpec]:
        return [
            AttentionSpec(config.sliding_window, "inv_freq_local") if kind == "sliding_attention" else AttentionSpec(None, "inv_freq")
            for kind in config.layer_types
        ]

    @classmethod
    def rope_buffers(cls, config: ModelConfig) -> dict[str, torch.Tensor]:
        """Global layers: rope_theta with rope_scaling; local layers: rope_local_base_freq, unscaled."""
        return {
            "inv_freq": rope_inv_freq(config),
            "inv_freq_local": rope_inv_freq(config, theta=float(config.args["rope_local_base_freq"]), scaling={}),
        }

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, d) embeddings times sqrt(d), the factor rounded to the model dtype as HF does."""
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        return x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        logits = super().output(h)
        cap = self.config.args["final_logit_softcapping"]
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def layer_types_from_pattern(n_layers: int, pattern: int | list) -> list[str]:
    """HF's (and llama.cpp's) rule: with pattern n, layer i is global when (i + 1) % n == 0; a list says it per layer."""
    if isinstance(pattern, list):
        return ["sliding_attention" if swa else "full_attention" for swa in pattern]
    return ["sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(n_layers)]


def prepare_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Gemma3TextConfig fields -> ModelConfig's: activation, both ropes, the layer pattern; refuses what it does not run."""
    if data.get("attn_logit_softcapping") is not None:
        raise ModelError(f"{source}: attn_logit_softcapping={data['attn_logit_softcapping']!r} is not supported", "Gemma 3 has none; this config is another model's")
    if data.get("use_bidirectional_attention"):
        raise ModelError(f"{source}: use_bidirectional_attention=true is not supported", "llmcli runs Gemma 3 as a causal decoder")
    data["hidden_act"] = data.get("hidden_activation", data.get("hidden_act", "gelu_pytorch_tanh"))
    data.setdefault("tie_word_embeddings", True)
    params = data.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        # transformers >= 5: one rope dict per layer type
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        data["rope_theta"] = float(full.get("rope_theta", 1_000_000.0))
        data["rope_local_base_freq"] = float(local.get("rope_theta", 10_000.0))
        data["rope_scaling"] = full if full.get("rope_type", "default") != "default" else None
        if local.get("rope_type", "default") != "default":
            raise ModelError(f"{source}: rope_parameters.sliding_attention.rope_type={local['rope_type']!r} is not supported", "Gemma 3's local layers use the default rope")
    else:
        data.setdefault("rope_theta", 1_000_000.0)
    if data.get("layer_types") is None:
        data["layer_types"] = layer_types_from_pattern(int(data["num_hidden_layers"]), data.get("sliding_window_pattern", SLIDING_WINDOW_PATTERN))
    kinds = set(data["layer_types"])
    if not kinds <= {"full_attention", "sliding_attention"} or len(data["layer_types"]) != int(data["num_hidden_layers"]):
        raise ModelError(f"{source}: layer_types={data['layer_types']!r} is not supported", "one of full_attention / sliding_attention per layer")
    return known_rope(data, source)


def gguf_config(data: dict[str, Any], get: MetadataGetter, shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, Any]:
    """gemma3.* keys, with llama.cpp's defaults for what the converter does not write.

    llama.cpp (src/models/gemma3.cpp): windows every layer but each 6th when
    attention.sliding_window is set (attention.sliding_window_pattern overrides), local rope
    base rope.freq_base_swa (default 10000), and the query scale 1/sqrt(head_dim), except the
    62-layer 27B's 1/sqrt(hidden/heads): that is query_pre_attn_scalar.
    """
    n_layers = data["num_hidden_layers"]
    window = get("attention.sliding_window")
    pattern = get("attention.sliding_window_pattern", SLIDING_WINDOW_PATTERN)
    scalar = data["hidden_size"] // data["num_attention_heads"] if n_layers == 62 else data["head_dim"]
    data.update(
        intermediate_size=int(get("feed_forward_length", required=True)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 1_000_000.0)),
        rope_scaling=gguf_rope_scaling(get),
        rope_local_base_freq=float(get("rope.freq_base_swa", 10_000.0)),
        sliding_window=int(window) if window else None,
        layer_types=layer_types_from_pattern(n_layers, pattern) if window else ["full_attention"] * n_layers,
        query_pre_attn_scalar=scalar,
        final_logit_softcapping=get("final_logit_softcapping"),
        hidden_act="gelu_pytorch_tanh",
    )
    return data


def build_buffers(config: ModelConfig) -> dict[str, torch.Tensor]:
    return Model.rope_buffers(config)


def sanitize(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Gemma 3 keys are ours; norm weights become 1 + w (what the GGUF stores); a tied lm_head is dropped."""
    out = {}
    for name, t in llama.sanitize(tensors, config).items():
        out[name] = t.float() + 1.0 if name.endswith("norm.weight") else t
    return out

