"""The hostile-model-file fuzzer: hypothesis mutations of a valid tiny GGUF and safetensors model,
run through llmcli's real loaders in a worker process that reports how each case ended.

Used by tests/test_fuzz_models.py (a bounded run in CI plus the corpus of crashers found) and by
benchmarks/fuzz_models.py (a longer campaign, --examples N). The seeds are built without
transformers: random llama weights written with llmcli's own safetensors writer, a real byte-level
BPE tokenizer (tests/tiny.py) and `llmcli quantize`'s GGUF writer (Q8_0), so both seeds load.

A case passes when every loader either succeeds or raises one ModelError whose text is one line;
anything else (another exception, a signal, a hang past the per-case timeout, peak RSS growing by
more than the file plus a fixed allowance for the interpreter's own objects) is a finding.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "corpus"
CASE_TIMEOUT_S = 20.0  # a tiny file loads in well under a second; a slow loop over a lying count takes forever
# Python objects built from a few hundred KB of header (lists of ints, the vocabulary's strings,
# the module) stay far below this; an allocation sized by a lying count or dimension does not.
RSS_ALLOWANCE = 48 * 1024 * 1024

# ------------------------------------------------------------------ seeds


def make_seed_dir(folder: Path, layers: int = 1, heads: int = 2, positions: int = 64) -> Path:
    """A tiny llama HF directory (hidden 32, `layers` layers of `heads` heads, a real BPE vocabulary), without transformers."""
    import numpy as np
    import torch

    from llmcli.core.weights import write_safetensors
    from tests.tiny import CHATML, make_bpe_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    make_bpe_tokenizer(folder)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    n_vocab = len(vocab) + 3  # the trainer's vocabulary plus its three special tokens
    hidden, inter, kv = 32, 64, 1
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": n_vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "max_position_embeddings": positions, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "silu",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None}))
    rng = np.random.default_rng(0)

    def w(*shape):
        return torch.from_numpy(rng.normal(0, 0.3, shape).astype(np.float32))

    tensors = {"model.embed_tokens.weight": w(n_vocab, hidden), "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        tensors.update(_layer_tensors(f"model.layers.{i}.", w, hidden, inter, kv * head_dim))
    write_safetensors(folder / "model.safetensors", tensors)
    return folder


def _layer_tensors(layer: str, w, hidden: int, inter: int, kv_width: int) -> dict:
    import torch

    return {
        layer + "self_attn.q_proj.weight": w(hidden, hidden), layer + "self_attn.k_proj.weight": w(kv_width, hidden),
        layer + "self_attn.v_proj.weight": w(kv_width, hidden), layer + "self_attn.o_proj.weight": w(hidden, hidden),
        layer + "mlp.gate_proj.weight": w(inter, hidden), layer + "mlp.up_proj.weight": w(inter, hidden),
        layer + "mlp.down_proj.weight": w(hidden, inter), layer + "input_layernorm.weight": torch.ones(hidden),
        layer + "post_attention_layernorm.weight": torch.ones(hidden),
    }


def make_seed_gguf(hf_dir: Path, out: Path) -> Path:
    from llmcli.core.gguf_write import preset, read_source, write_gguf

    write_gguf(read_source(hf_dir), out, preset("Q8_0"))
    return out


# ------------------------------------------------------------------ GGUF structure


def gguf_str(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


@dataclass
class GGUFParts:
    """A GGUF file taken apart into pieces that re-serialize to the same bytes."""

    version: int
    kvs: list[tuple[bytes, bytes]]  # (key, type + value bytes)
    tensors: list[list]  # [name bytes, ne list, type, relative offset]
    data: bytes
    alignment: int = 32
    n_kv: int | None = None  # a lying count; None: the true one
    n_tensors: int | None = None
    n_dims_lie: dict[int, int] = field(default_factory=dict)  # tensor index -> the n_dims written

    def to_bytes(self) -> bytes:
        out = [b"GGUF", struct.pack("<IQQ", self.version, len(self.tensors) if self.n_tensors is None else self.n_tensors,
                                    len(self.kvs) if self.n_kv is None else self.n_kv)]
        for key, value in self.kvs:
            out += [gguf_str(key), value]
        for i, (name, ne, gtype, offset) in enumerate(self.tensors):
            out += [gguf_str(name), struct.pack("<I", self.n_dims_lie.get(i, len(ne))), b"".join(struct.pack("<Q", d) for d in ne),
                    struct.pack("<IQ", gtype, offset)]
        head = b"".join(out)
        pad = -len(head) % self.alignment if self.alignment > 0 else 0
        return head + b"\x00" * pad + self.data


_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def parse_gguf(raw: bytes) -> GGUFParts:
    """The seed's pieces (a valid file: no checks here)."""
    pos = 4
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", raw, pos)
    pos += 20

    def string(p):
        (n,) = struct.unpack_from("<Q", raw, p)
        return raw[p + 8 : p + 8 + n], p + 8 + n

    def value_end(p, vtype):
        if vtype == 8:
            return string(p)[1]
        if vtype == 9:
            itype, count = struct.unpack_from("<IQ", raw, p)
            p += 12
            for _ in range(count):
                p = value_end(p, itype)
            return p
        return p + _SIZES[vtype]

    kvs = []
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", raw, pos)
        end = value_end(pos + 4, vtype)
        kvs.append((key, raw[pos:end]))
        pos = end
    tensors = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", raw, pos)
        ne = list(struct.unpack_from(f"<{n_dims}Q", raw, pos + 4))
        pos += 4 + 8 * n_dims
        gtype, offset = struct.unpack_from("<IQ", raw, pos)
        pos += 12
        tensors.append([name, ne, gtype, offset])
    alignment = 32
    data_start = -(-pos // alignment) * alignment
    return GGUFParts(version, kvs, tensors, raw[data_start:], alignment)


# ------------------------------------------------------------------ strategies

U64_EDGES = [0, 1, 2, 3, 31, 32, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**48, 2**62, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
U32_EDGES = [0, 1, 2, 3, 7, 8, 9, 15, 16, 30, 31, 32, 39, 40, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
u64 = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1))
u32 = st.one_of(st.sampled_from(U32_EDGES), st.integers(0, 2**32 - 1))

# the keys the loaders read first: the config, the tokenizer, the alignment
IMPORTANT_KEYS = [
    b"general.architecture", b"general.alignment", b"llama.block_count", b"llama.embedding_length", b"llama.feed_forward_length",
    b"llama.attention.head_count", b"llama.attention.head_count_kv", b"llama.context_length", b"llama.rope.dimension_count",
    b"llama.rope.freq_base", b"llama.attention.layer_norm_rms_epsilon", b"llama.vocab_size", b"tokenizer.ggml.model",
    b"tokenizer.ggml.pre", b"tokenizer.ggml.tokens", b"tokenizer.ggml.token_type", b"tokenizer.ggml.merges",
    b"tokenizer.ggml.scores", b"tokenizer.ggml.bos_token_id", b"tokenizer.ggml.eos_token_id", b"tokenizer.chat_template",
]


@st.composite
def gguf_value(draw, depth: int = 0) -> bytes:
    """Type + value bytes of any GGUF value: every scalar type, strings that are not UTF-8 or lie
    about their length, arrays whose count lies, arrays nested thousands deep, unknown types."""
    kind = draw(st.sampled_from(["scalar", "string", "bad_utf8", "string_len_lie", "array", "array_count_lie", "nested", "unknown_type"]))
    if kind == "scalar":
        vtype = draw(st.sampled_from(sorted(_SIZES)))
        return struct.pack("<I", vtype) + draw(st.binary(min_size=_SIZES[vtype], max_size=_SIZES[vtype]))
    if kind == "string":
        return struct.pack("<I", 8) + gguf_str(draw(st.text(max_size=40)).encode("utf-8", "surrogatepass"))
    if kind == "bad_utf8":
        return struct.pack("<I", 8) + gguf_str(draw(st.sampled_from([b"\xff\xfe", b"llama\x80", b"\xc3", b"\xed\xa0\x80", b"\x00"])))
    if kind == "string_len_lie":
        return struct.pack("<IQ", 8, draw(u64)) + b"llama"
    if kind == "array":
        itype = draw(st.sampled_from(sorted(_SIZES) + [8]))
        count = draw(st.integers(0, 6))
        if itype == 8:
            items = b"".join(gguf_str(draw(st.binary(max_size=8))) for _ in range(count))
        else:
            items = draw(st.binary(min_size=_SIZES[itype] * count, max_size=_SIZES[itype] * count))
        return struct.pack("<IIQ", 9, itype, count) + items
    if kind == "array_count_lie":
        return struct.pack("<IIQ", 9, draw(st.sampled_from([0, 4, 5, 8, 9, 12, 13])), draw(u64)) + b"\x01" * 16
    if kind == "nested":
        levels = draw(st.sampled_from([2, 3, 50, 1000, 5000]))
        return struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * (levels - 1) + struct.pack("<IQ", 4, 1) + b"\x07\x00\x00\x00"
    return struct.pack("<I", draw(st.integers(13, 2**32 - 1))) + b"\x00" * 8


@st.composite
def gguf_mutation(draw, parts: GGUFParts):
    """One structural lie, applied in place to a copy of the parts; returns its description."""
    n_t = len(parts.tensors)
    kind = draw(st.sampled_from([
        "n_kv", "n_tensors", "dim", "n_dims", "type", "offset", "overlap", "misalign", "value", "drop_key", "dup_key",
        "alignment", "tensor_name", "version",
    ]))
    if kind == "n_kv":
        parts.n_kv = draw(u64)
    elif kind == "n_tensors":
        parts.n_tensors = draw(u64)
    elif kind == "dim":
        i = draw(st.integers(0, n_t - 1))
        j = draw(st.integers(0, len(parts.tensors[i][1]) - 1))
        parts.tensors[i][1][j] = draw(u64)
    elif kind == "n_dims":
        parts.n_dims_lie[draw(st.integers(0, n_t - 1))] = draw(u32)
    elif kind == "type":
        parts.tensors[draw(st.integers(0, n_t - 1))][2] = draw(u32)
    elif kind == "offset":
        parts.tensors[draw(st.integers(0, n_t - 1))][3] = draw(st.one_of(u64, st.integers(0, len(parts.data) + 64)))
    elif kind == "overlap":  # two tensors over the same bytes
        i = draw(st.integers(1, n_t - 1))
        parts.tensors[i][3] = parts.tensors[draw(st.integers(0, i - 1))][3]
    elif kind == "misalign":
        i = draw(st.integers(0, n_t - 1))
        parts.tensors[i][3] += draw(st.integers(1, 31))
    elif kind == "value":
        keys = [k for k, _ in parts.kvs]
        key = draw(st.sampled_from([k for k in IMPORTANT_KEYS if k in keys] or keys))
        value = draw(gguf_value())
        parts.kvs = [(k, value if k == key else v) for k, v in parts.kvs]
    elif kind == "drop_key":
        key = draw(st.sampled_from([k for k, _ in parts.kvs]))
        parts.kvs = [(k, v) for k, v in parts.kvs if k != key]
    elif kind == "dup_key":
        key, _ = draw(st.sampled_from(parts.kvs))
        parts.kvs.append((key, draw(gguf_value())))
    elif kind == "alignment":
        value = draw(st.one_of(st.sampled_from([0, 1, 3, 7, 16, 64, 4096, 2**31, 2**32 - 1]).map(lambda a: struct.pack("<II", 4, a)), gguf_value()))
        parts.kvs = [(k, v) for k, v in parts.kvs if k != b"general.alignment"] + [(b"general.alignment", value)]
    elif kind == "tensor_name":
        i = draw(st.integers(0, n_t - 1))
        parts.tensors[i][0] = draw(st.one_of(st.sampled_from([b"", b"\xff\xfe", b"token_embd.weight", b"blk.0.attn_q.weight", b"blk.99.attn_q.weight"]), st.binary(max_size=24)))
    else:
        parts.version = draw(u32)
    return kind


@st.composite
def gguf_case(draw, seed: bytes) -> tuple[bytes, list[str]]:
    """A mutated copy of the seed: one to three structural lies, then maybe raw byte damage."""
    parts = parse_gguf(seed)
    parts.tensors = [list(t[:1]) + [list(t[1])] + list(t[2:]) for t in parts.tensors]
    what = [draw(gguf_mutation(parts)) for _ in range(draw(st.integers(1, 3)))]
    raw = parts.to_bytes()
    damage = draw(st.sampled_from(["none", "none", "truncate", "bytes"]))
    if damage == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
        what.append("truncate")
    elif damage == "bytes":
        at = draw(st.integers(0, min(len(raw) - 1, 4096)))  # the header, where the lies live
        patch = draw(st.binary(min_size=1, max_size=8))
        raw = raw[:at] + patch + raw[at + len(patch) :]
        what.append("bytes")
    return raw, what


SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F4", "U64", "f32", ""]
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8))
json_any = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)
int_edges = st.one_of(st.sampled_from([-1, 0, 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30]), st.integers(-10, 10**6))


