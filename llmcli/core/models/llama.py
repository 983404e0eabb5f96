"""The Llama family: Llama 2/3 (incl. llama3 rope scaling), SmolLM2, Mistral, Qwen2 (qkv bias),
and the shared decoder that llama-shaped families (qwen3.py) subclass.

Parameter names equal the HF checkpoint keys (`model.layers.0.self_attn.q_proj.weight`, ...), so
loading is a loop with a shape check. GQA through SDPA's enable_gqa; a slow eager attention
path (base.reference_attention), kept beside the fast one, returns the probabilities when they
are asked for.
"""

from __future__ import annotations

import math
from typing import Any, Collection

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.core.config import ModelConfig
from llmcli.core.formats import fuse_linears
from llmcli.core.models.base import ForwardOutput, KVCache, causal_mask, masked_attention, reference_attention
from llmcli.errors import ModelError


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (D/2,), with HF's rope_scaling types default, linear and llama3."""
    dim = config.head_dim
    # explicitly on the CPU: models are built on the meta device, where this would be a placeholder
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        old_context = float(scaling.get("original_max_position_embeddings", 8192))
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ModelError(f"unsupported rope_scaling type {kind!r}", f"supported: {', '.join(ROPE_TYPES)}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = None  # set by Model.use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            x = x.contiguous()
            out = torch.empty_like(x)
            self.kernels.rms_norm_f32(x.data_ptr(), self.weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], self.eps)
            return out
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op on the hot path
        # float32 statistics whatever the compute dtype, as HF does
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_window
        qkv_bias = config.attention_bias
        o_bias = config.attention_bias and config.model_type != "qwen2"
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=o_bias)
        self.qkv_proj: nn.Linear | None = None  # set by fuse(): one matmul instead of three
        self.split_sizes = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]

    def fuse(self) -> None:
        self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def norm_qk(self, qk: torch.Tensor) -> torch.Tensor:
        """A family's per-head normalisation of (B, T, nq + nkv, hd) queries and keys before rope; none in llama."""
        return qk

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        plain: bool,
        cache: KVCache | None,
        want_probs: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """plain: every row's queries start at key 0 with no window, so SDPA's own causal flag is the mask."""
        B, T, _ = x.shape
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, hd)
        nq, nk = self.n_heads, self.n_kv
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(B, T, nq + 2 * nk, self.head_dim)
            qk, v = qkv[:, :, : nq + nk], qkv[:, :, nq + nk :]
        else:
            q = self.q_proj(x).view(B, T, nq, self.head_dim)
            k = self.k_proj(x).view(B, T, nk, self.head_dim)
            qk = torch.cat((q, k), dim=2)
            v = self.v_proj(x).view(B, T, nk, self.head_dim)
        qk = self.norm_qk(qk)
        qk = qk * cos + rotate_half(qk) * sin  # rope on q and k heads in one go
        q, k = qk[:, :, :nq], qk[:, :, nq:]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, positions)  # (B, Hkv, S, hd)
        probs = None
        gqa = self.n_kv != self.n_heads
        if want_probs:
            out, probs = reference_attention(q, k, v, causal_mask(positions, k.shape[2], self.window))
        elif plain:
            # SDPA's causal path on the CPU works in tiles: no (T, T) scores for a long prompt
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            out = masked_attention(q, k, v, positions, self.window, gqa)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        return self.o_proj(out), probs


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse()
        self.kernels = None  # set by Model.use_kernels

    def fuse(self) -> None:
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None and self.kernels is not None and x.dtype == torch.float32:
            gate_up = self.gate_up_proj(x).contiguous()  # (..., 2 I)
            inter = gate_up.shape[-1] // 2
            h = torch.empty((*gate_up.shape[:-1], inter), dtype=torch.float32)
            self.kernels.silu_mul_f32(gate_up.data_ptr(), h.data_ptr(), gate_up.numel() // gate_up.shape[-1], inter)
            return self.down_proj(h)
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, attention: type[Attention] = Attention):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, positions, plain, cache, want_probs):
        a, probs = self.self_attn(self.input_layernorm(x), cos, sin, positions, plain, cache, want_probs)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, probs


