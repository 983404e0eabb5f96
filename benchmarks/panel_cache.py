"""Does a cache of float32 weights in the kernels' panel order pay off for an HF float32 model?

    python benchmarks/panel_cache.py          # about a minute on 2 cores; writes ~1.1 GB under /tmp

Builds a random float32 HF llama shaped like SmolLM2-135M (hidden 576, 30 layers, intermediate
1536, vocab 49152: 540 MB of safetensors), then, each in a fresh process with a warm page cache:
  load        llmcli.core.loader.load_model(dir): maps the safetensors, fuses, packs every linear
              layer into panels (what every start does without a panel cache)
  pack only   the packing step alone (kernels.linear.pack_panels over the fused weights)
  map cache   what a panel cache would cost instead: map the packed file and touch every page
              (reading it is what a first decode step would do)
A panel cache saves at most `pack only - map cache` per start, and costs the model's size again
on disk (540 MB here).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from pathlib import Path
from llmcli.core.kernels.linear import pack_panels
from llmcli.core.weights import read_safetensors, write_safetensors
what, folder = sys.argv[1], Path(sys.argv[2])
t = time.perf_counter()
if what == "load":
    from llmcli.core.loader import load_model
    load_model(folder, cache_dir=folder / "cache")
elif what == "pack":
    tensors = read_safetensors(folder)
    for name, w in tensors.items():
        if w.dim() == 2 and "embed" not in name:
            pack_panels(w)
elif what == "write":
    tensors = read_safetensors(folder)
    write_safetensors(folder / "panels.safetensors", {n: pack_panels(w) for n, w in tensors.items() if w.dim() == 2 and "embed" not in n})
else:
    total = sum(float(t.view(-1)[:: 1024].sum()) for t in read_safetensors(folder / "panels.safetensors").values())
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def main() -> None:
    import torch
    import transformers

    folder = Path(tempfile.mkdtemp(prefix="llmcli-panels-"))
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    from tests.tiny import make_bpe_tokenizer

    make_bpe_tokenizer(folder)

    def run(what: str) -> float:
        done = subprocess.run([sys.executable, "-c", CHILD, what, str(folder)], capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]

    run("load")  # builds the kernels, warms the page cache
    run("write")
    rows = {what: min(run(what) for _ in range(3)) for what in ("load", "pack", "map")}
    for what, seconds in rows.items():
        print(f"{what:5s} {seconds:6.2f} s")


if __name__ == "__main__":
    main()
