"""The BERT family and pooling against transformers and sentence-transformers.

Tiny random BertModel checkpoints for hidden states, masks and attention; the real
all-MiniLM-L6-v2 (the `minilm_dir` fixture) for sentence embeddings against sentence-transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from llmcli.core.config import ModelConfig  # noqa: E402
from llmcli.core.models import bert  # noqa: E402
from llmcli.core.models.base import KVCache  # noqa: E402
from llmcli.core.pooling import normalize, pool  # noqa: E402
from llmcli.errors import ContextLengthError, UsageError  # noqa: E402
from tests.tiny import load_reference, make_tiny  # noqa: E402


def load_ours(path: Path) -> bert.Model:
    """Our model from an HF directory: config, safetensors, sanitize, a strict state-dict load."""
    config = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
    model = bert.Model(config)
    model.load_state_dict(bert.sanitize(load_file(str(path / "model.safetensors")), config), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny("bert", tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def pair(tiny_dir):
    return load_ours(tiny_dir), load_reference(tiny_dir)


def ids_of(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 300, (1, n), generator=g)


def padded(lengths: list[int], seed: int = 20) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    rows = [ids_of(n, seed + n)[0] for n in lengths]
    T = max(lengths)
    batch = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return rows, batch, mask


@torch.inference_mode()
def test_last_hidden_matches_transformers(pair):
    ours, ref = pair
    ids = torch.cat([ids_of(40), ids_of(40, seed=2)])
    got = ours(ids)
    assert got.logits is None
    torch.testing.assert_close(got.last_hidden, ref(ids).last_hidden_state, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_token_type_ids_match_transformers(pair):
    ours, ref = pair
    ids = ids_of(20, seed=3)
    types = torch.tensor([[0] * 8 + [1] * 12])
    expected = ref(ids, token_type_ids=types).last_hidden_state
    got = ours(ids, token_type_ids=types).last_hidden
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(got, ours(ids).last_hidden, atol=1e-3)  # the types did change the result


@torch.inference_mode()
def test_padded_batch_equals_each_alone_and_transformers(pair):
    ours, ref = pair
    rows, batch, mask = padded([6, 19, 11])
    got = ours(batch, attention_mask=mask).last_hidden
    expected = ref(batch, attention_mask=mask).last_hidden_state
    for i, r in enumerate(rows):
        n = len(r)
        alone = ours(r[None]).last_hidden[0]
        torch.testing.assert_close(got[i, :n], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[i, :n], expected[i, :n], atol=1e-4, rtol=0)


@torch.inference_mode()
def test_attention_probabilities_and_hidden_states_equal_eager(pair):
    ours, ref = pair
    rows, batch, mask = padded([9, 14], seed=40)
    expected = ref(batch, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    L = ours.config.num_hidden_layers
    got = ours(batch, attention_mask=mask, output_attentions=range(L), output_hidden=range(L + 1))
    assert sorted(got.attentions) == list(range(L)) and sorted(got.hidden_states) == list(range(L + 1))
    for layer in range(L):
        assert got.attentions[layer].shape == (2, ours.config.num_attention_heads, 14, 14)
        torch.testing.assert_close(got.attentions[layer], expected.attentions[layer], atol=1e-5, rtol=0)
        assert float(got.attentions[layer][0, :, :, 9:].abs().max()) == 0.0  # pads get no attention
    for layer in range(L + 1):
        torch.testing.assert_close(got.hidden_states[layer], expected.hidden_states[layer], atol=1e-4, rtol=0)
    torch.testing.assert_close(got.hidden_states[L], got.last_hidden, atol=0, rtol=0)
    # the eager path (asked for probabilities) and the SDPA path agree
    torch.testing.assert_close(got.last_hidden, ours(batch, attention_mask=mask).last_hidden, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_inputs_embeds_equal_ids(pair):
    ours, ref = pair
    ids = ids_of(12, seed=5)
    embeds = ours.embed(ids)
    torch.testing.assert_close(embeds, ref.embeddings.word_embeddings(ids), atol=0, rtol=0)  # word embeddings only
    torch.testing.assert_close(ours(inputs_embeds=embeds).last_hidden, ours(ids).last_hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(inputs_embeds=embeds).last_hidden, ref(inputs_embeds=embeds).last_hidden_state, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_task_head_checkpoint_with_bert_prefix(tmp_path):
    """BertForMaskedLM saves `bert.`-prefixed keys plus `cls.*` heads: sanitize keeps only the encoder."""
    import transformers

    torch.manual_seed(6)
    cfg = transformers.BertConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    ref = transformers.BertForMaskedLM(cfg).eval()
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert any(k.startswith("bert.") for k in keys) and any(k.startswith("cls.") for k in keys)
    ours = load_ours(tmp_path)
    ids = torch.randint(0, 80, (2, 17), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids).last_hidden, ref.bert(ids).last_hidden_state, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_meta_build_and_load_state_give_the_same_model(tiny_dir, pair):
    """The shared loader's path: build on the meta device, then weights.load_state assigns the tensors."""
    from llmcli.core import weights

    _, ref = pair
    config = ModelConfig.from_dict(json.loads((tiny_dir / "config.json").read_text()))
    with torch.device("meta"):
        module = bert.Model(config)
    weights.load_state(module, bert.sanitize(weights.read_safetensors(tiny_dir), config), str(tiny_dir), torch.float32)
    assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    ids = ids_of(21, seed=7)
    torch.testing.assert_close(module.eval()(ids).last_hidden, ref(ids).last_hidden_state, atol=1e-4, rtol=0)


