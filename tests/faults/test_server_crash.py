"""kill -9 of the server mid-round: the same command started again resumes from its checkpoint,
adopts the round in flight instead of announcing it again, collects the updates the silos sent
while it was down (queued by the broker for its persistent session) and the one the dead process
had already taken (sent again by its silo when the server comes back online), and ends with the
exact model of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal

import pytest

from octopusd.server.checkpoint import _read_slot
from octopusd.testing import Federation

from .helpers import assert_every_round_trained_exactly, count_events, events, wait_for_event

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _restart_server_to_the_end(fed: Federation, timeout_s: float) -> tuple[list[dict], dict]:
    """Start the server again and let the run finish (every process exits 0); the new server
    process's events and its ``server_ready``."""
    seen = len(events(fed, "server"))
    fed.start("server", 0)
    codes = fed.wait_all(timeout_s=timeout_s)
    assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
    second = events(fed, "server")[seen:]
    return second, next(e for e in second if e.get("event") == "server_ready")


@pytest.mark.parametrize("crash_round", [0, 1], ids=["before-any-checkpoint", "after-an-aggregation"])
def test_server_killed_mid_round_resumes_and_matches_an_uninterrupted_run(tmp_path, mosquitto, moto_s3,
                                                                          crash_round):
    """The server dies after folding silo 1's update of round ``crash_round`` while silo 2 (slow:
    20 epochs) still trains it; silo 2 uploads while no server runs. Restarted, the server
    resumes (round 1: from the round-0 checkpoint; round 0: with no checkpoint, yet not as a
    fresh run), no silo trains any round twice, every process exits 0 and the final model
    equals the reference FedAvg within 1e-5."""
    rounds = 3
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=rounds, silo_procs=(1, 1),
                     silo_sections={2: {"train_args": {"epochs": 20}}})
    try:
        fed.start_all()
        wait_for_event(fed, "server", "update_folded", 150, silo=1, round=crash_round)
        assert count_events(fed, "server", "update_folded", silo=2, round=crash_round) == 0
        os.kill(fed.procs["server"].pid, signal.SIGKILL)
        assert fed.procs["server"].wait(10) == -signal.SIGKILL
        has_checkpoint = (fed.run_dir / "state" / "checkpoint-0").exists()  # round 0: slot 0
        assert has_checkpoint == (crash_round > 0)

        # Silo 2 finishes the round and uploads while no server is running.
        wait_for_event(fed, "silo2", "update_sent", 60, round=crash_round)
        second, ready = _restart_server_to_the_end(fed, timeout_s=150)
        assert ready["start_round"] == crash_round and ready["adopted_round"] is True
        assert ready["resumed"] is has_checkpoint
        # The round in flight was adopted, not announced again; both updates were counted.
        assert not any(e.get("event") == "round_started" and e.get("round") == crash_round for e in second)
        assert {e["silo"] for e in second if e.get("event") == "update_folded"
                and e.get("round") == crash_round} == {1, 2}
        assert_every_round_trained_exactly(fed, rounds)
    finally:
        fed.stop()


def test_server_that_lost_its_disk_catches_up_from_the_retained_announcement(tmp_path, mosquitto, moto_s3):
    """The server dies in round 2 and comes back without its local state, with only an S3 replica
    of round 0 (replicas of inline models lag by design). The silos have finished round 1 and
    would ignore a round-1 announcement, so the server takes the retained round-2 announcement's
    model (verified by sha256) and adopts round 2; the run ends with the exact reference model."""
    import boto3

    rounds = 4
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=rounds, silo_procs=(1, 1),
                     silo_sections={2: {"train_args": {"epochs": 20}}})
    try:
        fed.start_all()
        wait_for_event(fed, "server", "update_folded", 150, silo=1, round=2)
        os.kill(fed.procs["server"].pid, signal.SIGKILL)
        assert fed.procs["server"].wait(10) == -signal.SIGKILL
        state = fed.run_dir / "state"
        body = _read_slot(state / "checkpoint-0")  # round 0: round 2 was never committed
        assert body is not None and json.loads(body)["round"] == 0
        s3 = boto3.client("s3", endpoint_url=moto_s3.endpoint_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.put_object(Bucket="octopusd-test", Key=f"{fed.run_id}/checkpoint.json", Body=body)
        for slot in state.glob("checkpoint-*"):
            slot.unlink()

        second, ready = _restart_server_to_the_end(fed, timeout_s=200)
        assert ready["resumed"] is True and ready["start_round"] == 2 and ready["adopted_round"] is True
        assert any(e.get("event") == "resumed_from_announcement" and e.get("checkpoint_round") == 0
                   for e in second)
        assert_every_round_trained_exactly(fed, rounds)
    finally:
        fed.stop()
