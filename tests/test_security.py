"""Ed25519 envelope signatures and key files (no wire)."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest

from octopusd.envelope import Envelope, MsgType, PayloadRef, decode_envelope, encode_envelope
from octopusd.errors import ConfigError, EnvelopeError
from octopusd.security import Signer, Verifier, generate_keypair, load_private_key, load_public_key

REF = PayloadRef(sha256="a" * 64, size=3, key="run/round-000001/silo-1.octt")


def update(round_: int = 1, sender: int = 1, run_id: str = "run-a") -> Envelope:
    return Envelope(type=MsgType.UPDATE, run_id=run_id, round=round_, sender=sender,
                    body={"payload": REF, "num_samples": 10, "train_loss": 0.5})


@pytest.fixture()
def keys(tmp_path):
    return {name: generate_keypair(tmp_path, name) for name in ("server", "silo-1", "silo-2")}


def parties(keys):
    signer = Signer(load_private_key(keys["silo-1"][0]))
    verifier = Verifier({0: load_public_key(keys["server"][1], "k"), 1: load_public_key(keys["silo-1"][1], "k"),
                         2: load_public_key(keys["silo-2"][1], "k")}, required=True)
    return signer, verifier


def test_signed_envelope_verifies_after_the_wire(keys):
    """A signed envelope survives encode/decode and verifies with the sender's public key."""
    signer, verifier = parties(keys)
    env = decode_envelope(encode_envelope(signer.sign(update())))
    verifier.check(env)


@pytest.mark.parametrize("tamper", [
    lambda e: replace(e, round=2),                       # replay into another round
    lambda e: replace(e, run_id="run-b"),                # replay into another run
    lambda e: replace(e, body={**e.body, "num_samples": 10_000}),
    lambda e: replace(e, body={**e.body, "payload": replace(REF, sha256="b" * 64)}),
    lambda e: replace(e, msg_id="f" * 32),
    lambda e: replace(e, sender=2),                      # claims to be another silo
])
def test_any_change_breaks_the_signature(keys, tamper):
    """Round, run, body, payload digest, message id and sender are all covered by the signature."""
    signer, verifier = parties(keys)
    env = decode_envelope(encode_envelope(tamper(signer.sign(update()))))
    with pytest.raises(EnvelopeError, match="forged"):
        verifier.check(env)


def test_unsigned_rejected_when_required(keys):
    """With require_signatures, an unsigned envelope is rejected."""
    _, verifier = parties(keys)
    with pytest.raises(EnvelopeError, match="unsigned"):
        verifier.check(update())


def test_signature_by_an_untrusted_key_is_rejected(keys, tmp_path):
    """A key pair nobody trusts cannot sign for a trusted sender."""
    _, verifier = parties(keys)
    rogue_key, _ = generate_keypair(tmp_path / "rogue", "rogue")
    env = Signer(load_private_key(rogue_key)).sign(update())
    with pytest.raises(EnvelopeError, match="forged"):
        verifier.check(env)


def test_unknown_sender_rejected(keys):
    """A signed message from a rank without a trusted key is rejected."""
    signer, verifier = parties(keys)
    env = Signer(signer.key).sign(update(sender=7))
    with pytest.raises(EnvelopeError, match="no trusted key"):
        verifier.check(env)


def test_world_readable_private_key_is_refused(keys):
    """A private key readable by group or others stops start-up with the chmod to run."""
    key = keys["silo-1"][0]
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_private_key(key)


def test_keygen_never_overwrites(keys, tmp_path):
    """Generating a key under an existing name fails instead of replacing the key."""
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(tmp_path, "server")