def test_refuses_a_cache_and_too_long_inputs(pair):
    ours, _ = pair
    with pytest.raises(UsageError):
        ours(ids_of(4), cache=KVCache.for_model(ours.config, 1, 8))
    with pytest.raises(ContextLengthError):
        ours(torch.zeros(1, ours.config.max_position_embeddings + 1, dtype=torch.long))


# ---------------------------------------------------------------- pooling


@torch.inference_mode()
def test_pooling_of_a_padded_batch_equals_each_alone(pair):
    """Every pooling reads only the real tokens: the padded batch gives each row's unpadded answer."""
    ours, _ = pair
    rows, batch, mask = padded([5, 13, 8], seed=60)
    hidden = ours(batch, attention_mask=mask).last_hidden
    for i, r in enumerate(rows):
        alone = ours(r[None]).last_hidden[0]  # (n, d)
        torch.testing.assert_close(pool(hidden, mask, "mean")[i], alone.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(pool(hidden, mask, "cls")[i], alone[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(pool(hidden, mask, "last")[i], alone[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(pool(hidden, None, "mean"), hidden.mean(1), atol=1e-6, rtol=0)
    with pytest.raises(UsageError):
        pool(hidden, mask, "max")


def test_normalize_gives_unit_vectors_in_the_same_direction():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1e-3, 2e-3]])
    y = normalize(x)
    torch.testing.assert_close(y[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(y[1], torch.zeros(2))  # a zero vector stays zero, not NaN
    torch.testing.assert_close(y[2].norm(), torch.tensor(1.0))
    torch.testing.assert_close(y[2] * x[2].norm(), x[2])


# ---------------------------------------------------------------- the real all-MiniLM-L6-v2

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "def add(a, b): return a + b",
    "Héllo wörld — naïve café, 你好世界 🙂",
    "1234567890 and 3.14159 are numbers.",
    # longer than sentence-transformers' max_seq_length (256): both sides truncate it
    " ".join(f"word{i} is part of a very long sentence" for i in range(60)),
]


@torch.inference_mode()
def test_minilm_sentence_embeddings_equal_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    expected = SentenceTransformer(str(minilm_dir), device="cpu").encode(SENTENCES, normalize_embeddings=True, convert_to_tensor=True)

    tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)
    encodings = tok.encode_batch(SENTENCES)
    lengths = [len(e.ids) for e in encodings]
    assert max(lengths) == 256 and min(lengths) < 20  # truncation and real padding both happen
    T = max(lengths)
    ids = torch.zeros(len(SENTENCES), T, dtype=torch.long)
    mask = torch.zeros(len(SENTENCES), T, dtype=torch.long)
    for i, e in enumerate(encodings):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1

    model = load_ours(minilm_dir)
    got = normalize(pool(model(ids, attention_mask=mask).last_hidden, mask, "mean"))
    assert got.shape == expected.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=0)
    # and the sentences are told apart: the two about Paris are closer to each other than to the code
    sims = got @ got.T
    assert sims[2, 3] > sims[2, 4]
