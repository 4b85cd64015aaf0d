"""Every bench still runs end to end at tiny sizes and prints its JSON (no timing is asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def run_bench(script: str, *args: str, timeout: float = 180) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert lines, proc.stdout
    return lines


@pytest.mark.integration
def test_round_bench_runs_the_daemons_and_reports_every_field(tmp_path):
    """bench/round.py drives server + 2 silos over Mosquitto and moto_server (payloads forced
    through S3) and reports round, training, overhead, RSS, bytes and the transfer floor."""
    (out,) = run_bench("round.py", "--models", "lr", "--rounds", "2", "--samples", "64",
                       "--inline-max", "0", "--floor-reps", "1", "--workdir", str(tmp_path))
    assert out["model"] == "lr" and out["params"] == 7850 and out["rounds_measured"] >= 1
    for key in ("median_round_s", "median_train_s", "overhead_s", "first_round_s", "floor_s"):
        assert isinstance(out[key], float) and out[key] >= 0, key
    assert out["median_round_s"] >= out["median_train_s"] > 0
    assert out["payload_inline"] is False
    assert out["bytes_per_round"] == 31552 * 3 + 2 * 2 * 31552
    assert out["server_peak_rss_mb"] >= out["server_idle_rss_mb"] > 0
    assert out["overhead_over_floor"] is not None


def test_aggregate_bench_reports_throughputs_against_memcpy():
    (out,) = run_bench("aggregate.py", "--models", "tiny", "--reps", "1", timeout=60)
    assert out["bench"] == "aggregate" and out["bytes"] > 0
    for key in ("memcpy_gbps", "accumulate_gbps", "accumulate_over_memcpy", "decode_gbps", "sha256_gbps"):
        assert out[key] > 0, key


@pytest.mark.integration
def test_scale_bench_packs_null_trainer_silos_into_processes(tmp_path):
    """bench/scale.py: real server, silo masters with the null trainer packed two per process."""
    (out,) = run_bench("scale.py", "--silos", "4", "--rounds", "1", "--procs", "2",
                       "--workdir", str(tmp_path))
    assert out["silos"] == 4 and out["procs"] == 2 and out["rounds_measured"] >= 1
    assert out["payload_bytes"] > 256 * 1024  # the 100 k-parameter model goes through S3
    assert out["server_cpu_ms_per_silo_round"] > 0 and out["median_round_s"] > 0


@pytest.mark.integration
def test_trainer_bench_compares_a_silo_with_a_bare_torchrun_loop(tmp_path):
    (out,) = run_bench("trainer.py", "--model", "tiny", "--rounds", "1", "--samples", "64",
                       "--workdir", str(tmp_path))
    assert out["samples"] == 64 and out["octopusd_samples_per_s"] > 0 and out["bare_samples_per_s"] > 0
    assert out["ratio"] > 0


def test_fuzz_bench_runs_the_fuzzers_with_its_example_count():
    (out,) = run_bench("fuzz.py", "--examples", "20", timeout=240)
    assert out["bench"] == "fuzz" and out["examples_per_test"] == 20 and out["only_typed_errors"] is True
    assert "passed" in out["pytest_summary"][0]
