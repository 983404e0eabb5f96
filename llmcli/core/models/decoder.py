"""The decoder forward every causal family shares, its per-layer attention spec and its mask choice.

A causal family (llama.py, qwen3.py, gemma3.py, phi3.py, gpt2.py) subclasses `Decoder` and says
what differs: its blocks, its embedding, its final norm and output, and per layer an
`AttentionSpec` (sliding window or none, which rope). `Decoder.forward` is the one loop: positions
from the KV cache, a `Step` that tells each layer whether SDPA's plain causal flag is its mask
(mlx-lm's `create_attention_mask` decision, made once), the rope tables each spec needs, the hidden
states and attention maps asked for, the cache advance and the logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.core.models.base import ForwardOutput, KVCache, causal_mask, masked_attention, reference_attention


@dataclass(frozen=True)
class AttentionSpec:
    """What one layer's attention sees: a sliding window (None: every earlier key) and its rope.

    `rope` names the model buffer holding the layer's inverse frequencies, so layers with another
    rope base or scaling (Gemma 3's local layers) name another buffer.
    """

    window: int | None = None
    rope: str | None = "inv_freq"  # None: no rope (learned absolute positions)


@dataclass
class Step:
    """One forward's view of the sequence, shared by every layer."""

    positions: torch.Tensor  # (B, T) absolute positions of the new tokens
    cache: KVCache | None
    uniform: bool  # every row's queries start right after keys 0..: SDPA's causal flag is a full-attention mask
    span: int  # keys 0..span-1 exist after this step
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # spec.rope -> cos, sin (B, T, rot)

    def plain(self, window: int | None) -> bool:
        """Whether SDPA's causal flag alone is this layer's mask (a window that cuts nothing is no window)."""
        return self.uniform and (not window or self.span <= window)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's NEOX-style rope (halves) on the first cos.shape[-1] dims of each head; the rest pass (partial rotary)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    step: Step,
    window: int | None,
    want_probs: bool,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of q (B, H, T, hd) over k, v (B, Hkv, S, hd), choosing the mask once per layer.

    want_probs: the slow reference path that returns the probabilities; plain: SDPA's causal
    flag (tiled on the CPU, no (T, T) scores); otherwise `masked_attention`, block by block.
    scale: the query scale (default 1/sqrt(hd)).
    """
    T = q.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if want_probs:
        return reference_attention(q, k, v, causal_mask(step.positions, k.shape[2], window), scale)
    if step.plain(window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa, scale=scale), None
    return masked_attention(q, k, v, step.positions, window, gqa, scale), None


class Decoder(nn.Module):
    """The shared forward of the causal families; a family fills in the hooks below.

    Subclasses set `self.config` and `self.specs` (one AttentionSpec per layer) and implement
    `blocks()`, `embed`, `final_norm` and `output`. Optional hooks: `add_positions` (learned
    absolute positions), `check_length`, `decode_natively` (a whole one-token step in native code).
    """

    config: object
    specs: list[AttentionSpec]

    # ------------------------------------------------------------ hooks

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) final hidden states -> (..., V) logits."""
        raise NotImplementedError

    def add_positions(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x

    def check_length(self, need: int) -> None:
        """Refuse positions the model has no embedding for (learned positions); rope has no such limit."""

    def decode_natively(self, x: torch.Tensor, step: Step) -> torch.Tensor | None:
        """A whole one-token step over all blocks in native code, or None to run the torch blocks."""
        return None

    # ------------------------------------------------------------ rope

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin (B, T, rot) for each rope the layers use, looked up in tables grown on demand."""
        span = int(positions.max()) + 1
        tables = self.__dict__.setdefault("_rope_tables", {})
        out = {}
        for name in {s.rope for s in self.specs if s.rope is not None}:
            inv_freq, scaling = self.rope_frequencies(name, span)
            table = tables.get(name)
            if table is None or table[0].shape[0] < span or table[0].dtype != dtype or table[0].device != positions.device or table[2] is not inv_freq:
                size = max(span, 256 if table is None else 2 * table[0].shape[0])
                pos = torch.arange(size, device=positions.device)
                freqs = pos[:, None].float() * inv_freq.float()  # (S, rot/2)
                emb = torch.cat((freqs, freqs), dim=-1)  # (S, rot)
                cos, sin = emb.cos(), emb.sin()
                if scaling != 1.0:
                    cos, sin = cos * scaling, sin * scaling
                table = tables[name] = (cos.to(dtype), sin.to(dtype), inv_freq)
            out[name] = (table[0][positions], table[1][positions])
        return out

    def rope_frequencies(self, name: str, span: int) -> tuple[torch.Tensor, float]:
        """The inverse frequencies (rot/2,) of rope `name` for a sequence of `span` positions, and the
        factor on cos and sin (LongRoPE's attention factor; 1 for plain rope). The buffer itself here."""
        return getattr(self, name), 1.0

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
        on_attention: Callable[[int, torch.Tensor], None] | None = None,
        logits_index: torch.Tensor | None = None,
        compute_logits: bool = True,
    ) -> ForwardOutput:
        """Right-padded batches: `attention_mask` only tells the cache how far each row advances.

        The causal mask already hides the pads (they sit after every real query), so without a
        cache the real positions come out as if each row ran alone.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        B, T, _ = x.shape
        L = len(self.specs)
        if cache is not None:
            positions = cache.positions(T)  # (B, T)
            # equal rows need no explicit mask: a fresh prefill is plain causal, a single step sees every key
            uniform = (T == 1 or int(cache.lengths[0]) == 0) and bool((cache.lengths == cache.lengths[0]).all())
        else:
            positions = torch.arange(T, device=x.device)[None, :].expand(B, T)
            uniform = True
        span = int(positions.max()) + 1
        self.check_length(span)
        x = self.add_positions(x, positions)
        step = Step(positions, cache, uniform, span, self.rope_tables(positions, x.dtype))
        hidden: dict[int, torch.Tensor] = {}
        attentions: dict[int, torch.Tensor] = {}
        if 0 in output_hidden:
            hidden[0] = x
        native = None
        if T == 1 and cache is not None and not output_hidden and not output_attentions and x.dtype == torch.float32:
            native = self.decode_natively(x, step)
        if native is not None:
            x = native
        else:
            for i, block in enumerate(self.blocks()):
                want = i in output_attentions
                x, probs = block(x, step, want)
                if want:
                    if on_attention is not None:  # handed on as produced, not kept: one layer's (B, H, T, S) at a time
                        on_attention(i, probs)
                    else:
                        attentions[i] = probs
                if i + 1 in output_hidden and i + 1 != L:
                    hidden[i + 1] = x
        x = self.final_norm(x)
        if L in output_hidden:
            hidden[L] = x  # HF's last hidden state is after the final norm
        if cache is not None:
            cache.advance(attention_mask.sum(1) if attention_mask is not None else T)
        logits = None
        if compute_logits:
            h = x if logits_index is None else x[torch.arange(B, device=x.device), logits_index]  # (B, T, d) or (B, d)
            logits = self.output(h)
        return ForwardOutput(last_hidden=x, logits=logits, hidden_states=hidden, attentions=attentions)


def layer_specs(config, rope: str | None = "inv_freq") -> list[AttentionSpec]:
    """Per layer from config.layer_types (HF's names): sliding_attention layers get config.sliding_window;
    without layer_types every layer gets config.sliding_window (None: full attention)."""
    if config.layer_types is None:
        return [AttentionSpec(config.sliding_window, rope)] * config.num_hidden_layers  # one window (or none) for all
    types = config.layer_types
    return [AttentionSpec(config.sliding_window if kind == "sliding_attention" else None, rope) for kind in types]
