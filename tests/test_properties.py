"""Property tests (hypothesis): the record reader and writer, the tensor codec, tokenizer round trips
and sampling, on examples hypothesis draws rather than cases picked by hand.

The "ci" profile (the default here) is derandomized with a bounded number of examples, so every
CI run checks the same cases; HYPOTHESIS_PROFILE=explore draws new ones (more of them, random).
"""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llmcli.errors import InputError
from llmcli.records import RecordWriter, decode_tensor, encode_tensor, iter_lines

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# ------------------------------------------------------------------ records

# Every code point UTF-8 can carry (no lone surrogates: they are no characters), escapes and controls included.
text = st.text(st.characters(codec="utf-8"), max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)
records = st.dictionaries(text, json_values, max_size=6)


def write_and_read(recs: list[dict]) -> list[dict]:
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    writer = RecordWriter(out)
    for rec in recs:
        writer.write(rec)
    out.flush()
    data = out.buffer.getvalue()
    assert data.count(b"\n") == len(recs)  # one line per record, whatever the strings hold
    return [line.record for line in iter_lines(io.BytesIO(data), "-")]


@given(st.lists(records, min_size=1, max_size=4))
def test_records_round_trip(recs):
    back = write_and_read(recs)
    for i, (rec, got) in enumerate(zip(recs, back, strict=True), start=1):
        assert got == (rec if "id" in rec else {**rec, "id": i})  # a record without id gets its line number


@given(text, st.integers(0xD800, 0xDFFF), text)
def test_a_lone_surrogate_is_one_input_error(before, surrogate, after):
    line = json.dumps({"text": before + chr(surrogate) + after}).encode()  # JSON allows the escape; it is no character
    with pytest.raises(InputError) as info:
        list(iter_lines(io.BytesIO(line + b"\n"), "in.jsonl"))
    assert info.value.line == 1 and len(str(info.value).splitlines()) == 1 and f"{surrogate:04x}" in str(info.value)


TENSOR_DTYPES = [np.float32, np.float16, np.float64, np.int32, np.int64]


@given(st.sampled_from(TENSOR_DTYPES).flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))))
def test_tensor_codec_round_trip_through_a_record(array):
    back = write_and_read([{"t": encode_tensor(array)}])[0]["t"]
    decoded = decode_tensor(back, "t")
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()  # bit for bit: NaN payloads, -0.0 and infinities too


# ------------------------------------------------------------------ tokenizers

def specials_of(tok) -> list[str]:
    return [t.content for t in tok.backend.get_added_tokens_decoder().values()]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf, llmcli_home):
    from llmcli.core.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf, cache_dir=llmcli_home / "tokenizers")


@pytest.fixture(scope="module")
def gemma3_tokenizer(gemma3_gguf, llmcli_home):
    from llmcli.core.tokenizer import load_tokenizer

    return load_tokenizer(gemma3_gguf, cache_dir=llmcli_home / "tokenizers")


@pytest.fixture(scope="module")
def minilm_tokenizer(minilm_dir):
    from llmcli.core.tokenizer import load_tokenizer

    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def smollm2_missing_bytes(smollm2_tokenizer) -> set[int]:
    """The bytes SmolLM2's vocabulary has no token for (0x04, 0xc0, 0xf1, ... 21 of them)."""
    from llmcli.core.tokenizer import _byte_alphabet

    vocab = smollm2_tokenizer.backend.get_vocab()
    return {b for b, char in _byte_alphabet().items() if char not in vocab}


@given(text=st.text(st.characters(codec="utf-8"), max_size=60))
def test_byte_level_bpe_round_trips_any_text(smollm2_tokenizer, smollm2_missing_bytes, text):
    """SmolLM2's byte-level BPE gives back every string whose bytes its vocabulary has tokens for.
    It lacks 21 of the 256 (U+40000 is F1 80 80 80, and F1 has no token): such characters are
    dropped, by llama.cpp's tokenizer on the same file too (tests/test_gguf_tokenizers.py
    compares the ids with llama.cpp's)."""
    assume(not any(s in text for s in specials_of(smollm2_tokenizer)))  # a special token's text is parsed as that token
    assume(not set(text.encode("utf-8")) & smollm2_missing_bytes)
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text).ids) == text


