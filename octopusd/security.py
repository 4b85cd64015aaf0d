"""Message signatures (Ed25519) and key files.

Every envelope can carry ``sig``: its sender's Ed25519 signature over :func:`signing_bytes` — a
canonical msgpack encoding of every envelope field (schema, type, run_id, round, sender, message id,
timestamp) and the body, with payload references reduced to their sha256, size and key. So a
signature binds the payload digest to one run and one round: it cannot be replayed into another
run or round, and a replay within the round is a duplicate message id. Keys: ``octopusd keygen``;
each party's ``security_args.trusted_keys`` maps sender ranks (0 = server) to public key files.
"""
from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from octopusd.envelope import Envelope, PayloadRef
from octopusd.errors import ConfigError, EnvelopeError


def _canonical(value: Any) -> Any:
    if isinstance(value, PayloadRef):
        return ["payload", value.sha256, value.size, value.key]
    if isinstance(value, Mapping):
        return [[k, _canonical(value[k])] for k in sorted(value)]
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float):
        return ["f", value.hex()]
    return value


def signing_bytes(env: Envelope) -> bytes:
    """The exact bytes a signature covers (independent of msgpack map order or int/float forms)."""
    fields = [env.schema, env.type.value, env.run_id, env.round, env.sender, env.msg_id,
              float(env.sent_at).hex(), _canonical(env.body)]
    return msgpack.packb(["octopusd-envelope-signature-v1", fields], use_bin_type=True)


def generate_keypair(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>.key`` (PEM, mode 0600) and ``<name>.pub``; refuse to overwrite."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (key_path, pub_path):
        if p.exists():
            raise ConfigError(f"{p} already exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    p = Path(path)
    try:
        mode = p.stat().st_mode
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read private key: {exc.strerror}", file=str(p),
                          key="security_args.private_key") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"private key is accessible by group/others (mode {oct(mode & 0o777)}); "
                          f"run: chmod 600 {p}", file=str(p), key="security_args.private_key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError("not a PEM private key", file=str(p), key="security_args.private_key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("not an Ed25519 key", file=str(p), key="security_args.private_key")
    return key


def load_public_key(path: str | Path, key_name: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load public key: {exc}", file=str(path), key=key_name) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError("not an Ed25519 public key", file=str(path), key=key_name)
    return key


class Signer:
    def __init__(self, key: Ed25519PrivateKey | None) -> None:
        self.key = key

    def sign(self, env: Envelope) -> Envelope:
        if self.key is None:
            return env
        return replace(env, sig=self.key.sign(signing_bytes(replace(env, sig=None))))


class Verifier:
    """Checks envelopes against the trusted keys; with ``required``, unsigned ones are rejected."""

    def __init__(self, trusted: Mapping[int, Ed25519PublicKey], required: bool) -> None:
        self.trusted = dict(trusted)
        self.required = required

    def check(self, env: Envelope) -> None:
        if env.sig is None:
            if self.required:
                raise EnvelopeError(f"unsigned message from sender {env.sender}; signatures are required")
            return
        key = self.trusted.get(env.sender)
        if key is None:
            raise EnvelopeError(f"no trusted key for sender {env.sender}")
        try:
            key.verify(env.sig, signing_bytes(replace(env, sig=None)))
        except InvalidSignature:
            raise EnvelopeError(f"forged or corrupted signature from sender {env.sender}") from None


def from_config(cfg: Any) -> tuple[Signer, Verifier]:
    """Signer and verifier for this party, from ``security_args``."""
    sec = cfg.security
    key = load_private_key(sec.private_key) if sec.private_key else None
    trusted = {}
    for rank, path in sec.trusted_keys.items():
        trusted[int(rank)] = load_public_key(path, f"security_args.trusted_keys.{rank}")
    if sec.require_signatures and key is None:
        raise ConfigError("require_signatures is true but no private_key is set",
                          key="security_args.private_key")
    return Signer(key), Verifier(trusted, sec.require_signatures)
