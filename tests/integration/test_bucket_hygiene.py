"""Bucket hygiene on a real S3 endpoint: private objects, server-side encryption, retention."""
from __future__ import annotations

import boto3
import pytest

from octopusd.testing import Federation

pytestmark = pytest.mark.integration


def _run_and_list(fed: Federation, moto_s3) -> tuple[object, list[str]]:
    """Run the federation to the end (every process exits 0); a client and the run's keys."""
    try:
        fed.start_all()
        codes = fed.wait_all(timeout_s=240)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
    finally:
        fed.stop()
    s3 = boto3.client("s3", endpoint_url=moto_s3.endpoint_url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    return s3, sorted(o["Key"] for o in s3.list_objects_v2(Bucket="octopusd-test",
                                                           Prefix=fed.run_id + "/")["Contents"])


@pytest.mark.timeout(300)
def test_payloads_are_private_encrypted_and_pruned(tmp_path, mosquitto, moto_s3):
    """With S3_KEEP_ROUNDS 1 and CN_S3_SSE AES256: only the last closed round's payloads and the
    checkpoint remain, each written private and encrypted at rest."""
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=3, silo_procs=(1, 1),
                     overrides={"comm_args": {"S3_KEEP_ROUNDS": 1, "CN_S3_SSE": "AES256",
                                              # force payloads through S3 instead of inline
                                              "inline_payload_max_bytes": 0}})
    s3, keys = _run_and_list(fed, moto_s3)
    rounds = {k.split("/")[1] for k in keys if "/round-" in k}
    assert rounds == {"round-000002"}, keys  # rounds 0 and 1 pruned, the last closed one kept
    assert f"{fed.run_id}/checkpoint.json" in keys
    for key in keys:
        if key.endswith(".octt"):
            assert s3.head_object(Bucket="octopusd-test", Key=key).get("ServerSideEncryption") == "AES256"
        grants = s3.get_object_acl(Bucket="octopusd-test", Key=key)["Grants"]
        assert not any("AllUsers" in str(g.get("Grantee", {})) or "AuthenticatedUsers" in str(g.get("Grantee", {}))
                       for g in grants), grants


@pytest.mark.timeout(300)
def test_retention_finds_s3_updates_of_otherwise_inline_rounds(tmp_path, mosquitto, moto_s3):
    """The model rides inline, but silo 2 sends its updates through S3 (its own threshold is 0):
    retention still deletes them, keeping only the last closed round's (S3_KEEP_ROUNDS 0)."""
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=3, silo_procs=(1, 1),
                     overrides={"comm_args": {"S3_KEEP_ROUNDS": 0}},
                     silo_sections={2: {"comm_args": {"inline_payload_max_bytes": 0}}})
    s3, keys = _run_and_list(fed, moto_s3)
    assert [k for k in keys if "/round-" in k] == [], keys  # every round's silo-2 update deleted
    assert f"{fed.run_id}/checkpoint.json" in keys
