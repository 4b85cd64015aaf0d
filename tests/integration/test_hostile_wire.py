"""Hostile and replayed MQTT traffic during a real run is dropped without harm."""
from __future__ import annotations

import pickle
import threading

import msgpack
import paho.mqtt.client as paho
import pytest

from octopusd import codec
from octopusd.envelope import Envelope, MsgType, PayloadRef, encode_envelope
from octopusd.testing import Federation
from octopusd.transport import topics

from .test_federation import reference_fedavg

pytestmark = pytest.mark.integration


class Attacker:
    """A plain MQTT client that replays every real update twice and sprays junk at both sides."""

    def __init__(self, port: int, run_id: str) -> None:
        self.run_id = run_id
        self.replayed = 0
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"attacker-{run_id}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"octopus/{run_id}/silo/+/update", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        if msg.retain:
            return
        for _ in range(2):  # the exact same bytes again: a duplicate must not count twice
            client.publish(msg.topic, msg.payload, qos=1)
        self.replayed += 1

    def spray(self) -> None:
        run = self.run_id
        forged_ref = PayloadRef(sha256="0" * 64, size=3, inline=b"abc")
        junk = [
            (topics.silo_update(run, 1), b"\x00\xff garbage"),
            (topics.silo_update(run, 1), pickle.dumps({"__reduce__": "os.system"})),
            (topics.silo_update(run, 2), msgpack.packb({"v": 99, "t": "update"})),
            (topics.silo_update(run, 2), b"\xc1" * 10),
            # A well-formed envelope whose claimed sender does not match its topic.
            (topics.silo_update(run, 1), encode_envelope(Envelope(
                type=MsgType.UPDATE, run_id=run, round=0, sender=2,
                body={"payload": forged_ref, "num_samples": 10**6}))),
            # Another run's message on this run's topic.
            (topics.silo_update(run, 1), encode_envelope(Envelope(
                type=MsgType.UPDATE, run_id="someone-else", round=0, sender=1,
                body={"payload": forged_ref, "num_samples": 10**6}))),
            # A correct-looking update whose payload does not match its digest.
            (topics.silo_update(run, 2), encode_envelope(Envelope(
                type=MsgType.UPDATE, run_id=run, round=0, sender=2,
                body={"payload": forged_ref, "num_samples": 10**6}))),
            (topics.silo_status(run, 7), b"{}"),
            (topics.broadcast(run), b"not an envelope"),
            (topics.broadcast(run), pickle.dumps(object)),
            (f"octopus/{run}/silo/abc/update", b"x"),
        ]
        for topic, payload in junk:
            self.client.publish(topic, payload, qos=1)

    def close(self) -> None:
        # disconnect() first: it is what makes paho's network thread leave its loop.
        self.client.disconnect()
        self.client.loop_stop()


def test_junk_and_replays_are_dropped_and_the_result_is_exact(tmp_path, mosquitto, moto_s3):
    """Garbage, pickles, spoofed senders, foreign runs, bad digests and replayed updates are logged
    and dropped: the run completes and its final model is exactly the honest FedAvg."""
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=2, silo_procs=(1, 1))
    attacker = Attacker(mosquitto.port, fed.run_id)
    stop = threading.Event()

    def keep_spraying() -> None:
        while not stop.wait(0.3):
            attacker.spray()

    sprayer = threading.Thread(target=keep_spraying, daemon=True)
    try:
        fed.start_all()
        sprayer.start()
        codes = fed.wait_all(timeout_s=240)
        stop.set()
        sprayer.join(5)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
        assert attacker.replayed >= 4
        server_log = fed.log_text("server")
        assert "message_rejected" in server_log
        assert "message_dropped" in server_log  # the replays
        assert "message_rejected" in fed.log_text("silo1")
        final = codec.decode_state((fed.run_dir / "final_model.octt").read_bytes())
        expected = reference_fedavg(fed.config, {1: 1, 2: 1}, rounds=2)
        diff = max(float((final[k] - expected[k]).abs().max()) for k in final)
        assert diff <= 1e-5, diff
        assert fed.stray_pids() == []
    finally:
        stop.set()
        attacker.close()
        fed.stop()