@given(text=st.text(st.characters(codec="utf-8"), max_size=60))
def test_sentencepiece_round_trips_any_text(gemma3_tokenizer, text):
    """Gemma 3's SentencePiece vocabulary falls back to bytes, so it too gives every string back."""
    assume(not any(s in text for s in specials_of(gemma3_tokenizer)))
    assert gemma3_tokenizer.decode(gemma3_tokenizer.encode(text).ids) == text


words = st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), min_size=1, max_size=8).map(" ".join)


@given(text=words)
def test_wordpiece_round_trips_normalized_words(minilm_tokenizer, text):
    """MiniLM's WordPiece does not promise the text back (it lowercases, strips accents, splits
    punctuation, and has [UNK]); what it promises: lowercase words of its alphabet joined by single
    spaces come back as they were, unless a word is unknown."""
    tok = minilm_tokenizer
    ids = tok.encode(text).ids
    assume(tok.unk_token_id not in ids)
    assert tok.decode(ids) == text


@given(text=st.text(st.characters(codec="utf-8"), max_size=60))
def test_wordpiece_normalization_is_stable(minilm_tokenizer, text):
    """... and for any text, one round trip normalizes it: a second round trip changes nothing."""
    tok = minilm_tokenizer
    once = tok.decode(tok.encode(text).ids)
    assert tok.decode(tok.encode(once).ids) == once


# ------------------------------------------------------------------ sampling

VOCAB = 40
extreme = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([3.4e38, -3.4e38, 1e30, -1e30, 0.0])


@st.composite
def sampling_params(draw):
    from llmcli.core.sampling_params import SamplingParams

    bias = draw(st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100) | st.just(-100.0), max_size=4))
    return SamplingParams(
        temperature=draw(st.just(0.0) | st.floats(0.0, 2.0)),
        top_k=draw(st.integers(0, VOCAB + 5)),
        top_p=draw(st.floats(0.0, 1.0, exclude_min=True)),
        min_p=draw(st.floats(0.0, 1.0)),
        repetition_penalty=draw(st.just(1.0) | st.floats(0.05, 5.0)),
        presence_penalty=draw(st.floats(-2.0, 2.0)),
        frequency_penalty=draw(st.floats(-2.0, 2.0)),
        logit_bias=bias,
        seed=draw(st.none() | st.integers(0, 2**63 - 1)),
    )


@given(
    params=st.lists(sampling_params(), min_size=1, max_size=3),
    data=st.data(),
)
def test_sampling_never_nan_never_outside_the_vocabulary(params, data):
    from llmcli.core.sampling import make_generator, process_logits, sample

    rows = len(params)
    logits = torch.tensor(data.draw(hnp.arrays(np.float32, (rows, VOCAB), elements=extreme)))
    generated = [data.draw(st.lists(st.integers(0, VOCAB - 1), max_size=6)) for _ in range(rows)]
    probs = process_logits(logits, params, generated, generated)
    assert not bool(probs.isnan().any()) and bool((probs >= 0).all())
    assert torch.allclose(probs.double().sum(-1), torch.ones(rows, dtype=torch.float64), atol=1e-4)
    chosen = sample(probs, [make_generator(p.seed, i) for i, p in enumerate(params)], params)
    assert all(0 <= int(c) < VOCAB for c in chosen)
    for row, p in enumerate(params):
        if p.greedy:
            continue
        # -100 bans a token (OpenAI's semantics) wherever the other logits are ordinary numbers
        row_logits = logits[row]
        banned = [t for t, b in p.logit_bias.items() if b == -100.0]
        ordinary = bool(torch.isfinite(row_logits).all()) and float(row_logits.max() - row_logits.min()) < 20
        # (HF's repetition penalty below 1 pulls a banned token's negative logit back up: not a ban then)
        if banned and ordinary and len(banned) < VOCAB and p.repetition_penalty >= 1:
            assert int(chosen[row]) not in banned
            assert float(probs[row, banned].max()) < math.exp(-15)
