"""Two Linux network namespaces joined by a veth pair: two "nodes" on one machine (root only)."""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid


def can_make_namespaces() -> str | None:
    """None if this test can create namespaces, else the reason it cannot."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if shutil.which("pdsh") is None:
        return "pdsh is not installed"
    probe = f"octo-probe-{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


class TwoNodes:
    """Namespaces ``a`` and ``b``; inside each, interface ``octo0`` with 10.<x>.<y>.1 / .2."""

    IFNAME = "octo0"

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.names = (f"octo-a-{tag}", f"octo-b-{tag}")
        n = int(tag, 16)
        self.subnet = f"10.{200 + n % 50}.{n // 50 % 250}"
        self.addresses = (f"{self.subnet}.1", f"{self.subnet}.2")
        self._veths = (f"oa{tag}", f"ob{tag}")

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def create(self) -> "TwoNodes":
        a, b = self.names
        va, vb = self._veths
        self._ip("netns", "add", a)
        self._ip("netns", "add", b)
        self._ip("link", "add", va, "type", "veth", "peer", "name", vb)
        for ns, veth, addr in ((a, va, self.addresses[0]), (b, vb, self.addresses[1])):
            self._ip("link", "set", veth, "netns", ns)
            self._ip("-n", ns, "link", "set", veth, "name", self.IFNAME)
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", self.IFNAME)
            self._ip("-n", ns, "link", "set", self.IFNAME, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
        return self

    def pids(self) -> list[int]:
        out: list[int] = []
        for ns in self.names:
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            out += [int(x) for x in r.stdout.split()]
        return out

    def destroy(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        for ns in self.names:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
