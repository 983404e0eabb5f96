"""A longer campaign of the hostile-model-file fuzzer (tests/model_fuzz.py) than CI runs.

    python benchmarks/fuzz_models.py --examples 2000 [--kind gguf|safetensors|both] [--save]

Runs N hypothesis examples per kind through the real loaders in a worker process and prints every
finding (an exception other than one one-line ModelError, a crash, a hang, a peak RSS larger than
the file plus an allowance). --save copies each finding's file into tests/corpus/<kind>/, where
tests/test_fuzz_models.py replays it.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.model_fuzz import CORPUS, Worker, gguf_case, make_seed_dir, make_seed_gguf, place_case, problem, safetensors_case  # noqa: E402


def keep(kind: str, raw: bytes) -> None:
    """A finding's file into the corpus that tests/test_fuzz_models.py replays."""
    folder = CORPUS / kind
    folder.mkdir(parents=True, exist_ok=True)
    (folder / (hashlib.sha256(raw).hexdigest()[:16] + (".gguf" if kind == "gguf" else ".safetensors"))).write_bytes(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="hypothesis examples per kind")
    parser.add_argument("--kind", choices=["gguf", "safetensors", "both"], default="both")
    parser.add_argument("--save", action="store_true", help="keep the findings in tests/corpus/<kind>/")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmcli-fuzz-"))
    seed_dir = make_seed_dir(work / "seed")
    seeds = {"gguf": make_seed_gguf(seed_dir, work / "seed.gguf").read_bytes(), "safetensors": (seed_dir / "model.safetensors").read_bytes()}
    strategies = {"gguf": gguf_case, "safetensors": safetensors_case}
    worker = Worker()
    kinds = ["gguf", "safetensors"] if args.kind == "both" else [args.kind]
    for kind in kinds:
        findings: dict[str, tuple[bytes, list[str], str]] = {}
        counts: dict[str, int] = {}
        started = time.time()

        @settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(strategies[kind](seeds[kind]))
        def campaign(case):
            raw, what = case
            path = place_case(kind, raw, work, seed_dir)
            result = worker.run(kind, path)
            counts[result["outcome"]] = counts.get(result["outcome"], 0) + 1
            found = problem(result, len(raw))
            if found is not None:
                key = found.splitlines()[-1][:160] if "Traceback" in found else found[:120]
                if key not in findings:
                    findings[key] = (raw, what, found)
                    print(f"[{kind}] {what}: {found}", flush=True)
                    if args.save:
                        keep(kind, raw)

        campaign()
        print(f"{kind}: {args.examples} examples in {time.time() - started:.0f} s, outcomes {counts}, {len(findings)} distinct findings")
    worker.close()


if __name__ == "__main__":
    main()