@st.composite
def safetensors_case(draw, seed: bytes) -> tuple[bytes, list[str]]:
    """A mutated copy of a .safetensors file: lies in the JSON header's entries, in its length
    prefix, headers that are not objects or nest deeply, overlapping tensors, truncation."""
    (n,) = struct.unpack_from("<Q", seed)
    header = json.loads(seed[8 : 8 + n])
    data = seed[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    what = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["dtype", "shape", "offsets", "overlap", "entry", "metadata", "drop", "extra"]))
        what.append(kind)
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        if not isinstance(entry, dict):
            continue
        if kind == "dtype":
            entry["dtype"] = draw(st.one_of(st.sampled_from(SAFETENSORS_DTYPES), json_any))
        elif kind == "shape":
            entry["shape"] = draw(st.one_of(st.lists(int_edges, max_size=9), json_any))
        elif kind == "offsets":
            entry["data_offsets"] = draw(st.one_of(st.lists(int_edges, min_size=2, max_size=2), st.lists(int_edges, max_size=4), json_any))
        elif kind == "overlap":
            other = header.get(draw(st.sampled_from(names)))  # None when an earlier mutation dropped it
            entry["data_offsets"] = list(other["data_offsets"]) if isinstance(other, dict) and "data_offsets" in other else [0, 0]
        elif kind == "entry":
            header[name] = draw(json_any)
        elif kind == "metadata":
            header["__metadata__"] = draw(json_any)
        elif kind == "drop":
            header.pop(name, None)
        else:
            header[draw(st.text(max_size=12))] = draw(st.one_of(json_any, st.just({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]})))
    text = json.dumps(header).encode()
    form = draw(st.sampled_from(["json", "json", "json", "not_object", "deep", "bad_utf8", "length_lie", "truncate"]))
    if form == "not_object":
        text = json.dumps(draw(json_any)).encode()
    elif form == "deep":
        depth = draw(st.sampled_from([100, 5000, 200000]))
        text = b"[" * depth + b"]" * depth
    elif form == "bad_utf8":
        text = text[:-1] + b',"\xff\xfe": 1}'
    what.append(form)
    raw = struct.pack("<Q", len(text)) + text + data
    if form == "length_lie":
        raw = struct.pack("<Q", draw(u64)) + raw[8:]
    elif form == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    return raw, what


