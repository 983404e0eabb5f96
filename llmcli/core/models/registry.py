"""The family registry: which family file runs a checkpoint, and the GGUF metadata every family shares.

Keyed by what a checkpoint says about itself: an HF config.json's `model_type`, a GGUF's
`general.architecture` (llama.cpp's name). A family is one module in core/models; adding one is
a line in each table here (docs/architectures.md). Nothing in this module knows a family's quirks:
`config_from_gguf` reads the keys every llama.cpp architecture writes and hands the rest to the
family's own `gguf_config`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Iterable

from llmcli.errors import ModelError

# model_type -> the architecture family file in core/models that runs it.
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "qwen3",
    "smollm2": "llama",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "bert": "bert",
}

# GGUF general.architecture (llama.cpp's names) -> the model_type it stands for.
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "bert": "bert",
}


def family_name(model_type: str) -> str:
    """The family file in core/models that runs model_type; unknown ones fail with the supported list."""
    if model_type not in FAMILIES:
        raise ModelError(f"unknown architecture {model_type!r}", f"supported model types: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def family_of(model_type: str) -> ModuleType:
    """The family module (core/models/<family>.py) that runs model_type."""
    return importlib.import_module(f"llmcli.core.models.{family_name(model_type)}")


def family_chat_template(architecture: str | None) -> str | None:
    """The chat template a GGUF of this llama.cpp architecture falls back to when it carries none
    (the family's CHAT_TEMPLATE: Gemma 3's turn format), or None."""
    model_type = GGUF_ARCHITECTURES.get(architecture or "")
    if model_type is None:
        return None
    return getattr(family_of(model_type), "CHAT_TEMPLATE", None)


class MetadataGetter:
    """get(key) -> the GGUF value of `<arch>.<key>` (default when absent; required: a one-line error naming the key)."""

    def __init__(self, metadata: dict[str, Any], arch: str, source: str):
        self.metadata, self.arch, self.source = metadata, arch, source

    def __call__(self, key: str, default: Any = None, required: bool = False) -> Any:
        value = self.metadata.get(f"{self.arch}.{key}", default)
        if required and value is None:
            raise ModelError(f"{self.source} lacks the metadata key {self.arch}.{key}", "convert the model again with llama.cpp's convert_hf_to_gguf.py")
        return value


def config_from_gguf(metadata: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]] | None = None, source: str = "GGUF"):
    """ModelConfig (HF field names) from GGUF metadata; tensor_shapes are GGUF names -> torch-order shapes.

    The keys every llama.cpp architecture writes are read here; the family's `gguf_config(data,
    get, shapes, source)` adds or overrides its own (window patterns, rope bases, activations).
    """
    from llmcli.core.config import ModelConfig

    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelError(
            f"{source} has architecture {arch!r}, which llmcli cannot run from GGUF",
            f"supported GGUF architectures: {', '.join(GGUF_ARCHITECTURES)}",
        )
    shapes = tensor_shapes or {}
    get = MetadataGetter(metadata, arch, source)
    try:
        hidden = int(get("embedding_length", required=True))
        heads = int(get("attention.head_count", required=True))
        kv_heads = get("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):
            raise ModelError(f"{source}: {arch}.attention.head_count_kv differs per layer, which is not supported", "llmcli supports one KV head count for all layers")
        head_dim = int(get("attention.key_length", hidden // heads))

        if "token_embd.weight" in shapes:
            vocab = shapes["token_embd.weight"][0]
        elif "tokenizer.ggml.tokens" in metadata:
            vocab = len(metadata["tokenizer.ggml.tokens"])
        else:
            vocab = get("vocab_size", required=True)

        eos = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            if metadata.get(key) is not None and int(metadata[key]) not in eos:
                eos.append(int(metadata[key]))
        bos = metadata.get("tokenizer.ggml.bos_token_id")
        pad = metadata.get("tokenizer.ggml.padding_token_id")
        data: dict[str, Any] = dict(
            model_type=GGUF_ARCHITECTURES[arch],
            vocab_size=int(vocab),
            hidden_size=hidden,
            num_hidden_layers=int(get("block_count", required=True)),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=head_dim,
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in shapes if shapes else False,
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=eos,
            pad_token_id=None if pad is None else int(pad),
        )
        family = family_of(data["model_type"])
        data = family.gguf_config(data, get, shapes, source)
        config = ModelConfig.build(data, family)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
        # a value of the wrong type (a string or a list where a count belongs), or a zero count
        raise ModelError(f"{source} has GGUF metadata llmcli cannot read ({exc})", REDOWNLOAD_GGUF) from None
    check_sizes(config, shapes, source)
    return config


REDOWNLOAD_GGUF = "the file is damaged or was not written by llama.cpp's converter; download it again"
# Far above any released model, far below what a lying header could make llmcli build.
SIZE_LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 17, "num_hidden_layers": 1 << 12, "num_attention_heads": 1 << 12,
               "num_key_value_heads": 1 << 12, "head_dim": 1 << 14, "max_position_embeddings": 1 << 24}


REDOWNLOAD_HF = "its config.json does not describe the weights beside it; download the model again"


def check_sizes(config, names: Iterable[str], source: str, hint: str = REDOWNLOAD_GGUF) -> None:
    """The sizes a GGUF's metadata or an HF directory's config.json declares, checked before any
    module is built from them: whole positive numbers within SIZE_LIMITS, heads in whole groups,
    and no more layers than the weights hold tensors for (a lying block_count or
    num_hidden_layers would otherwise build millions of layers). names: the weights' tensor names,
    whose first all-digit part is the layer (GGUF blk.N.*, HF model.layers.N.*, h.N.*, layer.N.*)."""
    for key, limit in SIZE_LIMITS.items():
        value = getattr(config, key, None)
        if value is None and key == "head_dim":
            continue
        if type(value) is not int or not 1 <= value <= limit:
            raise ModelError(f"{source} declares {key}={value!r}, not a whole number from 1 to {limit}", hint)
    if config.num_attention_heads % config.num_key_value_heads:
        raise ModelError(f"{source} declares {config.num_attention_heads} attention heads in groups of {config.num_key_value_heads} KV heads, which do not divide", hint)
    names = list(names)
    layers = {next((part for part in name.split(".") if part.isdigit()), None) for name in names} - {None}
    if names and config.num_hidden_layers > len(layers):  # no names: only the metadata is read
        raise ModelError(f"{source} declares {config.num_hidden_layers} layers but holds tensors for {len(layers)}", hint)


def rope_dimensions(get: MetadataGetter, head_dim: int, source: str, arch: str) -> None:
    """Refuse a GGUF that rotates only part of each head, for the families that rotate whole heads."""
    rope_dim = get("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ModelError(f"{source}: {arch}.rope.dimension_count={rope_dim} rotates part of the {head_dim} head dimensions, which this family does not", "use a GGUF converted by llama.cpp's convert_hf_to_gguf.py from the original model")


def gguf_rope_scaling(get: MetadataGetter) -> dict[str, Any] | None:
    """rope.scaling.* keys -> HF's rope_scaling dict (linear, llama3 comes as rope_freqs.weight), or None."""
    scaling_type = get("rope.scaling.type")
    factor = get("rope.scaling.factor", get("rope.scale_linear"))
    if scaling_type is None and factor is not None and get("rope.scale_linear") is not None:
        scaling_type = "linear"
    if scaling_type in (None, "none") or factor is None:
        return None
    rope_scaling = {"rope_type": scaling_type, "factor": float(factor)}
    original = get("rope.scaling.original_context_length")
    if original is not None:
        rope_scaling["original_max_position_embeddings"] = int(original)
    return rope_scaling


# llama.cpp tensor names -> HF llama names, the map most decoder families start from ({i}: the block)
LLAMA_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LLAMA_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GGUFNames:
    """A family's GGUF tensor names: llama.cpp's global and per-block stems -> the model's parameter names."""

    def __init__(self, global_names: dict[str, str], block_names: dict[str, str], block_prefix: str = "model.layers", extra: tuple[str, ...] = ()):
        self.global_names = global_names
        self.block_names = block_names
        self.block_prefix = block_prefix
        self.extra = extra  # tensors with no parameter of their own, kept under their GGUF names (rope_freqs.weight)

    def hf_name(self, gguf_name: str) -> str | None:
        """The model's name for a llama.cpp tensor name, or None when it has none."""
        stem, _, kind = gguf_name.rpartition(".")
        if kind not in ("weight", "bias"):
            return None
        if stem in self.global_names:
            return f"{self.global_names[stem]}.{kind}"
        parts = stem.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in self.block_names:
            return f"{self.block_prefix}.{parts[1]}.{self.block_names[parts[2]]}.{kind}"
        return None


LLAMA_NAMES = GGUFNames(LLAMA_GLOBAL_NAMES, LLAMA_BLOCK_NAMES, extra=("rope_freqs.weight",))
