"""Test PKI (a CA, a broker certificate, client certificates) and a Mosquitto TLS + ACL set-up."""
from __future__ import annotations

import datetime
import ipaddress
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, san: list | None = None):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


class PKI:
    """``ca.pem``; ``<name>.pem``/``<name>.key`` for the broker (SAN 127.0.0.1, localhost) and clients."""

    def __init__(self, directory: Path, name: str = "octopusd-test-ca") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = _cert(name, self.key, self.name, self.key, ca=True)
        self.ca_file = self.dir / f"{name}.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, server: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if server else None
        cert = _cert(cn, key, self.name, self.key, ca=False, san=san)
        pem = self.dir / f"{cn}.pem"
        pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return pem, _write_key(key, self.dir / f"{cn}.key")


def acl_text(silos: int) -> str:
    """The broker ACL: the server reads/writes the run; silo N only its own topics + the server's."""
    lines = ["user server", "topic readwrite octopus/#", ""]
    for n in range(1, silos + 1):
        lines += [f"user silo-{n}", "topic read octopus/+/server/#", f"topic readwrite octopus/+/silo/{n}/#", ""]
    return "\n".join(lines)


def password_file(path: Path, users: dict[str, str]) -> Path:
    path.write_text("")
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True, capture_output=True)
    path.chmod(0o600)
    return path


def tls_acl_conf(pki: PKI, server_cert: tuple[Path, Path], passwords: Path, acl: Path) -> str:
    return (f"cafile {pki.ca_file}\ncertfile {server_cert[0]}\nkeyfile {server_cert[1]}\n"
            f"require_certificate true\npassword_file {passwords}\nacl_file {acl}\n")