class Backbone(nn.Module):
    """HF's `model.` prefix: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig, attention: type[Attention] = Attention):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, attention) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Model(nn.Module):
    """The decoder every llama-shaped family runs; a family subclass swaps the attention and says
    whether matvec.c's fused decode block (which knows llama's block exactly) may run it."""

    attention: type[Attention] = Attention
    native_decode = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config, self.attention)
        # tied checkpoints have no lm_head tensor: logits reuse the embedding matrix
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kernels = None
        self._blocks_desc = None  # matvec.c's view of the blocks (pointers into the weights), built on first use

    # ------------------------------------------------------------ helpers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def fuse(self) -> None:
        """The fast inference layout: fused QKV and gate/up projections. Results are unchanged."""
        for block in self.model.layers:
            block.self_attn.fuse()
            block.mlp.fuse()

    def use_kernels(self, kernels) -> None:
        """Run norms, the MLP activation and whole decode steps on the native kernels (float32, CPU)."""
        self._kernels = kernels
        self._blocks_desc = None
        for module in self.modules():
            if isinstance(module, RMSNorm) or (isinstance(module, MLP) and self.config.hidden_act == "silu"):
                module.kernels = kernels

    def _native_blocks(self):
        """Every block described for matvec.c's decode_blocks_f32, or None when some part is not native."""
        if self._kernels is None or not self.native_decode:
            return None
        if self._blocks_desc is None:
            from llmcli.core.formats import describe
            from llmcli.core.kernels import BlockDesc

            described = []
            for block in self.model.layers:
                attn, mlp = block.self_attn, block.mlp
                parts = [describe(p) if p is not None else None for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
                if any(p is None for p in parts) or mlp.kernels is None:
                    self._blocks_desc = False
                    return None
                norms = block.input_layernorm.weight.data_ptr(), block.post_attention_layernorm.weight.data_ptr()
                described.append(BlockDesc(*norms, *parts))
            self._blocks_desc = (BlockDesc * len(described))(*described)
        return self._blocks_desc or None

    def _decode_blocks(self, blocks, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """All blocks of a one-position step in one native call; writes the cache like the torch path."""
        import ctypes

        B, _, d = x.shape
        x = x.reshape(B, d).clone()  # the residual stream, updated in place by the kernel
        cos1, sin1 = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # (B, hd)
        pos = positions[:, 0].contiguous()
        L = len(cache.k)
        kcs = (ctypes.c_void_p * L)(*[k.data_ptr() for k in cache.k])
        vcs = (ctypes.c_void_p * L)(*[v.data_ptr() for v in cache.v])
        sb, sh, ss, _ = cache.k[0].stride()
        c = self.config
        status = self._kernels.decode_blocks_f32(
            blocks, L, x.data_ptr(), B, d, c.rms_norm_eps, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.sliding_window or 0, cos1.data_ptr(), sin1.data_ptr(), pos.data_ptr(), kcs, vcs, sb, sh, ss,
        )
        if status == -1:  # as torch does when an allocation fails
            raise MemoryError(f"not enough memory for a native decode step of {B} rows")
        if status != 0:
            raise RuntimeError(f"native decode step failed with status {status} (a weight kind or type this build cannot run)")
        return x.view(B, 1, d)

    def untie_output(self) -> None:
        """Give a tied model its own lm_head module (sharing the embedding tensor), so it can be quantized."""
        if self.lm_head is None:
            weight = self.model.embed_tokens.weight
            self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")  # no random init
            self.lm_head.weight = weight

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, hd) for absolute positions, looked up in a table grown on demand."""
        need = int(positions.max()) + 1
        table = self._rope_table
        if table is None or table[0].shape[0] < need or table[0].dtype != dtype or table[0].device != positions.device:
            size = max(need, 256 if table is None else 2 * table[0].shape[0])
            pos = torch.arange(size, device=positions.device)
            freqs = pos[:, None].float() * self.inv_freq.float()  # (S, hd/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
            table = self._rope_table = (emb.cos().to(dtype), emb.sin().to(dtype))
        return table[0][positions], table[1][positions]

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
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        B, T, _ = x.shape
        L = self.config.num_hidden_layers
        one_step = T == 1 and cache is not None and not output_hidden and not output_attentions and x.dtype == torch.float32
        blocks = self._native_blocks() if one_step else None  # a whole decode step in one native call
        window = self.config.sliding_window
        if cache is not None:
            positions = cache.positions(T)  # (B, T)
            # equal rows need no explicit mask: a fresh prefill is plain causal, a single step sees every key
            # (and the native step takes the positions themselves)
            plain = blocks is not None or (not window and (T == 1 or int(cache.lengths[0]) == 0) and bool((cache.lengths == cache.lengths[0]).all()))
        else:
            positions = torch.arange(T, device=x.device)[None, :].expand(B, T)
            plain = not (window and T > window)
        cos, sin = self.rope(positions, x.dtype)
        hidden: dict[int, torch.Tensor] = {}
        attentions: dict[int, torch.Tensor] = {}
        if 0 in output_hidden:
            hidden[0] = x
        if blocks is not None:
            x = self._decode_blocks(blocks, x, cos, sin, positions, cache)
        else:
            for i, block in enumerate(self.model.layers):
                want = i in output_attentions
                x, probs = block(x, cos, sin, positions, plain, cache, want)
                if want:
                    attentions[i] = probs
                if i + 1 in output_hidden and i + 1 != L:
                    hidden[i + 1] = x
        x = self.model.norm(x)
        if L in output_hidden:
            hidden[L] = x
        if cache is not None:
            cache.advance(attention_mask.sum(1) if attention_mask is not None else T)
        logits = None
        if compute_logits:
            h = x if logits_index is None else x[torch.arange(B, device=x.device), logits_index]  # (B, T, d) or (B, d)
            logits = F.linear(h, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)
        return ForwardOutput(last_hidden=x, logits=logits, hidden_states=hidden, attentions=attentions)


# llama.cpp tensor names of a block this family adds to weights' shared map (none: the shared map is llama's)
GGUF_BLOCK_NAMES: dict[str, str] = {}
# GGUF architectures whose Q/K rows convert_hf_to_gguf.py permuted for llama.cpp's NORM rope
# (adjacent pairs); the others (qwen2) use NEOX rope, HF's halves, and are stored as they are
GGUF_PERMUTED_QK = ("llama",)


def prepare_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """config.json fields (HF names) -> those ModelConfig takes, for the llama-shaped families."""
    if data["model_type"] == "qwen2":
        data["attention_bias"] = True  # Qwen2 always has q/k/v biases; its config does not say so
    return uniform_window(known_rope(data, source), source)


ROPE_TYPES = ("default", "linear", "llama3")  # the rope_scaling types rope_inv_freq computes


def known_rope(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Refuse a rope_scaling type rope_inv_freq does not compute, naming the file, at config time."""
    scaling = data.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in (None, *ROPE_TYPES):
        raise ModelError(f"{source}: rope_scaling type {kind!r} is not supported", f"supported: {', '.join(ROPE_TYPES)}")
    return data


def uniform_window(data: dict[str, Any], source: str) -> dict[str, Any]:
    """One sliding window for every layer, or none; per-layer windows (Qwen's max_window_layers) are refused.

    Qwen configs carry a sliding_window that applies only when use_sliding_window is true.
    """
    if data.get("use_sliding_window") is False:
        data["sliding_window"] = None
    same = "llmcli runs models whose layers all use the same attention (full, or one sliding window)"
    if data.get("use_sliding_window") and data.get("sliding_window") is not None:
        first = int(data.get("max_window_layers", 0))  # transformers' rule: layers from this one on slide
        if 0 < first < int(data.get("num_hidden_layers", 0)):
            raise ModelError(f"{source}: max_window_layers={first} with use_sliding_window=true (a window on some layers only) is not supported", same)
        if first >= int(data.get("num_hidden_layers", 0)):
            data["sliding_window"] = None
    kinds = set(data.get("layer_types") or ())
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise ModelError(f"{source}: layer_types={sorted(kinds)!r} is not supported", "supported: full_attention, sliding_attention")
    if len(kinds) > 1:
        raise ModelError(f"{source}: layer_types mixes full_attention and sliding_attention, which is not supported", same)
    if kinds == {"full_attention"}:
        data["sliding_window"] = None
    return data


def build_buffers(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The non-checkpoint buffers, for a model built on the meta device."""
    return {"inv_freq": rope_inv_freq(config)}


def sanitize(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF llama keys are already our names; drop what we compute ourselves or tie."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        out[name] = t
    return out
