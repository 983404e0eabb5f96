"""Broken or unsupported model files: one `error:` line naming the file and the fix, exit 1, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from llmcli.cli import main
from tests.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("errors-llama"))


def run(capsys, args, stdin=None, monkeypatch=None):
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    return info.value.code, err


def broken_copy(tiny_dir, tmp_path, edit):
    target = tmp_path / "model"
    shutil.copytree(tiny_dir, target)
    edit(target)
    return target


def truncate_weights(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])


def unknown_architecture(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))


def wrong_shape(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (d / "config.json").write_text(json.dumps(cfg))


def pickled_only(d):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")


def edit_config(**changes):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))

    return edit


CASES = {
    "truncated safetensors": (truncate_weights, ["model.safetensors"]),
    "unknown architecture": (unknown_architecture, ["unknown architecture 'mamba'", "llama"]),
    "shape mismatch": (wrong_shape, ["mlp.", "shape"]),
    "pickle only": (pickled_only, ["safetensors", "GGUF"]),
    "mixture of experts": (edit_config(model_type="qwen3_moe"), ["unknown architecture 'qwen3_moe'", "qwen3"]),
    "window on some layers": (
        edit_config(model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1),
        ["config.json", "max_window_layers=1", "use_sliding_window"],
    ),
    "mixed layer types": (edit_config(layer_types=["full_attention", "sliding_attention"]), ["config.json", "layer_types", "sliding_attention"]),
    "unknown rope scaling": (edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["config.json", "rope_scaling", "'yarn'"]),
    "phi3 rope scaling": (edit_config(model_type="phi3", rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["config.json", "rope_scaling type 'yarn'", "longrope"]),
    "gemma3 attention soft-capping": (edit_config(model_type="gemma3_text", attn_logit_softcapping=50.0), ["config.json", "attn_logit_softcapping=50.0"]),
    "gemma3 layer types": (edit_config(model_type="gemma3_text", layer_types=["full_attention", "chunked_attention"]), ["config.json", "layer_types", "chunked_attention"]),
    "multimodal gemma3": (edit_config(model_type="gemma3"), ["unknown architecture 'gemma3'", "gemma3_text"]),
    # a lying config.json is refused before a module is built from it (a million layers took minutes)
    "a million layers": (edit_config(num_hidden_layers=10**6), ["config.json", "num_hidden_layers=1000000", "download the model again"]),
    "more layers than weights": (edit_config(num_hidden_layers=5), ["config.json", "declares 5 layers but holds tensors for 2"]),
    "a huge hidden size": (edit_config(hidden_size=2**20), ["config.json", "hidden_size=1048576"]),
    "heads not in groups": (edit_config(num_key_value_heads=3), ["config.json", "4 attention heads in groups of 3 KV heads"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_hf_directory(case, tiny_dir, tmp_path, capsys, monkeypatch):
    edit, needles = CASES[case]
    model = broken_copy(tiny_dir, tmp_path, edit)
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    code, err = run(capsys, ["attend", "-m", str(model)])
    assert code == 1, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_missing_model_path(tmp_path, capsys):
    code, err = run(capsys, ["generate", "-m", str(tmp_path / "nothing-here")])
    assert code == 1 and err.startswith("error: ") and "nothing-here" in err and "Traceback" not in err


def test_corrupt_gguf(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    code, err = run(capsys, ["attend", "-m", str(bad)])
    assert code == 1, err
    assert err.startswith("error: ") and "broken.gguf" in err and "Traceback" not in err


def _gguf_damage(kind):
    """A tiny quantized GGUF damaged in one way: (file edit, what the error line must name)."""

    def truncated(path):
        path.write_bytes(path.read_bytes()[:-5000])

    def misdeclared(path):
        from tests.test_weights import _patch_tensor_info

        _patch_tensor_info(path, "blk.0.ffn_up.weight", type_id=2)  # Q4_0: 18 bytes a block where Q8_0 has 34

    def unsupported(path):
        from tests.test_weights import _patch_tensor_info

        _patch_tensor_info(path, "blk.1.ffn_down.weight", type_id=20)  # IQ4_NL, same block size as Q4_0 but not runnable

    return {
        "truncated": (truncated, ["truncated", "ends at byte"]),
        "misdeclared type": (misdeclared, ["corrupt", "blk.0.ffn_up.weight", "Q4_0"]),
        "unsupported type": (unsupported, ["blk.1.ffn_down.weight", "IQ4_NL", "Q4_K"]),
    }[kind]


@pytest.mark.parametrize("kind", ["truncated", "misdeclared type", "unsupported type"])
def test_damaged_quantized_gguf(kind, tmp_path, capsys, monkeypatch):
    from gguf import GGMLQuantizationType as Q

    from tests.test_weights import _make_llama, write_gguf

    path = write_gguf(tmp_path / "damaged.gguf", _make_llama(tied=False), Q.Q8_0)
    edit, needles = _gguf_damage(kind)
    edit(path)
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    code, err = run(capsys, ["attend", "-m", str(path)])
    assert code == 1, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in ["damaged.gguf", *needles]:
        assert needle in err, err
