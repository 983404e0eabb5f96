"""The Llama family: Llama 2/3 (incl. llama3 rope scaling), SmolLM2, Mistral (sliding window), Qwen2
(qkv bias), and the llama-shaped blocks that qwen3.py, gemma3.py and phi3.py subclass.

Parameter names equal the HF checkpoint keys (`model.layers.0.self_attn.q_proj.weight`, ...), so
loading is a loop with a shape check. GQA through SDPA's enable_gqa; a slow eager attention
path (base.reference_attention), kept beside the fast one, returns the probabilities when they
are asked for.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.core.config import ModelConfig
from llmcli.core.formats import fuse_linears
from llmcli.core.models.base import TANH_GELU, KVCache, activation, runs_natively
from llmcli.core.models.decoder import AttentionSpec, Decoder, Step, apply_rope, layer_specs
from llmcli.core.models.registry import LLAMA_NAMES, MetadataGetter, gguf_rope_scaling, rope_dimensions
from llmcli.errors import ModelError

# The family's own config fields (HF names where HF has one) and their defaults; ModelConfig.args.
ARGS: dict[str, Any] = {
    "o_proj_bias": None,  # llmcli's: whether o_proj has a bias when it differs from attention_bias (Qwen2: False)
}
CAUSAL = True


def rope_inv_freq(config: ModelConfig, theta: float | None = None, scaling: dict | None = None, dim: int | None = None) -> torch.Tensor:
    """Inverse frequencies (dim/2,), with HF's rope_scaling types default, linear and llama3.

    theta, scaling, dim default to the config's rope_theta, rope_scaling and head_dim; a family
    with another rope per layer (Gemma 3's local layers) or partial rotary passes its own.
    """
    dim = dim or config.head_dim
    theta = config.rope_theta if theta is None else theta
    # explicitly on the CPU: models are built on the meta device, where this would be a placeholder
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = (config.rope_scaling if scaling is None else scaling) or {}
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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = None  # set by Model.use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_natively(self.kernels, x):
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
    def __init__(self, config: ModelConfig, layer: int, spec: AttentionSpec):
        super().__init__()
        self.layer = layer
        self.spec = spec
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale: float | None = None  # the query scale; None: 1/sqrt(head_dim)
        qkv_bias = config.attention_bias
        o_bias = config.args.get("o_proj_bias")
        o_bias = qkv_bias if o_bias is None else o_bias
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

    def forward(self, x: torch.Tensor, step: Step, want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        cos, sin = step.rope[self.spec.rope]  # (B, T, rot)
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
        if step.packed is not None:  # a packed step: rope, cache write and attention in one native call where it can
            out = step.packed.attend_unroped(step.cache, self.layer, qk, v, cos, sin, nq, self.spec.window, self.scale)
            if out is not None:
                return self.o_proj(out), None
        qk = apply_rope(qk, cos[:, :, None], sin[:, :, None])  # rope on q and k heads in one go
        out, probs = step.attend(self.layer, qk[:, :, :nq], qk[:, :, nq:], v, self.spec.window, self.scale, want_probs)  # (B, T, H*hd)
        return self.o_proj(out), probs


# hidden_act -> the native kernel for act(gate) * up: matvec.c's silu, activations.c's tanh gelu
# (the one order on every ISA; torch's tanh depends on the vector library it dispatches to)
NATIVE_GATED = {"silu": "silu_mul_f32", "swish": "silu_mul_f32", **dict.fromkeys(TANH_GELU, "gelu_tanh_mul_f32")}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse()
        self.act = activation(config.hidden_act)
        self.native_act = NATIVE_GATED.get(config.hidden_act)  # the kernel computing act(gate) * up, if any
        self.kernels = None  # set by Model.use_kernels when native_act is not None

    def fuse(self) -> None:
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None and self.kernels is not None and x.dtype == torch.float32:
            gate_up = self.gate_up_proj(x).contiguous()  # (..., 2 I)
            inter = gate_up.shape[-1] // 2
            h = torch.empty((*gate_up.shape[:-1], inter), dtype=torch.float32)
            getattr(self.kernels, self.native_act)(gate_up.data_ptr(), h.data_ptr(), gate_up.numel() // gate_up.shape[-1], inter)
            return self.down_proj(h)
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    attention_cls: type[Attention] = Attention
    mlp_cls: type[nn.Module] = MLP

    def __init__(self, config: ModelConfig, layer: int, spec: AttentionSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self.attention_cls(config, layer, spec)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = self.mlp_cls(config)

    def forward(self, x: torch.Tensor, step: Step, want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, probs = self.self_attn(self.input_layernorm(x), step, want_probs)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, probs


class Backbone(nn.Module):
    """HF's `model.` prefix: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig, block: type[Block], specs: list[AttentionSpec]):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(block(config, i, spec) for i, spec in enumerate(specs))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Model(Decoder):
    """The decoder every llama-shaped family runs; a family subclass swaps the block (or its
    attention) and says whether matvec.c's fused decode block (which knows llama's block exactly:
    RMSNorm, rope on whole heads, SiLU gate, one window for every layer) may run it."""

    block: type[Block] = Block
    native_decode = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.specs = self.attention_specs(config)
        self.model = Backbone(config, self.block, self.specs)
        # tied checkpoints have no lm_head tensor: logits reuse the embedding matrix
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for name, buf in self.rope_buffers(config).items():
            self.register_buffer(name, buf, persistent=False)
        self._kernels = None
        self._blocks_desc = None  # matvec.c's view of the blocks (pointers into the weights), built on first use

    @classmethod
    def attention_specs(cls, config: ModelConfig) -> list[AttentionSpec]:
        """Per layer: its window (Mistral: every layer; none in Llama) and its rope."""
        return layer_specs(config)

    @classmethod
    def rope_buffers(cls, config: ModelConfig) -> dict[str, torch.Tensor]:
        """The rope inverse frequencies each AttentionSpec.rope names, computed (never in checkpoints)."""
        return {"inv_freq": rope_inv_freq(config)}

    # ------------------------------------------------------------ decoder hooks

    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)

    def decode_natively(self, x: torch.Tensor, step: Step) -> torch.Tensor | None:
        blocks = self._native_blocks()
        if blocks is None:
            return None
        cos, sin = step.rope["inv_freq"]
        return self._decode_blocks(blocks, x, cos, sin, step.positions, step.cache)

    # ------------------------------------------------------------ helpers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def fuse(self) -> None:
        """The fast inference layout: fused QKV and gate/up projections. Results are unchanged."""
        for block in self.model.layers:
            block.self_attn.fuse()
            block.mlp.fuse()

    def use_kernels(self, kernels) -> None:
        """Run norms, the gated MLP activation and whole decode steps on the native kernels (float32, CPU)."""
        self._kernels = kernels
        self._blocks_desc = None
        for module in self.modules():
            if isinstance(module, RMSNorm) or (isinstance(module, MLP) and module.native_act is not None):
                module.kernels = kernels

    def _native_blocks(self):
        """Every block described for matvec.c's decode_blocks_f32, or None when some part is not native."""
        if self._kernels is None or not self.native_decode or len(set(self.specs)) != 1 or self.specs[0].rope != "inv_freq":
            return None
        if self._blocks_desc is None:
            from llmcli.core.formats import describe
            from llmcli.core.kernels import BlockDesc

            described = []
            for block in self.model.layers:
                attn, mlp = block.self_attn, block.mlp
                parts = [describe(p) if p is not None else None for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
                if any(p is None for p in parts) or mlp.kernels is None or mlp.native_act != "silu_mul_f32":  # the fused block knows silu only
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
            self.specs[0].window or 0, cos1.data_ptr(), sin1.data_ptr(), pos.data_ptr(), kcs, vcs, sb, sh, ss,
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


# llama.cpp tensor names -> this family's parameter names
GGUF_NAMES = LLAMA_NAMES
# GGUF architectures whose Q/K rows convert_hf_to_gguf.py permuted for llama.cpp's NORM rope
# (adjacent pairs); the others (qwen2) use NEOX rope, HF's halves, and are stored as they are
GGUF_PERMUTED_QK = ("llama",)


def prepare_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """config.json fields (HF names) -> those ModelConfig takes, for the llama-shaped families."""
    if data["model_type"] == "qwen2":
        data["attention_bias"] = True  # Qwen2 always has q/k/v biases (and none on o_proj); its config does not say so
        data["o_proj_bias"] = False
    return uniform_window(known_rope(data, source), source)


def gguf_config(data: dict[str, Any], get: MetadataGetter, shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, Any]:
    """GGUF metadata a llama-shaped family reads beyond the shared keys (models/registry.config_from_gguf).

    A Mistral converted as arch llama carries its window in llama.attention.sliding_window.
    """
    rope_dimensions(get, data["head_dim"], source, get.arch)
    window = get("attention.sliding_window")
    qkv_bias, o_bias = "blk.0.attn_q.bias" in shapes, "blk.0.attn_output.bias" in shapes
    data.update(
        intermediate_size=int(get("feed_forward_length", required=True)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=gguf_rope_scaling(get),
        attention_bias=qkv_bias,
        o_proj_bias=None if o_bias == qkv_bias else o_bias,
        mlp_bias="blk.0.ffn_up.bias" in shapes,
        hidden_act="silu",
        sliding_window=int(window) if window else None,
    )
    return data


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
    from llmcli.core.models.registry import family_of

    return family_of(config.model_type).Model.rope_buffers(config)


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
