"""Losing a silo master mid-run: the round closes with the quorum, the silo's last will drops it
from the round, its trainers die with it, and once restarted it rejoins a later round."""
from __future__ import annotations

import os
import signal

import pytest

from octopusd.testing import Federation

from .helpers import events, metrics, silo_pids, wait_for, wait_for_event

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.mark.timeout(300)
def test_killed_silo_is_dropped_then_rejoins_after_restart(tmp_path, mosquitto, moto_s3):
    """kill -9 of silo 2's master (two trainers) mid-round: no process of silo 2 survives, the
    server drops it from the round (last will) and finishes the round with silo 1 alone
    (min_silos_per_round 1); silo 2 started again comes back in a later round, and the run
    completes with every process exiting 0."""
    rounds = 12
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=rounds, silo_procs=(1, 2),
                     overrides={"train_args": {"epochs": 5, "min_silos_per_round": 1, "round_deadline_s": 3,
                                               "silo_offline_grace_s": 1}})
    try:
        fed.start_all()
        wait_for("round 1 with both silos", lambda: any(m["silos"] == [1, 2] for m in metrics(fed)), 150)
        # Kill silo 2 mid-run: its torchrun and trainers must go with it.
        before = silo_pids(fed, 2)
        assert len(before) >= 4, before  # master, torchrun, two trainers
        killed_at_round = len(metrics(fed))
        os.kill(fed.procs["silo2"].pid, signal.SIGKILL)
        fed.procs["silo2"].wait(10)
        wait_for("silo 2's torchrun and trainers to exit", lambda: silo_pids(fed, 2) == [], 20)

        dropped = wait_for_event(fed, "server", "silo_dropped_from_round", 30, silo=2)
        assert dropped["round"] >= killed_at_round - 1
        wait_for("a round closed by silo 1 alone",
                 lambda: any(m["silos"] == [1] for m in metrics(fed)[killed_at_round - 1:]), 60)
        assert len(metrics(fed)) < rounds - 4, "the run is nearly over: no room to test the rejoin"

        # Restarting a silo takes longer than a round here (torch imports on 2 cores): hold the
        # server (SIGSTOP) until silo 2 is back, so the rejoin does not race the end of the run.
        os.kill(fed.procs["server"].pid, signal.SIGSTOP)
        try:
            seen = len(events(fed, "silo2"))
            fed.start("silo", 2)
            wait_for("restarted silo 2 ready", lambda: any(
                e.get("event") == "trainer_group_ready" for e in events(fed, "silo2")[seen:]), 90)
        finally:
            os.kill(fed.procs["server"].pid, signal.SIGCONT)
        codes = fed.wait_all(timeout_s=200)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
        m = metrics(fed)
        assert [x["round"] for x in m] == list(range(rounds))
        alone = [x["round"] for x in m if x["silos"] == [1] and x["round"] >= killed_at_round - 1]
        assert alone, m
        both_after = [x["round"] for x in m if x["silos"] == [1, 2] and x["round"] > alone[0]]
        assert both_after, f"silo 2 did not rejoin after its restart: {[x['silos'] for x in m]}"
        # (Not asserted: that it makes every later deadline — on a loaded 2-core CI machine a round
        # can close at its deadline with one silo, which is the quorum rule working, not a failure.)
        # The restarted silo skipped the rounds announced while it was down instead of training
        # them (the round in flight at the kill may have been trained by the killed process).
        trained = [e["round"] for e in events(fed, "silo2") if e.get("event") == "trainer_round_done"]
        assert all(r <= killed_at_round or r >= both_after[0] for r in trained), trained
        assert fed.stray_pids() == []
    finally:
        fed.stop()
