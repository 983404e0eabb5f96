"""Long prompts without quadratic memory: attention never holds a (T, T) mask or scores, and the
batcher's KV cache holds memory only for the rows and positions that are running.

Peak memory is measured in a child process run with MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB:
every tensor of a long prompt is then its own mapping, returned when it is freed, so the peak
RSS (VmHWM, reset before each prefill) is the peak of what that prefill allocated, whatever
the load on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llmcli
from llmcli.core.generate import Request
from llmcli.core.loader import load_model
from llmcli.core.models import base
from llmcli.core.models.base import KVCache, causal_mask, masked_attention, reference_attention
from llmcli.engine import Engine
from llmcli.engine.batcher import ContinuousBatcher
from tests.tiny import load_reference, make_tiny

PEAK_SCRIPT = r"""
import json, re, sys, torch
from llmcli.core.config import ModelConfig
from llmcli.core.models import gpt2, llama
from llmcli.core.models.base import KVCache

lengths = [int(t) for t in sys.argv[1].split(",")]
common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8192, tie_word_embeddings=True)
torch.manual_seed(0)
models = {
    "prefill": llama.Model(ModelConfig(model_type="llama", num_key_value_heads=1, **common)),
    "after a cached prefix": llama.Model(ModelConfig(model_type="llama", num_key_value_heads=1, **common)),
    "sliding window": llama.Model(ModelConfig(model_type="llama", num_key_value_heads=1, sliding_window=256, **common)),
    "gpt2 after a cached prefix": gpt2.Model(ModelConfig(model_type="gpt2", hidden_act="gelu_new", **common)),
}

def peak_kib():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))

def rss_kib():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

@torch.inference_mode()
def prefill(path, T):
    model = models[path].eval()
    ids = torch.randint(0, 256, (1, T))
    cache = KVCache.for_model(model.config, 1, T)
    if path.endswith("prefix"):  # a saved prompt cache resumed, a chat's next turn
        model(ids[:, :16], cache=cache, logits_index=torch.tensor([15]))
        ids = ids[:, 16:]
    model(ids, cache=cache, logits_index=torch.tensor([ids.shape[1] - 1]))

out = {}
for path in models:
    prefill(path, 64)
    out[path] = {}
    for T in lengths:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS now
        before = rss_kib()
        prefill(path, T)
        out[path][T] = peak_kib() - before
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resetting the peak RSS needs Linux's /proc/self/clear_refs")
def test_prefill_peak_memory_grows_linearly_with_prompt_length(tmp_path):
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    root = str(Path(llmcli.__file__).resolve().parents[1])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, str(script), "1024,4096"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    peaks = json.loads(done.stdout)
    for path, kib in peaks.items():
        small, large = kib["1024"], kib["4096"]
        # linear: 4x the prompt, about 4x the memory; (T, T) masks made it 9-10x (quadratic: 16x)
        assert large < 4.5 * small, f"{path}: {small} KiB at 1024 tokens, {large} KiB at 4096: {peaks}"


# ------------------------------------------------------------ blocked attention is exact


def _qkv(B: int, H: int, Hkv: int, T: int, S: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, 16, generator=g), torch.randn(B, Hkv, S, 16, generator=g), torch.randn(B, Hkv, S, 16, generator=g)


@pytest.mark.parametrize("window", [None, 5])
def test_masked_attention_in_blocks_equals_one_whole_mask(monkeypatch, window):
    monkeypatch.setattr(base, "ATTENTION_BLOCK", 8)
    # two rows resuming at different cached lengths (7 and 12), 21 new positions each, GQA 4/2
    q, k, v = _qkv(2, 4, 2, 21, 33)
    positions = torch.tensor([[7], [12]]) + torch.arange(21)[None, :]
    got = masked_attention(q, k, v, positions, window, enable_gqa=True)
    expected, _ = reference_attention(q, k, v, causal_mask(positions, 33, window))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # each row alone computes the same numbers as in the batch
    for row in range(2):
        alone = masked_attention(q[row : row + 1], k[row : row + 1], v[row : row + 1], positions[row : row + 1], window, enable_gqa=True)
        torch.testing.assert_close(alone, got[row : row + 1], atol=1e-6, rtol=0)


def test_masked_attention_equals_sdpa_causal_for_a_fresh_prompt(monkeypatch):
    monkeypatch.setattr(base, "ATTENTION_BLOCK", 8)
    q, k, v = _qkv(1, 2, 2, 30, 30, seed=1)
    got = masked_attention(q, k, v, torch.arange(30)[None, :])
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=0)


