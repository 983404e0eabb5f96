"""Cosine similarity of consecutive pairs of `embedding` records (normalized, so a dot product).

Usage: ... | llmcli encode -m all-minilm-l6-v2 --pool mean --normalize --floats | python3 sample_data/similarity.py
"""

import json
import sys

rows = [json.loads(line) for line in sys.stdin]
for a, b in zip(rows[::2], rows[1::2]):
    cosine = sum(x * y for x, y in zip(a["embedding"], b["embedding"]))
    print(f"{cosine:.3f}  {a['text']}  <>  {b['text']}")
