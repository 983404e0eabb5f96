"""Random-weight llama GGUFs shaped like real models, quantized by llama.cpp's own quantizer.

    python benchmarks/make_random_gguf.py                    # Llama-3.2-1B shape, Q4_K_M (~0.8 GB; ~2 min on 2 cores)
    python benchmarks/make_random_gguf.py --shape 8b         # Llama-3.1-8B shape, Q4_K_M (~4.9 GB; 16 GB F16 written first)
    python benchmarks/make_random_gguf.py --type Q8_0 --keep-f16

The F16 (or F32) file is written with gguf.GGUFWriter in streaming fashion: the header and every
tensor's info first, then each tensor generated, written and dropped in turn, so memory stays at
one tensor (the 8B's embedding, 128256 x 4096, is the largest: 1 GiB of F16). llama.cpp's
`llama_model_quantize` (llama-cpp-python) then writes the quantized file, and the F16 is deleted
unless --keep-f16. Weights are N(0, std) (std 0.02, as HF initializes), norms are 1, so nothing
overflows F16 and every quantizer sees ordinary values; the model says nothing sensible, which a
speed or memory benchmark does not need.

The tokenizer is a byte-level BPE (llama.cpp's "gpt2" model, pre-tokenizer "llama-bpe"), trained
here on a paragraph of English, padded with unreachable filler tokens to the shape's vocabulary,
with Llama 3's special tokens at the end (<|begin_of_text|> = vocab - 256, ...): llama.cpp and
llmcli both load it, and the embedding and output matrices have the real model's size.

Output: benchmarks/out/random-<shape>-<type>.gguf (or --out). The tests import `write_random_llama`
and `quantize_gguf` for their tiny checkpoint (tests/test_llamacpp_accuracy.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool  # output projection = the token embedding (no output.weight)
    context: int = 131072
    rope_theta: float = 500000.0
    n_special: int = 256  # Llama 3's reserved special tokens at the end of the vocabulary


SHAPES = {
    "1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tied=True),  # Llama-3.2-1B
    "8b": Shape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256, tied=False),  # Llama-3.1-8B
}

# llama.cpp's quantization presets by name (llama_ftype); "pure" keeps every matrix in the preset's base type.
FTYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12,
    "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32,
}  # fmt: skip

TRAINING_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the other "
    "way. To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them. "
    "The quick brown fox jumps over the lazy dog; 0123456789 (numbers), \"quotes\", and new\nlines.\n"
)


def make_vocab(vocab: int, n_special: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE of exactly `vocab` tokens.

    The 256 byte symbols and the merges trained on TRAINING_TEXT come first, then filler tokens
    that no merge reaches (they keep the embedding at the real size), then `n_special` control
    tokens named as Llama 3's: <|begin_of_text|>, <|end_of_text|>, <|reserved_special_token_i|>.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trained = min(vocab - n_special, 1024)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=trained, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TRAINING_TEXT], trainer)
    model = tok.to_str()
    import json

    spec = json.loads(model)["model"]
    by_id = sorted(spec["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in by_id]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    fillers = vocab - n_special - len(tokens)
    if fillers < 0:
        raise SystemExit(f"vocabulary {vocab} is smaller than the {len(tokens)} byte-level tokens + {n_special} special ones")
    tokens += [f"filler{i}" for i in range(fillers)]
    types = [1] * len(tokens)  # NORMAL
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(n_special - 2)]
    tokens += specials[:n_special]
    types += [3] * n_special  # CONTROL
    return tokens, types, merges


def tensor_plan(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, numpy shape (rows, columns)) of every tensor, in llama.cpp's order."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    plan = [("token_embd.weight", (shape.vocab, shape.hidden))]
    for i in range(shape.layers):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", (shape.hidden,)),
            (b + "attn_q.weight", (shape.hidden, shape.hidden)),
            (b + "attn_k.weight", (kv, shape.hidden)),
            (b + "attn_v.weight", (kv, shape.hidden)),
            (b + "attn_output.weight", (shape.hidden, shape.hidden)),
            (b + "ffn_norm.weight", (shape.hidden,)),
            (b + "ffn_gate.weight", (shape.intermediate, shape.hidden)),
            (b + "ffn_up.weight", (shape.intermediate, shape.hidden)),
            (b + "ffn_down.weight", (shape.hidden, shape.intermediate)),
        ]
    plan.append(("output_norm.weight", (shape.hidden,)))
    if not shape.tied:
        plan.append(("output.weight", (shape.vocab, shape.hidden)))
    return plan


def write_random_llama(path: Path, shape: Shape, dtype: str = "F16", seed: int = 0, std: float = 0.02, given: dict[str, np.ndarray] | None = None) -> Path:
    """A llama GGUF with N(0, std) matrices and unit norms, in F16 or F32 (norms always F32),
    written one tensor at a time; `given` supplies some tensors' values instead (numpy shapes)."""
    import gguf

    if dtype not in ("F16", "F32"):
        raise SystemExit(f"--dtype {dtype}: the random weights are written as F16 or F32, then quantized by llama.cpp")
    float_type = np.float16 if dtype == "F16" else np.float32
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_rope_dimension_count(shape.hidden // shape.heads)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(FTYPES[dtype])
    tokens, types, merges = make_vocab(shape.vocab, shape.n_special)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(shape.vocab - shape.n_special)
    writer.add_eos_token_id(shape.vocab - shape.n_special + 1)
    writer.add_add_bos_token(False)
    plan = tensor_plan(shape)
    for name, dims in plan:
        item = np.dtype(np.float32 if len(dims) == 1 else float_type)
        writer.add_tensor_info(name, dims, item, int(np.prod(dims)) * item.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, dims in plan:
        if given and name in given:
            data = np.ascontiguousarray(given[name], dtype=np.float32 if len(dims) == 1 else float_type)
            if data.shape != dims:
                raise ValueError(f"{name}: given shape {data.shape}, the plan says {dims}")
        elif len(dims) == 1:
            data = np.ones(dims, dtype=np.float32)
        else:
            data = (rng.standard_normal(dims, dtype=np.float32) * np.float32(std)).astype(float_type, copy=False)
        writer.write_tensor_data(data)
        del data
    writer.close()
    return path


def quantize_gguf(src: Path, dst: Path, ftype: str, threads: int = 2, pure: bool = False) -> Path:
    """dst = llama.cpp's `llama_model_quantize` of src to the preset `ftype` (Q4_K_M, Q8_0, ...).

    allow_requantize: a quantized source is dequantized and quantized again, as llama-quantize
    --allow-requantize does. pure: every matrix (the embedding and the output too) in the preset's
    base type, no per-tensor mix. Written to dst.tmp and renamed, so a killed run leaves no half file.
    """
    import llama_cpp

    if ftype not in FTYPES:
        raise SystemExit(f"unknown type {ftype}; choose from {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.allow_requantize = True
    params.pure = pure
    params.nthread = threads
    tmp = dst.with_name(dst.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {src} -> {ftype} failed with {rc}")
    tmp.rename(dst)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--type", default="Q4_K_M", help=f"llama.cpp preset: {', '.join(FTYPES)}")
    ap.add_argument("--out", type=Path, default=None, help="the quantized file (default benchmarks/out/random-<shape>-<type>.gguf)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-f16", action="store_true", help="keep the F16 file next to the output")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    out = args.out or OUT / f"random-{args.shape}-{args.type}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    f16 = out.with_name(f"random-{args.shape}-F16.gguf")
    start = time.perf_counter()
    if not f16.is_file():
        write_random_llama(f16.with_name(f16.name + ".tmp"), shape, "F16", seed=args.seed).rename(f16)
    print(f"{f16}: {f16.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.type == "F16":
        return
    start = time.perf_counter()
    quantize_gguf(f16, out, args.type, threads=args.threads)
    print(f"{out}: {out.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if not args.keep_f16:
        f16.unlink()


if __name__ == "__main__":
    main()