def make_tiny_with(kind: str, path: Path, **changes) -> Path:
    """A tiny checkpoint whose config.json says `changes` (fields the random weights do not depend on)."""
    make_tiny(kind, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    return path


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A tiny Mistral with an 8-token sliding window (transformers applies it in eager attention)."""
    path = make_tiny_with("mistral", tmp_path_factory.mktemp("mistral-window"), sliding_window=8)
    return load_model(path), load_reference(path)


@torch.inference_mode()
def test_sliding_window_in_blocks_matches_transformers(windowed, monkeypatch):
    monkeypatch.setattr(base, "ATTENTION_BLOCK", 16)
    ours, ref = windowed
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(5))
    expected = ref(ids).logits
    torch.testing.assert_close(ours.module(ids).logits, expected, atol=1e-4, rtol=0)
    # a prefix in the cache, then the other 30 positions in one prefill (blocked, windowed, resumed)
    cache = KVCache.for_model(ours.config, 1, 64)
    head = ours.module(ids[:, :10], cache=cache).logits
    tail = ours.module(ids[:, 10:], cache=cache).logits
    torch.testing.assert_close(torch.cat([head, tail], dim=1), expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------ the batcher's KV cache


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """A tiny llama with a 2048-position context (rope positions: the weights do not depend on it)."""
    return make_tiny_with("llama", tmp_path_factory.mktemp("llama-2k"), max_position_embeddings=2048)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_long_prompt_grows_one_cache_row_and_gives_it_back(long_context):
    batcher = ContinuousBatcher(load_model(long_context), batch_size=8)
    batcher.add(Request(id=0, prompt_ids=_ids(1500, 1), max_tokens=3, ignore_eos=True))
    while not batcher.step():  # the prompt's chunks (--max-batched-tokens), then its first token
        pass
    cache = batcher.cache
    # the issue: every one of the 8 rows grew to the long prompt's length, and stayed so
    assert cache.rows == 1 and 1500 < cache.capacity <= 2048
    while batcher.has_work():
        batcher.step()
    assert (cache.rows, cache.capacity) == (1, 256)
    # shorter requests afterwards take rows as they come, at the small length
    for i in range(3):
        batcher.add(Request(id=i + 1, prompt_ids=_ids(20, i + 2), max_tokens=5, ignore_eos=True))
    batcher.step()  # all three admitted in one step: rows for the three, not for the batch
    assert cache.rows == 3 and cache.capacity == 256


def test_results_do_not_change_when_the_cache_shrinks_under_running_sequences(long_context):
    engine = Engine(long_context)
    # the long prompt finishes first, while the short ones keep decoding in the shrunk cache
    def make():
        return [Request(id=i, prompt_ids=_ids(700 if i == 0 else 15 + i, 10 + i), max_tokens=2 if i == 0 else 12, ignore_eos=True) for i in range(4)]
    alone = [r.generated_ids for r in engine.iter_results(make(), batch_size=1)]
    batcher = engine.make_batcher(4)
    for request in make():
        batcher.add(request)
    shrunk = False
    results: dict[int, list[int]] = {}
    while batcher.has_work():
        for event in batcher.step():
            if event.finish_reason is not None:
                results[event.request.id] = event.generated_ids
        shrunk = shrunk or (0 in results and len(results) < 4 and batcher.cache.capacity == 256)
    assert shrunk
    assert [results[i] for i in range(4)] == alone


def test_a_finished_batch_is_not_held_twice_by_its_rows_and_the_prefix_cache(long_context):
    """The prefix cache keeps a copy of each finished sequence's blocks, so its row's pages go back:
    a batch finishing together held its K/V twice at its end (116 MiB of a 1B's peak RSS). The
    released rows read as zeros; the same requests again start from the cached blocks and give the
    same tokens as the first time."""
    engine = Engine(long_context)

    def make():
        return [Request(id=i, prompt_ids=_ids(40 + i, 30 + i), max_tokens=24, ignore_eos=True) for i in range(4)]

    batcher = engine.make_batcher(4)
    for request in make():
        batcher.add(request)
    first: dict[int, list[int]] = {}
    while batcher.has_work():
        first.update({e.request.id: e.generated_ids for e in batcher.step() if e.finish_reason is not None})
    cache = batcher.cache
    assert cache.lazy and engine.prefix_cache.bytes_used > 0
    assert all(float(t.abs().sum()) == 0.0 for t in (*cache.k, *cache.v))  # every row's pages given back
    again = {r.request.id: r for r in engine.iter_results(make(), batch_size=4)}
    assert {i: again[i].generated_ids for i in again} == first
    assert all(again[i].cached_tokens >= 32 for i in again)


LAZY_CACHE_SCRIPT = r"""
import re, threading, torch
from llmcli.core.models.base import cache_zeros

def rss_kib():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

def grow_cache(out):
    # glibc maps a large block and, once that block is freed, raises its mapping threshold above its
    # size; a calloc below the threshold then comes from a heap, and on a thread's heap (the engine
    # runs on its own thread) calloc writes every zero, which makes the whole capacity resident
    scratch = torch.empty(8 << 20, dtype=torch.uint8)
    scratch.fill_(1)
    del scratch
    before = rss_kib()
    layers = [cache_zeros((16, 3, 256, 64), torch.float32, "cpu") for _ in range(30)]  # SmolLM2's keys for 16 rows
    allocated = rss_kib() - before
    for t in layers:
        t[:, :, 0] = 1.0  # one position of every row written: one page per (row, head) resident
    out.extend([allocated, rss_kib() - before, all(float(t[:, :, 1:].abs().sum()) == 0.0 for t in layers)])

out = []
worker = threading.Thread(target=grow_cache, args=(out,))
worker.start()
worker.join()
print(*out)
"""


def test_kv_cache_memory_is_resident_only_where_written():
    """A cache grown to 16 rows x 256 positions holds memory for the positions written, not for its
    capacity. Through calloc, glibc wrote zeros into heap blocks once its mapping threshold had
    risen (here a part of the capacity was resident at allocation; in the engine, a batch of 16
    made all 184 MiB of SmolLM2's 256 positions resident at admission)."""
    out = subprocess.run([sys.executable, "-c", LAZY_CACHE_SCRIPT], capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    allocated, written, zeros = out.stdout.split()
    allocated, written = int(allocated), int(written)
    assert zeros == "True"
    capacity = 30 * 16 * 3 * 256 * 64 * 4 // 1024
    pages = 30 * 16 * 3 * 4  # one 4 KiB page per (layer, row, head)
    assert allocated < capacity // 50, (allocated, capacity)
    assert written < 2 * pages + capacity // 50, (written, pages, capacity)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def test_cache_rows_come_without_a_copy_and_finished_rows_give_their_pages_back():
    """A mapped cache has every row from the start (resident only where written), so admitting
    rows copies nothing (the tensors stay where they are), and trimming to fewer rows releases the
    pages of the rows above while the rows below keep their keys and values."""
    cache = KVCache(num_layers=8, batch_size=16, num_kv_heads=2, head_dim=64, max_len=1024, initial_len=256, initial_rows=1)
    assert cache.lazy and cache.rows == 1
    where = [t.data_ptr() for t in (*cache.k, *cache.v)]
    cache.reserve(200, 16)
    assert cache.rows == 16 and cache.capacity == 256
    assert [t.data_ptr() for t in (*cache.k, *cache.v)] == where  # no reallocation, no copy
    before = _rss_kib()
    for t in (*cache.k, *cache.v):
        t[:, :, :200] = torch.arange(16, dtype=torch.float32)[:, None, None, None] + 1  # row r holds r + 1
    written = _rss_kib() - before
    expected = 16 * 16 * 2 * 200 * 64 * 4 // 1024  # 16 tensors x 16 rows x 2 heads x 200 positions x 64 floats
    assert written > 0.9 * expected, (written, expected)
    assert not cache.trim(200, 3)  # 3 rows still run: the pages of rows 3..15 go, no copy (the positions still fit)
    released = before + written - _rss_kib()
    assert released > 0.9 * expected * 13 / 16, (released, expected)
    assert cache.rows == 3 and [t.data_ptr() for t in (*cache.k, *cache.v)] == where
    for t in (*cache.k, *cache.v):
        assert torch.equal(t[:3, :, :200], torch.arange(1, 4, dtype=torch.float32)[:, None, None, None].expand(3, 2, 200, 64))
        assert float(t[3:].abs().sum()) == 0.0  # released pages read as zeros again
    # half the rows still running keeps them all: rows that come and go often do not fault their pages in anew
    assert not cache.trim(200, 2) and cache.rows == 3