# ------------------------------------------------------------------ the worker


WORKER = r"""
import gc, json, os, resource, signal, sys, traceback
sys.path.insert(0, os.environ["FUZZ_REPO"])
import torch
from llmcli.errors import ModelError
from llmcli.core.gguf_meta import read_gguf_header
from llmcli.core.weights import map_gguf, read_safetensors
from llmcli.core.tokenizer import load_tokenizer
from llmcli.core.loader import load_model

class Hang(BaseException):
    pass

def on_alarm(signum, frame):
    raise Hang()

signal.signal(signal.SIGALRM, on_alarm)
# a runaway allocation fails (MemoryError) instead of swapping the machine
_, hard = resource.getrlimit(resource.RLIMIT_AS)

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0

def forward(path):
    loaded = load_model(path)
    with torch.inference_mode():
        ids = torch.tensor([[1, 2, 3]])
        loaded.module(ids)
        loaded.tokenizer.encode("hi")

def run(kind, path):
    if kind == "gguf":
        read_gguf_header(path)
        map_gguf(path)
        load_tokenizer(path)
        forward(path)
    else:
        read_safetensors(path)
        forward(path)

def memory_in_chain(exc):
    while exc is not None:
        if isinstance(exc, MemoryError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False

for line in sys.stdin:
    case = json.loads(line)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    if resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_AS, (status("VmSize:") + (4 << 30), hard))
    before = status("VmRSS:")
    outcome, message = "ok", ""
    signal.setitimer(signal.ITIMER_REAL, case["timeout"])
    try:
        run(case["kind"], case["path"])
    except Hang:
        outcome, message = "hang", traceback.format_exc(limit=-3)
    except ModelError as exc:
        outcome, message = "model_error", str(exc)
        if memory_in_chain(exc):
            outcome = "memory_error"
    except BaseException as exc:
        outcome, message = "other", "".join(traceback.format_exception(exc, limit=-4))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    growth = status("VmHWM:") - before
    print(json.dumps({"outcome": outcome, "message": message, "growth": growth}), flush=True)
"""


