"""Each family's real chat template, read from a GGUF's tokenizer.chat_template, renders as
transformers' apply_chat_template renders it from the same GGUF.

The templates in tests/chat_templates/ are the models' own, as their HF tokenizer_config.json
carries them (and convert_hf_to_gguf.py copies them into tokenizer.chat_template): Qwen2.5-7B-Instruct,
Qwen3-0.6B (with its <think> handling), Gemma 3 (-it), Llama-3.2-3B-Instruct (dated system header)
and Phi-3.5-mini-instruct. The reference is transformers loading the GGUF itself (`gguf_file=`),
so the special tokens the templates use (bos_token, eos_token) come from the file on both sides.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmcli.core.tokenizer import load_tokenizer
from tests.test_tokenizer import write_gguf

TEMPLATES = Path(__file__).parent / "chat_templates"

# family -> (template file, its special tokens (bos first, eos second))
FAMILIES = {
    "qwen2.5": ("qwen2.5.jinja", ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]),
    "qwen3": ("qwen3.jinja", ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<think>", "</think>"]),
    "gemma3": ("gemma3.jinja", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
    "llama3": ("llama3.2.jinja", ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]),
    "phi3": ("phi3.5.jinja", ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
}

CONVERSATIONS = {
    "system, user, assistant, user": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  hi  "},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "ab\nba"},
    ],
    "one user turn": [{"role": "user", "content": "hi"}],
}


def family_gguf(tmp_path: Path, family: str, with_template: bool = True, arch: str = "llama") -> Path:
    """A sentencepiece-style tokenizer GGUF with the family's specials and its chat template."""
    name, specials = FAMILIES[family]
    tokens = ["<unk>", *specials] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2] + [3] * len(specials) + [6] * 256
    pieces = ["\u2581", "a", "b", "h", "i", "\u2581h", "hi"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    template = (TEMPLATES / name).read_text(encoding="utf-8") if with_template else None
    return write_gguf(
        tmp_path / f"{family}-{arch}{'' if with_template else '-bare'}.gguf", "llama", tokens, types, scores=scores, template=template,
        bos_token_id=1, eos_token_id=2, unk_token_id=0, add_space_prefix=False, arch=arch,
    )  # fmt: skip


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_chat_template_from_gguf_renders_like_transformers(tmp_path, family, conversation):
    import transformers

    path = family_gguf(tmp_path, family)
    ours = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert ours.chat_template == ref.chat_template
    messages = CONVERSATIONS[conversation]
    for add_generation_prompt in (True, False):
        got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        want = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert got == want, (family, add_generation_prompt)
    assert "hi" in got


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_gemma3_gguf_without_a_template_chats_in_gemmas_turn_format(tmp_path, conversation):
    """A gemma3 GGUF that carries no chat template (the base gemma3-270m) gets the family's: it
    renders text conversations exactly as Gemma 3's own template does in transformers."""
    import transformers

    from llmcli.core.models.gemma3 import CHAT_TEMPLATE

    bare = load_tokenizer(family_gguf(tmp_path, "gemma3", with_template=False, arch="gemma3"))
    assert bare.chat_template == CHAT_TEMPLATE
    with_template = family_gguf(tmp_path, "gemma3")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=with_template.name)
    messages = CONVERSATIONS[conversation]
    for add_generation_prompt in (True, False):
        got = bare.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert got == ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert bare.backend.token_to_id("<end_of_turn>") in bare.eos_token_ids


def test_a_llama_gguf_without_a_template_still_has_none(tmp_path):
    assert load_tokenizer(family_gguf(tmp_path, "llama3", with_template=False)).chat_template is None
