"""Long fuzz run of the envelope decoder and tensor codec (the CI suite runs ~2,000 cases each).

    .venv/bin/python bench/fuzz.py [--examples 50000]

Runs the suite's hypothesis fuzz tests with many more, randomly seeded examples and prints one JSON
line: examples per test, seconds, and whether only typed errors (CodecError/EnvelopeError) came out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=50_000)
    a = p.parse_args()
    env = {**os.environ, "OCTOPUSD_FUZZ_EXAMPLES": str(a.examples), "OCTOPUSD_FUZZ_RANDOM": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "fuzz",
                        "tests/test_codec.py", "tests/test_envelope.py"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    print(json.dumps({"bench": "fuzz", "examples_per_test": a.examples, "seconds": round(time.perf_counter() - t0, 1),
                      "only_typed_errors": r.returncode == 0, "pytest_summary": r.stdout.strip().splitlines()[-1:]}))
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
