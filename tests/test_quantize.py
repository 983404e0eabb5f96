"""`llmcli quantize` against llama.cpp itself: the same tensor types and bytes as llama-quantize
(llama_cpp.llama_model_quantize) on the same weights, a file llama.cpp loads and whose logits'
top-1 agrees with ours, and -o safety."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.errors import LlmcliError
from tests.tiny import CHATML, make_bpe_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """An HF llama wide enough for K-quant super-blocks (hidden 256), 8 layers so that the _M
    presets' layer choice (use_more_bits) picks some layers and not others."""
    import json

    import transformers
    from tokenizers import Tokenizer

    path = tmp_path_factory.mktemp("wide-llama")
    make_bpe_tokenizer(path)
    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)  # peaky distributions (as tests/tiny.py): top-1 is not a near tie
    model.save_pretrained(str(path), safe_serialization=True)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None}))
    return path


def quantize(src, out, kind: str) -> Path:
    result = runner.invoke(app, ["quantize", str(src), str(out), "--type", kind])
    assert result.exit_code == 0, (result.output, result.exception)
    return Path(out)


def llama_cpp_quantize(src: Path, out: Path, file_type: int) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) == 0
    return out


def tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).view(np.uint8).copy()) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("kind, file_type", [("Q4_K_M", 15), ("Q5_K_M", 17), ("Q4_K_S", 14), ("Q8_0", 7), ("Q4_0", 2), ("Q6_K", 18)])
def test_types_and_bytes_equal_llama_quantize(wide_llama, tmp_path, kind, file_type):
    """From the same F32 GGUF, our file and llama-quantize's hold the same tensors in the same
    types with the same bytes; from the HF directory directly, the same again."""
    f32 = quantize(wide_llama, tmp_path / "f32.gguf", "F32")
    theirs = tensors(llama_cpp_quantize(f32, tmp_path / "ref.gguf", file_type))
    for src in (f32, wide_llama):
        ours = tensors(quantize(src, tmp_path / f"ours-{kind}.gguf", kind))
        assert sorted(ours) == sorted(theirs)
        for name, (qtype, data) in theirs.items():
            assert ours[name][0] == qtype, (name, ours[name][0], qtype)
            assert np.array_equal(ours[name][1], data), name
    if kind.endswith("_M"):
        kinds = {name: q for name, (q, _) in theirs.items()}
        assert kinds["output.weight"] == "Q6_K" and kinds["blk.0.ffn_down.weight"] == "Q6_K" and kinds["blk.1.ffn_down.weight"] != "Q6_K"


def test_llama_cpp_loads_our_file_and_agrees_on_top1(wide_llama, tmp_path):
    import llama_cpp

    from llmcli.core.loader import load_model

    path = quantize(wide_llama, tmp_path / "q4km.gguf", "Q4_K_M")
    ids = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    # float32 K/V cache as ours (llama.cpp defaults to float16)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    loaded = load_model(path)
    assert loaded.config.num_hidden_layers == 8 and loaded.tokenizer is not None
    with torch.inference_mode():
        ours = loaded.module(torch.tensor([ids])).logits[0].numpy()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.95
    assert loaded.tokenizer.encode("The quick brown fox", add_special=False).ids == llm.tokenize(b"The quick brown fox", add_bos=False, special=False)


def test_requantize_a_quantized_gguf_keeps_metadata(wide_llama, tmp_path):
    q8 = quantize(wide_llama, tmp_path / "q8.gguf", "Q8_0")
    q4 = quantize(q8, tmp_path / "q4.gguf", "Q4_0")
    a, b = gguf.GGUFReader(q8), gguf.GGUFReader(q4)
    for key, field in a.fields.items():
        if key.startswith("GGUF.") or key == "general.file_type":
            continue
        assert b.fields[key].contents() == field.contents(), key
    assert b.fields["general.file_type"].contents() == 2
    assert {t.tensor_type.name for t in b.tensors} == {"F32", "Q4_0", "Q6_K"}


def test_quantize_refuses_to_overwrite_its_input_and_unknown_types(wide_llama, tmp_path):
    q8 = quantize(wide_llama, tmp_path / "q8.gguf", "Q8_0")
    before = q8.read_bytes()
    result = runner.invoke(app, ["quantize", str(q8), str(q8), "--type", "Q4_0"])
    assert isinstance(result.exception, LlmcliError) and "destroy the input" in result.exception.message
    assert q8.read_bytes() == before
    result = runner.invoke(app, ["quantize", str(q8), str(tmp_path / "x.gguf"), "--type", "IQ2_XS"])
    assert isinstance(result.exception, LlmcliError) and "Q4_K_M" in result.exception.hint
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob("*.tmp"))
