"""The decoder forward every causal family shares, its per-layer attention spec and its mask choice.

A causal family (llama.py, qwen3.py, gemma3.py, phi3.py, gpt2.py) subclasses `Decoder` and says
what differs: its blocks, its embedding, its final norm and output, and per layer an
`AttentionSpec` (sliding window or none, which rope). `Decoder.forward` is the one loop: positions
from the KV cache, a `Step` that tells each layer whether SDPA's plain causal flag is its mask
(mlx-lm's `create_attention_mask` decision, made once), the rope tables each spec needs, the hidden
states and attention maps asked for, the cache advance and the logits. With the native kernels
(float32 on the CPU) every step's attention runs on attention.c, one fixed summation order per
(token, head): a model's numbers then do not depend on the ISA torch's SDPA would dispatch to
(AVX-512 or AVX2), nor on the batch a sequence shares. Without them, SDPA with that mask choice.

`Decoder.forward_packed` is the scheduler's forward: the tokens of many sequences (decode tokens
and prompt chunks, each at its own cache row and position) flattened into one (1, N) batch, so
every linear layer reads its weights once for the whole step, and attention runs per token over
its own cache row (`Packed.attend`, attention.c). Every kernel on that path computes a token's
numbers from that token's row alone, so a sequence's tokens and logits are the same bits
whatever else is in the step and however its prompt was chunked (tests/test_scheduler.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.core.models.base import ForwardOutput, KVCache, causal_mask, masked_attention, reference_attention, runs_natively
from llmcli.core.threads import serial_torch_ops
from llmcli.errors import ContextLengthError


@dataclass(frozen=True)
class AttentionSpec:
    """What one layer's attention sees: a sliding window (None: every earlier key) and its rope.

    `rope` names the model buffer holding the layer's inverse frequencies, so layers with another
    rope base or scaling (Gemma 3's local layers) name another buffer.
    """

    window: int | None = None
    rope: str | None = "inv_freq"  # None: no rope (learned absolute positions)


@dataclass
class Packed:
    """The tokens of a packed step: token t goes to cache row `rows[t]` at position `positions[t]`."""

    rows: torch.Tensor  # (N,) long
    positions: torch.Tensor  # (N,) long
    kernels: object | None  # the native kernels (attention.c), or None: torch per sequence

    def attend(self, cache: KVCache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None) -> torch.Tensor:
        """Write the new keys/values (1, N, Hkv, hd) into their rows, then attention of q (1, N, H, hd)
        for each token over keys 0..its position of its own row (window: the last `window` of them).
        Returns (1, N, H * hd)."""
        _, N, H, hd = q.shape
        cache.k[layer][self.rows, :, self.positions] = k[0]  # (N, Hkv, hd) at (row, :, position)
        cache.v[layer][self.rows, :, self.positions] = v[0]
        kc, vc = cache.k[layer], cache.v[layer]
        if runs_natively(self.kernels, q, kc, vc):
            return native_attention(self.kernels, q[0], self.rows, self.positions, kc, vc, window, scale).view(1, N, H * hd)
        return self._attend_torch(kc, vc, q, window, scale)

    def attend_unroped(self, cache: KVCache, layer: int, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nq: int, window: int | None, scale: float | None) -> torch.Tensor | None:
        """`attend` with the rope done natively in the same call: qk (1, N, nq + Hkv, hd) before rope, v (1, N, Hkv, hd),
        cos, sin (1, N, hd). None where the kernels cannot take it (another dtype, partial rotary, heads
        not contiguous within a token): the caller ropes in torch and calls `attend`. The rope rounds
        as apply_rope does (attention.c's rope_head), so the bits are those of that path."""
        _, N, heads, hd = qk.shape
        kc, vc = cache.k[layer], cache.v[layer]
        if not runs_natively(self.kernels, qk, v, cos, sin, kc, vc) or cos.shape[-1] != hd:
            return None
        if qk.stride()[2:] != (hd, 1) or v.stride()[2:] != (hd, 1) or kc.stride(-1) != 1 or kc.stride() != vc.stride():
            return None
        cos, sin = cos.reshape(N, hd).contiguous(), sin.reshape(N, hd).contiguous()
        rows, positions = self.rows.contiguous(), self.positions.contiguous()  # held: the call reads them
        out = qk.new_empty((N, nq, hd))
        sb, sh, ss, _ = kc.stride()
        status = self.kernels.attn_rope_tokens_f32(
            qk.data_ptr(), qk.stride(1), v.data_ptr(), v.stride(1), cos.data_ptr(), sin.data_ptr(), rows.data_ptr(), positions.data_ptr(),
            kc.data_ptr(), vc.data_ptr(), sb, sh, ss, N, nq, heads - nq, hd, window or 0, scale or 0.0, out.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError(f"not enough memory for the attention scratch of {N} tokens")
        return out.view(1, N, nq * hd)

    def _attend_torch(self, kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, window: int | None, scale: float | None) -> torch.Tensor:
        """Without the kernels (another dtype, LLMCLI_KERNELS=0): masked SDPA per row (not batch-invariant)."""
        _, N, H, hd = q.shape
        out = q.new_empty((N, H, hd))
        for row in torch.unique(self.rows).tolist():
            at = (self.rows == row).nonzero()[:, 0]
            pos = self.positions[at][None]  # (1, t)
            S = int(pos.max()) + 1
            qr = q[0, at].transpose(0, 1)[None]  # (1, H, t, hd)
            res = masked_attention(qr, kc[row : row + 1, :, :S], vc[row : row + 1, :, :S], pos, window, kc.shape[1] != H, scale)
            out[at] = res[0].transpose(0, 1)
        return out.view(1, N, H * hd)


def native_attention(
    kernels, q: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None
) -> torch.Tensor:
    """attention.c for tokens q (N, H, hd): token t attends to keys 0..positions[t] (the last `window`
    of them) of row rows[t] of k, v (B, Hkv, S, hd), the key at index s being position s.
    Returns (N, H, hd). Each (token, head) is summed in one written order, the same bits with or
    without AVX-512 and whatever the batch or chunking (attention.c)."""
    qc, rows, positions = q.contiguous(), rows.contiguous(), positions.contiguous()  # held: the call reads them
    if k.stride(-1) != 1 or k.stride() != v.stride():  # one set of strides for both (a cache's already are)
        k, v = k.contiguous(), v.contiguous()
    out = torch.empty_like(qc)
    N, H, hd = qc.shape
    sb, sh, ss, _ = k.stride()
    status = kernels.attn_tokens_f32(
        qc.data_ptr(), rows.data_ptr(), positions.data_ptr(), k.data_ptr(), v.data_ptr(), sb, sh, ss,
        N, H, k.shape[1], hd, window or 0, scale or 0.0, out.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"not enough memory for the attention scratch of {N} tokens")
    return out


@dataclass
class Step:
    """One forward's view of the sequence, shared by every layer."""

    positions: torch.Tensor  # (B, T) absolute positions of the new tokens
    cache: KVCache | None
    uniform: bool  # every row's queries start right after keys 0..: SDPA's causal flag is a full-attention mask
    span: int  # keys 0..span-1 exist after this step
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # spec.rope -> cos, sin (B, T, rot)
    packed: Packed | None = None  # a packed step (forward_packed): B = 1, tokens of many rows
    kernels: object | None = None  # the native kernels: attention runs on attention.c (float32, CPU)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None, want_probs: bool):
        """A layer's cache write and attention: q (B, T, H, hd), k, v (B, T, Hkv, hd) after rope.
        Returns (B, T, H * hd) and the probabilities when want_probs (never on a packed step)."""
        B, T, H, hd = q.shape
        if self.packed is not None:
            return self.packed.attend(self.cache, layer, q, k, v, window, scale), None
        qt, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if self.cache is not None:
            k, v = self.cache.update(layer, k, v, self.positions)  # (B, Hkv, S, hd)
        if not want_probs and runs_natively(self.kernels, q, k, v):
            # not SDPA: its CPU kernels sum in an order that depends on the ISA torch dispatches to
            # (AVX-512 or AVX2) and on the call's shapes, and a quantized model's 8-bit activation
            # rounding turns those last bits into different perplexities on different machines
            rows = torch.arange(B, device=q.device).repeat_interleave(T)
            out = native_attention(self.kernels, q.reshape(B * T, H, hd), rows, self.positions.reshape(-1), k, v, window, scale)
            return out.view(B, T, H * hd), None
        out, probs = attend(qt, k, v, self, window, want_probs, scale)
        return out.transpose(1, 2).reshape(B, T, H * hd), probs  # (B, T, H*hd)

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
    _kernels = None  # the native kernels (use_kernels): every step's attention runs on attention.c

    def use_kernels(self, kernels) -> None:
        self._kernels = kernels

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
        """A whole one-token step over all blocks in native code, or None to run the torch blocks.
        x: (B, 1, d), one token for each of the rows 0..B-1 of step.cache (the whole cache)."""
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
        step = Step(positions, cache, uniform, span, self.rope_tables(positions, x.dtype), kernels=self._kernels)
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

    @torch.no_grad()
    def forward_packed(self, ids: torch.Tensor, rows: torch.Tensor, cache: KVCache, logits_at: torch.Tensor) -> torch.Tensor:
        """One scheduler step: ids (N,) of many sequences, token t the next one of cache row rows[t].

        Rows ascend and a row's tokens are consecutive in ids, continuing it from cache.lengths[row]. Returns the
        logits (len(logits_at), V) of the tokens at indices `logits_at`, and advances each row by
        its number of tokens. When every token is the only one of its row and the rows are
        0..N-1 (a pure decode step), the native block step runs it if the family has one: it
        gives the same bits as the torch blocks (attention.c's row function, torch's rope order).
        """
        N = ids.shape[0]
        # The bookkeeping and a native decode step run torch on this thread alone (serial_torch_ops:
        # small ops, and a parallel one would leave torch's threads spinning on the kernels' cores).
        with serial_torch_ops():
            # a pure decode step (one token in each of rows 0..N-1, the common one) needs none of
            # the packing bookkeeping: its positions are the rows' lengths (0.25 ms of SmolLM2's 8 ms token)
            decoding = N <= cache.batch_size and torch.equal(rows, torch.arange(N, device=rows.device))
            if decoding:
                positions = cache.lengths[:N].clone()
            else:
                counts = torch.bincount(rows, minlength=cache.batch_size)  # (batch,) tokens per row
                starts = torch.cumsum(counts, 0) - counts  # index of each row's first token (rows are consecutive)
                positions = cache.lengths[rows] + (torch.arange(N, device=ids.device) - starts[rows])  # (N,)
            need = int(positions.max()) + 1
            if need > cache.max_len:
                raise ContextLengthError(f"the sequence needs {need} positions but the cache holds {cache.max_len}", "shorten the prompt or lower --max-tokens")
            cache.reserve(need, N if decoding else int(rows.max()) + 1)
            self.check_length(need)
            x = self.embed(ids[None])  # (1, N, d)
            native = None
            if decoding and self._kernels is not None and x.dtype == torch.float32:
                decode_positions = positions[:, None]  # (N, 1)
                step = Step(decode_positions, cache, False, need, self.rope_tables(decode_positions, x.dtype))
                native = self.decode_natively(self.add_positions(x.view(N, 1, -1), decode_positions), step)
        if native is not None:
            x = native.view(1, N, -1)
        else:
            x = self.add_positions(x, positions[None])
            packed = Packed(rows, positions, self._kernels)
            step = Step(positions[None], cache, False, need, self.rope_tables(positions[None], x.dtype), packed)
            for block in self.blocks():
                x, _ = block(x, step, False)
        with serial_torch_ops():
            h = self.final_norm(x[0, logits_at])  # (M, d): a row-wise norm, so only the rows asked for
            if decoding:
                cache.lengths[:N] += 1
            else:
                cache.lengths += counts
        return self.output(h)


def layer_specs(config, rope: str | None = "inv_freq") -> list[AttentionSpec]:
    """Per layer from config.layer_types (HF's names): sliding_attention layers get config.sliding_window;
    without layer_types every layer gets config.sliding_window (None: full attention)."""
    if config.layer_types is None:
        return [AttentionSpec(config.sliding_window, rope)] * config.num_hidden_layers  # one window (or none) for all
    types = config.layer_types
    return [AttentionSpec(config.sliding_window if kind == "sliding_attention" else None, rope) for kind in types]
