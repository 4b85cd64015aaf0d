"""S3 faults between the daemons and a real moto_server, injected by a reverse proxy: transient
errors and slow answers are retried and cost nothing; an update corrupted at rest is rejected by
its sha256 and never aggregated."""
from __future__ import annotations

import boto3
import pytest

from octopusd import codec
from octopusd.testing import Federation

from .helpers import count_events, events, max_diff, metrics, reference_fedavg, wait_for_event
from .s3proxy import FaultProxy, Rule

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

S3_PAYLOADS = {"comm_args": {"inline_payload_max_bytes": 0}}   # every model goes through S3


@pytest.fixture
def proxy(moto_s3):
    p = FaultProxy(moto_s3.endpoint_url).start()
    yield p
    p.stop()


def test_transient_s3_errors_and_delays_are_retried_and_cost_nothing(tmp_path, mosquitto, proxy):
    """503/500 answers (some past botocore's own three attempts, so octopusd's retry runs too) and
    a slow GET on update uploads, global-model downloads, update downloads and checkpoints: the
    run completes, every update is folded exactly once, the model equals the reference."""
    rounds = 3
    proxy.add(Rule("PUT", r"/round-000000/silo-1\.octt", "fail", count=2, status=503))
    proxy.add(Rule("GET", r"/round-000001/global\.octt", "fail", count=2, status=500))
    proxy.add(Rule("GET", r"/round-000001/silo-2\.octt", "delay", delay_s=1.5))
    proxy.add(Rule("PUT", r"/checkpoint", "fail", count=2, status=503))
    proxy.add(Rule("GET", r"/round-000002/silo-1\.octt", "fail", count=4, status=500))
    fed = Federation(tmp_path, mosquitto.port, proxy.endpoint_url, rounds=rounds, silo_procs=(1, 1),
                     overrides=S3_PAYLOADS)
    try:
        fed.start_all()
        codes = fed.wait_all(timeout_s=200)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
        assert all(rule.hits == rule.count for rule in proxy.rules), [(r.path, r.hits) for r in proxy.rules]
        assert len(proxy.injected("fail")) == sum(r.count for r in proxy.rules if r.action == "fail")
        assert len(proxy.injected("delay")) == 1
        # Four 500s in a row outlast botocore's three attempts: octopusd's own retry took over.
        assert any(e.get("event") == "s3_retry" for e in events(fed, "server"))
        for r in range(rounds):
            for silo in (1, 2):
                assert count_events(fed, "server", "update_folded", silo=silo, round=r) == 1
        final = codec.decode_state((fed.run_dir / "final_model.octt").read_bytes())
        assert max_diff(final, reference_fedavg(fed.config, {1: 1, 2: 1}, [{1, 2}] * rounds)) <= 1e-5
        assert fed.stray_pids() == []
    finally:
        fed.stop()


def test_an_update_corrupted_at_rest_is_rejected_and_never_aggregated(tmp_path, mosquitto, moto_s3, proxy):
    """Silo 2's round-1 update is overwritten in the bucket (same size, one byte flipped) between
    its upload and the server's download. The server rejects it by sha256, closes round 1 at its
    deadline with silo 1 (min_silos_per_round 1), and the final model is the FedAvg of the run
    in which silo 2 missed round 1."""
    rounds = 3
    direct = boto3.client("s3", endpoint_url=moto_s3.endpoint_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")

    def flip_a_byte(method: str, path: str) -> None:
        bucket, key = path.lstrip("/").split("?")[0].split("/", 1)
        data = bytearray(direct.get_object(Bucket=bucket, Key=key)["Body"].read())
        data[len(data) // 2] ^= 0x01
        direct.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    proxy.add(Rule("GET", r"/round-000001/silo-2\.octt", "before", callback=flip_a_byte))
    fed = Federation(tmp_path, mosquitto.port, proxy.endpoint_url, rounds=rounds, silo_procs=(1, 1),
                     overrides={**S3_PAYLOADS, "train_args": {"min_silos_per_round": 1, "round_deadline_s": 3}})
    try:
        # Both silos are up before the server starts, so round 1 selects both (with a quorum of
        # 1, round 0 starts with whichever silo's status the server reads first).
        fed.start("silo", 1)
        fed.start("silo", 2)
        for name in ("silo1", "silo2"):
            wait_for_event(fed, name, "trainer_group_ready", 150)
        fed.start("server", 0)
        codes = fed.wait_all(timeout_s=200)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
        assert proxy.rules[0].hits == 1
        rejected = [e for e in events(fed, "server") if e.get("event") == "update_rejected" and e.get("silo") == 2]
        assert rejected and rejected[0]["round"] == 1 and "sha256" in rejected[0]["reason"], rejected
        assert count_events(fed, "server", "update_folded", silo=2, round=1) == 0
        participants = [set(m["silos"]) for m in metrics(fed)]
        assert participants[1] == {1} and participants[2] == {1, 2}, participants
        assert count_events(fed, "server", "round_deadline", round=1) == 1
        final = codec.decode_state((fed.run_dir / "final_model.octt").read_bytes())
        assert max_diff(final, reference_fedavg(fed.config, {1: 1, 2: 1}, participants)) <= 1e-5
        assert fed.stray_pids() == []
    finally:
        fed.stop()
