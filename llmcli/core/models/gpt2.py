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

from typing import Any, Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.core.config import ModelConfig, refuse_unsupported
from llmcli.core.models.base import ForwardOutput, KVCache, causal_mask, masked_attention, reference_attention
from llmcli.errors import ContextLengthError, ModelError

# Conv1D weights in a GPT-2 checkpoint, stored (in, out): the ones sanitize transposes.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# Buffers older transformers versions saved with the weights: the causal mask and its fill value.
_STALE_BUFFERS = (".attn.bias", ".attn.masked_bias")


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """HF `hidden_act` / `activation_function` name -> the function (shared with the BERT family)."""
    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "gelu": F.gelu,  # exact erf form
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
        "swish": F.silu,
    }
    try:
        return table[name]
    except KeyError:
        raise ModelError(f"unsupported activation {name!r}", f"supported: {', '.join(sorted(table))}") from None


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.c_attn = nn.Linear(d, 3 * d)  # q, k, v side by side, as GPT-2 stores them
        self.c_proj = nn.Linear(d, d)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        plain: bool,
        cache: KVCache | None,
        want_probs: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """plain: every row's queries start at key 0, so SDPA's own causal flag is the mask."""
        B, T, d = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)  # each (B, T, H, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, positions)  # (B, H, S, hd)
        probs = None
        if want_probs:
            out, probs = reference_attention(q, k, v, causal_mask(positions, k.shape[2]))
        elif plain:
            # SDPA's causal path on the CPU works in tiles: no (T, T) scores for a long prompt
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            out = masked_attention(q, k, v, positions)
        out = out.transpose(1, 2).reshape(B, T, d)  # (B, T, H*hd)
        return self.c_proj(out), probs


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, positions, plain, cache, want_probs):
        a, probs = self.attn(self.ln_1(x), positions, plain, cache, want_probs)
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
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ModelError(
                f"hidden size {config.hidden_size} is not a multiple of {config.num_attention_heads} heads",
                "check n_embd and n_head in config.json",
            )
        self.config = config
        self.transformer = Backbone(config)
        # tied checkpoints (every released GPT-2) have no lm_head tensor: logits reuse wte
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    # ------------------------------------------------------------ helpers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, d) token embeddings, without positions (forward adds those)."""
        return self.transformer.wte(input_ids)

    def untie_output(self) -> None:
        """Give a tied model its own lm_head module (sharing the embedding tensor), so it can be quantized."""
        if self.lm_head is None:
            weight = self.transformer.wte.weight
            self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
            self.lm_head.weight = weight

    def _check_length(self, need: int) -> None:
        limit = self.config.max_position_embeddings
        if need > limit:
            # learned positions stop at the table's end: there is nothing to extrapolate with
            raise ContextLengthError(
                f"the sequence needs {need} positions but the model has {limit}",
                "shorten the input or lower --max-tokens",
            )

    # ------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden: Collection[int] = (),
        output_attentions: Collection[int] = (),
        logits_index: torch.Tensor | None = None,
        compute_logits: bool = True,
    ) -> ForwardOutput:
        """Right-padded batches: `attention_mask` only tells the cache how far each row advances.

        The causal mask already hides the pads (they sit after every real query), so without a
        cache the real positions come out as if each row ran alone.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        B, T, _ = x.shape
        L = self.config.num_hidden_layers
        if cache is not None:
            positions = cache.positions(T)  # (B, T)
            S = int(positions.max()) + 1
            self._check_length(S)
            # equal rows need no explicit mask: a fresh prefill is plain causal, a single step sees every key
            uniform = bool((cache.lengths == cache.lengths[0]).all())
            plain = uniform and (T == 1 or int(cache.lengths[0]) == 0)
        else:
            self._check_length(T)
            positions = torch.arange(T, device=x.device)[None, :].expand(B, T)
            plain = True
        x = x + self.transformer.wpe(positions)  # (B, T, d)
        hidden: dict[int, torch.Tensor] = {}
        attentions: dict[int, torch.Tensor] = {}
        if 0 in output_hidden:
            hidden[0] = x
        for i, block in enumerate(self.transformer.h):
            want = i in output_attentions
            x, probs = block(x, positions, plain, cache, want)
            if want:
                attentions[i] = probs
            if i + 1 in output_hidden and i + 1 != L:
                hidden[i + 1] = x
        x = self.transformer.ln_f(x)
        if L in output_hidden:
            hidden[L] = x  # HF's last hidden state is after the final norm
        if cache is not None:
            cache.advance(attention_mask.sum(1) if attention_mask is not None else T)
        logits = None
        if compute_logits:
            h = x if logits_index is None else x[torch.arange(B, device=x.device), logits_index]  # (B, T, d) or (B, d)
            logits = F.linear(h, self.transformer.wte.weight) if self.lm_head is None else self.lm_head(h)
        return ForwardOutput(last_hidden=x, logits=logits, hidden_states=hidden, attentions=attentions)


def prepare_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """config.json fields (HF names) -> those ModelConfig takes: GPT-2's defaults, variants it refuses."""
    data.setdefault("tie_word_embeddings", True)  # HF's default, which old GPT-2 configs leave unsaid
    supported = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    refuse_unsupported(data, supported, source)
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
