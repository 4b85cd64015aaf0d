"""systemd's readiness protocol (``sd_notify``), without a dependency.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for an
abstract socket) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). A daemon
sends newline-separated ``KEY=VALUE`` datagrams: ``READY=1`` once it serves, ``STATUS=…`` for
``systemctl status``, ``WATCHDOG=1`` at least every ``WATCHDOG_USEC`` (we send every half of it,
from the event loop, so a blocked loop is noticed), ``STOPPING=1`` when it shuts down.
Outside systemd every call is a no-op; a failing send is logged once and never raises.
"""
from __future__ import annotations

import asyncio
import os
import socket
from typing import Mapping

import structlog

log = structlog.get_logger(__name__)


def _address(raw: str) -> str | None:
    if raw.startswith("@"):
        return "\0" + raw[1:]           # abstract namespace
    if raw.startswith("/"):
        return raw
    return None                         # e.g. vsock:…, which we do not speak


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _address(raw) if raw else None
        if raw and self.address is None:
            log.warning("notify_socket_unsupported", notify_socket=raw)
        self.watchdog_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; False if there is no socket or it failed."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("notify_failed", error=str(exc))
            return False

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> None:
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    async def watchdog_loop(self) -> None:
        """Ping the watchdog every half period for as long as the event loop runs it."""
        if self.watchdog_s is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_s / 2)  # a heartbeat period, not a poll

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
