"""load_model: a path (HF directory or .gguf file) -> config, module with weights, tokenizer.

The only place that puts readers, architectures and tokenizers together. Catalogue names are
resolved before this (llmcli.catalog), so the core never touches the cache or the network.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llmcli.core.config import ModelConfig
from llmcli.core.models import family_module
from llmcli.core.models.registry import REDOWNLOAD_HF, check_sizes
from llmcli.core.tokenizer import Tokenizer, load_tokenizer
from llmcli.errors import ModelError, UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    config: ModelConfig
    module: torch.nn.Module
    tokenizer: Tokenizer
    path: Path
    dtype: torch.dtype
    device: torch.device
    quantize: str | None = None

    @property
    def name(self) -> str:
        return self.path.stem if self.path.suffix == ".gguf" else self.path.name


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown --dtype {name!r}", f"use one of {', '.join(DTYPES)}") from None


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA device is available", "use --device cpu")
        return torch.device("cuda")
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError("--device mps but MPS is not available", "use --device cpu")
        return torch.device("mps")
    raise UsageError(f"unknown --device {name!r}", "use cpu, cuda or mps")


def read_config(path: Path) -> ModelConfig:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path} has no config.json", "an HF-format model directory needs config.json, tokenizer.json and *.safetensors")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_file} is not valid JSON ({exc})", "restore the file from the model's source") from None
    return ModelConfig.from_dict(raw, source=str(config_file))


def load_model(
    path: Path | str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    cache_dir: Path | str | None = None,
) -> LoadedModel:
    """Read a checkpoint into the fast inference layout (fused projections; GGML blocks for a GGUF's
    quantized tensors and for an HF model's linear layers with quantize="q4_k", "q8_0", ...).

    A GGUF's tensors stay in the file: the model is built on the meta device, each linear layer
    becomes the format its tensor's type names (llmcli.core.formats), and the blocks are mapped in
    without a copy. cache_dir holds the compiled kernels and the GGUF tokenizers; nothing of the
    weights is ever cached.
    """
    from llmcli.core import weights

    path = Path(path)
    torch_dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    torch_device = resolve_device(device) if isinstance(device, str) else device
    if not path.exists():
        raise ModelError(f"model path {path} does not exist", "give a catalogue name (see `llmcli models`), an HF-format directory or a .gguf file")
    fmt = check_quantize(quantize, torch_dtype, torch_device)
    is_gguf = path.is_file() and path.suffix == ".gguf"
    if cache_dir is not None:
        from llmcli.tempfiles import remove_dead_tmp, remove_stale_cache

        for folder in ("kernels", "tokenizers"):  # what loads killed mid-write left behind
            remove_dead_tmp(Path(cache_dir) / folder)
        remove_stale_cache(Path(cache_dir))  # the float32 weights caches of older versions
    native = torch_device.type == "cpu" and torch_dtype == torch.float32
    kernels = None
    if native:
        from llmcli.core.kernels import load_kernels

        kernels = load_kernels(Path(cache_dir) / "kernels" if cache_dir is not None else None)
    if is_gguf:
        config, module = _load_gguf(path, torch_dtype, kernels)
    elif path.is_dir():
        config = read_config(path)
        tensors = weights.read_safetensors(path)
        check_sizes(config, tensors, str(path / "config.json"), REDOWNLOAD_HF)
        family = family_module(config)
        with torch.device("meta"), _skip_init():
            module = family.Model(config)
        weights.load_state(module, family.sanitize(tensors, config), str(path), torch_dtype)
        del tensors  # the module holds the only references now, so fusing does not keep two copies
        _rebuild_meta_buffers(module, family, config)
    else:
        raise ModelError(
            f"{path} is neither an HF-format directory nor a .gguf file",
            "supported formats: safetensors (HF directory) and GGUF; pickled .bin/.pt/.pth files are never loaded",
        )
    if hasattr(module, "fuse"):
        module.fuse()
    module = module.to(torch_device).eval()
    if native:
        _use_kernels(module, kernels, fmt)
    tokenizer = load_tokenizer(path, cache_dir=Path(cache_dir) / "tokenizers" if cache_dir is not None else None)
    return LoadedModel(config=config, module=module, tokenizer=tokenizer, path=path, dtype=torch_dtype, device=torch_device, quantize=quantize)


def check_quantize(scheme: str | None, dtype: torch.dtype, device: torch.device):
    """The GGMLType a --quantize value asks for (None for none); a UsageError for what cannot be done."""
    from llmcli.core.formats import quantize_format

    fmt = quantize_format(scheme)
    if fmt is not None and (device.type != "cpu" or dtype != torch.float32):
        raise UsageError(f"--quantize {scheme} runs on the CPU in float32", f"use --device cpu --dtype float32 with --quantize {scheme}")
    return fmt


def _load_gguf(path: Path, dtype: torch.dtype, kernels) -> tuple[ModelConfig, torch.nn.Module]:
    """Build on the meta device, swap each linear layer (and the embedding) for its tensor's format,
    map the blocks in, and load the float tensors (norms, biases, F32 weights: views into the file)."""
    from torch import nn

    from llmcli.core import weights
    from llmcli.core.formats import BlockEmbedding, BlockLinear

    mapped = weights.map_gguf(path)
    config = mapped.config
    family = family_module(config)
    with torch.device("meta"), _skip_init():
        module = family.Model(config)
    floats: dict[str, torch.Tensor] = {}
    embedding = None
    for name, t in mapped.tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = _find_submodule(module, owner_name)
        blocks = t.gtype.name != "F32" and leaf == "weight" and len(t.shape) == 2
        if blocks and type(owner) is nn.Linear:
            _check_shape(t, (owner.out_features, owner.in_features), name, path)
            bias = None if owner.bias is None else owner.bias  # a meta placeholder that load_state fills
            module.set_submodule(owner_name, BlockLinear(t.gtype, t.raw, owner.in_features, bias, kernels))
        elif blocks and type(owner) is nn.Embedding:
            _check_shape(t, (owner.num_embeddings, owner.embedding_dim), name, path)
            embedding = BlockEmbedding(t.gtype, t.raw, owner.embedding_dim, kernels)
            module.set_submodule(owner_name, embedding)
        else:
            floats[name] = t.dequantize()  # F32: a view into the file; otherwise a small 1-D tensor
    weights.load_state(module, floats, str(path), dtype)  # a GGUF's names are the model's already (its family's GGUF_NAMES)
    del floats
    _rebuild_meta_buffers(module, family, config)
    rope_freqs = mapped.extra.get("rope_freqs.weight")
    if rope_freqs is not None:
        # llama3-style GGUFs carry their rope scaling as per-frequency divisors instead of config fields
        module.inv_freq = module.inv_freq / rope_freqs.dequantize().float()
    if embedding is not None and getattr(module, "lm_head", False) is None:
        module.lm_head = embedding.as_linear()  # tied: the output projection multiplies with the same blocks
    return config, module


def _find_submodule(module: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None  # load_state names the tensor that has no place in the model


def _check_shape(t, want: tuple[int, ...], name: str, path: Path) -> None:
    if tuple(t.shape) != want:
        raise ModelError(
            f"tensor {name} ({t.name}) in {path} has shape {tuple(t.shape)} but the model expects {want}",
            "the weights do not match the GGUF's metadata; download or convert the model again",
        )


def _use_kernels(module: torch.nn.Module, kernels, fmt) -> None:
    """Put the float linear layers on the native kernels, or quantize them to `fmt` (a GGMLType)."""
    from llmcli.core.kernels.linear import accelerate_linears, share_tied_embedding

    tied = None
    if hasattr(module, "untie_output") and (kernels is not None or fmt is not None):
        if getattr(module, "lm_head", False) is None:
            module.untie_output()  # the output projection is the largest matrix: it gets the kernel too
            tied = module.lm_head.weight
    accelerate_linears(module, kernels, fmt)
    if tied is not None:
        share_tied_embedding(module, tied)  # one copy of the matrix, not two
    if kernels is not None and hasattr(module, "use_kernels"):
        module.use_kernels(kernels)


@contextlib.contextmanager
def _skip_init():
    """Build modules without running their random initialisers (transformers' no_init_weights).

    The weights are overwritten by the checkpoint anyway, and on the meta device torch routes
    the initialisers through its reference implementations, which import the compiler stack
    (seconds of start-up for nothing).
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "trunc_normal_", "zeros_", "ones_", "constant_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _rebuild_meta_buffers(module: torch.nn.Module, family, config: ModelConfig) -> None:
    """Buffers computed at construction (rope frequencies) are not in checkpoints: build them for real."""
    meta = [name for name, buf in module.named_buffers() if buf.is_meta]
    if not meta:
        return
    built = family.build_buffers(config)
    for name in meta:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._buffers[leaf] = built[name]
