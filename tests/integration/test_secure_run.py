"""TLS (mutual), per-party broker identities with ACLs, and signatures, on a real Mosquitto."""
from __future__ import annotations

import asyncio
import queue

import paho.mqtt.client as paho
import pytest

from octopusd.config import MqttConfig
from octopusd.errors import BrokerUnreachableError
from octopusd.security import generate_keypair
from octopusd.testing import Federation, Mosquitto
from octopusd.transport.mqtt import MqttLink

from ..security_setup import PKI, acl_text, password_file, tls_acl_conf

pytestmark = pytest.mark.integration
PASSWORDS = {"server": "srv-pass-5f1d", "silo-1": "s1-pass-9a7c", "silo-2": "s2-pass-3e2b"}
S3_SECRET = "s3-secret-key-77c0ffee"


@pytest.fixture()
def secure_broker(tmp_path):
    pki = PKI(tmp_path / "pki")
    server_cert = pki.issue("broker", server=True)
    clients = {name: pki.issue(name) for name in PASSWORDS}
    acl = tmp_path / "acl"
    acl.write_text(acl_text(2))
    pw = password_file(tmp_path / "passwd", PASSWORDS)
    broker = Mosquitto(tmp_path / "mosq", extra_conf=tls_acl_conf(pki, server_cert, pw, acl), anonymous=False)
    broker.start()
    yield broker, pki, clients
    broker.stop()


def _mqtt(broker, pki, cert, user, **kw) -> MqttConfig:
    args = dict(host="127.0.0.1", port=broker.port, user=user, password=PASSWORDS.get(user),
                tls_ca_file=pki.ca_file, tls_cert_file=cert[0] if cert else None,
                tls_key_file=cert[1] if cert else None)
    args.update(kw)
    return MqttConfig(**args)


async def _connect(cfg: MqttConfig) -> None:
    link = MqttLink(cfg, "probe", will=None, subscriptions=[], first_connect_timeout_s=1.5, max_backoff_s=0.3)
    task = asyncio.create_task(link.run())
    try:
        done, _ = await asyncio.wait({task, asyncio.ensure_future(link.ever_connected.wait())},
                                     timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        assert link.ever_connected.is_set()
    finally:
        await link.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_tls_accepts_the_right_ca_and_certificate(secure_broker):
    """A client with the CA, its certificate and its password connects, host name verified."""
    broker, pki, clients = secure_broker
    asyncio.run(_connect(_mqtt(broker, pki, clients["silo-1"], "silo-1")))


@pytest.mark.parametrize("case", ["wrong_ca", "no_client_cert", "wrong_password"])
def test_tls_refuses_bad_clients(secure_broker, tmp_path, case):
    """A wrong CA, a missing client certificate (mTLS required) or a wrong password is refused."""
    broker, pki, clients = secure_broker
    kw = {}
    if case == "wrong_ca":
        kw["tls_ca_file"] = PKI(tmp_path / "other", "other-ca").ca_file
    elif case == "no_client_cert":
        kw.update(tls_cert_file=None, tls_key_file=None)
    else:
        kw["password"] = "nope"
    with pytest.raises((BrokerUnreachableError, BaseExceptionGroup)):
        asyncio.run(_connect(_mqtt(broker, pki, clients["silo-1"], "silo-1", **kw)))


def _paho(broker, pki, cert, user) -> paho.Client:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"probe-{user}")
    c.tls_set(ca_certs=str(pki.ca_file), certfile=str(cert[0]), keyfile=str(cert[1]))
    c.username_pw_set(user, PASSWORDS[user])
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


