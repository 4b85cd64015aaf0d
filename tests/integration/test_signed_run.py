"""A run with required signatures: forged, unsigned and cross-signed messages are rejected."""
from __future__ import annotations

import threading

import paho.mqtt.client as paho
import pytest

from octopusd import codec
from octopusd.envelope import Envelope, MsgType, PayloadRef, encode_envelope
from octopusd.security import Signer, generate_keypair, load_private_key
from octopusd.testing import Federation
from octopusd.transport import topics

from .test_federation import reference_fedavg

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_signed_run_rejects_forgeries_and_finishes_exactly(tmp_path, mosquitto, moto_s3):
    """Every party signs; an attacker's unsigned, rogue-signed and cross-signed updates and round
    announcements are logged and dropped, and the result equals the honest FedAvg."""
    keys = {n: generate_keypair(tmp_path / "keys", n) for n in ("server", "silo-1", "silo-2", "rogue")}
    trusted = {0: str(keys["server"][1]), 1: str(keys["silo-1"][1]), 2: str(keys["silo-2"][1])}
    fed = Federation(tmp_path / "run", mosquitto.port, moto_s3.endpoint_url, rounds=2, silo_procs=(1, 1),
                     overrides={"security_args": {"private_key": str(keys["server"][0]),
                                                  "trusted_keys": trusted, "require_signatures": True}},
                     silo_sections={i: {"security_args": {"private_key": str(keys[f"silo-{i}"][0])}}
                                    for i in (1, 2)})
    run = fed.run_id
    ref = PayloadRef(sha256="0" * 64, size=3, inline=b"abc")
    rogue = Signer(load_private_key(keys["rogue"][0]))
    silo2 = Signer(load_private_key(keys["silo-2"][0]))

    def upd(sender: int, r: int = 0) -> Envelope:
        return Envelope(type=MsgType.UPDATE, run_id=run, round=r, sender=sender,
                        body={"payload": ref, "num_samples": 10**6})

    attacks = [
        (topics.silo_update(run, 1), encode_envelope(upd(1))),                     # unsigned
        (topics.silo_update(run, 1), encode_envelope(rogue.sign(upd(1)))),         # forged
        (topics.silo_update(run, 1), encode_envelope(silo2.sign(upd(2)))),         # silo 2 posing on silo 1's topic
        (topics.broadcast(run), encode_envelope(rogue.sign(Envelope(
            type=MsgType.ROUND_START, run_id=run, round=7, sender=0,
            body={"selected": [1, 2], "payload": ref})))),                         # fake announcement
        (topics.broadcast(run), encode_envelope(Envelope(
            type=MsgType.FINISH, run_id=run, round=0, sender=0, body={"reason": "bye"}))),  # unsigned finish
    ]
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"attacker-{run}")
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    stop = threading.Event()

    def spray() -> None:
        while not stop.wait(0.3):
            for topic, payload in attacks:
                client.publish(topic, payload, qos=1)

    sprayer = threading.Thread(target=spray, daemon=True)
    try:
        fed.start_all()
        sprayer.start()
        codes = fed.wait_all(timeout_s=240)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
        server_log, silo_log = fed.log_text("server"), fed.log_text("silo1")
        assert "unsigned message from sender 1" in server_log
        assert "forged or corrupted signature from sender 1" in server_log
        assert "does not match the topic" in server_log
        assert "forged or corrupted signature from sender 0" in silo_log
        assert "unsigned message from sender 0" in silo_log
        final = codec.decode_state((fed.run_dir / "final_model.octt").read_bytes())
        expected = reference_fedavg(fed.config, {1: 1, 2: 1}, rounds=2)
        assert max(float((final[k] - expected[k]).abs().max()) for k in final) <= 1e-5
        assert fed.stray_pids() == []
    finally:
        stop.set()
        client.disconnect()
        client.loop_stop()
        fed.stop()
