"""The BERT family: a bidirectional post-LN encoder (all-MiniLM-L6-v2 and other sentence encoders).

Parameter names equal the keys of a transformers BertModel save (`embeddings.word_embeddings.weight`,
`encoder.layer.0.attention.self.query.weight`, ...); `sanitize` strips the `bert.` prefix of
task-head checkpoints (BertForMaskedLM, ...) and drops the heads and the pooler, which sentence
embeddings do not use. Absolute positions only.

`embed(ids)` is the word embeddings only; the forward adds positions and token types and applies
the embedding LayerNorm itself, also to `inputs_embeds`, as HF does, so
`forward(inputs_embeds=embed(ids))` equals `forward(ids)`. The model has no logits: `last_hidden`
is the last layer's output (BERT has no final norm beyond each layer's own).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.core.config import ModelConfig, refuse_unsupported
from llmcli.core.models.base import ForwardOutput, KVCache, activation, padding_mask
from llmcli.core.models.registry import GGUFNames, MetadataGetter
from llmcli.errors import ContextLengthError, ModelError, UsageError

ARGS: dict[str, Any] = {}
CAUSAL = False  # an encoder: no KV cache, no logits

# Checkpoint tensors an encoder forward never reads: task heads, the NSP pooler, cached position ids.
_UNUSED_PREFIXES = ("cls.", "pooler.", "qa_outputs.", "classifier.")
_UNUSED_SUFFIXES = ("position_ids", "token_type_ids")


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)


class SelfAttention(nn.Module):
    """HF's `attention.self`: the q, k, v projections."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)


class DenseNorm(nn.Module):
    """HF's `attention.output` and `output`: projection, residual, LayerNorm (post-LN)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.self = SelfAttention(config)
        self.output = DenseNorm(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, d = x.shape
        shape = (B, T, self.n_heads, self.head_dim)
        q = self.self.query(x).view(shape).transpose(1, 2)  # (B, H, T, hd)
        k = self.self.key(x).view(shape).transpose(1, 2)
        v = self.self.value(x).view(shape).transpose(1, 2)
        probs = None
        if want_probs:
            # slow reference path: an explicit softmax so the probabilities can be returned
            scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)  # (B, H, T, T)
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1)
            out = probs.to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, T, d)  # (B, T, H*hd)
        return self.output(out, x), probs


class Intermediate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = DenseNorm(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x, mask, want_probs):
        x, probs = self.attention(x, mask, want_probs)
        return self.output(self.intermediate(x), x), probs


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ModelError(
                f"hidden size {config.hidden_size} is not a multiple of {config.num_attention_heads} heads",
                "check hidden_size and num_attention_heads in config.json",
            )
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, d) word embeddings, before positions, token types and LayerNorm."""
        return self.embeddings.word_embeddings(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden: Collection[int] = (),
        output_attentions: Collection[int] = (),
        on_attention: Callable[[int, torch.Tensor], None] | None = None,
        logits_index: torch.Tensor | None = None,
        compute_logits: bool = True,
    ) -> ForwardOutput:
        """`attention_mask` (B, T) 1/0 hides padded keys; logits_index and compute_logits are
        accepted for a uniform call signature and ignored (an encoder has no logits)."""
        if cache is not None:
            raise UsageError("BERT is an encoder: it keeps no KV cache", "use a causal (decoder) model for cached decoding")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        B, T, _ = x.shape
        if T > self.config.max_position_embeddings:
            raise ContextLengthError(
                f"the input has {T} tokens but the model has {self.config.max_position_embeddings} positions",
                "shorten the input, or truncate it (--truncate)",
            )
        emb = self.embeddings
        positions = torch.arange(T, device=x.device)
        types = torch.zeros(B, T, dtype=torch.long, device=x.device) if token_type_ids is None else token_type_ids
        x = emb.LayerNorm(x + emb.token_type_embeddings(types) + emb.position_embeddings(positions)[None])
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # additive float mask with the dtype's minimum, as HF: a row with no real token stays finite
            keep = padding_mask(attention_mask)  # (B, 1, 1, T)
            mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        hidden: dict[int, torch.Tensor] = {}
        attentions: dict[int, torch.Tensor] = {}
        if 0 in output_hidden:
            hidden[0] = x
        for i, layer in enumerate(self.encoder.layer):
            want = i in output_attentions
            x, probs = layer(x, mask, want)
            if want:
                if on_attention is not None:  # handed on as produced, not kept: one layer's (B, H, T, S) at a time
                    on_attention(i, probs)
                else:
                    attentions[i] = probs
            if i + 1 in output_hidden:
                hidden[i + 1] = x
        return ForwardOutput(last_hidden=x, logits=None, hidden_states=hidden, attentions=attentions)


def prepare_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """config.json fields (HF names) -> those ModelConfig takes: BERT variants it refuses."""
    refuse_unsupported(data, {"position_embedding_type": "absolute"}, source)
    return data


# llama.cpp's BERT tensor names (convert_hf_to_gguf.py's BertModel: no `bert.` prefix, no pooler or heads)
GGUF_NAMES = GGUFNames(
    {
        "token_embd": "embeddings.word_embeddings",
        "position_embd": "embeddings.position_embeddings",
        "token_types": "embeddings.token_type_embeddings",
        "token_embd_norm": "embeddings.LayerNorm",
    },
    {
        "attn_q": "attention.self.query",
        "attn_k": "attention.self.key",
        "attn_v": "attention.self.value",
        "attn_output": "attention.output.dense",
        "attn_output_norm": "attention.output.LayerNorm",
        "ffn_up": "intermediate.dense",
        "ffn_down": "output.dense",
        "layer_output_norm": "output.LayerNorm",
    },
    block_prefix="encoder.layer",
)
GGUF_PERMUTED_QK: tuple[str, ...] = ()


def gguf_config(data: dict[str, Any], get: MetadataGetter, shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, Any]:
    """GGUF metadata BERT reads beyond the shared keys: MLP width, LayerNorm epsilon, token types."""
    if get("attention.causal", False):
        raise ModelError(f"{source}: bert.attention.causal=true is not supported", "llmcli runs BERT as the bidirectional encoder it is")
    types = shapes.get("token_types.weight")
    data.update(
        intermediate_size=int(get("feed_forward_length", required=True)),
        layer_norm_eps=float(get("attention.layer_norm_epsilon", 1e-12)),
        type_vocab_size=int(types[0]) if types else 2,
        hidden_act="gelu",
        tie_word_embeddings=False,
    )
    return data


def build_buffers(config: ModelConfig) -> dict[str, torch.Tensor]:
    """BERT computes no buffers (positions are learned weights)."""
    return {}


def sanitize(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """BERT checkpoint keys -> our names.

    Strips the `bert.` prefix of task-head checkpoints, drops heads, the pooler and saved
    position/token-type id buffers, and renames TF-era LayerNorm `gamma`/`beta` to weight/bias.
    """
    out = {}
    for name, t in tensors.items():
        if name.startswith("bert."):
            name = name[len("bert.") :]
        if name.startswith(_UNUSED_PREFIXES) or name.endswith(_UNUSED_SUFFIXES):
            continue
        if ".LayerNorm." in name:
            if name.endswith(".gamma"):
                name = name[: -len("gamma")] + "weight"
            elif name.endswith(".beta"):
                name = name[: -len("beta")] + "bias"
        out[name] = t
    return out
