"""GGUF tokenizers of every family against llama.cpp's rules and transformers.

- Every GGUF below against llama.cpp itself (llama-cpp-python's `Llama(vocab_only=True).tokenize`).
- gpt2-style BPE: a GGUF per llama.cpp pre-tokenizer type, with SmolLM2's real vocabulary and
  merges and `tokenizer.ggml.pre` set to the type's name, so the split is what is tested. The
  reference is llama.cpp's algorithm re-done here: the type's regexes applied one after another
  with the `regex` module (llama-vocab.cpp, unicode_regex_split: text between matches stays a
  piece), then each piece byte-encoded and merged by a bare `tokenizers` BPE over the same
  vocabulary (looking the whole piece up first where llama.cpp sets ignore_merges).
- Gemma 3 270M (sentencepiece with byte fallback, 262144 tokens): ids of a multilingual text
  as transformers' GGUF converter gives them (which equal its HF tokenizer's), decode, BOS.
- The Gemma chat template read from a GGUF renders as transformers' apply_chat_template does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmcli.core import tokenizer as tokmod  # noqa: E402
from llmcli.core.tokenizer import load_tokenizer  # noqa: E402
from llmcli.errors import ModelError  # noqa: E402
from tests.test_tokenizer import GPT2_SPLIT, llama_cpp_pieces, write_gguf  # noqa: E402

MULTILINGUAL = (
    "Hello world! It's 2025-12-02, the temperature is 23.5°C and ≈ 74°F.\n"
    "Ünïcödé accents: café, naïve, façade, Øresund, São Paulo, Đorđe.\n"
    "中文：今天天气很好，我们去公园散步吧。日本語：東京は晴れです。한국어: 안녕하세요!\n"
    "Emoji: 😀👍🏽🇫🇷 👨‍👩‍👧‍👦 🤖\n"
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)  # recursion\n"
    "   leading spaces, trailing spaces   \n\n\n"
    "numbers 1234567890 3.14159 1,000,000 0x1F and runs     of      spaces.\n"
    "Ελληνικά, русский текст, العربية, עברית, हिन्दी, ไทย.\n"
    "I'm sure you'll see they've done it; WE'LL SEE. don't\r\nend"
)


# One llama.cpp pre-tokenizer name per type (llama-vocab.cpp), and the aliases most files carry.
PRE_NAMES = sorted({names[0] for names in {kind: [n for n, k in tokmod._PRE_TYPES.items() if k == kind] for kind in set(tokmod._PRE_TYPES.values())}.values()})
PRE_NAMES += ["llama-bpe", "qwen2", "smollm", "deepseek-r1-qwen", "llama4", "command-r", "glm4", "tekken", "phi-2"]
PRE_NAMES = sorted(set(PRE_NAMES))

@pytest.fixture(scope="module")
def smol_vocab(smollm2_gguf):
    from llmcli.core.gguf_meta import gguf_metadata

    meta = gguf_metadata(smollm2_gguf)
    return meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.merges"]


@pytest.mark.real
@pytest.mark.parametrize("pre", PRE_NAMES)
def test_byte_level_pre_tokenizer_follows_llama_cpp(tmp_path, smol_vocab, pre):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    tokens, types, merges = smol_vocab
    path = write_gguf(tmp_path / "t.gguf", "gpt2", tokens, types, merges=merges, pre=pre, bos_token_id=1, eos_token_id=2)
    ours = load_tokenizer(path)

    kind = tokmod._PRE_TYPES[pre]
    patterns = {"gpt2": (GPT2_SPLIT,), "starcoder": (r"\p{N}", GPT2_SPLIT)}.get(kind) or tokmod._PRE_SPLITS[kind]
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=pre in tokmod._IGNORE_MERGES))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    expected = [i for piece in llama_cpp_pieces(MULTILINGUAL, patterns) for i in bpe.encode(piece, add_special_tokens=False).ids]
    bos = [1] if pre in tokmod._ADD_BOS else []  # llama.cpp's default when the file has no add_bos_token
    assert ours.encode(MULTILINGUAL).ids == bos + expected
    assert ours.decode(ours.encode(MULTILINGUAL).ids) == MULTILINGUAL


def llama_cpp_ids(path: Path, text: str) -> list[int]:
    """llama.cpp's tokenizer on the file: BOS as the file says, control tokens not parsed."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), vocab_only=True, verbose=False).tokenize(text.encode("utf-8"), add_bos=True, special=False)


@pytest.mark.real
@pytest.mark.parametrize("pre", PRE_NAMES)
def test_byte_level_pre_tokenizer_equals_llama_cpp(tmp_path, smol_vocab, pre):
    tokens, types, merges = smol_vocab
    path = write_gguf(tmp_path / "t.gguf", "gpt2", tokens, types, merges=merges, pre=pre, bos_token_id=1, eos_token_id=2)
    assert load_tokenizer(path).encode(MULTILINGUAL).ids == llama_cpp_ids(path, MULTILINGUAL)


