"""The examples/ tree runs as documented: run_server.sh + run_client.sh RANK for each example."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from octopusd.testing import Federation

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("example", ["one_line", "step_by_step", "custom_data_and_model"])
def test_example_runs_a_federation(example, tmp_path, mosquitto, moto_s3):
    """The example's server and two clients (2 + 1 trainers) finish 2 rounds and exit 0."""
    # The custom example's own toy task learns in two rounds at a livelier learning rate.
    overrides = {"train_args": {"learning_rate": 0.1}} if example == "custom_data_and_model" else {}
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=2, silo_procs=(2, 1),
                     overrides=overrides)
    env = {"CONFIG": str(fed.config), "PYTHON": sys.executable}
    folder = EXAMPLES / example
    try:
        fed.start_command("server", ["bash", str(folder / "run_server.sh")], env)
        for rank in (1, 2):
            fed.start_command(f"silo{rank}", ["bash", str(folder / "run_client.sh"), str(rank)], env)
        codes = fed.wait_all(timeout_s=240)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
        metrics = [json.loads(x) for x in (fed.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["round"] for m in metrics] == [0, 1]
        assert all(m["silos"] == [1, 2] for m in metrics)
        if example == "custom_data_and_model":
            assert metrics[-1]["test_acc"] > 0.8  # four well-separated blobs: the user's model learns
        assert '"trainer_rank": 1' in fed.log_text("silo1")
        assert fed.stray_pids() == []
    finally:
        fed.stop()
