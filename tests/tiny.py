"""Tiny random checkpoints saved as real HF directories, built with transformers (test-only).

Each directory has config.json, model.safetensors and a real byte-level BPE tokenizer.json
trained on a few sentences, so every command runs on it end to end in milliseconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear in text.",
    "Héllo wörld, naïve café. 你好世界。 🙂",
    "To be, or not to be, that is the question.",
]
VOCAB = 320


def make_bpe_tokenizer(path: Path, bert: bool = False) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if bert:
        from tokenizers import normalizers

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        tok.train_from_iterator(TRAINING_TEXT, trainer)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        tok.decoder = decoders.WordPiece()
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB - 8,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(TRAINING_TEXT, trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(path / "tokenizer.json"))


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny(kind: str, path: Path, seed: int = 0) -> Path:
    """kind: llama, llama3, mistral, mistral-window, qwen2, qwen3, gemma3, phi3, gpt2, bert. Returns the HF directory."""
    import torch
    import transformers

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    make_bpe_tokenizer(path, bert=kind == "bert")
    from tokenizers import Tokenizer

    # decoders get exactly the tokenizer's ids; the encoder keeps a padded vocabulary, as many real checkpoints do
    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    if kind in ("llama", "llama3"):
        extra = {}
        if kind == "llama3":
            extra["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cfg = transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, **common, **extra)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, bos_token_id=0, eos_token_id=2, **common)
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "mistral-window":
        # a sliding window shorter than the tests' sequences, untied, GQA 4:2
        cfg = transformers.MistralConfig(num_key_value_heads=2, sliding_window=7, bos_token_id=0, eos_token_id=2, **common)
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "gemma3":
        # Gemma3-270m scaled down: head_dim 20 != 48 / 3 (query_pre_attn_scalar = head_dim, as the real
        # models and llama.cpp's GGUF reading), GQA 3:1, 7 layers = five local, one global, one local
        # (window 6 < the tests' sequences), a final logit cap, tied embeddings
        shape = dict(hidden_size=48, intermediate_size=72, num_attention_heads=3, num_key_value_heads=1, head_dim=20, num_hidden_layers=7)
        cfg = transformers.Gemma3TextConfig(
            **{**common, **shape}, sliding_window=6, query_pre_attn_scalar=20, final_logit_softcapping=30.0,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}, "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        )
        model = transformers.Gemma3ForCausalLM(cfg)
    elif kind == "phi3":
        # Phi-3.5-mini scaled down: fused qkv and gate_up, LongRoPE short/long factors (original context 32 < the
        # 64-position test, so a whole 64-token forward takes the long factors), partial rotary 0.75
        # (Phi-4-mini's), GQA 4:2, untied, a window shorter than the tests' sequences
        rot = int(16 * 0.75) // 2
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75, "original_max_position_embeddings": 32,
                "short_factor": [1.0 + 0.1 * i for i in range(rot)], "long_factor": [1.5 + 0.5 * i for i in range(rot)]}
        cfg = transformers.Phi3Config(num_key_value_heads=2, sliding_window=20, rope_parameters=rope, tie_word_embeddings=False,
                                      original_max_position_embeddings=32, bos_token_id=0, eos_token_id=2, pad_token_id=1, **{**common, "max_position_embeddings": 128})
        model = transformers.Phi3ForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "qwen3":
        # odd sizes: head_dim 20 != 48 / 3, GQA 3:1, tied embeddings, as Qwen3-0.6B is tied
        shape = dict(hidden_size=48, intermediate_size=72, num_attention_heads=3, num_key_value_heads=1, head_dim=20)
        cfg = transformers.Qwen3Config(**{**common, **shape}, tie_word_embeddings=True, bos_token_id=0, eos_token_id=2)
        model = transformers.Qwen3ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
        model = transformers.BertModel(cfg, add_pooling_layer=False)
    else:
        raise ValueError(kind)
    model.eval()
    # larger weights than the init default give peaky, non-degenerate distributions
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3 if kind != "bert" else 0.1)
            elif kind in ("qwen2", "qwen3", "gemma3", "phi3"):
                # norm weights and qkv biases that are not all ones / zeros, so their mapping is tested too
                p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.3)
    model.save_pretrained(str(path), safe_serialization=True)
    tok_cfg = {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None} if kind != "bert" else {"model_max_length": 256}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return path


def load_reference(path: Path, eager: bool = True):
    """The transformers model for a tiny directory, float32, eval mode."""
    import transformers

    cfg = json.loads((path / "config.json").read_text())
    kw = {"attn_implementation": "eager"} if eager else {}
    if cfg["model_type"] == "bert":
        return transformers.BertModel.from_pretrained(str(path), add_pooling_layer=False, **kw).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()
