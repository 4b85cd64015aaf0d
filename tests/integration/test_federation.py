"""A whole federation over real Mosquitto and moto_server: server + 2 silos (2 + 1 trainers)."""
from __future__ import annotations

import json

import pytest
import torch

from octopusd import codec
from octopusd.testing import Federation

from ..faults.helpers import reference_fedavg as faults_reference

pytestmark = pytest.mark.integration


def reference_fedavg(cfg_path, silo_world_sizes: dict[int, int], rounds: int) -> dict[str, torch.Tensor]:
    """In-process FedAvg of DDP training with every silo in every round (see
    tests/faults/helpers.py for the arithmetic)."""
    return faults_reference(cfg_path, silo_world_sizes, [set(silo_world_sizes)] * rounds)


@pytest.mark.parametrize("transport", ["inline", "s3-and-shared-memory"])
def test_three_rounds_complete_and_match_reference(tmp_path, mosquitto, moto_s3, transport):
    """Three rounds finish, every process exits 0 and leaves nothing behind, metrics are written,
    and the final global model equals an in-process FedAvg of the same DDP training (≤ 1e-5).
    Both ways a model travels: inline in MQTT and over the socket to rank 0 (small models), and
    through S3 and, between silo master and rank 0, by shared memory (large ones: forced here)."""
    shared = transport != "inline"
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=3, silo_procs=(2, 1),
                     overrides={"comm_args": {"inline_payload_max_bytes": 0}} if shared else {})
    try:
        fed.start_all(env={"OCTOPUSD_SHM_MIN_BYTES": "1"} if shared else None)
        codes = fed.wait_all(timeout_s=240)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
        assert fed.stray_pids() == []
        lines = [json.loads(x) for x in (fed.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["round"] for m in lines] == [0, 1, 2]
        for m in lines:
            assert {"round", "test_acc", "test_loss", "silos", "round_seconds"} <= set(m)
            assert m["silos"] == [1, 2]
            assert 0.0 <= m["test_acc"] <= 1.0
        final = codec.decode_state((fed.run_dir / "final_model.octt").read_bytes())
        expected = reference_fedavg(fed.config, {1: 2, 2: 1}, rounds=3)
        assert final.keys() == expected.keys()
        diff = max(float((final[k] - expected[k]).abs().max()) for k in final)
        assert diff <= 1e-5, diff
        # ...and training really moved the model away from its seeded start.
        expected_start = reference_fedavg(fed.config, {1: 2, 2: 1}, rounds=0)
        moved = max(float((final[k] - expected_start[k]).abs().max()) for k in final)
        assert moved > 1e-3, moved
        # The two-trainer silo really ran DDP with two ranks.
        assert '"trainer_rank": 1' in fed.log_text("silo1")
        assert '"trainer_rank": 1' not in fed.log_text("silo2")
        for silo in ("silo1", "silo2"):
            # Trainers end cleanly: no abort at teardown that torchrun would report as a failure.
            assert "SIGABRT" not in fed.log_text(silo) and "terminate called" not in fed.log_text(silo)
            done = [json.loads(x) for x in fed.log_text(silo).splitlines() if '"trainer_round_done"' in x]
            assert [d["model_via"] for d in done] == ["shared memory" if shared else "socket"] * 3
    finally:
        fed.stop()
