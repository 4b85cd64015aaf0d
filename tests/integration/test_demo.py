"""`octopusd demo` (the README's main command) end to end, shortened: embedded broker and S3, the
server and the seed's two silos as processes, the data source named, the final accuracy printed."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_demo_runs_three_rounds_and_reports_accuracy(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "octopusd", "demo", "--rounds", "3", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=280, env=env, start_new_session=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"^data: .+", proc.stdout, re.M), out[-2000:]          # which MNIST is in use
    assert [int(m) for m in re.findall(r"^round\s+(\d+)/3", proc.stdout, re.M)] == [1, 2, 3], out[-2000:]
    final = re.search(r"final test accuracy after 3 rounds: (0\.\d+)", proc.stdout)
    assert final and 0.0 < float(final.group(1)) <= 1.0, out[-2000:]
    assert "Traceback" not in out and "SIGABRT" not in out
