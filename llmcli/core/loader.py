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
    """Read a checkpoint into the fast inference layout (fused projections; int8 with quantize="int8").

    With cache_dir, a GGUF's weights are kept there after the first load, dequantized to float32
    and already in the fused layout, as safetensors that later loads memory-map: dequantizing
    and fusing cost seconds and a second copy of the weights on every start otherwise.
    """
    from llmcli.core import weights
    from llmcli.core.quantize import check_scheme

    path = Path(path)
    torch_dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    torch_device = resolve_device(device) if isinstance(device, str) else device
    if not path.exists():
        raise ModelError(f"model path {path} does not exist", "give a catalogue name (see `llmcli models`), an HF-format directory or a .gguf file")
    is_gguf = path.is_file() and path.suffix == ".gguf"
    if cache_dir is not None:
        from llmcli.tempfiles import remove_dead_tmp

        for folder in ("weights", "kernels", "tokenizers"):  # what loads killed mid-write left behind
            remove_dead_tmp(Path(cache_dir) / folder)
    cached = _cache_file(path, Path(cache_dir)) if (is_gguf and cache_dir is not None) else None
    fused = False  # whether the tensors are already in the fused layout (read from the cache)
    rope_freqs = None
    if cached is not None and cached.is_file():
        try:
            config, tensors, rope_freqs = _read_cache(cached)
            fused = True
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt from the GGUF
            cached.unlink(missing_ok=True)
    if not fused:
        if is_gguf:
            checkpoint = weights.read_gguf(path)
            config, tensors = checkpoint.config, checkpoint.tensors
            rope_freqs = checkpoint.extra.get("rope_freqs.weight")
            del checkpoint
        elif path.is_dir():
            config = read_config(path)
            tensors = weights.read_safetensors(path)
        else:
            raise ModelError(
                f"{path} is neither an HF-format directory nor a .gguf file",
                "supported formats: safetensors (HF directory) and GGUF; pickled .bin/.pt/.pth files are never loaded",
            )
    family = family_module(config)
    with torch.device("meta"), _skip_init():
        module = family.Model(config)
    if fused:
        with _skip_init():  # outside the device context: meta tensors take torch's plain meta kernels
            module.fuse()
    if not fused and not is_gguf:
        tensors = family.sanitize(tensors, config)  # HF names -> ours; a GGUF's are ours already (its family's GGUF_NAMES)
    weights.load_state(module, tensors, str(cached if fused else path), torch_dtype)
    del tensors  # the module holds the only references now, so fusing does not keep two copies
    _rebuild_meta_buffers(module, family, config)
    if rope_freqs is not None:
        # llama3-style GGUFs carry their rope scaling as per-frequency divisors instead of config fields
        module.inv_freq = module.inv_freq / rope_freqs.float()
    if not fused and hasattr(module, "fuse"):
        module.fuse()
        if cached is not None and torch_dtype == torch.float32:
            _write_cache(cached, module, config, rope_freqs, path)
    module = module.to(torch_device).eval()
    scheme = check_scheme(quantize, torch_dtype, torch_device)
    if torch_device.type == "cpu" and torch_dtype == torch.float32:
        panels_file = cached.with_name(cached.stem + ".panels.safetensors") if cached is not None else None
        _use_kernels(module, scheme, Path(cache_dir) / "kernels" if cache_dir is not None else None, panels_file)
    tokenizer = load_tokenizer(path, cache_dir=Path(cache_dir) / "tokenizers" if cache_dir is not None else None)
    return LoadedModel(config=config, module=module, tokenizer=tokenizer, path=path, dtype=torch_dtype, device=torch_device, quantize=quantize)


CACHE_LAYOUT = "llmcli-fused/1"  # bump when the fused parameter names change


PANELS_LAYOUT = "llmcli-panels/1"  # bump when matvec.c's panel order changes


def _use_kernels(module: torch.nn.Module, scheme: str | None, build_dir: Path | None, panels_file: Path | None = None) -> None:
    """Put the linear layers on the native kernels (and int8 weights with scheme="int8").

    With panels_file (a GGUF's weights cache), the float32 weights already packed in the kernels'
    panel order are kept beside the cache: later loads memory-map them instead of repacking
    every weight (about half a second for SmolLM2, and its pages stay untouched until used).
    """
    from llmcli.core.kernels import load_kernels
    from llmcli.core.kernels.linear import accelerate_linears, panel_state, share_tied_embedding

    kernels = load_kernels(build_dir)
    tied = None
    if hasattr(module, "untie_output") and (kernels is not None or scheme is not None):
        if getattr(module, "lm_head", False) is None:
            module.untie_output()  # the output projection is the largest matrix: it gets the kernel too
            tied = module.lm_head.weight
    use_panels = panels_file is not None and kernels is not None and scheme is None
    panels = _read_panels(panels_file) if use_panels else None
    accelerate_linears(module, kernels, scheme, panels)
    if tied is not None:
        share_tied_embedding(module, tied)  # one float32 copy of the matrix, not two
    if kernels is not None and hasattr(module, "use_kernels"):
        module.use_kernels(kernels)
    if use_panels:
        packed = panel_state(module)
        if panels is None or panels.keys() != packed.keys():
            _write_tensors(panels_file, packed, {"layout": PANELS_LAYOUT})


def _read_panels(panels_file: Path) -> dict[str, torch.Tensor] | None:
    from llmcli.core import weights

    if not panels_file.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(panels_file), framework="pt") as f:
            if (f.metadata() or {}).get("layout") != PANELS_LAYOUT:
                raise ValueError("stale panel layout")
        return weights.read_safetensors(panels_file)
    except Exception:  # noqa: BLE001 - a damaged or stale entry is rebuilt by packing again
        panels_file.unlink(missing_ok=True)
        return None


def _cache_file(path: Path, cache_dir: Path) -> Path:
    import hashlib

    stat = path.stat()
    key = hashlib.sha256(f"{CACHE_LAYOUT}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    return cache_dir / "weights" / f"{key}.safetensors"


def _read_cache(cached: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], torch.Tensor | None]:
    from safetensors import safe_open

    from llmcli.core import weights

    with safe_open(str(cached), framework="pt") as f:
        meta = f.metadata()
    if meta.get("layout") != CACHE_LAYOUT:
        raise ValueError("stale cache layout")
    config = ModelConfig(**json.loads(meta["config"]))
    tensors = weights.read_safetensors(cached)
    return config, tensors, tensors.pop("extra.rope_freqs", None)


def _write_cache(cached: Path, module: torch.nn.Module, config: ModelConfig, rope_freqs: torch.Tensor | None, source: Path) -> None:
    import dataclasses

    payload = {name: t.detach().contiguous() for name, t in module.state_dict().items()}
    if rope_freqs is not None:
        payload["extra.rope_freqs"] = rope_freqs.contiguous()
    _write_tensors(cached, payload, {"config": json.dumps(dataclasses.asdict(config)), "layout": CACHE_LAYOUT, "source": str(source)})


def _write_tensors(target: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors cache entry, whole or absent even with two loads racing; a full disk only costs speed."""
    import os

    from llmcli.core import weights
    from llmcli.tempfiles import owned_tmp

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = owned_tmp(target)
        weights.write_safetensors(tmp, tensors, metadata)
        os.replace(tmp, target)
    except OSError:
        pass


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
