"""ModelConfig: one architecture-independent description of a checkpoint, in HF field names.

Built from an HF config.json (unknown keys ignored, aliases mapped, like mlx-lm's
ModelArgs.from_dict) or from GGUF metadata (models/registry.config_from_gguf). The fields here are
the ones every family reads; a family's own fields (Gemma 3's query_pre_attn_scalar, ...) are
declared by its file (`ARGS`, HF names and defaults) and kept in `args`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from llmcli.core.models.registry import FAMILIES, GGUF_ARCHITECTURES, family_name, family_of  # noqa: E402,F401  (the registry's tables, importable from here too)
from llmcli.errors import ModelError

# GPT-2 style names for the same fields.
_ALIASES = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_positions": "max_position_embeddings",
    "n_inner": "intermediate_size",
    "layer_norm_epsilon": "layer_norm_eps",
    "activation_function": "hidden_act",
}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    type_vocab_size: int = 2
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer: "full_attention" or "sliding_attention" (HF's field)
    architectures: list[str] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)  # the family's own fields (its ARGS), HF names

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        elif self.eos_token_id is None:
            self.eos_token_id = []

    @property
    def family(self) -> str:
        return family_name(self.model_type)

    @property
    def is_encoder(self) -> bool:
        return not family_of(self.model_type).CAUSAL

    @property
    def is_causal(self) -> bool:
        return not self.is_encoder

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        data = {}
        for key, value in raw.items():
            data[_ALIASES.get(key, key)] = value
        if "rope_parameters" in data and not data.get("rope_scaling"):
            # transformers >= 5 writes rope settings under rope_parameters
            params = dict(data["rope_parameters"] or {})
            if "rope_theta" in params:
                data.setdefault("rope_theta", params["rope_theta"])
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type not in (None, "default"):
                data["rope_scaling"] = params
        if "model_type" not in data:
            raise ModelError(f"{source} has no model_type", "use a config.json saved by transformers")
        # the family reads its own fields: defaults its config leaves unsaid, variants it refuses
        family = family_of(data["model_type"])
        data = family.prepare_config(data, source)
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in data]
        if missing:
            raise ModelError(f"{source} lacks {', '.join(missing)}", "use a config.json saved by transformers")
        return cls.build(data, family)

    @classmethod
    def build(cls, data: dict[str, Any], family) -> "ModelConfig":
        """The config from HF-named fields: the shared ones, and the family's ARGS (with their defaults) in `args`."""
        known = {f.name for f in fields(cls)} - {"args"}
        args = {key: data.get(key, default) for key, default in family.ARGS.items()}
        return cls(**{k: v for k, v in data.items() if k in known}, args=args)


def refuse_unsupported(data: dict[str, Any], supported: dict[str, Any], source: str) -> None:
    """A one-line error naming the first field whose value is not the one llmcli implements."""
    for key, expected in supported.items():
        if key in data and data[key] != expected:
            raise ModelError(f"{source}: {key}={data[key]!r} is not supported", f"llmcli implements {key}={expected!r}")
