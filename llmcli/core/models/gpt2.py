"""The GPT-2 family: learned absolute positions, pre-LN blocks, fused QKV, tied output embedding.

Parameter names equal the keys transformers writes for GPT2LMHeadModel
(`transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight`, ...). GPT-2 stores its
projections as Conv1D, (in, out); `sanitize` transposes them once into nn.Linear's (out, in), so
the forward is plain F.linear and `--quantize int8` (which swaps nn.Linear modules) applies.

`embed(ids)` is the token embeddings only; the forward adds the position embeddings itself,
also to `inputs_embeds`, as HF does, so `forward(inputs_embeds=embed(ids))` equals `forward(ids)`.

Assumed from GPT-2 itself, because ModelConfig does not carry these config.json fields:
scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False
(what every released GPT-2 and DistilGPT-2 checkpoint uses).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.core.config import ModelConfig, refuse_unsupported
from llmcli.core.models.base import TANH_GELU, activation, runs_natively
from llmcli.core.models.decoder import AttentionSpec, Decoder, Step
from llmcli.core.models.registry import GGUFNames, MetadataGetter
from llmcli.errors import ContextLengthError, ModelError

ARGS: dict[str, Any] = {}
CAUSAL = True

# Conv1D weights in a GPT-2 checkpoint, stored (in, out): the ones sanitize transposes.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# Buffers older transformers versions saved with the weights: the causal mask and its fill value.
_STALE_BUFFERS = (".attn.bias", ".attn.masked_bias")


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.c_attn = nn.Linear(d, 3 * d)  # q, k, v side by side, as GPT-2 stores them
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, step: Step, want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, d = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)  # each (B, T, H, hd)
        out, probs = step.attend(self.layer, q, k, v, None, None, want_probs)  # (B, T, H*hd)
        return self.c_proj(out), probs


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm, on activations.c's kernel when the kernels are on (float32, CPU): one
    summation order on every ISA, where torch's follows the vector width it dispatches to."""

    kernels = None  # set by Model.use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not runs_natively(self.kernels, x):
            return super().forward(x)
        x = x.contiguous()
        out = torch.empty_like(x)
        K = x.shape[-1]
        self.kernels.layer_norm_f32(x.data_ptr(), self.weight.data_ptr(), self.bias.data_ptr(), out.data_ptr(), x.numel() // K, K, self.eps)
        return out


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.native_act = config.hidden_act in TANH_GELU  # activations.c's gelu_tanh_f32 computes it
        self.kernels = None  # set by Model.use_kernels when native_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if runs_natively(self.kernels, h):
            h = h.contiguous()
            out = torch.empty_like(h)
            self.kernels.gelu_tanh_f32(h.data_ptr(), out.data_ptr(), h.numel() // h.shape[-1], h.shape[-1])
            return self.c_proj(out)
        return self.c_proj(self.act(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config, layer)
        self.ln_2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, step: Step, want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, probs = self.attn(self.ln_1(x), step, want_probs)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, probs


class Backbone(nn.Module):
    """HF's `transformer.` prefix: token and position embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class Model(Decoder):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ModelError(
                f"hidden size {config.hidden_size} is not a multiple of {config.num_attention_heads} heads",
                "check n_embd and n_head in config.json",
            )
        self.config = config
        self.specs = [AttentionSpec(window=None, rope=None)] * config.num_hidden_layers  # learned positions, no rope
        self.transformer = Backbone(config)
        # tied checkpoints (every released GPT-2) have no lm_head tensor: logits reuse wte
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    # ------------------------------------------------------------ decoder hooks

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, d) token embeddings, without positions (forward adds those)."""
        return self.transformer.wte(input_ids)

    def add_positions(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self.transformer.wpe(positions)  # (B, T, d)

    def use_kernels(self, kernels) -> None:
        """Attention (decoder), the LayerNorms and a tanh gelu on the native kernels (float32, CPU)."""
        super().use_kernels(kernels)
        for module in self.modules():
            if isinstance(module, LayerNorm) or (isinstance(module, MLP) and module.native_act):
                module.kernels = kernels

    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(x)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.transformer.wte.weight) if self.lm_head is None else self.lm_head(h)

    def check_length(self, need: int) -> None:
        limit = self.config.max_position_embeddings
        if need > limit:
            # learned positions stop at the table's end: there is nothing to extrapolate with
            raise ContextLengthError(
                f"the sequence needs {need} positions but the model has {limit}",
                "shorten the input or lower --max-tokens",
            )

    def untie_output(self) -> None:
        """Give a tied model its own lm_head module (sharing the embedding tensor), so it can be quantized."""
        if self.lm_head is None:
            weight = self.transformer.wte.weight
            self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
            self.lm_head.weight = weight


def prepare_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """config.json fields (HF names) -> those ModelConfig takes: GPT-2's defaults, variants it refuses."""
    data.setdefault("tie_word_embeddings", True)  # HF's default, which old GPT-2 configs leave unsaid
    supported = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    refuse_unsupported(data, supported, source)
    return data


# llama.cpp's GPT-2 tensor names (convert_hf_to_gguf.py's GPT2Model stores the Conv1D weights
# transposed, so they are already nn.Linear's (out, in))
GGUF_NAMES = GGUFNames(
    {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f", "output": "lm_head"},
    {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
    block_prefix="transformer.h",
)
GGUF_PERMUTED_QK: tuple[str, ...] = ()


def gguf_config(data: dict[str, Any], get: MetadataGetter, shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, Any]:
    """GGUF metadata GPT-2 reads beyond the shared keys: its LayerNorm epsilon and MLP width."""
    data.update(
        intermediate_size=int(get("feed_forward_length", 4 * data["hidden_size"])),
        layer_norm_eps=float(get("attention.layer_norm_epsilon", 1e-5)),
        hidden_act="gelu_new",
    )
    return data


def build_buffers(config: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2 computes no buffers (positions are learned weights)."""
    return {}


def sanitize(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2 checkpoint keys -> our names.

    Adds the `transformer.` prefix that bare GPT2Model saves lack, drops saved mask buffers and a
    tied lm_head, and transposes the Conv1D (in, out) weights to nn.Linear's (out, in).
    """
    out = {}
    for name, t in tensors.items():
        if name.endswith(_STALE_BUFFERS):
            continue
        if name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue
        elif not name.startswith("transformer."):
            name = "transformer." + name  # openai-community/gpt2 and GPT2Model saves have no prefix
        if name.endswith(_CONV1D) and t.dim() == 2:
            t = t.t().contiguous()
        out[name] = t
    if not config.tie_word_embeddings and "lm_head.weight" not in out and "transformer.wte.weight" in out:
        # HF ties GPT-2 unless config.json says otherwise, and older config.json files do not say:
        # a checkpoint without lm_head.weight is a tied one
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
