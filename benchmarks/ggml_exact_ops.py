"""How far op-by-op bit-exactness with ggml carries llmcli's agreement with llama.cpp (an experiment).

    python benchmarks/ggml_exact_ops.py [--tokens 512] [--ops matmul,rms_norm,rope]

On SmolLM2 Q4_1 (the catalogue file), llmcli runs with some of its ops replaced by ggml's exact
arithmetic, and is compared with llama.cpp's run with an F32 K/V cache (the same attention
arithmetic as llmcli's, up to summation order), layer by layer and at the logits:

- matmul: every GGML-block product through llama.cpp's own CPU code, `from_float` of the weight
  type's vec_dot_type (quantize_row_q8_1 for Q4_1, q8_0 for Q8_0) and its `vec_dot`, one output
  at a time: a small C shim compiled here against llama-cpp-python's libggml-cpu.so
  (ggml_get_type_traits_cpu). This is what ggml's mul_mat computes for Q4_1 on x86 (no llamafile,
  repack or tiled path takes Q4_1), bit for bit.
- rms_norm: ggml_compute_forward_rms_norm_f32: the sum of float32 squares in double, in order,
  the mean rounded to float, scale = 1 / sqrtf(mean + eps), then (x * scale) * weight.
- rope: ggml_rope_cache_init and rotate_pairs: theta_scale = powf(base, -2 / n_dims), theta
  multiplied by it pair after pair (not base^(-2i/d) per pair), libm's cosf / sinf, and the
  rotation as gcc contracts it: fma(x0, cos, -(x1 * sin)), fma(x0, sin, x1 * cos).

Everything else stays llmcli's (attention.c for attention, the silu kernel, adds). The point is
the cascade: llama.cpp rounds every matmul input to 8 bits, so a last-bit difference anywhere
moves a rounding somewhere, and SmolLM2's activation outliers turn one moved rounding into a
visibly different row two layers later. benchmarks/README.md ("Agreement with llama.cpp") has
the figures and what they mean. Needs gcc and llama-cpp-python; ~3-6 min on 2 busy cores.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.agreement import BLOCK_TENSORS, divergence, files, hamlet, llamacpp_run, perplexity, tokens, top1  # noqa: E402

SHIM = r"""
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
typedef void (*from_float_t)(const float *, void *, int64_t);
typedef void (*vec_dot_t)(int n, float *s, size_t bs, const void *x, size_t bx, const void *y, size_t by, int nrc);
struct traits { from_float_t from_float; vec_dot_t vec_dot; int vec_dot_type; int64_t nrows; };
extern const struct traits *ggml_get_type_traits_cpu(int type);
extern void ggml_cpu_init(void);
extern size_t ggml_row_size(int type, int64_t ne);
/* Y[M,N] = X[M,K] . W[N,K]^T, each output one vec_dot of the quantized activation row, as ggml's mul_mat */
int ggml_mm(int wtype, const void *W, int N, const float *X, int M, int K, float *Y) {
    ggml_cpu_init();
    const struct traits *t = ggml_get_type_traits_cpu(wtype), *ta = ggml_get_type_traits_cpu(t->vec_dot_type);
    size_t arow = ggml_row_size(t->vec_dot_type, K), wrow = ggml_row_size(wtype, K);
    char *q = malloc(arow * (size_t)M);
    if (!q) return -1;
    for (int m = 0; m < M; m++) ta->from_float(X + (size_t)m * K, q + arow * m, K);
    #pragma omp parallel for
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++)
            t->vec_dot(K, &Y[(size_t)m * N + n], 0, (const char *)W + wrow * n, 0, q + arow * m, 0, 1);
    free(q);
    return 0;
}
"""


def build_shim(folder: Path) -> ctypes.CDLL:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    src, out = folder / "ggml_mm.c", folder / "libggml_mm.so"
    src.write_text(SHIM)
    cmd = ["gcc", "-O2", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(out), f"-L{lib}", "-l:libggml-cpu.so", "-l:libggml-base.so", f"-Wl,-rpath,{lib}"]
    subprocess.run(cmd, check=True)
    shim = ctypes.CDLL(str(out))
    shim.ggml_mm.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return shim


def ggml_matmul(model, shim) -> None:
    from llmcli.core.formats import BlockLinear, ConcatLinear

    def block_forward(mod):
        def forward(x):
            flat = x.reshape(-1, mod.in_features).contiguous().float()
            y = torch.empty((flat.shape[0], mod.out_features), dtype=torch.float32)
            assert shim.ggml_mm(mod.gtype.id, mod.blocks.data_ptr(), mod.out_features, flat.data_ptr(), flat.shape[0], mod.in_features, y.data_ptr()) == 0
            return (y if mod.bias is None else y + mod.bias).view(*x.shape[:-1], mod.out_features)

        return forward

    for mod in model.modules():
        if isinstance(mod, BlockLinear):
            mod.forward = block_forward(mod)
        elif isinstance(mod, ConcatLinear):
            mod.forward = (lambda m: lambda x: torch.cat([p(x) for p in m.parts], dim=-1))(mod)


def ggml_rms_norm(model) -> None:
    from llmcli.core.models.llama import RMSNorm

    def forward(self, x):
        squares = (x * x).double().sum(-1, keepdim=True)  # float32 squares, summed in double
        mean = (squares / x.shape[-1]).float()
        root = torch.sqrt((mean + torch.tensor(self.eps, dtype=torch.float32)).double()).float()  # sqrtf, correctly rounded
        return (x * (1.0 / root)) * self.weight

    for mod in model.modules():
        if isinstance(mod, RMSNorm):
            mod.forward = forward.__get__(mod)


def ggml_rope(model) -> None:
    import llmcli.core.models.llama as llama

    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.cosf.restype = libm.sinf.restype = libm.powf.restype = ctypes.c_float
    libm.cosf.argtypes = libm.sinf.argtypes = [ctypes.c_float]
    libm.powf.argtypes = [ctypes.c_float, ctypes.c_float]
    c = model.config
    dims, n_pos = c.head_dim, 2048
    scale = np.float32(libm.powf(np.float32(c.rope_theta), np.float32(-2.0) / np.float32(dims)))
    theta = np.empty((n_pos, dims // 2), dtype=np.float32)
    theta[:, 0] = np.arange(n_pos, dtype=np.float32)
    for i in range(1, dims // 2):
        theta[:, i] = theta[:, i - 1] * scale
    cos = np.array([libm.cosf(float(t)) for t in theta.ravel()], dtype=np.float32).reshape(theta.shape)
    sin = np.array([libm.sinf(float(t)) for t in theta.ravel()], dtype=np.float32).reshape(theta.shape)
    cos_t, sin_t = torch.from_numpy(np.concatenate([cos, cos], -1)), torch.from_numpy(np.concatenate([sin, sin], -1))

    def rope_tables(self, positions, dtype):
        return {name: (cos_t[positions], sin_t[positions]) for name in {s.rope for s in self.specs if s.rope}}

    def apply_rope(x, cos, sin):  # fma(a, b, c) as float64 a * b + c rounded once to float32 (exact here: checked against llama.cpp's Qcur)
        half = x.shape[-1] // 2
        x0, x1 = x[..., :half].double(), x[..., half:].double()
        c, s = cos[..., :half].double(), sin[..., :half].double()
        return torch.cat(((x0 * c - (x1 * s).float().double()).float(), (x0 * s + (x1 * c).float().double()).float()), -1)

    model.rope_tables = rope_tables.__get__(model)
    llama.apply_rope = apply_rope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--ops", default="matmul,rms_norm,rope", help="which ops to make ggml-exact (comma list, or none)")
    args = parser.parse_args()
    from llmcli.core.loader import load_model

    path = files(["smollm2-q4_1"])["smollm2-q4_1"]
    ids = tokens(path, hamlet(), args.tokens, bos=False)
    threads = torch.get_num_threads()
    ref_logits, ref = llamacpp_run(path, ids, f32_kv=True, threads=threads, keep=r"(%s)-\d+" % "|".join(BLOCK_TENSORS))
    model = load_model(path).module
    ops = [op for op in args.ops.split(",") if op and op != "none"]
    with tempfile.TemporaryDirectory() as folder:
        if "matmul" in ops:
            ggml_matmul(model, build_shim(Path(folder)))
        if "rms_norm" in ops:
            ggml_rms_norm(model)
        if "rope" in ops:
            ggml_rope(model)
        from benchmarks.agreement import llmcli_run

        ours_logits, ours = llmcli_run(path, ids, capture=True, model=model)
    print(f"ggml-exact ops: {', '.join(ops) or 'none'}; {len(ids)} tokens; llmcli vs llama.cpp (F32 K/V): rms rel / fraction of elements not equal")
    layers = 1 + max(int(k.rsplit("-", 1)[1]) for k in ours)
    for layer in range(layers):
        cells = [
            f"{t} {r:.1e}/{f:.2f}"
            for t in BLOCK_TENSORS
            for r, f in [divergence(ours[f"{t}-{layer}"], ref[f"{t}-{layer}"].reshape(ours[f"{t}-{layer}"].shape))]
        ]
        print(f"{layer:3d}  " + "  ".join(cells))
    print(f"top-1 {top1(ours_logits, ref_logits):.2%}  perplexity {perplexity(ours_logits, ids):.3f} (llama.cpp {perplexity(ref_logits, ids):.3f})")


if __name__ == "__main__":
    main()
