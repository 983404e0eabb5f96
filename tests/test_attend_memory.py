"""attend --attention streams the attention map layer by layer: peak memory grows with one layer's
[heads, T, T], not with [layers, heads, T, T], and the record is the same bytes as encode_tensor
of the whole array."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model_fuzz import make_seed_dir

REPO = Path(__file__).resolve().parent.parent
LAYERS, HEADS, LONG = 32, 4, 600

# attend in this process, then its peak resident memory (VmHWM) in bytes on stdout
PEAK = """
import sys
from llmcli.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    if exc.code:
        raise
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) * 1024)
"""


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    return make_seed_dir(tmp_path_factory.mktemp("deep") / "model", layers=LAYERS, heads=HEADS, positions=1024)


def peak_of_attend(model: Path, n_tokens: int, folder: Path) -> tuple[int, Path]:
    source = folder / f"ids-{n_tokens}.jsonl"
    source.write_text(json.dumps({"id": 7, "ids": [(5 + 37 * i) % 300 for i in range(n_tokens)]}) + "\n")
    out = folder / f"attend-{n_tokens}.jsonl"
    done = subprocess.run([sys.executable, "-c", PEAK, "attend", str(source), "-m", str(model), "--attention", "-o", str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1]), out


def test_attention_peak_memory_grows_with_one_layer(deep_model, tmp_path):
    short_peak, short_out = peak_of_attend(deep_model, 8, tmp_path)
    long_peak, long_out = peak_of_attend(deep_model, LONG, tmp_path)
    layer = HEADS * LONG * LONG * 4  # one layer's float32 [heads, T, T]: 5.8 MB
    whole = LAYERS * layer  # what holding every layer costs: 184 MB (and its base64 text 4/3 of that again)
    growth = long_peak - short_peak
    # a layer's scores, mask and softmax are a few transient [heads, T, T] each (measured: 56 MiB with
    # 24 layers, the same with 48; before streaming, 891 MiB with 24)
    assert growth < 8 * layer + 24 * 2**20, f"peak grew by {growth / 2**20:.1f} MiB; one layer is {layer / 2**20:.1f} MiB, all {whole / 2**20:.1f} MiB"

    # the long record holds every layer, and the short one is byte for byte encode_tensor of the whole stack
    with open(long_out, "rb") as f:  # 245 MB of text: read its ends, not the whole
        head = f.read(1 << 18)  # the ids and the hidden states come first
        f.seek(-4, os.SEEK_END)
        tail = f.read()
    opening = f'"attention":{{"dtype":"float32","shape":[{LAYERS},{HEADS},{LONG},{LONG}],"data":"'.encode()
    assert opening in head and tail == b'"}}\n'
    data_start = head.index(opening) + len(opening)
    assert long_out.stat().st_size == data_start + -(-whole // 3) * 4 + len(tail)  # every layer's base64, one line
    import torch

    from llmcli.core.loader import load_model
    from llmcli.records import _dumps, encode_tensor

    loaded = load_model(deep_model)
    source = json.loads((tmp_path / "ids-8.jsonl").read_text())
    with torch.inference_mode():
        result = loaded.module(torch.tensor([source["ids"]]), output_attentions=set(range(LAYERS)), compute_logits=False)
    expected = {**source, "hidden": encode_tensor(result.last_hidden[0].numpy()),
                "attention": encode_tensor(torch.stack([result.attentions[b][0] for b in range(LAYERS)]).numpy())}
    assert short_out.read_text() == _dumps(expected) + "\n"