def test_ignore_merges_takes_a_word_whole(tmp_path):
    # "What" is a token but no merge builds it: llama-bpe (ignore_merges in llama.cpp and in
    # Llama 3's tokenizer.json) looks the whole word up first, gpt-2 stops at smaller pieces.
    from tests.test_tokenizer import _tiny_bpe_vocab

    tokens, merges = _tiny_bpe_vocab(tmp_path / "src")
    merges = [m for m in merges if m.replace(" ", "") != "What"]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    assert "What" in tokens
    ids = {}
    for pre in ("llama-bpe", "gpt-2"):
        path = write_gguf(tmp_path / f"{pre}.gguf", "gpt2", tokens, types, merges=merges, pre=pre, bos_token_id=1, eos_token_id=2, add_bos_token=False)
        ids[pre] = load_tokenizer(path).encode("What").ids
    assert ids["llama-bpe"] == [tokens.index("What")]
    assert len(ids["gpt-2"]) > 1


@pytest.mark.parametrize("pre", ["kimi-k2", "superbpe"])
def test_pre_tokenizers_not_rebuilt_are_a_clear_error(tmp_path, pre):
    tokens = ["a", "b", "ab"]
    path = write_gguf(tmp_path / "t.gguf", "gpt2", tokens, [1, 1, 1], merges=["a b"], pre=pre)
    with pytest.raises(ModelError) as err:
        load_tokenizer(path)
    assert repr(pre) in err.value.message and "tokenizer.json" in err.value.hint


# ---------------------------------------------------------------- Gemma 3 270M

@pytest.fixture(scope="module")
def gemma_hf_ids(gemma3_gguf) -> list[int]:
    """transformers' own GGUF converter on the same file (AutoTokenizer.from_pretrained(folder,
    gguf_file=...)): the independent reference; building its 262144-token vocabulary takes about 40 s."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name)
    return reference(MULTILINGUAL)["input_ids"]


@pytest.fixture(scope="module")
def gemma(gemma3_gguf):
    return load_tokenizer(gemma3_gguf)


@pytest.mark.real
def test_gemma3_ids_match_transformers(gemma, gemma_hf_ids):
    assert gemma_hf_ids[0] == 2 and len(gemma_hf_ids) > 100
    assert gemma.encode(MULTILINGUAL).ids == gemma_hf_ids
    assert gemma.decode(gemma_hf_ids) == MULTILINGUAL
    assert gemma.encode(MULTILINGUAL, add_special=False).ids == gemma_hf_ids[1:]
    assert (gemma.bos_token_id, gemma.eos_token_id, gemma.vocab_size) == (2, 1, 262144)


@pytest.mark.real
def test_gemma3_ids_equal_llama_cpp(gemma, gemma3_gguf):
    texts = [MULTILINGUAL, "  two leading spaces", "a   b\t\tc\n\n\nd", "x       y", "\U000e0041 tag", " 🙂"]
    for text in texts:
        assert gemma.encode(text).ids == llama_cpp_ids(gemma3_gguf, text), text


@pytest.mark.real
def test_gemma3_whitespace_and_bytes(gemma):
    # runs of spaces, tabs and newlines are tokens of their own (user-defined in the file, matched
    # whole as llama.cpp does); a character outside the vocabulary falls back to its UTF-8 bytes
    enc = gemma.encode("a   b\t\tc\n\n\nd", add_special=False)
    assert enc.tokens == ["a", "   ", "b", "\t\t", "c", "\n\n\n", "d"]
    rare = "\U000e0041"  # TAG LATIN CAPITAL LETTER A: no token of its own
    enc = gemma.encode(rare, add_special=False)
    assert enc.tokens == ["<0xF3>", "<0xA0>", "<0x81>", "<0x81>"] and gemma.decode(enc.ids) == rare


@pytest.mark.real
def test_gemma3_tokenize_cli_and_model_commands(gemma3_gguf, gemma, run_llmcli):
    import json

    out = run_llmcli("tokenize", "-m", "gemma3-270m", input=json.dumps({"text": MULTILINGUAL}) + "\n")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["ids"] == gemma.encode(MULTILINGUAL).ids
    back = run_llmcli("decode", "-m", "gemma3-270m", input=out.stdout)
    assert back.returncode == 0, back.stderr
    # model commands run on it too (tests/test_gemma3_real.py checks what they compute)
    gen = run_llmcli("generate", "-m", "gemma3-270m", "-n", "1", input='{"text": "hi"}\n')
    assert gen.returncode == 0, gen.stderr
    assert len(json.loads(gen.stdout)["generated_ids"]) == 1


# The chat template of Gemma 3's tokenizer_config.json (google/gemma-3-*-it), text-only parts.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {{ message['content'] | trim }}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma_chat_template_from_gguf_renders_like_transformers(tmp_path, add_generation_prompt):
    import transformers

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3] * 6 + [6] * 256
    pieces = ["\u2581", "a", "b", "h", "i", "\u2581h", "hi"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 262 + [-float(i) for i in range(len(pieces))]
    path = write_gguf(
        tmp_path / "g.gguf", "llama", tokens, types, scores=scores, template=GEMMA3_TEMPLATE,
        bos_token_id=2, eos_token_id=1, unk_token_id=3, pad_token_id=0, add_space_prefix=False,
    )  # fmt: skip
    ours = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  hi  "},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "ab\nba"},
    ]
    for messages in (conversation, conversation[1:2]):
        got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        want = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert got == want
    assert got.startswith("<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n") or messages is not conversation