class Worker:
    """One process that keeps torch and llmcli imported and runs cases sent to it; restarted after
    a case kills it. RLIMIT_AS bounds it so a runaway allocation fails instead of swapping."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "FUZZ_REPO": str(REPO), "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env)

    def run(self, kind: str, path: Path, timeout: float = CASE_TIMEOUT_S) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        proc = self.proc
        proc.stdin.write(json.dumps({"kind": kind, "path": str(path), "timeout": timeout}) + "\n")
        proc.stdin.flush()
        # the first case also pays for the imports and kernels; a hang in C code ignores the alarm
        ready, _, _ = select.select([proc.stdout], [], [], timeout + 60)
        if not ready:
            proc.kill()
            proc.wait()
            self.proc = None
            return {"outcome": "hang", "message": f"no answer in {timeout + 60:.0f} s", "growth": 0}
        line = proc.stdout.readline()
        if not line:
            code = proc.wait()
            self.proc = None
            return {"outcome": "crash", "message": f"the worker died with status {code}", "growth": 0}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        self.proc = None


def problem(result: dict, file_size: int) -> str | None:
    """What is wrong with a case's result, or None when it ended as a loader must."""
    outcome = result["outcome"]
    if outcome == "model_error" and "\n" in result["message"]:
        return f"a ModelError of several lines: {result['message']!r}"
    if outcome not in ("ok", "model_error"):
        return f"{outcome}: {result['message']}"
    if result["growth"] > file_size + RSS_ALLOWANCE:
        return f"peak RSS grew by {result['growth'] / 2**20:.1f} MiB for a file of {file_size / 2**20:.2f} MiB ({outcome}: {result['message'][:200]})"
    return None


def place_case(kind: str, raw: bytes, workdir: Path, seed_dir: Path, name: str = "case") -> Path:
    """Write a case where the loaders expect it: a .gguf file, or a model directory whose
    model.safetensors is the case (config.json and the tokenizer from the seed)."""
    if kind == "gguf":
        path = workdir / f"{name}.gguf"
        path.write_bytes(raw)
        return path
    folder = workdir / name
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(seed_dir / f, folder / f)
    (folder / "model.safetensors").write_bytes(raw)
    return folder
