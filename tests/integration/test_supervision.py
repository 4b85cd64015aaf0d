"""Trainer supervision: a trainer killed mid-round is noticed, the group relaunched, the round retrained."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from octopusd import codec
from octopusd.testing import Federation

from .test_federation import reference_fedavg

pytestmark = pytest.mark.integration


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _trainer_pids(run_id: str, silo: int) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"octopusd.trainer.worker" in argv and run_id.encode() in argv and str(silo).encode() in argv:
            if b"torch.distributed.run" not in argv:
                pids.append(int(cmdline.parent.name))
    return sorted(pids)


@pytest.mark.timeout(300)
def test_killed_trainer_is_relaunched_and_the_round_retrained(tmp_path, mosquitto, moto_s3):
    """SIGKILL one of silo 1's two trainers during round 0: the silo master sees the group fail
    (bounded by dist_timeout_s, not 30 minutes), relaunches it, retrains the round, and the run's
    final model is exactly what an undisturbed run gives."""
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=2, silo_procs=(2, 1),
                     overrides={"train_args": {"epochs": 15}})
    try:
        fed.start_all()
        _wait_for(lambda: '"round_started"' in fed.log_text("server"), 120, "round 0 to start")
        _wait_for(lambda: len(_trainer_pids(fed.run_id, 1)) == 2, 30, "silo 1's trainers")
        victim = _trainer_pids(fed.run_id, 1)[-1]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _wait_for(lambda: '"trainer_group_failed"' in fed.log_text("silo1"), 60, "the failure to be noticed")
        assert time.monotonic() - killed_at < 45  # dist_timeout_s is 30 in the test config
        codes = fed.wait_all(timeout_s=240)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
        log = fed.log_text("silo1")
        assert '"launch": 2' in log
        assert victim not in _trainer_pids(fed.run_id, 1)
        final = codec.decode_state((fed.run_dir / "final_model.octt").read_bytes())
        expected = reference_fedavg(fed.config, {1: 2, 2: 1}, rounds=2)
        diff = max(float((final[k] - expected[k]).abs().max()) for k in final)
        assert diff <= 1e-5, diff
        assert fed.stray_pids() == []
    finally:
        fed.stop()