def test_acl_keeps_silos_apart(secure_broker):
    """Silo 2's identity can neither publish into silo 1's topics nor read them; silo 1 can."""
    broker, pki, clients = secure_broker
    got: queue.Queue = queue.Queue()
    server = _paho(broker, pki, clients["server"], "server")
    spy = _paho(broker, pki, clients["silo-2"], "silo-2")
    silo1 = _paho(broker, pki, clients["silo-1"], "silo-1")
    server.on_message = lambda c, u, m: got.put(("server", m.topic, m.payload))
    spy.on_message = lambda c, u, m: got.put(("spy", m.topic, m.payload))
    try:
        server.subscribe("octopus/acl/silo/+/update", qos=1)
        spy.subscribe("octopus/acl/silo/1/update", qos=1)
        import time
        time.sleep(0.5)  # let both SUBACKs land before publishing
        spy.publish("octopus/acl/silo/1/update", b"from silo 2", qos=1).wait_for_publish(5)
        silo1.publish("octopus/acl/silo/1/update", b"from silo 1", qos=1).wait_for_publish(5)
        messages = []
        try:
            while True:
                messages.append(got.get(timeout=2))
        except queue.Empty:
            pass
        assert ("server", "octopus/acl/silo/1/update", b"from silo 1") in messages
        assert not any(p == b"from silo 2" for _, _, p in messages)   # publish refused
        assert not any(who == "spy" for who, _, _ in messages)         # read refused
    finally:
        for c in (server, spy, silo1):
            c.disconnect()
            c.loop_stop()


@pytest.mark.timeout(300)
def test_tls_acl_signed_run_completes_without_leaking_secrets(secure_broker, tmp_path, moto_s3):
    """A full run over mutual TLS, per-party broker users and signatures completes; no password,
    S3 secret or private key appears in any log."""
    broker, pki, clients = secure_broker
    keys = {n: generate_keypair(tmp_path / "keys", n) for n in ("server", "silo-1", "silo-2")}
    trusted = {0: str(keys["server"][1]), 1: str(keys["silo-1"][1]), 2: str(keys["silo-2"][1])}

    def comm(user: str) -> dict:
        return {"MQTT_USER": user, "MQTT_PWD": PASSWORDS[user], "MQTT_TLS_CA": str(pki.ca_file),
                "MQTT_TLS_CERT": str(clients[user][0]), "MQTT_TLS_KEY": str(clients[user][1])}

    fed = Federation(tmp_path / "run", broker.port, moto_s3.endpoint_url, rounds=2, silo_procs=(1, 1),
                     overrides={"comm_args": {**comm("server"), "CN_S3_SAK": S3_SECRET},
                                "security_args": {"private_key": str(keys["server"][0]),
                                                  "trusted_keys": trusted, "require_signatures": True}},
                     silo_sections={i: {"comm_args": comm(f"silo-{i}"),
                                        "security_args": {"private_key": str(keys[f"silo-{i}"][0])}}
                                    for i in (1, 2)})
    try:
        fed.start_all()
        codes = fed.wait_all(timeout_s=240)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
        logs = "".join(fed.log_text(n) for n in codes) + (fed.run_dir / "metrics.jsonl").read_text()
        secrets = [*PASSWORDS.values(), S3_SECRET]
        secrets += [line for k in keys.values() for line in k[0].read_text().splitlines() if "PRIVATE" not in line]
        for secret in secrets:
            assert secret not in logs
        assert fed.stray_pids() == []
    finally:
        fed.stop()


def test_s3_over_https_with_a_private_ca(tmp_path):
    """An https S3 endpoint is trusted through CN_S3_CA_BUNDLE, and refused without it."""
    from octopusd.config import S3Config
    from octopusd.errors import StorageError
    from octopusd.testing import MotoServer
    from octopusd.transport.s3 import PayloadStore

    pki = PKI(tmp_path / "pki")
    s3 = MotoServer(tls=pki.issue("s3", server=True)).start()

    async def roundtrip(ca) -> bytes:
        cfg = S3Config(bucket="tls", access_key="k", secret_key="s", endpoint_url=s3.endpoint_url, ca_bundle=ca)
        async with PayloadStore(cfg, attempts=1) as store:
            await store.ensure_bucket()
            await store.put("x", b"payload")
            return await store.get("x", max_bytes=100)

    try:
        assert asyncio.run(roundtrip(pki.ca_file)) == b"payload"
        with pytest.raises(StorageError):
            asyncio.run(roundtrip(None))
    finally:
        s3.stop()
